"""The front's side of mode=llm: it starts and watches the holder and the zygote,
keeps the pool of handler processes, and leases handlers to requests.

Verbs, in the manner of a pre-fork arbiter: *spawn* (holder, zygote), *fork* (ask
the zygote for a handler), *reap* (a handler's connection to the front closed),
*retire* (no new requests; SIGTERM once idle), *kill* (SIGKILL to its process
group), *release* / *wake* (the GPU, on idle), *manage* (:meth:`Runtime.manage`,
run after every change: keep ``llm_handlers + llm_spares`` live handlers, forking
one at a time).

Pool policy:
- A handler is *live* from its fork until it retires or dies. The first
  ``llm_handlers`` ready, live handlers (oldest first) serve; the rest are warm
  spares, promoted the moment a serving handler retires or dies.
- A handler that has finished its start-up but not its warm-up (*cold*) answers
  requests while no warm handler exists: a cold start's request does not wait for
  the warm-up. It warms up once nobody waits for it, and a request that comes
  during the warm-up pauses it (between two warm-up requests) and goes first.
- Handlers start one at a time: two handlers doing their first CUDA work together
  slow each other several-fold, so the next fork waits until the previous handler
  is ready or gone.
- For the same reason, a handler forked only to be a spare (the serving ones are
  all there) waits until no request is in flight, for at most
  :data:`SPARE_DEFER_MAX` seconds: with ``llm_max_requests=1`` the spare's
  replacement would otherwise create its CUDA context beside the request that just
  took the spare. A handler needed to serve is forked at once. Likewise a warm-up
  yields to requests running on a warm handler: it pauses after its current step
  when one starts and goes on once none runs, for at most :data:`SPARE_DEFER_MAX`
  seconds in all; a cold start's warm-up (nothing warm yet) never yields.
- ``llm_max_requests`` (plus a random 0..``llm_max_requests_jitter``) requests per
  handler, then it retires; 1 is a fresh process per request.
- A boot error (the function's start-up failed) is reported with its traceback and
  the next fork waits :data:`BACKOFF_START` seconds, doubling to :data:`BACKOFF_MAX`;
  meanwhile readiness is 503 with the reason and requests get 503 at once.
- A warm-up request that runs past ``exec_timeout`` is a start-up that failed: the
  handler reports it and exits, and the next fork backs off as for a boot error.
- A request that reaches ``exec_timeout`` retires its handler, which is killed as
  soon as nothing else runs on it (a hung handler is killed; a slow one is not
  trusted with the next request either).
- The zygote or the holder dying is recovered: spawned again (with the same
  backoff when it keeps dying); readiness is 503 until the runtime is whole. A
  holder's death retires every handler, since they map its buffer.
- ``llm_gpu_idle_timeout``: after that long with no request the GPU is *released*:
  each warm handler whose weights came from the holder lets go of them (its served
  tensors point at a one-element placeholder, its mapping closes) but keeps its
  process, its CUDA context and its loaded kernels; other handlers retire. Once no
  handler maps the buffer, the holder frees it. Readiness stays 200: the function
  can answer. The next request wakes it: the holder reloads the buffer, the kept
  handlers map it again and re-point their tensors (no fork, no warm-up), and the
  request waits for the first of them. Without a holder, release retires every
  handler and a wake forks one.

Invariants: the front never imports torch; every pid signalled is one this runtime
forked or spawned, and handlers are signalled through their own process groups;
a handler's connection to the front is the one truth about whether it lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from fwatchdog.config import Config
from fwatchdog.llm import spawn, wire
from fwatchdog.llm.metrics import LlmMetrics, rejection_class
from fwatchdog.logpump import pump
from fwatchdog.logs import kv
from fwatchdog.upstream import Pool

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
STOP_GRACE = 10.0
# The longest a missing spare waits for the requests in flight (see manage()).
SPARE_DEFER_MAX = 5.0


def runtime_dir(base: str) -> str:
    """A new owner-only folder for the runtime's sockets (:func:`spawn.runtime_dir`);
    StartError when no folder fits."""
    from fwatchdog.modes.base import StartError

    try:
        return spawn.runtime_dir(base)
    except spawn.RuntimeDirError as exc:
        raise StartError(str(exc)) from None


class NotReady(Exception):
    """No handler can be had now; the message says why."""


class HState(enum.Enum):
    STARTING = "starting"
    ATTACHING = "attaching"
    RESTORING = "restoring"
    COLD = "cold"  # listening, not warmed up yet: serves only while nothing warm exists
    WARMING = "warming"
    READY = "ready"
    RELEASING = "releasing"  # told to let go of the weights (the GPU is being released)
    RELEASED = "released"  # alive, CUDA context and kernels kept, no weights mapped


class GpuState(enum.Enum):
    HELD = "held"
    RELEASING = "releasing"
    RELEASED = "released"
    WAKING = "waking"


@dataclass(eq=False)
class Handler:
    id: int
    socket_path: str
    forked_at: float
    limit: int  # requests before retiring; 0: no limit
    pid: int | None = None
    state: HState = HState.STARTING
    ready_at: float | None = None
    pausing: bool = False  # asked to pause its warm-up for a waiting request
    warmup_deferred_since: float | None = None  # its warm-up first yielded to requests
    pool: Pool | None = None
    inflight: int = 0
    assigned: int = 0
    retiring: bool = False
    kill_when_idle: bool = False
    connected: bool = False
    releasable: bool = False  # its weights came from the holder: it can let go of them
    gone: bool = False
    writer: asyncio.StreamWriter | None = None

    @property
    def label(self) -> str:
        if self.retiring:
            return "retiring"
        return self.state.value


@dataclass
class Child:
    """A spawned runtime process (holder or zygote) and its control channel."""

    name: str
    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    ready: bool = False  # zygote: imported; holder: loaded

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            wire.write_frame(self.writer, message)


class Runtime:
    def __init__(self, config: Config, *, log: logging.Logger, metrics: LlmMetrics | None,
                 stdout: TextIO, stderr: TextIO, children: set[int],
                 clock: Callable[[], float] = time.monotonic,
                 early: spawn.Early | None = None) -> None:
        self.cfg = config
        self.log = log
        self.metrics = metrics
        self.stdout = stdout
        self.stderr = stderr
        self.children = children  # pids the front waits on itself (the reaper's owned set)
        self.clock = clock
        self.dir = ""
        self.handlers: list[Handler] = []
        self.by_id: dict[int, Handler] = {}
        self.next_id = 1
        self.zygote: Child | None = None
        self.holder: Child | None = None
        self.holder_settled = False  # loaded, or told us there is no usable template
        self.holder_pid: int | None = None
        self.template_reason: str | None = None  # why handlers start without the template
        self.gpu = GpuState.HELD
        self.device = config.llm_device
        self.failure: str | None = None  # the last boot error, while backing off
        self.backoff = 0.0
        self.backoff_until = 0.0
        self.respawn_backoff: dict[str, float] = {"zygote": 0.0, "holder": 0.0}
        self.last_activity = clock()
        self.wake_started: float | None = None
        self.spare_deferred_since: float | None = None  # a spare waits for requests to end
        self.stopping = False
        self.inflight = 0
        self.waiting = 0  # requests waiting in lease() for a handler
        self._changed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._idle_timer: asyncio.TimerHandle | None = None
        self._backoff_check: asyncio.TimerHandle | None = None
        self._manage_scheduled = False
        # Spawned by the entry point before the front existed (fwatchdog.llm.spawn):
        # adopted by start(), or stopped by stop() if start() never ran.
        self._early = early
        if early is not None:
            for spawned in (early.zygote, early.holder):
                if spawned is not None:
                    children.add(spawned.proc.pid)

    # -- paths ---------------------------------------------------------------

    @property
    def front_socket(self) -> str:
        return os.path.join(self.dir, "front.sock")

    @property
    def holder_socket(self) -> str:
        return os.path.join(self.dir, "holder.sock")

    def process_names(self) -> dict[int, str]:
        names = {h.pid: f"handler-{h.pid}" for h in self.handlers if h.pid}
        if self.zygote is not None and self.zygote.proc.pid:
            names[self.zygote.proc.pid] = "zygote"
        if self.holder_pid:
            names[self.holder_pid] = "holder"
        return names

    # -- start and stop ----------------------------------------------------------

    async def start(self) -> None:
        early, self._early = self._early, None
        self.dir = early.dir if early is not None else runtime_dir(
            self.cfg.tmpdir or tempfile.gettempdir())
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._on_handler, self.front_socket)
        finally:
            os.umask(old)
        if early is not None:
            self.zygote = self._adopt(early.zygote)
            if early.holder is not None:
                self.holder_settled = False
                self.holder = self._adopt(early.holder)
                self.holder_pid = self.holder.proc.pid
        elif spawn.has_template(self.cfg):
            await self._spawn_holder()
        if self.holder is None:
            self._no_template(f"no template at {self.cfg.template_dir} (no manifest.json)")
        if self.zygote is None:
            await self._spawn_zygote()
        self._arm_idle_timer()

    def _no_template(self, reason: str) -> None:
        self.template_reason = reason
        self.holder_settled = True
        self.log.info(kv("template_unavailable", reason=reason,
                         effect="handlers run the ordinary start-up"))

    async def stop(self) -> None:
        self.stopping = True
        early, self._early = self._early, None
        if early is not None:  # start() never ran: nothing but these exists
            for spawned in (early.zygote, early.holder):
                if spawned is not None:
                    await spawn.stop(spawned.proc, spawned.writer, STOP_GRACE)
                    self.children.discard(spawned.proc.pid)
            shutil.rmtree(early.dir, ignore_errors=True)
            return
        for timer in self._timers:
            timer.cancel()
        for pending in (self._idle_timer, self._backoff_check):
            if pending is not None:
                pending.cancel()
        for h in self.handlers:
            self._signal(h, signal.SIGTERM)
        deadline = self.clock() + min(STOP_GRACE, self.cfg.write_timeout)
        while any(not h.gone for h in self.handlers) and self.clock() < deadline:
            await self._wait_change(deadline - self.clock())
        for h in self.handlers:
            if not h.gone:
                self.log.info(kv("handler_killed", pid=h.pid, reason="no exit after SIGTERM"))
                self._signal(h, signal.SIGKILL)
        for child in (self.zygote, self.holder):
            if child is not None:
                await self._stop_child(child)
        if self._server is not None:
            self._server.close()
        for h in self.handlers:
            if h.pool is not None:
                h.pool.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    async def _stop_child(self, child: Child) -> None:
        await spawn.stop(child.proc, child.writer, STOP_GRACE)
        for task in child.tasks:
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), 1.0)
                task.cancel()

    # -- spawning the holder and the zygote ----------------------------------------

    async def _spawn(self, name: str, module: str, args: list[str]) -> Child:
        child = self._adopt(await spawn.spawn(name, module, args))
        self.log.info(kv(f"{name}_spawned", pid=child.proc.pid))
        return child

    def _adopt(self, spawned: spawn.Spawned) -> Child:
        """Watch a spawned process: its output, its control channel, its exit."""
        proc = spawned.proc
        child = Child(spawned.name, proc, spawned.reader, spawned.writer)
        self.children.add(proc.pid)
        loop = asyncio.get_running_loop()
        assert proc.stdout is not None and proc.stderr is not None
        child.tasks = [
            loop.create_task(pump(proc.stdout, "stdout", self.stdout, prefix=self.cfg.prefix_logs,
                                  limit=self.cfg.log_buffer_size)),
            loop.create_task(pump(proc.stderr, "stderr", self.stderr, prefix=self.cfg.prefix_logs,
                                  limit=self.cfg.log_buffer_size)),
            loop.create_task(self._read_child(child)),
        ]
        return child

    async def _spawn_holder(self) -> None:
        self.holder_settled = False
        self.holder = await self._spawn("holder", "fwatchdog.llm.holder",
                                        spawn.holder_args(self.cfg, self.dir))
        self.holder_pid = self.holder.proc.pid

    async def _spawn_zygote(self) -> None:
        self.zygote = await self._spawn("zygote", "fwatchdog.llm.zygote",
                                        spawn.zygote_args(self.cfg))

    async def _read_child(self, child: Child) -> None:
        started = self.clock()
        try:
            while True:
                try:
                    message = await wire.read_frame(child.reader)
                except (wire.WireError, OSError) as exc:
                    self.log.info(kv(f"{child.name}_wire_error", error=str(exc)))
                    message = None
                if message is None:
                    break
                if child.name == "zygote":
                    self._on_zygote(child, message, started)
                else:
                    self._on_holder(child, message, started)
        finally:
            code = await child.proc.wait()
            self.children.discard(child.proc.pid)
            self._child_exited(child, code)

    def _child_exited(self, child: Child, code: int) -> None:
        if self.stopping:
            return
        if child.name == "holder" and child is self.holder:
            self.holder = None
            self.holder_pid = None
            if self.holder_settled and self.template_reason is not None and code == 0:
                return  # it said there is no usable template, then left: as designed
            self.log.info(kv("holder_died", code=code,
                             action="retiring handlers, spawning a new holder"))
            for h in list(self.handlers):
                self._retire(h, kill=True)
            self._respawn("holder", self._spawn_holder)
        elif child.name == "zygote" and child is self.zygote:
            self.zygote = None
            self.log.info(kv("zygote_died", code=code, action="spawning a new zygote"))
            self._respawn("zygote", self._spawn_zygote)
        self.notify()

    def _respawn(self, name: str, spawn: Callable[[], Any]) -> None:
        delay = self.respawn_backoff[name]
        self.respawn_backoff[name] = min(BACKOFF_MAX, max(BACKOFF_START, delay * 2))

        def go() -> None:
            if not self.stopping:
                asyncio.ensure_future(spawn())

        if delay:
            self.log.info(kv(f"{name}_backoff", seconds=delay))
        self._later(delay, go)

    def _on_zygote(self, child: Child, message: dict[str, Any], started: float) -> None:
        event = message.get("event")
        if event == "imported":
            child.ready = True
            self.respawn_backoff["zygote"] = 0.0
            seconds = float(message.get("seconds", self.clock() - started))
            self._phase("zygote_import", seconds)
            if "prepare_seconds" in message:
                self._phase("zygote_prepare", float(message["prepare_seconds"]))
            if message.get("cuda_initialized"):
                self.log.info(kv("zygote_cuda_initialized", action="handlers cannot be forked"))
            self.log.info(kv("zygote_ready", pid=child.proc.pid, seconds=round(seconds, 3),
                             modules=message.get("modules"), failed=len(message.get("failed", [])),
                             threads=message.get("threads"),
                             cuda_initialized=bool(message.get("cuda_initialized"))))
        elif event == "forked":
            h = self.by_id.get(int(message.get("id", 0)))
            if h is not None:
                h.pid = int(message["pid"])
        elif event == "exited":
            pid = int(message.get("pid", 0))
            self.log.info(kv("handler_exited", pid=pid, code=message.get("code")))
            for h in list(self.handlers):
                if h.pid == pid and not h.connected:
                    self._gone(h)  # it died before it could say hello
        elif event == "fork_failed":
            h = self.by_id.get(int(message.get("id", 0)))
            if h is not None:
                self._boot_failed(h, str(message.get("reason")), "")
        self.notify()

    def _on_holder(self, child: Child, message: dict[str, Any], started: float) -> None:
        event = message.get("event")
        if event == "loaded":
            child.ready = True
            self.holder_settled = True
            self.template_reason = None
            self.respawn_backoff["holder"] = 0.0
            self.device = str(message.get("device", self.device))
            self._phase("holder_load", float(message.get("seconds", 0.0)))
            self.log.info(kv("holder_ready", pid=child.proc.pid, device=self.device,
                             bytes=message.get("bytes"), seconds=message.get("seconds")))
        elif event == "unavailable":
            child.ready = False
            reason = str(message.get("reason"))
            self._no_template(reason)
        elif event == "released":
            self.gpu = GpuState.RELEASED
            self.log.info(kv("gpu_released"))
        elif event == "reloaded":
            self.gpu = GpuState.HELD
            self.log.info(kv("gpu_reloaded", seconds=message.get("seconds")))
        self.notify()

    # -- handler processes ------------------------------------------------------

    def _fork(self) -> None:
        assert self.zygote is not None
        jitter = self.cfg.llm_max_requests_jitter
        limit = self.cfg.llm_max_requests
        if limit and jitter:
            limit += random.randint(0, jitter)
        h = Handler(id=self.next_id, socket_path=os.path.join(self.dir, f"h{self.next_id}.sock"),
                    forked_at=self.clock(), limit=limit)
        self.next_id += 1
        self.handlers.append(h)
        self.by_id[h.id] = h
        holder = self.holder_socket if (self.holder is not None and self.holder.ready) else None
        self.zygote.send({"op": "fork", "id": h.id, "front": self.front_socket,
                          "socket": h.socket_path, "holder": holder,
                          "template_reason": None if holder else self.template_reason,
                          "warmup": self.cfg.llm_warmup.value, "device": self.device,
                          "warmup_timeout": self.cfg.exec_timeout})
        self.log.info(kv("handler_forking", id=h.id, template="holder" if holder else "none"))

    async def _on_handler(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        h: Handler | None = None
        try:
            while True:
                message = await wire.next_message(reader)
                if message is None:
                    break
                if h is None:
                    h = self.by_id.get(int(message.get("id", 0)))
                    if h is None or message.get("event") != "hello":
                        break  # not a handler we forked
                    h.connected = True
                    h.writer = writer
                    h.pid = int(message.get("pid", h.pid or 0)) or h.pid
                    continue
                self._on_handler_event(h, message)
        finally:
            writer.close()
            if h is not None:
                self._gone(h)

    def _on_handler_event(self, h: Handler, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "phase":
            with contextlib.suppress(ValueError):
                h.state = HState(str(message.get("state")))
        elif event == "listening":
            self._listening(h, message)
        elif event == "ready":
            h.pausing = False
            self._ready(h, message)
        elif event == "paused":
            # Between two warm-up requests, for a request that waits: it is cold
            # again, the waiting request takes it, and the warm-up goes on after.
            h.pausing = False
            if h.state is HState.WARMING:
                h.state = HState.COLD
            self.log.info(kv("handler_warmup_paused", id=h.id, pid=h.pid,
                             done=message.get("done"), requests=message.get("requests")))
        elif event == "failed":
            self._boot_failed(h, str(message.get("error")), str(message.get("traceback", "")))
        elif event == "released":
            h.state = HState.RELEASED
            self.log.info(kv("handler_released", id=h.id, pid=h.pid,
                             tensors=message.get("tensors"), seconds=message.get("seconds")))
        elif event == "reattached":
            h.state = HState.READY
            self.log.info(kv("handler_reattached", id=h.id, pid=h.pid,
                             tensors=message.get("tensors"), seconds=message.get("seconds")))
            if self.wake_started is not None:
                self._phase("wake", self.clock() - self.wake_started)
                self.wake_started = None
        elif event in ("release_failed", "reattach_failed"):
            self.log.info(kv("handler_" + str(event), id=h.id, pid=h.pid,
                             error=message.get("error"), action="retired"))
            self._retire(h, kill=True)
        self.notify()

    def _tell(self, h: Handler, message: dict[str, Any]) -> None:
        if h.writer is not None and not h.writer.is_closing():
            wire.write_frame(h.writer, message)

    def _listening(self, h: Handler, message: dict[str, Any]) -> None:
        """The start-up is done: it can answer, but has not warmed up yet."""
        h.state = HState.COLD
        h.releasable = bool(message.get("releasable"))
        h.pool = Pool("localhost", 80, unix_path=h.socket_path, idle_timeout=30.0)
        self.failure = None
        self.backoff = 0.0
        seconds = self.clock() - h.forked_at
        self._phase("handler_listen", seconds)
        for phase, value in dict(message.get("phases", {})).items():
            self._phase(str(phase), float(value))
        template = dict(message.get("template", {}))
        if self.metrics is not None:
            for outcome in ("hits", "misses", "skipped"):
                count = int(template.get(outcome, 0) or 0)
                if count:
                    self.metrics.template_loads.labels(
                        {"hits": "hit", "misses": "miss", "skipped": "skipped"}[outcome]).inc(count)
            if not template.get("used"):
                reason = str(template.get("rejected") or self.template_reason or "unknown")
                self.metrics.template_rejected.labels(rejection_class(reason)).inc()
        self.log.info(kv("handler_listening", id=h.id, pid=h.pid, seconds=round(seconds, 3),
                         template="used" if template.get("used") else "not used",
                         hits=template.get("hits"), misses=template.get("misses"),
                         prebuilt=template.get("prebuilt"),
                         rejected=template.get("rejected"), phases=message.get("phases")))

    def _ready(self, h: Handler, message: dict[str, Any]) -> None:
        h.state = HState.READY
        h.ready_at = self.clock()
        seconds = h.ready_at - h.forked_at
        self._phase("handler_start", seconds)
        for phase, value in dict(message.get("phases", {})).items():
            self._phase(str(phase), float(value))
        if self.wake_started is not None:
            self._phase("wake", h.ready_at - self.wake_started)
            self.wake_started = None
        self.log.info(kv("handler_ready", id=h.id, pid=h.pid, seconds=round(seconds, 3),
                         warmup=message.get("warmup")))

    def _boot_failed(self, h: Handler, error: str, trace: str) -> None:
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_START, self.backoff * 2))
        self.backoff_until = self.clock() + self.backoff
        self.failure = f"the function failed to start: {error}"
        self.log.info(kv("handler_boot_failed", id=h.id, pid=h.pid, error=error,
                         retry_in=f"{self.backoff:g}s"))
        if trace:
            for line in trace.rstrip().splitlines():
                self.stderr.write(f"handler {h.pid}: {line}\n")
            self.stderr.flush()
        h.retiring = True
        self._later(self.backoff, self.notify)

    def _gone(self, h: Handler) -> None:
        if h.gone:
            return
        h.gone = True
        if h.pool is not None:
            h.pool.close()
        with contextlib.suppress(ValueError):
            self.handlers.remove(h)
        self.by_id.pop(h.id, None)
        with contextlib.suppress(OSError):
            os.unlink(h.socket_path)
        if not h.retiring and not self.stopping:
            self.log.info(kv("handler_crashed", id=h.id, pid=h.pid, inflight=h.inflight,
                             state=h.state.value))
            if h.ready_at is None:
                # Died in its start-up without saying why: back off as for a boot error,
                # so a start that always dies is never a tight fork loop.
                self._boot_failed(h, f"the handler died while {h.state.value}", "")
        self.notify()

    def lost(self, h: Handler, why: str) -> None:
        """A handler that cannot be reached any more: make sure it is gone."""
        if h.gone:
            return
        self.log.info(kv("handler_unreachable", id=h.id, pid=h.pid, error=why))
        self._signal(h, signal.SIGKILL)
        self._gone(h)

    def _signal(self, h: Handler, sig: signal.Signals) -> None:
        if h.pid is None or h.gone:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(h.pid, sig)

    def _retire(self, h: Handler, *, kill: bool = False) -> None:
        h.retiring = True
        h.kill_when_idle = h.kill_when_idle or kill
        if h.inflight == 0:
            self._signal(h, signal.SIGKILL if h.kill_when_idle else signal.SIGTERM)
        self.notify()

    # -- the pool ----------------------------------------------------------------

    def live(self) -> list[Handler]:
        return [h for h in self.handlers if not h.retiring and not h.gone]

    def serving(self) -> list[Handler]:
        ready = sorted((h for h in self.live() if h.state is HState.READY),
                       key=lambda h: h.ready_at or 0.0)
        return ready[: self.cfg.llm_handlers]

    def whole(self) -> bool:
        """The zygote is up and the holder settled: the runtime can make handlers."""
        return (self.zygote is not None and self.zygote.ready and self.holder_settled
                and (self.template_reason is not None or self.holder is not None))

    def ready(self) -> bool:
        if not self.whole():
            return False
        if self.gpu is not GpuState.HELD:
            return True  # released: a request wakes it
        return bool(self.serving())

    def unready_reason(self) -> str:
        if self.failure and not self.serving():
            return self.failure
        if self.zygote is None or not self.zygote.ready:
            return "the zygote is importing the function's modules"
        if not self.holder_settled or (self.template_reason is None and self.holder is None):
            return "the holder is loading the template"
        return "no warm handler yet"

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        if self.metrics is not None:
            counts: dict[str, int] = {}
            serving = set(map(id, self.serving()))
            for h in self.handlers:
                label = "serving" if id(h) in serving and h.inflight else h.label
                counts[label] = counts.get(label, 0) + 1
            self.metrics.set_handlers(counts)
            self.metrics.gpu_released.set(1 if self.gpu is GpuState.RELEASED else 0)
        if not self._manage_scheduled and not self.stopping:
            self._manage_scheduled = True
            asyncio.get_running_loop().call_soon(self.manage)

    async def _wait_change(self, timeout: float | None) -> None:
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def manage(self) -> None:
        """Keep the pool's size right; called soon after every change."""
        self._manage_scheduled = False
        if self.stopping or not self.whole():
            return
        if self.gpu is GpuState.RELEASING:
            letting_go = [h for h in self.handlers if h.state is not HState.RELEASED]
            if not letting_go:
                if self.holder is not None and self.holder.ready:
                    self.holder.send({"op": "release"})
                else:
                    self.gpu = GpuState.RELEASED
                    self.log.info(kv("gpu_released", holder="none"))
            return
        if self.gpu is not GpuState.HELD:
            return
        for h in self.live():
            if h.state is HState.RELEASED:  # woken: map the reloaded buffer again
                h.state = HState.ATTACHING
                self._tell(h, {"op": "reattach", "holder": self.holder_socket})
            elif h.state is HState.COLD and not h.inflight and not self.waiting:
                # Nobody waits for it any more: warm it up before it counts as warm,
                # unless requests run on a warm handler beside it (they go first).
                if self._warm_up_waits(h):
                    continue
                h.state = HState.WARMING
                self._tell(h, {"op": "warmup"})
        if any(h.state is not HState.READY for h in self.live()):
            return  # one start at a time
        if len(self.live()) >= self.cfg.llm_handlers + self.cfg.llm_spares:
            self.spare_deferred_since = None
            return
        if self.inflight and len(self.serving()) >= self.cfg.llm_handlers:
            # Only a spare is missing, and requests are running: its CUDA context and
            # warm-up would slow theirs, so it waits for them, up to SPARE_DEFER_MAX.
            now = self.clock()
            if self.spare_deferred_since is None:
                self.spare_deferred_since = now
                self.log.info(kv("spare_deferred", inflight=self.inflight,
                                 max_wait=f"{SPARE_DEFER_MAX:g}s"))
                self._later(SPARE_DEFER_MAX, self.notify)
            if now - self.spare_deferred_since < SPARE_DEFER_MAX:
                return
        self.spare_deferred_since = None
        wait = self.backoff_until - self.clock()
        if wait > 0:
            # Look again when the backoff ends. The timer _boot_failed set may fire a
            # little early (an event loop's clock is coarser than time.monotonic), and
            # with nothing else happening no other change would call manage again.
            if self._backoff_check is not None:
                self._backoff_check.cancel()
            self._backoff_check = asyncio.get_running_loop().call_later(wait, self.notify)
            return
        self._fork()

    def _warm_up_waits(self, h: Handler) -> bool:
        """Whether a cold handler's warm-up still waits for the requests running on
        warm handlers: their GPU work goes first."""
        return bool(self.inflight and self.serving()) and self._warm_up_may_yield(h)

    def _pause_warm_ups(self, serving: Handler) -> None:
        """A request goes to a warm handler: warm-ups beside it pause after their
        current step (see _warm_up_waits), unless they have yielded long enough."""
        for h in self.live():
            if h is serving or h.state is not HState.WARMING or h.pausing:
                continue
            if not self._warm_up_may_yield(h):
                continue
            h.pausing = True
            self.log.info(kv("handler_warmup_pausing", id=h.id, pid=h.pid,
                             reason="a request runs on a warm handler"))
            self._tell(h, {"op": "pause"})

    def _warm_up_may_yield(self, h: Handler) -> bool:
        """Whether ``h``'s warm-up may still yield to requests: for SPARE_DEFER_MAX
        seconds in all from the first time it did (a timer looks again then)."""
        now = self.clock()
        if h.warmup_deferred_since is None:
            h.warmup_deferred_since = now
            self.log.info(kv("handler_warmup_deferred", id=h.id, pid=h.pid,
                             inflight=self.inflight, max_wait=f"{SPARE_DEFER_MAX:g}s"))
            self._later(SPARE_DEFER_MAX, self.notify)
        return now - h.warmup_deferred_since < SPARE_DEFER_MAX

    def cold(self) -> list[Handler]:
        """Handlers that can answer but are not warm yet: a request that finds no warm
        handler goes to one of them rather than wait for its warm-up."""
        return [h for h in self.live() if h.state is HState.COLD]

    async def lease(self, deadline: float | None) -> Handler:
        """A serving handler for one request, waiting for one until ``deadline``."""
        self.waiting += 1
        try:
            return await self._lease(deadline)
        finally:
            self.waiting -= 1
            if not self.waiting:
                self.notify()  # a cold handler nobody waits for can warm up now

    async def _lease(self, deadline: float | None) -> Handler:
        while True:
            serving = self.serving() or self.cold()
            if serving:
                h = min(serving, key=lambda x: x.inflight)
                h.inflight += 1
                h.assigned += 1
                self.inflight += 1
                self.last_activity = self.clock()
                if h.limit and h.assigned >= h.limit:
                    h.retiring = True  # its last request; SIGTERM once it is answered
                    self.notify()
                if h.state is HState.READY:
                    self._pause_warm_ups(h)
                return h
            if self.stopping:
                raise NotReady("the watchdog is shutting down")
            if self.failure and self.clock() < self.backoff_until \
                    and not any(not h.retiring for h in self.handlers):
                raise NotReady(self.failure)
            if self.gpu is GpuState.RELEASED and self.whole():
                self._wake()
            for h in self.live():
                if h.state is HState.WARMING and not h.pausing:
                    # Nothing warm, and a request waits: it goes before the warm-up.
                    h.pausing = True
                    self.log.info(kv("handler_warmup_pausing", id=h.id, pid=h.pid,
                                     reason="a request waits and nothing is warm"))
                    self._tell(h, {"op": "pause"})
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                raise NotReady("no warm handler became ready in time")
            await self._wait_change(remaining)

    def done(self, h: Handler, *, timed_out: bool = False) -> None:
        h.inflight -= 1
        self.inflight -= 1
        self.last_activity = self.clock()
        if timed_out and not h.gone:
            self.log.info(kv("handler_timed_out", id=h.id, pid=h.pid,
                             action="retired; killed once nothing else runs on it"))
            h.retiring = True
            h.kill_when_idle = True
        if h.retiring and h.inflight == 0:
            self._signal(h, signal.SIGKILL if h.kill_when_idle else signal.SIGTERM)
        self._arm_idle_timer()
        self.notify()

    # -- GPU release and wake -------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        timeout = self.cfg.llm_gpu_idle_timeout
        if timeout <= 0 or self.stopping:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._check_idle)

    def _check_idle(self) -> None:
        timeout = self.cfg.llm_gpu_idle_timeout
        if self.stopping or self.gpu is not GpuState.HELD or self.inflight:
            return
        idle = self.clock() - self.last_activity
        if idle < timeout:
            self._idle_timer = asyncio.get_running_loop().call_later(timeout - idle,
                                                                     self._check_idle)
            return
        if not self.whole() or any(h.state is not HState.READY for h in self.live()) \
                or not self.serving():
            # Still starting: nothing warm to release yet; look again later.
            self._idle_timer = asyncio.get_running_loop().call_later(timeout, self._check_idle)
            return
        holder = self.holder is not None and self.holder.ready
        self.log.info(kv("gpu_releasing", idle=f"{idle:.1f}s", handlers=len(self.handlers),
                         keep_handlers=holder))
        self.gpu = GpuState.RELEASING
        for h in list(self.handlers):
            if holder and h.releasable and h.state is HState.READY and not h.retiring:
                # It keeps its process, CUDA context and kernels; only the weights go.
                h.state = HState.RELEASING
                self._tell(h, {"op": "release"})
            else:
                self._retire(h)
        self.notify()

    def _wake(self) -> None:
        self.log.info(kv("gpu_waking"))
        self.wake_started = self.clock()
        if self.holder is not None and self.holder.ready:
            self.gpu = GpuState.WAKING
            self.holder.send({"op": "reload"})
        else:
            self.gpu = GpuState.HELD
        self.last_activity = self.clock()
        self._arm_idle_timer()
        self.notify()

    # -- helpers -------------------------------------------------------------------

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        # uvloop's call_later(0) gives a plain Handle (run at the next turn, no when()):
        # only timers still pending are kept, for stop() to cancel.
        now = loop.time()
        self._timers = [t for t in self._timers
                        if callable(getattr(t, "when", None)) and t.when() > now]
        self._timers.append(loop.call_later(max(0.0, delay), callback))

    def _phase(self, phase: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.phase.labels(phase).observe(seconds)
