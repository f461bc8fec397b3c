"""The interface every mode implements, and the registry that picks one.

The server core (``fwatchdog.server``) owns everything that is the same in
every mode: the listener, ``/_/health`` and ``/_/ready``, the ``max_inflight``
limit, metrics, the access log, the lock file and the shutdown order. A mode
only turns a request for the function into a response, and owns the function's
processes.

Invariants:
- ``start`` returns only when the mode can serve (http: the upstream accepts
  connections); it raises :class:`StartError` when it never will.
- ``handle`` never raises for anything a client sends: errors become responses.
- ``stop`` ends every process the mode started, and is safe to call twice.
- A mode that waits on a child process itself puts its pid in
  ``ModeContext.children`` while it lives, so the orphan reaper (PID 1) never
  collects it first (see ``fwatchdog.reaper``).
- A mode that streams a response of unknown length may store the number of
  body bytes it wrote under ``response[BODY_BYTES_KEY]`` for the access log.

The lean front as a capability. The server owns the serving port; by default
every request goes through aiohttp's web layer to :meth:`ModeHandler.handle`.
A mode whose requests are proxied to HTTP upstreams may also return a
:class:`LeanProxy` from :meth:`ModeHandler.lean_proxy`; the server then puts
the lean protocol-level front (:mod:`fwatchdog.modes.http_fast`) on the port,
and that front proxies *plain* requests itself (see its docstring for which)
through the capability, handing every other connection to aiohttp and so to
``handle``. What the capability is:

- ``acquire()``: an async function that picks the upstream for one request and
  returns a :class:`Lease`: the :class:`~fwatchdog.upstream.Pool` to send it
  through (TCP or a Unix socket) and ``release(outcome)``, called exactly once
  when the request is over, with ``outcome`` one of :data:`OUTCOMES`. It may
  wait (for a handler process to become ready, say): the front runs it under
  the request's deadline (``exec_timeout``, shortened by ``X-Timeout``), so a
  wait that outlasts it is a 504. It raises :class:`Unavailable` when no
  upstream can take the request (503).
- ``limit_for(x_timeout_header)``: the request's time limit in seconds (0: none).
- ``target_for(raw_target)``: the upstream request target for the client's
  origin-form target.
- ``upstream_failed_status``: the answer when the upstream fails before its
  response head (500 by default, as of-watchdog's http mode).
The front applies the same relay rules as the aiohttp path
(:mod:`fwatchdog.relay`) and counts every request through the server's
:class:`~fwatchdog.accounting.Accounting`, so a mode offering the capability
keeps one behaviour on both paths. A mode whose ``handle`` should be cancelled
when the client goes away (a proxy: the upstream call stops) sets
:attr:`ModeHandler.cancel_on_disconnect`.
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry

from fwatchdog.config import Config, Mode

if TYPE_CHECKING:
    from fwatchdog.upstream import Pool

# StreamResponse supports item assignment for per-response state; aiohttp 3.12+
# wants a typed ResponseKey (a plain string warns), older versions take a string.
# A mode that has sent the status line of a streamed response stores the response
# here (``request[STARTED_RESPONSE_KEY]``), so that a client leaving mid-stream is
# recorded with the status it saw, not as a failure.
STARTED_RESPONSE_KEY = "fwatchdog.started_response"
BODY_BYTES_KEY: Any = (web.ResponseKey("fwatchdog.body_bytes", int)
                       if hasattr(web, "ResponseKey") else "fwatchdog.body_bytes")


class StartError(Exception):
    """The mode cannot start serving (bad static_path, upstream never came up, ...)."""


class Unavailable(Exception):
    """No upstream can take the request now: the front answers 503 with this message."""


# How a proxied request ended, as reported to Lease.release.
Outcome = Literal["ok", "error", "timeout", "client_gone"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "error", "timeout", "client_gone")


@dataclass(frozen=True)
class Lease:
    """One request's upstream: send through ``pool``, then call ``release(outcome)`` once."""

    pool: Pool
    release: Callable[[Outcome], None]


@dataclass(frozen=True)
class LeanProxy:
    """What a mode offers the lean front (see the module docstring)."""

    acquire: Callable[[], Awaitable[Lease]]
    limit_for: Callable[[str | None], float]
    target_for: Callable[[str], str]
    # The answer when the upstream fails before its head: of-watchdog's 500 in
    # http mode; a mode whose upstreams are its own processes may say 502.
    upstream_failed_status: int = 500


@dataclass(frozen=True)
class ModeContext:
    config: Config
    log: logging.Logger
    stdout: TextIO  # where forwarded child stdout lines go
    stderr: TextIO  # where forwarded child stderr lines go
    # Set by the mode when a process it needs has died for good (http mode's
    # long-lived child); the server then exits non-zero unless it is draining.
    fatal: asyncio.Event = field(default_factory=asyncio.Event)
    # Pids of children the mode waits on itself; the reaper leaves them alone.
    children: set[int] = field(default_factory=set)
    # Set when the shutdown is cut short (a second SIGTERM, SIGQUIT): stop()
    # then ends the mode's processes without waiting out their grace.
    forced: asyncio.Event = field(default_factory=asyncio.Event)
    # The watchdog's metrics registry, for a mode's own metrics (mode=llm).
    registry: CollectorRegistry | None = None
    # Processes the entry point started before the front's imports, for the mode to
    # adopt (mode=llm's zygote and holder: fwatchdog.llm.spawn.Early); else None.
    prespawned: object | None = None


class ModeHandler(abc.ABC):
    # True: the server cancels handle() when its client goes away.
    cancel_on_disconnect: ClassVar[bool] = False

    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx

    def lean_proxy(self) -> LeanProxy | None:
        """The lean front capability, or None (every request goes to :meth:`handle`)."""
        return None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare to serve; see the module invariants."""

    @abc.abstractmethod
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request for the function."""

    async def ready(self, request: web.Request) -> bool:
        """Extra readiness condition of the mode (``/_/ready``); True by default."""
        return True

    def unready_reason(self) -> str:
        """Why :meth:`ready` is False, for the 503's body; empty by default."""
        return ""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """End every process the mode started."""


# Import strings, so only the chosen mode's module is imported.
_REGISTRY: dict[Mode, str] = {
    Mode.HTTP: "fwatchdog.modes.http:HttpMode",
    Mode.STREAMING: "fwatchdog.modes.streaming:StreamingMode",
    Mode.SERIALIZING: "fwatchdog.modes.serializing:SerializingMode",
    Mode.STATIC: "fwatchdog.modes.static:StaticMode",
    Mode.LLM: "fwatchdog.modes.llm:LlmMode",
}


def load_mode(mode: Mode) -> type[ModeHandler]:
    module_name, _, attr = _REGISTRY[mode].partition(":")
    cls: type[ModeHandler] = getattr(importlib.import_module(module_name), attr)
    return cls
