"""The OpenAI protocol module of the python3-llm default handler, without a model.

Request parsing (types, ranges, UTF-8, unsupported options), the environment
reader, the stop-sequence helpers, and the token loop driven by a scripted model
(torch tensors, no weights): stop text never leaks, cancellation stops at the next
token, and the concurrency slot is released exactly once.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import wait_until

FUNCTION = Path(__file__).resolve().parents[2] / "templates" / "python3-llm" / "function"
PACKAGE = "python3_llm_function"


def load(name: str) -> types.ModuleType:
    """Import a module of the function folder as the package index.py sees."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(FUNCTION)]
        sys.modules[PACKAGE] = package
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # never write __pycache__ into the template
    try:
        return importlib.import_module(f"{PACKAGE}.{name}")
    finally:
        sys.dont_write_bytecode = previous


api = load("openai_api")
generation = load("generation")


def test_the_protocol_module_does_not_import_torch() -> None:
    code = (
        "import sys, types; p = types.ModuleType('fn'); p.__path__ = [sys.argv[1]];"
        "sys.modules['fn'] = p; import fn.openai_api; assert 'torch' not in sys.modules"
    )
    done = subprocess.run(
        [sys.executable, "-B", "-c", code, str(FUNCTION)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ parsing


def error_of(call: Any, *args: Any) -> api.APIError:
    with pytest.raises(api.APIError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{", "not valid JSON"),
        (b'"text"', "JSON object"),
        (b"null", "JSON object"),
    ],
)
def test_bodies_must_be_utf8_json_objects(body: bytes, fragment: str) -> None:
    err = error_of(api.parse_json_object, body)
    assert err.status == 400 and fragment in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_sampling_defaults() -> None:
    assert api.parse_sampling({}) == generation.SamplingParams(max_tokens=None)


def test_max_completion_tokens_is_accepted_and_wins() -> None:
    assert api.parse_sampling({"max_completion_tokens": 5}).max_tokens == 5
    assert api.parse_sampling({"max_tokens": 9, "max_completion_tokens": 5}).max_tokens == 5


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": False}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.1}, "top_p"),
        ({"stop": 3}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": "\ud800"}, "stop"),
        ({"seed": 1.0}, "seed"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_bad_sampling_fields_name_their_param(fields: dict, param: str) -> None:
    err = error_of(api.parse_sampling, fields)
    assert (err.status, err.param) == (400, param)


def test_explicit_nulls_mean_not_given() -> None:
    nulls = {"max_tokens": None, "temperature": None, "top_p": None, "stop": None, "seed": None}
    assert api.parse_sampling(nulls) == generation.SamplingParams(max_tokens=None)


def test_stream_options_need_stream() -> None:
    assert api.parse_stream({"stream": True, "stream_options": {"include_usage": True}}) == (
        True,
        True,
    )
    assert error_of(api.parse_stream, {"stream_options": {}}).param == "stream_options"
    assert error_of(api.parse_stream, {"stream": 1}).param == "stream"


def test_messages_accept_text_parts_and_map_developer_to_system() -> None:
    messages = api.parse_messages(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ]
        }
    )
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("obj", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ],
)
def test_bad_messages_name_their_param(obj: dict, param: str) -> None:
    assert error_of(api.parse_messages, obj).param == param


def test_prompts() -> None:
    assert api.parse_prompt({"prompt": ["one"]}) == "one"
    assert error_of(api.parse_prompt, {"prompt": ["a", "b"]}).param == "prompt"
    assert error_of(api.parse_prompt, {"prompt": [1, 2]}).param == "prompt"
    assert error_of(api.parse_prompt, {"prompt": "x", "echo": True}).param == "echo"


# ------------------------------------------------------------------ configuration


def test_server_config_from_env() -> None:
    config = api.ServerConfig.from_env({}, "default")
    # No MAX_CONCURRENT_GENERATIONS: the server picks 16 with a batch, 2 without one.
    assert (config.model_name, config.max_concurrent, config.max_context) == ("default", None, None)
    assert (config.batching, config.kv_cache_tokens) == (True, 16384)
    config = api.ServerConfig.from_env(
        {"MODEL_NAME": "m", "MAX_CONCURRENT_GENERATIONS": "8", "MAX_MODEL_LEN": "4096"}, "d"
    )
    assert (config.model_name, config.max_concurrent, config.max_context) == ("m", 8, 4096)
    with pytest.raises(ValueError) as caught:
        api.ServerConfig.from_env(
            {"MAX_CONCURRENT_GENERATIONS": "0", "DEFAULT_MAX_TOKENS": "x"}, "d"
        )
    assert "MAX_CONCURRENT_GENERATIONS" in str(caught.value)
    assert "DEFAULT_MAX_TOKENS" in str(caught.value)


def test_batching_settings_from_env() -> None:
    config = api.ServerConfig.from_env(
        {"BATCHING": "off", "KV_CACHE_TOKENS": "4096", "CUDA_GRAPHS": "Off"}, "d")
    assert (config.batching, config.kv_cache_tokens, config.cuda_graphs) == (False, 4096, False)
    assert api.ServerConfig.from_env({}, "d").cuda_graphs
    with pytest.raises(ValueError) as caught:
        api.ServerConfig.from_env(
            {"BATCHING": "yes", "KV_CACHE_TOKENS": "0", "CUDA_GRAPHS": "1"}, "d")
    assert "BATCHING='yes'" in str(caught.value) and "KV_CACHE_TOKENS='0'" in str(caught.value)
    assert "CUDA_GRAPHS='1'" in str(caught.value)
    # The default 16 slots count against the server's threads too.
    with pytest.raises(ValueError, match="16 \\+ 8 exceeds http_threads=20"):
        api.ServerConfig.from_env({"http_threads": "20"}, "d")


def test_queue_settings_from_env() -> None:
    config = api.ServerConfig.from_env({}, "d")
    assert (config.max_queued, config.max_queue_wait) == (8, 30.0)
    config = api.ServerConfig.from_env(
        {"MAX_QUEUED_GENERATIONS": "0", "MAX_QUEUE_WAIT": "2.5s"}, "d")
    assert (config.max_queued, config.max_queue_wait) == (0, 2.5)
    with pytest.raises(ValueError) as caught:
        api.ServerConfig.from_env({"MAX_QUEUED_GENERATIONS": "-1", "MAX_QUEUE_WAIT": "soon"}, "d")
    assert "MAX_QUEUED_GENERATIONS='-1'" in str(caught.value)
    assert "MAX_QUEUE_WAIT='soon'" in str(caught.value)
    with pytest.raises(ValueError, match="exceeds http_threads=8"):
        api.ServerConfig.from_env({"MAX_CONCURRENT_GENERATIONS": "4",
                                   "MAX_QUEUED_GENERATIONS": "5", "http_threads": "8"}, "d")


def test_model_aliases_from_env() -> None:
    config = api.ServerConfig.from_env({"MODEL_NAME": "m"}, "d")
    assert (config.aliases, config.any_model) == (frozenset(), False)
    assert config.serves("m") and not config.serves("gpt-4o") and not config.serves("")
    config = api.ServerConfig.from_env({"MODEL_NAME": "m", "MODEL_ALIASES": " gpt-4o, ,x "}, "d")
    assert config.aliases == {"gpt-4o", "x"}
    assert config.serves("gpt-4o") and config.serves("m") and not config.serves("gpt-4")
    config = api.ServerConfig.from_env({"MODEL_ALIASES": "*"}, "d")
    assert config.any_model and config.serves("anything at all")
    with pytest.raises(ValueError, match="MODEL_ALIASES"):
        api.ServerConfig.from_env({"MODEL_ALIASES": "*,gpt-4o"}, "d")


# ------------------------------------------------------------------ stop sequences


@pytest.mark.parametrize(
    ("text", "stops", "end"),
    [
        ("hello wor", ("world",), 6),  # "wor" may start "world": held back
        ("hello", ("world",), 5),
        ("abc\ufffd", (), 3),  # half a character: held back
        ("ab", (), 2),
    ],
)
def test_safe_end_holds_back_possible_stop_prefixes(text: str, stops: tuple, end: int) -> None:
    assert generation._safe_end(text, stops) == end


def test_find_stop_takes_the_earliest_and_may_straddle_emitted_text() -> None:
    assert generation._find_stop("a END b STOP", ("STOP", "END"), 0) == 2
    assert generation._find_stop("xxEN" + "D", ("END",), 3) == 2
    assert generation._find_stop("no stop", ("END",), 0) is None


# ------------------------------------------------------------------ the token loop


class ScriptedModel:
    """Emits a fixed token sequence; token ids are indices into a character table."""

    def __init__(self, torch: Any, script: list[int], vocab: int) -> None:
        self.torch = torch
        self.script = script
        self.vocab = vocab
        self.device = torch.device("cpu")
        self.calls = 0

    def __call__(self, input_ids: Any, cache: Any, use_cache: bool) -> Any:
        logits = self.torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 100.0
        self.calls += 1
        return types.SimpleNamespace(logits=logits)


class CharTokenizer:
    def __init__(self, table: str) -> None:
        self.table = table

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.table[i] for i in ids)


TABLE = "#abcdefghijklmnopqrstuvwxyz ."  # id 0 is end of sequence


def ids(text: str) -> list[int]:
    return [TABLE.index(ch) for ch in text]


def run(text: str, *, max_new: int = 50, stop: tuple[str, ...] = (), cancel: Any = None) -> Any:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    releases: list[int] = []
    gen = generation.Generation(
        ScriptedModel(torch, ids(text) + [0], len(TABLE)),
        CharTokenizer(TABLE),
        prompt_ids=[1, 2],
        params=generation.SamplingParams(max_tokens=None, temperature=0, stop=stop),
        max_new_tokens=max_new,
        eos_ids=frozenset({0}),
        cancelled=cancel,
        request_id="test",
        on_end=lambda: releases.append(1),
    )
    return gen, releases


def test_generation_ends_at_eos_with_everything_flushed() -> None:
    gen, releases = run("the end", stop=("ends",))
    pieces = list(gen)
    assert "".join(pieces) == "the end"  # "end" was held back as a prefix of "ends"
    assert (gen.finish_reason, gen.completion_tokens, releases) == ("stop", 7, [1])


def test_generation_cuts_at_a_stop_sequence_spanning_tokens() -> None:
    gen, _ = run("say stop now", stop=("stop",))
    assert gen.text() == "say " and gen.finish_reason == "stop"


def test_generation_stops_at_the_token_budget() -> None:
    gen, _ = run("abcdefgh", max_new=3)
    assert gen.text() == "abc" and gen.finish_reason == "length"


def test_closing_a_generation_cancels_it_once(caplog: pytest.LogCaptureFixture) -> None:
    gen, releases = run("a long answer")
    with caplog.at_level(logging.INFO, logger="generation"):
        it = iter(gen)
        next(it)
        gen.close()
        gen.close()
    assert gen.finish_reason is None and releases == [1]
    assert any(r.getMessage().startswith("generation_cancelled id=test") for r in caplog.records)


def test_the_cancelled_event_stops_at_the_next_token() -> None:
    cancel = threading.Event()
    gen, releases = run("a long answer", cancel=cancel)
    it = iter(gen)
    first = next(it)
    cancel.set()
    assert list(it) == [] and first == "a"
    assert gen.finish_reason is None and releases == [1]


def test_the_kv_cache_goes_to_whichever_argument_forward_takes() -> None:
    class Recent:
        def forward(self, input_ids: Any, cache: Any = None, use_cache: bool = True) -> None: ...

    class Older:
        def forward(self, input_ids: Any, past_key_values: Any = None, **kwargs: Any) -> None: ...

    assert generation._cache_kwarg(Recent()) == "cache"
    assert generation._cache_kwarg(Older()) == "past_key_values"


def test_only_the_last_position_s_logits_are_asked_for_where_a_model_can() -> None:
    class Recent:
        def forward(self, input_ids: Any, logits_to_keep: int = 0) -> None: ...

    class Middle:
        def forward(self, input_ids: Any, num_logits_to_keep: int = 0) -> None: ...

    class Plain:
        def forward(self, input_ids: Any, **kwargs: Any) -> None: ...

    assert generation._last_logits_only(Recent()) == {"logits_to_keep": 1}
    assert generation._last_logits_only(Middle()) == {"num_logits_to_keep": 1}
    assert generation._last_logits_only(Plain()) == {}


# ------------------------------------------------------------------ the server, scripted


class FailingModel(ScriptedModel):
    def __init__(self, torch: Any, script: list[int], vocab: int, fail_at: int) -> None:
        super().__init__(torch, script, vocab)
        self.fail_at = fail_at

    def __call__(self, input_ids: Any, cache: Any, use_cache: bool) -> Any:
        if self.calls == self.fail_at:
            self.calls += 1  # fail once
            raise RuntimeError("CUDA out of memory")
        return super().__call__(input_ids, cache, use_cache)


class ServerTokenizer(CharTokenizer):
    eos_token_id = 0
    bos_token_id = 1
    chat_template = "{{ messages }}"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ids("".join(ch for ch in text.lower() if ch in TABLE[1:]))}

    def apply_chat_template(self, messages: list, **kwargs: Any) -> str:
        return " ".join(m["content"] for m in messages)


class Event:
    def __init__(self, path: str, body: dict, method: str = "POST") -> None:
        self.path, self.method, self.body = path, method, json.dumps(body).encode()
        self.headers: dict = {}
        self.query: dict = {}


def scripted_server(model: Any, max_concurrent: int = 1, aliases: str = "", queued: int = 0,
                    wait: float = 30.0) -> Any:
    model.config = types.SimpleNamespace(max_position_embeddings=64)
    model.generation_config = types.SimpleNamespace(eos_token_id=0)
    config = api.ServerConfig.from_env(
        {"MODEL_NAME": "scripted", "MAX_CONCURRENT_GENERATIONS": str(max_concurrent),
         "MODEL_ALIASES": aliases, "MAX_QUEUED_GENERATIONS": str(queued),
         "MAX_QUEUE_WAIT": str(wait)}, "unused")
    return api.OpenAIServer(model, ServerTokenizer(TABLE), config)


CONTEXT = types.SimpleNamespace(hostname="h", cancelled=threading.Event())


def test_a_failing_model_is_a_json_500_and_frees_its_slot(caplog: pytest.LogCaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(FailingModel(torch, ids("ok"), len(TABLE), fail_at=1))
    with caplog.at_level(logging.INFO):
        res = server.handle(Event("/v1/completions", {"prompt": "hi"}), CONTEXT)
    assert res["statusCode"] == 500 and res["body"]["error"]["type"] == "server_error"
    assert any("generation_failed" in r.getMessage() for r in caplog.records)
    # The slot came back: the next request (the model works again) is served.
    res = server.handle(Event("/v1/completions", {"prompt": "hi", "max_tokens": 1}), CONTEXT)
    assert res["statusCode"] == 200


def test_a_stream_that_fails_ends_with_an_in_band_error() -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(FailingModel(torch, ids("abc"), len(TABLE), fail_at=2))
    res = server.handle(
        Event(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
        CONTEXT,
    )
    items = list(res["body"])
    res["body"].close()
    assert items[-2]["error"]["type"] == "server_error" and items[-1] == "[DONE]"
    assert [i["choices"][0]["delta"].get("content") for i in items[1:-2]] == ["a", "b"]


def test_without_a_queue_a_second_generation_is_a_503_until_the_first_ends() -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(ScriptedModel(torch, ids("abcdefgh"), len(TABLE)))
    first = server.handle(Event("/v1/completions", {"prompt": "x", "stream": True}), CONTEXT)
    stream = iter(first["body"])
    next(stream)  # generating
    busy = server.handle(Event("/v1/completions", {"prompt": "y"}), CONTEXT)
    assert busy["statusCode"] == 503 and busy["headers"]["Retry-After"] == "1"
    assert busy["body"]["error"]["code"] == "overloaded"
    first["body"].close()  # the client left
    again = server.handle(Event("/v1/completions", {"prompt": "y", "max_tokens": 2}), CONTEXT)
    assert again["statusCode"] == 200 and again["body"]["usage"]["completion_tokens"] == 2


def _in_thread(fn: Any) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


def test_a_queued_request_waits_for_the_slot_and_is_answered() -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(ScriptedModel(torch, ids("abcdefgh"), len(TABLE)), queued=1)
    first = server.handle(Event("/v1/completions", {"prompt": "x", "stream": True}), CONTEXT)
    stream = iter(first["body"])
    next(stream)  # generating: the only slot is taken
    thread, out = _in_thread(lambda: server.handle(
        Event("/v1/completions", {"prompt": "y", "max_tokens": 2}), CONTEXT))
    wait_until(lambda: server._admission.waiting == 1, timeout=10, what="the second to queue")
    full = server.handle(Event("/v1/completions", {"prompt": "z"}), CONTEXT)
    assert full["statusCode"] == 503 and full["headers"]["Retry-After"] == "1"
    assert full["body"]["error"]["code"] == "overloaded"
    assert not out  # still waiting
    first["body"].close()
    thread.join(10)
    assert out and out[0]["statusCode"] == 200
    assert out[0]["body"]["usage"]["completion_tokens"] == 2


def test_a_wait_past_its_bound_is_a_503_and_leaves_the_queue() -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(ScriptedModel(torch, ids("abcdefgh"), len(TABLE)), queued=2,
                             wait=0.2)
    first = server.handle(Event("/v1/completions", {"prompt": "x", "stream": True}), CONTEXT)
    next(iter(first["body"]))
    late = server.handle(Event("/v1/completions", {"prompt": "y"}), CONTEXT)
    assert late["statusCode"] == 503 and late["headers"]["Retry-After"] == "1"
    assert "within 0.2 s" in late["body"]["error"]["message"]
    assert server._admission.waiting == 0
    first["body"].close()


def test_a_client_that_leaves_while_queued_frees_its_place() -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(ScriptedModel(torch, ids("abcdefgh"), len(TABLE)), queued=1)
    first = server.handle(Event("/v1/completions", {"prompt": "x", "stream": True}), CONTEXT)
    next(iter(first["body"]))
    gone = types.SimpleNamespace(hostname="h", cancelled=threading.Event())
    thread, out = _in_thread(lambda: server.handle(
        Event("/v1/completions", {"prompt": "y"}), gone))
    wait_until(lambda: server._admission.waiting == 1, timeout=10, what="the second to queue")
    gone.cancelled.set()
    thread.join(10)
    assert out and out[0]["statusCode"] == 499
    assert server._admission.waiting == 0 and server._admission.running == 1
    first["body"].close()
    assert server._admission.running == 0


def test_slots_go_to_waiters_in_arrival_order() -> None:
    admission = load("admission")
    gate = admission.Admission(1, 3, 30.0)
    held = gate.enter()
    order: list[int] = []
    threads = []
    for i in range(3):
        def take(i: int = i) -> None:
            slot = gate.enter(threading.Event())
            order.append(i)
            slot.release()
        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        threads.append(thread)
        wait_until(lambda i=i: gate.waiting == i + 1, timeout=10, what=f"waiter {i} to queue")
    with pytest.raises(admission.Busy) as caught:
        gate.enter()  # the queue is full: refused at once
    assert caught.value.reason == "queue_full"
    held.release()
    held.release()  # idempotent: one slot is freed once
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2]
    assert gate.running == 0 and gate.waiting == 0


class NeverCalled:
    """A model that fails the test if a request reaches it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unserved model name reached the model")


@pytest.mark.parametrize(
    "event",
    [
        Event("/v1/chat/completions",
              {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        Event("/v1/completions", {"model": "gpt-4o", "prompt": "hi"}),
        Event("/v1/models/gpt-4o", {}, method="GET"),
    ],
)
def test_a_model_that_is_not_served_is_a_404_model_not_found(event: Any) -> None:
    server = scripted_server(NeverCalled())
    res = server.handle(event, CONTEXT)
    assert res["statusCode"] == 404
    error = res["body"]["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "model_not_found", "model", "invalid_request_error")
    assert "'gpt-4o' does not exist" in error["message"]
    assert "'scripted'" in error["message"]


@pytest.mark.parametrize(("aliases", "name"), [("gpt-4o", "gpt-4o"), ("*", "any-name"),
                                               ("", "scripted"), ("", None)])
def test_served_names_aliases_and_any_name_are_answered(aliases: str, name: str | None) -> None:
    torch = pytest.importorskip("torch")
    server = scripted_server(ScriptedModel(torch, ids("ab"), len(TABLE)), aliases=aliases)
    body: dict[str, Any] = {"prompt": "x", "max_tokens": 2}
    if name is not None:
        body["model"] = name
    res = server.handle(Event("/v1/completions", body), CONTEXT)
    assert res["statusCode"] == 200
    assert res["body"]["model"] == "scripted"  # the model that answered, as OpenAI reports it
    if name is not None:
        card = server.handle(Event(f"/v1/models/{name}", {}, method="GET"), CONTEXT)
        assert card["statusCode"] == 200 and card["body"]["id"] == "scripted"


def test_the_tracers_default_samples_are_answered_not_rejected() -> None:
    """A build traces these when a function has no samples/: a 404 would warm up nothing."""
    from fwatchdog.tracer.function import DEFAULT_SAMPLES, parse_sample

    torch = pytest.importorskip("torch")
    for i, raw in enumerate(DEFAULT_SAMPLES):
        sample = parse_sample(f"default-{i}", raw)
        server = scripted_server(ScriptedModel(torch, ids("ab"), len(TABLE)))
        event = types.SimpleNamespace(path=sample.path, method=sample.method, body=sample.body,
                                      headers=sample.headers, query=sample.query)
        res = server.handle(event, CONTEXT)
        assert res["statusCode"] == 200, res["body"]


# ------------------------------------------------------------ incremental decoding


class ByteTokenizer:
    """Byte-level ids (0-255) decoded like SentencePiece: one leading space dropped."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = bytes(i for i in ids if i < 256).decode("utf-8", "replace")
        return text[1:] if text.startswith(" ") else text


@given(st.lists(st.one_of(st.integers(0, 255),
                          st.sampled_from(list(" aé€😀".encode())),
                          st.just(300)),  # a special token, skipped
                max_size=40))
def test_incremental_decoding_gives_the_full_decode_at_every_step(tokens: list[int]) -> None:
    tokenizer = ByteTokenizer()
    decoder = generation.IncrementalDecoder(tokenizer)
    committed = ""
    for n, token in enumerate(tokens, 1):
        new, pending = decoder.push(token)
        committed += new
        assert committed + pending == tokenizer.decode(tokens[:n])
        assert not new.endswith("\ufffd")  # a partial character is never committed
