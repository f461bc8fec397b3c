"""Which request heads http mode's lean front serves itself, and which it hands over."""

from __future__ import annotations

import pytest

from fwatchdog.modes.http_fast import MAX_FAST_HEAD, parse_head

LIMIT = 1000


def test_a_plain_get_is_parsed_with_its_headers_in_order():
    req = parse_head(b"GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: ua/1\r\n"
                     b"X-Call-Id: c1\r\nX-Timeout: 2s\r\nX-Dup: 1\r\nX-Dup: 2", LIMIT)
    assert req is not None
    assert (req.method, req.target, req.content_length, req.keep_alive) == (
        "GET", "/a/b?x=1", 0, True)
    assert req.headers == [("Host", "h"), ("User-Agent", "ua/1"), ("X-Call-Id", "c1"),
                           ("X-Timeout", "2s"), ("X-Dup", "1"), ("X-Dup", "2")]
    assert (req.user_agent, req.call_id, req.x_timeout) == ("ua/1", "c1", "2s")


def test_values_are_trimmed_and_content_length_and_close_are_read():
    req = parse_head(b"POST / HTTP/1.1\r\nContent-Length:  12 \r\nConnection: Close", LIMIT)
    assert req is not None
    assert req.content_length == 12 and not req.keep_alive
    assert req.headers == [("Content-Length", "12"), ("Connection", "Close")]


def test_non_ascii_header_bytes_survive_a_round_trip():
    req = parse_head(b"GET / HTTP/1.1\r\nX-Name: caf\xc3\xa9 \xff", LIMIT)
    assert req is not None
    assert req.headers[0][1].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff"


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.0",  # HTTP/1.0: aiohttp's keep-alive rules
    b"GET /  HTTP/1.1",  # not exactly three parts
    b"BREW / HTTP/1.1",  # uncommon method
    b"CONNECT h:1 HTTP/1.1",
    b"GET http://h/ HTTP/1.1",  # absolute form
    b"GET * HTTP/1.1",
    b"GET /_/health HTTP/1.1",
    b"GET /_/ready HTTP/1.1",
    b"GET /_%2Fhealth HTTP/1.1",  # percent-decoded by aiohttp: never decide that here
    b"GET /%5F/health HTTP/1.1",  # aiohttp routes the decoded /_/health
    b"GET /%5f/ready?x=1 HTTP/1.1",
    b"GET /fn/a%20b HTTP/1.1",  # any escape in the path, so one rule decides
    b"GET /caf\xc3\xa9 HTTP/1.1",  # non-ASCII target
    b"GET /\x00 HTTP/1.1",
    b"GET / HTTP/1.1\r\n folded: value",  # obs-fold
    b"GET / HTTP/1.1\r\nNo colon here",
    b"GET / HTTP/1.1\r\nBad Name: v",
    b"GET / HTTP/1.1\r\nX: a\x01b",
    b"GET / HTTP/1.1\r\nX: a\nb",  # bare LF inside a line
    b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade",
    b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1",
    b"POST / HTTP/1.1\r\nContent-Length: -1",
    b"POST / HTTP/1.1\r\nContent-Length: 1_0",
    b"POST / HTTP/1.1\r\nContent-Length: \xd9\xa1",  # a non-ASCII digit
    b"POST / HTTP/1.1\r\nContent-Length: 1001",  # over the body limit
    b"GET / HTTP/1.1\r\nAccept: text/event-stream",
    b"GET / HTTP/1.1\r\nAccept: application/json, Application/X-NDJSON",
    b"GET / HTTP/1.1\r\n" + b"\r\n".join(b"X-%d: v" % i for i in range(101)),
    b"GET / HTTP/1.1\r\nX-Big: " + b"a" * MAX_FAST_HEAD,
])
def test_anything_unusual_is_handed_over(head):
    assert parse_head(head, LIMIT) is None


def test_the_body_limit_is_inclusive():
    req = parse_head(b"PUT / HTTP/1.1\r\nContent-Length: 1000", LIMIT)
    assert req is not None and req.content_length == 1000


def test_percent_escapes_in_the_query_alone_stay_plain():
    # Routing looks at the path only; an escaped query is common and harmless.
    req = parse_head(b"GET /fn?q=a%20b&u=%2F_ HTTP/1.1", LIMIT)
    assert req is not None and req.target == "/fn?q=a%20b&u=%2F_"
