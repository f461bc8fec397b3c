"""mode=http's lean front (``fwatchdog.modes.http_fast``): connections, framing, handover.

Every test talks raw HTTP/1.1 over one socket where the wire matters: keep-alive,
pipelining, framing of relayed bodies, and connections that the front hands to
aiohttp in the middle of their life.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass

from tests.conftest import http_status, wait_until

INTERNAL = "X-OpenFaaS-Internal"


def pattern(n: int) -> bytes:
    """What the test function's ``/big?n=N`` answers."""
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class Raw:
    """One client connection; reads responses exactly as framed, so framing bugs show."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, path: str, extra: str = "", method: str = "GET") -> None:
        self.send(f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed; unread {self.buf[:200]!r}")
        self.buf += chunk

    def _until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(sep)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, *, head: bool = False) -> RawReply:
        lines = self._until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head or status in (100, 204, 304):
            return RawReply(status, headers, b"")
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    assert self._until(b"\r\n") == b""  # no trailers
                    return RawReply(status, headers, body)
                body += self._exactly(size)
                assert self._exactly(2) == b"\r\n"
        if "content-length" in headers:
            return RawReply(status, headers, self._exactly(int(headers["content-length"])))
        while True:  # delimited by close
            try:
                self._fill()
            except EOFError:
                body, self.buf = self.buf, b""
                return RawReply(status, headers, body)

    def closed_by_server(self) -> bool:
        return self.buf == b"" and self.sock.recv(65536) == b""


def test_keep_alive_reuses_the_client_and_the_upstream_connection(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        ports = []
        for _ in range(3):
            raw.get("/peer")
            reply = raw.response()
            assert reply.status == 200
            assert reply.headers.get("x-duration-seconds")
            ports.append(reply.body)
        # One upstream connection served all three: the pool kept it alive.
        assert len(set(ports)) == 1, ports
    finally:
        raw.close()


def test_pipelined_requests_are_answered_in_order(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        # The first is held by the function: the second must still come second.
        raw.send(b"GET /hold?release=p1 HTTP/1.1\r\nHost: t\r\n\r\n"
                 b"POST /echo/two HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
                 b"GET /echo/three?x=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: upstream.seen("held-p1"), what="the held request to arrive")
        upstream.signal("p1")
        first, second, third = raw.response(), raw.response(), raw.response()
        assert first.status == 200 and first.body == b"released p1"
        seen = json.loads(second.body)
        assert (seen["method"], seen["path_qs"], seen["body"]) == ("POST", "/echo/two", "abc")
        assert json.loads(third.body)["path_qs"] == "/echo/three?x=1"
    finally:
        raw.close()


def test_chunked_upstream_response_is_relayed_chunked_and_the_connection_reused(
        watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/big?n=300000&chunked=1")
        reply = raw.response()
        assert reply.status == 200
        assert reply.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in reply.headers
        assert reply.body == pattern(300000)
        raw.get("/peer")
        assert raw.response().status == 200
    finally:
        raw.close()


def test_responses_larger_than_a_read_buffer_arrive_whole(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        # Below the whole-response limit (read whole, one write) and above it (streamed).
        for n in (200_000, 3_000_000):
            raw.get(f"/big?n={n}")
            reply = raw.response()
            assert reply.status == 200
            assert reply.headers.get("content-length") == str(n)
            assert reply.body == pattern(n), n
    finally:
        raw.close()


def test_head_answer_has_the_length_but_no_body(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/big?n=5000", method="HEAD")
        reply = raw.response(head=True)
        assert reply.status == 200 and reply.headers.get("content-length") == "5000"
        # Had a body been sent, this would parse it as the next response.
        raw.get("/echo/after-head")
        assert json.loads(raw.response().body)["path_qs"] == "/echo/after-head"
    finally:
        raw.close()


def test_expect_continue_after_a_plain_request_on_the_same_connection(watchdog_factory,
                                                                      upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/peer")
        assert raw.response().status == 200
        raw.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
        assert raw.response().status == 100
        raw.send(b"hello")
        seen = json.loads(raw.response().body)
        assert seen["body"] == "hello"
        assert "expect" not in {k.lower() for k, _ in seen["headers"]}
        raw.get("/echo/next")
        assert json.loads(raw.response().body)["path_qs"] == "/echo/next"
    finally:
        raw.close()


def test_health_and_ready_after_a_plain_request_on_the_same_connection(watchdog_factory,
                                                                       upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/peer")
        assert raw.response().status == 200
        raw.get("/_/health")
        reply = raw.response()
        assert reply.status == 200 and reply.body == b"OK"
        raw.get("/_/ready")
        assert raw.response().status == 200
    finally:
        raw.close()


def test_upstream_dropping_an_idle_connection_retries_only_what_is_safe(watchdog_factory,
                                                                       upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/doom")
        assert raw.response().status == 200
        # The pooled connection is dropped when this GET arrives on it: a GET is
        # safe to send again, on a new connection.
        raw.get("/echo/retried")
        reply = raw.response()
        assert upstream.seen("doomed-dropped-GET")
        assert reply.status == 200 and json.loads(reply.body)["path_qs"] == "/echo/retried"

        raw.get("/doom")
        assert raw.response().status == 200
        # A POST may have had effects: never sent twice, the client hears of the failure.
        raw.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
        reply = raw.response()
        assert upstream.seen("doomed-dropped-POST")
        assert reply.status == 500 and reply.headers.get(INTERNAL.lower()) == "of-watchdog"
        raw.get("/echo/still-served")
        assert raw.response().status == 200
    finally:
        raw.close()


def test_plain_request_for_a_chunked_stream_is_flushed_chunk_by_chunk(watchdog_factory,
                                                                      upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=10)
    try:
        conn.request("GET", "/sse?release=plain-go")  # no Accept: a plain request
        resp = conn.getresponse()
        assert resp.status == 200
        # The function has not been released: the first event must already be here.
        assert resp.read1(65536) == b"data: first\n\n"
        assert not upstream.seen("plain-go")
        upstream.signal("plain-go")
        assert resp.read() == b"data: second\n\n"
    finally:
        conn.close()


def test_sse_after_a_plain_request_on_the_same_connection_is_streamed(watchdog_factory,
                                                                      upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", wd.port, timeout=10)
    try:
        conn.request("GET", "/peer")
        assert conn.getresponse().read()
        conn.request("GET", "/sse?release=sse-later", headers={"Accept": "text/event-stream"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read1(65536) == b"data: first\n\n"
        assert not upstream.seen("sse-later")
        upstream.signal("sse-later")
        assert resp.read() == b"data: second\n\n"
    finally:
        conn.close()


def test_connection_close_is_honoured(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/peer", "Connection: close\r\n")
        reply = raw.response()
        assert reply.status == 200 and reply.headers.get("connection") == "close"
        assert raw.closed_by_server()
    finally:
        raw.close()


def test_idle_keep_alive_connection_is_closed_after_read_timeout(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(read_timeout="1s"))
    wd.wait_ready()
    raw = Raw(wd.port)
    try:
        raw.get("/peer")
        assert raw.response().status == 200
        started = time.monotonic()
        assert raw.closed_by_server()  # recv blocks until the watchdog closes
        assert 0.5 < time.monotonic() - started < 10
    finally:
        raw.close()
    assert http_status(wd.url + "/_/health") == 200


def test_bare_lf_request_is_answered_without_waiting_for_a_crlf(watchdog_factory, upstream):
    # Go and llhttp accept bare LF line endings; the lean front only parses CRLF
    # heads, so it must hand such a request over, not wait for a CRLF that never
    # comes (here read_timeout is far longer than the client's patience).
    wd = watchdog_factory(upstream.env(read_timeout="60s"))
    wd.wait_ready()
    for head in (b"GET /peer HTTP/1.1\nHost: t\n\n", b"GET /peer HTTP/1.1\r\nHost: t\n\r\n"):
        raw = Raw(wd.port, timeout=10.0)
        try:
            raw.send(head)
            reply = raw.response()
            assert reply.status in (200, 400)
        finally:
            raw.close()
    assert http_status(wd.url + "/_/health") == 200


def test_read_timeout_zero_means_no_limit_on_either_front(watchdog_factory, upstream):
    # of-watchdog hands read_timeout to Go's http.Server, where 0 is no timeout:
    # connections must not be closed before (or right after) their request.
    wd = watchdog_factory(upstream.env(read_timeout="0"))
    wd.wait_ready()
    raw = Raw(wd.port, timeout=10.0)
    try:
        for _ in range(2):  # the lean front, keep-alive
            raw.get("/peer")
            assert raw.response().status == 200
        # Handed to aiohttp: its body read has no deadline, and it keeps the
        # connection alive afterwards.
        raw.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                 b"Expect: 100-continue\r\n\r\n")
        assert raw.response().status == 100
        raw.send(b"hello")
        assert json.loads(raw.response().body)["body"] == "hello"
        # A request on another connection lets the watchdog's loop run on: a
        # zero-second idle timer would have closed this connection by then.
        assert http_status(wd.url + "/_/health") == 200
        for path in ("/_/health", "/echo/still-open"):
            raw.get(path)
            assert raw.response().status == 200
    finally:
        raw.close()


def test_escaped_internal_path_is_routed_alike_on_both_fronts(watchdog_factory, upstream):
    # aiohttp routes on the decoded path, so /%5F/health is the watchdog's own
    # health endpoint there; the lean front must not send it to the function.
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    fresh = Raw(wd.port)  # the lean front decides
    handed = Raw(wd.port)  # aiohttp owns this connection after the 100-continue
    try:
        handed.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                    b"Expect: 100-continue\r\n\r\n")
        assert handed.response().status == 100
        handed.send(b"hi")
        assert handed.response().status == 200
        for raw in (fresh, handed):
            raw.get("/%5F/health")
            reply = raw.response()
            assert (reply.status, reply.body) == (200, b"OK")
            assert "x-duration-seconds" not in reply.headers  # not proxied
    finally:
        fresh.close()
        handed.close()


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_pipelined_requests_wait_for_a_client_that_does_not_read(watchdog_factory, upstream):
    # Answers the client does not read must not pile up in the watchdog: the
    # next pipelined request is served only once the last answer has drained.
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    count, size = 300, 1_000_000  # 300 MB of answers, each read whole by the front
    raw = Raw(wd.port, timeout=30.0)
    try:
        baseline = _rss_bytes(wd.proc.pid)
        raw.send(b"".join(b"GET /big?n=%d HTTP/1.1\r\nHost: t\r\n\r\n" % (size + i)
                          for i in range(count)))
        # Read nothing for a while; unbounded, the front would have buffered
        # every answer by the end of this window.
        window = time.monotonic() + 3.0
        while time.monotonic() < window:
            growth = _rss_bytes(wd.proc.pid) - baseline
            assert growth < 200_000_000, f"watchdog grew by {growth} bytes"
            time.sleep(0.05)  # sampling interval of an observation window
        for i in range(count):
            reply = raw.response()
            assert reply.status == 200
            assert reply.body == pattern(size + i), i  # complete, and in request order
    finally:
        raw.close()
