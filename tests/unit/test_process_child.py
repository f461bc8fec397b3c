"""fwatchdog.process with real child processes: spawn, feed, kill the group, reap."""

from __future__ import annotations

import asyncio
import io
import sys
import time
from pathlib import Path

import pytest
import uvloop

from fwatchdog.process import Children, SpawnError, spawn
from tests.conftest import alive

PY = sys.executable


async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never written")
        await asyncio.sleep(0.01)  # polling interval
    return path.read_text().strip()


async def wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still alive")
        await asyncio.sleep(0.01)  # polling interval


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return asyncio.run if request.param == "asyncio" else uvloop.run


def test_missing_command_is_a_spawn_error(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        with pytest.raises(SpawnError, match="no-such-command-xyz"):
            await spawn(("no-such-command-xyz",), {"PATH": "/nonexistent"},
                        stderr_sink=io.StringIO(), prefix_logs=False, log_buffer_size=100)

    run(main())


def test_kill_ends_the_whole_process_group(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "grandchild.pid"

    async def main() -> None:
        child = await spawn(("sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"),
                            {"PATH": "/usr/bin:/bin"}, stderr_sink=io.StringIO(),
                            prefix_logs=False, log_buffer_size=100)
        grandchild = int(await wait_for_file(pidfile))
        assert alive(grandchild)
        child.kill()
        assert await asyncio.wait_for(child.reap(), 10) == -9
        await wait_dead(grandchild)
        child.kill()  # idempotent, even with nobody left

    run(main())


def test_feeding_a_child_that_never_reads_stdin(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        child = await spawn(("sh", "-c", "exec 0<&-; echo done"), {"PATH": "/usr/bin:/bin"},
                            stderr_sink=io.StringIO(), prefix_logs=False, log_buffer_size=100)
        # Far more than a pipe holds: the copy must end, not block or raise.
        await asyncio.wait_for(child.feed_bytes(b"x" * (4 * 1024 * 1024)), 10)
        assert await child.stdout.read() == b"done\n"
        assert await asyncio.wait_for(child.reap(), 10) == 0

    run(main())


def test_stderr_is_forwarded_and_long_lines_split(run) -> None:  # type: ignore[no-untyped-def]
    sink = io.StringIO()
    script = ("import sys; sys.stderr.write('a' * 250 + '\\n'); sys.stderr.write('tail\\n');"
              "sys.stdout.write('out')")

    async def main() -> None:
        child = await spawn((PY, "-c", script), {}, stderr_sink=sink, prefix_logs=True,
                            log_buffer_size=100)
        assert await child.stdout.read() == b"out"
        assert await child.reap() == 0
        await asyncio.wait_for(child.stderr_task, 10)

    run(main())
    lines = sink.getvalue().splitlines()
    assert [ln.split(" stderr: ", 1)[1] for ln in lines] == ["a" * 100, "a" * 100, "a" * 50,
                                                             "tail"]


def test_children_stop_kills_and_forgets_every_live_child(run) -> None:  # type: ignore[no-untyped-def]
    owned: set[int] = set()

    async def main() -> None:
        children = Children(owned)
        spawned = []
        for _ in range(2):
            child = await spawn(("sleep", "300"), {"PATH": "/usr/bin:/bin"},
                                stderr_sink=io.StringIO(), prefix_logs=False, log_buffer_size=100)
            children.add(child)
            spawned.append(child)
        assert owned == {c.pid for c in spawned}
        await asyncio.wait_for(children.stop(), 10)
        assert len(children) == 0
        assert owned == set()
        for child in spawned:
            assert child.proc.returncode == -9

    run(main())


def test_feeding_after_the_child_is_gone(run) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        child = await spawn(("sh", "-c", "exec 0<&-; exit 0"), {"PATH": "/usr/bin:/bin"},
                            stderr_sink=io.StringIO(), prefix_logs=False, log_buffer_size=100)
        assert await asyncio.wait_for(child.reap(), 10) == 0
        assert await child.stdout.read() == b""
        for _ in range(3):  # whatever state the pipe is in by now, no error escapes
            await asyncio.wait_for(child.feed_bytes(b"x" * 100_000), 10)

    run(main())
