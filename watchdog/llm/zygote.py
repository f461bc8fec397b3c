"""The zygote: a pre-warmed parent that imports everything once and forks handlers.

    python -m fwatchdog.llm.zygote --control-fd FD --template DIR --function DIR

It imports the module set the trace recorded (``trace.imports`` of the template's
manifest: torch, transformers, the model's own modules loaded lazily, ...), plus the
runtime's handler side (restore, the handler server), but not ``function.handler``,
whose import is the function's start-up and runs in each handler, inside the
template restore. It reads and checks the template's manifest once
(``template_cache.verify.read_checked``), so a handler only compares the file's
digest with it, and makes the start-up's tokenizer calls the trace recorded
(``trace.prebuild``, ``template_cache.prebuild``), so each handler's start-up gets
its tokenizer already built. Then it freezes the heap (``gc.freeze()``, so forked children
share its pages instead of copying them on the first collection) and waits for
``fork`` requests from the front.

The cyclic garbage collector is paused from the zygote's first line until that
freeze. Importing torch and transformers allocates hundreds of thousands of
long-lived objects, and each full collection on the way walks all of them: on a
2-core machine the same imports took 4.1 - 5.2 s with it paused against 6.6 - 7.3 s
without, and a last ``gc.collect()`` before the freeze cost 0.36 s to free 26
objects, so there is none: the little import-time garbage is frozen with the rest.

Control channel (inherited socket, wire frames) with the front:
- zygote -> front: ``imported`` {seconds (the imports), prepare_seconds (the
  manifest's check, the prebuilt objects and the heap's freeze), modules, failed,
  threads, pid},
  ``forked`` {id, pid}, ``exited`` {pid, code} (negative: killed by that signal).
- front -> zygote: ``fork`` {id, ...the handler's spec, see fwatchdog.llm.handler}.

Invariants:
- The zygote never initialises CUDA: not even ``torch.cuda.device_count()``; GPU
  facts come from NVML (``PYTORCH_NVML_BASED_CUDA_CHECK=1``). A process that has
  initialised CUDA cannot fork usable children. ``imported`` reports
  ``cuda_initialized`` from torch's own state, and the zygote refuses to fork if it
  were ever true.
- It runs no event loop and no torch ops, so no thread pool exists to be broken by
  ``fork``; ``imported`` reports the thread count.
- A forked child never returns into the zygote's loop: it runs the handler and
  leaves with ``os._exit``.
- The zygote exits when the front's end of the control channel closes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fwatchdog.llm import wire
from fwatchdog.llm.proctitle import set_title

LOG = logging.getLogger("fwatchdog.zygote")

# Imported even without a template: what every handler needs before the function's
# own start-up runs. Heavy ones first, in the order the handler uses them.
BASE_MODULES = (
    "torch",
    "transformers",
    "safetensors.torch",
    "fwatchdog.template_cache.restore",
    "fwatchdog.template_cache.holder",
    "fwatchdog.tracer.function",
    "fwatchdog.llm.handler",
    "fwatchdog.llm.warmup",
    "fwatchdog.llm.handler_server",
    "aiohttp.web",
    "uvloop",
)
# Never pre-imported: the function itself (its import is the start-up the template
# serves) and the front.
EXCLUDED_PREFIXES = ("function", "fwatchdog.modes", "fwatchdog.server")


def traced_modules(template_dir: Path) -> list[str]:
    """The trace's top-level imports, in import order; [] without a readable manifest."""
    try:
        manifest = json.loads((template_dir / "manifest.json").read_text())
        imports = manifest["trace"]["imports"]
        return [str(i["module"]) for i in imports if isinstance(i, dict) and "module" in i]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def preload(modules: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    loaded, failed = [], []
    for name in modules:
        if name.startswith(EXCLUDED_PREFIXES) or name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a module the handler may not need
            failed.append({"module": name, "error": repr(exc)})
            continue
        loaded.append(name)
    return loaded, failed


def cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return bool(torch.cuda.is_initialized())


class Zygote:
    def __init__(self, control: socket.socket, template_dir: Path, function_dir: Path) -> None:
        self.control = control
        self.template_dir = template_dir
        self.function_dir = function_dir
        self.children: set[int] = set()
        self.checked: Any = None  # the manifest, read and checked once for every child
        self.prebuilt: Any = None  # template_cache.prebuild.Prebuilt

    def prepare(self) -> None:
        set_title("fwatchdog: zygote importing")
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
        # The function's helpers (a template's model_cache beside index.py) resolve
        # from the function folder's parent, as python3-http's index.py sees them.
        parent = str(self.function_dir.parent)
        if os.path.isdir(parent):
            os.chdir(parent)
            if parent not in sys.path:
                sys.path.insert(0, parent)
        started = time.perf_counter()
        wanted = list(BASE_MODULES) + traced_modules(self.template_dir)
        loaded, failed = preload(wanted)
        imported = time.perf_counter()
        seconds = imported - started
        for item in failed:
            LOG.info("zygote_import_failed module=%s error=%s", item["module"], item["error"])
        try:
            from fwatchdog.template_cache.verify import read_checked

            self.checked = read_checked(self.template_dir)
        except Exception as exc:  # noqa: BLE001 - each handler reads it and says why
            LOG.info("zygote_manifest_unread reason=%r", str(exc))
        if self.checked is not None:
            from fwatchdog.template_cache import prebuild

            trace = self.checked.manifest.raw.get("trace")
            self.prebuilt = prebuild.build(
                trace.get("prebuild", []) if isinstance(trace, dict) else [],
                self.function_dir)
            LOG.info("zygote_prebuilt objects=%d seconds=%.3f", len(self.prebuilt.objects),
                     self.prebuilt.seconds)
        gc.freeze()
        gc.enable()  # paused since main(); handlers inherit it running
        prepare = time.perf_counter() - imported
        set_title("fwatchdog: zygote")
        LOG.info("zygote_imported modules=%d failed=%d seconds=%.3f", len(loaded), len(failed),
                 seconds)
        wire.send(self.control, {"event": "imported", "seconds": round(seconds, 4),
                                 "prepare_seconds": round(prepare, 4),
                                 "modules": len(loaded), "failed": failed,
                                 "threads": threading.active_count(),
                                 "cuda_initialized": cuda_initialized(), "pid": os.getpid()})

    def run(self) -> int:
        self.prepare()
        # SIGCHLD wakes the loop through a pipe; the handler itself only notes it.
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ, "control")
        selector.register(wake_r, selectors.EVENT_READ, "child")
        try:
            return self.loop(selector, wake_r, wake_w)
        finally:
            self.drain(deadline=time.monotonic() + 2.0)

    def drain(self, deadline: float) -> None:
        """Collect handlers that are exiting, so none is left a zombie behind us."""
        while self.children and time.monotonic() < deadline:
            self.reap()
            if self.children:
                time.sleep(0.02)  # polling a child's exit, bounded by the deadline

    def loop(self, selector: selectors.BaseSelector, wake_r: int, wake_w: int) -> int:
        while True:
            for key, _ in selector.select():
                if key.data == "child":
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                    continue
                try:
                    got = wire.recv(self.control)
                except (OSError, wire.WireError) as exc:
                    LOG.info("zygote_control_error error=%r", str(exc))
                    got = None
                if got is None:
                    LOG.info("zygote_exit reason='front closed the control channel'")
                    return 0
                message, fds = got
                for fd in fds:
                    os.close(fd)
                if message.get("op") == "fork":
                    self.fork(message, [wake_r, wake_w])

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            # The front may be gone: we are then on our way out too.
            with contextlib.suppress(OSError):
                wire.send(self.control, {"event": "exited", "pid": pid, "code": code})

    def fork(self, spec: dict[str, Any], private_fds: list[int]) -> None:
        if cuda_initialized():  # never: see the module invariants
            wire.send(self.control, {"event": "fork_failed", "id": spec.get("id"),
                                     "reason": "the zygote has initialised CUDA"})
            return
        pid = os.fork()
        if pid == 0:  # the handler
            code = 70  # EX_SOFTWARE, if anything below escapes
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in private_fds:
                    os.close(fd)
                control_fd = self.control.detach()
                os.close(control_fd)
                from fwatchdog.llm import handler

                code = handler.main(spec, self.template_dir, self.function_dir, self.checked,
                                    self.prebuilt)
            except BaseException:  # noqa: BLE001 - a child must never return here
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        wire.send(self.control, {"event": "forked", "id": spec.get("id"), "pid": pid})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwatchdog.llm.zygote")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--function", type=Path, required=True)
    args = parser.parse_args(argv)
    # Until the heap is frozen (the module doc): every full collection during the
    # imports would walk every object imported so far, for next to no garbage.
    gc.disable()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    control = socket.socket(fileno=args.control_fd)
    return Zygote(control, args.template, args.function).run()


if __name__ == "__main__":
    sys.exit(main())
