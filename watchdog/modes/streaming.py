"""mode=streaming: one process per request, stdin and stdout streamed.

The request body is copied to the child's stdin as it arrives (never buffered
whole) and stdin is closed at its end; the child's stdout is the response body,
``Content-Type: content_type``, each chunk written to the client as soon as it
is read. The status line waits for the first byte of output, which is what lets
a failure before any output be reported properly.

Outcomes (of-watchdog 0.11 differences marked *fix* / *ours*):

====================================  ==============================================
child writes output, exits 0          200, body streamed (chunked on HTTP/1.1)
child exits 0 with no output          200, empty body
child fails before any output         *fix* 500 with ``exit status N`` (of-watchdog: 200)
fprocess cannot be started            *fix* 500 with the reason (of-watchdog: 200)
child fails after output started      *fix* response aborted: the client sees an
                                      incomplete chunked stream (of-watchdog ends it
                                      cleanly, hiding the failure)
exec_timeout before any output        *fix* 500 naming the timeout (of-watchdog: 200)
exec_timeout after output started     response aborted, as a failure
body not in within ``read_timeout``   *ours* 408 and the group killed (before any
                                      output; after, the response is aborted), so
                                      a half-sent body never holds its
                                      ``max_inflight`` slot for ever
client goes away                      child's process group killed
``X-Timeout`` header                  *ours* may shorten exec_timeout (as http mode)
====================================  ==============================================

Invariants:
- Every child is reaped before :meth:`StreamingMode.handle` returns, and its
  process group is killed on every path except a clean exit.
- ``handle`` never raises for what a client or the child does.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from fwatchdog.durations import format_duration
from fwatchdog.modes.base import BODY_BYTES_KEY
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

if sys.version_info >= (3, 11):
    from asyncio import timeout_at
else:  # pragma: no cover - aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout_at


class _Relay:
    """One request's copy loops; keeps what ``handle`` needs after a timeout."""

    def __init__(self, request: web.Request, child: Child, content_type: str,
                 read_deadline: float | None = None) -> None:
        self.request = request
        self.read_deadline = read_deadline  # loop time by which the body must be in
        self.child = child
        self.content_type = content_type
        self.response: web.StreamResponse | None = None  # the streamed answer, once chosen
        self.result: web.StreamResponse | None = None
        self.failure: str | None = None  # why the function failed, if it did
        self.body_error: BaseException | None = None
        self.body_late = False  # the body did not arrive within read_timeout
        self.feeder: asyncio.Future[None] | None = None

    @property
    def started(self) -> bool:
        """True once the status line may have gone out: no other answer is possible."""
        return self.response is not None and self.response.prepared

    async def _read(self) -> bytes:
        async with timeout_at(self.read_deadline):
            return await self.request.content.readany()

    async def _feed(self) -> None:
        read = self.request.content.readany if self.read_deadline is None else self._read
        try:
            await self.child.feed(read)
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            self.body_late = True
            self.body_error = TimeoutError("request body not received within read_timeout")
            self.child.kill()
        except Exception as exc:  # a broken or truncated request body
            self.body_error = exc
            self.child.kill()

    async def run(self) -> None:
        self.feeder = asyncio.ensure_future(self._feed())
        stdout = self.child.stdout
        first = await stdout.read(CHUNK_SIZE)
        if not first:
            returncode = await self.child.reap()
            if self.body_late:
                self.result = error_response(408, str(self.body_error))
                self.result.force_close()  # the rest of the body is not worth reading
            elif self.body_error is not None:
                self.result = error_response(
                    400, f"cannot read the request body: {self.body_error}")
            elif returncode != 0:
                self.failure = describe_exit(returncode)
                self.result = error_response(500, self.failure)
            else:
                self.result = web.Response(status=200, headers={"Content-Type": self.content_type})
            return
        response = web.StreamResponse(status=200, headers={"Content-Type": self.content_type})
        # Kept before prepare: a timeout may strike while the status line is
        # being written, and then no second response may follow.
        self.response = self.result = response
        await response.prepare(self.request)
        written = 0
        chunk = first
        while chunk:
            await response.write(chunk)
            written += len(chunk)
            response[BODY_BYTES_KEY] = written  # for the access log's ContentLength
            chunk = await stdout.read(CHUNK_SIZE)
        returncode = await self.child.reap()
        if self.body_error is not None:
            self.failure = f"cannot read the request body: {self.body_error}"
        elif returncode != 0:
            self.failure = describe_exit(returncode)
        if self.failure is not None:
            return
        await response.write_eof()


def abort(request: web.BaseRequest) -> None:
    """Cut the connection so the client sees a truncated response, not a complete one."""
    transport = request.transport
    if transport is not None:
        transport.close()


class StreamingMode(ForkingMode):
    async def handle(self, request: web.Request) -> web.StreamResponse:
        config = self.ctx.config
        log = self.ctx.log
        timeout = effective_timeout(config.exec_timeout, request.headers.get("X-Timeout"))
        try:
            env = environment_for(request, self._base_env)
        except UnsafeEnvironment as exc:
            return error_response(400, str(exc))
        try:
            child = await spawn(
                config.fprocess, env, stderr_sink=self.ctx.stderr,
                prefix_logs=config.prefix_logs, log_buffer_size=config.log_buffer_size,
            )
        except SpawnError as exc:
            log_event(log, logging.ERROR, "function_start_failed", mode="streaming", error=str(exc))
            return error_response(500, str(exc))
        self._children.add(child)
        limit = config.read_limit
        read_deadline = asyncio.get_running_loop().time() + limit if limit is not None else None
        relay = _Relay(request, child, config.content_type, read_deadline)
        watch = DisconnectWatch(request, child.kill)
        try:
            if timeout > 0:
                await asyncio.wait_for(relay.run(), timeout)
            else:
                await relay.run()
        except asyncio.TimeoutError:
            child.kill()
            relay.failure = f"exec_timeout of {format_duration(timeout)} exceeded, process killed"
        except ConnectionResetError:  # the client went away mid-stream
            child.kill()
            relay.failure = "client disconnected"
        finally:
            watch.cancel()
            if relay.feeder is not None:
                relay.feeder.cancel()
            if child.proc.returncode is None:
                child.kill()  # an exceptional path (cancelled, client gone): end the group
            try:
                await child.reap()
            finally:
                self._children.discard(child)
        if watch.gone:
            relay.failure = "client disconnected"  # the cause, not the kill it led to
        if relay.failure is not None:
            log_event(log, logging.WARNING, "function_failed", mode="streaming", pid=child.pid,
                      error=relay.failure, output_started=relay.started)
            if relay.response is not None and relay.started:
                abort(request)
                return relay.response
            if relay.result is None or relay.result is relay.response:
                return error_response(500, relay.failure)  # no status line went out
        assert relay.result is not None  # run() always decides before returning
        return relay.result
