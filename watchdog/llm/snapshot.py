"""A CRIU checkpoint of the zygote, and its restore in place of a fresh one.

The zygote never touches CUDA, so once its imports are done it is an ordinary
process that CRIU can dump and restore: the restore maps its memory back (a few
hundred MB, a fraction of a second) instead of running the imports again (5-6 s
for torch and transformers). This module is the CRIU side of that; the runtime
does not use it yet (the zygote's restore, its fix-ups and the setting that turns
it on come next).

- :func:`find_criu` finds a ``criu`` of at least :data:`MIN_CRIU` and says why not
  otherwise (CRIU 3.17 cannot even read this kernel's vDSO).
- :func:`fingerprint` is what a checkpoint must match to be restored: the Python
  binary and version, every installed distribution (its ``RECORD``), fwatchdog's own
  sources, the CPU's feature flags (torch picks its CPU kernels at import), the
  kernel release, and the template's manifest.
- :func:`dump` checkpoints a running process, leaving it running. Its channels to
  the outside (the control socket, the output pipes) are named by the descriptor
  number they have inside it; the image records which kernel object each was, so a
  restore can hand it new ones (``--inherit-fd``). The image is written beside the
  old one and renamed into place: a dump that fails leaves the old image whole.
- :func:`restore` checks the image's fingerprint, gives the restored process the
  caller's new descriptors for its channels, and returns its pid. The restored
  process keeps its pid (CRIU restores it; a pid already taken is a failed
  restore) and is reparented to the nearest subreaper when ``criu`` exits: the
  caller must be one (``reaper.set_subreaper``) to wait on it, through
  :class:`Adopted`.

Invariants: nothing here raises anything but :class:`SnapshotError` for a
checkpoint that cannot be used or written (the caller then starts a zygote the
ordinary way, and says why); a restore never proceeds past a fingerprint
mismatch; every ``criu`` run has a deadline and its log is kept in the image
folder (``dump.log``, ``restore.log``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MIN_CRIU = (4, 0)
META = "fwatchdog-snapshot.json"
META_VERSION = 1
DUMP_TIMEOUT_S = 60.0
RESTORE_TIMEOUT_S = 30.0


class SnapshotError(Exception):
    """A checkpoint that cannot be used or written; the message says why."""


@dataclass(frozen=True)
class Criu:
    path: str
    version: tuple[int, ...]


def find_criu(explicit: str | None = None) -> Criu | str:
    """The ``criu`` to use (``explicit``, else the one on PATH), or why there is none."""
    path = explicit or shutil.which("criu") or ""
    if not path or not os.access(path, os.X_OK):
        return f"no criu executable ({explicit or 'none on PATH'})"
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path} --version failed: {exc}"
    found = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", done.stdout)
    if done.returncode != 0 or found is None:
        return f"{path} --version said nothing usable: {(done.stdout + done.stderr)[:200]!r}"
    version = tuple(int(p) for p in found.groups() if p is not None)
    if version < MIN_CRIU:
        return (f"criu {'.'.join(map(str, version))} at {path} is older than "
                f"{'.'.join(map(str, MIN_CRIU))}")
    return Criu(path, version)


def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine()


def fingerprint(template_dir: str | os.PathLike[str] | None,
                paths: list[str] | None = None) -> str:
    """What a checkpoint must match (the module doc), as a hex digest."""
    digest = hashlib.sha256()

    def add(*parts: object) -> None:
        digest.update(repr(parts).encode())
        digest.update(b"\0")

    executable = os.path.realpath(sys.executable)
    st = os.stat(executable)
    add("python", executable, st.st_size, st.st_mtime_ns, sys.version)
    add("kernel", platform.release())
    add("cpu", _cpu_flags())
    for entry in paths if paths is not None else sys.path:
        base = Path(entry or ".")
        if not base.is_dir():
            continue
        for dist in sorted(base.glob("*.dist-info")) + sorted(base.glob("*.egg-info")):
            record = dist / "RECORD"
            target = record if record.is_file() else dist
            with contextlib.suppress(OSError):
                rs = target.stat()
                add("dist", str(base), dist.name, rs.st_size, rs.st_mtime_ns)
    package = Path(__file__).resolve().parents[1]
    for source in sorted(package.rglob("*.py")):
        with contextlib.suppress(OSError):
            ss = source.stat()
            add("fwatchdog", str(source.relative_to(package)), ss.st_size, ss.st_mtime_ns)
    if template_dir is not None:
        manifest = Path(template_dir) / "manifest.json"
        try:
            add("template", hashlib.sha256(manifest.read_bytes()).hexdigest())
        except OSError:
            add("template", None)
    return digest.hexdigest()


def channel_of(pid: int, fd: int) -> str:
    """The kernel object behind descriptor ``fd`` of ``pid``: ``socket:[N]``, ``pipe:[N]``."""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError as exc:
        raise SnapshotError(f"cannot read descriptor {fd} of pid {pid}: {exc}") from None


async def _criu(criu: Criu, args: list[str], timeout: float,
                pass_fds: tuple[int, ...] = ()) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            criu.path, *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            pass_fds=pass_fds)
    except OSError as exc:
        raise SnapshotError(f"cannot run {criu.path}: {exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise SnapshotError(f"criu {args[0]} took longer than {timeout:.0f} s") from None
    return proc.returncode or 0, out.decode(errors="replace")


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in text if line.startswith("Error")]
    return " | ".join((errors or text)[-lines:])


async def dump(criu: Criu, pid: int, image_dir: str | os.PathLike[str],
               channels: dict[int, str], print_fingerprint: str,
               timeout: float = DUMP_TIMEOUT_S) -> float:
    """Checkpoint ``pid`` (left running) into ``image_dir``; ``channels`` maps each of
    its descriptors that leads outside (``fd -> "socket:[N]"``/``"pipe:[N]"``) to what
    it is now. Returns the seconds the dump took."""
    target = Path(image_dir)
    fresh = target.with_name(target.name + f".new-{os.getpid()}")
    shutil.rmtree(fresh, ignore_errors=True)
    try:
        fresh.mkdir(parents=True)
    except OSError as exc:
        raise SnapshotError(f"cannot write {fresh}: {exc}") from None
    args = ["dump", "-t", str(pid), "-D", str(fresh), "--leave-running", "-o", "dump.log",
            "-v2"]
    for resource in channels.values():
        kind, _, inode = resource.partition(":")
        if kind == "socket":
            args += ["--external", f"unix{inode}"]
    started = time.monotonic()
    code, out = await _criu(criu, args, timeout)
    seconds = time.monotonic() - started
    if code != 0:
        why = _log_tail(fresh / "dump.log") or out.strip()[-500:]
        shutil.rmtree(fresh, ignore_errors=True)
        raise SnapshotError(f"criu dump failed ({code}): {why}")
    meta = {"version": META_VERSION, "fingerprint": print_fingerprint, "pid": pid,
            "criu": list(criu.version), "channels": {str(k): v for k, v in channels.items()},
            "created": time.time(), "dump_seconds": seconds}
    (fresh / META).write_text(json.dumps(meta))
    old = target.with_name(target.name + f".old-{os.getpid()}")
    try:
        if target.exists():
            target.rename(old)
        fresh.rename(target)
    except OSError as exc:
        shutil.rmtree(fresh, ignore_errors=True)
        raise SnapshotError(f"cannot put the image in place at {target}: {exc}") from None
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return seconds


def read_meta(image_dir: str | os.PathLike[str]) -> dict[str, object]:
    path = Path(image_dir) / META
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"no checkpoint at {image_dir}") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"unreadable checkpoint description {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise SnapshotError(f"checkpoint description {path} is not version {META_VERSION}")
    return meta


async def restore(criu: Criu, image_dir: str | os.PathLike[str], print_fingerprint: str,
                  fds: dict[int, int], timeout: float = RESTORE_TIMEOUT_S) -> int:
    """Restore the checkpoint; ``fds`` maps each of the process's channel descriptors
    (as given to :func:`dump`) to a descriptor of ours it gets instead. Returns the
    restored pid (a child of the nearest subreaper once ``criu`` has exited)."""
    folder = Path(image_dir)
    meta = read_meta(folder)
    if meta.get("fingerprint") != print_fingerprint:
        raise SnapshotError("the checkpoint was made with other software, another CPU or "
                            "kernel, or another template (fingerprint mismatch)")
    channels = meta.get("channels")
    if not isinstance(channels, dict) or set(channels) != {str(k) for k in fds}:
        recorded = sorted(map(str, channels)) if isinstance(channels, dict) else []
        raise SnapshotError(f"the checkpoint's channels {recorded} are not the ones given "
                            f"{sorted(fds)}")
    pidfile = folder / f"restored-{os.getpid()}.pid"
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()
    args = ["restore", "-D", str(folder), "-d", "--pidfile", str(pidfile),
            "-o", "restore.log", "-v2"]
    for fd, ours in fds.items():
        args += ["--inherit-fd", f"fd[{ours}]:{channels[str(fd)]}"]
    code, out = await _criu(criu, args, timeout, pass_fds=tuple(fds.values()))
    if code != 0:
        why = _log_tail(folder / "restore.log") or out.strip()[-500:]
        raise SnapshotError(f"criu restore failed ({code}): {why}")
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"criu restore wrote no pid: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
    return pid


class Adopted:
    """A process that is our child by adoption (a restored zygote), with the part of
    ``asyncio.subprocess.Process``'s interface the runtime uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._fd = os.pidfd_open(pid)
        self._done: asyncio.Future[int] | None = None

    async def wait(self) -> int:
        if self.returncode is not None:
            return self.returncode
        loop = asyncio.get_running_loop()
        if self._done is None:
            self._done = loop.create_future()
            loop.add_reader(self._fd, self._exited, loop)
        return await asyncio.shield(self._done)

    def _exited(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0  # someone else reaped it; nothing more is known
        loop.remove_reader(self._fd)
        os.close(self._fd)
        self.returncode = os.waitstatus_to_exitcode(status)
        if self._done is not None and not self._done.done():
            self._done.set_result(self.returncode)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            signal.pidfd_send_signal(self._fd, sig)  # type: ignore[attr-defined]

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


__all__ = ["Adopted", "Criu", "MIN_CRIU", "SnapshotError", "channel_of", "dump",
           "find_criu", "fingerprint", "read_meta", "restore"]
