"""Admission to the model: a bounded number of generations at once, a bounded queue.

``Admission(slots, queue, wait)``: at most ``slots`` generations run at once; a
request that finds them all taken waits, first come first served, behind at most
``queue`` others, for at most ``wait`` seconds. :meth:`Admission.enter` returns a
:class:`Slot` or raises :class:`Busy` (the queue is full, or the wait ran out: the
caller answers 503 with ``Retry-After``) or :class:`Left` (the client went away
while waiting: nobody reads an answer).

Invariants:
- Order: a slot that frees goes to the request that has waited longest; a newcomer
  never overtakes a waiting request, even when it arrives just as a slot frees.
- Every slot is released exactly once (:meth:`Slot.release` is idempotent), and a
  waiter that gives up (busy, left) leaves the queue before :meth:`enter` returns,
  waking the next one.
- The waiting is in the caller's thread; a thread waits at most ``wait`` seconds,
  and sees a client's departure within :data:`POLL_S` (``cancelled`` is a
  ``threading.Event`` set by the server, which cannot wake a condition).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

POLL_S = 0.05


class Busy(Exception):
    """No slot, and no room or no time to wait for one; ``reason`` says which."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # "queue_full" or "queue_wait"


class Left(Exception):
    """The client went away while its request waited."""


class Slot:
    """One generation's place; release() is idempotent."""

    def __init__(self, admission: Admission, waited_s: float) -> None:
        self._admission = admission
        self._held = True
        self.waited_s = waited_s

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()


class Admission:
    def __init__(self, slots: int, queue: int, wait: float) -> None:
        if slots < 1 or queue < 0 or wait < 0:
            raise ValueError(f"Admission({slots}, {queue}, {wait}): slots >= 1, queue >= 0, "
                             "wait >= 0")
        self.slots = slots
        self.queue = queue
        self.wait = wait
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: collections.deque[object] = collections.deque()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def enter(self, cancelled: threading.Event | None = None,
              on_queued: Callable[[int], None] | None = None) -> Slot:
        """A slot, at once or after waiting; ``on_queued(position)`` is called (1 for
        the head of the queue) when the request starts to wait."""
        started = time.monotonic()
        with self._cond:
            if self._running < self.slots and not self._waiting:
                self._running += 1
                return Slot(self, 0.0)
            if len(self._waiting) >= self.queue:
                raise Busy("queue_full", f"The server is busy: {self._running} generations "
                                         f"are running and {len(self._waiting)} waiting. "
                                         "Retry shortly.")
            ticket = object()
            self._waiting.append(ticket)
            if on_queued is not None:
                on_queued(len(self._waiting))
            deadline = started + self.wait
            try:
                while True:
                    if self._waiting[0] is ticket and self._running < self.slots:
                        self._waiting.popleft()
                        self._running += 1
                        return Slot(self, time.monotonic() - started)
                    if cancelled is not None and cancelled.is_set():
                        raise Left()
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise Busy("queue_wait", f"The server is busy: no generation slot "
                                                 f"freed within {self.wait:g} s. Retry "
                                                 "shortly.")
                    self._cond.wait(min(remaining, POLL_S) if cancelled is not None
                                    else remaining)
            except BaseException:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()  # the next in line may be at the head now
                raise

    def _release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()
