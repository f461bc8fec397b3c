"""The front's own log lines: Go's log timestamp, then ``event=name key=value``.

of-watchdog logs through Go's ``log`` package (``2006/01/02 15:04:05 message``
on stderr); log collectors that parse of-watchdog output keep working because
every line here starts the same way. The message itself is structured:
``event=<name>`` first, then ``key=value`` pairs, values quoted when they hold
spaces, quotes or ``=``. The access log is the one exception: its format is a
contract (see :mod:`fwatchdog.accesslog`).

Invariant: :func:`kv` never raises for any value; it renders with ``str``.
"""

from __future__ import annotations

import logging
from typing import TextIO

LOGGER_NAME = "fwatchdog"
_DATEFMT = "%Y/%m/%d %H:%M:%S"


def kv(event: str, **fields: object) -> str:
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        if text == "" or any(c in text for c in ' "=\n\t'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def setup(stream: TextIO, *, name: str = LOGGER_NAME) -> logging.Logger:
    """A logger writing Go-style timestamped lines to ``stream`` (called once, by main)."""
    log = logging.getLogger(name)
    log.handlers.clear()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt=_DATEFMT))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # aiohttp reports its own trouble (a handler bug, a broken client) through
    # its loggers; give them the same line format instead of Python's fallback.
    lib = logging.getLogger("aiohttp")
    lib.handlers.clear()
    lib.addHandler(handler)
    lib.setLevel(logging.WARNING)
    lib.propagate = False
    return log
