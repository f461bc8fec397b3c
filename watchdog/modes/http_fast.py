"""The lean front: plain requests proxied at the protocol level.

aiohttp's web layer (router, middlewares, Request and StreamResponse objects,
header multidicts) costs several times what a small function spends answering.
For a mode that offers the lean front capability (http mode does; see
:class:`~fwatchdog.modes.base.LeanProxy`) this front owns the serving port
instead. Each connection is a :class:`FastConnection` (an
:class:`asyncio.Protocol`) that reads request heads itself and proxies *plain*
requests through the keep-alive :class:`~fwatchdog.upstream.Pool` that the
mode's ``acquire`` hands out (TCP, or a Unix socket), writing the function's
response back as bytes. Anything else is handed over to the aiohttp server, which then owns the
connection for the rest of its life, so every unusual case keeps exactly one
implementation.

A request is plain when its head is complete, at most ``MAX_FAST_HEAD`` bytes,
``METHOD /origin-form-target HTTP/1.1`` with a common method, every header line
a valid ``name: value`` field (no obs-fold), at most ``MAX_FAST_HEADERS`` of
them, the path not under ``/_`` (health, readiness) and without ``%`` escapes
(aiohttp routes on the decoded path, so only it decides on those), no
``Transfer-Encoding``, ``Upgrade``, ``Expect`` or repeated ``Content-Length``,
no ``Accept`` asking for a stream (SSE, NDJSON), a body of at most
``WHOLE_REQUEST_LIMIT`` and ``max_body_size`` bytes that has already arrived in
full, and the function has started. Handed over, by construction, are:
malformed heads (aiohttp answers 400/431), health and readiness (escaped or
not), percent-escaped paths, WebSocket and other upgrades, 100-continue,
chunked or large or slow request bodies (streaming to the function, 408, 413),
streamed requests, HTTP/1.0, requests before the function is up.

The head parser here is a filter, not a general HTTP parser: it accepts only
heads it is sure of and needs the byte offset where each request starts (a C
parser such as httptools reports neither), and aiohttp's llhttp parser decides
everything it does not accept.

Per plain request the front does what the aiohttp path does, through the same
code: the server's :class:`~fwatchdog.accounting.Accounting` (in flight, 429,
metrics, access log), the mode's :class:`~fwatchdog.modes.base.LeanProxy`
(``acquire`` picks the upstream and its :class:`~fwatchdog.upstream.Pool`,
``limit_for`` gives ``exec_timeout`` shortened by ``X-Timeout``, ``target_for``
the upstream target), ``proxyheaders`` (hop-by-hop headers) and
:mod:`fwatchdog.relay` (the response's status, headers and framing, and the
serializer of its head). Responses with a known length up to
``WHOLE_RESPONSE_LIMIT`` are read whole and written at once (502 if the
function breaks off mid-body); others (chunked, larger, until-EOF) are relayed
piece by piece as they arrive, chunked towards the client when the length is
unknown, and a failure then cuts the connection so the client sees the
truncation. The front knows no mode and no server: it is built from the
accounting, the capability, aiohttp's server to hand over to, the
configuration, a logger and the "mode has started" event.

Connection states::

        connection_made
              |
              v          complete plain head + body        +--------+
    +-----> IDLE ------------------------------------------> |  BUSY  |
    |         |  \\                                           +--------+
    |         |   \\ anything else (see above)                  |
    |         |    +-------------------------> HANDED          | response written,
    |         |       (transport and buffered bytes go to      | keep-alive, not
    |         |        aiohttp's RequestHandler)                | shutting down
    |         |                                                 |
    +---------|-------------------------------------------------+
              | idle > read_timeout, EOF, Connection: close, shutdown, cut
              v
           CLOSED   (a BUSY connection lost: its task, the upstream call, is cancelled)

Invariants: one request at a time per connection, so pipelined responses leave
in request order (bytes that arrive while BUSY wait in the buffer, and reading
pauses when it grows); a connection stays BUSY until its response has drained
to below the transport's high-water mark, so a client that does not read its
answers holds at most one of them in memory; the head of a request is parsed only in IDLE, so a
handover always starts at a request boundary with every unread byte; the front
never answers for ``/_/*`` paths; an idle connection (no request, or half a
head) is closed ``read_timeout`` after it became idle, as aiohttp's keep-alive
timeout does (never with ``read_timeout=0``, which means no limit); one timer
per connection, re-armed only when it fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from fwatchdog.accounting import Accounting
from fwatchdog.config import Config
from fwatchdog.durations import format_duration
from fwatchdog.errors import reason, timeout_reason
from fwatchdog.logs import kv
from fwatchdog.modes.base import LeanProxy, Lease, Outcome, Unavailable
from fwatchdog.proxyheaders import to_upstream
from fwatchdog.relay import INTERNAL, WHOLE_REQUEST_LIMIT, Plan, phrase, plan, serialize_head
from fwatchdog.upstream import MalformedResponse, Response, UpstreamError

if sys.version_info >= (3, 11):
    from asyncio import timeout_at
else:  # pragma: no cover - aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout_at

# Heads larger than this go to aiohttp, whose limits (64 KiB lines) then apply.
MAX_FAST_HEAD = 8190
MAX_FAST_HEADERS = 100
# Pipelined bytes buffered while a request is served before reading pauses.
PAUSE_READING_AT = 1 << 20
FAST_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
_TARGET = re.compile(r"/[!-~]*")  # origin-form, printable ASCII only
_FIELD = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
# Headers that make a request not plain (lower case).
_NOT_PLAIN = frozenset({"transfer-encoding", "upgrade", "expect"})
_STREAM_ACCEPT = ("text/event-stream", "application/x-ndjson")
_RELAY_ERRORS = (UpstreamError, OSError, asyncio.IncompleteReadError)


class ConnState(enum.Enum):
    IDLE = "idle"
    BUSY = "busy"
    HANDED = "handed"
    CLOSED = "closed"


@dataclass(frozen=True)
class PlainRequest:
    """A request head the front serves itself; strings decode bytes with surrogateescape."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    content_length: int
    keep_alive: bool
    user_agent: str | None
    call_id: str | None
    x_timeout: str | None


def parse_head(head: bytes, body_limit: int) -> PlainRequest | None:
    """The plain request in ``head`` (without its final CRLF CRLF), or None to hand over.

    None is never an error: it means "not plain", and aiohttp's parser decides.
    """
    if len(head) > MAX_FAST_HEAD:
        return None
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] not in FAST_METHODS:
        return None
    method, target = parts[0], parts[1]
    if target.startswith("/_") or _TARGET.fullmatch(target) is None:
        return None
    if "%" in target.partition("?")[0]:
        # aiohttp routes on the decoded path (/%5F/health is /_/health there);
        # deciding on escapes here would route one request two ways.
        return None
    if len(lines) - 1 > MAX_FAST_HEADERS:
        return None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    keep_alive = True
    user_agent = call_id = x_timeout = None
    for line in lines[1:]:
        match = _FIELD.fullmatch(line)
        if match is None:
            return None
        name, value = match.groups()
        low = name.lower()
        if low == "content-length":
            if length is not None or not value.isdigit() or not value.isascii():
                return None
            length = int(value)
            if length > body_limit:
                return None
        elif low in _NOT_PLAIN:
            return None
        elif low == "connection":
            if "close" in value.lower():
                keep_alive = False
        elif low == "accept":
            low_value = value.lower()
            if any(kind in low_value for kind in _STREAM_ACCEPT):
                return None
        elif low == "user-agent":
            user_agent = value
        elif low == "x-call-id":
            call_id = value
        elif low == "x-timeout":
            x_timeout = value
        headers.append((name, value))
    return PlainRequest(method, target, headers, length or 0, keep_alive, user_agent, call_id,
                        x_timeout)


class _Clock:
    """The ``Date`` header value, rendered once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def date(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        return self._value


class _Expiry:
    """A deadline for the current task: at ``deadline`` it is cancelled, once."""

    __slots__ = ("_handle", "_fired", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None] | None,
                 deadline: float | None) -> None:
        self._fired = False
        self._task = task
        self._handle = loop.call_at(deadline, self._fire) if deadline is not None else None

    def _fire(self) -> None:
        self._fired = True
        if self._task is not None:
            self._task.cancel()

    def expired(self) -> bool:
        """True when the cancellation being handled is ours (then it is consumed)."""
        if self._fired and self._task is not None and hasattr(self._task, "uncancel"):
            self._task.uncancel()
        return self._fired

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class FastFront:
    """The protocol factory for the serving port, and what its connections share."""

    def __init__(self, accounting: Accounting, proxy: LeanProxy, fallback: web.Server, *,
                 config: Config, log: logging.Logger, serving: asyncio.Event) -> None:
        self.acct = accounting
        self.proxy = proxy
        self.fallback = fallback
        self.log = log
        self.serving = serving  # set once the mode has started: before, everything is handed over
        self.loop = asyncio.get_running_loop()
        self.clock = _Clock()
        self.connections: set[FastConnection] = set()
        self.closing = False
        self._gone: asyncio.Event | None = None
        cfg = config
        self.idle_timeout = cfg.read_limit  # None: read_timeout=0, idle for ever
        self.body_limit = min(WHOLE_REQUEST_LIMIT, cfg.max_body_size or WHOLE_REQUEST_LIMIT)

    def connection(self) -> FastConnection:
        return FastConnection(self)

    def forget(self, conn: FastConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._gone is not None:
            self._gone.set()

    async def shutdown(self, timeout: float) -> None:
        """Drain: idle connections close now, busy ones after their response, or at ``timeout``."""
        self.closing = True
        for conn in list(self.connections):
            if conn.state is ConnState.IDLE:
                conn.close()
        if not self.connections:
            return
        self._gone = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._gone.wait(), timeout)
        for conn in list(self.connections):  # write_timeout is up: cut what is left
            conn.abort()


class FastConnection(asyncio.Protocol):
    """One client connection; see the module docstring for its states."""

    def __init__(self, front: FastFront) -> None:
        self.front = front
        self.loop = front.loop
        self.transport: asyncio.Transport | None = None
        self.state = ConnState.IDLE
        self.buf = bytearray()
        self.idle_since = 0.0
        self.eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        # (status, reason, body bytes sent) once a streamed response's head is out.
        self._streaming: tuple[int, str, int] | None = None
        self._lease: Lease | None = None  # the current request's upstream

    # -- transport callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small responses must leave at once, not wait for the client's ACK;
            # SO_KEEPALIVE as aiohttp sets it, so dead peers are noticed.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.front.connections.add(self)
        self._become_idle()

    def data_received(self, data: bytes) -> None:
        if self.state is ConnState.CLOSED:
            return
        self.buf += data
        if self.state is ConnState.IDLE:
            self._advance()
        elif len(self.buf) > PAUSE_READING_AT and not self._reading_paused:
            assert self.transport is not None
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        # A client that closes its end has gone away: a close and a half-close
        # look alike here, and Go's server and aiohttp (the other front) both
        # treat either as the end of the client. Returning False closes the
        # transport; connection_lost then cancels a request in progress.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is ConnState.BUSY and self._task is not None:
            # The client is gone: stop its upstream call, as of-watchdog does
            # through the request's context. Pool.request and Response close
            # (never pool) the upstream connection they are cancelled on.
            self._task.cancel()
        if self.state is not ConnState.HANDED:
            self.state = ConnState.CLOSED
        self._cancel_timer()
        self._wake_writer()
        self.front.forget(self)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    # -- states -------------------------------------------------------------

    def close(self) -> None:
        self.state = ConnState.CLOSED
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.close()

    def _become_idle(self) -> None:
        self.state = ConnState.IDLE
        self.idle_since = self.loop.time()
        if self._timer is None and self.front.idle_timeout is not None:
            self._timer = self.loop.call_at(self.idle_since + self.front.idle_timeout,
                                            self._check_idle)

    def _check_idle(self) -> None:
        self._timer = None
        if self.state is not ConnState.IDLE or self.front.idle_timeout is None:
            return  # re-armed when the connection is idle again
        due = self.idle_since + self.front.idle_timeout
        if self.loop.time() >= due:
            self.close()
        else:
            self._timer = self.loop.call_at(due, self._check_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _advance(self) -> None:
        """IDLE: serve the next request in the buffer, hand over, close, or wait."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            # A head ended by a bare LF never shows a CRLF CRLF: aiohttp's parser
            # decides on it (llhttp, like Go, accepts bare LF line endings).
            if len(buf) > MAX_FAST_HEAD or b"\n\n" in buf or b"\n\r\n" in buf:
                self._hand_over()
            elif self.eof:
                self.close()
            return
        front = self.front
        req = parse_head(bytes(buf[:end]), front.body_limit)
        if req is None or not front.serving.is_set():
            self._hand_over()
            return
        start = end + 4
        stop = start + req.content_length
        if len(buf) < stop:
            # A body still on its way: aiohttp reads it under read_timeout (408).
            self._hand_over()
            return
        body = bytes(buf[start:stop]) if req.content_length else None
        del buf[:stop]
        self.state = ConnState.BUSY
        self._task = self.loop.create_task(self._serve(req, body))

    def _hand_over(self) -> None:
        """aiohttp's server takes the connection, from the current request on."""
        transport = self.transport
        assert transport is not None
        self.state = ConnState.HANDED
        self._cancel_timer()
        self.front.forget(self)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        handler = self.front.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        data, self.buf = bytes(self.buf), bytearray()
        if data:
            handler.data_received(data)
        if self.eof:
            handler.eof_received()

    def _finish(self, keep_alive: bool) -> None:
        self._task = None
        transport = self.transport
        assert transport is not None
        if self.state is not ConnState.BUSY or transport.is_closing():
            self.state = ConnState.CLOSED
            return
        if not keep_alive or self.front.closing:
            self.close()
            return
        self._become_idle()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self.buf or self.eof:
            self._advance()

    # -- writing ------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def _drain(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        if self._writing_paused:
            self._drained = self.loop.create_future()
            await self._drained

    def _wake_writer(self) -> None:
        waiter, self._drained = self._drained, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _plain(self, status: int, text: str, headers: list[tuple[str, str]],
               keep_alive: bool, head: bool = False) -> tuple[int, str, int]:
        body = text.encode()
        if body:
            headers = [("Content-Type", "text/plain; charset=utf-8"), *headers]
        # An empty answer to HEAD carries no Content-Length, as aiohttp writes it.
        length = None if head and not body else len(body)
        self._write(serialize_head(status, "", headers, date=self.front.clock.date(),
                                   length=length, chunked=False, keep_alive=keep_alive)
                    + (b"" if head else body))
        return status, phrase(status), len(body)

    def _internal(self, status: int, started: float, keep_alive: bool,
                  text: str = "", head: bool = False) -> tuple[int, str, int]:
        return self._plain(status, text or reason(status),
                           [("X-Duration-Seconds", f"{time.perf_counter() - started:f}"),
                            (INTERNAL, "of-watchdog")], keep_alive, head)

    def _head(self, upstream: Response, plan: Plan, length: int | None, chunked: bool,
              keep_alive: bool) -> bytes:
        """The response head, by the relay rules (:mod:`fwatchdog.relay`)."""
        return serialize_head(upstream.status, upstream.reason, plan.headers,
                              date=None if plan.has_date else self.front.clock.date(),
                              length=length, chunked=chunked, keep_alive=keep_alive)

    # -- one request --------------------------------------------------------

    async def _serve(self, req: PlainRequest, body: bytes | None) -> None:
        front = self.front
        acct = front.acct
        started = acct.enter()
        keep_alive = req.keep_alive
        self._streaming = None
        try:
            if acct.over_limit():
                # Never queued: of-watchdog's faas-middleware limiter answers at once.
                status, reason, size = self._plain(429, acct.limit_text,
                                                   [(INTERNAL, "faas-middleware")], keep_alive)
            else:
                status, reason, size, keep_alive = await self._relay(req, body)
        except Exception as exc:  # a bug here must answer, not leave the client hanging
            front.log.info(kv("handler_error", uri=req.target, error=repr(exc)))
            status, reason, size = 500, "Internal Server Error", -1
            if self.transport is not None:
                self.transport.close()
            keep_alive = False
        except asyncio.CancelledError:
            # The client went away (or shutdown cut the connection): still counted
            # and logged, as the forking modes record a disconnect, then cancelled.
            # A stream whose status line went out is recorded with that status.
            front.log.info(kv("client_gone", uri=req.target))
            if self._streaming is not None:
                status, reason, size = self._streaming
            else:
                status, reason, size = 500, "Internal Server Error", 0
            acct.record(req.method, req.target, status, reason, size, started,
                        req.user_agent, req.call_id)
            raise
        finally:
            acct.leave()
        acct.record(req.method, req.target, status, reason, size, started, req.user_agent,
                    req.call_id)
        if keep_alive and self._writing_paused:
            # The client is not reading its answers: serve no further pipelined
            # request until this one has drained, or their responses would pile
            # up in memory without bound. Staying BUSY keeps the bytes that wait
            # in the buffer (reading pauses at PAUSE_READING_AT).
            with contextlib.suppress(ConnectionResetError):
                await self._drain()
        self._finish(keep_alive)

    async def _relay(self, req: PlainRequest,
                     body: bytes | None) -> tuple[int, str, int, bool]:
        """Proxy one request; (status, reason, body bytes, keep-alive) for the record."""
        outcome: Outcome = "error"
        self._lease = None
        try:
            outcome, result = await self._exchange(req, body, self.front.proxy)
            return result
        except asyncio.CancelledError:
            outcome = "client_gone"
            raise
        finally:
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.release(outcome)

    async def _exchange(self, req: PlainRequest, body: bytes | None, proxy: LeanProxy
                        ) -> tuple[Outcome, tuple[int, str, int, bool]]:
        log = self.front.log
        keep = req.keep_alive
        head = req.method == "HEAD"
        started = time.perf_counter()
        seconds = proxy.limit_for(req.x_timeout)
        deadline = self.loop.time() + seconds if seconds else None
        # asyncio.timeout_at costs several µs per use; one timer that cancels this
        # task does the same job for the common, whole response.
        expiry = _Expiry(self.loop, self._task, deadline)
        try:
            try:
                lease = self._lease = await proxy.acquire()
                upstream = await lease.pool.request(req.method, proxy.target_for(req.target),
                                                    to_upstream(req.headers), body)
                relay = plan(req.method, upstream, started, False)
                if relay.empty or relay.whole:
                    try:
                        data = b"" if relay.empty else await upstream.read()
                    except _RELAY_ERRORS as exc:
                        # Nothing sent yet: an honest error beats a short body.
                        log.info(kv("upstream_error", uri=req.target, error=str(exc)))
                        upstream.close()
                        return "error", (*self._internal(502, started, keep, head=head), keep)
                    return "ok", (*self._whole(upstream, relay, data, keep), keep)
            except asyncio.CancelledError:
                if not expiry.expired():
                    raise
                raise asyncio.TimeoutError() from None
            finally:
                expiry.cancel()
        except asyncio.TimeoutError:
            log.info(kv("upstream_timeout", uri=req.target, exec_timeout=format_duration(seconds)))
            return "timeout", (*self._internal(504, started, keep, timeout_reason(seconds),
                                               head), keep)
        except Unavailable as exc:
            return "error", (*self._internal(503, started, keep, f"{exc}\n", head), keep)
        except MalformedResponse as exc:
            log.info(kv("upstream_malformed", uri=req.target, error=str(exc)))
            return "error", (*self._internal(502, started, keep, head=head), keep)
        except _RELAY_ERRORS as exc:
            log.info(kv("upstream_error", uri=req.target, error=str(exc)))
            return "error", (*self._internal(proxy.upstream_failed_status, started, keep,
                                             head=head), keep)
        try:
            ok, result = await self._stream(req, upstream, relay, deadline)
        finally:
            upstream.close()  # no-op once the body was read to the end
        return ("ok" if ok else "error"), result

    def _whole(self, upstream: Response, relay: Plan, data: bytes,
               keep_alive: bool) -> tuple[int, str, int]:
        status = upstream.status
        if relay.empty:
            self._write(self._head(upstream, relay, relay.length, False, keep_alive))
            size = relay.length or 0
        else:
            head = self._head(upstream, relay, len(data), False, keep_alive)
            self._write(head + data if len(data) < 65536 else head)
            if len(data) >= 65536:
                self._write(data)
            size = len(data)
        return status, phrase(status, upstream.reason), size

    async def _stream(self, req: PlainRequest, upstream: Response, relay: Plan,
                      deadline: float | None) -> tuple[bool, tuple[int, str, int, bool]]:
        """Relay the body as it arrives; a failure cuts the connection (headers are out).

        (whether it went through, (status, reason, body bytes, keep-alive))."""
        length = relay.length
        chunked = length is None
        keep = req.keep_alive
        self._write(self._head(upstream, relay, length, chunked, keep))
        reason = phrase(upstream.status, upstream.reason)
        self._streaming = (upstream.status, reason, 0)
        sent = 0
        ok = True
        try:
            async with timeout_at(deadline):
                async for piece in upstream.iter_chunks():
                    await self._drain()
                    self._write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                    sent += len(piece)
                    self._streaming = (upstream.status, reason, sent)
            if chunked:
                self._write(b"0\r\n\r\n")
        except (*_RELAY_ERRORS, asyncio.TimeoutError, ValueError) as exc:
            client_gone = self.transport is None or self.transport.is_closing()
            if not (isinstance(exc, ConnectionResetError) and client_gone):
                self.front.log.info(kv("upstream_cut", uri=req.target, sent=sent,
                                       error=repr(exc)))
            upstream.close()
            if self.transport is not None:
                self.transport.close()
            keep = ok = False
        size = length if length is not None else sent
        return ok, (upstream.status, reason, size, keep)
