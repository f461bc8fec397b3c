"""Forward a child process's output, line by line, without ever stalling.

of-watchdog reads each child pipe with a line scanner whose buffer is
``log_buffer_size``; a longer line stops the scanner and the pipe is never read
again, so the child eventually blocks on a full pipe. Here a line longer than
the limit is split into pieces of at most ``log_buffer_size`` bytes and reading
goes on (a deliberate fix, see README.md).

With ``prefix_logs`` each line is written as ``YYYY/MM/DD HH:MM:SS <name>: <line>``
(Go's default log format, which of-watchdog uses); without it, the bare line.

Invariant: :func:`pump` reads until EOF whatever the child writes (binary,
invalid UTF-8, no newline at the end) and never raises for the content.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TextIO

Clock = Callable[[], float]


def format_line(name: str, line: bytes, *, prefix: bool, now: float) -> str:
    text = line.decode("utf-8", errors="replace")
    if not prefix:
        return text + "\n"
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now))
    return f"{stamp} {name}: {text}\n"


def split_lines(buffer: bytearray, limit: int) -> list[bytes]:
    """Remove and return every complete line (and every over-long piece) from ``buffer``."""
    out: list[bytes] = []
    while True:
        newline = buffer.find(b"\n", 0, limit + 1)
        if newline != -1:
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            out.append(line.removesuffix(b"\r"))
        elif len(buffer) >= limit:
            out.append(bytes(buffer[:limit]))
            del buffer[:limit]
        else:
            return out


async def pump(
    reader: asyncio.StreamReader,
    name: str,
    sink: TextIO,
    *,
    prefix: bool,
    limit: int,
    clock: Clock = time.time,
) -> None:
    """Copy ``reader`` to ``sink`` line by line until EOF."""
    buffer = bytearray()
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        buffer += chunk
        lines = split_lines(buffer, limit)
        if lines:
            now = clock()
            sink.write("".join(format_line(name, ln, prefix=prefix, now=now) for ln in lines))
            sink.flush()
    if buffer:
        sink.write(format_line(name, bytes(buffer), prefix=prefix, now=clock()))
        sink.flush()
