"""Shared helpers for every test folder: free ports, deadlines, a real fwatchdog.

Nothing here sleeps to synchronise: :func:`wait_until` polls a condition with a
deadline and fails with a message naming what never happened.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
FWATCHDOG = str(VENV_BIN / "fwatchdog")


# Ports handed out in this test run. The kernel may give the same port to two
# bind(0) calls in a row once the first socket is closed; a watchdog and its
# function on one port would then proxy to themselves.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port that this test run has not handed out before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(condition: Callable[[], object], *, timeout: float = 30.0, what: str = "condition",
               interval: float = 0.02) -> object:
    """Poll ``condition`` until it returns a truthy value, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] != b"Z"


async def async_wait_until(condition: Callable[[], object], timeout: float = 10.0,
                           what: str = "condition") -> None:
    """:func:`wait_until` for tests that run inside an event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # polling interval


def http_status(url: str, *, timeout: float = 5.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


@dataclass
class Watchdog:
    """A running ``fwatchdog`` process and what it printed."""

    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    tmpdir: Path
    output: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def lock_path(self) -> Path:
        return self.tmpdir / ".lock"

    def text(self) -> str:
        return "".join(self.output)

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(
            lambda: self.proc.poll() is not None or http_status(self.url + "/_/health") == 200,
            timeout=timeout, what="fwatchdog /_/health to answer 200",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"fwatchdog exited {self.proc.returncode}:\n{self.text()}")

    def wait_output(self, needle: str, timeout: float = 30.0) -> None:
        wait_until(lambda: needle in self.text(), timeout=timeout, what=f"output {needle!r}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(10)
        return rc


def start_watchdog(env: Mapping[str, str], tmp_path: Path, *, cwd: Path | None = None,
                   args: tuple[str, ...] = (), unset: tuple[str, ...] = (),
                   prefix: tuple[str, ...] = ()) -> Watchdog:
    """Start the real ``fwatchdog`` on free ports, its lock file under ``tmp_path``.

    ``unset`` removes variables this helper would set (e.g. ``port``, to test
    Knative's ``PORT``); ``prefix`` runs fwatchdog under another command (e.g.
    ``unshare``, to make it PID 1).
    """
    tmpdir = tmp_path / "wd-tmp"
    tmpdir.mkdir(exist_ok=True)
    port, metrics_port = free_port(), free_port()
    full = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmpdir),
        "port": str(port),
        "metrics_port": str(metrics_port),
        "PYTHONUNBUFFERED": "1",
    }
    full.update(env)
    for name in unset:
        full.pop(name, None)
    proc = subprocess.Popen(
        [*prefix, FWATCHDOG, *args], env=full, cwd=str(cwd or tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    serving_port = full.get("port") or full.get("PORT") or "8080"
    wd = Watchdog(proc=proc, port=int(serving_port), metrics_port=int(full["metrics_port"]),
                  tmpdir=tmpdir)

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            wd.output.append(line.decode("utf-8", "replace"))

    wd._reader = threading.Thread(target=read, daemon=True)
    wd._reader.start()
    return wd


@pytest.fixture
def watchdog_factory(tmp_path: Path) -> Iterator[Callable[..., Watchdog]]:
    """Start watchdogs in a test; every one is stopped at the end."""
    started: list[Watchdog] = []

    def factory(env: Mapping[str, str], **kw: object) -> Watchdog:
        wd = start_watchdog(env, tmp_path, **kw)  # type: ignore[arg-type]
        started.append(wd)
        return wd

    yield factory
    for wd in started:
        wd.stop()


# -- an upstream function for mode=http tests ------------------------------------

UPSTREAM_SCRIPT = r'''
"""A test function for mode=http: an aiohttp app with one route per behaviour.

argv: PORT. Environment: UPSTREAM_SIGNALS, a folder where the test drops files
to release held requests; UPSTREAM_WAIT_BEFORE_LISTEN, a file name to wait for
before listening; UPSTREAM_EXIT_AT_START, an exit code to die with at once.
"""
import asyncio, json, os, sys
from aiohttp import web

SIG = os.environ.get("UPSTREAM_SIGNALS", ".")

async def until(name):
    path = os.path.join(SIG, name)
    while not os.path.exists(path):
        await asyncio.sleep(0.01)

def mark(name):
    with open(os.path.join(SIG, name), "w"):
        pass

async def echo(request):
    body = await request.read()
    return web.json_response({
        "method": request.method, "path_qs": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body": body.decode("latin-1"), "length": len(body),
    })

async def hold(request):
    name = request.query["release"]
    mark("held-" + name)
    await until(name)
    return web.Response(text="released " + name)

async def slow(request):
    await asyncio.sleep(float(request.query.get("s", "5")))
    return web.Response(text="slow")

async def linger(request):
    # Never answers on its own: marks when the watchdog's connection to it closes.
    name = request.query["name"]
    mark("linger-" + name)
    for _ in range(6000):  # a minute at most
        if request.transport is None or request.transport.is_closing():
            mark("linger-closed-" + name)
            break
        await asyncio.sleep(0.01)
    return web.Response(text="lingered " + name)

async def sse(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(b"data: first\n\n")
    await until(request.query.get("release", "sse"))
    await resp.write(b"data: second\n\n")
    await resp.write_eof()
    return resp

async def trickle(request):
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for i in range(1000):
        await resp.write(b'{"n": %d}\n' % i)
        await asyncio.sleep(0.05)
    return resp

async def cut(request):
    # Promise 1000 bytes, send 10, close: the upstream stays alive.
    request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
    await asyncio.sleep(0.05)
    request.transport.close()
    return web.Response()

async def cut_big(request):
    request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 100000)
    await asyncio.sleep(0.05)
    request.transport.close()
    return web.Response()

async def hop(request):
    return web.Response(text="hop", headers={
        "Connection": "X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
        "X-Kept": "yes", "Set-Cookie": "a=1"}, )

async def plain(request):
    # Written raw: aiohttp would add a Content-Type of its own.
    request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n"
                            b"Connection: close\r\n\r\nno type")
    await asyncio.sleep(0.05)
    request.transport.close()
    return web.Response()

async def eof(request):
    # HTTP/1.0 style: no length, the body ends when the connection closes.
    request.transport.write(b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\nuntil the end")
    await asyncio.sleep(0.05)
    request.transport.close()
    return web.Response()

SITES = []

DEAF = []

async def unlisten(request):
    # Stop listening but stay alive: new connections are refused, pooled ones cut.
    DEAF.append(True)
    asyncio.get_running_loop().call_later(0.05, lambda: asyncio.ensure_future(SITES[0].stop()))
    return web.Response(text="unlistening", headers={"Connection": "close"})

@web.middleware
async def deafness(request, handler):
    if DEAF:
        request.transport.close()
        raise ConnectionResetError("deaf")
    return await handler(request)

async def peer(request):
    # The watchdog's end of this upstream connection: equal ports mean a reused one.
    return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

def pattern(n):
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]

async def big(request):
    n = int(request.query["n"])
    if request.query.get("chunked"):
        resp = web.StreamResponse()
        await resp.prepare(request)
        data = pattern(n)
        for i in range(0, n, 100000):
            await resp.write(data[i:i + 100000])
        await resp.write_eof()
        return resp
    return web.Response(body=pattern(n))

DOOMED = set()

async def doom(request):
    # Answer, keep the connection open, and drop it without answering when the
    # next request arrives on it: an upstream closing an idle keep-alive connection.
    DOOMED.add(request.transport)
    return web.Response(text="doomed")

@web.middleware
async def doomed(request, handler):
    if request.transport in DOOMED:
        mark("doomed-dropped-" + request.method)
        request.transport.close()
        raise ConnectionResetError("doomed")
    return await handler(request)

async def status(request):
    return web.Response(status=int(request.match_info["code"]), text="status")

async def ready(request):
    path = os.path.join(SIG, "ready-status")
    code = int(open(path).read()) if os.path.exists(path) else 200
    return web.Response(status=code, text="function ready answer")

async def die(request):
    code = int(request.query.get("code", "3"))
    asyncio.get_running_loop().call_later(0.05, os._exit, code)
    return web.Response(text="dying")

async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type == web.WSMsgType.TEXT:
            if msg.data == "close":
                await sock.close(code=4001, message=b"bye")
                break
            await sock.send_str("echo:" + msg.data)
        elif msg.type == web.WSMsgType.BINARY:
            await sock.send_bytes(msg.data[::-1])
    mark("ws-closed-%s" % sock.close_code)
    return sock

async def orphan(request):
    # Double fork: the grandchild outlives its parent and is reparented to the
    # init of this PID namespace (the watchdog), then exits when released.
    pid = os.fork()
    if pid == 0:
        gpid = os.fork()
        if gpid == 0:
            tmp = os.path.join(SIG, "orphan-pid.tmp")
            with open(tmp, "w") as f:
                f.write(str(os.getpid()))
            os.rename(tmp, os.path.join(SIG, "orphan-pid"))
            while not os.path.exists(os.path.join(SIG, "orphan-go")):
                import time; time.sleep(0.01)
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
    return web.Response(text="spawned")

async def procstate(request):
    pid = request.query["pid"]
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return web.Response(text="gone")
    return web.Response(text=stat[stat.rfind(")") + 2:].split()[0])

async def main():
    wait = os.environ.get("UPSTREAM_WAIT_BEFORE_LISTEN")
    if wait:
        await until(wait)
    code = os.environ.get("UPSTREAM_EXIT_AT_START")
    if code:
        print("upstream giving up", flush=True)
        sys.exit(int(code))
    app = web.Application(client_max_size=1 << 30, middlewares=[deafness, doomed])
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/hold", hold)
    app.router.add_get("/slow", slow)
    app.router.add_post("/v1/chat/completions", slow)  # an OpenAI client waiting
    app.router.add_get("/linger", linger)
    app.router.add_get("/sse", sse)
    app.router.add_get("/trickle", trickle)
    app.router.add_get("/cut", cut)
    app.router.add_get("/cut-big", cut_big)
    app.router.add_get("/hop", hop)
    app.router.add_get("/plain", plain)
    app.router.add_get("/unlisten", unlisten)
    app.router.add_get("/eof", eof)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/ready", ready)
    app.router.add_get("/die", die)
    app.router.add_get("/ws", ws)
    app.router.add_get("/orphan", orphan)
    app.router.add_get("/procstate", procstate)
    app.router.add_get("/peer", peer)
    app.router.add_get("/big", big)
    app.router.add_get("/doom", doom)
    runner = web.AppRunner(app, access_log=None, max_field_size=65536)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]))
    SITES.append(site)
    await site.start()
    print("upstream listening", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


@dataclass
class Upstream:
    """The test function of :data:`UPSTREAM_SCRIPT` and its signal folder."""

    port: int
    script: Path
    signals: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "mode": "http",
            "fprocess": f"{sys.executable} {self.script} {self.port}",
            "upstream_url": self.url,
            "UPSTREAM_SIGNALS": str(self.signals),
            "healthcheck_interval": "0s",
        }
        env.update(extra)
        return env

    def signal(self, name: str) -> None:
        (self.signals / name).touch()

    def seen(self, name: str) -> bool:
        return (self.signals / name).exists()


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    """Files for an http-mode function on a free port; fwatchdog starts it."""
    script = tmp_path / "upstream.py"
    script.write_text(UPSTREAM_SCRIPT)
    signals = tmp_path / "signals"
    signals.mkdir()
    return Upstream(port=free_port(), script=script, signals=signals)


@dataclass
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


def fetch(url: str, method: str = "GET", *, headers: Mapping[str, str] | None = None,
          body: bytes | None = None, timeout: float = 10.0) -> Reply:
    """One request over a fresh connection; any status is a reply, not an error."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn.request(method, target, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        return Reply(resp.status, resp.reason, resp.getheaders(), data)
    finally:
        conn.close()
