"""Template benchmark for a Llama shape with random bf16 weights: trace, hold, attach,
start-up with the template versus an ordinary start.

On the GPU machine (one command, about 10 minutes for 8B, results in JSON):

    python3 bench/template_gpu.py --shape 8b --device cuda

On CPU, as CI checks that it still runs:

    .venv/bin/python bench/template_gpu.py --shape tiny --device cpu --repeats 1

Steps: build the model on the device and `save_pretrained` it into a function folder
whose handler loads it with `from_pretrained(..., dtype=bfloat16, device_map=DEVICE)`;
trace it; hold the template (one device buffer, one CUDA IPC handle; a sealed memfd on CPU)
in this process; then fresh processes: attach only (time to open the handle), ordinary
start, start restored from the held template. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import template_common as common

REPO = Path(__file__).resolve().parents[1]
SHAPES = common.SHAPES
HANDLER = '''\
import os

import torch
from transformers import AutoModelForCausalLM

DEVICE = os.environ.get("BENCH_DEVICE", {device!r})
MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16, device_map=DEVICE)
model.eval()


def handle(event, context):
    ids = torch.arange(1, 33, device=DEVICE).unsqueeze(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    return {{"tokens": out[0].tolist()}}
'''
ATTACH_ONLY = '''\
import json, sys, time
import torch
from fwatchdog.template_cache.holder import HandleInfo, attach
info = HandleInfo.from_json(open(sys.argv[1]).read())
fds = [int(fd) for fd in sys.argv[2:]]
if info.kind == "cuda_ipc":
    torch.empty(1, device=info.device)
    torch.cuda.synchronize()
started = time.perf_counter()
source = attach(info, fds)
elapsed = time.perf_counter() - started
print(json.dumps({"attach_s": elapsed}))
'''


def build_function(root: Path, shape: str, device: str) -> Path:
    import torch
    from transformers import LlamaConfig

    function_dir = root / "function"
    function_dir.mkdir(parents=True)
    config = LlamaConfig(**SHAPES[shape])
    model = common.random_llama(config, device)
    model.save_pretrained(function_dir / "model")
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    (function_dir / "handler.py").write_text(HANDLER.format(device=device))
    return function_dir


def attach_only(info: Path, repeats: int, fds: tuple[int, ...]) -> list[float]:
    import subprocess
    import sys

    times = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", ATTACH_ONLY, str(info),
                               *(str(fd) for fd in fds)],
                              capture_output=True, text=True, check=True, pass_fds=fds)
        times.append(json.loads(done.stdout.strip().splitlines()[-1])["attach_s"])
    return times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if any)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default="2", choices=["1", "2"],
                        help="traced start-ups (2 compares them for dynamic state)")
    parser.add_argument("--trace-device", default=None,
                        help="trace on this device instead (cpu: as an image build does, "
                             "with the GPU hidden)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (kept)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or REPO / "bench" / "results" / f"template_gpu_{args.shape}_{device}.json"
    from fwatchdog.template_cache.holder import hold

    scratch = Path(tempfile.mkdtemp(prefix="fwatchdog-bench-gpu-", dir=args.work))
    results: dict[str, Any] = {"environment": common.environment(), "shape": args.shape,
                               "config": SHAPES[args.shape], "device": device}
    try:
        started = time.perf_counter()
        function_dir = build_function(scratch, args.shape, device)
        results["build_model_s"] = time.perf_counter() - started
        template = scratch / "template"
        trace_env = None
        if args.trace_device and args.trace_device != device:
            trace_env = {**os.environ, "BENCH_DEVICE": args.trace_device}
            if args.trace_device == "cpu":
                trace_env["CUDA_VISIBLE_DEVICES"] = ""  # a build machine has no GPU
        results["trace_device"] = args.trace_device or device
        results["trace"] = common.run_tracer(function_dir, template, "--runs", args.runs,
                                             env=trace_env)
        results["ordinary"] = common.repeat_starts("ordinary", args.repeats, scratch,
                                                   function_dir=function_dir, device=device)
        # The holder's fill rate with and without inline verification, alternating so
        # that the page cache is equally warm for both.
        results["hold_rates"] = []
        for verify in ["none", "full"] * max(1, args.repeats):
            with hold(template, function_dir, device=device, verify=verify) as holder:
                assert holder.stats is not None
                results["hold_rates"].append({
                    "verify": verify, "seconds": holder.stats.seconds,
                    "gb_per_s": holder.stats.gb_per_s, "readers": holder.stats.readers})
        started = time.perf_counter()
        with hold(template, function_dir, device=device) as holder:
            results["hold_s"] = time.perf_counter() - started
            info = scratch / "holder.json"
            info.write_text(holder.info.to_json())
            fds = tuple(holder.fds())
            results["holder_kind"] = holder.info.kind
            results["held_bytes"] = holder.info.size
            results["attach_only_s"] = attach_only(info, args.repeats, fds)
            results["template_holder"] = common.repeat_starts(
                "holder", args.repeats, scratch, function_dir=function_dir, template=template,
                attach=info, device=device, fds=fds)
        results["template_files"] = common.repeat_starts(
            "files", args.repeats, scratch, function_dir=function_dir, template=template,
            device=device)
    finally:
        if args.work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    trace = results["trace"]
    print(f"shape {args.shape} on {device}: tracer {trace['tracer_s']:.1f} s, template "
          f"{trace['template_dir_bytes'] / 1e6:.1f} MB (+{trace['referenced_bytes'] / 1e9:.2f} GB"
          f" referenced), hold {results['hold_s']:.2f} s ({results['holder_kind']})")
    for verify in ("none", "full"):
        rates = sorted(r["gb_per_s"] for r in results["hold_rates"] if r["verify"] == verify)
        print(f"holder fill, verify={verify}: {', '.join(f'{r:.2f}' for r in rates)} GB/s")
    attach_ms = sorted(1000 * t for t in results["attach_only_s"])
    print(f"attach in a fresh process: {', '.join(f'{t:.1f}' for t in attach_ms)} ms"
          " (target < 50 ms)")
    print(f"{'start-up':22} {'ready s':>8} {'first fwd s':>12}")
    for label, key in (("ordinary", "ordinary"), ("template (holder)", "template_holder"),
                       ("template (files)", "template_files")):
        r = results[key]
        print(f"{label:22} {r['ready_s_median']:8.2f} {r['first_forward_done_s_median']:12.2f}")
    digests = {key: sorted({r.get("logits_sha256") for r in results[key]["runs"]})
               for key in ("ordinary", "template_holder", "template_files")}
    results["logits_identical"] = len({d for v in digests.values() for d in v}) == 1
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"first-forward logits bit-identical across ordinary, holder and files starts "
          f"(traced on {results['trace_device']}): {results['logits_identical']}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
