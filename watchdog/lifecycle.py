"""Lock file, accepting state and signal recording: the pieces of the lifecycle.

The lock file (``$TMPDIR/.lock``, empty) says "this watchdog serves"; Docker's
``HEALTHCHECK`` and ``fwatchdog -run-healthcheck`` test for it, and
``/_/health`` requires it unless ``suppress_lock`` is set.

Signal handlers only record: :class:`SignalRecorder` notes which signal came and
sets an event; the server's shutdown method then runs the drain order top to
bottom in ordinary code (see ``fwatchdog.server.Watchdog.shutdown``).

Signals, with their meaning for the watchdog (as PID 1 in a container a signal
without a handler is ignored, so each one the watchdog may get has one):

========  ====================================================================
SIGTERM   graceful shutdown: the drain order of ``Watchdog.shutdown``
SIGINT    the same as SIGTERM (Ctrl-C on a terminal)
SIGHUP    the same as SIGTERM (a closed terminal; nothing is reloaded)
a second  SIGTERM, SIGINT or SIGHUP while draining: the drain is cut short,
          :attr:`SignalRecorder.forced` is set; requests still in flight are
          cut, the function gets SIGKILL after its SIGTERM without the grace
SIGQUIT   the stacks of the watchdog's threads go to stderr, then the same
          cut-short shutdown, and the exit code is 2 (a Go program's answer
          to SIGQUIT, as of-watchdog's)
========  ====================================================================


Invariants: nothing here holds global state (the lock path is passed in);
:meth:`LockFile.remove` is safe to call when the file is already gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
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


GRACEFUL = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
HANDLED = (*GRACEFUL, signal.SIGQUIT)


class SignalRecorder:
    """Records the signals of the module docstring; the lifecycle acts on its events.

    :attr:`event`: a shutdown was asked for (:attr:`received` says by which
    signal, the first one). :attr:`forced`: cut the drain short (a second
    signal, or SIGQUIT). :attr:`quit`: SIGQUIT came (exit code 2).
    """

    def __init__(self, on_quit: Callable[[], None] | None = None) -> None:
        self.event = asyncio.Event()
        self.forced = asyncio.Event()
        self.received: signal.Signals | None = None
        self.quit = False
        self._on_quit = on_quit

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in HANDLED:
            loop.add_signal_handler(sig, self._record, sig)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in HANDLED:
            loop.remove_signal_handler(sig)

    def _record(self, sig: signal.Signals) -> None:
        if sig is signal.SIGQUIT:
            self.quit = True
            if self._on_quit is not None:
                self._on_quit()
            self.forced.set()
        elif self.received is not None:
            self.forced.set()  # a second request to stop: stop now
        if self.received is None:
            self.received = sig
        self.event.set()
