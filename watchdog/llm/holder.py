"""The template holder process: one copy of a template's static weights per device.

    python -m fwatchdog.llm.holder --control-fd FD --socket PATH \
        --template DIR --function DIR --device auto|cpu|cuda[:N] [--verify full|quick]

Started by the front at time zero. Before it imports torch it asks the kernel to read
the template's weight files ahead (``posix_fadvise(WILLNEED)``), so disk reads overlap
the zygote's imports and its own. Then it checks the template and copies its tensors
into one shared buffer (``fwatchdog.template_cache.holder.hold``; ``--verify``: every
byte checked on the way, or ``quick``: files whose size and mtime are as traced are
trusted, for read-only images), and serves handles
to that buffer on a Unix socket (owner-only) to handler processes.

Control channel (inherited socket, wire frames) with the front:
- holder -> front: ``loaded`` {seconds, bytes, device}, ``unavailable`` {reason}
  (no usable template: the holder then exits 0 and handlers start the ordinary
  way), ``released``, ``reloaded`` {seconds}, ``attached``/``detached`` {pid}.
- front -> holder: ``release`` (free the buffer once no handler maps it),
  ``reload`` (fill it again).

Handler socket: a handler sends ``attach`` {pid}; the holder checks the peer's uid
(``SO_PEERCRED``) is its own, then answers ``handle`` {info} with the buffer's file
descriptors (SCM_RIGHTS), or ``unavailable`` {reason}. The handler keeps that
connection open for as long as it maps the buffer.

Invariants: the buffer is never freed while a connected handler may map it (a
release waits for the last one to disconnect); the holder exits when the front's
end of the control channel closes; nothing here forks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fwatchdog.llm import wire
from fwatchdog.llm.proctitle import set_title

LOG = logging.getLogger("fwatchdog.holder")


def prefetch(template_dir: Path, function_dir: Path) -> int:
    """Start reading the template's files into the page cache; bytes asked for."""
    from fwatchdog.template_cache.verify import read_manifest

    total = 0
    try:
        manifest = read_manifest(template_dir)
    except Exception:  # noqa: BLE001 - the real check comes later and says why
        return 0
    for entry in manifest.files:
        try:
            path = entry.resolve(template_dir, function_dir)
            fd = os.open(path, os.O_RDONLY)
        except (OSError, Exception):  # noqa: BLE001
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            total += os.fstat(fd).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HolderProcess:
    def __init__(self, control: socket.socket, socket_path: str, template_dir: Path,
                 function_dir: Path, device: str, verify: str = "full") -> None:
        self.control = control
        self.verify = verify
        self.socket_path = socket_path
        self.template_dir = template_dir
        self.function_dir = function_dir
        self.device = device
        self.holder: Any = None
        self.peers: dict[socket.socket, int] = {}  # connection -> handler pid
        self.release_pending = False
        self.selector = selectors.DefaultSelector()

    def load(self) -> tuple[float, int]:
        from fwatchdog.template_cache.holder import hold

        started = time.perf_counter()
        self.holder = hold(self.template_dir, self.function_dir, device=self.device,
                           verify=self.verify)
        return time.perf_counter() - started, int(self.holder.info.size)

    def run(self) -> int:
        set_title("fwatchdog: holder loading")
        asked = prefetch(self.template_dir, self.function_dir)
        LOG.info("holder_prefetch bytes=%d", asked)
        try:
            self.device = resolve_device(self.device)
            seconds, size = self.load()
        except Exception as exc:  # noqa: BLE001 - any doubt: handlers start the ordinary way
            LOG.warning("holder_unavailable reason=%r", str(exc))
            wire.send(self.control, {"event": "unavailable", "reason": str(exc)})
            return 0
        finally:
            gc.enable()  # paused since main(), for the imports the load makes
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # A holder that died leaves its socket behind in the runtime's private folder.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        old = os.umask(0o177)
        try:
            listener.bind(self.socket_path)
        finally:
            os.umask(old)
        listener.listen(64)
        set_title("fwatchdog: holder")
        LOG.info("holder_loaded device=%s bytes=%d seconds=%.3f", self.device, size, seconds)
        wire.send(self.control, {"event": "loaded", "seconds": round(seconds, 4),
                                 "bytes": size, "device": self.device, "pid": os.getpid()})
        self.selector.register(self.control, selectors.EVENT_READ, "control")
        self.selector.register(listener, selectors.EVENT_READ, "listener")
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.data == "control":
                        if not self.on_control():
                            return 0
                    elif key.data == "listener":
                        self.on_accept(listener)
                    else:
                        self.on_peer(key.fileobj)  # type: ignore[arg-type]
        finally:
            listener.close()
            self.holder.close()

    def on_control(self) -> bool:
        try:
            got = wire.recv(self.control)
        except (OSError, wire.WireError) as exc:
            LOG.info("holder_control_error error=%r", str(exc))
            return False
        if got is None:
            LOG.info("holder_exit reason='front closed the control channel'")
            return False
        message, _ = got
        op = message.get("op")
        if op == "release":
            self.release_pending = True
            self.maybe_release()
        elif op == "reload":
            self.release_pending = False
            seconds = 0.0
            if not self.holder.loaded:
                started = time.perf_counter()
                try:
                    self.holder.reload()
                except Exception as exc:  # noqa: BLE001 - told to the front, which recovers
                    LOG.warning("holder_reload_failed reason=%r", str(exc))
                    wire.send(self.control, {"event": "unavailable", "reason": str(exc)})
                    return False
                seconds = time.perf_counter() - started
                set_title("fwatchdog: holder")
            wire.send(self.control, {"event": "reloaded", "seconds": round(seconds, 4),
                                     "bytes": int(self.holder.info.size)})
        return True

    def maybe_release(self) -> None:
        if not self.release_pending or self.peers or not self.holder.loaded:
            return
        self.holder.release()
        self.release_pending = False
        set_title("fwatchdog: holder released")
        LOG.info("holder_released")
        wire.send(self.control, {"event": "released"})

    def on_accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            uid = wire.peer_uid(conn)
        except OSError:
            uid = -1
        if uid != os.getuid():
            LOG.warning("holder_refused peer_uid=%d", uid)
            conn.close()
            return
        self.selector.register(conn, selectors.EVENT_READ, "peer")
        self.peers[conn] = wire.peer_pid(conn)

    def on_peer(self, conn: socket.socket) -> None:
        try:
            got = wire.recv(conn)
        except (OSError, wire.WireError):
            got = None
        if got is None:
            pid = self.peers.pop(conn, 0)
            self.selector.unregister(conn)
            conn.close()
            wire.send(self.control, {"event": "detached", "pid": pid})
            self.maybe_release()
            return
        message, fds = got
        for fd in fds:
            os.close(fd)
        if message.get("op") != "attach":
            return
        if not self.holder.loaded or self.release_pending:
            wire.send(conn, {"event": "unavailable", "reason": "the buffer is released"})
            return
        wire.send(conn, {"event": "handle", "info": self.holder.info.to_json()},
                  self.holder.fds())
        wire.send(self.control, {"event": "attached", "pid": self.peers.get(conn, 0)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwatchdog.llm.holder")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--function", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--verify", choices=["full", "quick"], default="full")
    args = parser.parse_args(argv)
    # The load imports torch, whose full collections on the way would walk every
    # object imported so far for next to no garbage; on a small machine that is CPU
    # taken from the zygote's imports beside it. Paused until the load is done.
    gc.disable()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    control = socket.socket(fileno=args.control_fd)
    return HolderProcess(control, args.socket, args.template, args.function,
                         args.device, args.verify).run()


if __name__ == "__main__":
    sys.exit(main())
