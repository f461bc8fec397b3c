"""The forking modes bound a slow request body by read_timeout (408), as http mode does.

With ``exec_timeout=0`` nothing else bounds a half-sent body: without this, one
slow client would hold its ``max_inflight`` slot (and its child) for ever.
"""

from __future__ import annotations

import shlex
import socket
import sys
import time

import pytest

from tests.conftest import fetch, http_status


def _half_sent(port: int) -> bytes:
    """A POST announcing 100 bytes that sends ten, then waits for the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten!!")
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        return data


# Reads all of stdin before writing: no output starts before the body is in.
WHOLE = f"{shlex.quote(sys.executable)} -c " + shlex.quote(
    "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())")


@pytest.mark.parametrize("mode", ["streaming", "serializing"])
def test_a_half_sent_body_is_408_after_read_timeout_and_frees_the_slot(watchdog_factory, mode):
    wd = watchdog_factory({"mode": mode, "fprocess": WHOLE, "healthcheck_interval": "0",
                           "read_timeout": "1s", "exec_timeout": "0", "max_inflight": "1"})
    wd.wait_ready()
    started = time.monotonic()
    answer = _half_sent(wd.port)
    assert time.monotonic() - started < 10
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    # The slot is free again: the next request is served, not refused with 429.
    reply = fetch(wd.url + "/", "POST", body=b"hello")
    assert (reply.status, reply.body) == (200, b"hello")
    assert http_status(wd.url + "/_/health") == 200


def test_streaming_cuts_a_started_answer_whose_body_is_late(watchdog_factory):
    wd = watchdog_factory({"mode": "streaming", "fprocess": "cat", "healthcheck_interval": "0",
                           "read_timeout": "1s", "exec_timeout": "0", "max_inflight": "1"})
    wd.wait_ready()
    with socket.create_connection(("127.0.0.1", wd.port), timeout=20) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten!!")
        data = b""
        while piece := sock.recv(65536):
            data += piece
    assert data.startswith(b"HTTP/1.1 200 ") and not data.endswith(b"0\r\n\r\n"), data
    reply = fetch(wd.url + "/", "POST", body=b"hello")
    assert (reply.status, reply.body) == (200, b"hello")
