"""As PID 1 the watchdog reaps orphans, and only orphans (docs/contract.md, Shutdown).

Runs fwatchdog as PID 1 of a new PID namespace (``unshare``, needs root); the
test function double-forks a grandchild that is reparented to the watchdog.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess

import pytest

from tests.conftest import fetch, wait_until

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM")


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_unshare(), reason="needs root and unshare(1)")


def _stop_inside(unshare_pid: int) -> None:
    """unshare(1) does not forward SIGTERM: signal the watchdog (its child) directly."""
    try:
        with open(f"/proc/{unshare_pid}/task/{unshare_pid}/children") as f:
            children = f.read().split()
    except OSError:
        return
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGTERM)


def test_orphan_is_reaped_and_the_functions_exit_status_is_kept(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(), prefix=UNSHARE)
    try:
        _check_reaping(wd, upstream)
    finally:
        _stop_inside(wd.proc.pid)


def _check_reaping(wd, upstream) -> None:
    wd.wait_ready()
    assert fetch(wd.url + "/orphan").status == 200
    pid_file = upstream.signals / "orphan-pid"
    wait_until(pid_file.exists, what="the orphan to start")
    pid = pid_file.read_text()

    def state() -> str:
        return fetch(wd.url + f"/procstate?pid={pid}").body.decode()

    assert state() in ("S", "R")
    upstream.signal("orphan-go")
    # It exits, becomes the watchdog's zombie, and is reaped.
    wait_until(lambda: state() == "gone", timeout=15, what="the orphan zombie to be reaped")
    wd.wait_output("event=orphan_reaped")

    # The function's own exit status still reaches the http mode.
    assert fetch(wd.url + "/die?code=7").status == 200
    assert wd.proc.wait(20) == 1
    wd.wait_output("event=function_exited")
    assert "code=7" in wd.text()
