"""The accounting of requests for the function: one object that every front uses.

What it owns: the number of requests in flight (and its gauge), the
``max_inflight`` limit, the request metrics and the access log. The aiohttp
front (:meth:`fwatchdog.server.Watchdog.function`) and the lean front
(:mod:`fwatchdog.modes.http_fast`) both count, limit and record through it, so
a request is counted once and recorded once whichever front served it.

Use: ``started = acct.enter()`` when a request for the function arrives, then
``acct.over_limit()`` (answer 429 when true), ``acct.leave()`` when it ends
(always, in a ``finally``), and ``acct.record(...)`` once with its outcome.

Invariants: ``inflight`` is never negative and equals the number of ``enter``
calls not yet matched by ``leave``; no global state (the registry, stream and
clock are passed in).
"""

from __future__ import annotations

from collections.abc import Callable

from fwatchdog import accesslog
from fwatchdog.metrics import HttpMetrics


class Accounting:
    def __init__(self, *, max_inflight: int, metrics: HttpMetrics, access: accesslog.AccessLog,
                 clock: Callable[[], float]) -> None:
        self.max_inflight = max_inflight
        self.metrics = metrics
        self.access = access
        self.clock = clock
        self.inflight = 0
        self.limit_text = (
            f"Concurrent request limit exceeded. Max concurrent requests: {max_inflight}\n")

    def enter(self) -> float:
        """Count one more request in flight; returns its start on :attr:`clock`."""
        self.inflight += 1
        self.metrics.in_flight.inc()
        return self.clock()

    def leave(self) -> None:
        self.inflight -= 1
        self.metrics.in_flight.dec()

    def over_limit(self) -> bool:
        """The request just counted by :meth:`enter` is one too many: answer 429."""
        limit = self.max_inflight
        return limit > 0 and self.inflight > limit

    def limit_reached(self) -> bool:
        """Another request would be refused (``/_/ready`` answers 429)."""
        limit = self.max_inflight
        return limit > 0 and self.inflight >= limit

    def record(self, method: str, uri: str, status: int, reason: str | None, size: int,
               started: float, user_agent: str | None, call_id: str | None) -> None:
        """Metrics and the access line of one finished request (``started`` from :meth:`enter`)."""
        seconds = self.clock() - started
        self.metrics.observe(method, status, seconds)
        if accesslog.should_log(user_agent):
            self.access.write(method, uri, status, reason, size, seconds, call_id)
