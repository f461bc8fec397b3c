"""Reaping orphans when the watchdog is PID 1 (or a child subreaper).

In a container the watchdog is usually PID 1, so every process orphaned inside
it (a function's grandchild whose parent died) becomes our child; unreaped, each
stays a zombie for the life of the container. A blanket ``waitpid(-1)`` would
also steal the exit status of children the modes wait on (uvloop/libuv and
asyncio wait by pid), turning "the function exited with 3" into "no such child".

So a scan reaps only zombies that
- are our children (``/proc/<pid>/stat``: state ``Z``, parent = us),
- are not in the ``owned`` set (pids the front waits on itself), and
- have stayed zombies for at least ``grace`` seconds. Children the event loop
  waits on are collected within one loop turn of SIGCHLD, so a zombie that
  lingers is one nobody waits for. This protects children that a mode spawned
  without registering them in ``owned``.

A cheap ``waitid(P_ALL, WNOWAIT)`` peek skips the ``/proc`` scan when no child
has exited. The scan runs on a timer, not from a SIGCHLD handler: installing a
Python SIGCHLD handler would replace libuv's, which uvloop needs to see its own
children exit.

Invariant: :meth:`Reaper.scan` never waits on a pid in ``owned``, never blocks,
and never raises for a vanished or unreadable process.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable, Collection

from fwatchdog.logs import kv

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def _prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn: Callable[..., int] = libc.prctl
    return fn


def is_subreaper() -> bool:
    prctl = _prctl()
    if prctl is None:
        return False
    value = ctypes.c_int(0)
    if prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
        return False
    return value.value != 0


def set_subreaper() -> bool:
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def needed() -> bool:
    """Orphans are reparented to us only as PID 1 or as a subreaper."""
    return os.getpid() == 1 or is_subreaper()


def zombie_children(parent: int, proc_root: str = "/proc") -> list[int]:
    out: list[int] = []
    try:
        names = os.listdir(proc_root)
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) >= 2 and fields[0] == b"Z" and int(fields[1]) == parent:
            out.append(int(name))
    return out


class Reaper:
    def __init__(
        self,
        log: logging.Logger,
        owned: Collection[int],
        *,
        grace: float = 2.0,
        interval: float = 1.0,
        proc_root: str = "/proc",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.owned = owned
        self.grace = grace
        self.interval = interval
        self.proc_root = proc_root
        self.clock = clock
        self._first_seen: dict[int, float] = {}

    def scan(self) -> list[int]:
        """Reap the lingering orphan zombies; return their pids."""
        try:
            peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            peek = None
        if peek is None:
            self._first_seen.clear()
            return []
        now = self.clock()
        zombies = [p for p in zombie_children(os.getpid(), self.proc_root) if p not in self.owned]
        seen = {p: self._first_seen.get(p, now) for p in zombies}
        self._first_seen = seen
        reaped: list[int] = []
        for pid, first in list(seen.items()):
            if now - first < self.grace:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue  # someone else collected it meanwhile
            if got == pid:
                reaped.append(pid)
                self._first_seen.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                self.log.info(kv("orphan_reaped", pid=pid, code=code))
        return reaped

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.scan()
