"""The python3-llm handler server with stand-in functions (no model, no torch).

Each scenario starts the template's real aiohttp runner on a free port in a thread
and talks to it over TCP: python3-http's return conventions, streamed iterators
(raw and server-sent events), and what a client disconnect does to a running
``handle`` and to a stream.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fwatchdog.llm import handler_server as hs

TIMEOUT = 20.0




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    """One server in a background thread with its own event loop."""

    def __init__(self, handle: Callable[..., Any], **config: Any) -> None:
        self.port = free_port()
        self.config = hs.Config(port=self.port, hostname="fn-host", **config)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(handle),))
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "server did not start"

    async def _main(self, handle: Callable[..., Any]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        runner = hs.make_runner(handle, self.config)
        await runner.setup()
        await hs.web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(TIMEOUT)

    def request(
        self, method: str = "GET", path: str = "/", body: bytes = b"", headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def open(self, path: str = "/", headers: str = "") -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        return sock


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[..., Any]], Running]]:
    started: list[Running] = []

    def start(handle: Callable[..., Any], **config: Any) -> Running:
        server = Running(handle, **config)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def read_until(sock: socket.socket, needle: bytes) -> bytes:
    got = b""
    while needle not in got:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {needle!r}: {got!r}"
        got += chunk
    return got


# ------------------------------------------------------------------ python3-http's contract


def test_the_event_and_context_carry_python3_https_fields(serve) -> None:
    def handle(event: Any, context: Any) -> dict:
        return {
            "body": {
                "method": event.method,
                "path": event.path,
                "query": dict(event.query),
                "body": event.body.decode(),
                "header": event.headers.get("x-custom"),  # case-insensitive
                "hostname": context.hostname,
                "cancelled": context.cancelled.is_set(),
            }
        }

    server = serve(handle)
    status, headers, body = server.request("PUT", "/a/b?x=1", b"payload", {"X-Custom": "v"})
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert json.loads(body) == {
        "method": "PUT",
        "path": "/a/b",
        "query": {"x": "1"},
        "body": "payload",
        "header": "v",
        "hostname": "fn-host",
        "cancelled": False,
    }


@pytest.mark.parametrize(
    ("result", "status", "content_type", "body"),
    [
        (None, 200, None, b""),
        ({"statusCode": 201, "body": {"ok": True}}, 201, "application/json", b'{"ok": true}'),
        ({"body": [1, 2]}, 200, "application/json", b"[1, 2]"),
        ({"body": "<p>hi</p>"}, 200, "text/html; charset=utf-8", b"<p>hi</p>"),
        ({"body": b"\x00\x01"}, 200, "application/octet-stream", b"\x00\x01"),
        (
            {"statusCode": 418, "headers": {"Content-Type": "text/plain"}, "body": "teapot"},
            418,
            "text/plain",
            b"teapot",
        ),
        ({"statusCode": 404}, 404, None, b""),
        ("plain", 200, "text/html; charset=utf-8", b"plain"),
    ],
)
def test_return_values_map_as_in_python3_http(
    serve, result: Any, status: int, content_type: str | None, body: bytes
) -> None:
    server = serve(lambda event, context: result)
    got_status, headers, got_body = server.request()
    assert (got_status, got_body) == (status, body)
    if content_type is not None:
        assert headers["content-type"] == content_type


def test_custom_headers_are_sent(serve) -> None:
    server = serve(lambda e, c: {"headers": {"X-Model": "m"}, "body": ""})
    assert server.request()[1]["x-model"] == "m"


def test_a_failing_handler_is_a_500_and_the_server_lives_on(serve) -> None:
    def handle(event: Any, context: Any) -> None:
        if event.path == "/boom":
            raise RuntimeError("boom")

    server = serve(handle)
    assert server.request(path="/boom")[0] == 500
    assert server.request()[0] == 200


def test_async_handlers_are_awaited(serve) -> None:
    async def handle(event: Any, context: Any) -> dict:
        await asyncio.sleep(0)
        return {"body": {"async": True}}

    assert json.loads(serve(handle).request()[2]) == {"async": True}


# ------------------------------------------------------------------ streaming


def test_an_iterator_streams_raw_chunks_without_sse_accept(serve) -> None:
    server = serve(lambda e, c: iter([b"a", "b", {"c": 1}]))
    status, headers, body = server.request()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "application/octet-stream"
    assert body == b'ab{"c": 1}\n'


def test_sse_framing_when_the_client_accepts_event_streams(serve) -> None:
    server = serve(lambda e, c: iter([{"n": 1}, "two\nlines", "[DONE]"]))
    _, headers, body = server.request(headers={"Accept": "text/event-stream"})
    assert headers["content-type"] == "text/event-stream"
    assert body == b'data: {"n": 1}\n\ndata: two\ndata: lines\n\ndata: [DONE]\n\n'


def test_sse_framing_when_the_handler_says_so(serve) -> None:
    def handle(event: Any, context: Any) -> dict:
        return {"headers": {"Content-Type": "text/event-stream"}, "body": iter(["x"])}

    _, headers, body = serve(handle).request(headers={"Accept": "application/json"})
    assert headers["content-type"] == "text/event-stream"
    assert body == b"data: x\n\n"


def test_sse_lines_split_only_where_sse_ends_a_line(serve) -> None:
    # U+2028 and other Unicode line breaks are text inside one data: line.
    server = serve(lambda e, c: iter(["a\u2028b\x85c\x1cd", "x\r\ny\rz\n"]))
    _, _, body = server.request(headers={"Accept": "text/event-stream"})
    assert body == ("data: a\u2028b\x85c\x1cd\n\n"
                    "data: x\ndata: y\ndata: z\ndata: \n\n").encode()


def test_a_body_over_the_limit_is_413_in_openai_s_error_format(serve) -> None:
    server = serve(lambda e, c: {"body": {"length": len(e.body)}}, max_body_size=10)
    assert server.request("POST", body=b"x" * 10)[0] == 200
    status, headers, body = server.request("POST", body=b"x" * 11)
    assert status == 413 and headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert "11 bytes" in error["message"]
    # Without a Content-Length (chunked), the limit holds as the body is read.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"b\r\nxxxxxxxxxxx\r\n0\r\n\r\n")
        assert read_until(sock, b"\r\n").startswith(b"HTTP/1.1 413 ")


def test_each_item_is_flushed_while_the_loop_stays_free(serve) -> None:
    release = threading.Event()

    def handle(event: Any, context: Any) -> Any:
        if event.path == "/health":
            return "ok"

        def items() -> Iterator[str]:
            yield "first"
            release.wait(TIMEOUT)  # model work in progress
            yield "second"

        return items()

    server = serve(handle)
    sock = server.open(headers="Accept: text/event-stream\r\n")
    try:
        read_until(sock, b"data: first\n\n")
        # The generator is blocked in a worker thread; others are still answered.
        assert server.request(path="/health")[2] == b"ok"
        release.set()
        read_until(sock, b"data: second\n\n")
    finally:
        sock.close()


def test_a_stream_that_fails_midway_is_cut_not_ended_cleanly(serve) -> None:
    closed = threading.Event()

    def handle(event: Any, context: Any) -> Any:
        if event.path == "/ok":
            return "ok"

        def failing() -> Iterator[str]:
            try:
                yield "partial"
                raise RuntimeError("model crashed")
            finally:
                closed.set()

        return failing()

    server = serve(handle)
    with pytest.raises(http.client.IncompleteRead) as caught:
        server.request()
    assert caught.value.partial == b"partial"
    assert closed.wait(TIMEOUT)
    assert server.request(path="/ok")[2] == b"ok"  # the server itself is fine


# ------------------------------------------------------------------ disconnects


def test_a_disconnect_mid_stream_closes_the_generator(serve) -> None:
    closed = threading.Event()
    contexts: list[Any] = []

    def handle(event: Any, context: Any) -> Iterator[str]:
        contexts.append(context)

        def forever() -> Iterator[str]:
            try:
                n = 0
                while True:
                    n += 1
                    yield f"token {n}"
            finally:
                closed.set()

        return forever()

    server = serve(handle)
    sock = server.open(headers="Accept: text/event-stream\r\n")
    read_until(sock, b"token 3")
    sock.close()
    assert closed.wait(TIMEOUT), "the generator's finally never ran"
    assert contexts[0].cancelled.is_set()


def test_a_disconnect_during_handle_sets_cancelled_and_closes_its_result(serve) -> None:
    entered = threading.Event()
    observed = threading.Event()
    closed = threading.Event()

    def handle(event: Any, context: Any) -> Iterator[str]:
        entered.set()
        if context.cancelled.wait(TIMEOUT):
            observed.set()

        def leftover() -> Iterator[str]:
            try:
                yield "never sent"
            finally:
                closed.set()

        gen = leftover()
        next(gen)  # started, so close() runs its finally
        return gen

    server = serve(handle)
    sock = server.open()
    assert entered.wait(TIMEOUT)
    sock.close()
    assert observed.wait(TIMEOUT), "handle never saw context.cancelled"
    assert closed.wait(TIMEOUT), "the abandoned result was never closed"


# ------------------------------------------------------------------ configuration


def test_config_defaults_match_python3_http() -> None:
    config = hs.Config.from_env({})
    assert (config.host, config.port) == ("127.0.0.1", 5000)
    assert config.max_body_size == 16 << 20
    assert hs.Config.from_env({"http_max_body_size": "0"}).max_body_size == 0  # no limit


def test_config_reads_http_port_and_rejects_bad_values() -> None:
    assert hs.Config.from_env({"http_port": "5123", "HOSTNAME": "h"}).port == 5123
    with pytest.raises(ValueError, match="http_port") as caught:
        hs.Config.from_env({"http_port": "http", "http_threads": "-2"})
    assert "http_threads" in str(caught.value)
