"""Prometheus metrics of the function's HTTP traffic, named as of-watchdog names them.

Names, labels and help texts follow of-watchdog 0.11 (``metrics/http.go``):
``http_requests_total{code,method}``, ``http_request_duration_seconds{code,method}``
(Go's default buckets) and ``http_requests_in_flight``. ``method`` is lowercase
and, as in Go's ``promhttp``, anything outside the standard methods is
``unknown``, so a client cannot grow the label set without bound.

Invariants: everything lives in the :class:`~prometheus_client.CollectorRegistry`
passed in (never the global default registry); only requests for the function
are recorded (the server core never calls :meth:`HttpMetrics.observe` for
``/_/health`` or ``/_/ready``).
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# prometheus.DefBuckets of client_golang (Python's default set differs).
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_METHODS = {
    m: m.lower()
    for m in ("GET", "PUT", "HEAD", "POST", "DELETE", "CONNECT", "OPTIONS", "NOTIFY",
              "TRACE", "PATCH")
}


def method_label(method: str) -> str:
    return _METHODS.get(method.upper(), "unknown")


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests_total = Counter(
            "http_requests_total", "total HTTP requests processed", ("code", "method"),
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds", "Seconds spent serving HTTP requests.",
            ("code", "method"), buckets=GO_DEFAULT_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight", "total HTTP requests in-flight", registry=registry,
        )

        # Label children cached per (code, method): ``labels()`` takes a lock and
        # builds a key on every call, and this runs once per request.
        self._children: dict[tuple[int, str], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, code: int, seconds: float) -> None:
        key = (code, method)
        children = self._children.get(key)
        if children is None:
            labels = (str(code), method_label(method))
            children = (self.requests_total.labels(*labels), self.duration.labels(*labels))
            if len(self._children) < 1024:  # bounded: methods outside the set share "unknown"
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """The metrics listener: ``GET /metrics`` in the Prometheus text format."""

    async def handle(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/metrics", handle)
    return app
