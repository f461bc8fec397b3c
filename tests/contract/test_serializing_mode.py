"""mode=serializing through the real fwatchdog: whole body in, whole stdout out."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from tests.conftest import alive, fetch, wait_until

PY = shlex.quote(sys.executable)
DURATION = re.compile(r"^\d+\.\d{6}$")  # Go's %f


def start(factory, **env: str):  # type: ignore[no-untyped-def]
    wd = factory({"mode": "serializing", "healthcheck_interval": "0", **env})
    wd.wait_ready()
    return wd


def test_success_is_200_with_duration_and_content_type(watchdog_factory) -> None:
    wd = start(watchdog_factory, fprocess="tr a-z A-Z", content_type="text/plain")
    reply = fetch(wd.url + "/", "POST", body=b"hello")
    assert reply.status == 200
    assert reply.body == b"HELLO"
    assert reply.header("Content-Type") == "text/plain"
    assert DURATION.match(reply.header("X-Duration-Seconds") or "")
    assert reply.header("Content-Length") == "5"


def test_failure_is_500_with_the_error_text(watchdog_factory) -> None:
    wd = start(watchdog_factory, fprocess="sh -c 'echo reason >&2; exit 2'")
    reply = fetch(wd.url + "/", "POST", body=b"x")
    assert reply.status == 500
    assert reply.body == b"exit status 2"  # of-watchdog's exact body
    assert DURATION.match(reply.header("X-Duration-Seconds") or "")
    wd.wait_output("stderr: reason")


def test_exec_timeout_is_500_and_kills_the_process_group(watchdog_factory,
                                                         tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    wd = start(watchdog_factory, exec_timeout="500ms",
               fprocess=f"sh -c 'sleep 300 & echo $! > {pidfile}; wait'")
    reply = fetch(wd.url + "/", "POST", body=b"x", timeout=15)
    assert reply.status == 500
    assert b"exec_timeout of 500ms exceeded" in reply.body
    grandchild = int(pidfile.read_text())
    wait_until(lambda: not alive(grandchild), timeout=10, what="the grandchild to be killed")


def test_body_over_max_body_size_is_413(watchdog_factory) -> None:
    wd = start(watchdog_factory, fprocess="cat", max_body_size="16")
    assert fetch(wd.url + "/", "POST", body=b"x" * 16).status == 200
    assert fetch(wd.url + "/", "POST", body=b"x" * 17).status == 413


def test_large_body_without_a_limit(watchdog_factory) -> None:
    wd = start(watchdog_factory, fprocess="cat")
    payload = bytes(range(256)) * 16384  # 4 MiB, past aiohttp's 1 MiB default
    reply = fetch(wd.url + "/", "POST", body=payload, timeout=30)
    assert reply.status == 200
    assert reply.body == payload
