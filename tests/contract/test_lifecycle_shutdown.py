"""SIGTERM drain order (docs/contract.md, Shutdown) and the function's exit around it."""

from __future__ import annotations

import signal
import threading
import time

from tests.conftest import Reply, fetch, http_status, wait_until


def _in_background(url: str, out: list[Reply | Exception]) -> threading.Thread:
    def run() -> None:
        try:
            out.append(fetch(url, timeout=30))
        except Exception as exc:  # the outcome is what the test checks
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _events(text: str) -> list[str]:
    return [word.split("=", 1)[1] for line in text.splitlines()
            for word in line.split()[2:3] if word.startswith("event=")]


def test_sigterm_unready_at_once_keeps_serving_drains_and_exits_0(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="3s"))
    wd.wait_ready()
    held: list[Reply | Exception] = []
    thread = _in_background(wd.url + "/hold?release=go", held)
    wait_until(lambda: upstream.seen("held-go"), what="request in flight")

    wd.proc.send_signal(signal.SIGTERM)
    # 1. unready and lock removed at once
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, timeout=2,
               what="health 503 right after SIGTERM")
    assert not wd.lock_path.exists()
    assert http_status(wd.url + "/_/ready") == 503
    # 2. still serving new requests during healthcheck_interval
    assert fetch(wd.url + "/echo").status == 200
    assert wd.proc.poll() is None
    # 5. the in-flight request completes
    upstream.signal("go")
    thread.join(20)
    assert held and isinstance(held[0], Reply)
    assert held[0].status == 200 and held[0].body == b"released go"
    assert wd.proc.wait(20) == 0
    events = _events(wd.text())
    order = [e for e in events if e in ("shutdown", "draining", "function_exited", "exit")]
    assert order == ["shutdown", "draining", "function_exited", "exit"], events
    assert "during=stop" in wd.text()  # the function's exit was expected


def test_healthcheck_interval_is_waited_before_the_listener_stops(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="1500ms"))
    wd.wait_ready()
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGTERM)
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started >= 1.4


def test_knative_skips_the_healthcheck_interval_wait(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="60s", K_SERVICE="fn"))
    wd.wait_ready()
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGTERM)
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    assert "skip_wait=knative" in wd.text()


def test_drain_waits_for_in_flight_requests(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(write_timeout="20s"))
    wd.wait_ready()
    held: list[Reply | Exception] = []
    thread = _in_background(wd.url + "/hold?release=late", held)
    wait_until(lambda: upstream.seen("held-late"), what="request in flight")
    wd.proc.send_signal(signal.SIGTERM)
    # The listener closes, but the in-flight request keeps the process alive.
    wait_until(lambda: http_status(wd.url + "/_/health") is None, what="listener closed")
    assert wd.proc.poll() is None
    upstream.signal("late")
    thread.join(20)
    assert held and isinstance(held[0], Reply) and held[0].status == 200
    assert wd.proc.wait(20) == 0


def test_drain_gives_up_after_write_timeout(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(write_timeout="1s", exec_timeout="60s"))
    wd.wait_ready()
    held: list[Reply | Exception] = []
    thread = _in_background(wd.url + "/hold?release=never", held)
    wait_until(lambda: upstream.seen("held-never"), what="request in flight")
    started = time.monotonic()
    wd.proc.send_signal(signal.SIGTERM)
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started < 10
    thread.join(10)
    assert held and isinstance(held[0], Exception)  # cut, not answered


def test_function_exit_during_drain_is_not_an_error(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(healthcheck_interval="30s"))
    wd.wait_ready()
    wd.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, what="draining")
    # The function dies while we wait (e.g. it got the group's SIGTERM too).
    assert fetch(wd.url + "/die?code=3").status == 200
    started = time.monotonic()
    assert wd.proc.wait(20) == 0
    assert time.monotonic() - started < 10  # nothing left to serve: no 30 s wait


def test_sigterm_while_starting_exits_0_without_a_lock(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(UPSTREAM_WAIT_BEFORE_LISTEN="never"))
    wait_until(lambda: http_status(wd.url + "/_/health") == 503, what="listener up")
    wd.proc.send_signal(signal.SIGTERM)
    assert wd.proc.wait(20) == 0
    assert not wd.lock_path.exists()
