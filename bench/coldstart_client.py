"""The benchmark's client: streamed chat completions over aiohttp, timed from outside.

Every time is seconds since a reference ``t0`` on ``time.monotonic()`` that the caller
chose: the process start for a cold start, the scheduled arrival on the trace, the
send otherwise. TTFT is the arrival of the first server-sent event whose delta has
non-empty content (the python3-llm function sends an empty role chunk first, before
the model runs, which does not count).

While the front's port refuses connections (the process is still starting), the
request is retried every ``RETRY_S``: a platform's router would hold it the same way.
Once connected, fwatchdog itself holds a request until the function can answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

RETRY_S = 0.002
READ_TIMEOUT_S = 180.0  # a stuck request fails instead of holding the GPU machine


@dataclass(frozen=True)
class Stream:
    """One streamed answer; times in seconds since the caller's t0."""

    status: int
    sent_s: float  # the request went out on a connected socket
    headers_s: float | None
    ttft_s: float | None
    total_s: float
    completion_tokens: int
    error: str | None = None
    gaps_s: tuple[float, ...] = ()  # between successive content chunks after the first

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.ttft_s is not None and self.error is None


def body(content: str, max_tokens: int, sampled: bool = False, seed: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {
        "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
    }
    if sampled:
        request.update(temperature=0.8, top_p=0.95, seed=seed)
    else:
        request["temperature"] = 0
    return request


async def chat(session: aiohttp.ClientSession, url: str, request: dict[str, Any], t0: float,
               connect_timeout: float = 600.0,
               alive: Callable[[], bool] | None = None) -> Stream:
    """POST a streamed chat completion to ``url``; never raises for a failed request.
    Connection refusals are retried until ``connect_timeout``, or until ``alive``
    says the server's process has exited (it will never listen)."""
    deadline = time.monotonic() + connect_timeout
    headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
    data = json.dumps(request).encode()
    while True:
        sent = time.monotonic() - t0
        try:
            async with session.post(url + "/v1/chat/completions", data=data,
                                    headers=headers) as resp:
                return await _read(resp, t0, sent)
        except aiohttp.ClientConnectorError as exc:
            if time.monotonic() > deadline or (alive is not None and not alive()):
                return Stream(0, sent, None, None, time.monotonic() - t0, 0, repr(exc))
            await asyncio.sleep(RETRY_S)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Stream(0, sent, None, None, time.monotonic() - t0, 0, repr(exc))


async def _read(resp: aiohttp.ClientResponse, t0: float, sent: float) -> Stream:
    headers_s = time.monotonic() - t0
    if resp.status != 200:
        text = (await resp.read())[:300].decode(errors="replace")
        return Stream(resp.status, sent, headers_s, None, time.monotonic() - t0, 0, text)
    ttft = None
    tokens = 0
    error = None
    gaps: list[float] = []
    last = None
    async for raw in resp.content:  # to the end: leaving early would cancel the stream
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            continue
        event = json.loads(payload)
        if "error" in event:
            error = str(event["error"].get("message"))
            continue
        choices = event.get("choices") or []
        if choices and choices[0].get("delta", {}).get("content"):
            now = time.monotonic()
            if ttft is None:
                ttft = now - t0
            elif last is not None:
                gaps.append(now - last)
            last = now
        usage = event.get("usage")
        if usage:
            tokens = int(usage.get("completion_tokens", 0))
    return Stream(200, sent, headers_s, ttft, time.monotonic() - t0, tokens, error,
                  tuple(gaps))


async def get_status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def get_text(session: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with session.get(url) as resp:
            return await resp.text() if resp.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


def new_session() -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=READ_TIMEOUT_S)
    return aiohttp.ClientSession(timeout=timeout,
                                 connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None))
