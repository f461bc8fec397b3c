"""The sporadic trace of bench/coldstart.py: seeded arrivals and the platform model.

Arrivals (:func:`arrivals`) are shaped like the published Azure Functions invocation
characteristics: most functions are invoked rarely, invocations come in bursts, and
the idle gaps between bursts are heavy-tailed. In real time:
- gaps between bursts: log-normal, median ``gap_median_s``, sigma ``gap_sigma``,
  clipped to [``gap_min_s``, ``gap_max_s``];
- requests per burst: geometric with mean ``burst_mean`` (at least 1, at most
  ``burst_max``);
- gaps inside a burst: exponential with mean ``in_burst_mean_s``.
Time is compressed by ``compress``: gaps between bursts and every platform window are
divided by it; gaps inside a burst and everything the systems do (start-ups,
requests) run in real time. Each request is a streamed chat completion of
``max_tokens`` tokens whose prompt length is drawn from ``prompt_lengths``.

Platform model (:func:`replay`): one instance at a time, warm at the start of the
trace (started, ready and idle). Requests arrive open-loop at their times. After the
last request in flight ends, an instance idle for ``keepalive_s`` (baseline) or
``llm_keepalive_s`` (llm) is stopped (SIGTERM); the next arrival starts a new
instance and waits for it. mode=llm also releases the GPU itself after
``gpu_idle_s`` idle (``llm_gpu_idle_timeout``) and wakes it on the next request.
GPU-seconds (modelled): baseline holds the GPU for each instance's whole life;
llm from each start or wake until ``gpu_idle_s`` after the last request in flight,
or until the instance stops. The trailing idle window after the last request
counts. Where NVML exists, the measured GPU-seconds (time the instance's processes
hold more than half the weight bytes) are reported beside it.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import coldstart_client as client
from coldstart_systems import Instance


@dataclass(frozen=True)
class TraceParams:
    seed: int = 11
    bursts: int = 10
    gap_median_s: float = 300.0
    gap_sigma: float = 1.2
    gap_min_s: float = 30.0
    gap_max_s: float = 4 * 3600.0
    burst_mean: float = 3.0
    burst_max: int = 8
    in_burst_mean_s: float = 0.3
    compress: float = 120.0
    keepalive_s: float = 600.0  # baseline: scale to zero after 10 min idle
    gpu_idle_s: float = 120.0  # llm: release the GPU after 2 min idle
    llm_keepalive_s: float = 3600.0  # llm: the CPU-only instance stays for 1 h
    prompt_lengths: tuple[int, ...] = (7, 57, 300)
    max_tokens: int = 16

    def window(self, seconds: float) -> float:
        return seconds / self.compress


@dataclass(frozen=True)
class Arrival:
    at_s: float  # benchmark seconds since the trace's start
    prompt_tokens: int
    burst: int


def arrivals(p: TraceParams) -> list[Arrival]:
    rng = random.Random(p.seed)
    out: list[Arrival] = []
    t = 0.0
    for burst in range(p.bursts):
        gap = math.exp(math.log(p.gap_median_s) + p.gap_sigma * rng.gauss(0.0, 1.0))
        t += min(max(gap, p.gap_min_s), p.gap_max_s) / p.compress
        size = 1
        while size < p.burst_max and rng.random() > 1.0 / p.burst_mean:
            size += 1
        for i in range(size):
            if i:
                t += rng.expovariate(1.0 / p.in_burst_mean_s)
            out.append(Arrival(t, rng.choice(p.prompt_lengths), burst))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:  # nearest rank
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class _Platform:
    """One system's instances over the trace (see the module doc)."""

    def __init__(self, system: str, start: Callable[[], Instance], p: TraceParams,
                 ready: Callable[[Instance], Any]) -> None:
        self.system = system
        self._start = start
        self._ready = ready
        self.keepalive = p.window(p.keepalive_s if system == "baseline" else p.llm_keepalive_s)
        self.instance: Instance | None = None
        self.lives: list[list[float]] = []  # [start, stop] on the trace clock
        self.starts = 0
        self.inflight = 0
        self.t_start = 0.0
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.instances: list[Instance] = []

    def now(self) -> float:
        return time.monotonic() - self.t_start

    async def acquire(self) -> Instance:
        async with self._lock:
            if self._reaper is not None:
                self._reaper.cancel()
                self._reaper = None
            if self._stopping is not None:
                await self._stopping
                self._stopping = None
            if self.instance is None:
                self.instance = self._start()
                self.instances.append(self.instance)
                self.starts += 1
                self.lives.append([self.now(), math.inf])
            self.inflight += 1
            return self.instance

    def release(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._reaper = asyncio.ensure_future(self._reap())

    async def _reap(self) -> None:
        await asyncio.sleep(self.keepalive)
        if self.inflight == 0 and self.instance is not None:
            instance, self.instance = self.instance, None
            self.lives[-1][1] = self.now()
            self._stopping = asyncio.ensure_future(asyncio.to_thread(instance.stop))

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        if self._stopping is not None:
            await self._stopping
        if self.instance is not None:
            await asyncio.to_thread(self.instance.stop)
            self.instance = None


async def replay(system: str, start: Callable[[], Instance], p: TraceParams,
                 words: Callable[[int, int], str],
                 ready: Callable[[Instance], Any]) -> dict[str, Any]:
    """Run the trace against one system; returns TTFTs and GPU-seconds (modelled)."""
    plan = arrivals(p)
    platform = _Platform(system, start, p, ready)
    # Warm at the start: one instance, ready, that served one request.
    platform.t_start = time.monotonic()
    first = await platform.acquire()
    platform.lives[-1][0] = 0.0
    await ready(first)
    async with client.new_session() as session:
        await client.chat(session, first.url, client.body(words(7, 0), 1), time.monotonic())
        platform.release()
        platform.t_start = time.monotonic()
        platform.lives[-1][0] = 0.0
        requests: list[tuple[float, float]] = []
        results: list[client.Stream | None] = [None] * len(plan)

        async def one(i: int, arrival: Arrival) -> None:
            await asyncio.sleep(max(0.0, platform.t_start + arrival.at_s - time.monotonic()))
            instance = await platform.acquire()
            try:
                request = client.body(words(arrival.prompt_tokens, i + 1), p.max_tokens)
                results[i] = await client.chat(session, instance.url, request,
                                               platform.t_start + arrival.at_s)
            finally:
                requests.append((arrival.at_s, platform.now()))
                platform.release()

        await asyncio.gather(*(one(i, a) for i, a in enumerate(plan)))
        last_end = platform.now()
    held_until = last_end + (platform.keepalive if system == "baseline"
                             else p.window(p.gpu_idle_s))
    await asyncio.sleep(max(0.0, held_until - platform.now()))  # the trailing window
    await platform.close()
    lives = [(a, min(b, held_until)) for a, b in platform.lives]
    if system == "baseline":
        gpu_s = _union(lives)
    else:
        idle = p.window(p.gpu_idle_s)
        gpu_s = _union([(a, min(b + idle, _life_end(lives, a))) for a, b in requests])
    ttfts = [r.ttft_s for r in results if r is not None and r.ok and r.ttft_s is not None]
    failed = ["never sent" if r is None else (r.error or r.status)
              for r in results if r is None or not r.ok]
    return {"ttft_s": percentiles(ttfts) if ttfts else None, "requests": len(plan),
            "failed": [str(f) for f in failed], "instance_starts": platform.starts,
            "gpu_seconds_modelled": gpu_s, "duration_s": held_until,
            "ttfts": ttfts, "arrivals": [asdict(a) for a in plan]}


def _life_end(lives: list[tuple[float, float]], t: float) -> float:
    for a, b in lives:
        if a <= t <= b:
            return b
    return t
