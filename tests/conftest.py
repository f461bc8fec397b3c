"""Shared helpers for every test folder: free ports, deadlines, a real fwatchdog.

Nothing here sleeps to synchronise: :func:`wait_until` polls a condition with a
deadline and fails with a message naming what never happened.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
FWATCHDOG = str(VENV_BIN / "fwatchdog")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], object], *, timeout: float = 30.0, what: str = "condition",
               interval: float = 0.02) -> object:
    """Poll ``condition`` until it returns a truthy value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


def http_status(url: str, *, timeout: float = 5.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class Watchdog:
    """A running ``fwatchdog`` process and what it printed."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    tmpdir: Path
    output: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def lock_path(self) -> Path:
        return self.tmpdir / ".lock"

    def text(self) -> str:
        return "".join(self.output)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.proc.poll() is not None or http_status(self.url + "/_/health") == 200,
            timeout=timeout, what="fwatchdog /_/health to answer 200",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"fwatchdog exited {self.proc.returncode}:\n{self.text()}")

    def wait_output(self, needle: str, timeout: float = 30.0) -> None:
        wait_until(lambda: needle in self.text(), timeout=timeout, what=f"output {needle!r}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        return rc


def start_watchdog(env: Mapping[str, str], tmp_path: Path, *, cwd: Path | None = None,
                   args: tuple[str, ...] = ()) -> Watchdog:
    """Start the real ``fwatchdog`` on free ports, its lock file under ``tmp_path``."""
    tmpdir = tmp_path / "wd-tmp"
    tmpdir.mkdir(exist_ok=True)
    port, metrics_port = free_port(), free_port()
    full = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmpdir),
        "port": str(port),
        "metrics_port": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    }
    full.update(env)
    proc = subprocess.Popen(
        [FWATCHDOG, *args], env=full, cwd=str(cwd or tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    wd = Watchdog(proc=proc, port=int(full["port"]), metrics_port=int(full["metrics_port"]),
                  tmpdir=tmpdir)

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            wd.output.append(line.decode("utf-8", "replace"))

    wd._reader = threading.Thread(target=read, daemon=True)
    wd._reader.start()
    return wd


@pytest.fixture
def watchdog_factory(tmp_path: Path) -> Iterator[Callable[..., Watchdog]]:
    """Start watchdogs in a test; every one is stopped at the end."""
    started: list[Watchdog] = []

    def factory(env: Mapping[str, str], **kw: object) -> Watchdog:
        wd = start_watchdog(env, tmp_path, **kw)  # type: ignore[arg-type]
        started.append(wd)
        return wd

    yield factory
    for wd in started:
        wd.stop()
