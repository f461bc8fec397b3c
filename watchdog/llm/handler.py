"""A handler process: forked from the zygote, it restores the function and serves it.

Its life, each step reported to the front over the front's Unix socket (wire frames)
and shown in its process title (``fwatchdog: handler <state>``):

1. ``attaching``: connect to the holder, check the buffer is the template's, and map
   it (CUDA IPC or shared memory). On a GPU this creates the process's CUDA context.
2. ``restoring``: import ``function.handler`` inside ``template_cache.restore`` (with
   the manifest the zygote already read and checked, when the file is unchanged, and
   the tokenizers it built ahead), so
   the function's unmodified start-up gets its traced loads served from the buffer
   (an untraced load runs normally and is counted as a miss). Without a usable
   template the start-up runs the ordinary way.
3. ``cold``: listen on its own Unix socket (owner-only) with the function's HTTP
   server (fwatchdog.llm.handler_server) and report ``listening`` with the restore's
   counters and the phase timings. The front sends a cold handler requests only
   while no warm one exists (a cold start's waiting request is answered now, not
   after the warm-up), and tells it to warm up once it is idle.
4. ``warming`` on the front's ``warmup``: run the template's warm-up plan
   (fwatchdog.llm.warmup) on the server's own threads, so the first request that
   finds the handler warm runs at steady-state speed; then report ``ready``.

The spec (the front's ``fork`` message): ``id``, ``front`` (the front's socket),
``socket`` (where to listen), ``holder`` (the holder's socket or null),
``template_reason`` (why no template is used, when ``holder`` is null), ``warmup``
(fwatchdog.config.Warmup value), ``device`` (the holder's device),
``warmup_timeout`` (seconds one warm-up request may take, 0 for no limit: the
front's ``exec_timeout``; past it the handler reports a failed start-up and exits).

Exit codes (a contract with the front, as gunicorn's workers have one): 0 after a
SIGTERM drain; :data:`BOOT_ERROR` when the start-up failed (the front backs off
instead of forking again at once, and reports the traceback it was sent).

Invariants: the handler connects to the front before anything else and keeps that
connection open for its whole life, so its end is the front's sign that it is gone
(whoever its parent is by then); it never forks; the warm-up and requests never run
at once (the front sends no request to a warming handler).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from fwatchdog.llm import wire
from fwatchdog.llm.proctitle import set_title

BOOT_ERROR = 3
LOG = logging.getLogger("fwatchdog.handler")


class Reporter:
    """The handler's end of its connection to the front."""

    def __init__(self, path: str, handler_id: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.id = handler_id
        self.send({"event": "hello", "pid": os.getpid()})

    def send(self, message: dict[str, Any]) -> None:
        wire.send(self.sock, {**message, "id": self.id})

    def state(self, state: str) -> None:
        set_title(f"fwatchdog: handler {state}")
        self.send({"event": "phase", "state": state})


def attach(holder_path: str) -> Any:
    """Map the holder's buffer; returns a TensorSource, and keeps the connection open."""
    from fwatchdog.template_cache import holder as tc_holder

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(holder_path)
    wire.send(sock, {"op": "attach", "pid": os.getpid()})
    got = wire.recv(sock)
    if got is None:
        raise RuntimeError("the holder closed the connection")
    message, fds = got
    if message.get("event") != "handle":
        raise RuntimeError(f"the holder has no buffer: {message.get('reason', message)}")
    info = tc_holder.HandleInfo.from_json(message["info"])
    try:
        source = tc_holder.attach(info, fds)
    finally:
        for fd in fds:
            os.close(fd)
    source._holder_connection = sock  # noqa: SLF001 - closed with the process
    return source


def _reseed() -> None:
    """The zygote's generators were copied into every child: give each its own."""
    random.seed()
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.seed()


class Weights:
    """What this handler maps of the holder's buffer, so it can let go of it while the
    GPU is released and take the new buffer after a wake, keeping its process (its
    CUDA context and loaded kernels) and every model object."""

    def __init__(self, source: Any, shared: list[Any]) -> None:
        self.source = source
        self.shared = shared
        self.extra: list[tuple[weakref.ref[Any], Any]] = []  # other views found on release

    def release(self) -> int:
        """Point every tensor that views the buffer at a one-element placeholder of its
        shape, then drop the mapping and the holder connection, so the holder may free
        the buffer. Served tensors are known from the restore; any other live tensor
        that views the buffer (an attribute that kept a second reference, a cache) is
        found by scanning the heap, since one forgotten view keeps the whole mapping.
        RuntimeError when such a view cannot be re-pointed later: the handler is then
        retired instead of claiming memory it still holds."""
        import gc

        import torch

        lo, hi = self._range()
        placeholders: dict[tuple[Any, Any], Any] = {}

        def park(obj: Any) -> None:
            key = (obj.dtype, obj.device)
            if key not in placeholders:
                placeholders[key] = torch.zeros(1, dtype=obj.dtype, device=obj.device)
            obj.data = placeholders[key].expand(obj.shape)

        moved = 0
        for item in self.shared:
            obj = item.tensor()
            if obj is not None:
                park(obj)
                moved += 1
        by_offset = {offset: name for name, offset in self.source.info.offsets.items()}
        entries = {e.name: e for e in self._entries()}
        self.extra = []
        # The source's own tensor over the whole buffer (a CUDA attach has one) views
        # it too; it goes with the source, so drop it before looking for other views.
        self.source.close()
        with warnings.catch_warnings():
            # isinstance() on every live object touches deprecated module attributes.
            warnings.simplefilter("ignore", FutureWarning)
            found = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for obj in found:
            try:
                ptr = obj.data_ptr()
            except RuntimeError:  # meta or sparse tensors have no data pointer
                continue
            if not lo <= ptr < hi or obj.numel() == 0:
                continue
            name = by_offset.get(ptr - lo)
            entry = entries.get(name) if name is not None else None
            if entry is None or tuple(entry.shape) != tuple(obj.shape):
                raise RuntimeError(f"a tensor of shape {tuple(obj.shape)} views the buffer "
                                   f"at offset {ptr - lo} and is not one of its tensors")
            park(obj)
            self.extra.append((weakref.ref(obj), entry))
        self._drop_source()
        gc_and_empty_cache()
        return moved + len(self.extra)

    def reattach(self, holder_path: str) -> int:
        from fwatchdog.template_cache.restore import repoint

        self.source = attach(holder_path)
        moved = repoint(self.shared, self.source)
        for ref, entry in self.extra:
            obj = ref()
            if obj is not None:
                view = self.source.tensor(entry)
                obj.data = view if view.device == obj.device else view.to(obj.device)
                moved += 1
        return moved

    def _range(self) -> tuple[int, int]:
        """The buffer's address range, from a served tensor and its offset."""
        for item in self.shared:
            obj = item.tensor()
            if obj is not None and obj.numel():
                base = obj.data_ptr() - self.source.info.offsets[item.index_name]
                return base, base + int(self.source.info.size)
        return 0, 0

    def _entries(self) -> list[Any]:
        return [item.entry for item in self.shared]

    def _drop_source(self) -> None:
        source, self.source = self.source, None
        if source is None:
            return
        connection = getattr(source, "_holder_connection", None)
        source.close()
        if connection is not None:
            connection.close()


def gc_and_empty_cache() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def boot(spec: dict[str, Any], template_dir: Path, function_dir: Path,
         report: Reporter, checked: Any = None,
         prebuilt: Any = None) -> tuple[Any, dict[str, Any], Weights | None]:
    """Steps 1-2 of the module docstring; returns (function module, listening report,
    the mapped weights when the template served them). `checked`: the manifest as the
    zygote read and checked it (``template_cache.verify.CheckedManifest``), or None;
    `prebuilt`: the objects it built ahead (``template_cache.prebuild.Prebuilt``)."""
    from fwatchdog.template_cache.restore import restore
    from fwatchdog.tracer.function import import_handler

    phases: dict[str, float] = {}
    stats: dict[str, Any] = {"used": False, "rejected": spec.get("template_reason"),
                             "hits": 0, "misses": 0, "skipped": 0}
    source = None
    weights: Weights | None = None
    if spec.get("holder"):
        report.state("attaching")
        started = time.perf_counter()
        try:
            source = attach(spec["holder"])
        except Exception as exc:  # noqa: BLE001 - a start without the template is still a start
            stats["rejected"] = f"cannot attach to the holder: {exc}"
            LOG.warning("handler_attach_failed reason=%r", str(exc))
        phases["handler_attach"] = time.perf_counter() - started
    report.state("restoring")
    started = time.perf_counter()
    if source is not None:
        with restore(template_dir, function_dir, source=source, checked=checked,
                     prebuilt=prebuilt) as restored:
            module = import_handler(function_dir)
        stats.update(used=restored.used, rejected=restored.rejected, hits=restored.hits,
                     misses=restored.misses, skipped=restored.skipped,
                     prebuilt=restored.prebuilt,
                     miss_reasons=restored.miss_reasons[:10])
        if restored.used:
            weights = Weights(source, list(restored.shared_tensors))
    else:
        module = import_handler(function_dir)
    phases["handler_restore"] = time.perf_counter() - started
    handle = getattr(module, "handle", None)
    if not callable(handle):
        raise RuntimeError(f"{function_dir}/handler.py defines no handle(event, context)")
    listening = {"template": stats, "phases": {k: round(v, 4) for k, v in phases.items()},
                 "releasable": weights is not None}
    return module, listening, weights


class WarmUpTimeout(Exception):
    """A warm-up request did not end within ``warmup_timeout``: the function hangs."""


class WarmUp:
    """Step 4: the warm-up plan, run one request at a time on the server's threads
    when the front asks; it stops between two requests when the front asks it to
    pause (a request waits), and goes on from there when asked again."""

    def __init__(self, spec: dict[str, Any], template_dir: Path, used_template: bool,
                 handle: Any) -> None:
        from fwatchdog.config import Warmup
        from fwatchdog.llm import warmup

        plan = warmup.read_plan(template_dir) if used_template else None
        self.progress = warmup.Progress(plan, Warmup(spec.get("warmup", "auto")),
                                        cuda=str(spec.get("device", "cpu")).startswith("cuda"))
        self.handle = handle
        self.timeout = float(spec.get("warmup_timeout") or 0)
        self.pause = False
        self.task: Any = None

    async def run(self, server: Any) -> dict[str, Any]:
        """Until the plan is done (``ready``) or a pause was asked for (``paused``)."""
        progress = self.progress
        while not progress.done:
            if self.pause:
                progress.pauses += 1
                return {"event": "paused", "done": progress.next,
                        "requests": len(progress.requests)}
            name = progress.requests[progress.next].get("name", "sample")
            try:
                await asyncio.wait_for(server.call(progress.step, self.handle),
                                       self.timeout or None)
            except asyncio.TimeoutError:
                raise WarmUpTimeout(f"the warm-up request {name!r} ran past "
                                    f"{self.timeout:g}s (exec_timeout)") from None
        return {"event": "ready", "warmup": progress.report(),
                "phases": {"handler_warmup": round(progress.seconds, 4)}}


def main(spec: dict[str, Any], template_dir: Path, function_dir: Path,
         checked: Any = None, prebuilt: Any = None) -> int:
    """The forked child's whole life; the zygote passes the return value to _exit."""
    os.setsid()  # its own process group: a kill reaches whatever the function started
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s", force=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _reseed()
    set_title("fwatchdog: handler starting")
    report = Reporter(spec["front"], int(spec["id"]))
    try:
        module, ready, weights = boot(spec, template_dir, function_dir, report, checked,
                                      prebuilt)
        from fwatchdog.llm import handler_server

        config = handler_server.Config.from_env(os.environ)
    except BaseException as exc:  # noqa: BLE001 - reported, then the front backs off
        text = traceback.format_exc()
        sys.stderr.write(text)
        report.send({"event": "failed", "error": f"{type(exc).__name__}: {exc}",
                     "traceback": text[-8000:]})
        return BOOT_ERROR

    listened = []
    warm = WarmUp(spec, template_dir, bool(ready["template"].get("used")), module.handle)

    def listening(server: Any) -> Coroutine[Any, Any, None]:
        listened.append(True)
        set_title("fwatchdog: handler cold")
        report.send({"event": "listening", "socket": spec["socket"], **ready})
        return follow_front(report, weights, server, warm, module)

    try:
        handler_server.run(module.handle, config, unix_path=spec["socket"],
                           on_listening=listening)
    except OSError as exc:
        if listened:
            raise
        report.send({"event": "failed", "error": f"cannot listen on {spec['socket']}: {exc}",
                     "traceback": traceback.format_exc()[-8000:]})
        return BOOT_ERROR
    return 0


def _warmed(task: Any, warm: WarmUp, writer: Any, report: Reporter) -> None:
    """The warm-up ran to its end or to a pause: tell the front which."""
    warm.task = None
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, WarmUpTimeout):
        # Its thread cannot be stopped, and a function that hangs on its own sample is a
        # start-up that failed: say so, then leave; the front backs off.
        LOG.error("handler_warmup_timed_out error=%r", str(exc))
        wire.write_frame(writer, {"event": "failed", "error": str(exc), "traceback": "",
                                  "id": report.id})
        asyncio.ensure_future(_exit_after(writer, BOOT_ERROR))
        return
    if exc is not None:  # the samples' own errors are counted inside; this is the runtime's
        LOG.warning("handler_warmup_failed error=%r", str(exc))
        warm.progress.next = len(warm.progress.requests)
        answer: dict[str, Any] = {"event": "ready", "warmup": {"error": str(exc)}, "phases": {}}
    else:
        answer = task.result()
    set_title("fwatchdog: handler " + ("ready" if answer["event"] == "ready" else "cold"))
    if not writer.is_closing():
        wire.write_frame(writer, {**answer, "id": report.id})


async def _exit_after(writer: Any, code: int) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.drain(), 5.0)
    os._exit(code)


def _function_hook(module: Any, name: str) -> None:
    """The function's optional ``on_gpu_release()`` / ``on_gpu_wake()``: what it holds
    on the device besides the weights (a KV cache) goes and comes with them. A hook
    that fails is logged; the release or wake goes on."""
    hook = getattr(module, name, None)
    if not callable(hook):
        return
    try:
        hook()
    except Exception as exc:  # noqa: BLE001 - the function's error, not the runtime's
        LOG.warning("handler_hook_failed hook=%s error=%r\n%s", name, str(exc),
                    traceback.format_exc())


async def follow_front(report: Reporter, weights: Weights | None, server: Any,
                       warm: WarmUp, module: Any = None) -> None:
    """Answer the front's requests while serving: ``warmup`` (run the warm-up plan,
    or go on with it, then report ``ready``), ``pause`` (stop the warm-up after the
    request it is running and report ``paused``: a request waits), ``release`` (let
    go of the weights, the GPU is being released; the function's ``on_gpu_release``
    runs first) and ``reattach`` {holder} (map the reloaded buffer, then call the
    function's ``on_gpu_wake``)."""
    reader, writer = await asyncio.open_unix_connection(sock=report.sock)
    while True:
        message = await wire.next_message(reader)
        if message is None:
            # The front is gone: nothing will route to us again.
            os.kill(os.getpid(), signal.SIGTERM)
            return
        op = message.get("op")
        started = time.perf_counter()
        if op in ("warmup", "pause"):
            if op == "pause":
                warm.pause = True
            elif warm.task is None:
                warm.pause = False
                set_title("fwatchdog: handler warming")
                warm.task = asyncio.ensure_future(warm.run(server))
                warm.task.add_done_callback(lambda task: _warmed(task, warm, writer, report))
            continue
        try:
            if weights is None:
                raise RuntimeError("this handler's weights did not come from the template")
            if op == "release":
                _function_hook(module, "on_gpu_release")
                moved = weights.release()
                set_title("fwatchdog: handler released")
                answer = {"event": "released", "tensors": moved}
            elif op == "reattach":
                moved = weights.reattach(str(message["holder"]))
                _function_hook(module, "on_gpu_wake")
                set_title("fwatchdog: handler ready")
                answer = {"event": "reattached", "tensors": moved}
            else:
                continue
        except Exception as exc:  # noqa: BLE001 - the front retires us and forks anew
            LOG.warning("handler_%s_failed error=%r", op, str(exc))
            answer = {"event": f"{op}_failed", "error": str(exc)}
        answer["seconds"] = round(time.perf_counter() - started, 4)
        wire.write_frame(writer, {**answer, "id": report.id})
        await writer.drain()
