"""Durations as of-watchdog reads them.

A bare integer is a number of seconds (``30``). Anything else is a Go duration
string: one or more decimal numbers, each with a unit, e.g. ``500ms``,
``1m30s``, ``1.5h``. Units: ``ns``, ``us`` (or ``µs``/``μs``), ``ms``, ``s``,
``m``, ``h``. ``0`` needs no unit. Negative durations are rejected: no watchdog
timeout can be negative.

Invariant: :func:`parse_duration` either returns a finite, non-negative number
of seconds or raises :class:`ValueError` with a message fit for a user.
"""

from __future__ import annotations

import math
import re

_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Return ``text`` as seconds."""
    raw = text.strip()
    if not raw:
        raise ValueError("empty duration")
    if raw.isdigit():
        return float(int(raw))
    if raw.startswith("-"):
        raise ValueError(f"negative duration {text!r}")
    body = raw[1:] if raw.startswith("+") else raw
    if body == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(body):
        match = _PART.match(body, pos)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: use seconds (30) or a Go duration (500ms, 1m30s)"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos == 0 or not math.isfinite(total):
        raise ValueError(f"invalid duration {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """Render seconds the way Go's ``time.Duration.String`` does, e.g. ``1m30s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        if ms >= 1:
            return f"{ms:g}ms"
        us = seconds * 1e6
        if us >= 1:
            return f"{us:g}µs"
        return f"{round(seconds * 1e9)}ns"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    out += f"{round(secs, 9):g}s"
    return out
