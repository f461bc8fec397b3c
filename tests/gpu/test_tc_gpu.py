"""The template on a GPU: trace a tiny Llama loaded onto CUDA, hold it in one device
buffer, attach through CUDA IPC in fresh processes, compare with an ordinary start.

Skipped without CUDA; run on the GPU machine: `pytest tests/gpu/test_tc_gpu.py`.
"""

from __future__ import annotations

import importlib.util
import json
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


def test_cuda_ipc_restore_is_bit_identical(tmp_path: Path) -> None:
    from fwatchdog.template_cache.holder import hold

    function_dir = h.make_tiny_llama(tmp_path / "function", handler=CUDA_HANDLER)
    template = tmp_path / "template"
    h.trace(function_dir, template)
    manifest = json.loads((template / "manifest.json").read_text())
    assert manifest["fingerprint"]["accelerator"]["kind"] == "cuda"
    assert manifest["loads"][0]["device"].startswith("cuda")
    assert manifest["trace"]["kernels"], "the profiler saw no CUDA kernels"
    assert manifest["trace"]["peak_memory"]["cuda_max_allocated_bytes"] > 0

    ordinary = h.run_start(function_dir, tmp_path / "ordinary")
    with hold(template, function_dir, device="cuda") as holder:
        assert holder.info.kind == "cuda_ipc"
        info = tmp_path / "holder.json"
        info.write_text(holder.info.to_json())
        restored = h.run_start(function_dir, tmp_path / "restored", template=template,
                               attach=info)
        timed = subprocess.run([sys.executable, "-c", ATTACH_TIMER, str(info)],
                               capture_output=True, text=True, check=True)
    assert restored["stats"]["hits"] == 1 and restored["stats"]["misses"] == 0
    assert restored["tokens"] == ordinary["tokens"]
    assert torch.equal(torch.load(tmp_path / "ordinary" / "logits.pt"),
                       torch.load(tmp_path / "restored" / "logits.pt"))
    attach_s = json.loads(timed.stdout.strip().splitlines()[-1])["attach_s"]
    assert attach_s < 0.5, f"attaching took {attach_s:.3f} s"
