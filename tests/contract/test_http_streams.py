"""mode=http: streamed responses (SSE, NDJSON), WebSockets, and cut responses."""

from __future__ import annotations

import asyncio
import http.client
import time

import aiohttp
import pytest

from tests.conftest import fetch, http_status, wait_until

INTERNAL = "X-OpenFaaS-Internal"


def _open(wd, path: str, headers: dict[str, str]) -> tuple[http.client.HTTPConnection,
                                                           http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=10)
    conn.request("GET", path, headers=headers)
    return conn, conn.getresponse()


def test_sse_event_arrives_while_the_function_still_holds_the_stream(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    conn, resp = _open(wd, "/sse?release=sse-go", {"Accept": "text/event-stream"})
    try:
        assert resp.status == 200
        assert resp.getheader("Content-Type") == "text/event-stream"
        # The function has not been released: the first event must already be here.
        first = resp.read1(65536)
        assert first == b"data: first\n\n"
        assert not upstream.seen("sse-go")
        upstream.signal("sse-go")
        assert resp.read() == b"data: second\n\n"
    finally:
        conn.close()


def test_ndjson_lines_are_flushed_one_by_one(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    conn, resp = _open(wd, "/trickle", {"Accept": "application/x-ndjson"})
    try:
        # The function writes a line every 50 ms for 50 s: lines must trickle in.
        assert resp.read1(65536).startswith(b'{"n": 0}')
        got = b""
        while b'{"n": 2}' not in got:
            got += resp.read1(65536)
    finally:
        conn.close()


def test_exec_timeout_applies_to_streams(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(exec_timeout="700ms"))
    wd.wait_ready()
    started = time.monotonic()
    conn, resp = _open(wd, "/trickle", {"Accept": "application/x-ndjson"})
    try:
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()  # cut: no terminating chunk
    finally:
        conn.close()
    assert time.monotonic() - started < 5
    assert http_status(wd.url + "/_/health") == 200


def test_stream_exec_timeout_before_headers_is_504(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(exec_timeout="300ms"))
    wd.wait_ready()
    reply = fetch(wd.url + "/slow?s=10", headers={"Accept": "text/event-stream"})
    assert reply.status == 504 and reply.header(INTERNAL) == "of-watchdog"
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.body.startswith(b"The function did not answer within 300ms")


def test_upstream_closing_mid_response(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    # Small promised body, cut short: nothing was sent yet, so an honest 502.
    reply = fetch(wd.url + "/cut")
    assert reply.status == 502 and reply.header(INTERNAL) == "of-watchdog"
    # Large body, cut after 100 kB: headers are out, the client sees the truncation.
    conn, resp = _open(wd, "/cut-big", {})
    try:
        assert resp.status == 200
        with pytest.raises(http.client.IncompleteRead):
            resp.read()
    finally:
        conn.close()
    assert http_status(wd.url + "/_/health") == 200
    assert wd.proc.poll() is None


def test_websocket_is_proxied_both_ways_and_close_propagates(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()

    async def talk() -> tuple[str, bytes, int | None]:
        async with aiohttp.ClientSession() as session, session.ws_connect(wd.url + "/ws") as ws:
            await ws.send_str("hi")
            text = (await ws.receive(timeout=5)).data
            await ws.send_bytes(b"abc")
            data = (await ws.receive(timeout=5)).data
            await ws.send_str("close")  # the function closes with 4001
            msg = await ws.receive(timeout=5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return text, data, ws.close_code

    text, data, code = asyncio.run(talk())
    assert text == "echo:hi" and data == b"cba" and code == 4001

    async def client_closes() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(wd.url + "/ws") as ws:
            await ws.send_str("x")
            await ws.receive(timeout=5)
            await ws.close(code=4002)

    asyncio.run(client_closes())
    wait_until(lambda: upstream.seen("ws-closed-4002"), timeout=10,
               what="the function to see the client's close code")
