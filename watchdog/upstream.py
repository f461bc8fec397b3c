"""A lean HTTP/1.1 keep-alive client for the one hop from the front to the function.

aiohttp's client is general (cookies, redirects, proxies, tracing, per-request
timers); on loopback it costs more than the function's own answer. This client
does only what the proxy needs: write the request head and body as given, parse
the response strictly, and hand the body back whole or piece by piece.

Responses are parsed by ``httptools`` (llhttp, the parser of Node and uvicorn),
never by hand. What it and this module refuse, as :class:`MalformedResponse`
before the caller sees a status (the fronts answer 502):
- anything llhttp refuses: a status line that is not ``HTTP/1.x NNN reason``,
  a bare CR, NUL or another control byte in a header, obs-fold, whitespace
  before a colon, an invalid, negative, signed or repeated ``Content-Length``,
  ``Content-Length`` together with ``Transfer-Encoding``, a chunk size that is
  not plain hex (``0x10``, ``-1``, ``1_0``), chunk data not ended by CRLF;
- a version other than HTTP/1.0 and HTTP/1.1; a 101 (nothing asked to upgrade);
- a ``Transfer-Encoding`` other than one ``chunked`` (as Go's client);
- a header value that is not UTF-8 (the fronts re-serialise every header);
- a head larger than ``MAX_HEAD`` bytes.
A bare LF may end a head line (RFC 9112 section 2.2 allows it): the line is
parsed as a line, and whatever the client receives is re-serialised with CRLF.
A body that breaks off, or breaks its framing, raises :class:`BrokenBody`.

Wire behaviour:
- the request head is written exactly as given (header order and case kept),
  in one write together with a ``bytes`` body; an async-iterable body is sent
  with ``Transfer-Encoding: chunked`` while the response is already being read
  (an upstream may answer before it has read everything);
- POST, PUT and PATCH without a body get ``Content-Length: 0``;
- response framing: no body for HEAD, 1xx, 204 and 304; ``Transfer-Encoding:
  chunked`` decoded (trailers dropped); else ``Content-Length``; else until EOF;
  interim 1xx responses (103) are skipped;
- a connection goes back to the pool only after a complete response that
  llhttp says may be kept alive (HTTP/1.1 without ``Connection: close``, or
  HTTP/1.0 with ``keep-alive``); one that receives bytes beyond its response (a
  function that over-sends, e.g. a ``Content-Length`` counted in characters, or
  a body on a HEAD answer) or any byte while idle is closed, as Go's transport
  closes a connection on unsolicited data: those bytes would be read as the
  next request's answer; pooled connections idle longer than ``idle_timeout``
  are closed rather than reused (an upstream may be closing them at the same
  moment);
- a reused connection that closes before any byte of the response is retried
  once on a new connection when the request can be replayed (idempotent method,
  ``bytes`` or no body): the upstream dropped an idle connection, it did not
  see the request;
- a body the caller reads slowly is buffered up to ``PAUSE_AT`` bytes, then
  reading from the upstream pauses until the caller catches up.

Invariants: header bytes written never contain CR or LF (request headers come
from aiohttp's parser or the lean front's filter); a connection whose response
was not read to the end is closed, never reused; timeouts are the caller's
(cancellation closes the connection); the header names and values of a
:class:`Response` are tokens and UTF-8 text without control bytes but HTAB.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import cast

import httptools

MAX_HEAD = 1 << 20  # bytes of response status line + headers
PAUSE_AT = 1 << 18  # body bytes buffered before reading from the upstream pauses
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NEEDS_LENGTH = frozenset({"POST", "PUT", "PATCH"})
# Control bytes other than HTAB (llhttp refuses them already; kept as a second line).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

Body = bytes | AsyncIterable[bytes] | None


def _streamed(body: Body) -> bool:
    # Concrete types, not isinstance(AsyncIterable): the ABC check costs on every request.
    return body is not None and not isinstance(body, (bytes, bytearray, memoryview))


class UpstreamError(Exception):
    """The upstream could not be reached or failed before a complete response head."""


class ConnectFailed(UpstreamError):
    pass


class MalformedResponse(UpstreamError):
    """The upstream's response head (or framing) is not one a strict proxy relays."""


class BrokenBody(UpstreamError):
    """The response body broke off or broke its framing after the head was read."""


def _peer_gone(conn: _Conn) -> bool:
    """Ask the kernel, not the event loop, whether a pooled connection's peer has closed
    (a process killed a moment ago): the loop may not have read that end yet."""
    transport = conn.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return True
    try:
        probe = socket.socket(fileno=os.dup(sock.fileno()))
    except OSError:
        return True
    try:
        return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # nothing to read: alive and idle
    except OSError:
        return True
    finally:
        probe.close()


class _Stale(Exception):
    """A reused connection closed before answering."""


class _Reject(Exception):
    """Raised inside a parser callback: the head is refused (the message is the reason)."""


def _parser(conn: _Conn) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(conn)
    # A bare LF may end a head line (RFC 9112 section 2.2); a bare CR may not.
    parser.set_dangerous_leniencies(lenient_optional_cr_before_lf=True)
    return parser


class _Head:
    __slots__ = ("status", "reason", "headers", "length", "chunked", "keep")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]],
                 length: int | None, chunked: bool, keep: bool) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length
        self.chunked = chunked
        self.keep = keep


def _reason(raw: bytes) -> str:
    """The reason phrase if it is plain printable ASCII, else "" (the fronts fill it in)."""
    if raw.isascii():
        text = raw.decode("ascii")
        if text.isprintable():
            return text
    return ""


def _check_head(raw_headers: list[tuple[bytes, bytes]]
                ) -> tuple[list[tuple[str, str]], int | None, bool]:
    """Decoded headers, Content-Length and chunked; :class:`_Reject` when not relayable."""
    if _CTL.search(b"".join([value for _, value in raw_headers])) is not None:
        raise _Reject("control byte in a header value")
    headers: list[tuple[str, str]] = []
    length: int | None = None
    encodings: list[str] = []
    for raw_name, raw_value in raw_headers:
        name = raw_name.decode("ascii")  # llhttp admits only token characters
        try:
            value = raw_value.decode("utf-8").strip(" \t")
        except UnicodeDecodeError:
            raise _Reject(f"header {name} is not UTF-8 text") from None
        if len(name) in (14, 17):  # len("content-length"), len("transfer-encoding")
            low = name.lower()
            if low == "content-length":
                length = int(value)  # llhttp admits only digits, once
            elif low == "transfer-encoding":
                encodings.append(value)
        headers.append((name, value))
    chunked = False
    if encodings:
        if len(encodings) != 1 or encodings[0].lower() != "chunked":
            raise _Reject(f"unsupported Transfer-Encoding {', '.join(encodings)!r}")
        chunked = True
    return headers, length, chunked


class _Conn(asyncio.Protocol):
    """One connection to the upstream; feeds what arrives to llhttp.

    At most one exchange at a time: :meth:`begin` starts one, the parser's
    callbacks fill in the head and the body, :class:`Response` reads them.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = _parser(self)
        self.last_used = 0.0
        self.reused = False
        self.broken = False  # unsolicited bytes, a parse error, EOF: never reuse
        self.lost = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._reset(False)
        self.expect = False

    def _reset(self, head_only: bool) -> None:
        self.expect = True  # a response is awaited
        self.head_only = head_only
        self.got_bytes = False
        self.interim = False
        self.reason_raw = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.head: _Head | None = None
        self.until_eof = False
        self.head_waiter: asyncio.Future[None] | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self.body_waiter: asyncio.Future[None] | None = None

    def begin(self, head_only: bool) -> asyncio.Future[None]:
        self._reset(head_only)
        waiter = self.head_waiter = self.loop.create_future()
        return waiter

    def usable(self) -> bool:
        transport = self.transport
        return (not self.broken and not self.lost and transport is not None
                and not transport.is_closing())

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()

    # -- transport callbacks ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.expect or self.complete:
            self.close()  # unsolicited: never read as the next request's answer
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            reason = str(cause) if isinstance(cause, _Reject) else repr(cause)
            self._fail(MalformedResponse(f"malformed response: {reason}"))
        except httptools.HttpParserUpgrade:
            self._fail(MalformedResponse("malformed response: an unrequested protocol switch"))
        except httptools.HttpParserError as exc:
            if self.complete:
                self.close()  # bytes beyond a complete response: the answer stands
            elif self.head is None:
                self._fail(MalformedResponse(f"malformed response: {exc}"))
            else:
                self._fail(BrokenBody(f"malformed response body: {exc}"))
        if self.head is None and self.error is None:
            self.head_size += len(data)
            if self.head_size > MAX_HEAD:
                self._fail(MalformedResponse(f"response head larger than {MAX_HEAD} bytes"))
        elif self.head_only:
            # llhttp is not told about HEAD; it would wait for the body the
            # head announces. The answer is complete; start afresh.
            self.parser = _parser(self)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what EOF means

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.broken = True
        self._wake_writer()
        if not self.expect or self.complete or self.error is not None:
            return
        if self.head is not None and self.until_eof:
            self.complete = True  # EOF ends a body framed by the connection's close
            self._wake_body()
        elif self.head is None and self.reused and not self.got_bytes:
            self._fail(_Stale())
        elif self.head is None:
            self._fail(UpstreamError("upstream closed the connection before a complete "
                                     "response head"))
        else:
            self._fail(BrokenBody("upstream closed the connection before the end of the body"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("upstream connection lost")
        if self._writing_paused:
            self._drain = self.loop.create_future()
            await self._drain
            if self.lost:
                raise ConnectionResetError("upstream connection lost")

    def _wake_writer(self) -> None:
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.close()
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._wake_body()

    def _wake_body(self) -> None:
        waiter, self.body_waiter = self.body_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def resume(self) -> None:
        """The reader took buffered body bytes: read from the upstream again if paused."""
        if self._reading_paused and self.buffered < PAUSE_AT // 2:
            self._reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    # -- llhttp callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self.head is not None:
            # A second response to one request (bytes beyond the first): the
            # first stands, the connection is not reused.
            self.broken = True

    def on_status(self, raw: bytes) -> None:
        if self.head is None:
            self.reason_raw += raw

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is None:
            self.raw_headers.append((name, value))
        # else: trailers, not forwarded

    def on_headers_complete(self) -> None:
        if self.head is not None:
            return
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise _Reject("101 Switching Protocols, but nothing asked to upgrade")
            self.interim = True  # 1xx: skipped, its headers with it
            return
        if parser.get_http_version() not in ("1.1", "1.0"):
            raise _Reject(f"HTTP/{parser.get_http_version()} status line")
        headers, length, chunked = _check_head(self.raw_headers)
        no_body = self.head_only or status in (204, 304)
        self.until_eof = not no_body and not chunked and length is None
        self.head = _Head(status, _reason(self.reason_raw), headers,
                          None if chunked else length, chunked and not no_body,
                          parser.should_keep_alive() and not self.until_eof)
        if self.head_only:
            self.complete = True
        waiter = self.head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_body(self, data: bytes) -> None:
        if self.complete or self.head is None:
            self.broken = True  # a body on a HEAD answer: beyond the response
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered >= PAUSE_AT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            self.reason_raw = b""
            self.raw_headers = []
            return
        if self.head is None or self.complete:
            return
        self.complete = True
        self._wake_body()


class Response:
    """The upstream's answer; read the body once (``read`` or ``iter_chunks``).

    ``content_length`` is the length the head announced (None when chunked or
    framed by the connection's close); ``chunked`` says the upstream sent it
    chunked. Neither is forwarded as such: the fronts frame what they relay.
    """

    __slots__ = ("status", "reason", "headers", "content_length", "chunked", "_conn",
                 "_pool", "_keep", "_done", "_writer_task")

    def __init__(self, head: _Head, conn: _Conn, pool: Pool,
                 writer_task: asyncio.Task[None] | None) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self.content_length = head.length
        self.chunked = head.chunked
        self._conn: _Conn | None = conn
        self._pool = pool
        self._keep = head.keep
        self._done = False
        self._writer_task = writer_task
        if conn.complete and not conn.chunks:
            self._finish()

    async def read(self) -> bytes:
        if self._done:
            return b""
        conn = self._require()
        if conn.complete and conn.error is None:
            chunks = conn.chunks
            data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            conn.buffered = 0
            conn.resume()
            self._finish()
            return data
        return b"".join([piece async for piece in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises :class:`BrokenBody` on a short or broken body."""
        if self._done:
            return
        conn = self._require()
        chunks = conn.chunks
        try:
            while True:
                while chunks:
                    piece = chunks.popleft()
                    conn.buffered -= len(piece)
                    conn.resume()
                    yield piece
                if conn.error is not None:
                    raise conn.error
                if conn.complete:
                    break
                waiter = conn.body_waiter = conn.loop.create_future()
                await waiter
        except BaseException:
            self.close()
            raise
        self._finish()

    def _require(self) -> _Conn:
        if self._conn is None:
            raise UpstreamError("response body already consumed or closed")
        return self._conn

    def _finish(self) -> None:
        self._done = True
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.expect = False
        task = self._writer_task
        if task is not None and not task.done():
            # The upstream answered before taking the whole body: the connection
            # is mid-request, so it cannot be reused.
            task.cancel()
            conn.close()
        elif self._keep and conn.usable():
            self._pool._release(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response: the connection is closed, not reused."""
        self._done = True
        conn, self._conn = self._conn, None
        if self._writer_task is not None and not self._writer_task.done():
            self._writer_task.cancel()
        if conn is not None:
            conn.close()


class Pool:
    """Keep-alive connections to one upstream: ``host:port``, or a Unix socket at
    ``unix_path`` (mode=llm's handler processes), which then wins over host and port."""

    def __init__(self, host: str, port: int, *, idle_timeout: float = 1.0,
                 tls: ssl.SSLContext | None = None, unix_path: str | None = None) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path
        self.tls = tls
        self.idle_timeout = idle_timeout
        self._idle: collections.deque[_Conn] = collections.deque()
        self._closed = False

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            if self.unix_path is not None:
                _, conn = await loop.create_unix_connection(_Conn, self.unix_path)
            else:
                _, conn = await loop.create_connection(_Conn, self.host, self.port,
                                                       ssl=self.tls)
        except OSError as exc:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise ConnectFailed(f"cannot connect to {where}: {exc}") from exc
        return conn

    def _acquire_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used: least likely to be stale
            if now - conn.last_used < self.idle_timeout and conn.usable():
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn) -> None:
        if self._closed or not conn.usable():
            conn.close()
            return
        conn.last_used = time.monotonic()
        self._idle.append(conn)
        # Drop the connections at the cold end that have idled too long.
        while self._idle and conn.last_used - self._idle[0].last_used >= self.idle_timeout:
            self._idle.popleft().close()

    async def prime(self) -> None:
        """Make sure one live connection waits in the pool; ConnectFailed when none can be
        made. mode=llm calls this before relaying, so a handler that died a moment ago
        costs a retry on another handler instead of a failed request."""
        conn = self._acquire_idle()
        if conn is not None and _peer_gone(conn):
            conn.close()
            conn = None
        if conn is None:
            conn = await self._connect()
        self._release(conn)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.popleft().close()

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: Body = None) -> Response:
        head = _head(method, target, headers, body)
        replayable = not _streamed(body) and method in _IDEMPOTENT
        conn = self._acquire_idle()
        if conn is None:
            conn = await self._connect()
        try:
            return await self._exchange(conn, method, head, body)
        except _Stale:
            if not replayable:
                raise UpstreamError("upstream closed the connection before answering") from None
            return await self._exchange(await self._connect(), method, head, body)

    async def _exchange(self, conn: _Conn, method: str, head: bytes, body: Body) -> Response:
        writer_task: asyncio.Task[None] | None = None
        transport = conn.transport
        assert transport is not None
        waiter = conn.begin(method == "HEAD")
        try:
            if conn.lost:  # closed by the upstream since it was pooled
                raise _Stale() if conn.reused else UpstreamError("upstream connection lost")
            if _streamed(body):
                transport.write(head)
                writer_task = asyncio.ensure_future(
                    _write_chunked(conn, cast(AsyncIterable[bytes], body)))
                await _race(waiter, writer_task)
            else:
                # One syscall either way; writelines spares copying a large body.
                data = cast("bytes | None", body)
                transport.writelines((head, data) if data else (head,))
                await waiter
            if conn.error is not None:
                if conn.head is not None and not isinstance(conn.error, _Stale):
                    # The body broke its framing in what arrived with the head:
                    # nothing has reached the client yet, so it is a malformed
                    # response (502), not a cut one.
                    raise MalformedResponse(str(conn.error)) from None
                raise conn.error
            assert conn.head is not None
            return Response(conn.head, conn, self, writer_task)
        except BaseException:
            conn.close()
            if writer_task is not None:
                writer_task.cancel()
                # A broken body (a client that sent too much or too slowly) is
                # the cause to report, not the upstream read it interrupted.
                failure = (writer_task.exception()
                           if writer_task.done() and not writer_task.cancelled() else None)
                if failure is not None:
                    raise failure from None
            raise


async def _race(waiter: asyncio.Future[None], writer_task: asyncio.Task[None]) -> None:
    """Wait for the head while the body is written; a failed body write wins."""
    done, _ = await asyncio.wait({waiter, writer_task}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        return
    exc = writer_task.exception()
    if exc is not None:
        raise exc
    await waiter


async def _write_chunked(conn: _Conn, body: AsyncIterable[bytes]) -> None:
    transport = conn.transport
    assert transport is not None
    async for piece in body:
        if piece:
            transport.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await conn.drain()
    transport.write(b"0\r\n\r\n")
    await conn.drain()


def _head(method: str, target: str, headers: Iterable[tuple[str, str]], body: Body) -> bytes:
    streamed = _streamed(body)
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    has_length = False
    for key, value in headers:
        if key.lower() == "content-length":
            if streamed:
                continue  # sent chunked instead
            has_length = True
        lines.append(f"{key}: {value}\r\n")
    if streamed:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif not has_length and (body or method in _NEEDS_LENGTH):
        lines.append(f"Content-Length: {len(cast(bytes, body)) if body else 0}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")

