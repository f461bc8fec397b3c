"""A template serves where functions run: device-free load keys, tensors placed where the
running call asks, the state outside the arguments in key and fingerprint, GPUs
compared by model, and interception that sees loads on every thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from fwatchdog.template_cache import fingerprint
from fwatchdog.template_cache.intercept import Loader, call_key, intercept_loaders
from fwatchdog.template_cache.restore import restore
from fwatchdog.tracer import build
from fwatchdog.tracer.recorder import Recorder

H200 = {"name": "NVIDIA H200", "capability": "9.0"}


def _tiny_llama(function_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                         max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(function_dir / "model")
    (function_dir / "handler.py").write_text("def handle(event, context):\n    return {}\n")
    return function_dir


def _key(loader: Loader, *args: Any, owner: Any = None, **kwargs: Any) -> str | None:
    return call_key(loader, owner, args, kwargs, None)[0]


def test_device_arguments_are_not_part_of_the_key() -> None:
    from transformers import AutoModelForCausalLM

    plain = _key(Loader.FROM_PRETRAINED, "/m", owner=AutoModelForCausalLM, dtype="auto")
    for device_map in ("cpu", "cuda", "cuda:0", 1, "auto", torch.device("cuda", 3),
                       {"": "cuda:0"}, {"model": "cuda:1", "lm_head": "cuda:1"}):
        assert _key(Loader.FROM_PRETRAINED, "/m", owner=AutoModelForCausalLM, dtype="auto",
                    device_map=device_map) == plain, device_map
    # The dtype and the other arguments stay.
    assert _key(Loader.FROM_PRETRAINED, "/m", owner=AutoModelForCausalLM,
                dtype="bfloat16") != plain
    # A map over several devices could split the tensors: it stays literal.
    split = _key(Loader.FROM_PRETRAINED, "/m", owner=AutoModelForCausalLM, dtype="auto",
                 device_map={"model": "cuda:0", "lm_head": "cpu"})
    assert split != plain and "lm_head" in (split or "")
    assert _key(Loader.LOAD_FILE, "/w", "cuda:1") == _key(Loader.LOAD_FILE, "/w") == _key(
        Loader.LOAD_FILE, "/w", device="cpu")
    assert _key(Loader.SAFE_OPEN, "/w", "pt", "cuda") == _key(Loader.SAFE_OPEN, "/w", "pt")
    assert _key(Loader.TORCH_LOAD, "/w", "cpu") == _key(Loader.TORCH_LOAD, "/w",
                                                       map_location=torch.device("cuda:0"))


def test_the_default_dtype_is_part_of_the_key() -> None:
    before = _key(Loader.LOAD_FILE, "/w")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert _key(Loader.LOAD_FILE, "/w") != before
    finally:
        torch.set_default_dtype(previous)


def _trace(function_dir: Path, out: Path, startup: Callable[[], Any]) -> Path:
    recorder = Recorder(function_dir)
    with intercept_loaders(recorder):
        startup()
    return build.write_template(recorder, out, function_dir, fingerprint.current(function_dir),
                                None, [], {})


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}, None, torch.device("cpu")])
def test_a_cpu_trace_serves_a_start_up_asking_another_device(tmp_path: Path,
                                                            device_map: Any) -> None:
    from transformers import AutoModelForCausalLM

    function_dir = _tiny_llama(tmp_path / "function")
    model_dir = function_dir / "model"
    template = _trace(function_dir, tmp_path / "t", lambda: AutoModelForCausalLM.from_pretrained(
        model_dir, device_map="cpu"))
    manifest = json.loads((template / "manifest.json").read_text())
    assert "device_map" not in manifest["loads"][0]["key"]
    ordinary = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map)
    with restore(template, function_dir) as stats:
        served = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map)
    assert stats.used and stats.hits == 1 and stats.misses == 0, stats.miss_reasons
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(served(ids).logits, ordinary(ids).logits)
    assert served.lm_head.weight is served.get_input_embeddings().weight


def test_tensors_go_where_the_running_call_asks(tmp_path: Path) -> None:
    """A trace that asked for a device the running machine lacks is still served
    where the running call asks: the traced literal is never used."""
    function_dir = tmp_path / "function"
    function_dir.mkdir()
    path = function_dir / "w.safetensors"
    safetensors.torch.save_file({"a": torch.arange(4.0)}, path)
    template = _trace(function_dir, tmp_path / "t",
                      lambda: safetensors.torch.load_file(path, device="cpu"))
    manifest = json.loads((template / "manifest.json").read_text())
    manifest["loads"][0]["device"] = "cuda:7"  # as if traced on a GPU node
    from fwatchdog.template_cache.format import dumps_manifest

    (template / "manifest.json").write_bytes(dumps_manifest(manifest))
    with restore(template, function_dir) as stats:
        served = safetensors.torch.load_file(path)
    assert stats.hits == 1 and served["a"].device == torch.device("cpu")
    assert torch.equal(served["a"], torch.arange(4.0))


def test_interception_sees_a_load_on_another_thread(tmp_path: Path) -> None:
    """The nesting depth is per thread: while one thread is inside a load, a load on
    another thread is still intercepted as a load of its own."""
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, path)
    inside, other_done = threading.Event(), threading.Event()
    seen: list[str] = []

    class Hooks:
        def handle(self, loader: Loader, original: Callable[..., Any], owner: Any,
                   args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            seen.append(threading.current_thread().name)
            if threading.current_thread().name == "first":
                inside.set()
                assert other_done.wait(30)
            return original(*args, **kwargs)

    def first() -> None:
        safetensors.torch.load_file(path)

    def second() -> None:
        assert inside.wait(30)
        safetensors.torch.load_file(path)
        other_done.set()

    with intercept_loaders(Hooks()):
        threads = [threading.Thread(target=first, name="first"),
                   threading.Thread(target=second, name="second")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert sorted(seen) == ["first", "second"]


def _devices(*specs: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"index": str(i), "uuid": uuid, "name": name, "capability": cc}
            for i, (uuid, name, cc) in enumerate(specs)]


def test_visible_gpus_honours_cuda_visible_devices() -> None:
    node = _devices(("GPU-aaaa", "NVIDIA H200", "9.0"), ("GPU-bbbb", "NVIDIA L4", "8.9"),
                    ("GPU-cccc", "NVIDIA H200", "9.0"))
    assert fingerprint.visible_gpus(node, None) == node
    assert [d["uuid"] for d in fingerprint.visible_gpus(node, "2,0")] == ["GPU-cccc",
                                                                        "GPU-aaaa"]
    assert [d["uuid"] for d in fingerprint.visible_gpus(node, "GPU-bb")] == ["GPU-bbbb"]
    assert fingerprint.visible_gpus(node, "") == []
    assert [d["index"] for d in fingerprint.visible_gpus(node, "0,7,1")] == ["0"]  # stops
    assert fingerprint.visible_gpus(node, "-1") == []
    assert fingerprint.visible_gpus(node, "MIG-1234") == node


def _fp(**accelerator: Any) -> dict[str, Any]:
    base = {"handler_sha256": "0" * 64, "python": "3", "torch": "2", "transformers": "5",
            "safetensors": "0", "libraries": {"accelerate": "1"}, "machine": "x86_64"}
    return {**base, "accelerator": accelerator}


def test_gpu_fingerprint_compares_models_not_counts() -> None:
    eight = _fp(kind="cuda", cuda="12.8", gpus=[H200])  # an 8-GPU node lists one model
    assert fingerprint.mismatches(eight, _fp(kind="cuda", cuda="12.8", gpus=[H200])) == []
    other = _fp(kind="cuda", cuda="12.8", gpus=[{"name": "NVIDIA H200", "capability": "8.0"}])
    assert any("compute 8.0" in p for p in fingerprint.mismatches(eight, other))
    assert any("no GPU" in p for p in fingerprint.mismatches(
        eight, _fp(kind="cpu", cuda=None, gpus=[])))
    assert any("cuda: 12.8 -> 13.0" in p for p in fingerprint.mismatches(
        eight, _fp(kind="cuda", cuda="13.0", gpus=[H200])))
    # A CPU-traced template serves anywhere.
    assert fingerprint.mismatches(_fp(kind="cpu", cuda=None, gpus=[]),
                                  _fp(kind="cuda", cuda="12.8", gpus=[H200])) == []


def test_library_versions_are_compared() -> None:
    recorded = _fp(kind="cpu", cuda=None, gpus=[])
    running = {**recorded, "libraries": {"accelerate": "2"}}
    assert fingerprint.mismatches(recorded, running) == ["accelerate: 1 -> 2"]


def test_fingerprint_never_initialises_cuda(tmp_path: Path) -> None:
    fingerprint.current(tmp_path, {"CUDA_VISIBLE_DEVICES": "0"})
    assert not torch.cuda.is_initialized()
