"""The template on a GPU: trace a tiny Llama loaded onto CUDA, hold it in one device
buffer, attach through CUDA IPC in fresh processes, compare with an ordinary start;
a template traced without a GPU serving `device_map="cuda"`; the CUDA holder's
release, reload and inline verification.

Skipped without CUDA; run on the GPU machine: `pytest tests/gpu/test_tc_gpu.py -s`
(-s shows the holder's fill rates with and without verification).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _helpers():
    path = Path(__file__).resolve().parents[1] / "e2e" / "tc_helpers.py"
    spec = importlib.util.spec_from_file_location("tc_helpers_gpu", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


h = _helpers()
CUDA_HANDLER = h.TINY_HANDLER.replace(
    "AutoModelForCausalLM.from_pretrained(MODEL_DIR)",
    "AutoModelForCausalLM.from_pretrained(MODEL_DIR, device_map='cuda')",
).replace("torch.tensor([[1, 2, 3, 4]])", "torch.tensor([[1, 2, 3, 4]], device='cuda')")
# The python3-llm way: the device is whatever the machine has. Traced at image build
# (no GPU) it asks for "cpu"; started on a GPU node it asks for "cuda".
PORTABLE_HANDLER = h.TINY_HANDLER.replace(
    "MODEL_DIR = ",
    "DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'\nMODEL_DIR = ",
).replace(
    "AutoModelForCausalLM.from_pretrained(MODEL_DIR)",
    "AutoModelForCausalLM.from_pretrained(MODEL_DIR, device_map=DEVICE)",
).replace("torch.tensor([[1, 2, 3, 4]])", "torch.tensor([[1, 2, 3, 4]], device=DEVICE)")
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}

ATTACH_TIMER = '''\
import json, sys, time
import torch
from fwatchdog.template_cache.holder import HandleInfo, attach
info = HandleInfo.from_json(open(sys.argv[1]).read())
torch.empty(1, device=info.device)
started = time.perf_counter()
source = attach(info)
print(json.dumps({"attach_s": time.perf_counter() - started}))
'''


def _same_logits(a: Path, b: Path) -> bool:
    return torch.equal(torch.load(a / "logits.pt"), torch.load(b / "logits.pt"))


def test_cuda_ipc_restore_is_bit_identical(tmp_path: Path) -> None:
    from fwatchdog.template_cache.holder import hold

    function_dir = h.make_tiny_llama(tmp_path / "function", handler=CUDA_HANDLER)
    template = tmp_path / "template"
    h.trace(function_dir, template)
    manifest = json.loads((template / "manifest.json").read_text())
    assert manifest["fingerprint"]["accelerator"]["kind"] == "cuda"
    assert manifest["fingerprint"]["accelerator"]["gpus"][0]["capability"]
    assert manifest["loads"][0]["device"].startswith("cuda")
    assert manifest["trace"]["kernels"], "the profiler saw no CUDA kernels"
    assert manifest["trace"]["peak_memory"]["cuda_max_allocated_bytes"] > 0

    ordinary = h.run_start(function_dir, tmp_path / "ordinary")
    with hold(template, function_dir, device="cuda") as holder:
        assert holder.info.kind == "cuda_ipc" and holder.fds() == []
        info = tmp_path / "holder.json"
        info.write_text(holder.info.to_json())
        restored = h.run_start(function_dir, tmp_path / "restored", template=template,
                               attach=info)
        timed = subprocess.run([sys.executable, "-c", ATTACH_TIMER, str(info)],
                               capture_output=True, text=True, check=True)
    assert restored["stats"]["hits"] == 1 and restored["stats"]["misses"] == 0
    assert restored["tokens"] == ordinary["tokens"]
    assert _same_logits(tmp_path / "ordinary", tmp_path / "restored")
    attach_s = json.loads(timed.stdout.strip().splitlines()[-1])["attach_s"]
    assert attach_s < 0.5, f"attaching took {attach_s:.3f} s"


def test_a_template_traced_without_a_gpu_serves_device_map_cuda(tmp_path: Path) -> None:
    from fwatchdog.template_cache.holder import hold

    function_dir = h.make_tiny_llama(tmp_path / "function", handler=PORTABLE_HANDLER)
    template = tmp_path / "template"
    h.trace(function_dir, template, env=NO_GPU)  # as at docker build: no GPU visible
    manifest = json.loads((template / "manifest.json").read_text())
    assert manifest["fingerprint"]["accelerator"]["kind"] == "cpu"
    assert manifest["loads"][0]["device"] == "cpu"

    ordinary = h.run_start(function_dir, tmp_path / "ordinary")
    files = h.run_start(function_dir, tmp_path / "files", template=template)
    with hold(template, function_dir, device="cuda") as holder:
        info = tmp_path / "holder.json"
        info.write_text(holder.info.to_json())
        held = h.run_start(function_dir, tmp_path / "held", template=template, attach=info)
    for run in (files, held):
        assert run["stats"]["used"] and run["stats"]["hits"] == 1, run["stats"]
        assert run["stats"]["misses"] == 0 and run["tokens"] == ordinary["tokens"]
    assert _same_logits(tmp_path / "ordinary", tmp_path / "files")
    assert _same_logits(tmp_path / "ordinary", tmp_path / "held")


def test_cuda_holder_release_reload_and_verification(tmp_path: Path) -> None:
    from fwatchdog.template_cache.format import TemplateError
    from fwatchdog.template_cache.holder import hold

    function_dir = h.make_tiny_llama(tmp_path / "function", handler=PORTABLE_HANDLER)
    template = tmp_path / "template"
    h.trace(function_dir, template, env=NO_GPU)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_reserved()
    holder = hold(template, function_dir, device="cuda")
    first = holder.info
    assert torch.cuda.memory_reserved() > baseline
    holder.release()
    assert torch.cuda.memory_reserved() == baseline, "release kept the device memory"
    second = holder.reload()
    assert second.generation == first.generation + 1 and second.ipc_handle != first.ipc_handle
    info = tmp_path / "holder.json"
    info.write_text(second.to_json())
    held = h.run_start(function_dir, tmp_path / "held", template=template, attach=info)
    assert held["stats"]["hits"] == 1
    holder.close()
    assert torch.cuda.memory_reserved() == baseline

    # Rates with and without verification (printed, never asserted).
    for verify in ("none", "full", "none", "full"):
        with hold(template, function_dir, device="cuda", verify=verify) as timed:
            assert timed.stats is not None
            print(f"cuda fill verify={verify}: {timed.stats.bytes} bytes in"
                  f" {timed.stats.seconds:.4f} s ({timed.stats.gb_per_s:.2f} GB/s)")

    weights = next((function_dir / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(TemplateError, match="do not match"):
        hold(template, function_dir, device="cuda")
    assert torch.cuda.memory_reserved() == baseline, "a failed fill kept its bytes"
