"""Hostile or broken clients get a clear error and the watchdog stays healthy."""

from __future__ import annotations

import socket
import time

from tests.conftest import fetch, http_status


def _raw(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data``, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_malformed_request_line_is_400(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    assert _status(_raw(wd.port, b"THIS IS NOT HTTP\r\n\r\n")) == 400
    assert _status(_raw(wd.port, b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n")) == 400
    assert http_status(wd.url + "/_/health") == 200


def test_header_floods_are_refused(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
    answer = _raw(wd.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert _status(answer) in (400, 431)
    huge = b"X-Big: " + b"a" * (200 * 1024) + b"\r\n"
    answer = _raw(wd.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + huge + b"\r\n")
    assert _status(answer) in (400, 431)
    # A large but reasonable header (a 20 kB JWT) is fine, as with of-watchdog.
    assert fetch(wd.url + "/echo", headers={"Authorization": "Bearer " + "j" * 20000}).status == 200
    assert http_status(wd.url + "/_/health") == 200


def test_body_past_max_body_size_is_413(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(max_body_size="1000"))
    wd.wait_ready()
    reply = fetch(wd.url + "/echo", "POST", body=b"x" * 2000)
    assert reply.status == 413
    # Chunked: no length up front, stopped while streaming.
    reply = fetch(wd.url + "/echo", "POST", body=iter([b"y" * 600] * 400))  # type: ignore[arg-type]
    assert reply.status == 413
    # Buffered the same.
    assert fetch(wd.url + "/echo", "POST", body=b"z" * 999).status == 200
    assert http_status(wd.url + "/_/health") == 200


def test_buffered_body_past_max_body_size_is_413(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(max_body_size="1000", buffer_http="true"))
    wd.wait_ready()
    reply = fetch(wd.url + "/echo", "POST", body=iter([b"y" * 600] * 4))  # type: ignore[arg-type]
    assert reply.status == 413


def test_slow_headers_are_cut_after_read_timeout(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(read_timeout="1s"))
    wd.wait_ready()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", wd.port), timeout=15) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert sock.recv(65536) == b""  # closed by the watchdog
    assert time.monotonic() - started < 10
    assert http_status(wd.url + "/_/health") == 200


def test_slow_body_is_408_after_read_timeout(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(read_timeout="1s"))
    wd.wait_ready()
    started = time.monotonic()
    answer = _raw(wd.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                  + b"only ten!!", timeout=15)
    assert time.monotonic() - started < 10
    assert answer == b"" or _status(answer) == 408
    # Chunked and slow, streamed towards the function: the same deadline.
    answer = _raw(wd.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n", timeout=15)
    assert answer == b"" or _status(answer) == 408
    assert http_status(wd.url + "/_/health") == 200
