"""A lean HTTP/1.1 keep-alive client for the one hop from the front to the function.

aiohttp's client is general (cookies, redirects, proxies, tracing, per-request
timers); on loopback it costs more than the function's own answer. This client
does only what the proxy needs: write the request head and body as given, parse
the response head, and hand the body back whole or piece by piece.

Wire behaviour:
- the request head is written exactly as given (header order and case kept),
  in one write together with a ``bytes`` body; an async-iterable body is sent
  with ``Transfer-Encoding: chunked`` while the response is already being read
  (an upstream may answer before it has read everything);
- POST, PUT and PATCH without a body get ``Content-Length: 0``;
- response framing: no body for HEAD, 1xx, 204 and 304; ``Transfer-Encoding:
  chunked`` decoded (trailers dropped); else ``Content-Length``; else until EOF;
- a connection goes back to the pool only after a complete response without
  ``Connection: close`` on HTTP/1.1 and with nothing left in its read buffer;
  one holding bytes beyond the response (a function that over-sends, e.g. a
  ``Content-Length`` counted in characters) is closed, at release and again
  when taken from the pool, as Go's transport closes a connection on
  unsolicited data: those bytes would be read as the next request's answer;
  pooled connections idle longer than
  ``idle_timeout`` are closed rather than reused (an upstream may be closing
  them at the same moment);
- a reused connection that closes before any byte of the response is retried
  once on a new connection when the request can be replayed (idempotent method,
  ``bytes`` or no body): the upstream dropped an idle connection, it did not
  see the request.

Invariants: header bytes never contain CR or LF (the head is parsed by lines,
and request headers come from aiohttp's parser); a connection whose response
was not read to the end is closed, never reused; timeouts are the caller's
(cancellation closes the connection).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterable
from typing import Any, cast

MAX_HEAD = 1 << 20  # bytes of response status line + headers
READ_PIECE = 1 << 16
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NEEDS_LENGTH = frozenset({"POST", "PUT", "PATCH"})

Body = bytes | AsyncIterable[bytes] | None


def _streamed(body: Body) -> bool:
    # Concrete types, not isinstance(AsyncIterable): the ABC check costs on every request.
    return body is not None and not isinstance(body, (bytes, bytearray, memoryview))

class UpstreamError(Exception):
    """The upstream could not be reached or failed before a complete response head."""


class ConnectFailed(UpstreamError):
    pass


class _Stale(Exception):
    """A reused connection closed before answering."""


class _Conn:
    __slots__ = ("reader", "writer", "last_used", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = 0.0
        self.reused = False

    def close(self) -> None:
        self.writer.close()

    def unsolicited(self) -> bool:
        """True when bytes arrived that no request asked for (yet)."""
        # StreamReader has no public way to peek at its buffer; reading would block.
        return bool(self.reader._buffer)  # type: ignore[attr-defined]


class Response:
    """The upstream's answer; read the body once (``read`` or ``iter_chunks``)."""

    __slots__ = ("status", "reason", "headers", "content_length", "_chunked", "_until_eof",
                 "_remaining", "_conn", "_pool", "_keep", "_done", "_writer_task")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]],
                 content_length: int | None, chunked: bool, no_body: bool, keep: bool,
                 conn: _Conn, pool: Pool, writer_task: asyncio.Task[None] | None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = None if chunked else content_length
        self._chunked = chunked and not no_body
        self._until_eof = not no_body and not chunked and content_length is None
        self._remaining = 0 if no_body or chunked or content_length is None else content_length
        self._conn: _Conn | None = conn
        self._pool = pool
        self._keep = keep and not self._until_eof
        self._done = no_body or (not chunked and content_length == 0)
        self._writer_task = writer_task
        if self._done:
            self._finish()

    async def read(self) -> bytes:
        if self._done:
            return b""
        if not self._chunked and not self._until_eof:
            conn = self._require()
            try:
                data = await conn.reader.readexactly(self._remaining)
            except BaseException:
                self.close()
                raise
            self._remaining = 0
            self._finish()
            return data
        return b"".join([piece async for piece in self.iter_chunks()])

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises on a short or broken body."""
        if self._done:
            return
        conn = self._require()
        reader = conn.reader
        try:
            if self._chunked:
                while True:
                    line = await reader.readuntil(b"\r\n")
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while (await reader.readuntil(b"\r\n")) != b"\r\n":
                            pass  # trailers: not forwarded
                        break
                    while size > 0:
                        piece = await reader.read(min(size, READ_PIECE))
                        if not piece:
                            raise asyncio.IncompleteReadError(b"", size)
                        size -= len(piece)
                        yield piece
                    if await reader.readexactly(2) != b"\r\n":
                        raise UpstreamError("malformed chunked body")
            elif self._until_eof:
                while piece := await reader.read(READ_PIECE):
                    yield piece
            else:
                while self._remaining > 0:
                    piece = await reader.read(min(self._remaining, READ_PIECE))
                    if not piece:
                        raise asyncio.IncompleteReadError(b"", self._remaining)
                    self._remaining -= len(piece)
                    yield piece
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
        task = self._writer_task
        if task is not None and not task.done():
            # The upstream answered before taking the whole body: the connection
            # is mid-request, so it cannot be reused.
            task.cancel()
            conn.close()
        elif self._keep:
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
        try:
            if self.unix_path is not None:
                reader, writer = await asyncio.open_unix_connection(self.unix_path,
                                                                    limit=MAX_HEAD)
            else:
                reader, writer = await asyncio.open_connection(self.host, self.port,
                                                               limit=MAX_HEAD, ssl=self.tls)
        except OSError as exc:
            where = self.unix_path or f"{self.host}:{self.port}"
            raise ConnectFailed(f"cannot connect to {where}: {exc}") from exc
        return _Conn(reader, writer)

    def _acquire_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used: least likely to be stale
            if now - conn.last_used < self.idle_timeout and not conn.writer.is_closing() \
                    and not conn.reader.at_eof() and not conn.unsolicited():
                conn.reused = True
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn) -> None:
        if self._closed or conn.writer.is_closing() or conn.unsolicited():
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
        try:
            if _streamed(body):
                conn.writer.write(head)
                writer_task = asyncio.ensure_future(
                    _write_chunked(conn.writer, cast(AsyncIterable[bytes], body)))
            else:
                # One syscall either way; writelines spares copying a large body.
                data = cast("bytes | None", body)
                conn.writer.writelines((head, data) if data else (head,))
            return await self._read_head(conn, method, writer_task)
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

    async def _read_head(self, conn: _Conn, method: str,
                         writer_task: asyncio.Task[None] | None) -> Response:
        while True:
            if writer_task is None:
                raw = await self._read_until_head(conn)
            else:
                raw = await _race(self._read_until_head(conn), writer_task)
            status_line, _, rest = raw.partition(b"\r\n")
            parts = status_line.split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise UpstreamError(f"malformed status line {status_line[:80]!r}")
            try:
                status = int(parts[1])
            except ValueError:
                raise UpstreamError(f"malformed status line {status_line[:80]!r}") from None
            if 100 <= status < 200 and status != 101:
                continue  # interim response (e.g. 103): not forwarded
            break
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        close = parts[0] == b"HTTP/1.0"
        for line in rest[:-4].split(b"\r\n") if rest else ():
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().decode("latin-1")
            text = value.strip().decode("utf-8", "replace")
            low = key.lower()
            if low == "content-length":
                try:
                    length = int(text)
                except ValueError:
                    raise UpstreamError(f"malformed Content-Length {text!r}") from None
            elif low == "transfer-encoding":
                chunked = "chunked" in text.lower()
            elif low == "connection":
                tokens = text.lower()
                close = "close" in tokens or (close and "keep-alive" not in tokens)
            headers.append((key, text))
        no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
        return Response(status, reason, headers, length, chunked, no_body, not close, conn,
                        self, writer_task)

    async def _read_until_head(self, conn: _Conn) -> bytes:
        try:
            return await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if conn.reused and not exc.partial:
                raise _Stale() from None
            raise UpstreamError("upstream closed the connection before a complete "
                                "response head") from None
        except asyncio.LimitOverrunError:
            raise UpstreamError(f"response head larger than {MAX_HEAD} bytes") from None
        except ConnectionError as exc:
            if conn.reused:
                raise _Stale() from None
            raise UpstreamError(f"connection to the upstream broke: {exc}") from None


async def _race(read: Coroutine[Any, Any, bytes], writer_task: asyncio.Task[None]) -> bytes:
    """Read the head while the body is written; a failed body write wins."""
    reading = asyncio.ensure_future(read)
    done, _ = await asyncio.wait({reading, writer_task}, return_when=asyncio.FIRST_COMPLETED)
    if reading in done:
        return reading.result()
    exc = writer_task.exception()
    if exc is not None:
        reading.cancel()
        raise exc
    return await reading


async def _write_chunked(writer: asyncio.StreamWriter, body: AsyncIterable[bytes]) -> None:
    async for piece in body:
        if piece:
            writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
    writer.write(b"0\r\n\r\n")
    await writer.drain()


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
