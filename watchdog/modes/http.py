"""mode=http: one long-lived function process, every request proxied to it.

Start: ``fprocess`` runs once (stdin a pipe that is never written, as in
of-watchdog; stdout and stderr forwarded line by line). :meth:`HttpMode.start`
returns only once ``upstream_url``'s host and port accept TCP connections, so
the lock file is never written before the function can answer (of-watchdog
writes it at once and early requests fail with 500). If the process exits first,
or nothing listens within ``start_timeout``, start fails with "upstream never
started" and the watchdog exits non-zero.

Requests: ``upstream_url`` + the request URI (path and raw query, unchanged),
headers copied except hop-by-hop ones (Host kept, see
:mod:`fwatchdog.proxyheaders`); the response is parsed strictly
(:mod:`fwatchdog.upstream`) and relayed by the rules of :mod:`fwatchdog.relay`
(status, headers less hop-by-hop and framing, the body framed by the
watchdog, plus ``X-Duration-Seconds``, the time to the upstream's response
headers).
- cannot connect / upstream fails before answering: 500 with
  ``X-OpenFaaS-Internal: of-watchdog`` (502 for streamed requests, where
  of-watchdog answers an empty 200);
- a malformed response (invalid or conflicting framing, a bad header line, an
  unsupported Transfer-Encoding): 502, same header, before any byte reaches
  the client;
- ``exec_timeout`` (shortened, never lengthened, by ``X-Timeout``) reached
  before the response is complete: 504, same header; for a response already
  being streamed the connection is cut so the client sees it truncated;
- the client goes away (closes its end) before the response is complete: the
  upstream call is cancelled and its connection closed, as of-watchdog's
  request context does; the request is recorded as a 500 (``client_gone``), or
  with the status already sent when a streamed response had started;
- the request body is read within ``read_timeout`` of the request's start
  (408 otherwise; ``read_timeout=0``: no deadline) and within ``max_body_size``
  (413).
Requests asking for ``text/event-stream``, ``application/x-ndjson`` or a
WebSocket upgrade are streamed through, each chunk (or message) forwarded as it
arrives. Other responses up to 1 MiB with a known length are read whole and
written at once (one write, the common case); larger ones are streamed too.

The process leads its own process group (as the forking modes' children do),
so an ``sh -c`` wrapper and the workers a function forks are stopped with it:
if it exits, ``ctx.fatal`` is set and the server exits non-zero, unless the
server is shutting down. :meth:`stop` sends SIGTERM to the whole group, waits
up to ``min(STOP_GRACE, write_timeout)`` for every member to exit, then sends
SIGKILL to whatever is left of the group.

Requests travel over :class:`fwatchdog.upstream.Pool`, a lean keep-alive
HTTP/1.1 client (aiohttp's general client cost more than the function's own
answer on loopback); WebSocket upgrades go through one aiohttp session.

Plain requests never reach :meth:`HttpMode.handle`: the mode offers the lean
front capability (:meth:`lean_proxy`, see :mod:`fwatchdog.modes.base`), the
server's lean front (:mod:`fwatchdog.modes.http_fast`) proxies them itself
through it, and hands everything else to the aiohttp server, which calls
:meth:`handle`. Another mode that proxies (mode=llm) reuses this class's
aiohttp path through :meth:`forward` (one given pool) or :meth:`proxy` (an
``acquire`` function, as the capability's).

Invariants: one pool for the mode's life (connections to the upstream are
reused); nothing decompresses or re-encodes a body; the
client gets either the upstream's complete response, a watchdog error status
marked ``X-OpenFaaS-Internal``, or a visibly cut connection, never a complete-
looking truncated body.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict
from yarl import URL

from fwatchdog.durations import format_duration, parse_duration
from fwatchdog.errors import reason, timeout_reason
from fwatchdog.logpump import pump
from fwatchdog.logs import kv
from fwatchdog.modes.base import (
    BODY_BYTES_KEY,
    STARTED_RESPONSE_KEY,
    LeanProxy,
    Lease,
    ModeContext,
    ModeHandler,
    Outcome,
    StartError,
    Unavailable,
)
from fwatchdog.proxyheaders import to_upstream, wants_stream
from fwatchdog.relay import (
    INTERNAL,
    WHOLE_REQUEST_LIMIT,
    WHOLE_RESPONSE_LIMIT,
    Plan,
    phrase,
    plan,
)
from fwatchdog.upstream import Body, MalformedResponse, Pool, Response, UpstreamError

if sys.version_info >= (3, 11):
    from asyncio import timeout_at
else:  # pragma: no cover - aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout_at

__all__ = ["INTERNAL", "WHOLE_REQUEST_LIMIT", "WHOLE_RESPONSE_LIMIT", "HttpMode"]

_RELAY_ERRORS = (UpstreamError, OSError, asyncio.IncompleteReadError)
STOP_GRACE = 10.0  # at most this long between SIGTERM and SIGKILL for the function
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
# WebSocket handshake headers the client library writes itself.
_WS_OWN = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                     "sec-websocket-protocol"})


class _VerbatimStream(web.StreamResponse):
    """A relayed response: aiohttp adds no Content-Type or Server the upstream left out."""

    async def _prepare_headers(self) -> None:
        had_type = "Content-Type" in self._headers
        had_server = "Server" in self._headers
        await super()._prepare_headers()
        if not had_type:
            self._headers.popall("Content-Type", None)
        if not had_server:
            self._headers.popall("Server", None)


class _Verbatim(web.Response, _VerbatimStream):
    """The same for a response read whole (web.Response's body handling first)."""


class _BodyError(Exception):
    """The client's body broke a limit; ``status`` is the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _internal(status: int, started: float, text: str = "") -> web.Response:
    # _Verbatim: no Server header, as on the lean front (one answer on both paths).
    resp = _Verbatim(status=status, text=text or reason(status))
    resp.headers["X-Duration-Seconds"] = f"{time.perf_counter() - started:f}"
    resp.headers[INTERNAL] = "of-watchdog"
    return resp


def _noop(outcome: Outcome) -> None:
    pass


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal every process of a group; False when none is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a member changed user
        return True
    return True


def _group_alive(pgid: int) -> bool:
    """True while a process of the group runs (zombies waiting to be reaped do not count)."""
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - no procfs: ask the kernel instead
        return _signal_group(pgid, 0)
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


class HttpMode(ModeHandler):
    cancel_on_disconnect = True  # a client that leaves cancels its upstream call
    # The answer when the function fails before its response head: of-watchdog's 500.
    upstream_failed_status = 500

    def __init__(self, ctx: ModeContext, upstream_url: str | None = None) -> None:
        """``upstream_url`` overrides the configured one (mode=llm proxies to Unix
        sockets through :meth:`forward` and passes a placeholder origin)."""
        super().__init__(ctx)
        cfg = ctx.config
        base = upstream_url or cfg.upstream_url
        assert base is not None  # config guarantees it in mode=http
        self._base = base
        parts = urlsplit(self._base)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._exec_timeout = cfg.exec_timeout
        # scheme://host:port, and the path prefix every request target gets.
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._prefix = parts.path.rstrip("/")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._pool: Pool | None = None
        self._lease: Lease | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Task[int] | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # -- the process -------------------------------------------------------

    async def start(self) -> None:
        cfg = self.ctx.config
        loop = asyncio.get_running_loop()
        self.ctx.log.info(kv("function_starting", command=" ".join(cfg.fprocess),
                             upstream=self._base))
        try:
            proc = await asyncio.create_subprocess_exec(
                *cfg.fprocess, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                # Its own process group: stop() reaches a wrapper's children too.
                start_new_session=True,
            )
        except OSError as exc:
            raise StartError(f"upstream never started: cannot run fprocess "
                             f"{cfg.fprocess[0]!r}: {exc.strerror or exc}") from exc
        self._proc = proc
        self.ctx.children.add(proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        self._pumps = [
            loop.create_task(pump(proc.stdout, "stdout", self.ctx.stdout,
                                  prefix=cfg.prefix_logs, limit=cfg.log_buffer_size)),
            loop.create_task(pump(proc.stderr, "stderr", self.ctx.stderr,
                                  prefix=cfg.prefix_logs, limit=cfg.log_buffer_size)),
        ]
        self._exited = loop.create_task(self._watch(proc))
        # Idle connections are dropped after 1 s: shorter than common upstream
        # idle timeouts (gunicorn 2 s), so a pooled one is rarely being closed.
        self._pool = Pool(self._host, self._port, idle_timeout=1.0, tls=self._tls)
        self._lease = Lease(self._pool, _noop)
        # WebSockets only: the upgrade handshake and frames are aiohttp's job.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self._wait_listening(loop.time() + cfg.start_timeout)
        self.ctx.log.info(kv("upstream_ready", pid=proc.pid, upstream=self._base))

    async def _watch(self, proc: asyncio.subprocess.Process) -> int:
        code = await proc.wait()
        self.ctx.children.discard(proc.pid)
        if self._stopping:
            self.ctx.log.info(kv("function_exited", pid=proc.pid, code=code, during="stop"))
        else:
            self.ctx.log.info(kv("function_exited", pid=proc.pid, code=code))
            self.ctx.fatal.set()
        return code

    async def _wait_listening(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        assert self._exited is not None
        delay = 0.005
        while True:
            if self._exited.done():
                raise StartError(
                    f"upstream never started: the function process exited with code "
                    f"{self._exited.result()} before accepting connections on "
                    f"{self._host}:{self._port}")
            try:
                async with timeout_at(min(deadline, loop.time() + 1.0)):
                    _, writer = await asyncio.open_connection(self._host, self._port)
                writer.close()
                return
            except (OSError, asyncio.TimeoutError):
                pass
            if loop.time() >= deadline:
                raise StartError(
                    f"upstream never started: nothing accepted connections on "
                    f"{self._host}:{self._port} within start_timeout="
                    f"{format_duration(self.ctx.config.start_timeout)}")
            # Wake at once if the process exits while we wait.
            await asyncio.wait([self._exited], timeout=delay)
            delay = min(delay * 2, 0.1)

    async def stop(self) -> None:
        self._stopping = True
        proc = self._proc
        if proc is not None:
            await self._stop_group(proc)
        if self._pumps:
            # A grandchild holding the pipes open must not hold up the exit.
            _, pending = await asyncio.wait(self._pumps, timeout=1.0)
            for task in pending:
                task.cancel()
            self._pumps = []
        if self._pool is not None:
            self._pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _stop_group(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the function's group, then SIGKILL to whatever outlives the grace."""
        loop = asyncio.get_running_loop()
        grace = min(STOP_GRACE, self.ctx.config.write_timeout)
        deadline = loop.time() + grace
        pgid = proc.pid  # start_new_session: the function leads its group
        if not _signal_group(pgid, signal.SIGTERM) and proc.returncode is not None:
            return  # nobody left in the group
        forced = self.ctx.forced
        exited = asyncio.ensure_future(self._wait_exit())
        hurry = asyncio.ensure_future(forced.wait())
        try:
            await asyncio.wait({exited, hurry}, timeout=grace,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            hurry.cancel()
            exited.cancel()
        # The leader is gone (or out of time); its group may not be (an sh -c
        # wrapper exits at once while the function it started shuts down).
        delay = 0.01
        while not forced.is_set() and _group_alive(pgid) and loop.time() < deadline:
            await asyncio.sleep(delay)  # polling the kernel: no event says "group empty"
            delay = min(delay * 2, 0.1)
        if proc.returncode is None or _group_alive(pgid):
            why = "shutdown cut short" if forced.is_set() else f"no exit {grace:g}s after SIGTERM"
            self.ctx.log.info(kv("function_killed", pid=proc.pid, reason=why))
            _signal_group(pgid, signal.SIGKILL)
            await self._wait_exit()

    async def _wait_exit(self) -> None:
        if self._exited is not None:
            await asyncio.wait([self._exited])
        elif self._proc is not None:
            await self._proc.wait()

    # -- requests ----------------------------------------------------------

    @property
    def pool(self) -> Pool | None:
        """The keep-alive pool to the function; None until :meth:`start`."""
        return self._pool

    def lean_proxy(self) -> LeanProxy | None:
        if type(self).handle is not HttpMode.handle:
            # A subclass that answers through its own handle (mode=llm) would be
            # bypassed by the lean front: it offers its own capability, or none.
            return None
        return LeanProxy(acquire=self._acquire, limit_for=self.limit_for,
                         target_for=self.target_for,
                         upstream_failed_status=self.upstream_failed_status)

    async def _acquire(self) -> Lease:
        if self._lease is None:
            raise Unavailable("function not started")
        return self._lease

    def _limit_for(self, request: web.Request) -> float:
        return self.limit_for(request.headers.get("X-Timeout"))

    def limit_for(self, header: str | None) -> float:
        """exec_timeout, shortened (never lengthened, never removed) by X-Timeout; 0 = none."""
        limit = self._exec_timeout
        if header:
            try:
                wanted = parse_duration(header)
            except ValueError:
                wanted = 0.0
            if wanted > 0 and (limit == 0 or wanted < limit):
                return wanted
        return limit

    def stream_error_event(self, content_type: str) -> bytes | None:
        """Bytes written to a stream the upstream broke off, before the cut; None here."""
        return None

    def _target(self, request: web.Request) -> str:
        raw = request.raw_path
        if not raw.startswith("/"):  # absolute-form request target
            raw = request.rel_url.raw_path_qs
        return self.target_for(raw)

    def target_for(self, raw: str) -> str:
        """The upstream request target for an origin-form client target (``/path?query``)."""
        return self._prefix + raw

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy(request, self._acquire)

    async def forward(self, request: web.Request, pool: Pool | None) -> web.StreamResponse:
        """Proxy one request to the upstream behind ``pool`` (mode=llm passes a handler's)."""
        if pool is None:
            return _internal(503, time.perf_counter(), "function not started")
        lease = Lease(pool, _noop)

        async def acquire() -> Lease:
            return lease

        return await self.proxy(request, acquire)

    async def proxy(self, request: web.Request,
                    acquire: Callable[[], Awaitable[Lease]]) -> web.StreamResponse:
        """Proxy one request to the upstream ``acquire`` picks, under the request's
        deadline; the lease is released once with the outcome (see ``modes.base``)."""
        holder: list[Lease] = []
        outcome: Outcome = "error"
        try:
            outcome, resp = await self._proxy(request, acquire, holder)
            return resp
        except asyncio.CancelledError:
            outcome = "client_gone"
            raise
        finally:
            if holder:
                holder[0].release(outcome)

    async def _proxy(self, request: web.Request, acquire: Callable[[], Awaitable[Lease]],
                     holder: list[Lease]) -> tuple[Outcome, web.StreamResponse]:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        headers = request.headers
        upgrade = headers.get("Upgrade", "")
        stream = wants_stream(headers.get("Accept", ""), upgrade)
        if stream and upgrade.lower() == "websocket":
            return "ok", await self._websocket(request, started)
        seconds = self._limit_for(request)
        deadline = loop.time() + seconds if seconds else None
        out_headers = to_upstream(headers.items())
        data: Body = None
        if request.body_exists:
            limit = self.ctx.config.read_limit
            read_deadline = loop.time() + limit if limit is not None else None
            length = request.content_length
            if self.ctx.config.buffer_http or (length is not None
                                               and length <= WHOLE_REQUEST_LIMIT):
                # Buffered: sent with a Content-Length, never chunked (a fix).
                try:
                    data = await self._read_whole(request, read_deadline)
                except _BodyError as exc:
                    return "error", self._body_error(exc, started)
            else:
                data = self._body_chunks(request, read_deadline)
        try:
            async with timeout_at(deadline):
                lease = await acquire()
                holder.append(lease)
                upstream = await lease.pool.request(request.method, self._target(request),
                                                    out_headers, data)
                relay = plan(request.method, upstream, started, stream)
                if relay.empty or relay.whole:
                    # The common case, read under the same deadline: one timer, not two.
                    return await self._relay_whole(request, upstream, relay, started)
        except _BodyError as exc:
            return "error", self._body_error(exc, started)
        except asyncio.TimeoutError:
            self.ctx.log.info(kv("upstream_timeout", uri=request.raw_path,
                                 exec_timeout=format_duration(seconds)))
            return "timeout", _internal(504, started, timeout_reason(seconds))
        except Unavailable as exc:
            return "error", _internal(503, started, f"{exc}\n")
        except MalformedResponse as exc:
            self.ctx.log.info(kv("upstream_malformed", uri=request.raw_path, error=str(exc)))
            return "error", _internal(502, started)
        except _RELAY_ERRORS as exc:
            self.ctx.log.info(kv("upstream_error", uri=request.raw_path, error=str(exc)))
            return "error", _internal(502 if stream else self.upstream_failed_status, started)
        try:
            return await self._relay(request, upstream, relay, deadline)
        finally:
            upstream.close()  # no-op once the body was read to the end

    async def _read_whole(self, request: web.Request, deadline: float | None) -> bytes:
        try:
            async with timeout_at(deadline):
                return await request.read()
        except asyncio.TimeoutError:
            raise _BodyError(408, "request body not received within read_timeout") from None
        except web.HTTPRequestEntityTooLarge:
            raise _BodyError(413, "request body larger than max_body_size") from None

    async def _body_chunks(self, request: web.Request,
                           deadline: float | None) -> AsyncIterator[bytes]:
        limit = self.ctx.config.max_body_size
        total = 0
        content = request.content
        while True:
            try:
                async with timeout_at(deadline):
                    chunk = await content.readany()
            except asyncio.TimeoutError:
                raise _BodyError(408, "request body not received within read_timeout") from None
            if not chunk:
                return
            total += len(chunk)
            if limit and total > limit:
                raise _BodyError(413, "request body larger than max_body_size")
            yield chunk

    def _body_error(self, exc: _BodyError, started: float) -> web.Response:
        resp = _internal(exc.status, started, exc.message + "\n")
        resp.force_close()  # the rest of the body is not worth reading
        return resp

    async def _relay_whole(self, request: web.Request, upstream: Response, relay: Plan,
                           started: float) -> tuple[Outcome, web.StreamResponse]:
        """No body, or a known, small length: read it all (the caller holds the
        deadline), write once."""
        try:
            body = b"" if relay.empty else await upstream.read()
        except _RELAY_ERRORS as exc:
            # Nothing sent yet: an honest error beats a short body.
            self.ctx.log.info(kv("upstream_error", uri=request.raw_path, error=str(exc)))
            upstream.close()
            return "error", _internal(502, started)
        headers = CIMultiDict(relay.headers)
        if relay.empty and relay.length is not None:
            headers["Content-Length"] = str(relay.length)  # HEAD and 304: as announced
        return "ok", _Verbatim(status=upstream.status, reason=phrase(upstream.status,
                                                                     upstream.reason),
                               headers=headers, body=body or None)

    async def _relay(self, request: web.Request, upstream: Response, relay: Plan,
                     deadline: float | None) -> tuple[Outcome, web.StreamResponse]:
        """Relay the body as it arrives; a failure cuts the connection (headers are out)."""
        out = _VerbatimStream(status=upstream.status,
                              reason=phrase(upstream.status, upstream.reason),
                              headers=CIMultiDict(relay.headers))
        if relay.length is not None:
            out.content_length = relay.length
        await out.prepare(request)
        request[STARTED_RESPONSE_KEY] = out
        sent = 0
        out[BODY_BYTES_KEY] = 0
        outcome: Outcome = "ok"
        try:
            async with timeout_at(deadline):
                async for chunk in upstream.iter_chunks():
                    await out.write(chunk)
                    sent += len(chunk)
                    out[BODY_BYTES_KEY] = sent
            await out.write_eof()
        except (*_RELAY_ERRORS, asyncio.TimeoutError, ValueError) as exc:
            if not (isinstance(exc, ConnectionResetError) and request.transport is None):
                self.ctx.log.info(kv("upstream_cut", uri=request.raw_path, sent=sent,
                                     error=repr(exc)))
            upstream.close()
            outcome = "error"
            # Headers are out: cut the connection so the client sees the truncation,
            # after a last event saying why when the mode has one for this stream.
            tail = self.stream_error_event(out.headers.get("Content-Type", ""))
            if tail is not None and request.transport is not None:
                with contextlib.suppress(Exception):
                    await out.write(tail)
            if request.transport is not None:
                request.transport.close()
        out[BODY_BYTES_KEY] = sent
        return outcome, out

    # -- websockets --------------------------------------------------------

    async def _websocket(self, request: web.Request, started: float) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None:
            return _internal(503, started, "function not started")
        seconds = self._limit_for(request)
        headers = to_upstream((k, v) for k, v in request.headers.items()
                              if k.lower() not in _WS_OWN)
        protocols = tuple(p.strip() for p in
                          request.headers.get("Sec-WebSocket-Protocol", "").split(",")
                          if p.strip())
        try:
            async with timeout_at(loop.time() + seconds if seconds else None):
                upstream = await session.ws_connect(
                    URL(self._origin + self._target(request), encoded=True),
                    headers=headers, protocols=protocols,
                    autoclose=False, autoping=False, max_msg_size=0, compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            resp = _internal(exc.status if exc.status >= 400 else 502, started)
            return resp
        except asyncio.TimeoutError:
            return _internal(504, started, timeout_reason(seconds))
        except (aiohttp.ClientError, OSError):
            return _internal(502, started)
        ws = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else (),
                                   autoclose=False, autoping=False, max_msg_size=0)
        await ws.prepare(request)
        deadline = loop.time() + seconds if seconds else None
        try:
            async with timeout_at(deadline):
                await _pipe_websockets(ws, upstream)
        except asyncio.TimeoutError:
            self.ctx.log.info(kv("websocket_timeout", uri=request.raw_path,
                                 exec_timeout=format_duration(seconds)))
        finally:
            if not upstream.closed:
                await upstream.close()
            if not ws.closed:
                await ws.close()
        return ws


# Either end of the relay; aiohttp's two classes share the receive/send API.
_Socket = Any


async def _forward(src: _Socket, dst: _Socket) -> None:
    """Copy messages until ``src`` closes, then close ``dst`` with the same code."""
    async for msg in src:
        if msg.type is WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await dst.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            await dst.close(code=src.close_code or 1000, message=(msg.extra or "").encode())
            return
        else:  # ERROR, CLOSED, CLOSING
            break
    await dst.close(code=src.close_code or 1000)


async def _pipe_websockets(client: _Socket, upstream: _Socket) -> None:
    tasks = [asyncio.ensure_future(_forward(client, upstream)),
             asyncio.ensure_future(_forward(upstream, client))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # One side closed: give the other a moment to finish its closing handshake.
        if pending:
            await asyncio.wait(pending, timeout=1.0)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
