"""Concurrent users of the python3-llm default function share one continuous batch.

The unmodified template function with the real SmolLM2-135M-Instruct behind
fwatchdog, called with the official ``openai`` client. Eight generation slots and
no queue, so a request that was not admitted beside the others is a 503 at once:
eight answers prove eight generations ran together. The model runs in float32, in
which a greedy answer does not depend on the batch around it (in bf16 the batch's
shape changes the rounding, and nearly tied tokens can swap).
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import wait_until
from tests.e2e.test_openai_e2e import MODEL, open_stream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SLOTS = 8
QUESTIONS = [f"Name {n} colours, one per line." for n in range(2, 2 + SLOTS)]


@pytest.fixture(scope="module")
def batched_function(default_function_context: Path, converted_model: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.e2e.conftest import start_function

    fn = start_function(
        default_function_context, tmp_path_factory.mktemp("batched-function"),
        {"MODEL_PATH": str(converted_model), "MODEL_DTYPE": "float32",
         "MAX_CONCURRENT_GENERATIONS": str(SLOTS), "MAX_QUEUED_GENERATIONS": "0"})
    yield fn
    fn.stop()


@pytest.fixture(scope="module")
def client(batched_function: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=batched_function.url + "/v1", api_key="unused",
                         max_retries=0, timeout=300)


def ask(client: openai.OpenAI, question: str, stream: bool) -> tuple[str, str | None]:
    messages = [{"role": "user", "content": question}]
    if not stream:
        reply = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                               temperature=0, max_tokens=24)
        return reply.choices[0].message.content or "", reply.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                                temperature=0, max_tokens=24, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.fixture(scope="module")
def alone(client: openai.OpenAI) -> list[tuple[str, str | None]]:
    """Each question's greedy answer with nothing else running."""
    return [ask(client, q, stream=False) for q in QUESTIONS]


def test_the_function_says_it_batches(batched_function: Any, alone: Any) -> None:
    assert f"batching=continuous slots={SLOTS}" in batched_function.log()


def test_eight_concurrent_requests_each_get_their_answer_alone(
        client: openai.OpenAI, alone: list[tuple[str, str | None]]) -> None:
    with ThreadPoolExecutor(SLOTS) as pool:
        together = list(pool.map(lambda i: ask(client, QUESTIONS[i], stream=i % 2 == 0),
                                 range(SLOTS)))
    assert together == alone
    assert all(text and finish in ("stop", "length") for text, finish in together)


def test_a_disconnect_mid_stream_frees_its_slot(batched_function: Any,
                                                 client: openai.OpenAI) -> None:
    long = {"messages": [{"role": "user", "content": "Write a long story."}],
            "temperature": 0, "max_tokens": 2000, "stream": True}
    held: list[socket.socket] = []
    try:
        for _ in range(SLOTS):  # every slot taken by a stream that has begun
            sock, _got = open_stream(batched_function, long, events=2)
            held.append(sock)
        with pytest.raises(openai.APIStatusError) as refused:
            ask(client, QUESTIONS[0], stream=False)
        assert refused.value.status_code == 503
        assert refused.value.response.headers.get("retry-after") == "1"
        held.pop().close()  # one client goes away mid-stream
        # Its slot frees at its next token: a new request is admitted, not refused.
        answers: list[tuple[str, str | None]] = []

        def admitted() -> bool:
            try:
                answers.append(ask(client, QUESTIONS[0], stream=False))
            except openai.APIStatusError as exc:
                assert exc.status_code == 503, exc
                return False
            return True

        wait_until(admitted, timeout=60, what="a request admitted into the freed slot")
        assert answers[0][0]
    finally:
        for sock in held:
            sock.close()
