"""Where a warm process's first request at a new prompt length spends its time.

The cold-start benchmark found that a handler that had run its warm-up still took
50-70 ms more than steady state for the first request at each prompt length. This
script looks at one process directly, with the same generation loop as the default
handler (a prefill, then greedy decode steps, the token read back each step):

- ``lengths``: requests at a sequence of prompt lengths, each length twice, so the
  first and the repeated time sit side by side (and nearby lengths show whether the
  cost is per exact length or per range);
- ``threads``: a length warmed on the main thread, then run on new threads (the
  handler server runs ``handle`` on executor threads, the warm-up on the main one);
- ``profile``: the CPU-side profile of a first request at an unseen length against
  its repeat (torch.profiler, top operators by self CPU time);
- variants in fresh processes: the default lazy kernel loading;
  ``CUDA_MODULE_LOADING=EAGER``; scaled-dot-product attention without the cuDNN
  backend (``no_cudnn_sdp``); after a warm-up over powers of two, whether lengths in
  between still pay.

    python3 bench/first_request_probe.py --shape 8b --device cuda --out probe.json

On CPU (CI runs the tiny shape to keep the script alive):

    .venv/bin/python bench/first_request_probe.py --shape tiny --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import template_common as common

DECODE_STEPS = 4
LENGTHS = [9, 59, 302, 1002, 2050, 60, 61, 100, 128, 129, 257, 500, 513, 1500]
POW2 = [2 ** k for k in range(12)]
BETWEEN = [37, 450, 777, 1337, 1900]


class Probe:
    def __init__(self, shape: str, device: str) -> None:
        started = time.perf_counter()
        import torch
        from transformers import DynamicCache, LlamaConfig

        self.torch = torch
        self.cache_type = DynamicCache
        self.timings: dict[str, float] = {"import_s": time.perf_counter() - started}
        self.device = device
        if os.environ.get("PROBE_CUDNN_SDP") == "0":
            # cuDNN attention builds an execution plan per new shape (prefill length,
            # every decode step's context length): no warm-up can cover that.
            torch.backends.cuda.enable_cudnn_sdp(False)
        if device.startswith("cuda"):
            started = time.perf_counter()
            torch.empty(1, device=device)
            torch.cuda.synchronize()
            self.timings["cuda_context_s"] = time.perf_counter() - started
        started = time.perf_counter()
        self.config = LlamaConfig(**common.SHAPES[shape])
        self.model = common.random_llama(self.config, device).eval()
        self.timings["build_s"] = time.perf_counter() - started

    def request(self, length: int) -> dict[str, float]:
        """One greedy request: prefill ``length`` tokens, then DECODE_STEPS steps."""
        torch = self.torch
        ids = torch.randint(3, self.config.vocab_size, (1, length), device=self.device)
        cache = self.cache_type()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, past_key_values=cache)
            token = int(torch.argmax(out.logits[0, -1]))
            prefill = time.perf_counter() - started
            for _ in range(DECODE_STEPS):
                out = self.model(input_ids=torch.tensor([[token]], device=self.device),
                                 use_cache=True, past_key_values=cache)
                token = int(torch.argmax(out.logits[0, -1]))
        total = time.perf_counter() - started
        return {"length": length, "prefill_s": round(prefill, 5),
                "decode_s": round((total - prefill) / DECODE_STEPS, 5)}

    def on_thread(self, length: int) -> dict[str, float]:
        result: dict[str, float] = {}
        thread = threading.Thread(target=lambda: result.update(self.request(length)))
        thread.start()
        thread.join()
        return result

    def profile(self, length: int) -> str:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.request(length)
        return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def child(args: argparse.Namespace) -> dict[str, Any]:
    probe = Probe(args.shape, args.device)
    quick = args.quick
    lengths = LENGTHS[:4] if quick else LENGTHS
    result: dict[str, Any] = {"timings": probe.timings, "env": {
        k: os.environ.get(k) for k in ("CUDA_MODULE_LOADING", "PROBE_CUDNN_SDP")}}
    if args.variant == "pow2":
        warm = [probe.request(n) for n in POW2[: 6 if quick else None]]
        result["warmup"] = warm
        result["warmup_s"] = round(sum(r["prefill_s"] + DECODE_STEPS * r["decode_s"]
                                       for r in warm), 4)
        result["between"] = [[probe.request(n), probe.request(n)]
                             for n in BETWEEN[: 2 if quick else None]]
        return result
    started = time.perf_counter()
    result["lengths"] = [[probe.request(n), probe.request(n)] for n in lengths]
    result["lengths_wall_s"] = round(time.perf_counter() - started, 4)
    result["threads"] = {"main": probe.request(59), "new_thread_1": probe.on_thread(59),
                         "new_thread_2": probe.on_thread(59), "main_again": probe.request(59)}
    if args.variant in ("lazy", "no_cudnn_sdp"):
        result["profile_first"] = probe.profile(777)
        result["profile_repeat"] = probe.profile(777)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer lengths (CI)")
    parser.add_argument("--variants", default="", help="comma-separated subset to run")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="lazy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    variants: dict[str, dict[str, str]] = {
        "lazy": {}, "no_cudnn_sdp": {"PROBE_CUDNN_SDP": "0"}, "pow2": {}}
    if args.device.startswith("cuda"):
        variants["eager"] = {"CUDA_MODULE_LOADING": "EAGER"}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    results: dict[str, Any] = {"shape": args.shape, "device": args.device,
                               "environment": common.environment(),
                               "decode_steps": DECODE_STEPS}
    for name, env in variants.items():
        command = [sys.executable, __file__, "--child", "--variant", name, "--shape",
                   args.shape, "--device", args.device] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, **env})
        if done.returncode != 0:
            raise SystemExit(f"variant {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    for name in variants:
        r = results[name]
        print(f"== {name}: {r['timings']}")
        for first, again in r.get("lengths", []):
            print(f"  L={first['length']:5d} prefill first {1000 * first['prefill_s']:7.1f} ms"
                  f" again {1000 * again['prefill_s']:7.1f} ms; decode first "
                  f"{1000 * first['decode_s']:6.1f} again {1000 * again['decode_s']:6.1f}")
        for key, t in r.get("threads", {}).items():
            print(f"  {key:13} prefill {1000 * t['prefill_s']:7.1f} ms decode "
                  f"{1000 * t['decode_s']:6.1f} ms")
        if "warmup_s" in r:
            print(f"  pow2 warm-up {r['warmup_s']:.3f} s")
            for first, again in r["between"]:
                print(f"  L={first['length']:5d} prefill first {1000 * first['prefill_s']:7.1f}"
                      f" ms again {1000 * again['prefill_s']:7.1f} ms")
    for name in variants:
        if "profile_first" in results[name]:
            print(f"== {name}: profile of a first request at an unseen length, then again")
            print(results[name]["profile_first"])
            print(results[name]["profile_repeat"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
