"""Spawning mode=llm's long-lived processes (the zygote and the holder), early.

The zygote's imports are the longest part of a container's cold start, so
``fwatchdog`` spawns it (and the holder) before it imports the front: the front's
own imports (aiohttp, the metrics, the modes) and its listeners then overlap the
zygote's instead of coming before them. :func:`early` does that from the entry
point; the runtime (:mod:`fwatchdog.llm.runtime`) adopts what it spawned, and
spawns through :func:`spawn` itself when nothing was spawned early and to recover
a process that died.

Invariants: nothing here imports the front or torch (only the standard library and
the wire format); :func:`early` never raises, and returns None (the runtime then
spawns as it always could) unless both processes it meant to start are running;
every process spawned here is in its own session, with its control channel as its
one inherited descriptor besides the standard three.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fwatchdog.config import Config
from fwatchdog.logs import kv

# A Unix socket path holds at most 107 bytes on Linux; the runtime's longest name in
# its folder is "h<id>.sock" with a id of up to 9 digits.
MAX_SOCKET_PATH = 107
LONGEST_NAME = len("/h123456789.sock")


class RuntimeDirError(Exception):
    """No folder can hold the runtime's sockets."""


def runtime_dir(base: str) -> str:
    """A new owner-only folder for the runtime's sockets: under ``base`` (TMPDIR) when
    the socket paths fit there, else under /tmp; RuntimeDirError when neither fits."""
    for candidate in (base, "/tmp"):
        # mkdtemp adds "fwatchdog-llm-" and 8 characters.
        if len(candidate.rstrip("/")) + len("/fwatchdog-llm-12345678") + LONGEST_NAME \
                <= MAX_SOCKET_PATH and os.path.isdir(candidate):
            path = tempfile.mkdtemp(prefix="fwatchdog-llm-", dir=candidate)
            os.chmod(path, 0o700)  # the sockets in here hand out the model and the function
            return path
    raise RuntimeDirError(f"TMPDIR={base!r} is too long for Unix socket paths "
                          f"({MAX_SOCKET_PATH} bytes) and /tmp is not there")


@dataclass
class Spawned:
    """A spawned process and the front's end of its control channel."""

    name: str
    proc: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class Early:
    """What the entry point spawned before the front existed."""

    dir: str
    zygote: Spawned
    holder: Spawned | None  # None: there is no template to hold


def holder_args(cfg: Config, run_dir: str) -> list[str]:
    return ["--socket", os.path.join(run_dir, "holder.sock"), "--template", cfg.template_dir,
            "--function", cfg.function_dir, "--device", cfg.llm_device,
            "--verify", cfg.llm_template_verify]


def zygote_args(cfg: Config) -> list[str]:
    return ["--template", cfg.template_dir, "--function", cfg.function_dir]


def has_template(cfg: Config) -> bool:
    return (Path(cfg.template_dir) / "manifest.json").is_file()


async def spawn(name: str, module: str, args: list[str]) -> Spawned:
    """``python -m module --control-fd N args...`` with a socketpair as its control
    channel, its output on pipes, in a new session."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", module, "--control-fd", str(theirs.fileno()), *args,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),), env=env,
                start_new_session=True)
        finally:
            theirs.close()
    except BaseException:
        ours.close()
        raise
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    return Spawned(name, proc, reader, writer)


async def stop(proc: asyncio.subprocess.Process, writer: asyncio.StreamWriter,
               grace: float) -> int:
    """Close its control channel (it exits on that), then SIGTERM, then SIGKILL."""
    with contextlib.suppress(Exception):
        writer.close()
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    return await proc.wait()


async def early(cfg: Config, log: logging.Logger) -> Early | None:
    """Spawn the zygote, then the holder when there is a template (the module doc)."""
    started: list[Spawned] = []
    run_dir = ""
    try:
        run_dir = runtime_dir(cfg.tmpdir or tempfile.gettempdir())
        started.append(await spawn("zygote", "fwatchdog.llm.zygote", zygote_args(cfg)))
        if has_template(cfg):
            started.append(await spawn("holder", "fwatchdog.llm.holder",
                                       holder_args(cfg, run_dir)))
    except Exception as exc:  # noqa: BLE001 - the runtime spawns them itself and says why
        if not isinstance(exc, RuntimeDirError):  # that one the runtime reports as it starts
            log.info(kv("llm_early_spawn_failed", error=str(exc),
                        effect="the runtime spawns its processes after the front has started"))
        for spawned in started:
            await stop(spawned.proc, spawned.writer, grace=1.0)
        if run_dir:
            with contextlib.suppress(OSError):
                os.rmdir(run_dir)
        return None
    for spawned in started:
        log.info(kv(f"{spawned.name}_spawned", pid=spawned.proc.pid, early=True))
    return Early(run_dir, started[0], started[1] if len(started) > 1 else None)


__all__ = ["Early", "RuntimeDirError", "Spawned", "early", "runtime_dir", "spawn", "stop"]
