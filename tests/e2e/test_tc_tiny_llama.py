"""Trace a tiny random Llama function, restore it in a fresh process, compare bit for bit."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.e2e


def _helpers():
    path = Path(__file__).with_name("tc_helpers.py")
    spec = importlib.util.spec_from_file_location("tc_helpers_e2e", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


h = _helpers()

MUTATING_HANDLER = h.TINY_HANDLER.replace(
    "def handle(event, context):\n",
    "def handle(event, context):\n    with torch.no_grad():\n"
    "        model.model.norm.weight.mul_(2.0)\n",
)
DYNAMIC_HANDLER = h.TINY_HANDLER.replace(
    "model = AutoModelForCausalLM",
    "from safetensors.torch import load_file, save_file\n"
    "_scratch = os.path.join(os.path.dirname(__file__), 'scratch.safetensors')\n"
    "save_file({'noise': torch.randn(8)}, _scratch)\n"
    "noise = load_file(_scratch)['noise']\n"
    "model = AutoModelForCausalLM",
)


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    function_dir = h.make_tiny_llama(root / "function")
    template = root / "template"
    h.trace(function_dir, template)
    return function_dir, template


@pytest.fixture(scope="module")
def ordinary(traced, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, torch.Tensor]:
    """One ordinary start of the traced function, shared by the comparisons."""
    out = tmp_path_factory.mktemp("ordinary")
    result = h.run_start(traced[0], out)
    return result, _logits(out)


def _logits(out_dir: Path) -> torch.Tensor:
    return torch.load(out_dir / "logits.pt")


def test_restore_is_bit_identical_to_ordinary_start(traced, ordinary, tmp_path: Path) -> None:
    function_dir, template = traced
    ordinary_result, ordinary_logits = ordinary
    restored = h.run_start(function_dir, tmp_path / "restored", template=template)
    assert restored["stats"]["used"] and restored["stats"]["rejected"] is None
    assert restored["stats"]["hits"] == 1 and restored["stats"]["misses"] == 0
    assert restored["stats"]["tensors_served"] > 0
    assert torch.equal(ordinary_logits, _logits(tmp_path / "restored"))
    assert restored["tokens"] == ordinary_result["tokens"]
    assert restored["tied"] and ordinary_result["tied"]
    # Not only tensors: every module attribute from_pretrained set is there too.
    assert restored["attributes"] == ordinary_result["attributes"]
    assert "template_hit loader=from_pretrained" in restored["stderr"]


def test_manifest_records_the_trace(traced) -> None:
    _, template = traced
    manifest = json.loads((template / "manifest.json").read_text())
    (load,) = manifest["loads"]
    assert load["loader"] == "from_pretrained"
    assert "path='function:model'" in load["key"]
    assert load["tensors"]["lm_head.weight"] == load["tensors"]["model.embed_tokens.weight"]
    assert "model.rotary_emb.inv_freq" in load["model"]["buffers"]
    assert load["access_order"][0] == "0/model.embed_tokens.weight"
    by_name = {t["name"]: t for t in manifest["tensors"]}
    # Weights equal to the safetensors bytes are referenced, not copied.
    assert by_name["0/model.layers.0.self_attn.q_proj.weight"]["file"] != "packed"
    # rotary_emb.inv_freq is computed, not in the file: packed.
    assert by_name["0/model.rotary_emb.inv_freq"]["file"] == "packed"
    assert not any(t["mutated"] for t in manifest["tensors"])
    trace = manifest["trace"]
    modules = [i["module"] for i in trace["imports"]]
    assert "torch" in modules and "transformers.models.llama.modeling_llama" in modules
    assert any(op["op"].startswith("aten.") for op in trace["ops"])
    assert trace["peak_memory"]["cpu_max_rss_bytes"] > 0
    assert trace["warmup"]["prompt_lengths"] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert manifest["fingerprint"]["torch"] == torch.__version__


def test_changed_weight_file_rejects_template(traced, ordinary, tmp_path: Path) -> None:
    function_dir, template = traced
    copy = tmp_path / "function"
    shutil.copytree(function_dir, copy)
    shutil.rmtree(copy / "model")
    h.make_tiny_llama(copy, seed=1)  # same names and shapes, other weights
    h.run_start(copy, tmp_path / "ordinary")
    restored = h.run_start(copy, tmp_path / "restored", template=template)
    assert restored["stats"]["used"] is False
    assert "model/model.safetensors" in restored["stats"]["rejected"]
    assert "template_rejected" in restored["stderr"]
    assert torch.equal(_logits(tmp_path / "ordinary"), _logits(tmp_path / "restored"))
    assert not torch.equal(_logits(tmp_path / "restored"), ordinary[1])  # new weights


def test_changed_handler_rejects_template(traced, tmp_path: Path) -> None:
    function_dir, template = traced
    copy = tmp_path / "function"
    shutil.copytree(function_dir, copy)
    (copy / "handler.py").write_text((copy / "handler.py").read_text() + "\n# edited\n")
    restored = h.run_start(copy, tmp_path / "restored", template=template)
    assert restored["stats"]["used"] is False
    assert "handler_sha256" in restored["stats"]["rejected"]


def test_mutated_weight_gets_load_time_bytes(tmp_path: Path) -> None:
    function_dir = h.make_tiny_llama(tmp_path / "function", handler=MUTATING_HANDLER)
    template = tmp_path / "template"
    h.trace(function_dir, template, "--runs", "1")
    manifest = json.loads((template / "manifest.json").read_text())
    mutated = [t["name"] for t in manifest["tensors"] if t["mutated"]]
    assert mutated == ["0/model.norm.weight"]
    ordinary = h.run_start(function_dir, tmp_path / "ordinary")
    restored = h.run_start(function_dir, tmp_path / "restored", template=template)
    assert restored["stats"]["hits"] == 1
    assert torch.equal(_logits(tmp_path / "ordinary"), _logits(tmp_path / "restored"))
    assert restored["tokens"] == ordinary["tokens"]


def test_dynamic_load_is_not_cached(tmp_path: Path) -> None:
    function_dir = h.make_tiny_llama(tmp_path / "function", handler=DYNAMIC_HANDLER)
    template = tmp_path / "template"
    h.trace(function_dir, template)
    manifest = json.loads((template / "manifest.json").read_text())
    (skipped,) = manifest["skipped_loads"]
    assert skipped["loader"] == "load_file"
    assert "bytes differ between two traced start-ups" in skipped["reason"]
    assert [load["loader"] for load in manifest["loads"]] == ["from_pretrained"]
    restored = h.run_start(function_dir, tmp_path / "restored", template=template)
    assert restored["stats"]["skipped"] == 1 and restored["stats"]["hits"] == 1
