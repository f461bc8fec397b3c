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
"""

from __future__ import annotations

import abc
import asyncio
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, TextIO

from aiohttp import web
from prometheus_client import CollectorRegistry

from fwatchdog.config import Config, Mode

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
    # The watchdog's metrics registry, for a mode's own metrics (mode=llm).
    registry: CollectorRegistry | None = None


class ModeHandler(abc.ABC):
    def __init__(self, ctx: ModeContext) -> None:
        self.ctx = ctx

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
