"""The floors of bench/coldstart.py: what a start could reach at best, measured in the
same run and on the same machine as the figures they bound.

- ``import``: a bare process that imports torch, transformers, the Auto classes the
  function uses and the Llama module; from the parent's spawn to the end of the
  imports. ``--block sklearn,pandas`` measures it as a slim image would have it:
  those packages are made unimportable (``sys.modules[name] = None``, which
  ``importlib.util.find_spec`` reports as absent), so the difference is their share.
  ``--gc-paused`` measures the same imports with the cyclic garbage collector paused,
  as mode=llm's zygote makes them: the floor is the ordinary process's, and this one
  says how much of it is the collector's.
- ``device``: in one fresh process, CUDA context creation (``torch.empty`` on the
  device, synchronised), host-to-device bandwidth (1 GiB, pinned and pageable,
  best of 5), then the model loaded the function's way and its steady-state prefill
  per prompt length (median of 5 after 3 warm-ups, synchronised).
- :func:`read_bytes_s`: reading the weight files once (with a cold page cache, the
  disk's share of a cold start).

As a script: ``python bench/coldstart_floors.py import|device ...``; one JSON line out.
``python bench/coldstart_floors.py import-gc --runs N`` alternates the import floor
with and without the collector paused N times (each in a fresh process) and prints
both lists.
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
SLIM = ("sklearn", "pandas")


def measure(args: list[str], env: dict[str, str], timeout: float = 600) -> dict[str, Any]:
    env = {**env, "FWATCHDOG_BENCH_SPAWNED": repr(time.time())}
    done = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"floor {args[0]} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def import_floor(env: dict[str, str], block: tuple[str, ...] = (),
                 gc_paused: bool = False) -> dict[str, Any]:
    return measure(["import", "--block", ",".join(block), *(["--gc-paused"] if gc_paused else [])],
                   env)


def device_floor(env: dict[str, str], model_dir: Path, device: str,
                 lengths: list[int]) -> dict[str, Any]:
    return measure(["device", str(model_dir), "--device", device,
                    "--lengths", ",".join(map(str, lengths))], env)


def read_bytes_s(files: list[Path], chunk: int = 16 << 20) -> float:
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(chunk):
                pass
    return time.perf_counter() - started


# ---------------------------------------------------------------- in the child


def _import(block: list[str], gc_paused: bool = False) -> dict[str, Any]:
    spawned = float(os.environ["FWATCHDOG_BENCH_SPAWNED"])
    if gc_paused:
        import gc

        gc.disable()
    for name in block:
        sys.modules[name] = None  # type: ignore[assignment]
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    done = time.time() - spawned
    loaded = [name for name in SLIM if sys.modules.get(name) is not None]
    return {"import_s": done, "blocked": block, "slim_packages_imported": loaded}


def _sync(torch: Any, device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _bandwidth(torch: Any, device: str) -> dict[str, float]:
    size = 1 << 30
    out = {}
    for kind in ("pinned", "pageable"):
        host = torch.empty(size, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        host.fill_(1)
        target = torch.empty(size, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            target.copy_(host, non_blocking=False)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        out[f"h2d_{kind}_bytes_per_s"] = size / best
        del host, target
    torch.cuda.empty_cache()
    return out


def _memory_bandwidth(torch: Any, device: str) -> float:
    """Bytes a second the device's memory moves, from the best of five copies of a
    large buffer within it (each byte read once and written once)."""
    size = (1 << 31) if device.startswith("cuda") else (1 << 28)
    source = torch.ones(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        _sync(torch, device)
        started = time.perf_counter()
        target.copy_(source)
        _sync(torch, device)
        best = min(best, time.perf_counter() - started)
    del source, target
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return 2 * size / best


def _device(model_dir: Path, device: str, lengths: list[int]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    result: dict[str, Any] = {"device": device}
    if device.startswith("cuda"):
        started = time.perf_counter()
        torch.empty(1, device=device)
        torch.cuda.synchronize()
        result["cuda_context_s"] = time.perf_counter() - started
        result.update(_bandwidth(torch, device))
    else:
        result["cuda_context_s"] = 0.0
    result["memory_bytes_per_s"] = _memory_bandwidth(torch, device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=device)
    _sync(torch, device)
    result["load_s"] = time.perf_counter() - started
    vocab = model.config.vocab_size
    prefill: dict[str, float] = {}
    with torch.inference_mode():
        for length in lengths:
            ids = torch.randint(4, vocab, (1, length), device=device)
            times = []
            for i in range(8):
                started = time.perf_counter()
                logits = model(input_ids=ids).logits[0, -1]
                int(torch.argmax(logits))  # the first token reaches the host
                if i >= 3:
                    times.append(time.perf_counter() - started)
            prefill[str(length)] = statistics.median(times)
    result["prefill_s"] = prefill
    return result


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="coldstart_floors.py")
    sub = parser.add_subparsers(dest="what", required=True)
    imp = sub.add_parser("import")
    imp.add_argument("--block", default="")
    imp.add_argument("--gc-paused", action="store_true")
    both = sub.add_parser("import-gc")
    both.add_argument("--runs", type=int, default=4)
    dev = sub.add_parser("device")
    dev.add_argument("model_dir", type=Path)
    dev.add_argument("--device", default="cpu")
    dev.add_argument("--lengths", default="7")
    args = parser.parse_args(argv)
    if args.what == "import-gc":  # the parent: fresh children, alternating
        env = dict(os.environ)
        result = {"gc_on_s": [], "gc_paused_s": []}
        for _ in range(args.runs):
            result["gc_on_s"].append(import_floor(env)["import_s"])
            result["gc_paused_s"].append(import_floor(env, gc_paused=True)["import_s"])
    elif args.what == "import":
        result = _import([b for b in args.block.split(",") if b], args.gc_paused)
    else:
        result = _device(args.model_dir, args.device, [int(n) for n in args.lengths.split(",")])
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # interpreter teardown is not part of any floor


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
