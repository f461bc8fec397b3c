"""The access-log line, in of-watchdog's format.

``METHOD URI - STATUS - ContentLength: SIZE (S.SSSSs)`` and, with
``log_callid``, `` [CALL-ID]`` (``none`` when the request had no
``X-Call-Id``). STATUS is the code and reason phrase (``200 OK``), as
of-watchdog's http mode prints Go's ``Response.Status``. SIZE is rendered like
``docker/go-units.HumanSize`` (``13B``, ``1.5kB``), which of-watchdog uses; an
unknown size is ``-1B``, as of-watchdog prints for a chunked response.

Requests whose User-Agent starts with ``kube-probe`` are not logged, so kubelet
probes do not flood log collection.

Invariant: every function here is pure, except :class:`AccessLog`, which only
writes whole lines to the stream it was given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TextIO

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")


def human_size(size: float) -> str:
    """go-units ``HumanSize``: decimal units, 4 significant digits."""
    i = 0
    while size >= 1000 and i < len(_UNITS) - 1:
        size /= 1000
        i += 1
    return f"{size:.4g}{_UNITS[i]}"


def status_text(code: int, reason: str | None = None) -> str:
    if not reason:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = ""
    return f"{code} {reason}" if reason else str(code)


def should_log(user_agent: str | None) -> bool:
    return not (user_agent or "").startswith("kube-probe")


def format_line(
    method: str,
    uri: str,
    status: int,
    reason: str | None,
    size: int,
    seconds: float,
    call_id: str | None = None,
    *,
    with_call_id: bool = False,
) -> str:
    line = (
        f"{method} {uri} - {status_text(status, reason)} - "
        f"ContentLength: {human_size(size)} ({seconds:.4f}s)"
    )
    if with_call_id:
        line += f" [{call_id or 'none'}]"
    return line


class AccessLog:
    """Writes access lines with the log's Go-style timestamp, one write per line.

    It bypasses :mod:`logging` because it runs once per request: the timestamp
    prefix is rendered once per second instead of per line.
    """

    def __init__(self, stream: TextIO, *, with_call_id: bool,
                 clock: Callable[[], float] = time.time) -> None:
        self.stream = stream
        self.with_call_id = with_call_id
        self.clock = clock
        self._second = -1
        self._prefix = ""

    def write(self, method: str, uri: str, status: int, reason: str | None, size: int,
              seconds: float, call_id: str | None) -> None:
        now = int(self.clock())
        if now != self._second:
            self._second = now
            self._prefix = time.strftime("%Y/%m/%d %H:%M:%S ", time.localtime(now))
        line = format_line(method, uri, status, reason, size, seconds, call_id,
                           with_call_id=self.with_call_id)
        self.stream.write(self._prefix + line + "\n")
