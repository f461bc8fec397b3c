"""/_/health, /_/ready, max_inflight and the listening port (docs/contract.md, endpoints)."""

from __future__ import annotations

import threading

from tests.conftest import Reply, fetch, free_port, http_status, wait_until


def test_health_is_get_only_and_says_ok(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    reply = fetch(wd.url + "/_/health")
    assert reply.status == 200 and reply.body == b"OK"
    for method in ("POST", "PUT", "DELETE", "HEAD"):
        assert fetch(wd.url + "/_/health", method).status == 405, method


def test_health_requires_the_lock_file(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    wd.lock_path.unlink()
    assert http_status(wd.url + "/_/health") == 503
    assert http_status(wd.url + "/_/ready") == 503
    # Every error the watchdog writes itself says why, in text/plain.
    reply = fetch(wd.url + "/_/ready")
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.body == b"The function is not ready\n"


def test_suppress_lock_writes_none_and_health_does_not_need_it(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(suppress_lock="true"))
    wd.wait_ready()  # 200 without a lock file: of-watchdog would say 503 forever
    assert not wd.lock_path.exists()
    assert http_status(wd.url + "/_/ready") == 200


def test_ready_is_200_empty_by_default(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    reply = fetch(wd.url + "/_/ready")
    assert reply.status == 200 and reply.body == b""
    assert fetch(wd.url + "/_/ready", "POST").status == 405


def test_ready_path_relays_the_functions_answer(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(ready_path="/ready"))
    wd.wait_ready()
    reply = fetch(wd.url + "/_/ready")
    assert reply.status == 200 and reply.body == b"function ready answer"
    (upstream.signals / "ready-status").write_text("503")
    assert fetch(wd.url + "/_/ready").status == 503


def _hold(wd, name: str, out: list[Reply]) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: out.append(fetch(wd.url + f"/hold?release={name}", timeout=30)),
        daemon=True)
    thread.start()
    return thread


def test_max_inflight_answers_429_at_once_and_ready_says_429(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(max_inflight="1"))
    wd.wait_ready()
    held: list[Reply] = []
    thread = _hold(wd, "one", held)
    wait_until(lambda: upstream.seen("held-one"), what="first request in flight")
    reply = fetch(wd.url + "/echo", timeout=5)
    assert reply.status == 429
    assert reply.body == b"Concurrent request limit exceeded. Max concurrent requests: 1\n"
    assert reply.header("X-OpenFaaS-Internal") == "faas-middleware"
    assert http_status(wd.url + "/_/ready") == 429
    assert http_status(wd.url + "/_/health") == 200  # health ignores the limit
    upstream.signal("one")
    thread.join(20)
    assert held[0].status == 200
    assert fetch(wd.url + "/echo").status == 200
    assert http_status(wd.url + "/_/ready") == 200


def test_knative_port_is_used_when_port_is_unset(watchdog_factory, upstream):
    knative_port = free_port()
    wd = watchdog_factory(upstream.env(PORT=str(knative_port)), unset=("port",))
    assert wd.port == knative_port
    wd.wait_ready()
    assert fetch(f"http://127.0.0.1:{knative_port}/echo").status == 200


def test_port_wins_over_knative_port(watchdog_factory, upstream):
    other = free_port()
    wd = watchdog_factory(upstream.env(PORT=str(other)))
    wd.wait_ready()  # on `port`
    assert http_status(f"http://127.0.0.1:{other}/_/health") is None
