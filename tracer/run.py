"""One traced start-up in a fresh process (the tracer CLI starts two of these).

    python -X importtime -m fwatchdog.tracer.run FUNCTION_DIR --mode checksums --out FILE
    python -X importtime -m fwatchdog.tracer.run FUNCTION_DIR --mode trace --out DIR \
        [--compare FILE] [--sample FILE ...]

`checksums` runs the start-up only and writes the load-time sha256 of every traced
tensor (JSON). `trace` runs the start-up and the samples and writes a template to
DIR, and `DIR/trace-run.json` with what only this process knows (its new modules).

A sample that raises: when it is one of the default samples (the function has no
samples folder and none was given), the remaining samples are skipped, a
`trace_sample_failed` warning is logged, and the template is written from the
start-up alone (the failure is recorded in `trace.sample_failure`). A sample the
user gave that fails ends this process with exit status SAMPLE_FAILED and the
sample's error as the last line on stderr.

Invariants:
- Torch, transformers and safetensors are imported before the loaders are
  intercepted, so their own internal bindings stay the originals.
- The interception is removed before the template is written.
"""

from __future__ import annotations

import sys

_BASELINE = set(sys.modules)  # before anything heavy: what the interpreter brings

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

RUN_INFO = "trace-run.json"
SAMPLE_FAILED = 3  # exit status: a sample the user gave failed
SAMPLE_FAILED_PREFIX = "fwatchdog-tracer: sample failed: "


def _import_loaders() -> None:
    import torch  # noqa: F401

    for name in ("safetensors.torch", "transformers", "transformers.modeling_utils"):
        with contextlib.suppress(ImportError):
            __import__(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwatchdog.tracer.run")
    parser.add_argument("function_dir", type=Path)
    parser.add_argument("--mode", choices=["checksums", "trace"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--sample", type=Path, action="append", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    function_dir = args.function_dir.resolve()
    out = args.out.resolve()
    samples_given = [p.resolve() for p in args.sample] if args.sample else None
    compare = json.loads(args.compare.read_text()) if args.compare else None

    _import_loaders()
    from fwatchdog.template_cache import fingerprint
    from fwatchdog.template_cache.intercept import intercept_loaders
    from fwatchdog.tracer import build, function, observe
    from fwatchdog.tracer.recorder import Recorder

    recorder = Recorder(function_dir, keep_bytes=args.mode == "trace")
    started = time.perf_counter()
    with observe.LazyImportTimer() as lazy, intercept_loaders(recorder):
        handler = function.import_handler(function_dir)
    startup_s = time.perf_counter() - started
    if args.mode == "checksums":
        out.write_text(json.dumps(build.load_checksums(recorder), sort_keys=True))
        return 0

    samples = function.load_samples(function_dir, samples_given)
    defaults = function.uses_default_samples(function_dir, samples_given)
    watched = {}
    for load in recorder.loads:
        for t in load.tensors:
            if t.tensor.numel():
                watched[int(t.tensor.data_ptr())] = t.name
    watch = observe.OpWatch(watched)
    started = time.perf_counter()
    sample_results = []
    failure: dict[str, Any] | None = None
    with _maybe_profile() as profile, watch:
        for sample in samples:
            try:
                output = function.invoke(handler, sample)
            except Exception as exc:  # noqa: BLE001 - the user's handler: report it
                failure = {"sample": sample.name, "default": defaults,
                           "error": f"{type(exc).__name__}: {exc}"}
                break
            sample_results.append({"name": sample.name, "output_bytes": output})
    samples_s = time.perf_counter() - started
    if failure is not None and not defaults:
        logging.getLogger("fwatchdog.tracer").exception("trace_sample_failed sample=%s",
                                                        failure["sample"])
        sys.stderr.write(f"{SAMPLE_FAILED_PREFIX}{failure['sample']}: {failure['error']}\n")
        return SAMPLE_FAILED
    if failure is not None:
        logging.getLogger("fwatchdog.tracer").warning(
            "trace_sample_failed sample=%s default=true error=%r: writing the template from"
            " the start-up alone", failure["sample"], failure["error"])
        samples = []  # no warm-up plan from a request the handler does not take
    max_context = None
    for load in recorder.loads:
        if load.model is not None:
            max_context = load.model["config"].get("max_position_embeddings") or max_context
    trace = {
        "static_method": {"runs": 2 if compare is not None else 1,
                          "compare": "sha256 of each traced tensor when its loader returned"},
        "timings": {"startup_s": round(startup_s, 3), "samples_s": round(samples_s, 3)},
        "samples": sample_results,
        "sample_failure": failure,
        "ops": watch.op_list(),
        "kernels": observe.kernel_names(profile) if profile is not None else [],
        "peak_memory": observe.peak_memory(),
        "warmup": observe.warmup_plan((s.to_json() for s in samples), max_context),
        "imports": [],
        "prebuild": recorder.prebuild,
    }
    build.write_template(recorder, out, function_dir, fingerprint.current(function_dir),
                         compare, watch.first_use, trace)
    new_modules = [m for m in sys.modules if m not in _BASELINE]
    (out / RUN_INFO).write_text(json.dumps({"new_modules": new_modules,
                                            "lazy_imports": lazy.imports}))
    return 0


class _maybe_profile:  # noqa: N801 - used like contextlib helpers
    """The torch profiler with CUDA activity, only when the function is using CUDA."""

    def __init__(self) -> None:
        self._profile: Any = None

    def __enter__(self) -> Any:
        from fwatchdog.tracer.observe import cuda_in_use

        if not cuda_in_use():
            return None
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self._profile.__enter__()
        return self._profile

    def __exit__(self, *exc: Any) -> None:
        if self._profile is not None:
            self._profile.__exit__(*exc)


if __name__ == "__main__":
    sys.exit(main())
