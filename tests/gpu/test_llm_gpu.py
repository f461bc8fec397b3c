"""mode=llm on a GPU: a template traced without a GPU (as ``docker build`` does) served
from a CUDA holder to handlers forked from a zygote that never initialised CUDA;
release on idle and wake. Skipped without CUDA; run on a GPU machine."""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import Watchdog, wait_until
from tests.contract import llm_function
from tests.contract.test_llm_mode import get_json, titled, wait_warm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.timeout(300),
]


def gpu_memory(wd: Watchdog) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{wd.metrics_port}/metrics",
                                  timeout=5).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'fwatchdog_llm_gpu_memory_bytes\{process="([^"]+)"\} (\S+)', text)}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llm-gpu")
    function_dir = llm_function.make_function(root / "function", llm_function.GPU_HANDLER)
    return function_dir, llm_function.trace(function_dir, root / "template", hide_gpu=True)


def test_cpu_traced_template_served_on_the_gpu_released_and_woken(
        watchdog_factory: Callable[..., Watchdog], traced: tuple[Path, Path],
        tmp_path: Path) -> None:
    function_dir, template = traced
    wd = watchdog_factory({"mode": "llm", "function_dir": str(function_dir),
                           "template_dir": str(template), "healthcheck_interval": "0s",
                           "llm_gpu_idle_timeout": "3s", "LLM_TEST_SIGNALS": str(tmp_path),
                           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")})
    wd.wait_ready(timeout=60)
    wait_warm(wd)
    assert "device=cuda" in wd.text() and "cuda_initialized=False" in wd.text()
    first = get_json(wd, "/generate")
    assert get_json(wd, "/cuda")["initialized"] is True  # the handler's own context
    assert "template=used" in wd.text()
    wait_until(lambda: len(titled(wd, "fwatchdog: handler ready")) == 2, timeout=120,
               what="a serving handler and a spare")
    held = gpu_memory(wd)
    assert "holder" in held and "zygote" not in held, held
    wd.wait_output("event=gpu_released", timeout=60)
    released = gpu_memory(wd)
    assert released.get("holder", 0) < held["holder"], (held, released)
    again = get_json(wd, "/generate")
    assert again["tokens"] == first["tokens"]
    assert "event=handler_reattached" in wd.text()
