"""The lock file and the signal recorder."""

from __future__ import annotations

import asyncio
import os
import signal

from fwatchdog.lifecycle import LockFile, SignalRecorder


def test_lock_file_write_exists_remove(tmp_path):
    lock = LockFile(str(tmp_path / "sub" / ".lock"))
    assert not lock.exists()
    lock.write()
    assert lock.exists() and (tmp_path / "sub" / ".lock").read_bytes() == b""
    assert lock.remove() is True
    assert lock.remove() is False  # already gone: fine
    assert not lock.exists()


def test_signal_recorder_only_records():
    async def scenario() -> signal.Signals | None:
        recorder = SignalRecorder()
        loop = asyncio.get_running_loop()
        recorder.install(loop)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(recorder.event.wait(), 5)
            os.kill(os.getpid(), signal.SIGINT)  # the first signal is what counts
            await asyncio.sleep(0)
            return recorder.received
        finally:
            recorder.uninstall(loop)

    assert asyncio.run(scenario()) is signal.SIGTERM


def test_a_second_signal_forces_and_sigquit_quits():
    async def scenario() -> tuple[bool, bool, bool, bool, signal.Signals | None]:
        quits: list[bool] = []
        recorder = SignalRecorder(on_quit=lambda: quits.append(True))
        loop = asyncio.get_running_loop()
        recorder.install(loop)
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.wait_for(recorder.event.wait(), 5)
            first_forced = recorder.forced.is_set()
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(recorder.forced.wait(), 5)
            before_quit = recorder.quit
            os.kill(os.getpid(), signal.SIGQUIT)
            for _ in range(500):
                if quits:
                    break
                await asyncio.sleep(0.01)
            return first_forced, before_quit, recorder.quit, bool(quits), recorder.received
        finally:
            recorder.uninstall(loop)

    assert asyncio.run(scenario()) == (False, False, True, True, signal.SIGHUP)
