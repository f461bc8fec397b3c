"""The lean upstream client against scripted raw servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from fwatchdog.upstream import PAUSE_AT, BrokenBody, MalformedResponse, Pool, UpstreamError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.AbstractServer, int, list[int]]:
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, connections


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head + await reader.readexactly(int(line.split(b":")[1]))
    if b"transfer-encoding: chunked" in head.lower():
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return head + body
    return head


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_content_length_keep_alive_and_exact_head():
    seen: list[bytes] = []

    async def handler(reader, writer):
        while True:
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok")

    async def main():
        server, port, conns = await _serve(handler)
        pool = Pool("127.0.0.1", port)
        for _ in range(3):
            resp = await pool.request("POST", "/p?q=1", [("Host", "h"), ("X-Y", "z")], b"abc")
            assert (resp.status, resp.reason, await resp.read()) == (201, "Created", b"ok")
            assert ("X-A", "1") in resp.headers and resp.content_length == 2
        assert len(conns) == 1  # reused
        pool.close()
        server.close()

    run(main())
    assert seen[0] == b"POST /p?q=1 HTTP/1.1\r\nHost: h\r\nX-Y: z\r\nContent-Length: 3\r\n\r\nabc"


def test_chunked_response_and_streamed_request_body():
    async def handler(reader, writer):
        request = await _read_request(reader)
        assert b"Transfer-Encoding: chunked" in request and b"Content-Length" not in request
        assert request.endswith(b"\r\n\r\none\r\ntwo\r\n\r\n")  # chunks decoded
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n")
        await reader.read()

    async def body():
        yield b"one"
        yield b"two"

    async def main():
        server, port, _ = await _serve(handler)
        pool = Pool("127.0.0.1", port)
        resp = await pool.request("PUT", "/", [("Host", "h"), ("Content-Length", "6")], body())
        assert resp.content_length is None
        assert [piece async for piece in resp.iter_chunks()] == [b"abc", b"defg"]
        pool.close()
        server.close()

    run(main())


def test_close_delimited_body_and_connection_close_are_not_reused():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")

    async def main():
        server, port, conns = await _serve(handler)
        pool = Pool("127.0.0.1", port)
        for _ in range(2):
            resp = await pool.request("GET", "/", [("Host", "h")])
            assert await resp.read() == b"all of it"
        assert len(conns) == 2
        pool.close()
        server.close()

    run(main())


def test_stale_pooled_connection_is_retried_for_idempotent_requests():
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk")
        await writer.drain()
        await _read_request(reader)  # then close without answering: an idle close

    async def main():
        server, port, conns = await _serve(handler)
        pool = Pool("127.0.0.1", port, idle_timeout=30)
        assert await (await pool.request("GET", "/", [("Host", "h")])).read() == b"k"
        resp = await pool.request("GET", "/", [("Host", "h")])  # stale, retried
        assert await resp.read() == b"k" and len(conns) == 2
        # POST is not replayed: the error surfaces.
        with pytest.raises(UpstreamError):
            await pool.request("POST", "/", [("Host", "h")], b"x")
        pool.close()
        server.close()

    run(main())


def test_truncated_body_raises_and_head_errors_are_upstream_errors():
    async def short(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    async def garbage(reader, writer):
        await _read_request(reader)
        writer.write(b"NOT HTTP\r\n\r\n")

    async def main():
        server, port, _ = await _serve(short)
        pool = Pool("127.0.0.1", port)
        resp = await pool.request("GET", "/", [("Host", "h")])
        with pytest.raises(BrokenBody):
            await resp.read()
        server.close()
        server, port, _ = await _serve(garbage)
        with pytest.raises(UpstreamError):
            await Pool("127.0.0.1", port).request("GET", "/", [("Host", "h")])
        server.close()
        with pytest.raises(UpstreamError):
            await Pool("127.0.0.1", 1).request("GET", "/", [("Host", "h")])

    run(main())


def test_early_answer_during_upload_is_read_and_connection_dropped():
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async def endless():
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0.01)

    async def main():
        server, port, _ = await _serve(handler)
        pool = Pool("127.0.0.1", port)
        resp = await asyncio.wait_for(pool.request("POST", "/", [("Host", "h")], endless()), 5)
        assert resp.status == 413 and await resp.read() == b""
        assert not pool._idle  # mid-upload: never pooled
        pool.close()
        server.close()

    run(main())


SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nPWNED"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_connection_with_bytes_beyond_the_response_is_closed_not_pooled(method):
    # A function that over-sends (a Content-Length counted in characters, a body
    # on a HEAD answer): the extra bytes must never be read as the next response.
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + SMUGGLED)
        await writer.drain()
        try:
            await _read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")  # pragma: no cover

    async def fresh(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        await writer.drain()

    handlers = [handler, fresh]

    async def main():
        server, port, conns = await _serve(lambda r, w: handlers[len(conns) - 1](r, w))
        pool = Pool("127.0.0.1", port, idle_timeout=30)
        first = await pool.request(method, "/", [("Host", "h")])
        assert await first.read() == (b"" if method == "HEAD" else b"ok")
        assert not pool._idle
        second = await pool.request("GET", "/", [("Host", "h")])
        assert (second.status, await second.read()) == (200, b"second")
        assert len(conns) == 2
        pool.close()
        server.close()

    run(main())


def test_idle_connection_that_received_unsolicited_bytes_is_not_reused():
    extra = asyncio.Event()

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await extra.wait()  # the client has pooled the connection
        writer.write(SMUGGLED)
        await writer.drain()
        try:
            await _read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmine")  # pragma: no cover

    async def fresh(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        await writer.drain()

    handlers = [handler, fresh]

    async def main():
        server, port, conns = await _serve(lambda r, w: handlers[len(conns) - 1](r, w))
        pool = Pool("127.0.0.1", port, idle_timeout=30)
        assert await (await pool.request("GET", "/", [("Host", "h")])).read() == b"ok"
        assert len(pool._idle) == 1
        idle = pool._idle[0]
        extra.set()
        deadline = asyncio.get_running_loop().time() + 5
        while idle.usable():  # poll: the unsolicited bytes reach the connection
            assert asyncio.get_running_loop().time() < deadline, "no unsolicited bytes"
            await asyncio.sleep(0.01)
        second = await pool.request("GET", "/", [("Host", "h")])
        assert (second.status, await second.read()) == (200, b"second")
        assert len(conns) == 2
        pool.close()
        server.close()

    run(main())


def test_head_answer_then_reuse_of_the_same_connection():
    # llhttp is not told that a request was HEAD: the pool must still read the
    # next answer on that connection as a new response.
    async def handler(reader, writer):
        while True:
            try:
                request = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if request.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    async def main():
        server, port, conns = await _serve(handler)
        pool = Pool("127.0.0.1", port, idle_timeout=30)
        head = await pool.request("HEAD", "/", [("Host", "h")])
        assert (head.status, head.content_length, await head.read()) == (200, 5, b"")
        for _ in range(2):
            resp = await pool.request("GET", "/", [("Host", "h")])
            assert await resp.read() == b"get"
        assert len(conns) == 1
        pool.close()
        server.close()

    run(main())


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
])
def test_malformed_responses_raise_before_a_status_is_seen(raw):
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(raw)
        await writer.drain()

    async def main():
        server, port, _ = await _serve(handler)
        with pytest.raises(MalformedResponse):
            await Pool("127.0.0.1", port).request("GET", "/", [("Host", "h")])
        server.close()

    run(main())


def test_a_slowly_read_large_body_arrives_whole_over_a_unix_socket(tmp_path):
    size = 8 * PAUSE_AT + 123
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
        await writer.drain()

    async def main():
        path = str(tmp_path / "up.sock")
        server = await asyncio.start_unix_server(handler, path)
        pool = Pool("unused", 0, unix_path=path)
        resp = await pool.request("GET", "/", [("Host", "h")])
        got = bytearray()
        async for piece in resp.iter_chunks():
            got += piece
            await asyncio.sleep(0)  # a reader slower than the socket: reading pauses
        assert bytes(got) == body
        pool.close()
        server.close()

    run(main())
