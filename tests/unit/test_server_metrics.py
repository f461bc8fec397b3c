"""Metric names, labels and buckets, in a registry of the test's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from fwatchdog.metrics import GO_DEFAULT_BUCKETS, HttpMetrics, method_label


def test_method_label_is_lowercase_and_bounded():
    assert method_label("GET") == "get" and method_label("patch") == "patch"
    assert method_label("PROPFIND") == "unknown" and method_label("X" * 100) == "unknown"


def test_observe_counts_per_code_and_method():
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    metrics.observe("GET", 200, 0.003)
    metrics.observe("GET", 200, 0.2)
    metrics.observe("POST", 429, 0.0)
    get = registry.get_sample_value
    assert get("http_requests_total", {"code": "200", "method": "get"}) == 2
    assert get("http_requests_total", {"code": "429", "method": "post"}) == 1
    assert get("http_request_duration_seconds_bucket",
               {"code": "200", "method": "get", "le": "0.005"}) == 1
    assert get("http_request_duration_seconds_bucket",
               {"code": "200", "method": "get", "le": "0.25"}) == 2
    assert get("http_requests_in_flight") == 0


def test_buckets_are_go_defaults_and_nothing_global():
    registry = CollectorRegistry()
    HttpMetrics(registry).observe("GET", 200, 1)
    text = generate_latest(registry).decode()
    les = [line.split('le="')[1].split('"')[0] for line in text.splitlines()
           if line.startswith("http_request_duration_seconds_bucket")]
    assert les == [repr(float(b)) if b != int(b) or b >= 1 else str(b)
                   for b in GO_DEFAULT_BUCKETS] + ["+Inf"]
    # Two watchdogs in one process do not collide: no default registry.
    HttpMetrics(CollectorRegistry())
