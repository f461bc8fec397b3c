"""The python3-llm default function in mode=llm, end to end, with the real SmolLM2.

The function made by ``faas-cli new chat --lang python3-llm`` (shrinkwrapped
context), its start-up traced by the tracer as the image's prepare step does, then
served by ``fwatchdog mode=llm`` from that template: holder, zygote and forked
handlers, called with the official ``openai`` client.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import free_port, http_status, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


class LlmFunction:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, metrics_port: int,
                 log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, labels: str) -> float:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        match = re.search(re.escape(name) + r"\{" + re.escape(labels) + r"\} (\S+)", text)
        return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def served(default_function_context: Path, converted_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlmFunction]:
    tmp = tmp_path_factory.mktemp("llm-mode")
    function_dir = default_function_context / "function"
    template = tmp / "template"
    env = {**os.environ, "MODEL_PATH": str(converted_model), "TOKENIZERS_PARALLELISM": "false"}
    traced = subprocess.run([sys.executable, "-m", "fwatchdog.tracer", str(function_dir),
                             "--out", str(template)], capture_output=True, text=True,
                            env=env, timeout=400, check=False)
    assert traced.returncode == 0, traced.stderr[-4000:]
    port, metrics_port = free_port(), free_port()
    tmpdir = tmp / "tmp"
    tmpdir.mkdir()
    log = tmp / "fwatchdog.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "fwatchdog")], cwd=default_function_context,
            stdout=out, stderr=subprocess.STDOUT,
            env={**env, "mode": "llm", "function_dir": str(function_dir),
                 "template_dir": str(template), "port": str(port),
                 "metrics_port": str(metrics_port), "TMPDIR": str(tmpdir),
                 "exec_timeout": "120s", "healthcheck_interval": "1s",
                 "PYTHONUNBUFFERED": "1"})
    fn = LlmFunction(proc, port, metrics_port, log)
    try:
        wait_until(lambda: proc.poll() is not None or http_status(fn.url + "/_/ready") == 200,
                   timeout=240, what="a warm handler")
        assert proc.poll() is None, fn.log()
        yield fn
    finally:
        proc.terminate()
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        assert code == 0, fn.log()[-4000:]


@pytest.fixture(scope="module")
def client(served: LlmFunction) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_greedy_chat_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE,
                                           max_tokens=32, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")


def test_a_streamed_answer_equals_the_whole_one(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE,
                                           max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=FRANCE,
                                            max_tokens=24, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content


def test_the_weights_came_from_the_template(served: LlmFunction, client: openai.OpenAI) -> None:
    client.models.list()
    assert served.metric("fwatchdog_llm_template_loads_total", 'outcome="hit"') >= 1
    assert served.metric("fwatchdog_llm_template_loads_total", 'outcome="miss"') == 0
    log = served.log()
    assert "event=holder_ready" in log and "event=zygote_ready" in log
    assert "template=used" in log
    # The zygote built the tokenizer ahead; the handler's start-up got it.
    assert "zygote_prebuilt objects=1" in log and "template_prebuilt_served" in log
    assert "prebuilt=1" in log


def test_the_handler_was_warmed_before_it_was_ready(served: LlmFunction) -> None:
    log: Any = served.log()
    assert "warmup_done requests=2 ok=2" in log


def test_concurrent_requests_share_the_forked_handler_s_batch(
        served: LlmFunction, client: openai.OpenAI) -> None:
    questions = [f"Name {n} animals." for n in range(2, 6)]
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(lambda q: client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": q}],
            max_tokens=12, temperature=0), questions))
    assert all(r.choices[0].message.content and r.usage and r.usage.completion_tokens
               for r in replies)
    log = served.log()
    # The batch belongs to the handler: made at its start-up, started by its requests.
    assert "batching=continuous slots=16" in log and "batch_started" in log
