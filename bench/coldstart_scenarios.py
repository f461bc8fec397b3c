"""The scenarios of bench/coldstart.py, one async function each.

Each takes the :class:`coldstart.Bench` (settings, floors, the records written so far)
and adds its records with ``bench.record``. Every cold start is a new ``fwatchdog``
process with the request sent at its spawn (``t0``); other times start at the send.
Loops check ``bench.over_budget()`` between runs and stop early, keeping what they have.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import coldstart_client as client
import coldstart_observe as observe
import coldstart_trace as trace
from coldstart_systems import Instance, role

if TYPE_CHECKING:
    from coldstart import Bench

COLD_PROMPT = 57  # the request sent at time zero of a cold start
COLD_TOKENS = 16
STEADY_REPEATS = 5
DEFAULT_POOL = 2  # llm_handlers (1) plus llm_spares (1), their defaults


async def wait_ready(bench: Bench, inst: Instance, timeout: float = 600) -> float:
    """Poll ``/_/ready`` until 200; seconds since the spawn. Raises if the process dies."""
    deadline = time.monotonic() + timeout
    async with client.new_session() as session:
        while await client.get_status(session, inst.url + "/_/ready") != 200:
            if not inst.alive():
                raise RuntimeError(f"{inst.system} exited {inst.proc.returncode}:\n"
                                   + inst.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"{inst.system} not ready in {timeout}s:\n" + inst.log_tail())
            await asyncio.sleep(0.01)
    return time.monotonic() - inst.t0


async def metrics(inst: Instance) -> observe.Samples:
    async with client.new_session() as session:
        return observe.parse_metrics(await client.get_text(session, inst.metrics_url))


async def request(bench: Bench, inst: Instance, tokens: int, max_tokens: int = 4,
                  sampled: bool = False, seed: int = 0,
                  t0: float | None = None) -> client.Stream:
    async with client.new_session() as session:
        body = client.body(bench.words(tokens, seed), max_tokens, sampled, seed)
        result = await client.chat(session, inst.url, body,
                                   time.monotonic() if t0 is None else t0,
                                   alive=lambda: inst.proc.poll() is None)
    if not result.ok:
        raise RuntimeError(f"{inst.system}: request failed: {result}\n" + inst.log_tail())
    return result


def llm_info(samples: observe.Samples) -> dict[str, Any]:
    return {"phases": observe.phases(samples),
            "template_loads": observe.by_label(
                samples, "fwatchdog_llm_template_loads_total", "outcome"),
            "template_rejected": observe.by_label(
                samples, "fwatchdog_llm_template_rejected_total", "reason"),
            "gpu_memory_metric_bytes": observe.by_label(
                samples, "fwatchdog_llm_gpu_memory_bytes", "process")}


def breakdown(inst: Instance, stream: client.Stream, info: dict[str, Any]) -> dict[str, float]:
    """The cold start cut into consecutive parts that add up to the TTFT."""
    assert stream.ttft_s is not None
    listening = inst.marks.get("listening", stream.sent_s)
    if inst.system == "baseline":
        parts: dict[str, float] = {"front": listening}
        ready = inst.marks.get("upstream_ready", listening)
        parts["function_start"] = max(0.0, ready - listening)
    else:
        # The zygote is spawned before the front's own imports and listeners
        # (fwatchdog.llm.spawn): "front" is the time until it was spawned.
        parts = {"front": inst.marks.get("zygote_spawned", listening)}
        ph = info["phases"]
        # A cold start's request is answered by the first handler that listens
        # (its warm-up runs after): zygote imports and preparation, then the
        # handler's start-up.
        start = "handler_listen" if "handler_listen" in ph else "handler_start"
        for name in ("zygote_import", "zygote_prepare", start):
            if name in ph:
                parts[name] = ph[name]["sum"]
    parts["first_token"] = max(0.0, stream.ttft_s - sum(parts.values()))
    return parts


# ---------------------------------------------------------------- scenarios


async def container_cold(bench: Bench, cache: str) -> None:
    scenario = f"container_cold_{cache}_cache"
    if cache == "cold" and not bench.drop_caches():
        bench.skip(scenario, "drop_caches not possible: not permitted, or --no-drop-caches")
        return
    floor = bench.floors.cold_start(cold=cache == "cold")
    for system in bench.systems:
        ttfts, parts, extra = [], [], {}
        for _ in range(bench.repeats):
            if bench.over_budget():
                break
            if cache == "cold":
                bench.drop_caches()
            inst = bench.instance(system)
            try:
                stream = await request(bench, inst, COLD_PROMPT, COLD_TOKENS, t0=inst.t0)
                extra["gpu_memory"] = observe.memory_of(bench.nvml, inst.tree(), role)
                info = llm_info(await metrics(inst)) if system == "llm" else {}
                parts.append(breakdown(inst, stream, info))
                extra.update(info)
                assert stream.ttft_s is not None
                ttfts.append(stream.ttft_s)
            finally:
                inst.stop()
        mean_parts = {k: statistics.median(p[k] for p in parts) for k in parts[0]} if parts else {}
        bench.record(system, scenario, ttfts, floor=floor, breakdown_s=mean_parts, **extra)


async def first_request(bench: Bench) -> None:
    lengths = bench.lengths
    for system in bench.systems:
        first: dict[str, list[float]] = {key: [] for key in [*map(str, lengths), "sampled"]}
        steady: dict[str, list[float]] = {k: [] for k in first}
        for run in range(bench.repeats):
            if bench.over_budget():
                break
            inst = bench.instance(system)
            try:
                await wait_ready(bench, inst)
                if system == "llm":
                    # Once the pool has settled: the default spare's start-up (fork,
                    # CUDA context, warm-up) would otherwise run beside these requests,
                    # and this scenario measures what the warm-up leaves uncovered.
                    await wait_handlers(inst, ready=DEFAULT_POOL)
                for n in lengths:
                    first[str(n)].append(_ttft(await request(bench, inst, n, seed=run)))
                first["sampled"].append(_ttft(await request(bench, inst, COLD_PROMPT, sampled=True,
                                                           seed=run)))
                for key in first:
                    n, sampled = (COLD_PROMPT, True) if key == "sampled" else (int(key), False)
                    times = [_ttft(await request(bench, inst, n, sampled=sampled, seed=run))
                             for _ in range(STEADY_REPEATS)]
                    steady[key].append(statistics.median(times))
                if run == bench.repeats - 1 and "concurrency" in bench.scenarios:
                    await concurrency(bench, inst)
            finally:
                inst.stop()
        for key, values in first.items():
            steady_s = statistics.median(steady[key]) if steady[key] else None
            prefill = bench.floors.prefill(COLD_PROMPT if key == "sampled" else int(key))
            bench.record(system, f"first_request_{key}", values, floor_s=prefill,
                         steady_s=steady_s, steady_runs_s=steady[key],
                         ratio_to_steady=(statistics.median(values) / steady_s
                                          if values and steady_s else None))


async def concurrency(bench: Bench, inst: Instance | None = None) -> None:
    """Streams at once through the default handler; on ``inst`` or a fresh instance."""
    if inst is None:
        for system in bench.systems:
            fresh = bench.instance(system)
            try:
                await wait_ready(bench, fresh)
                await concurrency(bench, fresh)
            finally:
                fresh.stop()
        return
    await request(bench, inst, COLD_PROMPT)  # warm
    targets = [("", inst.url)]
    if inst.direct_url is not None:  # the same function without the watchdog in front
        targets.append(("direct_", inst.direct_url))
    for n in bench.concurrency_levels:
        for prefix, url in targets:
            ttfts, rates, gaps = [], [], []
            for _ in range(bench.repeats):
                async with client.new_session() as session:
                    t0 = time.monotonic()
                    streams = await asyncio.gather(*(
                        client.chat(session, url,
                                    client.body(bench.words(COLD_PROMPT, i), bench.stream_tokens),
                                    t0) for i in range(n)))
                wall = max(s.total_s for s in streams)
                failed = [s for s in streams if not s.ok]
                if failed:
                    raise RuntimeError(f"concurrency {n}: {failed[0]}\n" + inst.log_tail())
                ttfts += [_ttft(s) for s in streams]
                gaps += [g for s in streams for g in s.gaps_s]
                rates.append(sum(s.completion_tokens for s in streams) / wall)
            step = bench.floors.data.get("decode_step_s")
            bench.record(inst.system, f"concurrency_{prefix}{n}", ttfts, runs=len(rates),
                         streams=n, tokens_per_s=_stats(rates), max_tokens=bench.stream_tokens,
                         decode_step_floor_s=step,
                         tokens_per_s_floor=n / step if step else None,
                         ttft_p50_p95_s=_percentiles(ttfts),
                         inter_token_p50_p95_s=_percentiles(gaps),
                         through="direct" if prefix else "fwatchdog")


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if len(values) < 2:
        return None
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p95": cuts[94]}


async def gpu_wake(bench: Bench) -> None:
    if "llm" not in bench.systems:
        return
    idle = bench.wake_idle_s
    inst = bench.instance("llm", llm_gpu_idle_timeout=f"{int(idle * 1000)}ms", llm_spares="0")
    ttfts, how, released = [], set(), {}
    try:
        await wait_ready(bench, inst)
        await request(bench, inst, COLD_PROMPT)
        before = llm_info(await metrics(inst))["phases"].get("wake", {"sum": 0.0, "count": 0.0})
        for _ in range(bench.repeats):
            if bench.over_budget():
                break
            how.add(await wait_released(bench, inst, idle, inst.counts.get("gpu_released", 0)))
            released = observe.memory_of(bench.nvml, inst.tree(), role)
            ttfts.append(_ttft(await request(bench, inst, COLD_PROMPT, COLD_TOKENS)))
        after = llm_info(await metrics(inst))["phases"].get("wake", {"sum": 0.0, "count": 0.0})
    finally:
        inst.stop()
    wakes = after["count"] - before["count"]
    bench.record("llm", "gpu_wake", ttfts, floor=bench.floors.wake(), released_by=sorted(how),
                 gpu_memory_released=released, gpu_idle_timeout_s=idle,
                 server_wake_s=(after["sum"] - before["sum"]) / wakes if wakes else None)
    bench.record("llm", "gpu_memory_released", [], gpu_memory=released)


async def wait_released(bench: Bench, inst: Instance, idle: float, since: int) -> str:
    """Until the GPU is released: one more ``event=gpu_released`` in the front's log than
    ``since`` (a count taken before the idle period), or, where NVML sees the tree
    below half the weight bytes, that. Returns which of the two decided."""
    deadline = time.monotonic() + idle + 60
    while time.monotonic() < deadline:
        if inst.counts.get("gpu_released", 0) > since:
            return "log"
        if bench.nvml.available:
            used = observe.memory_of(bench.nvml, inst.tree(), role)["total_bytes"]
            if used < bench.weight_bytes // 2:
                return "nvml"
        await asyncio.sleep(0.02)
    raise RuntimeError("the GPU was never released:\n" + inst.log_tail())


async def new_handler(bench: Bench) -> None:
    if "llm" not in bench.systems:
        return
    for scenario, spares in (("new_handler", 0), ("new_handler_spare", 1)):
        inst = bench.instance("llm", llm_max_requests="1", llm_spares=str(spares))
        ttfts = []
        try:
            await wait_ready(bench, inst)
            await request(bench, inst, COLD_PROMPT)  # retires the first handler
            for _ in range(bench.repeats):
                if bench.over_budget():
                    break
                if spares:
                    await wait_handlers(inst, ready=1 + spares)
                # Without a spare, this request waits for the handler forked just now.
                ttfts.append(_ttft(await request(bench, inst, COLD_PROMPT, COLD_TOKENS)))
            info = llm_info(await metrics(inst))
        finally:
            inst.stop()
        floor = bench.floors.new_handler(spare=bool(spares))
        bench.record("llm", scenario, ttfts, floor=floor, llm_max_requests=1,
                     llm_spares=spares, phases=info["phases"])


async def wait_handlers(inst: Instance, ready: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = observe.by_label(await metrics(inst), "fwatchdog_llm_handlers", "state")
        busy = sum(states.get(s, 0)
                   for s in ("starting", "attaching", "restoring", "cold", "warming"))
        if states.get("ready", 0) + states.get("serving", 0) >= ready and busy == 0:
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"never {ready} ready handlers:\n" + inst.log_tail())


async def gpu_memory(bench: Bench) -> None:
    for system in bench.systems:
        for n in bench.memory_handlers if system == "llm" else (1,):
            settings = {"llm_handlers": str(n), "llm_spares": "0"} if system == "llm" else {}
            inst = bench.instance(system, **settings)
            try:
                await wait_ready(bench, inst)
                if system == "llm":
                    await wait_handlers(inst, ready=n)
                stream = await request(bench, inst, COLD_PROMPT)
                memory = observe.memory_of(bench.nvml, inst.tree(), role)
                info = llm_info(await metrics(inst)) if system == "llm" else {}
            finally:
                inst.stop()
            bench.record(system, f"gpu_memory_{n}", [_ttft(stream)], handlers=n,
                         gpu_memory=memory,
                         gpu_memory_metric_bytes=info.get("gpu_memory_metric_bytes"))


async def sporadic_trace(bench: Bench) -> None:
    for system in bench.systems:
        await _trace_one(bench, system)


async def _trace_one(bench: Bench, system: str) -> None:
    params = bench.trace_params
    settings = ({"llm_gpu_idle_timeout": f"{int(params.window(params.gpu_idle_s) * 1000)}ms"}
                if system == "llm" else {})
    instances: list[Instance] = []

    def start() -> Instance:
        inst = bench.instance(system, **settings)
        instances.append(inst)
        return inst

    def pids() -> set[int]:
        return {pid for inst in instances if inst.alive() for pid in inst.tree()}

    with observe.GpuSampler(bench.nvml, pids, bench.weight_bytes // 2) as sampler:
        result = await trace.replay(system, start, params, bench.words,
                                    lambda inst: wait_ready(bench, inst))
    stats = result.pop("ttft_s")
    bench.record(system, "trace", result.pop("ttfts"), ttft_stats=stats,
                 gpu_seconds_measured=sampler.held_s if bench.nvml.available else None,
                 gpu_peak_bytes=sampler.peak_bytes if bench.nvml.available else None,
                 **result)


def _ttft(stream: client.Stream) -> float:
    assert stream.ttft_s is not None, stream
    return stream.ttft_s


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True
