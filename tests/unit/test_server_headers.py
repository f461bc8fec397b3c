"""Which headers cross the http-mode proxy."""

from __future__ import annotations

from fwatchdog.proxyheaders import to_client, to_upstream, wants_stream


def test_hop_by_hop_and_connection_named_headers_are_dropped():
    headers = [("Host", "fn.example"), ("Connection", "keep-alive, X-Secret"),
               ("X-Secret", "1"), ("Keep-Alive", "5"), ("TE", "trailers"),
               ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Expect", "100-continue"),
               ("Proxy-Connection", "x"), ("Trailer", "X-T"), ("X-Keep", "a"), ("X-Keep", "b"),
               ("Content-Length", "3")]
    up = to_upstream(headers)
    assert up == [("Host", "fn.example"), ("X-Keep", "a"), ("X-Keep", "b"),
                                ("Content-Length", "3")]


def test_response_keeps_repeated_headers_in_order():
    down = to_client([("Set-Cookie", "a=1"), ("Connection", "close"), ("Set-Cookie", "b=2"),
                      ("Content-Type", "text/plain"), ("Expect", "x")])
    assert list(down.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
                                  ("Content-Type", "text/plain"), ("Expect", "x")]


def test_streamed_requests_are_recognised_like_of_watchdog():
    assert wants_stream("text/event-stream", "")
    assert wants_stream("application/json, application/x-ndjson;q=0.9", "")
    assert wants_stream("", "websocket") and wants_stream("", "WebSocket")
    assert not wants_stream("application/json", "")
    assert not wants_stream("", "h2c")
