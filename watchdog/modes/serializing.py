"""mode=serializing: one process per request, whole body in, whole stdout out.

The request body is read whole (at most ``max_body_size`` bytes when that is
set), written to the child's stdin, and stdin closed; the child's whole stdout
becomes the response. Like of-watchdog 0.11, every answer carries
``X-Duration-Seconds`` (``%f`` of the seconds since the request arrived).

Outcomes (of-watchdog differences marked *fix* / *ours*):

=================================  =================================================
child exits 0                      200, ``Content-Type: content_type``, stdout as body
child exits non-zero               500, body ``exit status N`` (Go's wording, as
                                   of-watchdog; stderr goes to the log, not the client)
fprocess cannot be started         500 with the reason
exec_timeout reached               500 (as of-watchdog, whose context kill surfaces as
                                   ``signal: killed``); *fix* the body names the
                                   timeout and the whole process group is killed
body over ``max_body_size``        *ours* 413 before any process starts
body not in within ``read_timeout``  *ours* 408 before any process starts (a
                                   half-sent body never holds its
                                   ``max_inflight`` slot for ever)
``X-Timeout`` header               *ours* may shorten exec_timeout (as http mode)
error bodies                       *fix* ``text/plain`` (of-watchdog labels its error
                                   text with ``content_type``)
=================================  =================================================

Invariants:
- No process starts before the whole body is in hand (a 413 costs no fork).
- Every child is reaped before ``handle`` returns; its process group is killed
  on every path except a clean exit.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from fwatchdog.durations import format_duration
from fwatchdog.modes.forking import ForkingMode
from fwatchdog.process import (
    CHUNK_SIZE,
    Child,
    DisconnectWatch,
    SpawnError,
    UnsafeEnvironment,
    describe_exit,
    effective_timeout,
    environment_for,
    error_response,
    log_event,
    spawn,
)


class _TooLarge(Exception):
    pass


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, or :class:`_TooLarge` past ``limit`` bytes (0: no limit).

    Reads the stream directly: aiohttp's ``request.read()`` has its own 1 MiB
    cap (``client_max_size``) that of-watchdog does not have.
    """
    if limit and request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(CHUNK_SIZE)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if limit and size > limit:
            raise _TooLarge
        parts.append(chunk)


def _stamp(response: web.StreamResponse, started: float) -> web.StreamResponse:
    response.headers["X-Duration-Seconds"] = f"{time.monotonic() - started:f}"
    return response


class SerializingMode(ForkingMode):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        config = self.ctx.config
        timeout = effective_timeout(config.exec_timeout, request.headers.get("X-Timeout"))
        read_limit = config.read_limit or 0.0
        # The body is bounded by read_timeout (408) and by the request's own limit (500).
        body_limit = min((t for t in (timeout, read_limit) if t > 0), default=0.0)
        try:
            env = environment_for(request, self._base_env)
            if body_limit > 0:
                body = await asyncio.wait_for(read_body(request, config.max_body_size),
                                              body_limit)
            else:
                body = await read_body(request, config.max_body_size)
        except UnsafeEnvironment as exc:
            return _stamp(error_response(400, str(exc)), started)
        except _TooLarge:
            too_large = error_response(
                413, f"request body larger than max_body_size ({config.max_body_size} bytes)")
            # The rest of the body is unread: close rather than drain it for keep-alive.
            too_large.force_close()
            return _stamp(too_large, started)
        except asyncio.TimeoutError:
            if read_limit and body_limit == read_limit:
                late = error_response(408, "request body not received within read_timeout")
                late.force_close()  # the rest of the body is not worth reading
                return _stamp(late, started)
            return _stamp(error_response(
                500, f"exec_timeout of {format_duration(timeout)} exceeded reading the body"
            ), started)
        except Exception as exc:  # whatever aiohttp raises for a broken or cut body
            return _stamp(error_response(400, f"cannot read the request body: {exc}"), started)

        remaining = timeout - (time.monotonic() - started) if timeout > 0 else 0.0
        status, payload = await self._run(request, env, body, timeout, max(remaining, 1e-3))
        if status == 200:
            ok = web.Response(status=200, body=payload,
                              headers={"Content-Type": config.content_type})
            return _stamp(ok, started)
        # of-watchdog writes err.Error() with no newline; clients may compare it.
        failed = web.Response(status=status, text=payload.decode(), content_type="text/plain")
        return _stamp(failed, started)

    async def _run(self, request: web.Request, env: dict[str, str], body: bytes,
                   timeout: float, remaining: float) -> tuple[int, bytes]:
        """Run the child over ``body``; (200, stdout) or (status, error text)."""
        config = self.ctx.config
        try:
            child = await spawn(
                config.fprocess, env, stderr_sink=self.ctx.stderr,
                prefix_logs=config.prefix_logs, log_buffer_size=config.log_buffer_size,
            )
        except SpawnError as exc:
            log_event(self.ctx.log, logging.ERROR, "function_start_failed", mode="serializing",
                      error=str(exc))
            return 500, str(exc).encode()
        self._children.add(child)
        watch = DisconnectWatch(request, child.kill)
        error: str | None = None
        output = b""
        try:
            if timeout > 0:
                output, returncode = await asyncio.wait_for(self._exchange(child, body), remaining)
            else:
                output, returncode = await self._exchange(child, body)
            if returncode != 0:
                error = describe_exit(returncode)
        except asyncio.TimeoutError:
            child.kill()
            error = f"exec_timeout of {format_duration(timeout)} exceeded, process killed"
        finally:
            watch.cancel()
            if child.proc.returncode is None:
                child.kill()
            try:
                await child.reap()
            finally:
                self._children.discard(child)
        if watch.gone:
            error = "client disconnected"  # the cause, not the kill it led to
        if error is not None:
            log_event(self.ctx.log, logging.WARNING, "function_failed", mode="serializing",
                      pid=child.pid, error=error)
            return 500, error.encode()
        return 200, output

    @staticmethod
    async def _exchange(child: Child, body: bytes) -> tuple[bytes, int]:
        # Write and read at once: a child may fill its stdout pipe before it
        # has read all of stdin.
        feeder = asyncio.ensure_future(child.feed_bytes(body))
        try:
            output = await child.stdout.read()
            returncode = await child.reap()
        finally:
            # Not awaited: a grandchild may hold stdin open without reading it.
            if feeder.done():
                if not feeder.cancelled():
                    feeder.exception()  # retrieved: a write error only means "stopped reading"
            else:
                feeder.cancel()
        return output, returncode
