"""A scripted raw upstream for http mode, and a strict client that reads what a client gets.

The upstream answers ``GET /x?r=<percent-encoded bytes>`` (any method, any path)
with exactly those bytes and then closes the connection, so a test can make the
function send anything at all. ``/x`` is served by the lean front; ``/%78`` is
the same path percent-escaped, which the lean front always hands to aiohttp:
the two targets run the same upstream bytes through the two fronts.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_from_bytes

import httptools

RAW_UPSTREAM = r'''
import asyncio, sys
from urllib.parse import unquote_to_bytes

async def answer(reader, writer):
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return
    target = head.split(b" ", 2)[1]
    raw = b""
    if b"?r=" in target:
        raw = unquote_to_bytes(target.split(b"?r=", 1)[1])
    writer.write(raw or b"HTTP/1.1 204 No Content\r\n\r\n")
    try:
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except ConnectionError:
        pass

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''

PATHS = {"lean": "/x", "aiohttp": "/%78"}
# Headers each front adds itself; compared for presence, not value.
OURS = frozenset({"date", "x-duration-seconds"})


def raw_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    script = tmp_path / "raw_upstream.py"
    script.write_text(RAW_UPSTREAM)
    env = {
        "mode": "http",
        "fprocess": f"{sys.executable} {script} {port}",
        "upstream_url": f"http://127.0.0.1:{port}",
        "healthcheck_interval": "0s",
    }
    env.update(extra)
    return env


@dataclass
class Seen:
    """What a client received, parsed strictly (llhttp without leniencies)."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool  # a whole, well-framed message; False: the connection was cut
    raw_head: bytes

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower().encode():
                return value
        return None

    def comparable(self) -> tuple[object, ...]:
        """Everything the client sees, less the values of the fronts' own headers."""
        names = [(k.lower(), None if k.lower().decode() in OURS else v)
                 for k, v in self.headers]
        return self.status, self.reason, names, self.body, self.complete


class _Collector:
    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.body = b""
        self.done = False

    def on_status(self, raw: bytes) -> None:
        self.reason += raw

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


def exchange(port: int, method: str, path: str, raw: bytes, timeout: float = 10.0) -> Seen:
    """Ask the raw upstream (through the watchdog on ``port``) to send ``raw``."""
    target = f"{path}?r={quote_from_bytes(raw, safe='')}"
    request = (f"{method} {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            data += piece
    collector = _Collector()
    parser = httptools.HttpResponseParser(collector)
    if method == "HEAD":
        # llhttp is not told about HEAD: it would wait for the announced body.
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"no complete head in {data[:200]!r}"
        parser.feed_data(data[:end + 4])
        complete = data[end + 4:] == b""
    else:
        parser.feed_data(data)  # raises on anything a strict client refuses
        complete = collector.done
    head = data[:data.find(b"\r\n\r\n") + 4]
    return Seen(parser.get_status_code(), collector.reason, collector.headers, collector.body,
                complete, head)


def assert_well_formed(seen: Seen) -> None:
    """The head the client got is CRLF-only, NUL-free, with one framing header at most."""
    lines = seen.raw_head[:-4].split(b"\r\n")
    for line in lines:
        assert b"\n" not in line and b"\r" not in line and b"\x00" not in line, line
    for line in lines[1:]:
        name, sep, _ = line.partition(b":")
        assert sep and name and name == name.strip(), line
    names = [k.lower() for k, _ in seen.headers]
    assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1, names
