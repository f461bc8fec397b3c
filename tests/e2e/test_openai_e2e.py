"""The python3-llm default function end to end, with the real SmolLM2-135M-Instruct.

A function made by ``faas-cli new chat --lang python3-llm`` and laid out as
``faas-cli build --shrinkwrap`` would, run as the image runs it (behind fwatchdog in
``mode=http`` when available), called with the official ``openai`` client and with
raw HTTP for what a well-behaved client never sends.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from typing import Any

import openai
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
MODEL = "smollm2-135m-instruct"  # the folder's name: what /v1/models lists


@pytest.fixture(scope="module")
def client(llm_function: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=llm_function.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )


def raw(
    fn: Any,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    host, port = fn.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        is_json = headers.get("content-type", "").startswith("application/json")
        return resp.status, headers, json.loads(data) if is_json else data
    finally:
        conn.close()


def open_stream(
    fn: Any, body: dict[str, Any], events: int, accept: str = "text/event-stream"
) -> tuple[socket.socket, bytes]:
    """Start a streamed chat completion and read until ``events`` SSE events arrived."""
    host, port = fn.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: fn\r\n"
        b"Content-Type: application/json\r\nAccept: %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (accept.encode(), len(payload)) + payload
    )
    got = b""
    while got.count(b"data: ") < events:
        chunk = sock.recv(65536)
        assert chunk, f"stream ended early: {got!r}"
        got += chunk
    return sock, got


LONG_STORY = {
    "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
    "temperature": 0,
    "max_tokens": 2000,
    "stream": True,
}


# ------------------------------------------------------------------ the happy paths


def test_the_function_is_healthy_behind_fwatchdog(llm_function: Any) -> None:
    if llm_function.front != "fwatchdog":
        pytest.skip("FWATCHDOG_E2E_FRONT=direct")
    assert raw(llm_function, "GET", "/_/health")[0] == 200
    assert "event=upstream_ready" in llm_function.log()


def test_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]


def test_greedy_chat_knows_the_capital_of_france(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=40
    )
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_arrives_in_chunks_with_usage_last(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)  # the client stops at data: [DONE]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_stream_equals_the_non_streamed_answer(client: openai.OpenAI) -> None:
    whole = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    pieces = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 6
    assert whole.object == "text_completion"


def test_stop_sequence_ends_the_answer_without_the_stop_text(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas."}],
        temperature=0,
        max_tokens=60,
        stop=[" 4", "never-seen"],
    )
    text = reply.choices[0].message.content
    assert text.startswith("1, 2, 3") and "4" not in text
    assert reply.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample() -> str:
        reply = client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7
        )
        return reply.choices[0].text

    assert sample() == sample()


# ------------------------------------------------------------------ bad requests


CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": "hi"}', "messages"),
        (b"{}", "messages"),
        (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": 42}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "temperature"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": true}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stop": [1]}', "stop"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": "x"}', "seed"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', None),  # latin-1 byte
    ],
    ids=lambda v: v.decode("latin-1")[:40] if isinstance(v, bytes) else str(v),
)
def test_malformed_chat_requests_are_openai_400s(
    llm_function: Any, body: bytes, param: str | None
) -> None:
    status, headers, err = raw(
        llm_function, "POST", CHAT, body, {"Content-Type": "application/json"}
    )
    assert status == 400, err
    assert headers["content-type"].startswith("application/json")
    assert set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param


def test_completions_require_a_prompt(llm_function: Any) -> None:
    status, _, err = raw(llm_function, "POST", "/v1/completions", b'{"max_tokens": 3}')
    assert (status, err["error"]["param"]) == (400, "prompt")


def test_prompts_beyond_the_context_are_rejected_before_generation(llm_function: Any) -> None:
    long = json.dumps({"messages": [{"role": "user", "content": "hello " * 9000}]}).encode()
    status, _, err = raw(llm_function, "POST", CHAT, long)
    assert status == 400
    assert err["error"]["code"] == "context_length_exceeded"
    assert err["error"]["param"] == "messages"
    long_prompt = json.dumps({"prompt": "hello " * 9000, "max_tokens": 1}).encode()
    status, _, err = raw(llm_function, "POST", "/v1/completions", long_prompt)
    assert (status, err["error"]["code"], err["error"]["param"]) == (
        400,
        "context_length_exceeded",
        "prompt",
    )
    too_many = json.dumps({"messages": FRANCE, "max_tokens": 100_000}).encode()
    status, _, err = raw(llm_function, "POST", CHAT, too_many)
    assert (status, err["error"]["code"]) == (400, "context_length_exceeded")
    assert err["error"]["param"] == "max_tokens"


def test_the_openai_client_sees_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=-1)
    assert caught.value.param == "max_tokens"
    # A name this function does not serve is not answered by SmolLM2 anyway.
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=4)
    assert missing.value.code == "model_not_found"
    assert "Error code: 404 - The model 'gpt-4o' does not exist." in str(missing.value)


def test_unknown_paths_and_wrong_methods(llm_function: Any) -> None:
    status, _, err = raw(llm_function, "POST", "/v1/embeddings", b"{}")
    assert status == 404 and "error" in err
    status, headers, err = raw(llm_function, "GET", CHAT)
    assert status == 405 and headers["allow"] == "POST" and "error" in err


# ------------------------------------------------------------------ load and disconnects


def test_a_client_that_disconnects_stops_its_generation(llm_function: Any) -> None:
    before = len(llm_function.log())
    sock, _ = open_stream(llm_function, LONG_STORY, events=4)
    sock.close()
    # The story would need ~2000 tokens; cancellation must come long before that.
    llm_function.wait_log("generation_cancelled", timeout=30, after=before)
    assert "generation_finished" not in llm_function.log()[before:]
    # The slot is free again: the next request is served at once, not refused.
    started = time.monotonic()
    status, _, reply = raw(
        llm_function,
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "Hi", "max_tokens": 2}).encode(),
    )
    assert status == 200, reply
    assert time.monotonic() - started < 10


def test_a_request_beyond_the_slots_waits_and_one_beyond_the_queue_is_a_503(
    llm_function: Any,
) -> None:
    before = len(llm_function.log())
    # As the openai SDK asks: Accept: application/json, yet events arrive one by one.
    sock, _ = open_stream(llm_function, LONG_STORY, events=2, accept="application/json")
    queued: list[Any] = []
    waiter = threading.Thread(
        target=lambda: queued.append(raw(
            llm_function, "POST", "/v1/completions",
            json.dumps({"prompt": "Hi", "max_tokens": 2}).encode())),
        daemon=True,
    )
    try:
        waiter.start()
        llm_function.wait_log("request_queued", timeout=30, after=before)
        status, headers, err = raw(
            llm_function, "POST", CHAT, json.dumps({"messages": FRANCE}).encode()
        )
        assert status == 503  # the one slot runs and the one place in the queue is taken
        assert err["error"]["code"] == "overloaded"
        assert headers.get("retry-after") == "1"
        # Listing models needs no generation slot.
        assert raw(llm_function, "GET", "/v1/models")[0] == 200
        assert not queued  # still waiting for the slot
    finally:
        sock.close()
    llm_function.wait_log("generation_cancelled", timeout=30, after=before)
    waiter.join(60)
    assert queued and queued[0][0] == 200, queued
    assert queued[0][2]["usage"]["completion_tokens"] == 2
    assert "request_admitted" in llm_function.log()[before:]
