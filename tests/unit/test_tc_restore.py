"""Loader interception, restore and the shared-memory holder, in one process (no models)."""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from fwatchdog.template_cache import fingerprint
from fwatchdog.template_cache.format import dumps_manifest
from fwatchdog.template_cache.holder import HandleInfo, attach, hold
from fwatchdog.template_cache.intercept import intercept_loaders
from fwatchdog.template_cache.restore import restore
from fwatchdog.template_cache.verify import verify_template
from fwatchdog.tracer import build
from fwatchdog.tracer.recorder import Recorder


def _function(tmp_path: Path) -> Path:
    function_dir = tmp_path / "function"
    function_dir.mkdir()
    torch.manual_seed(0)
    safetensors.torch.save_file(
        {"a": torch.randn(4, 8), "b": torch.arange(6, dtype=torch.int64)},
        function_dir / "weights.safetensors")
    torch.save(OrderedDict(w=torch.randn(3, 3, dtype=torch.bfloat16)), function_dir / "state.pt")
    (function_dir / "handler.py").write_text("def handle(event, context):\n    return {}\n")
    return function_dir


def _loads(function_dir: Path) -> dict[str, torch.Tensor]:
    """A start-up's loads, through the module attributes as user code calls them."""
    result = {f"file.{k}": v for k, v in
              safetensors.torch.load_file(function_dir / "weights.safetensors").items()}
    with safetensors.safe_open(str(function_dir / "weights.safetensors"), "pt") as handle:
        result["open.a"] = handle.get_tensor("a")
    state = torch.load(function_dir / "state.pt", weights_only=True)
    assert isinstance(state, OrderedDict)
    result["pt.w"] = state["w"]
    return result


def _trace(function_dir: Path, out: Path, mutate: bool = False) -> tuple[Path, dict]:
    recorder = Recorder(function_dir)
    with intercept_loaders(recorder):
        loaded = _loads(function_dir)
    if mutate:
        loaded["pt.w"].mul_(2)
    template = build.write_template(recorder, out, function_dir,
                                    fingerprint.current(function_dir), None, [], {})
    return template, loaded


def test_trace_then_restore_serves_every_loader(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    assert verify_template(template, function_dir).ok
    manifest = json.loads((template / "manifest.json").read_text())
    assert [load["loader"] for load in manifest["loads"]] == ["load_file", "safe_open",
                                                              "torch_load"]
    files = {t["name"]: t["file"] for t in manifest["tensors"]}
    assert files["0/a"] != "packed"  # an offset into the original file
    assert manifest["loads"][1]["tensors"] == {"a": "0/a"}  # same bytes: one entry
    assert files["2/w"] == "packed"  # torch.load files are not referenced by offset
    expected = _loads(function_dir)
    with restore(template, function_dir) as stats:
        served = _loads(function_dir)
    assert stats.used and stats.hits == 3 and stats.misses == 0
    assert served.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor), name
        assert served[name].dtype == tensor.dtype


def test_untraced_load_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    safetensors.torch.save_file({"z": torch.ones(2)}, function_dir / "other.safetensors")
    caplog.set_level(logging.INFO, logger="fwatchdog.template_cache")
    with restore(template, function_dir) as stats:
        other = safetensors.torch.load_file(function_dir / "other.safetensors")
    assert torch.equal(other["z"], torch.ones(2))
    assert stats.misses == 1 and stats.hits == 0
    assert "not traced" in stats.miss_reasons[0]
    assert "template_miss loader=load_file" in caplog.text


def test_mutated_tensor_is_a_private_copy(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t", mutate=True)
    manifest = json.loads((template / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tensors"] if t["mutated"]] == ["2/w"]
    with restore(template, function_dir):
        first = torch.load(function_dir / "state.pt", weights_only=True)["w"]
        second = torch.load(function_dir / "state.pt", weights_only=True)["w"]
    original = second.clone()
    first.mul_(3)
    assert torch.equal(second, original)  # load-time bytes, not shared with `first`


def test_fingerprint_mismatch_runs_the_ordinary_loaders(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    manifest = json.loads((template / "manifest.json").read_text())
    manifest["fingerprint"]["torch"] = "0.0.1"
    (template / "manifest.json").write_bytes(dumps_manifest(manifest))
    caplog.set_level(logging.INFO, logger="fwatchdog.template_cache")
    original = safetensors.torch.load_file
    with restore(template, function_dir) as stats:
        assert safetensors.torch.load_file is original
        _loads(function_dir)
    assert not stats.used and stats.hits == 0
    assert "torch: 0.0.1 -> " in (stats.rejected or "")
    assert "template_rejected" in caplog.text


def test_interception_is_removed_on_exit_nesting_and_errors(tmp_path: Path) -> None:
    originals = (safetensors.torch.load_file, safetensors.safe_open, torch.load)
    recorder = Recorder(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), intercept_loaders(recorder):
        with intercept_loaders(Recorder(tmp_path)):
            assert safetensors.torch.load_file is not originals[0]
        assert safetensors.torch.load_file is not originals[0]
        raise RuntimeError("boom")
    assert (safetensors.torch.load_file, safetensors.safe_open, torch.load) == originals
    from transformers.modeling_utils import PreTrainedModel

    assert isinstance(PreTrainedModel.__dict__["from_pretrained"], classmethod)


def test_memfd_holder_attach_is_zero_copy_and_read_only(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    expected = _loads(function_dir)
    with hold(template, function_dir) as holder:
        info = HandleInfo.from_json(holder.info.to_json())
        assert info.kind == "memfd" and len(holder.fds()) == 1
        # An anonymous memfd: no name in /dev/shm or anywhere else to leak.
        assert os.readlink(f"/proc/self/fd/{holder.fds()[0]}").startswith("/memfd:")
        source = attach(info, holder.fds())
        with restore(template, function_dir, source=source) as stats:
            served = _loads(function_dir)
        assert stats.hits == 3
        for name, tensor in expected.items():
            assert torch.equal(served[name], tensor), name
        # Every served tensor is a view of the one buffer, and listed as such.
        assert {(s.load_key.split("|")[0], s.local_name) for s in stats.shared_tensors} == {
            ("load_file", "a"), ("load_file", "b"), ("safe_open", "a"), ("torch_load", "w")}
        assert all(s.tensor() is not None for s in stats.shared_tensors)
        # The memfd is sealed: nobody can write to it, shrink or grow it.
        with pytest.raises(OSError):
            os.ftruncate(holder.fds()[0], 1)
        with pytest.raises(PermissionError):
            mmap.mmap(holder.fds()[0], info.size, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        fd = holder.fds()[0]
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the holder
    # Tensors handed out keep their mapping: a handler outliving the holder still reads.
    assert torch.equal(served["file.a"], expected["file.a"])


def test_attach_refuses_another_template(tmp_path: Path) -> None:
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    other, _ = _trace(function_dir, tmp_path / "u", mutate=True)
    with hold(other, function_dir) as holder:
        with restore(template, function_dir,
                     source=attach(holder.info, holder.fds())) as stats:
            _loads(function_dir)
        assert not stats.used and "another template" in (stats.rejected or "")


def _entry(template: Path, name: str):
    from fwatchdog.template_cache.verify import read_manifest

    return read_manifest(template).tensor_map()[name]


def test_holder_refuses_a_changed_weight_file(tmp_path: Path) -> None:
    from fwatchdog.template_cache.format import TemplateError

    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    safetensors.torch.save_file({"a": torch.zeros(4, 8), "b": torch.arange(6)},
                                function_dir / "weights.safetensors")
    with pytest.raises(TemplateError, match="tensor 0/a: .*changed since the trace"):
        hold(template, function_dir)


def test_model_without_local_files_is_never_served(tmp_path: Path) -> None:
    """A hub id has no files to fingerprint: the load is skipped, not packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=32))
    recorder = Recorder(tmp_path)
    recorder._record_model("from_pretrained|path='org/model'", model, ("org/model",), {})
    assert recorder.loads == []
    assert recorder.skipped[0]["reason"] == "no local weight files (hub id?)"


def test_a_load_that_cannot_be_served_falls_back(tmp_path: Path) -> None:
    """A manifest the schema accepts but restore cannot use never fails the start-up."""
    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    manifest = json.loads((template / "manifest.json").read_text())
    manifest["loads"][0]["container"] = "weird"
    # torch.load without map_location restores to the traced locations: a bad one.
    manifest["loads"][2]["device"] = "no-such-device"
    (template / "manifest.json").write_bytes(dumps_manifest(manifest))
    expected = _loads(function_dir)
    with restore(template, function_dir) as stats:
        served = _loads(function_dir)
    assert stats.used and stats.misses == 1 and stats.hits == 2
    assert "no-such-device" in stats.miss_reasons[0]
    for name, tensor in expected.items():
        assert torch.equal(served[name], tensor)


def test_a_manifest_checked_by_a_parent_is_used_while_the_file_is_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fwatchdog.template_cache import restore as restore_module
    from fwatchdog.template_cache.verify import read_checked

    function_dir = _function(tmp_path)
    template, _ = _trace(function_dir, tmp_path / "t")
    checked = read_checked(template)
    reads: list[Path] = []
    real = restore_module.read_manifest
    monkeypatch.setattr(restore_module, "read_manifest",
                        lambda path: reads.append(path) or real(path))
    expected = _loads(function_dir)
    with restore(template, function_dir, checked=checked) as stats:
        served = _loads(function_dir)
    assert stats.used and stats.hits == 3 and not reads  # no second parse or validation
    assert all(torch.equal(served[k], v) for k, v in expected.items())
    # The file changed since the parent read it: it is read and checked again, and
    # what it says now is what counts.
    manifest = template / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["format_version"] = 0
    manifest.write_text(json.dumps(raw))
    with restore(template, function_dir, checked=checked) as stats:
        _loads(function_dir)
    assert reads == [template] and not stats.used
    assert "format_version" in str(stats.rejected)
