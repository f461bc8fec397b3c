"""Per-request function processes, shared by the streaming and serializing modes.

What of-watchdog does, and what we keep:

- One child per request, ``argv`` from ``fprocess`` (no shell), in the working
  directory and environment of the watchdog plus the CGI-style ``Http_*``
  variables built by :func:`request_environment`.
- The child's stderr is forwarded line by line through :func:`fwatchdog.logpump.pump`
  (prefix and line limit from the configuration); its stdout is the response.

What we add:

- Every child leads its own session (``start_new_session=True``), so it and every
  grandchild it forks share one process group. :meth:`Child.kill` kills the whole
  group: a grandchild that keeps stdout open cannot hold a request past its
  deadline (of-watchdog kills only the direct child and then waits for the pipe).
- Header names map to portable environment names (``[A-Za-z0-9_]``), first value
  wins, deterministically (Go iterates a map, so of-watchdog is not).

Invariants:
- :func:`spawn` either returns a running :class:`Child` or raises :class:`SpawnError`
  with a message fit for the client; it never leaves a process behind.
- :meth:`Child.kill` is idempotent and never raises; :meth:`Child.reap` always
  collects the exit status, so no child of ours is left a zombie.
- Writing to a child that stopped reading stdin never raises out of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from aiohttp import web

from fwatchdog.durations import parse_duration
from fwatchdog.logpump import pump
from fwatchdog.logs import kv

# Bytes read from the child's stdout per chunk: one pipe buffer's worth.
CHUNK_SIZE = 64 * 1024

# RFC 9110 token characters: the only bytes Go canonicalises in a header name.
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_ENV_SAFE = frozenset(string.ascii_letters + string.digits + "_")

# Request headers Go's server takes out of r.Header, so of-watchdog never
# exports them: Host goes to r.Host, Transfer-Encoding to r.TransferEncoding.
_NOT_EXPORTED = frozenset({"host", "transfer-encoding"})


class SpawnError(Exception):
    """The function's process could not be started."""


class UnsafeEnvironment(ValueError):
    """A request value cannot be passed in an environment (it holds a NUL byte)."""


def log_event(log: logging.Logger, level: int, event: str, **fields: object) -> None:
    """One structured line in the front's format (:func:`fwatchdog.logs.kv`)."""
    if log.isEnabledFor(level):
        log.log(level, kv(event, **fields))


def error_response(status: int, text: str) -> web.Response:
    """A plain-text error written by the watchdog itself (not the function's output)."""
    return web.Response(status=status, text=text + "\n", content_type="text/plain")


def canonical_header_key(name: str) -> str:
    """Go's ``textproto.CanonicalMIMEHeaderKey``: ``content-type`` -> ``Content-Type``.

    A name holding a byte that is not a token character is returned unchanged,
    as Go does.
    """
    if any(c not in _TCHAR for c in name):
        return name
    out = []
    upper = True
    for c in name:
        out.append(c.upper() if upper else c.lower())
        upper = c == "-"
    return "".join(out)


def env_name_for_header(name: str) -> str:
    """The ``Http_*`` variable for a request header, e.g. ``X-Call-Id`` -> ``Http_X_Call_Id``.

    Dashes become underscores as in of-watchdog; any other byte outside
    ``[A-Za-z0-9_]`` also becomes an underscore so a shell can read the variable.
    """
    key = canonical_header_key(name)
    return "Http_" + "".join(c if c in _ENV_SAFE else "_" for c in key)


def _checked(value: str, what: str) -> str:
    if "\x00" in value:
        raise UnsafeEnvironment(f"{what} holds a NUL byte, which cannot be passed to the function")
    return value


def request_environment(
    base: Mapping[str, str],
    headers: Iterable[tuple[str, str]],
    *,
    method: str,
    path: str,
    raw_query: str,
) -> dict[str, str]:
    """The child's environment: ``base``, then one variable per header, then the request line.

    Later entries win, as in Go's ``exec`` (of-watchdog appends to ``os.Environ()``):
    a header cannot override ``Http_Method``, ``Http_Path`` or ``Http_Query``.
    """
    env = dict(base)
    seen: set[str] = set()
    transfer_encoding: str | None = None
    chunked = False
    pairs = list(headers)
    for name, value in pairs:
        if name.lower() == "transfer-encoding":
            if transfer_encoding is None:
                transfer_encoding = value.split(",")[0].strip()
            chunked = chunked or "chunked" in value.lower()
    for name, value in pairs:
        low = name.lower()
        # Go drops Content-Length (and Trailer) from a chunked request's headers.
        if low in _NOT_EXPORTED or (chunked and low in ("content-length", "trailer")):
            continue
        key = env_name_for_header(name)
        if key in seen:
            continue  # first value wins
        seen.add(key)
        env[key] = _checked(value, f"header {name}")
    env["Http_Method"] = method
    if raw_query:
        env["Http_Query"] = _checked(raw_query, "the query string")
    if path:
        env["Http_Path"] = _checked(path, "the path")
    if transfer_encoding:
        env["Http_Transfer_Encoding"] = _checked(transfer_encoding, "Transfer-Encoding")
    return env


def environment_for(request: web.Request, base: Mapping[str, str]) -> dict[str, str]:
    """:func:`request_environment` for an aiohttp request (decoded path, raw query)."""
    return request_environment(
        base,
        request.headers.items(),
        method=request.method,
        path=request.path,
        raw_query=request.rel_url.raw_query_string,
    )


def effective_timeout(exec_timeout: float, header: str | None) -> float:
    """The request's time limit in seconds, 0 meaning none.

    ``X-Timeout`` (a duration) may only shorten ``exec_timeout``; an invalid or
    zero value is ignored. With no ``exec_timeout`` any positive value applies.
    """
    if not header:
        return exec_timeout
    try:
        wanted = parse_duration(header)
    except ValueError:
        return exec_timeout
    if wanted <= 0:
        return exec_timeout
    return wanted if exec_timeout == 0 else min(wanted, exec_timeout)


def describe_exit(returncode: int) -> str:
    """Go's ``ProcessState.String()``: ``exit status 1``, ``signal: killed``."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.strsignal(-returncode) or f"signal {-returncode}"
    except ValueError:
        name = f"signal {-returncode}"
    return "signal: " + name[:1].lower() + name[1:]


@dataclass(eq=False)  # identity semantics: children live in sets
class Child:
    """One running function process, leader of its own process group."""

    proc: asyncio.subprocess.Process
    stderr_task: asyncio.Task[None]
    killed: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> asyncio.StreamReader:
        assert self.proc.stdout is not None
        return self.proc.stdout

    def kill(self) -> None:
        """SIGKILL the whole process group (the child and everything it forked)."""
        self.killed = True
        # The group outlives its leader while grandchildren run, so kill it even
        # after the leader has exited; ProcessLookupError means nobody is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    async def reap(self) -> int:
        """Wait for the leader's exit status."""
        return await self.proc.wait()

    async def feed(self, read: Callable[[], Awaitable[bytes]]) -> None:
        """Copy chunks from ``read`` (until it returns b"") to stdin, then close stdin.

        Errors from ``read`` (the client's body) propagate; a child that stops
        reading stdin just ends the copy.
        """
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            while True:
                chunk = await read()
                if not chunk:
                    break
                if stdin.transport.is_closing():
                    return  # the child closed stdin or exited: it wants no more
                try:
                    stdin.write(chunk)
                    await stdin.drain()
                except (OSError, RuntimeError):
                    # Same meaning: asyncio raises BrokenPipeError or
                    # ConnectionResetError, uvloop a RuntimeError ("the handler
                    # is closed") once the pipe is gone.
                    return
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                stdin.close()

    async def feed_bytes(self, data: bytes) -> None:
        """Write ``data`` to stdin and close it."""
        sent = False

        async def once() -> bytes:
            nonlocal sent
            if sent:
                return b""
            sent = True
            return data

        await self.feed(once)


async def spawn(
    argv: tuple[str, ...],
    env: Mapping[str, str],
    *,
    stderr_sink: TextIO,
    prefix_logs: bool,
    log_buffer_size: int,
) -> Child:
    """Start ``argv`` with pipes on stdin, stdout and stderr; stderr is forwarded."""
    if not argv:
        raise SpawnError("fprocess is empty")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
            limit=CHUNK_SIZE,
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SpawnError(f"cannot start {argv[0]!r}: {reason}") from exc
    except ValueError as exc:  # e.g. a NUL byte in argv or env
        raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
    assert proc.stderr is not None
    task = asyncio.ensure_future(
        pump(proc.stderr, "stderr", stderr_sink, prefix=prefix_logs, limit=log_buffer_size)
    )
    return Child(proc=proc, stderr_task=task)


class DisconnectWatch:
    """Calls ``on_gone`` once the client's connection is lost.

    aiohttp does not cancel a handler when its client goes away, and a child
    that writes nothing gives no write to fail; so a timer looks at the
    connection every ``interval`` seconds. A timer, not a task: it costs one
    callback per interval and nothing when the request ends first.
    """

    def __init__(self, request: web.BaseRequest, on_gone: Callable[[], None],
                 *, interval: float = 0.5) -> None:
        self._request = request
        self._on_gone = on_gone
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(interval, self._check)
        self.gone = False

    def _check(self) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self.gone = True
            self._handle = None
            self._on_gone()
            return
        self._handle = self._loop.call_later(self._interval, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Children:
    """The live children of one mode instance, so ``stop`` can end them all.

    Each live child's pid is also kept in ``owned`` (``ModeContext.children``):
    the orphan reaper must not collect a child whose exit status we wait for.
    """

    def __init__(self, owned: set[int]) -> None:
        self._owned = owned
        self._live: set[Child] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    def add(self, child: Child) -> None:
        self._live.add(child)
        self._owned.add(child.pid)
        # stderr may outlive the request (a grandchild holding it); keep a
        # reference until it ends so the task is not collected mid-way.
        self._pumps.add(child.stderr_task)
        child.stderr_task.add_done_callback(self._pumps.discard)

    def discard(self, child: Child) -> None:
        self._live.discard(child)
        self._owned.discard(child.pid)

    def __len__(self) -> int:
        return len(self._live)

    async def stop(self, grace: float = 5.0) -> None:
        """Kill every live child's group, reap them, and let stderr drain."""
        live = list(self._live)
        for child in live:
            child.kill()
        if live:
            await asyncio.wait([asyncio.ensure_future(c.reap()) for c in live], timeout=grace)
        for child in live:
            self.discard(child)
        pumps = list(self._pumps)
        if pumps:
            _, pending = await asyncio.wait(pumps, timeout=grace)
            for task in pending:
                task.cancel()
