"""Shared parts of the template benchmarks: fresh-process start-ups and the tracer run.

As a script it is one measured handler start-up in a fresh process:

    python bench/template_common.py start FUNCTION_DIR OUT.json [--template DIR]
        [--attach INFO.json [--attach-fd N]] [--device cpu|cuda]

Times are wall-clock seconds from the moment the parent spawned the process
(`FWATCHDOG_BENCH_SPAWNED`, time.time()), so interpreter start and imports count.
The handler must define `model` (a transformers causal LM); the first forward runs a
fixed 16-token prompt.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PROMPT = list(range(1, 17))
# Llama shapes with random weights (bf16): the GPU benchmarks build them on the device.
SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 max_position_embeddings=256, tie_word_embeddings=False),
}


def random_llama(config: Any, device: str) -> Any:
    """A Llama with random bf16 weights built on ``device`` (seeded), for benchmarks:
    random weights load exactly like real ones."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def measure_start(function_dir: Path, out: Path, template: Path | None = None,
                  attach: Path | None = None, device: str = "cpu",
                  timeout: float = 600, fds: tuple[int, ...] = ()) -> dict[str, Any]:
    command = [sys.executable, str(HERE), "start", str(function_dir), str(out),
               "--device", device]
    if template is not None:
        command += ["--template", str(template)]
    if attach is not None:
        command += ["--attach", str(attach)]
    for fd in fds:  # a CPU holder's memfd, inherited under the same number
        command += ["--attach-fd", str(fd)]
    env = {**os.environ, "FWATCHDOG_BENCH_SPAWNED": repr(time.time()),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False, pass_fds=fds)
    if done.returncode != 0:
        raise RuntimeError(f"start-up failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def repeat_starts(label: str, repeats: int, work: Path, **kwargs: Any) -> dict[str, Any]:
    runs = [measure_start(out=work / f"{label}-{i}.json", **kwargs) for i in range(repeats)]
    summary: dict[str, Any] = {"runs": runs}
    for key in ("python_start_s", "ready_s", "first_forward_done_s", "attach_s", "check_s",
                "served_s", "load_s"):
        values = [r.get(key, r.get("template", {}).get(key)) for r in runs]
        values = [v for v in values if v is not None]
        if values:
            summary[key + "_median"] = statistics.median(values)
    return summary


def run_tracer(function_dir: Path, template: Path, *extra: str,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fwatchdog.tracer", str(function_dir), "--out",
                           str(template), *extra], capture_output=True, text=True, check=False,
                          env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"tracer failed:\n{done.stderr[-3000:]}")
    manifest = json.loads((template / "manifest.json").read_text())
    packed = sum(f["size"] for f in manifest["files"] if f["role"] == "packed")
    referenced = sum(t["nbytes"] for t in manifest["tensors"] if t["file"] != "packed")
    return {
        "tracer_s": elapsed,
        "template_dir_bytes": sum(p.stat().st_size for p in template.rglob("*") if p.is_file()),
        "packed_bytes": packed,
        "referenced_bytes": referenced,
        "tensors": len(manifest["tensors"]),
        "imports": len(manifest["trace"]["imports"]),
        "trace_timings": manifest["trace"]["timings"],
        "peak_memory": manifest["trace"]["peak_memory"],
    }


def environment() -> dict[str, Any]:
    import platform

    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


class _LoadTimer:
    """Loader hooks that only add up the time spent in the original loaders."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def handle(self, loader: Any, original: Any, owner: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


def _start(argv: list[str]) -> int:
    import argparse

    spawned = float(os.environ.get("FWATCHDOG_BENCH_SPAWNED", repr(time.time())))
    python_start = time.time() - spawned
    parser = argparse.ArgumentParser()
    parser.add_argument("function_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--template", type=Path)
    parser.add_argument("--attach", type=Path)
    parser.add_argument("--attach-fd", type=int, action="append", default=[])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    function_dir = args.function_dir.resolve()
    import torch

    from fwatchdog.tracer.function import import_handler

    result: dict[str, Any] = {"python_start_s": python_start,
                              "torch_imported_s": time.time() - spawned}
    if args.device.startswith("cuda"):
        torch.empty(1, device=args.device)  # the CUDA context, timed on its own
        result["cuda_context_s"] = time.time() - spawned
    stats = None
    if args.template is None:
        from fwatchdog.template_cache.intercept import intercept_loaders

        timer = _LoadTimer()
        with intercept_loaders(timer):  # times the loaders, changes nothing
            handler = import_handler(function_dir)
        result["load_s"] = timer.seconds
    else:
        from fwatchdog.template_cache.restore import restore

        source = None
        if args.attach is not None:
            from fwatchdog.template_cache.holder import HandleInfo, attach

            info = HandleInfo.from_json(args.attach.read_text())
            before = time.perf_counter()
            source = attach(info, args.attach_fd)
            result["attach_s"] = time.perf_counter() - before
        with restore(args.template.resolve(), function_dir, source=source) as stats:
            handler = import_handler(function_dir)
    result["ready_s"] = time.time() - spawned
    model = handler.model
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT], device=device)).logits
        if device.type == "cuda":
            torch.cuda.synchronize()
    result["first_forward_done_s"] = time.time() - spawned
    import hashlib

    # Bit-identity of what the start-up serves: the first forward's logits, as bytes.
    result["logits_sha256"] = hashlib.sha256(
        logits.float().cpu().contiguous().numpy().tobytes()).hexdigest()
    result["device"] = str(device)
    if stats is not None:
        result["template"] = {"used": stats.used, "rejected": stats.rejected,
                              "hits": stats.hits, "misses": stats.misses,
                              "check_s": stats.check_s, "served_s": stats.served_s}
    out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "start":
        sys.exit(_start(sys.argv[2:]))
    sys.exit(__doc__)
