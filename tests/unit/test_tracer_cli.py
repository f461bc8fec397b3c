"""The tracer CLI's answers to bad input: usage errors and failing start-ups."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _tracer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fwatchdog.tracer", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_folder_without_handler_is_a_usage_error(tmp_path: Path) -> None:
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"))
    assert done.returncode == 2
    assert "has no handler.py" in done.stderr
    assert not (tmp_path / "t").exists()


def test_failing_start_up_shows_its_error_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("raise RuntimeError('model folder missing')\n")
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"), "--runs", "1")
    assert done.returncode == 1
    assert "traced start-up failed" in done.stderr
    assert "model folder missing" in done.stderr
    assert not (tmp_path / "t").exists()


def test_function_without_weights_gives_an_empty_template(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text(
        "def handle(event, context):\n    return {'echo': event.body.decode()}\n")
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"), "--runs", "1")
    assert done.returncode == 0, done.stderr
    assert "loads: 0 traced" in done.stdout
    verified = subprocess.run(
        [sys.executable, "-m", "fwatchdog.template_cache", "verify", str(tmp_path / "t")],
        capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stderr
