"""The tracer CLI's answers to bad input: usage errors and failing start-ups."""

from __future__ import annotations

import json
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


NOT_OPENAI = (
    "import json\n\n"
    "def handle(event, context):\n"
    "    data = json.loads(event.body)\n"
    "    return {'sum': data['a'] + data['b']}\n"
)


def test_a_failing_default_sample_warns_and_writes_the_template(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text(NOT_OPENAI)
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"), "--runs", "1")
    assert done.returncode == 0, done.stderr
    assert "warning: the default sample default-0" in done.stderr
    assert "KeyError" in done.stderr
    assert "samples/*.json" in done.stderr and "--sample" in done.stderr
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["trace"]["sample_failure"]["default"] is True
    assert manifest["trace"]["samples"] == []


def test_a_failing_given_sample_fails_and_says_how_to_give_one(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text(NOT_OPENAI)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "sum.json").write_text(json.dumps({"body": {"a": 1}}))
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"), "--runs", "1")
    assert done.returncode == 1
    assert "the start-up worked, but sample sum.json: KeyError" in done.stderr
    assert "samples/*.json" in done.stderr and "--sample" in done.stderr
    assert "traced start-up failed" not in done.stderr
    assert not (tmp_path / "t").exists()
    # A sample that fits the handler: the build goes through.
    (tmp_path / "samples" / "sum.json").write_text(json.dumps({"body": {"a": 1, "b": 2}}))
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"), "--runs", "1")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr


def test_a_hanging_start_up_is_killed_after_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(600)\n")
    done = _tracer(str(tmp_path), "--out", str(tmp_path / "t"), "--runs", "1",
                   "--timeout", "20")
    assert done.returncode == 1
    assert "did not finish within 20 s" in done.stderr and "--timeout" in done.stderr
    assert not (tmp_path / "t").exists()
