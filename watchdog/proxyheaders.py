"""Which headers cross the proxy, in each direction (http mode).

End-to-end headers are copied unchanged, Host included (the function sees the
Host the client used, as with of-watchdog). Hop-by-hop headers (RFC 9110
section 7.6.1) describe one connection and are dropped in both directions:
``Connection`` and every header it names, ``Keep-Alive``, ``Proxy-Connection``,
``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``. ``Expect`` is dropped
towards the function because the front has already answered ``100 Continue``
itself. ``Content-Length`` is kept towards the function: the request body is
relayed byte for byte. Towards the client the response's framing
(``Content-Length`` and ``Transfer-Encoding``) is dropped as well, by
:mod:`fwatchdog.relay`, which frames the body it relays.

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


def _filter(headers: Iterable[tuple[str, str]], drop: frozenset[str]) -> list[tuple[str, str]]:
    # One pass; the headers named by Connection (rare) are removed afterwards.
    out: list[tuple[str, str]] = []
    named: set[str] | None = None
    for key, value in headers:
        low = key.lower()
        if low in drop:
            if low == "connection":
                tokens = {t.strip().lower() for t in value.split(",") if t.strip()}
                named = tokens if named is None else named | tokens
            continue
        out.append((key, value))
    if named:
        out = [(k, v) for k, v in out if k.lower() not in named]
    return out


def to_upstream(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request headers to send to the function, in order."""
    return _filter(headers, _NOT_UPSTREAM)


def to_client_pairs(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The response headers to send back to the client, in order."""
    return _filter(headers, HOP_BY_HOP)


def to_client(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """:func:`to_client_pairs` as a multidict, for aiohttp's responses."""
    return CIMultiDict(_filter(headers, HOP_BY_HOP))


def wants_stream(accept: str, upgrade: str) -> bool:
    """of-watchdog's rule: SSE, NDJSON and WebSocket requests are streamed through."""
    low = accept.lower()
    return ("text/event-stream" in low or "application/x-ndjson" in low
            or upgrade.lower() == "websocket")
