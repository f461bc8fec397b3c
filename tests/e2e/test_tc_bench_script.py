"""bench/template_gpu.py, bench/first_request_probe.py and bench/batch_step.py still
run: the tiny shape on CPU (the 8B shape needs a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPT = BENCH / "template_gpu.py"


def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--repeats", "1",
         "--runs", "1", "--trace-device", "cpu", "--work", str(tmp_path), "--out", str(out)],
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
    # Every start-up's first forward gave the same logits, bit for bit.
    assert result["logits_identical"] is True
    assert len({run["logits_sha256"] for key in ("ordinary", "template_holder", "template_files")
                for run in result[key]["runs"]}) == 1


def test_first_request_probe_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "first_request_probe.py"), "--shape", "tiny", "--device",
         "cpu", "--quick", "--variants", "lazy,no_cudnn_sdp", "--out", str(out)],
        capture_output=True, text=True, timeout=280, check=False, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for variant in ("lazy", "no_cudnn_sdp"):
        lengths = result[variant]["lengths"]
        assert [first["length"] for first, _again in lengths] == [9, 59, 302, 1002]
        assert all(r["prefill_s"] > 0 for pair in lengths for r in pair)
        assert set(result[variant]["threads"]) == {"main", "new_thread_1", "new_thread_2",
                                                   "main_again"}
        assert "Self CPU time total" in result[variant]["profile_first"]


def test_batch_step_runs_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "steps.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "batch_step.py"), "--shape", "tiny", "--device", "cpu",
         "--quick", "--variants", "shim,eager,graphs,sequential,static_graph", "--out", str(out)],
        capture_output=True, text=True, timeout=280, check=False, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["unavailable"] is None
    assert result["shim"]["seeded_beside_batch_repeats"] is True, result["shim"]
    for variant in ("eager", "graphs"):
        case = result[variant]
        assert "error" not in case, case.get("error")
        assert case["cuda_graphs"] is False  # a CPU never replays graphs
        assert [case[f"n{n}"]["tokens"] for n in (1, 2)] == [8, 16]
        assert case["restart_request_s"] > 0 and case["disabled"] is None
    assert all(v > 0 for v in result["sequential"].values())
    assert "skipped" in result["static_graph"]
