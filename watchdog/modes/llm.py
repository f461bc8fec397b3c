"""mode=llm: warm-started LLM functions behind the same front as http mode.

:class:`LlmMode` runs the runtime of :mod:`fwatchdog.llm` (holder, zygote, forked
handler processes; :class:`~fwatchdog.llm.runtime.Runtime` is its supervisor) and
proxies every request for the function to a warm handler over that handler's Unix
socket, with http mode's relay rules (:meth:`HttpMode.forward`): headers copied,
``exec_timeout`` shortened by ``X-Timeout``, 502 when the handler dies before its
answer and a visible cut after; a stream that was server-sent events ends with an
``error`` event before the cut, so an OpenAI client sees why.

:meth:`start` returns as soon as the runtime's processes are spawned: health is
200 while they import and load, and readiness (:meth:`ready`) is 200 only once a
warm handler exists (or while the GPU is released on idle and can be woken). A
request that comes earlier waits for a handler until its own deadline
(``exec_timeout``/``X-Timeout``, else ``start_timeout``); one that comes while the
function keeps failing to start gets 503 with the reason at once.

Invariants: nothing here imports torch; a lease taken for a request is given back
exactly once, whatever happens to the request.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from fwatchdog.llm.metrics import LlmMetrics
from fwatchdog.llm.runtime import NotReady, Runtime
from fwatchdog.llm.spawn import Early
from fwatchdog.modes.base import STARTED_RESPONSE_KEY, ModeContext
from fwatchdog.modes.http import INTERNAL, HttpMode
from fwatchdog.upstream import ConnectFailed

# Placeholder origin for http mode's machinery: requests go to Unix sockets, and the
# client's Host header is passed on unchanged.
ORIGIN = "http://localhost"


class LlmMode(HttpMode):
    # A handler process that dies before its answer is a bad gateway, not the
    # function's own error (of-watchdog's http mode says 500).
    upstream_failed_status = 502

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx, upstream_url=ORIGIN)
        names: dict[str, Runtime] = {}
        metrics = None
        if ctx.registry is not None:
            metrics = LlmMetrics(ctx.registry, lambda: names["runtime"].process_names())
        self.metrics = metrics
        early = ctx.prespawned if isinstance(ctx.prespawned, Early) else None
        self.runtime: Runtime = Runtime(ctx.config, log=ctx.log, metrics=metrics,
                                        stdout=ctx.stdout, stderr=ctx.stderr,
                                        children=ctx.children, early=early)
        names["runtime"] = self.runtime

    async def start(self) -> None:
        await self.runtime.start()

    async def stop(self) -> None:
        await self.runtime.stop()

    async def ready(self, request: web.Request) -> bool:
        return self.runtime.ready()

    def unready_reason(self) -> str:
        return self.runtime.unready_reason()

    def stream_error_event(self, content_type: str) -> bytes | None:
        if content_type.split(";")[0].strip().lower() != "text/event-stream":
            return None
        error = {"error": {"message": "the function's handler failed while streaming",
                           "type": "server_error", "code": "handler_failed"}}
        return f"event: error\ndata: {json.dumps(error)}\n\n".encode()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        limit = self._limit_for(request)
        wait = limit or self.ctx.config.start_timeout
        deadline = self.runtime.clock() + wait
        while True:
            try:
                h = await self.runtime.lease(deadline)
            except NotReady as exc:
                self._count("unavailable")
                resp = web.Response(status=503, text=f"{exc}\n")
                resp.headers[INTERNAL] = "of-watchdog"
                resp.headers["Retry-After"] = "1"
                return resp
            assert h.pool is not None
            try:
                await h.pool.prime()
                break
            except ConnectFailed as exc:
                # Dead a moment ago, its end not yet seen: nothing was sent, try another.
                self.runtime.done(h)
                self.runtime.lost(h, str(exc))
        waited = time.perf_counter() - started
        timed_out = False
        outcome = "ok"
        try:
            resp = await self.forward(request, h.pool)
            elapsed = time.perf_counter() - started
            if limit and elapsed - waited >= limit * 0.999 and (
                    resp.status == 504 or request.get(STARTED_RESPONSE_KEY) is not None):
                timed_out = True
            if resp.status == 504 and resp.headers.get(INTERNAL):
                timed_out = True
            if timed_out:
                outcome = "timeout"
            elif resp.status >= 500:
                outcome = "crashed" if h.gone or resp.headers.get(INTERNAL) else "error"
            return resp
        except asyncio.CancelledError:
            outcome = "client_gone"
            raise
        finally:
            self._count(outcome)
            self.runtime.done(h, timed_out=timed_out)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()
