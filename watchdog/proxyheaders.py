"""Which headers cross the proxy, in each direction (http mode).

End-to-end headers are copied unchanged, Host included (the function sees the
Host the client used, as with of-watchdog). Hop-by-hop headers (RFC 9110
section 7.6.1) describe one connection and are dropped in both directions:
``Connection`` and every header it names, ``Keep-Alive``, ``Proxy-Connection``,
``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``. ``Expect`` is dropped
towards the function because the front has already answered ``100 Continue``
itself. ``Content-Length`` is kept: the body is relayed byte for byte.

Invariant: pure functions over header pairs; input order and repeated headers
(``Set-Cookie``) are preserved.
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer",
    "transfer-encoding", "upgrade",
})
_NOT_UPSTREAM = HOP_BY_HOP | {"expect"}


def _named_by_connection(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for key, value in headers:
        if key.lower() == "connection":
            named.update(t.strip().lower() for t in value.split(",") if t.strip())
    return named


def _copy(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> CIMultiDict[str]:
    pairs = list(headers)
    extra = _named_by_connection(pairs)
    skip = drop | extra if extra else drop
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in pairs:
        if key.lower() not in skip:
            out.add(key, value)
    return out


def to_upstream(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request headers to send to the function, in order."""
    return list(_copy(headers, _NOT_UPSTREAM).items())


def to_client(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The response headers to send back to the client."""
    return _copy(headers, HOP_BY_HOP)


def wants_stream(accept: str, upgrade: str) -> bool:
    """of-watchdog's rule: SSE, NDJSON and WebSocket requests are streamed through."""
    low = accept.lower()
    return ("text/event-stream" in low or "application/x-ndjson" in low
            or upgrade.lower() == "websocket")
