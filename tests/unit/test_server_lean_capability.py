"""The lean front as a capability: a mode that is not http mode proxies over Unix sockets.

A test mode offers ``lean_proxy()`` whose ``acquire`` picks one of two upstreams
behind Unix sockets (as mode=llm's handler processes will be), and the real
``Watchdog`` puts the lean front on its port. Plain requests reach the upstreams
through it, each lease is released once with its outcome, and what the lean
front hands over (a percent-escaped path) still reaches the mode's ``handle``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from pathlib import Path

from aiohttp import web

from fwatchdog.config import from_env
from fwatchdog.modes.base import LeanProxy, Lease, ModeContext, ModeHandler, Outcome
from fwatchdog.server import Watchdog
from fwatchdog.upstream import Pool
from tests.conftest import async_wait_until, free_port


class UnixMode(ModeHandler):
    """Two 'handlers' on Unix sockets, taken in turn; the aiohttp path answers itself."""

    sockets: list[str] = []
    released: list[tuple[str, Outcome]] = []

    def __init__(self, ctx: ModeContext) -> None:
        super().__init__(ctx)
        self.pools = [Pool("handler", 0, unix_path=path) for path in self.sockets]
        self.turn = 0

    def lean_proxy(self) -> LeanProxy:
        return LeanProxy(acquire=self.acquire, limit_for=lambda header: 5.0,
                         target_for=lambda raw: raw)

    async def acquire(self) -> Lease:
        pool = self.pools[self.turn % len(self.pools)]
        self.turn += 1
        return Lease(pool, lambda outcome: self.released.append((pool.unix_path or "", outcome)))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="handled by the mode")

    async def stop(self) -> None:
        for pool in self.pools:
            pool.close()


async def _handler_server(path: str, name: str) -> asyncio.AbstractServer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            body = name.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(answer, path)


async def _get(port: int, target: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data


def test_a_mode_with_the_capability_gets_the_lean_front_over_unix_sockets(tmp_path: Path):
    async def scenario() -> None:
        paths = [str(tmp_path / "h0.sock"), str(tmp_path / "h1.sock")]
        servers = [await _handler_server(p, f"handler-{i}") for i, p in enumerate(paths)]
        UnixMode.sockets = paths
        UnixMode.released = []
        port = free_port()
        config = from_env({"mode": "streaming", "fprocess": "true", "port": str(port),
                           "metrics_port": str(free_port()), "TMPDIR": str(tmp_path),
                           "healthcheck_interval": "0s"})
        wd = Watchdog(config, log=logging.getLogger("t"), stdout=io.StringIO(),
                      stderr=io.StringIO(), mode_class=UnixMode)
        run = asyncio.ensure_future(wd.run())
        await async_wait_until(lambda: wd.state.serving.is_set(), what="serving")
        assert wd._fast is not None  # the lean front owns the port
        answers = [await _get(port, "/x") for _ in range(4)]
        bodies = [a.rsplit(b"\r\n\r\n", 1)[1] for a in answers]
        assert bodies == [b"handler-0", b"handler-1", b"handler-0", b"handler-1"]
        assert [o for _, o in UnixMode.released] == ["ok"] * 4
        assert wd.accounting.inflight == 0
        # Handed over to aiohttp: the mode's handle answers.
        assert (await _get(port, "/%78")).endswith(b"handled by the mode")
        wd.signals._record(signal.SIGTERM)
        assert await asyncio.wait_for(run, 20) == 0
        for server in servers:
            server.close()

    asyncio.run(scenario())
