"""The server core: listener, health, readiness, limits, metrics, access log, lifecycle.

Everything that is the same in every mode lives here; the mode only answers
requests for the function (see :mod:`fwatchdog.modes.base`).

Routes on ``port``: ``/_/health`` and ``/_/ready`` (exact paths), every other
path and method to the mode. Metrics on ``metrics_port`` at ``/metrics``.
When the mode offers the lean front capability (``ModeHandler.lean_proxy``,
see :mod:`fwatchdog.modes.base`; http mode does) the port belongs to a lean
protocol-level front (:mod:`fwatchdog.modes.http_fast`) that proxies plain
requests itself and hands every other connection, at a request boundary, to
this aiohttp server; both count, limit and record through one
:class:`~fwatchdog.accounting.Accounting` (:attr:`Watchdog.accounting`).

Start order: metrics listener, listener (health answers 503 meanwhile), the
mode's ``start`` (bounded by ``start_timeout``), then the lock file, then
"accepting". Requests for the function that arrive before the mode has started
wait for it rather than fail.

Shutdown order (:meth:`Watchdog.shutdown`), read top to bottom:
1. stop accepting for health/ready (503) and remove the lock file;
2. keep serving what arrives and what is in flight;
3. wait ``healthcheck_interval`` so load balancers see the 503 (skipped under
   Knative, where queue-proxy drained before sending SIGTERM);
4. stop the listener (and the fast front's);
5. drain in-flight requests for up to ``write_timeout`` (both fronts at once);
6. stop the mode (http: SIGTERM to the function's group, whose exit is then
   expected);
7. exit 0.
SIGINT and SIGHUP start the same shutdown as SIGTERM. A second one of the three
(or SIGQUIT, which also writes the threads' stacks to stderr and exits 2) cuts
it short wherever it is: no more waiting in 3., the connections still in flight
are closed in 5., and the mode stops without its grace in 6. (see
:mod:`fwatchdog.lifecycle` for the table).
If the mode's process dies outside a shutdown (``ctx.fatal``), the watchdog
removes the lock file and exits 1 so the platform restarts the container.

Invariants: signal handlers only record (:class:`~fwatchdog.lifecycle.SignalRecorder`);
no global state (lock path, registry and clock are passed in); the front never
imports torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry

from fwatchdog import accesslog, reaper
from fwatchdog.accounting import Accounting
from fwatchdog.config import Config
from fwatchdog.durations import format_duration
from fwatchdog.errors import reason
from fwatchdog.lifecycle import LockFile, SignalRecorder, State
from fwatchdog.logs import kv
from fwatchdog.metrics import HttpMetrics, metrics_app
from fwatchdog.modes.base import (
    BODY_BYTES_KEY,
    STARTED_RESPONSE_KEY,
    ModeContext,
    ModeHandler,
    StartError,
    load_mode,
)

if TYPE_CHECKING:
    from fwatchdog.modes.http_fast import FastFront

# aiohttp's defaults are 8190 bytes per line and header; of-watchdog (Go) allows
# 1 MiB of headers in all, and large JWTs or cookies are common in front of
# functions. Larger lines are answered 400, more headers 400 as well.
MAX_LINE_SIZE = 64 * 1024
MAX_FIELD_SIZE = 64 * 1024
MAX_HEADERS = 128
LINGERING_TIME = 1.0
# How long a dead function waits for a SIGTERM that may be on its way to us too.
SIGNAL_RACE = 0.5
# While the mode starts (a model loading), a line this often says it still does.
START_PROGRESS_EVERY = 5.0


def _plain(status: int, text: str | None = None) -> web.Response:
    """A response written by the watchdog; an error always carries a text/plain reason."""
    if text is None and status >= 400:
        text = reason(status)
    return web.Response(status=status, text=text)


class Watchdog:
    def __init__(
        self,
        config: Config,
        *,
        log: logging.Logger,
        stdout: TextIO,
        stderr: TextIO,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.perf_counter,
        mode_class: type[ModeHandler] | None = None,
        prespawned: object | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.clock = clock
        self.lock = LockFile(config.lock_path)
        self.state = State()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = HttpMetrics(self.registry)
        self.signals = SignalRecorder(on_quit=self._dump_stacks)
        self.ctx = ModeContext(config=config, log=log, stdout=stdout, stderr=stderr,
                               forced=self.signals.forced, registry=self.registry,
                               prespawned=prespawned)
        self.mode = (mode_class or load_mode(config.mode))(self.ctx)
        self._stderr = stderr
        self.accounting = Accounting(
            max_inflight=config.max_inflight, metrics=self.metrics,
            access=accesslog.AccessLog(stderr, with_call_id=config.log_callid), clock=clock)
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        # The lean front for plain requests, when the mode offers it (modes.base).
        self._fast: FastFront | None = None
        self._fast_server: asyncio.AbstractServer | None = None

    # -- HTTP ----------------------------------------------------------------

    def app(self) -> web.Application:
        # max_body_size=0 means no limit; aiohttp's own default is 1 MiB.
        app = web.Application(client_max_size=self.config.max_body_size or sys.maxsize)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/_/health":
            return self.health(request)
        if path == "/_/ready":
            return await self.ready(request)
        return await self.function(request)

    def healthy(self) -> bool:
        # With suppress_lock there is no lock file to require (a fix: of-watchdog
        # then answers 503 forever).
        return self.state.accepting and (self.config.suppress_lock or self.lock.exists())

    def health(self, request: web.Request) -> web.Response:
        if request.method != "GET":
            return _plain(405)
        return _plain(200, "OK") if self.healthy() else _plain(503)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET":
            return _plain(405)
        if not self.healthy():
            return _plain(503)
        if self.accounting.limit_reached():
            return _plain(429)
        if not await self.mode.ready(request):
            reason = self.mode.unready_reason()
            return _plain(503, f"{reason}\n" if reason else None)
        if self.config.ready_path:
            probe = request.clone(method="GET", rel_url=self.config.ready_path)
            try:
                return await self.mode.handle(probe)
            except Exception as exc:  # a mode bug must not take readiness down with it
                self.log.info(kv("ready_error", error=repr(exc)))
                return _plain(503)
        return _plain(200)

    async def function(self, request: web.Request) -> web.StreamResponse:
        acct = self.accounting
        started = acct.enter()
        resp: web.StreamResponse | None = None
        try:
            resp = await self._answer(request)
            if not resp.prepared:
                # Written here, not after return, so the duration and the byte
                # count include sending the body. aiohttp prepares the returned
                # response once more: a response class whose prepare is not a
                # no-op by then must guard itself (static mode's file response).
                await resp.prepare(request)
                await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; aiohttp closes the connection
        except asyncio.CancelledError:
            # http mode cancels the handler of a client that went away (and
            # shutdown may cancel what is left): still counted and logged, as
            # the forking modes record a disconnect.
            # A stream whose status line went out is recorded with that status
            # (the OpenAI client closes right after `data: [DONE]`, before the
            # last chunk's framing); anything else as a 500.
            self.log.info(kv("client_gone", uri=request.raw_path))
            seen = request.get(STARTED_RESPONSE_KEY)
            if seen is not None:
                status, reason, size = seen.status, seen.reason, seen.get(BODY_BYTES_KEY, 0)
            else:
                status, reason, size = 500, "Internal Server Error", 0
            acct.record(request.method, request.raw_path, status, reason, size, started,
                        request.headers.get("User-Agent"), request.headers.get("X-Call-Id"))
            raise
        except Exception as exc:  # a mode broke its contract: answer, don't die
            self.log.info(kv("handler_error", uri=request.raw_path, error=repr(exc)))
            if resp is None or not resp.prepared:
                resp = _plain(500, "Internal Server Error\n")
        finally:
            acct.leave()
        if resp is None:  # pragma: no cover - only on cancellation
            resp = _plain(500)
        size = resp.content_length
        if size is None:
            size = resp.get(BODY_BYTES_KEY, -1)
        headers = request.headers
        acct.record(request.method, request.raw_path, resp.status, resp.reason, size, started,
                    headers.get("User-Agent"), headers.get("X-Call-Id"))
        return resp

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if self.accounting.over_limit():
            # Never queued: of-watchdog's faas-middleware limiter answers at once.
            resp = _plain(429, self.accounting.limit_text)
            resp.headers["X-OpenFaaS-Internal"] = "faas-middleware"
            return resp
        limit = self.config.max_body_size
        length = request.content_length
        if limit and length is not None and length > limit:
            resp = _plain(413, f"Request body of {length} bytes is larger than "
                               f"max_body_size={limit}\n")
            resp.force_close()
            return resp
        if not self.state.serving.is_set():
            try:
                await asyncio.wait_for(self.state.serving.wait(), self.config.start_timeout)
            except asyncio.TimeoutError:
                return _plain(503, "The function is not ready\n")
        return await self.mode.handle(request)

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGTERM (exit 0) or until the function dies (exit 1)."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        self.signals.install(loop)
        self.log.info(kv("starting", mode=cfg.mode.value, port=cfg.port,
                         metrics_port=cfg.metrics_port,
                         read_timeout=format_duration(cfg.read_timeout),
                         write_timeout=format_duration(cfg.write_timeout),
                         exec_timeout=format_duration(cfg.exec_timeout),
                         healthcheck_interval=format_duration(cfg.healthcheck_interval)))
        reap_task: asyncio.Task[None] | None = None
        try:
            if not await self._listen():
                return 1
            if reaper.needed():
                reap_task = loop.create_task(reaper.Reaper(self.log, self.ctx.children).run())
            outcome = await self._start_mode()
            if outcome is not None:
                return outcome
            if cfg.suppress_lock:
                self.log.info(kv("lock_suppressed",
                                 note="suppress_lock=true: health does not check the lock file"))
            else:
                try:
                    self.lock.write()
                except OSError as exc:
                    self.log.info(kv("lock_failed", path=self.lock.path, error=exc.strerror,
                                     hint="set suppress_lock=true to run without a lock file"))
                    await self._stop_everything()
                    return 1
                self.log.info(kv("lock_written", path=self.lock.path))
            self.state.accepting = True
            self.state.serving.set()
            self.log.info(kv("serving", port=cfg.port))
            why = await self._first(self.signals.event, self.ctx.fatal)
            if why is self.ctx.fatal:
                # A process-group SIGTERM (tini -g, a shell, timeout(1)) reaches the
                # function and us together; its death may be noticed first.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.signals.event.wait(), SIGNAL_RACE)
            if self.signals.event.is_set():
                return await self.shutdown()
            return await self.fail()
        finally:
            if reap_task is not None:
                reap_task.cancel()
            self.signals.uninstall(loop)

    async def _listen(self) -> bool:
        cfg = self.config
        self._metrics_runner = web.AppRunner(metrics_app(self.registry), access_log=None,
                                             handle_signals=False)
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False,
            shutdown_timeout=cfg.write_timeout,
            # An idle or half-sent connection is closed after read_timeout (Go
            # uses ReadTimeout as the idle timeout too); this bounds slow headers.
            keepalive_timeout=cfg.keepalive_timeout,
            max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE, max_headers=MAX_HEADERS,
            # After an early answer (413, 408) the unread rest of a body is read
            # and dropped for this long before closing; aiohttp's 10 s lets one
            # slow client hold a connection long after its answer.
            lingering_time=LINGERING_TIME,
            # A proxying mode (http, llm): a client that goes away cancels its
            # handler, and with it the upstream call, as of-watchdog's request
            # context does. The forking modes keep aiohttp's default: their
            # DisconnectWatch kills the child and the request is still recorded.
            handler_cancellation=self.mode.cancel_on_disconnect,
        )
        for runner, port, name in ((self._metrics_runner, cfg.metrics_port, "metrics"),
                                   (self._runner, cfg.port, "http")):
            await runner.setup()
            try:
                if runner is self._runner:
                    await self._listen_serving(runner, port)
                else:
                    await web.TCPSite(runner, port=port, reuse_address=True).start()
            except OSError as exc:
                self.log.info(kv("listen_failed", listener=name, port=port, error=exc.strerror))
                await self._stop_everything()
                return False
        self.log.info(kv("listening", port=cfg.port, metrics_port=cfg.metrics_port))
        return True

    async def _listen_serving(self, runner: web.AppRunner, port: int) -> None:
        """The serving port: the lean front when the mode offers it, else aiohttp's site."""
        proxy = self.mode.lean_proxy()
        if proxy is None or runner.server is None:
            await web.TCPSite(runner, port=port, reuse_address=True).start()
            return
        from fwatchdog.modes.http_fast import FastFront

        self._fast = FastFront(self.accounting, proxy, runner.server, config=self.config,
                               log=self.log, serving=self.state.serving)
        # Like TCPSite: every interface, SO_REUSEADDR, aiohttp's backlog.
        self._fast_server = await asyncio.get_running_loop().create_server(
            self._fast.connection, port=port, reuse_address=True, backlog=128)

    async def _start_mode(self) -> int | None:
        """Start the mode; an exit code when the watchdog must not serve."""
        start = asyncio.ensure_future(self.mode.start())
        # The mode enforces start_timeout with its own message; this is a backstop.
        backstop = asyncio.ensure_future(asyncio.sleep(self.config.start_timeout + 5.0))
        stop_wait = asyncio.ensure_future(self.signals.event.wait())
        progress = asyncio.ensure_future(self._starting_progress())
        try:
            await asyncio.wait({start, backstop, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            backstop.cancel()
            stop_wait.cancel()
            progress.cancel()
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
            if self.signals.received is None:
                self.log.info(kv("start_failed", error=f"mode {self.config.mode.value} did not "
                                 f"start within start_timeout="
                                 f"{format_duration(self.config.start_timeout)}"))
                await self._stop_everything()
                return 1
            self.log.info(kv("shutdown", signal=self.signals.received.name, phase="starting"))
            await self._stop_everything()
            return self._exit_code()
        exc = start.exception()
        if exc is not None:
            message = str(exc) if isinstance(exc, StartError) else repr(exc)
            self.log.info(kv("start_failed", error=message))
            await self._stop_everything()
            return 1
        return None

    async def _starting_progress(self) -> None:
        """One ``still_starting`` line every few seconds until cancelled: a start that
        loads a model takes a while, and a silent terminal looks like a hang."""
        began = self.clock()
        limit = format_duration(self.config.start_timeout)
        while True:
            await asyncio.sleep(START_PROGRESS_EVERY)
            self.log.info(kv("still_starting", mode=self.config.mode.value,
                             seconds=f"{self.clock() - began:.0f}", start_timeout=limit))

    def _dump_stacks(self) -> None:
        """SIGQUIT: every thread's stack to stderr (what a Go program prints)."""
        self.log.info(kv("sigquit", action="stacks to stderr, then stop without draining"))
        with contextlib.suppress(Exception):  # stderr without a file descriptor
            faulthandler.dump_traceback(file=self._stderr, all_threads=True)

    def _exit_code(self) -> int:
        return 2 if self.signals.quit else 0

    async def shutdown(self) -> int:
        """SIGTERM: the drain order of the module docstring, top to bottom."""
        cfg = self.config
        signals = self.signals
        sig = signals.received or signal.SIGTERM
        # 1. unready, lock file gone
        self.state.accepting = False
        self.state.draining = True
        self.lock.remove()
        wait = cfg.healthcheck_interval
        skip = "knative" if cfg.knative else ("forced" if signals.forced.is_set() else "")
        self.log.info(kv("shutdown", signal=sig.name, inflight=self.accounting.inflight,
                         wait=format_duration(0 if skip else wait), skip_wait=skip or "no"))
        # 2. keep serving: the listener stays open while we wait.
        # 3. wait for load balancers to notice; a dead function leaves nothing to
        #    serve, and a second signal means now.
        if not skip and wait > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._first(self.ctx.fatal, signals.forced), wait)
        # 4. + 5. stop the listener, drain in-flight requests up to write_timeout
        self.log.info(kv("draining", inflight=self.accounting.inflight,
                         timeout=format_duration(cfg.write_timeout)))
        await self._drain()
        # 6. stop the mode: its processes ending now is expected, not an error
        await self.mode.stop()
        await self._stop_metrics()
        # 7.
        code = self._exit_code()
        self.log.info(kv("exit", code=code, inflight=self.accounting.inflight,
                         forced=signals.forced.is_set()))
        return code

    async def _drain(self) -> None:
        """Stop the listeners and drain; a second signal cuts what is still in flight."""
        fast = self._fast
        runner = self._runner
        drain = asyncio.ensure_future(self._stop_listener())
        forced = asyncio.ensure_future(self.signals.forced.wait())
        try:
            await asyncio.wait({drain, forced}, return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                self.log.info(kv("shutdown_forced", inflight=self.accounting.inflight))
                if fast is not None:
                    for conn in list(fast.connections):
                        conn.abort()
                if runner is not None and runner.server is not None:
                    for handler in runner.server.connections:
                        handler.force_close()
            await drain
        finally:
            forced.cancel()

    async def fail(self) -> int:
        """The function's process died while serving: exit 1 so it is restarted."""
        self.state.accepting = False
        self.lock.remove()
        self.log.info(kv("function_died", action="exiting 1 so the platform restarts it"))
        await self._stop_everything()
        self.log.info(kv("exit", code=1))
        return 1

    async def _stop_listener(self) -> None:
        fast, self._fast = self._fast, None
        if self._fast_server is not None:
            self._fast_server.close()  # no new connections from here on
            self._fast_server = None
        drains = []
        if fast is not None:
            drains.append(fast.shutdown(self.config.write_timeout))
        if self._runner is not None and self._runner.server is not None:
            # Also drains the connections the fast front handed over.
            drains.append(self._runner.cleanup())
            self._runner = None
        await asyncio.gather(*drains)

    async def _stop_metrics(self) -> None:
        if self._metrics_runner is not None and self._metrics_runner.server is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None

    async def _stop_everything(self) -> None:
        await self._stop_listener()
        await self.mode.stop()
        await self._stop_metrics()

    @staticmethod
    async def _first(*events: asyncio.Event) -> asyncio.Event:
        waits = {asyncio.ensure_future(e.wait()): e for e in events}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        return waits[next(iter(done))]


async def serve(config: Config, *, log: logging.Logger, stdout: TextIO, stderr: TextIO,
                prespawned: object | None = None) -> int:
    return await Watchdog(config, log=log, stdout=stdout, stderr=stderr,
                          prespawned=prespawned).run()
