"""One relay: what a client receives for the function's response, on either front.

Both fronts (the lean protocol front of :mod:`fwatchdog.modes.http_fast` and
the aiohttp server behind it) turn an upstream :class:`~fwatchdog.upstream.Response`
into a client response through this module alone, so the same upstream bytes
give the same client-visible result on either path:

- **status**: the function's. **reason**: the function's when it is printable
  ASCII, else the standard phrase of the status (empty for unknown statuses).
- **headers**: the function's, in order and case, less hop-by-hop ones (see
  :mod:`fwatchdog.proxyheaders`) and less its framing (``Content-Length``,
  ``Transfer-Encoding``): the watchdog frames the body it relays. Then
  ``X-Duration-Seconds`` (time to the upstream's head), then ``Date`` when the
  function sent none. Every header was parsed strictly by llhttp and is
  re-serialised as ``Name: value`` with CRLF (no NUL, no obs-fold, no bare LF).
- **framing** (:func:`plan`):

  =====================================  ===========================================
  HEAD, 204, 304                         no body; for HEAD the ``Content-Length``
                                         the function announced, none for 204, 304
  a length up to ``WHOLE_RESPONSE_LIMIT``  read whole under the deadline, then
  and no stream asked for                written with ``Content-Length`` = what was
                                         read; a body that breaks off: 502
  anything else                          relayed as it arrives: ``Content-Length``
                                         when announced, else chunked; a body that
                                         breaks off after the head: connection cut
  =====================================  ===========================================

- **errors** before any byte reached the client: a malformed response
  (:class:`~fwatchdog.upstream.MalformedResponse`) or a broken body is 502;
  an upstream that cannot be reached or fails before its head is 500 (502 for
  streamed requests, as of-watchdog); the deadline is 504; all marked
  ``X-OpenFaaS-Internal: of-watchdog``.

:func:`serialize_head` is the lean front's serializer; the aiohttp front hands
the same header list and framing to aiohttp, which writes ``Name: value\\r\\n``
for each (the differential test in ``tests/contract/test_http_relay.py``
holds both to the same bytes).

Invariants: pure functions; nothing here reads or writes a socket.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import NamedTuple

from fwatchdog.proxyheaders import HOP_BY_HOP
from fwatchdog.upstream import Response

INTERNAL = "X-OpenFaaS-Internal"
WHOLE_RESPONSE_LIMIT = 1 << 20  # read whole: known length up to this; stream above
WHOLE_REQUEST_LIMIT = 256 << 10  # read whole: known length up to this; stream above
_NOT_TO_CLIENT = HOP_BY_HOP | {"content-length", "transfer-encoding"}
_PHRASES = {s.value: s.phrase for s in HTTPStatus}


def phrase(status: int, reason: str = "") -> str:
    """The reason phrase to send: the function's (already checked), else the standard one."""
    return reason or _PHRASES.get(status, "")


def no_body(method: str, status: int) -> bool:
    return method == "HEAD" or status in (204, 304) or status < 200


class Plan(NamedTuple):
    """How one response is relayed (a tuple: built on every request)."""

    headers: list[tuple[str, str]]  # the function's, less hop-by-hop and framing, plus ours
    has_date: bool
    empty: bool  # no body at all (HEAD, 204, 304)
    whole: bool  # read whole, then written with Content-Length = what was read
    length: int | None  # the Content-Length to send (empty or streamed), None: none/chunked


def client_headers(upstream: Response) -> tuple[list[tuple[str, str]], bool]:
    """The function's headers a client gets, and whether one of them is ``Date``.

    One pass (this runs for every request): hop-by-hop and framing headers
    dropped, then the rare headers that ``Connection`` names.
    """
    out: list[tuple[str, str]] = []
    has_date = False
    named: set[str] | None = None
    for key, value in upstream.headers:
        low = key.lower()
        if low in _NOT_TO_CLIENT:
            if low == "connection":
                tokens = {t.strip().lower() for t in value.split(",") if t.strip()}
                named = tokens if named is None else named | tokens
            continue
        if low == "date":
            has_date = True
        out.append((key, value))
    if named:
        out = [(k, v) for k, v in out if k.lower() not in named]
        has_date = any(k.lower() == "date" for k, _ in out)
    return out, has_date


def plan(method: str, upstream: Response, started: float, stream: bool) -> Plan:
    """The relay of ``upstream`` (``started``: ``time.perf_counter()`` at the request's start)."""
    headers, has_date = client_headers(upstream)
    headers.append(("X-Duration-Seconds", f"{time.perf_counter() - started:f}"))
    status = upstream.status
    length = upstream.content_length
    if no_body(method, status):
        announced = length if method == "HEAD" and status not in (204, 304) else None
        return Plan(headers, has_date, True, False, announced)
    whole = not stream and length is not None and length <= WHOLE_RESPONSE_LIMIT
    return Plan(headers, has_date, False, whole, length)


def serialize_head(status: int, reason: str, headers: list[tuple[str, str]], *,
                   date: str | None, length: int | None, chunked: bool,
                   keep_alive: bool) -> bytes:
    """A response head; ``date`` is added when not None, framing from ``length``/``chunked``."""
    lines = [f"HTTP/1.1 {status} {phrase(status, reason)}\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers]
    # Framing, Date, Connection: the order aiohttp writes them in on the other front.
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    elif chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    if date is not None:
        lines.append(f"Date: {date}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")
