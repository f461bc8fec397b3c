"""Metrics on metrics_port (docs/contract.md, endpoints): of-watchdog's names and labels."""

from __future__ import annotations

import re
import threading

from tests.conftest import Reply, fetch, wait_until

GO_BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0",
              "10.0", "+Inf"]


def _metrics(wd) -> str:
    reply = fetch(f"http://127.0.0.1:{wd.metrics_port}/metrics")
    assert reply.status == 200
    assert (reply.header("Content-Type") or "").startswith("text/plain")
    return reply.body.decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if got == labels:
            return float(match.group(3))
    return None


def test_names_help_and_labels_match_of_watchdog(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    assert fetch(wd.url + "/echo").status == 200
    assert fetch(wd.url + "/echo", "POST", body=b"x").status == 200
    assert fetch(wd.url + "/status/404").status == 404
    text = _metrics(wd)
    assert "# HELP http_requests_total total HTTP requests processed" in text
    assert "# TYPE http_requests_total counter" in text
    assert "# HELP http_request_duration_seconds Seconds spent serving HTTP requests." in text
    assert "# TYPE http_request_duration_seconds histogram" in text
    assert "# HELP http_requests_in_flight total HTTP requests in-flight" in text
    assert "# TYPE http_requests_in_flight gauge" in text
    assert _sample(text, "http_requests_total", code="200", method="get") == 1
    assert _sample(text, "http_requests_total", code="200", method="post") == 1
    assert _sample(text, "http_requests_total", code="404", method="get") == 1
    assert _sample(text, "http_request_duration_seconds_count", code="200", method="get") == 1
    buckets = re.findall(r'http_request_duration_seconds_bucket\{code="200",le="([^"]+)",'
                         r'method="get"\}', text)
    assert buckets == GO_BUCKETS
    assert _sample(text, "http_requests_in_flight") == 0


def test_health_ready_are_not_counted_429_and_odd_methods_are(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(max_inflight="1"))
    wd.wait_ready()
    for _ in range(3):
        fetch(wd.url + "/_/health")
        fetch(wd.url + "/_/ready")
    held: list[Reply] = []
    thread = threading.Thread(target=lambda: held.append(fetch(wd.url + "/hold?release=m")),
                              daemon=True)
    thread.start()
    wait_until(lambda: upstream.seen("held-m"), what="request in flight")
    assert _sample(_metrics(wd), "http_requests_in_flight") == 1
    assert fetch(wd.url + "/echo").status == 429
    upstream.signal("m")
    thread.join(20)
    assert fetch(wd.url + "/echo", "PROPFIND").status == 200
    text = _metrics(wd)
    assert _sample(text, "http_requests_total", code="429", method="get") == 1
    assert _sample(text, "http_requests_total", code="200", method="get") == 1
    assert _sample(text, "http_requests_total", code="200", method="unknown") == 1
    total = sum(float(v) for v in re.findall(r"^http_requests_total\{.*\} (\S+)$", text, re.M))
    assert total == 3  # no health or ready probe among them
    assert _sample(text, "http_requests_in_flight") == 0


def test_only_metrics_path_is_served(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    assert fetch(f"http://127.0.0.1:{wd.metrics_port}/other").status == 404
