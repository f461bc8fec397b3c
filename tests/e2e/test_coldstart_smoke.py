"""bench/coldstart.py still runs: every scenario, both systems, the tiny shape on CPU.

Benchmarks are never timed assertions: this checks that each scenario produced its
records with sane fields, that mode=llm served from its template, and that the plot
script reads the output (where matplotlib is installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench"
COMMON = ({"container_cold_warm_cache", "container_cold_cold_cache", "trace", "gpu_memory_1",
           "concurrency_1", "concurrency_4", "concurrency_16", "first_request_sampled"}
          | {f"first_request_{n}" for n in (7, 57, 300, 1000, 2048)})
LLM_ONLY = {"gpu_wake", "gpu_memory_released", "new_handler", "new_handler_spare",
            "gpu_memory_2"}


def test_a_function_setting_must_be_key_value() -> None:
    done = subprocess.run([sys.executable, str(BENCH / "coldstart.py"), "--smoke",
                           "--function-env", "CUDA_GRAPHS"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "expected KEY=VALUE" in done.stderr, done.stderr


@pytest.mark.timeout(1500)
def test_coldstart_smoke_runs_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    done = subprocess.run(
        [sys.executable, str(BENCH / "coldstart.py"), "--smoke", "--out", str(out),
         "--work", str(tmp_path / "work"), "--function-env", "KV_CACHE_TOKENS=4096"],
        capture_output=True, text=True, timeout=1400, check=False,
        env={**os.environ, "TMPDIR": str(tmp)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "results:" in done.stdout
    run, *records = json.loads(out.read_text())
    assert run["scenario"] == "run" and run["bytecode"]["compiled"]
    assert run["floors"]["import_s"] > 0 and "7" in run["floors"]["prefill_s"]
    got = {(r["system"], r["scenario"]) for r in records}
    expected = ({("baseline", s) for s in COMMON} | {("llm", s) for s in COMMON | LLM_ONLY}
                | {("baseline", f"concurrency_direct_{n}") for n in (1, 4, 16)})
    assert expected <= got, sorted(expected - got)
    for r in records:
        assert r["commit"] and r["model"] == "llama-tiny-random-bf16"
        assert r["function_env"] == {"KV_CACHE_TOKENS": "4096"}
        if r["scenario"] == "gpu_memory_released":
            continue
        t = r["ttft_s"]
        assert r["runs"] >= 1 and 0 < t["min"] <= t["median"] <= t["max"], r
    by = {(r["system"], r["scenario"]): r for r in records}
    for system in ("baseline", "llm"):
        traced = by[(system, "trace")]
        assert traced["failed"] == [] and traced["runs"] == traced["requests"]
        assert traced["ttft_s"]["p95"] > 0 and traced["gpu_seconds_modelled"] > 0
        assert by[(system, "first_request_7")]["steady_s"] > 0
        streams = by[(system, "concurrency_4")]
        gaps = streams["inter_token_p50_p95_s"]
        assert gaps["p95"] >= gaps["p50"] > 0
        assert streams["decode_step_floor_s"] > 0 and streams["tokens_per_s_floor"] > 0
        assert by[(system, "container_cold_warm_cache")]["floor_s"] > 0
    assert by[("llm", "container_cold_warm_cache")]["template_loads"].get("hit", 0) >= 1
    assert by[("baseline", "trace")]["instance_starts"] >= 2  # a restart after the window
    # Both systems' functions ran with the setting.
    for system in ("baseline", "llm"):
        texts = [p.read_text(errors="replace")
                 for p in (tmp_path / "work" / "logs").glob(f"{system}-*.log")]
        assert any("kv_cache_tokens=4096" in text for text in texts), system
        assert not any(re.search(r"kv_cache_tokens=(?!4096\b)", t) for t in texts), system
    if importlib.util.find_spec("matplotlib") is not None:
        plots = subprocess.run([sys.executable, str(BENCH / "plot_coldstart.py"), str(out),
                                "--out-dir", str(tmp_path / "plots")],
                               capture_output=True, text=True, timeout=120, check=False)
        assert plots.returncode == 0, plots.stderr
        assert len(list((tmp_path / "plots").glob("*.png"))) == 2
