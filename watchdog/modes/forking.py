"""What the two forking modes (streaming, serializing) share: the child's base
environment, the warning for a command that cannot be found, and stopping children.

Invariant: the base environment is a snapshot taken once, when the mode is built;
each request's child gets it plus that request's ``Http_*`` variables.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping

from fwatchdog.modes.base import ModeContext, ModeHandler
from fwatchdog.process import Children, log_event


class ForkingMode(ModeHandler):
    def __init__(self, ctx: ModeContext, *, base_env: Mapping[str, str] | None = None) -> None:
        super().__init__(ctx)
        # The child inherits the watchdog's environment, as in of-watchdog (which
        # passes os.Environ()); taken once, it keeps the hot path allocation-light.
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._children = Children(ctx.children)

    async def start(self) -> None:
        argv = self.ctx.config.fprocess
        # of-watchdog only finds out per request; a warning at start saves a round
        # of 500s in the logs, without refusing to start (PATH may differ in the
        # child's environment).
        if argv and shutil.which(argv[0], path=self._base_env.get("PATH")) is None:
            log_event(self.ctx.log, logging.WARNING, "fprocess_not_found", command=argv[0])

    async def stop(self) -> None:
        await self._children.stop()
