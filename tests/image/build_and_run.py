"""Build the base image and a python3-llm function image with podman, run it, check it.

Run by hand before a release (it takes many minutes and several GB of disk; see
docs/images.md), as root on a Linux machine with Debian's ``podman``, ``runc``
and ``debootstrap``:

    .venv/bin/python tests/image/build_and_run.py [--out DIR] [--mode llm]

No registry image is used. The steps, each timed:

1. ``debian``: a Debian root file system made with ``debootstrap`` (python3, pip,
   procps), imported with ``podman import``;
2. ``torch``: torch's CPU build on top (``tests/image/Containerfile.torch-cpu``),
   the stand-in for the PyTorch image the root Dockerfile starts from;
3. ``base``: the root ``Dockerfile`` (fwatchdog, transformers, the model package);
4. ``function``: ``faas-cli new chat --lang python3-llm`` and ``faas-cli build
   --shrinkwrap`` reproduced as file operations (tests/e2e/conftest.py's FaasCli,
   the same code the e2e tests check against faas-cli's behaviour), then the
   template's Dockerfile built in that context (model conversion, trace, tox);
5. ``run``: the function image started with ``podman run``, then checked: the
   official ``openai`` client gets an answer; the processes run as the non-root
   ``app`` user; ``podman healthcheck run`` passes; with ``mode=llm``, ``ps`` shows
   the holder, zygote and handler titles and the template written at build time
   is a hit; SIGTERM during a streamed answer lets it finish and the container
   exits 0.

Settings (environment): ``EXTRA_CA_CERTS_FILE`` a PEM file of extra CA certificates
for the build (a proxy that inspects TLS), passed as the build argument
``EXTRA_CA_CERTS``; ``TORCH_FIND_LINKS`` a folder of wheels to offer pip for torch;
``TORCH_SPEC`` (``torch==2.13.0``); ``DEBIAN_MIRROR``
(``http://deb.debian.org/debian``); ``REBUILD=1`` rebuilds images that exist.

Results: one line per check on stdout, and ``results.json`` (timings, checks,
versions) in ``--out`` (default: ``bench/results/image_podman.json``).
A failed check makes the exit status 1; a step that cannot run makes it 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DEBIAN_IMAGE = "localhost/fwatchdog-debian-python:bookworm"
TORCH_IMAGE = "localhost/fwatchdog-torch-cpu:latest"
BASE_IMAGE = "localhost/fwatchdog-llm-base:latest"
FUNCTION_IMAGE = "localhost/fwatchdog-chat:latest"
CONTAINER = "fwatchdog-image-check"
DEBIAN_PACKAGES = "python3,python3-pip,python3-venv,python-is-python3,ca-certificates,procps"
# The files the root Dockerfile's build context holds (Dockerfile.dockerignore).
BASE_CONTEXT = ("pyproject.toml", "README.md", "watchdog", "tracer", "template_cache",
                "docker/with-build-ca", "Dockerfile")


@dataclass
class Report:
    steps: dict[str, float] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool | None, detail: str = "") -> None:
        """``ok`` None: skipped (the image cannot show it), with the reason in ``detail``."""
        status = "skipped" if ok is None else ("ok" if ok else "FAILED")
        self.checks.append({"check": name, "status": status, "detail": detail})
        print(f"check {name}: {status} {detail}".rstrip(), flush=True)

    @property
    def failed(self) -> bool:
        return any(c["status"] == "FAILED" for c in self.checks)


class StepFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], *, capture: bool = False, check: bool = True,
        timeout: float | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A command, niced (the builds are CPU-heavy), its output on the terminal unless captured."""
    full = ["nice", "-n", "10", *cmd]
    result = subprocess.run(full, text=True, capture_output=capture, timeout=timeout,
                            cwd=cwd, check=False)
    if check and result.returncode != 0:
        tail = (result.stderr or "")[-2000:] if capture else ""
        raise StepFailed(f"{' '.join(cmd[:3])} ... exited {result.returncode}\n{tail}")
    return result


def timed(report: Report, name: str, func: Any, *args: Any) -> Any:
    log(f"step {name} ...")
    started = time.monotonic()
    value = func(*args)
    report.steps[name] = round(time.monotonic() - started, 1)
    log(f"step {name}: {report.steps[name]} s")
    return value


def image_exists(name: str) -> bool:
    return run(["podman", "image", "exists", name], check=False).returncode == 0


def limits() -> list[str]:
    """``--ulimit`` flags for podman, whose defaults may exceed what may be set here.

    Where raising a limit is not permitted, runc fails to start the container
    ("error setting rlimit"), so both limits are set to one N no larger than the hard
    limit on open files (the nproc limit proved no safer bound), at most 65536.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    n = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    return ["--ulimit", f"nofile={n}:{n}", "--ulimit", f"nproc={n}:{n}"]


def build_args() -> list[str]:
    args: list[str] = []
    ca_file = os.environ.get("EXTRA_CA_CERTS_FILE")
    if ca_file:
        args += ["--build-arg", "EXTRA_CA_CERTS=" + Path(ca_file).read_text()]
    return args


def podman_build(context: Path, tag: str, extra: list[str]) -> None:
    # docker format: OCI image configs have no HEALTHCHECK, and the check needs it.
    run(["podman", "build", "--runtime", "runc", "--format", "docker", *limits(),
         *build_args(), *extra, "-t", tag, str(context)])


# -- the steps ----------------------------------------------------------------------


def make_debian(work: Path) -> None:
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
    root = work / "rootfs"
    run(["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm",
         str(root), mirror])
    # apt's lists and caches are not part of a base image.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (root / junk).glob("*"):
            if entry.is_file():
                entry.unlink()
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."],
                           stdout=subprocess.PIPE)
    imported = subprocess.run(["podman", "import", "--change", "CMD [\"python3\"]",
                               "-", DEBIAN_IMAGE], stdin=tar.stdout, check=False)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise StepFailed("debootstrap root file system could not be imported")
    shutil.rmtree(root, ignore_errors=True)


def make_torch(work: Path) -> None:
    context = work / "torch-context"
    context.mkdir()
    shutil.copy(HERE / "Containerfile.torch-cpu", context / "Containerfile")
    shutil.copy(REPO / "docker" / "with-build-ca", context / "with-build-ca")
    extra = ["--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}"]
    spec = os.environ.get("TORCH_SPEC")
    if spec:
        extra += ["--build-arg", f"TORCH_SPEC={spec}"]
    links = os.environ.get("TORCH_FIND_LINKS")
    if links:
        extra += ["--volume", f"{Path(links).resolve()}:/wheels:ro",
                  "--build-arg", "TORCH_FIND_LINKS=/wheels"]
    podman_build(context, TORCH_IMAGE, extra)


def make_base(work: Path) -> None:
    context = work / "base-context"
    for name in BASE_CONTEXT:
        source, target = REPO / name, context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    podman_build(context, BASE_IMAGE, ["--build-arg", f"PYTORCH_IMAGE={TORCH_IMAGE}"])


def shrinkwrap(work: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.e2e.conftest import FaasCli  # the project's faas-cli file operations

    project = work / "project"
    project.mkdir()
    cli = FaasCli(project)
    cli.template_pull(REPO)
    cli.new("chat", "python3-llm")
    return cli.shrinkwrap()["chat"]


def make_function(context: Path) -> None:
    podman_build(context, FUNCTION_IMAGE, ["--build-arg", f"BASE_IMAGE={BASE_IMAGE}"])


# -- the run --------------------------------------------------------------------


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except OSError:
        return 0, ""


def wait_for(what: str, condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    log(f"gave up waiting for {what} after {timeout:.0f} s")
    return False


def podman_out(*args: str) -> str:
    return run(["podman", *args], capture=True, check=False).stdout.strip()


def check_run(report: Report, mode: str | None, port: int, metrics_port: int,
              shm_size: str) -> None:
    import openai

    run(["podman", "rm", "-f", CONTAINER], capture=True, check=False)
    env = ["-e", f"mode={mode}"] if mode else []
    started = time.monotonic()
    # mode=llm on a CPU keeps the weights in shared memory (/dev/shm), which
    # podman and Docker make 64 MB unless told otherwise.
    shm = ["--shm-size", shm_size] if shm_size else []
    run(["podman", "run", "-d", "--runtime", "runc", *limits(), *shm, "--name", CONTAINER,
         "-p", f"127.0.0.1:{port}:8080", "-p", f"127.0.0.1:{metrics_port}:8081", *env,
         FUNCTION_IMAGE], capture=True)
    base = f"http://127.0.0.1:{port}"
    healthy = wait_for("/_/health", lambda: http_get(base + "/_/health")[0] == 200, 300)
    report.steps["run_to_health"] = round(time.monotonic() - started, 1)
    report.check("health_200", healthy, f"{report.steps['run_to_health']} s after podman run")
    if not healthy:
        print(podman_out("logs", CONTAINER)[-4000:])
        return
    ready = wait_for("/_/ready", lambda: http_get(base + "/_/ready")[0] == 200, 300)
    report.steps["run_to_ready"] = round(time.monotonic() - started, 1)
    report.check("ready_200", ready, f"{report.steps['run_to_ready']} s after podman run")

    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)
    served = client.models.list().data[0].id
    asked = time.monotonic()
    reply = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    answer = reply.choices[0].message.content or ""
    report.steps["first_answer"] = round(time.monotonic() - asked, 2)
    report.steps["run_to_first_answer"] = round(time.monotonic() - started, 1)
    report.check("openai_client_answer", "Paris" in answer,
                 f"{served!r} said {answer!r} in {report.steps['first_answer']} s")

    user = podman_out("exec", CONTAINER, "id", "-un")
    procs = podman_out("exec", CONTAINER, "ps", "-eo", "user:12,pid,args")
    report.facts["processes"] = procs.splitlines()
    owners = {line.split()[0] for line in procs.splitlines()[1:]
              if line.split() and "ps -eo" not in line}
    report.check("non_root_app_user", user == "app" and owners == {"app"},
                 f"exec user {user!r}; process owners {sorted(owners)}")

    health = run(["podman", "healthcheck", "run", CONTAINER], capture=True, check=False)
    report.check("healthcheck", health.returncode == 0,
                 (health.stdout or health.stderr).strip() or f"exit {health.returncode}")

    _, metrics = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    llm = "fwatchdog_llm_" in metrics
    if not llm:
        why = "the image does not run mode=llm (its fwatchdog has no mode=llm metrics)"
        report.check("llm_process_titles", None, why)
        report.check("llm_template_hit", None, why)
    else:
        titles = [t for t in ("fwatchdog: holder", "fwatchdog: zygote", "fwatchdog: handler")
                  if t in procs]
        report.check("llm_process_titles", len(titles) == 3, f"found {titles}")
        hits = [line for line in metrics.splitlines()
                if line.startswith("fwatchdog_llm_template_loads_total")]
        hit = any('outcome="hit"' in line and not line.endswith(" 0.0") for line in hits)
        report.check("llm_template_hit", hit, "; ".join(hits) or "no template metric")
        phases = [line for line in metrics.splitlines()
                  if line.startswith("fwatchdog_llm_phase_seconds_sum")]
        report.facts["llm_phases"] = phases

    check_drain(report, client, served)


def check_drain(report: Report, client: Any, served: str) -> None:
    """SIGTERM while a streamed answer is in flight: the answer completes, exit code 0."""
    pieces: list[str] = []
    outcome: dict[str, Any] = {}

    def stream() -> None:
        try:
            for chunk in client.chat.completions.create(
                    model=served, stream=True, max_tokens=96, temperature=0,
                    messages=[{"role": "user", "content": "Tell me about Paris."}]):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.choices and chunk.choices[0].finish_reason:
                    outcome["finish"] = chunk.choices[0].finish_reason
        except Exception as exc:  # recorded, and the check fails
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    wait_for("the first streamed token", lambda: bool(pieces) or "error" in outcome, 120)
    signalled = time.monotonic()
    run(["podman", "kill", "--signal", "TERM", CONTAINER], capture=True)
    exited = wait_for("the container to exit", lambda: podman_out(
        "inspect", "-f", "{{.State.Status}}", CONTAINER) == "exited", 300)
    thread.join(60)
    code = podman_out("inspect", "-f", "{{.State.ExitCode}}", CONTAINER)
    report.steps["sigterm_to_exit"] = round(time.monotonic() - signalled, 1)
    finished = outcome.get("finish") in ("stop", "length") and "error" not in outcome
    report.check("sigterm_drains_in_flight_stream", finished,
                 f"{len(pieces)} chunks, finish={outcome.get('finish')}, "
                 f"error={outcome.get('error')}")
    report.check("sigterm_exit_0", exited and code == "0",
                 f"exit code {code} after {report.steps['sigterm_to_exit']} s")
    logs = run(["podman", "logs", CONTAINER], capture=True, check=False)
    report.facts["container_log_tail"] = (logs.stdout + logs.stderr).splitlines()[-25:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else "")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" /
                        "image_podman.json")
    parser.add_argument("--mode", default=None,
                        help="override the image's mode (e.g. llm); default: as built")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--metrics-port", type=int, default=18081)
    parser.add_argument("--skip-build", action="store_true", help="run the images that exist")
    parser.add_argument("--shm-size", default="1g",
                        help="the container's /dev/shm (mode=llm on CPU holds the weights "
                             "there); empty: podman's default, 64 MB")
    args = parser.parse_args(argv)
    for tool in ("podman", "debootstrap", "runc"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (Debian: apt-get install podman runc debootstrap)")
            return 2
    report = Report()
    report.facts.update(podman=podman_out("--version"), machine=platform.machine(),
                        cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    rebuild = os.environ.get("REBUILD") == "1"
    work = Path(tempfile.mkdtemp(prefix="fwatchdog-image-"))
    try:
        if not args.skip_build:
            if rebuild or not image_exists(DEBIAN_IMAGE):
                timed(report, "debian", make_debian, work)
            if rebuild or not image_exists(TORCH_IMAGE):
                timed(report, "torch", make_torch, work)
            timed(report, "base", make_base, work)
            context = timed(report, "shrinkwrap", shrinkwrap, work)
            timed(report, "function", make_function, context)
        for name in (DEBIAN_IMAGE, TORCH_IMAGE, BASE_IMAGE, FUNCTION_IMAGE):
            size = podman_out("image", "inspect", "-f", "{{.Size}}", name)
            report.facts.setdefault("image_bytes", {})[name] = int(size) if size.isdigit() else None
        report.facts["shm_size"] = args.shm_size or "podman default (64m)"
        check_run(report, args.mode, args.port, args.metrics_port, args.shm_size)
    except StepFailed as exc:
        log(f"step failed: {exc}")
        report.facts["error"] = str(exc)
        return 2
    finally:
        run(["podman", "rm", "-f", CONTAINER], capture=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"steps_seconds": report.steps, "checks": report.checks,
                                        **report.facts}, indent=2) + "\n")
        log(f"results in {args.out}")
        for name, seconds in report.steps.items():
            print(f"  {name:<24} {seconds:>8} s")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
