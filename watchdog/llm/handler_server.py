"""A function's HTTP server: python3-http's contract on aiohttp.

One implementation for both ways a python3-llm function runs: in ``mode=http`` the
template's ``index.py`` serves it on ``http_port`` (TCP, 5000), and in ``mode=llm``
every forked handler process serves it on a Unix socket (owner-only) that the
front proxies to. It calls the function's ``handle(event, context)`` exactly as
python3-http does:

- ``event``: ``.body`` (bytes), ``.headers`` (case-insensitive), ``.method``,
  ``.query``, ``.path``; ``context``: ``.hostname``, plus ``.cancelled``, a
  ``threading.Event`` set when the client disconnects (long work should check it).
- The return value: ``None`` (empty 200); a dict ``{statusCode, headers, body}``
  (a dict or list body is sent as JSON, a str as ``text/html`` like Flask, bytes
  as they are); or an iterator, alone or as the dict's body, which is streamed:
  chunked, one flush per item. The stream is framed as server-sent events
  (``data: ...`` + blank line, dicts and lists as JSON) when the response's
  Content-Type is ``text/event-stream``, or when the handler set no Content-Type and
  the client's Accept contains ``text/event-stream``.

Request bodies are bounded by ``http_max_body_size`` bytes (default 16 MiB, 0:
no limit): a larger one is answered 413 with OpenAI's error JSON before
``handle`` runs, and the connection is closed (the rest is not read).

Invariants:
- The event loop never runs function code: a sync ``handle`` and every ``next()`` of
  a sync iterator run in a worker thread, so health checks and other requests are
  answered while a model computes. (An ``async def handle`` runs on the loop.)
- A returned iterator is always closed (its ``finally`` runs) exactly once, in a
  worker thread, after any ``next()`` in progress returned: when the stream ends,
  when it fails, and when the client disconnects (then ``context.cancelled`` is set
  first and ``client_disconnected`` is logged). A client that disconnects before
  ``handle`` returns still gets whatever it returned closed.
- The configuration is read once, by :meth:`Config.from_env`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

LOG = logging.getLogger("handler_server")

_END = object()  # returned by _next_item when the iterator is exhausted
_SSE_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 5000
    threads: int = 32
    shutdown_timeout: float = 60.0
    hostname: str = "localhost"
    max_body_size: int = 16 << 20  # bytes; 0: no limit

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """``http_port`` (as node templates name it; python3-http hard-codes 5000),
        ``http_host``, ``http_threads``, ``http_shutdown_timeout``,
        ``http_max_body_size`` (bytes), ``HOSTNAME``."""
        errors = []

        def number(name: str, default: float, kind: type) -> Any:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = -1
            if value < 0 or (name == "http_port" and not 0 <= value <= 65535):
                errors.append(f"{name}={raw!r}")
                return default
            return value

        port = number("http_port", cls.port, int)
        threads = number("http_threads", cls.threads, int)
        shutdown = number("http_shutdown_timeout", cls.shutdown_timeout, float)
        max_body = number("http_max_body_size", cls.max_body_size, int)
        if errors:
            raise ValueError("bad configuration: " + ", ".join(errors))
        return cls(
            host=env.get("http_host") or cls.host,
            port=port,
            threads=max(1, threads),
            shutdown_timeout=shutdown,
            max_body_size=max_body,
            hostname=env.get("HOSTNAME") or socket.gethostname() or cls.hostname,
        )


class Event:
    """What python3-http's handlers receive as ``event``."""

    def __init__(self, body: bytes, headers: Any, method: str, query: Any, path: str) -> None:
        self.body = body
        self.headers = headers
        self.method = method
        self.query = query
        self.path = path


class Context:
    """python3-http's ``context`` plus ``cancelled``."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.cancelled = threading.Event()


Handle = Callable[[Event, Context], Any]


def _is_stream(value: Any) -> bool:
    return isinstance(value, (Iterator, AsyncIterator))


def _next_item(iterator: Iterator[Any]) -> Any:
    return next(iterator, _END)


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        LOG.exception("stream_close_failed")


def _encode_body(body: Any, headers: dict[str, str]) -> bytes:
    def default_type(value: str) -> None:
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = value

    if body is None:
        return b""
    if isinstance(body, (bytes, bytearray)):
        default_type("application/octet-stream")
        return bytes(body)
    if isinstance(body, (dict, list)):
        default_type("application/json")
        return json.dumps(body).encode()
    default_type("text/html; charset=utf-8")
    return str(body).encode()


def _sse_frame(item: Any) -> bytes:
    if isinstance(item, (dict, list)):
        data = json.dumps(item)
    elif isinstance(item, (bytes, bytearray)):
        data = bytes(item).decode("utf-8", "replace")
    else:
        data = str(item)
    # A multi-line payload is several data: lines of one event, per the SSE spec,
    # split where SSE ends a line (CRLF, LF, CR), never at U+2028 and other Unicode
    # line breaks, which str.splitlines also splits on.
    lines = _SSE_LINE_BREAK.split(data)
    return ("".join(f"data: {line}\n" for line in lines) + "\n").encode()


def _raw_frame(item: Any) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, (dict, list)):
        return (json.dumps(item) + "\n").encode()
    return str(item).encode()


class HandlerServer:
    """Adapts one ``handle`` function to aiohttp requests."""

    def __init__(self, handle: Handle, config: Config) -> None:
        self._handle = handle
        self._config = config
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=config.threads, thread_name_prefix="handler"
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._config.max_body_size or sys.maxsize)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        app.on_cleanup.append(self._shutdown_executor)
        return app

    def runner(self) -> web.AppRunner:
        # handler_cancellation: a client disconnect cancels the request's task, which
        # is how a blocked handle() or a stream learns the client is gone.
        return web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                             shutdown_timeout=self._config.shutdown_timeout)

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the threads that run ``handle``: per-thread state that the function
        builds on first use (CUDA handles and caches) is then warm for requests."""
        return await asyncio.wrap_future(self._executor.submit(fn, *args, **kwargs))

    async def _shutdown_executor(self, _app: web.Application) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _too_large(self, size: int | None) -> web.Response:
        limit = self._config.max_body_size
        what = f"of {size} bytes " if size is not None else ""
        error = {"error": {
            "message": f"Request body {what}is larger than the limit of {limit} bytes "
                       "(http_max_body_size)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
        response = web.json_response(error, status=413)
        response.force_close()  # the rest of the body is not read
        return response

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        limit = self._config.max_body_size
        if limit and request.content_length is not None and request.content_length > limit:
            return self._too_large(request.content_length)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(None)
        event = Event(body, request.headers, request.method, request.query, request.path)
        context = Context(self._config.hostname)
        started = time.monotonic()
        if inspect.iscoroutinefunction(self._handle):
            try:
                result = await self._handle(event, context)
            except asyncio.CancelledError:
                context.cancelled.set()
                LOG.info("client_disconnected path=%s phase=handle", request.path)
                raise
        else:
            call = self._executor.submit(self._handle, event, context)
            try:
                result = await asyncio.wrap_future(call)
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the client disconnects.
                context.cancelled.set()
                LOG.info("client_disconnected path=%s phase=handle", request.path)
                call.add_done_callback(_close_if_stream)
                raise
        status, headers, payload = self._normalise(result)
        if _is_stream(payload):
            return await self._stream(request, context, status, headers, payload)
        data = _encode_body(payload, headers)
        LOG.debug(
            "request_done path=%s status=%d seconds=%.3f",
            request.path,
            status,
            time.monotonic() - started,
        )
        return web.Response(status=status, headers=headers, body=data)

    def _close_soon(self, iterator: Any) -> None:
        try:
            self._executor.submit(_close, iterator)
        except RuntimeError:  # the executor is shut down: the process is stopping
            _close(iterator)

    @staticmethod
    def _normalise(result: Any) -> tuple[int, dict[str, str], Any]:
        if result is None:
            return 200, {}, b""
        if isinstance(result, dict):
            raw_headers = result.get("headers") or {}
            items = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
            headers = {str(k): str(v) for k, v in items}
            return int(result.get("statusCode", 200)), headers, result.get("body", "")
        return 200, {}, result

    async def _stream(
        self,
        request: web.Request,
        context: Context,
        status: int,
        headers: dict[str, str],
        iterator: Any,
    ) -> web.StreamResponse:
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
        if content_type is None:
            sse = "text/event-stream" in request.headers.get("Accept", "")
            headers["Content-Type"] = "text/event-stream" if sse else "application/octet-stream"
        else:
            sse = content_type.split(";")[0].strip().lower() == "text/event-stream"
        frame = _sse_frame if sse else _raw_frame
        # Proxies (nginx, some ingresses) buffer unless told not to.
        headers.setdefault("X-Accel-Buffering", "no")
        response = web.StreamResponse(status=status, headers=headers)
        pending: concurrent.futures.Future[Any] | None = None
        finished = failed = False
        sent = 0  # items written: a disconnect right after the last one is routine
        try:
            await response.prepare(request)
            while True:
                if isinstance(iterator, AsyncIterator):
                    item = await anext(iterator, _END)
                else:
                    pending = self._executor.submit(_next_item, iterator)
                    item = await asyncio.wrap_future(pending)
                    pending = None
                if item is _END:
                    break
                await response.write(frame(item))
                sent += 1
            finished = True
        except (asyncio.CancelledError, ConnectionResetError):
            context.cancelled.set()
            LOG.info("client_disconnected path=%s phase=stream sent=%d", request.path, sent)
            raise
        except Exception:
            LOG.exception("stream_failed path=%s", request.path)
            # Headers are gone: end the connection without the final chunk, so the
            # client sees a truncated answer, never a clean end.
            if request.transport is not None:
                request.transport.close()
            failed = True
        finally:
            if isinstance(iterator, AsyncIterator):
                aclose = getattr(iterator, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(aclose())
            elif finished:
                # Close before the end of the body: the generator's cleanup is done
                # by the time the client sees the stream end.
                await asyncio.wrap_future(self._executor.submit(_close, iterator))
            elif pending is not None:
                # A next() may still be running in a thread: close right after it (a
                # done callback runs in that thread, or here if it never started).
                pending.add_done_callback(lambda _f: self._close_soon(iterator))
            else:
                self._close_soon(iterator)
        if not failed:
            await response.write_eof()
        return response


def _close_if_stream(future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, dict):
        result = result.get("body")
    if isinstance(result, Iterator):
        _close(result)


def make_runner(handle: Handle, config: Config) -> web.AppRunner:
    return HandlerServer(handle, config).runner()


OnListening = Callable[[HandlerServer], "Coroutine[Any, Any, None] | None"]


async def serve(handle: Handle, config: Config, *, unix_path: str | None = None,
                on_listening: OnListening | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish in-flight requests and return.

    With ``unix_path`` the server listens on a Unix socket there, readable and
    writable by its owner only, instead of ``config.host:config.port``.
    ``on_listening`` is called with the server once connections are accepted; a
    coroutine it returns runs beside the server until the server stops (mode=llm's
    handler reads the front's requests there)."""
    server = HandlerServer(handle, config)
    runner = server.runner()
    await runner.setup()
    site: web.BaseSite
    if unix_path is not None:
        # Owner-only from the moment the socket exists: no window with wider modes.
        old = os.umask(0o177)
        try:
            site = web.UnixSite(runner, unix_path)
            await site.start()
        finally:
            os.umask(old)
        LOG.info("server_started unix=%s", unix_path)
    else:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        LOG.info("server_started host=%s port=%d", config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    beside: asyncio.Task[None] | None = None
    if on_listening is not None:
        started = on_listening(server)
        if started is not None:
            beside = asyncio.ensure_future(started)
    try:
        await stop.wait()
        LOG.info("server_stopping")
    finally:
        if beside is not None:
            beside.cancel()
        await runner.cleanup()
    LOG.info("server_stopped")


def run(handle: Handle, config: Config, *, unix_path: str | None = None,
        on_listening: OnListening | None = None) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(handle, config, unix_path=unix_path, on_listening=on_listening))
    else:
        uvloop.run(serve(handle, config, unix_path=unix_path, on_listening=on_listening))
