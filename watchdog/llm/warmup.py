"""The warm-up a handler runs before it reports ready.

On a GPU, kernels load lazily, per process and per shape: the first prefill at a new
prompt length, the first decode step at a new context length and the first sampled
``generate`` each pay for loading kernels that later requests get for free. A
handler is ready only once a real request would run at steady-state speed, so it
first replays the template's warm-up plan (``trace.warmup`` in the manifest):

- ``samples``: the sample invocations the tracer ran, through the function's own
  ``handle(event, context)``, answers drained (streams too);
- ``full``: the samples, then, for each sample shaped like an OpenAI completion
  (a JSON body with ``messages`` or ``prompt``), one request per prompt-length bucket
  of the plan (a prompt of about that many tokens, two new tokens, so one prefill
  and one decode step at that context), greedy and then sampled
  (``temperature``/``top_p``).
- ``auto`` is ``full`` on a GPU and ``samples`` on CPU, where nothing loads lazily
  per shape and one pass warms the allocator.

Without a template (or a plan) the default samples of the tracer are used.

The plan runs one request at a time (:class:`Progress`), so a handler can stop
between two of them when a real request waits, serve it, and go on where it
stopped.

Invariants: the warm-up calls only the function's public ``handle``; an answer that
fails is logged and counted, never fatal (a warm-up request the function refuses,
a prompt longer than it accepts, is not a broken start-up).
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fwatchdog.config import Warmup

LOG = logging.getLogger("fwatchdog.warmup")
FILLER = " hello"  # one token in the common BPE vocabularies
MAX_BUCKET = 8192


def read_plan(template_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((Path(template_dir) / "manifest.json").read_text())
        plan = manifest["trace"]["warmup"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan if isinstance(plan, dict) else None


def _samples(plan: dict[str, Any] | None) -> list[dict[str, Any]]:
    from fwatchdog.tracer.function import DEFAULT_SAMPLES

    if plan and isinstance(plan.get("samples"), list) and plan["samples"]:
        return [s for s in plan["samples"] if isinstance(s, dict)]
    return [dict(s) for s in DEFAULT_SAMPLES]


def _body(sample: dict[str, Any]) -> Any:
    body = sample.get("body")
    if isinstance(body, str):
        try:
            return json.loads(body)
        except ValueError:
            return None
    return body


def expand(sample: dict[str, Any], lengths: list[int]) -> Iterator[dict[str, Any]]:
    """Bucketed variants of an OpenAI-shaped sample: greedy per length, then sampled."""
    body = _body(sample)
    if not isinstance(body, dict) or not ("messages" in body or "prompt" in body):
        return
    for length in lengths:
        for sampled in (False, True):
            varied = copy.deepcopy(body)
            text = (FILLER * max(1, length)).strip()
            if "messages" in varied:
                varied["messages"] = [{"role": "user", "content": text}]
            else:
                varied["prompt"] = text
            varied.update(max_tokens=2, stream=False)
            varied.pop("stop", None)
            if sampled:
                varied.update(temperature=0.8, top_p=0.9, seed=0)
            else:
                varied["temperature"] = 0
            yield {**sample, "name": f"{sample.get('name', 'sample')}-{length}"
                                     f"{'-sampled' if sampled else ''}",
                   "body": json.dumps(varied)}
        if length >= MAX_BUCKET:
            break


def fitting(length: int, max_context: Any) -> int:
    """`length` filler tokens, less what a prompt of the model's whole context needs
    besides them (the chat template's tokens and the two generated ones), so that the
    longest bucket is a prompt the function accepts instead of a 400 that warms
    nothing. A 32nd of the context, at least 8 tokens: 256 of 8192."""
    if not isinstance(max_context, int) or max_context <= 0:
        return length
    return max(1, min(length, max_context - max(8, max_context // 32)))


def plan_requests(plan: dict[str, Any] | None, mode: Warmup, cuda: bool) -> list[dict[str, Any]]:
    if mode is Warmup.OFF:
        return []
    samples = _samples(plan)
    full = mode is Warmup.FULL or (mode is Warmup.AUTO and cuda)
    if not full:
        return samples
    lengths = sorted({fitting(int(n), (plan or {}).get("max_context"))
                      for n in (plan or {}).get("prompt_lengths", []) if int(n) > 0})
    requests = list(samples)
    for sample in samples:
        variants = list(expand(sample, lengths))
        if variants:
            requests.extend(variants)
            break  # one OpenAI-shaped sample covers the shapes
    return requests


def run_one(handle: Callable[..., Any], raw: dict[str, Any]) -> bool:
    """One warm-up request through ``handle``, its answer drained; whether it was
    answered with a status below 400."""
    from fwatchdog.llm.handler_server import Context
    from fwatchdog.tracer.function import consume, parse_sample

    name = str(raw.get("name", "sample"))
    try:
        sample = parse_sample(name, raw)
        result = handle(sample.event(), Context("warmup"))
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        status = result.get("statusCode", 200) if isinstance(result, dict) else 200
        consume(result)
    except Exception as exc:  # noqa: BLE001 - see the module invariants
        LOG.info("warmup_failed sample=%s error=%r", name, repr(exc))
        return False
    if isinstance(status, int) and status >= 400:
        LOG.info("warmup_refused sample=%s status=%d", name, status)
        return False
    return True


class Progress:
    """The plan's requests and how far they have run; :meth:`step` runs the next."""

    def __init__(self, plan: dict[str, Any] | None, mode: Warmup, *, cuda: bool) -> None:
        self.mode = mode
        self.requests = plan_requests(plan, mode, cuda)
        self.next = 0
        self.ok = self.failed = 0
        self.seconds = 0.0
        self.pauses = 0

    @property
    def done(self) -> bool:
        return self.next >= len(self.requests)

    def step(self, handle: Callable[..., Any]) -> None:
        started = time.perf_counter()
        answered = run_one(handle, self.requests[self.next])
        self.next += 1
        self.ok += answered
        self.failed += not answered
        self.seconds += time.perf_counter() - started
        if self.done:
            LOG.info("warmup_done requests=%d ok=%d failed=%d seconds=%.3f mode=%s pauses=%d",
                     len(self.requests), self.ok, self.failed, self.seconds, self.mode.value,
                     self.pauses)

    def report(self) -> dict[str, Any]:
        return {"requests": len(self.requests), "ok": self.ok, "failed": self.failed,
                "seconds": round(self.seconds, 4), "pauses": self.pauses}

