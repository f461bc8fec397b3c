"""mode=http: what crosses the proxy, both ways (docs/contract.md, Modes: http).

Each test starts the real fwatchdog, which starts the test function of
``conftest.UPSTREAM_SCRIPT`` as its ``fprocess``.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from tests.conftest import fetch, http_status, wait_until

INTERNAL = "X-OpenFaaS-Internal"


def test_path_query_method_headers_host_and_body_reach_the_function(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    reply = fetch(wd.url + "/echo/a%20b/c?x=1&y=%2F", "PUT",
                  headers={"X-Custom": "v1", "Content-Type": "text/plain"}, body=b"payload")
    assert reply.status == 200
    seen = json.loads(reply.body)
    assert seen["method"] == "PUT"
    assert seen["path_qs"] == "/echo/a%20b/c?x=1&y=%2F"  # raw, not re-encoded
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-custom"] == "v1"
    assert headers["host"] == f"127.0.0.1:{wd.port}"  # the client's Host, kept
    assert headers["content-type"] == "text/plain"
    assert seen["body"] == "payload"
    # Exactly what the client (http.client) sent: no proxy defaults added.
    assert set(headers) == {"host", "accept-encoding", "content-length", "x-custom",
                            "content-type"}
    assert headers["accept-encoding"] == "identity"


def test_x_duration_seconds_is_added_to_the_response(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    reply = fetch(wd.url + "/echo")
    value = reply.header("X-Duration-Seconds")
    assert value is not None and re.fullmatch(r"\d+\.\d{6}", value), value
    assert 0 < float(value) < 5


def test_hop_by_hop_headers_are_dropped_both_ways(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    reply = fetch(wd.url + "/echo", headers={
        "Connection": "X-Drop", "X-Drop": "1", "Keep-Alive": "timeout=5", "TE": "trailers",
        "X-Stay": "2"})
    headers = {k.lower(): v for k, v in json.loads(reply.body)["headers"]}
    assert "x-drop" not in headers and "keep-alive" not in headers and "te" not in headers
    assert headers["x-stay"] == "2"

    reply = fetch(wd.url + "/hop")
    names = {k.lower() for k, _ in reply.headers}
    assert "x-private" not in names and "keep-alive" not in names
    assert reply.header("X-Kept") == "yes" and reply.header("Set-Cookie") == "a=1"


def test_response_headers_are_not_invented(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    reply = fetch(wd.url + "/plain")
    assert reply.status == 200 and reply.body == b"no type"
    names = {k.lower() for k, _ in reply.headers}
    assert "content-type" not in names and "server" not in names
    # The same through aiohttp, which answers HTTP/1.0 requests.
    with socket.create_connection(("127.0.0.1", wd.port), timeout=10) as client:
        client.sendall(b"GET /plain HTTP/1.0\r\nHost: t\r\n\r\n")
        raw = b""
        while chunk := client.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith("http/1.") and " 200 " in lines[0] and body == b"no type"
    names = {line.split(":", 1)[0] for line in lines[1:]}
    assert "content-type" not in names and "server" not in names


def test_status_and_head_are_relayed(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    assert fetch(wd.url + "/status/418", "DELETE").status == 418
    reply = fetch(wd.url + "/echo", "HEAD")
    assert reply.status == 200 and reply.body == b""
    assert int(reply.header("Content-Length") or "0") > 0  # the upstream's, kept


def test_connection_error_is_500_and_streams_get_502(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    assert fetch(wd.url + "/unlisten").status == 200
    wait_until(lambda: socket.socket().connect_ex(("127.0.0.1", upstream.port)) != 0,
               what="upstream to stop listening")
    reply = fetch(wd.url + "/echo")
    assert reply.status == 500 and reply.header(INTERNAL) == "of-watchdog"
    assert reply.header("X-Duration-Seconds") is not None
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.body == b"The function failed before it answered\n"
    # A streamed request failing before headers: 502, not of-watchdog's empty 200.
    reply = fetch(wd.url + "/sse", headers={"Accept": "text/event-stream"})
    assert reply.status == 502 and reply.header(INTERNAL) == "of-watchdog"
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.body == b"The function failed before its answer was complete\n"
    assert http_status(wd.url + "/_/health") == 200  # the process itself is alive


def test_exec_timeout_is_504(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(exec_timeout="500ms"))
    wd.wait_ready()
    started = time.monotonic()
    reply = fetch(wd.url + "/slow?s=10")
    assert reply.status == 504 and reply.header(INTERNAL) == "of-watchdog"
    assert time.monotonic() - started < 5
    # A reason a client can show, not of-watchdog's empty body.
    assert reply.header("Content-Type") == "text/plain; charset=utf-8"
    assert reply.body == (b"The function did not answer within 500ms "
                          b"(exec_timeout, or the request's shorter X-Timeout)\n")


def test_the_openai_client_gets_the_reason_of_a_504(watchdog_factory, upstream):
    import openai

    wd = watchdog_factory(upstream.env(exec_timeout="500ms"))
    wd.wait_ready()
    client = openai.OpenAI(base_url=wd.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    error = caught.value
    assert error.status_code == 504
    # The client's message shows only a JSON body's error.message; a text body
    # is what it keeps as the error's body (empty in of-watchdog).
    assert str(error) == "Error code: 504"
    assert error.body == ("The function did not answer within 500ms "
                          "(exec_timeout, or the request's shorter X-Timeout)")
    assert error.response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_x_timeout_may_only_shorten_exec_timeout(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(exec_timeout="1s"))
    wd.wait_ready()
    started = time.monotonic()
    assert fetch(wd.url + "/slow?s=10", headers={"X-Timeout": "200ms"}).status == 504
    assert time.monotonic() - started < 0.9
    # Longer than exec_timeout, or zero: ignored, the 1 s limit still holds.
    for value in ("10s", "0s", "nonsense"):
        started = time.monotonic()
        assert fetch(wd.url + "/slow?s=10", headers={"X-Timeout": value}).status == 504
        assert 0.9 < time.monotonic() - started < 5, value
    # Within the limit, the request completes.
    assert fetch(wd.url + "/slow?s=0.1", headers={"X-Timeout": "900ms"}).status == 200


def test_buffer_http_sends_content_length_not_chunked(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(buffer_http="true"))
    wd.wait_ready()
    chunks = iter([b"abc", b"def" * 1000])
    # An iterable body: http.client sends it chunked.
    reply = fetch(wd.url + "/echo", "POST", body=chunks)  # type: ignore[arg-type]
    seen = json.loads(reply.body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["length"] == 3003
    assert headers.get("content-length") == "3003" and "transfer-encoding" not in headers


def test_large_unbuffered_body_is_streamed_chunked(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    piece = b"z" * 65536
    reply = fetch(wd.url + "/echo", "POST", body=iter([piece] * 8))  # type: ignore[arg-type]
    seen = json.loads(reply.body)
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert seen["length"] == 8 * 65536
    assert headers.get("transfer-encoding") == "chunked"


def test_function_output_is_forwarded_with_prefix(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    wd.wait_output("stdout: upstream listening")


def test_function_output_without_prefix(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env(prefix_logs="false"))
    wd.wait_ready()
    wd.wait_output("upstream listening")
    assert not any("stdout: upstream listening" in line for line in wd.output)
    assert any(line.strip() == "upstream listening" for line in wd.output)


def test_expect_100_continue_is_answered_by_the_front(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    import socket as _socket
    with _socket.create_connection(("127.0.0.1", wd.port), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100")
        sock.sendall(b"hello")
        answer = b""
        while b'"length": 5' not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"expect"' not in answer.lower()  # not forwarded: already answered


def test_chunked_response_to_a_plain_request_is_relayed_whole(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    upstream.signal("sse-plain")
    reply = fetch(wd.url + "/sse?release=sse-plain")
    assert reply.status == 200
    assert reply.body == b"data: first\n\ndata: second\n\n"


def test_body_delimited_by_close_is_relayed(watchdog_factory, upstream):
    wd = watchdog_factory(upstream.env())
    wd.wait_ready()
    for _ in range(2):  # and the connection is not reused afterwards
        reply = fetch(wd.url + "/eof")
        assert reply.status == 200 and reply.body == b"until the end"
        assert reply.header("X-Old") == "1"


def _in_flight(wd) -> float:
    text = fetch(f"http://127.0.0.1:{wd.metrics_port}/metrics").body.decode()
    for line in text.splitlines():
        if line.startswith("http_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no http_requests_in_flight sample")


@pytest.mark.parametrize("head", [
    b"GET /linger?name=fast HTTP/1.1\r\nHost: t\r\n\r\n",  # the lean front
    b"GET /linger?name=handed HTTP/1.0\r\nHost: t\r\n\r\n",  # handed to aiohttp
    b"GET /linger?name=stream HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
], ids=["fast", "aiohttp", "stream"])
def test_client_disconnect_cancels_the_upstream_call(watchdog_factory, upstream, head):
    # of-watchdog cancels the upstream request through the request's context when
    # the client goes away; the call must not run on for a client that is gone.
    name = head.split(b"name=")[1].split(b" ")[0].decode()
    wd = watchdog_factory(upstream.env(exec_timeout="60s"))
    wd.wait_ready()
    client = socket.create_connection(("127.0.0.1", wd.port), timeout=10)
    try:
        client.sendall(head)
        wait_until(lambda: upstream.seen("linger-" + name), what="the call to reach the function")
        assert _in_flight(wd) == 1
    finally:
        client.close()
    wait_until(lambda: upstream.seen("linger-closed-" + name), timeout=15,
               what="the upstream connection to be closed")
    wait_until(lambda: _in_flight(wd) == 0, timeout=15, what="in-flight to return to 0")
    # Still counted, as the forking modes count a disconnect.
    text = fetch(f"http://127.0.0.1:{wd.metrics_port}/metrics").body.decode()
    assert 'http_requests_total{code="500",method="get"} 1.0' in text
    wait_until(lambda: f'event=client_gone uri="/linger?name={name}"' in wd.text(),
               what="the disconnect to be logged")
    # The watchdog still serves, over a new upstream connection.
    assert fetch(wd.url + "/echo").status == 200


@pytest.mark.parametrize("head", [
    b"GET /trickle HTTP/1.1\r\nHost: t\r\n\r\n",  # the lean front relays the chunks
    b"GET /trickle HTTP/1.1\r\nHost: t\r\nAccept: application/x-ndjson\r\n\r\n",  # aiohttp
], ids=["fast", "aiohttp"])
def test_client_leaving_a_started_stream_is_recorded_with_the_status_it_saw(
        watchdog_factory, upstream, head):
    # The OpenAI client closes its connection right after `data: [DONE]`, before the
    # stream's last framing: that is a 200 the client received, not a failure.
    wd = watchdog_factory(upstream.env(exec_timeout="60s"))
    wd.wait_ready()
    client = socket.create_connection(("127.0.0.1", wd.port), timeout=10)
    try:
        client.sendall(head)
        got = b""
        while b'{"n": 0}' not in got:
            chunk = client.recv(65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"HTTP/1.1 200 ")
    finally:
        client.close()
    wait_until(lambda: _in_flight(wd) == 0, timeout=15, what="in-flight to return to 0")
    text = fetch(f"http://127.0.0.1:{wd.metrics_port}/metrics").body.decode()
    assert 'http_requests_total{code="200",method="get"} 1.0' in text
    assert 'code="500"' not in text
    wait_until(lambda: 'GET /trickle - 200 OK' in wd.text(), what="the access log line")
