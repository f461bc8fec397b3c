"""Signals beyond the first SIGTERM (see fwatchdog.lifecycle), and http mode's process group."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from tests.conftest import Reply, alive, fetch, http_status, wait_until


def _in_background(url: str, out: list[Reply | Exception]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(fetch(url, timeout=60))
        except Exception as exc:  # the outcome is what the test checks
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigint_drains_like_sigterm(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="1500ms"))
    wd.wait_ready()
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGINT)
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, timeout=2, what="unready")
    assert fetch(wd.url + "/echo").status == 200  # still serving while load balancers look
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started >= 1.4
    assert "signal=SIGINT" in wd.text()


def test_sighup_drains_like_sigterm(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    wd.proc.send_signal(signal.SIGHUP)
    assert wd.proc.wait(20) == 0
    assert "signal=SIGHUP" in wd.text()


def test_a_second_sigterm_ends_the_healthcheck_wait(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="60s"))
    wd.wait_ready()
    wd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, what="draining")
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGTERM)
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started < 10


def test_a_second_sigint_cuts_requests_in_flight_and_exits(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(write_timeout="60s", exec_timeout="60s"))
    wd.wait_ready()
    held: list[Reply | Exception] = []
    thread = _in_background(wd.url + "/hold?release=never", held)
    wait_until(lambda: upstream.seen("held-never"), what="request in flight")
    wd.proc.send_signal(signal.SIGINT)
    wait_until(lambda: http_status(wd.url + "/_/health") is None, what="listener closed")
    assert wd.proc.poll() is None  # draining: the held request keeps it alive
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGINT)
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    thread.join(10)
    assert held and isinstance(held[0], Exception)  # cut, not answered
    assert "event=shutdown_forced" in wd.text()


def test_sigquit_dumps_stacks_stops_at_once_and_exits_2(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="60s"))
    wd.wait_ready()
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGQUIT)
    assert wd.proc.wait(20) == 2
    assert time.monotonic() - started < 10
    text = wd.text()
    assert "event=sigquit" in text
    assert "most recent call first" in text  # the stacks


# The function as an sh wrapper: a worker that ignores SIGTERM, and the server.
WRAPPER = (
    "{py} -c 'import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(\"{pidfile}.tmp\", \"w\").write(str(os.getpid())); "
    "os.rename(\"{pidfile}.tmp\", \"{pidfile}\"); time.sleep(600)' & "
    "{py} {script} {port}; echo server gone"
)


def test_http_mode_stops_the_function_s_whole_process_group(watchdog_factory, upstream,
                                                            tmp_path):
    pidfile = tmp_path / "worker.pid"
    command = WRAPPER.format(py=sys.executable, pidfile=pidfile, script=upstream.script,
                             port=upstream.port)
    env = upstream.env(write_timeout="2s")
    wd = watchdog_factory({**env, "fprocess": f"sh -c {_quote(command)}"})
    wd.wait_ready()
    wait_until(pidfile.exists, what="the worker to start")
    worker = int(pidfile.read_text())
    try:
        assert alive(worker)
        wd.proc.send_signal(signal.SIGTERM)
        assert wd.proc.wait(30) == 0
        # SIGTERM reached the group; the worker ignored it; SIGKILL after the grace.
        wait_until(lambda: not alive(worker), timeout=10, what="the worker to be killed")
        assert "event=function_killed" in wd.text()
    finally:
        if alive(worker):  # a failed test must not leave it behind
            os.kill(worker, signal.SIGKILL)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
