"""Lock file, accepting state and signal recording: the pieces of the lifecycle.

The lock file (``$TMPDIR/.lock``, empty) says "this watchdog serves"; Docker's
``HEALTHCHECK`` and ``fwatchdog -run-healthcheck`` test for it, and
``/_/health`` requires it unless ``suppress_lock`` is set.

Signal handlers only record: :class:`SignalRecorder` notes which signal came and
sets an event; the server's shutdown method then runs the drain order top to
bottom in ordinary code (see ``fwatchdog.server.Watchdog.shutdown``).

Invariants: nothing here holds global state (the lock path is passed in);
:meth:`LockFile.remove` is safe to call when the file is already gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LockFile:
    path: str

    def write(self) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "wb"):
            pass

    def remove(self) -> bool:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            return False
        return True

    def exists(self) -> bool:
        return os.path.exists(self.path)


@dataclass
class State:
    """What health and readiness report; changed only by the server's lifecycle."""

    accepting: bool = False  # True once serving; False from the first SIGTERM on
    draining: bool = False
    serving: asyncio.Event = field(default_factory=asyncio.Event)  # the mode has started


class SignalRecorder:
    """Records SIGTERM/SIGINT; the lifecycle acts on :attr:`event`."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.received: signal.Signals | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._record, sig)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _record(self, sig: signal.Signals) -> None:
        if self.received is None:
            self.received = sig
        self.event.set()
