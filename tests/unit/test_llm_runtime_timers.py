"""The runtime's timers under uvloop, whose call_later(0) returns a plain Handle."""

from __future__ import annotations

import asyncio
import io
import logging

import uvloop

from fwatchdog.config import from_env
from fwatchdog.llm.runtime import Runtime


def test_a_zero_delay_callback_does_not_break_later_timers() -> None:
    """A zygote respawned without backoff schedules its spawn with delay 0; every
    later timer (a deferred spare, a paused warm-up) must still be scheduled."""
    fired: list[str] = []

    async def main() -> None:
        runtime = Runtime(from_env({"mode": "llm"}), log=logging.getLogger("test"),
                          metrics=None, stdout=io.StringIO(), stderr=io.StringIO(),
                          children=set())
        done = asyncio.Event()
        runtime._later(0.0, lambda: fired.append("now"))
        await asyncio.sleep(0)
        runtime._later(0.01, lambda: (fired.append("soon"), done.set()))
        runtime._later(30.0, lambda: fired.append("never"))
        await asyncio.wait_for(done.wait(), 10)
        # Kept for stop() to cancel: timers only, never the zero-delay handle.
        assert all(callable(getattr(t, "when", None)) for t in runtime._timers)
        for timer in runtime._timers:
            timer.cancel()

    uvloop.run(main())
    assert fired == ["now", "soon"]
