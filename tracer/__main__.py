"""`python -m fwatchdog.tracer FUNCTION_DIR --out TEMPLATE_DIR [--sample FILE ...] [--runs N]
[--timeout SECONDS]`.

Runs the function's start-up in fresh processes: first start-up only, recording
load-time checksums; then start-up plus samples, writing the template and comparing
checksums with the first run (what differs is dynamic). Adds the import costs read
from `python -X importtime`, verifies the result and moves it into place.

Samples: a sample the user gave (FUNCTION_DIR/samples/*.json or --sample) that fails
fails the build, saying which sample and why. The default sample (an OpenAI chat
request) failing only warns, since many handlers are not OpenAI-shaped: the
template is then written from the start-up alone.

Each traced child process gets `--timeout` seconds (default DEFAULT_TIMEOUT_S);
past that it and everything it started are killed and the tracer fails, so a
hanging start-up cannot hang an image build.

Exit status: 0 written and verified; 1 a traced start-up or a given sample failed,
a child timed out, or the result did not verify (the message says which); 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fwatchdog.template_cache.format import MANIFEST_NAME, dumps_manifest
from fwatchdog.template_cache.verify import verify_template
from fwatchdog.tracer.observe import parse_importtime
from fwatchdog.tracer.run import RUN_INFO, SAMPLE_FAILED, SAMPLE_FAILED_PREFIX

EXCLUDED_PREFIXES = ("fwatchdog", "function")
DEFAULT_TIMEOUT_S = 1800.0  # a large model's start-up on a small build machine
HOW_TO_GIVE_SAMPLES = ("give samples that fit the handler as JSON files in"
                       " FUNCTION_DIR/samples/*.json or with --sample FILE"
                       " ({\"method\", \"path\", \"headers\", \"body\"})")


def _child(args: list[str], stderr_path: Path, timeout: float) -> None:
    command = [sys.executable, "-X", "importtime", "-m", "fwatchdog.tracer.run", *args]
    with open(stderr_path, "w") as stderr:
        # A session of its own, so that a timeout kills whatever the start-up started.
        child = subprocess.Popen(command, stderr=stderr, start_new_session=True)
        try:
            returncode = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise RuntimeError(
                f"traced start-up did not finish within {timeout:g} s and was killed;"
                " raise --timeout if it needs longer") from None
        except BaseException:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            raise
    if returncode != 0:
        lines = [line for line in stderr_path.read_text().splitlines()
                 if not line.startswith("import time:")]
        tail = "\n".join(lines[-30:])
        failed = [line for line in lines if line.startswith(SAMPLE_FAILED_PREFIX)]
        if returncode == SAMPLE_FAILED and failed:
            detail = failed[-1].removeprefix(SAMPLE_FAILED_PREFIX)
            raise RuntimeError(f"the start-up worked, but sample {detail}\n{tail}\n"
                               f"fix the sample or the handler; {HOW_TO_GIVE_SAMPLES}")
        raise RuntimeError(f"traced start-up failed (exit {returncode}):\n{tail}")


def trace(function_dir: Path, out: Path, samples: list[Path] | None, runs: int,
          timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    function_dir = function_dir.resolve()
    out = out.resolve()
    sample_args = [arg for s in samples or [] for arg in ("--sample", str(s.resolve()))]
    with tempfile.TemporaryDirectory(prefix="fwatchdog-trace-") as scratch_name:
        scratch = Path(scratch_name)
        compare: list[str] = []
        started = time.perf_counter()
        if runs > 1:
            checksums = scratch / "checksums.json"
            _child([str(function_dir), "--mode", "checksums", "--out", str(checksums)],
                   scratch / "checksums.stderr", timeout)
            compare = ["--compare", str(checksums)]
        staged = scratch / "template"
        stderr = scratch / "trace.stderr"
        _child([str(function_dir), "--mode", "trace", "--out", str(staged), *compare,
                *sample_args], stderr, timeout)
        run_info = json.loads((staged / RUN_INFO).read_text())
        (staged / RUN_INFO).unlink()
        modules = {m for m in run_info["new_modules"] if not m.startswith(EXCLUDED_PREFIXES)}
        manifest = json.loads((staged / MANIFEST_NAME).read_bytes())
        imports = parse_importtime(stderr.read_text().splitlines(), modules)
        seen = {i["module"] for i in imports}
        imports += [i for i in run_info["lazy_imports"]
                    if i["module"] not in seen and not i["module"].startswith(EXCLUDED_PREFIXES)]
        manifest["trace"]["imports"] = imports
        manifest["trace"]["timings"]["tracer_total_s"] = round(time.perf_counter() - started, 3)
        (staged / MANIFEST_NAME).write_bytes(dumps_manifest(manifest))
        report = verify_template(staged, function_dir)
        if not report.ok:
            raise RuntimeError("written template does not verify: " + "; ".join(report.problems))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwatchdog.tracer")
    parser.add_argument("function_dir", type=Path, help="faas-cli handler folder (handler.py)")
    parser.add_argument("--out", type=Path, required=True, help="template folder to write")
    parser.add_argument("--sample", type=Path, action="append", default=None,
                        help="sample invocation JSON (default: FUNCTION_DIR/samples/*.json)")
    parser.add_argument("--runs", type=int, default=2, choices=[1, 2],
                        help="traced start-ups; 2 compares them to find dynamic state")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds each traced start-up may take (default %(default)g)")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if not (args.function_dir / "handler.py").is_file():
        print(f"error: {args.function_dir} has no handler.py", file=sys.stderr)
        return 2
    try:
        out = trace(args.function_dir, args.out, args.sample, args.runs, args.timeout)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((out / MANIFEST_NAME).read_bytes())
    failure = manifest["trace"].get("sample_failure")
    if failure:
        print(f"warning: the default sample {failure['sample']} (an OpenAI chat request)"
              f" failed: {failure['error']}; the template was written from the start-up"
              f" alone, without a warm-up plan. To trace requests too, {HOW_TO_GIVE_SAMPLES}",
              file=sys.stderr)
    packed = sum(f["size"] for f in manifest["files"] if f["role"] == "packed")
    print(f"template written: {out}")
    print(f"  loads: {len(manifest['loads'])} traced, {len(manifest['skipped_loads'])} skipped")
    print(f"  tensors: {len(manifest['tensors'])}, packed bytes: {packed}")
    print(f"  tracer time: {manifest['trace']['timings']['tracer_total_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
