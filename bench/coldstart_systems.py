"""The two systems under test, each one ``fwatchdog`` process started by the benchmark.

- ``baseline``: ``mode=http`` in front of the python3-llm template's ``index.py``
  (the function loads the model at import with ``from_pretrained``, then serves);
- ``llm``: ``mode=llm`` over the same function folder and its traced template.

Both get the same function, model (``MODEL_PATH``), environment and requests.
An :class:`Instance` is one process tree: it is started in its own session so that
stopping it (SIGTERM, then SIGKILL of that process group after a grace period)
reaches every process it forked and leaves none holding GPU memory. Its log is
copied to a file, and the first arrival of each ``event=<name>`` (and of the
function's ``function_loaded``) is timestamped on the way, on the instance's clock
(seconds since the process was spawned), and each event's arrivals are counted.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SYSTEMS = ("baseline", "llm")
EVENT = re.compile(rb"event=([A-Za-z0-9_]+)|\b(function_loaded)\b")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: every socket is bound before any is closed,
    so the kernel cannot hand out one port twice (one at a time it may)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]


def fwatchdog_command() -> list[str]:
    """``$FWATCHDOG``, else the ``fwatchdog`` script beside this Python, else -c."""
    explicit = os.environ.get("FWATCHDOG")
    if explicit:
        return explicit.split()
    beside = Path(sys.executable).parent / "fwatchdog"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("fwatchdog")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from fwatchdog.main import main; sys.exit(main())"]


@dataclass(frozen=True)
class Layout:
    """Where the function lives: the build context (index.py, function/, model/)."""

    context: Path
    template: Path

    @property
    def function_dir(self) -> Path:
        return self.context / "function"

    @property
    def model_dir(self) -> Path:
        return self.context / "model"


def system_env(system: str, layout: Layout, base: Mapping[str, str], port: int,
               metrics_port: int, upstream: int,
               settings: Mapping[str, str]) -> dict[str, str]:
    env = {**base, "port": str(port), "metrics_port": str(metrics_port),
           "MODEL_PATH": str(layout.model_dir), "exec_timeout": "600s",
           "write_timeout": "600s", "read_timeout": "600s", "start_timeout": "600s",
           "healthcheck_interval": "1s"}
    if system == "baseline":
        env.update(mode="http", fprocess=f"{sys.executable} index.py",
                   upstream_url=f"http://127.0.0.1:{upstream}", http_port=str(upstream))
    elif system == "llm":
        env.update(mode="llm", function_dir=str(layout.function_dir),
                   template_dir=str(layout.template))
    else:
        raise ValueError(f"unknown system {system!r}")
    env.update(settings)
    return env


class Instance:
    """One started ``fwatchdog`` (a container's life); times on its own clock."""

    def __init__(self, system: str, layout: Layout, base_env: Mapping[str, str], logs: Path,
                 settings: Mapping[str, str] | None = None) -> None:
        self.system = system
        self.port, self.metrics_port, upstream = free_ports(3)
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        # The function's own server behind the watchdog (baseline only: mode=llm's
        # handlers listen on Unix sockets).
        self.direct_url = f"http://127.0.0.1:{upstream}" if system == "baseline" else None
        logs.mkdir(parents=True, exist_ok=True)
        # The instance's TMPDIR holds mode=llm's Unix sockets: a path of at most 107
        # bytes, so a long TMPDIR (a test's) gives way to /tmp.
        base = os.path.realpath(os.environ.get("TMPDIR", "/tmp"))
        self.tmp = Path(tempfile.mkdtemp(prefix="fwb-", dir=base if len(base) <= 40 else "/tmp"))
        env = system_env(system, layout, base_env, self.port, self.metrics_port, upstream,
                         settings or {})
        env["TMPDIR"] = str(self.tmp)
        self.marks: dict[str, float] = {}  # first arrival of each event
        self.counts: dict[str, int] = {}  # arrivals of each event so far
        self.log_path = logs / f"{system}-{self.port}.log"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(fwatchdog_command(), cwd=layout.context, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._copy_log, daemon=True)
        self._reader.start()

    def _copy_log(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "wb") as out:
            for line in self.proc.stdout:
                now = time.monotonic() - self.t0
                for match in EVENT.finditer(line):
                    name = (match.group(1) or match.group(2)).decode()
                    self.marks.setdefault(name, now)
                    self.counts[name] = self.counts.get(name, 0) + 1
                out.write(line)
                out.flush()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tree(self) -> dict[int, str]:
        """pid -> process title (its argv as one string) of every process in the tree."""
        return dict(process_tree(self.proc.pid))

    def stop(self, grace: float = 30.0) -> None:
        started = self.tree()  # handlers may run in process groups of their own
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its session is left
        self.proc.wait()
        for pid, title in started.items():  # a descendant that outlived the front
            now = _title(pid)  # the same process: its title's first words (not its state)
            if pid != self.proc.pid and now and now.split()[:2] == title.split()[:2]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        self._reader.join(5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _title(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return argv.replace(b"\0", b" ").decode(errors="replace").strip()


def process_tree(root: int) -> Iterator[tuple[int, str]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    todo = [root]
    while todo:
        pid = todo.pop()
        title = _title(pid)
        if title is None:
            continue
        yield pid, title
        todo.extend(children.get(pid, []))


def role(title: str) -> str:
    """A process's role from its title: holder, zygote, handler, front or function."""
    if title.startswith("fwatchdog: "):
        return title.split()[1]
    if "index.py" in title:
        return "function"
    return "front"
