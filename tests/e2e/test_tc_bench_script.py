"""bench/template_gpu.py still runs: the tiny shape on CPU (the 8B shape needs a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "template_gpu.py"


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--repeats", "1",
         "--runs", "1", "--work", str(tmp_path), "--out", str(out)],
        capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attach in a fresh process" in done.stdout
    result = json.loads(out.read_text())
    assert result["holder_kind"] == "memfd"
    assert {r["verify"] for r in result["hold_rates"]} == {"none", "full"}
    for key in ("ordinary", "template_holder", "template_files"):
        assert result[key]["ready_s_median"] > 0
    for run in result["template_holder"]["runs"] + result["template_files"]["runs"]:
        assert run["template"]["hits"] == 1 and run["template"]["misses"] == 0
