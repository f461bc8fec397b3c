"""The python3-llm default handler's continuous batch, with a tiny random Llama on CPU.

Real transformers continuous batching (a paged KV cache and its generation thread),
real forward passes: greedy output is the same alone and batched, every request
keeps its own sampling and length, closing a stream cancels it in the batch, a
seeded sampled request runs beside the batch and repeats, and a suspended batch
(the GPU released) starts again on the next request.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import wait_until
from tests.unit.test_openai_protocol import FUNCTION, load

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

batching = load("batching")
generation = load("generation")

VOCAB = 96
EOS = frozenset({VOCAB - 1})


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the end token's logit is 0, below the best of the others
        model.lm_head.weight[VOCAB - 1] = 0
    return model


@pytest.fixture(scope="module")
def engine(model: Any) -> Iterator[Any]:
    if batching.unavailable(model) is not None:
        pytest.skip(f"no continuous batching here: {batching.unavailable(model)}")
    engine = batching.BatchEngine(model, max_requests=8, kv_tokens=2048, eos_ids=EOS)
    yield engine
    engine.suspend()


class Tokenizer:
    """Token ids as text: each id a word (decoding is all Generation needs)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" t{i}" for i in ids)


def prompts(n: int) -> list[list[int]]:
    return [[(7 * i + j) % (VOCAB - 1) for j in range(3 + 2 * i)] for i in range(n)]


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """The reference: the model's own greedy generate, alone, without the batch."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return [int(t) for t in out[0, len(prompt):]]


def run_all(engine: Any, requests: list[list[int]], n: int, **sampling: Any) -> list[list[int]]:
    streams = [engine.submit(p, n, **({"temperature": 0.0, "top_p": 1.0} | sampling))
               for p in requests]
    return [list(s) for s in streams]


def test_greedy_tokens_are_the_same_alone_and_batched(model: Any, engine: Any) -> None:
    requests = prompts(6)
    alone = [run_all(engine, [p], 12)[0] for p in requests]
    batched = run_all(engine, requests, 12)
    assert batched == alone
    # And they are what the model's own greedy generate gives, token for token.
    assert alone[0] == greedy(model, requests[0], 12)
    assert all(len(tokens) == 12 or tokens[-1] in EOS for tokens in alone)


def test_each_request_keeps_its_own_length_and_sampling(engine: Any) -> None:
    requests = prompts(4)
    streams = [engine.submit(requests[0], 3, temperature=0.0, top_p=1.0),
               engine.submit(requests[1], 9, temperature=1.5, top_p=0.9),
               engine.submit(requests[2], 5, temperature=0.0, top_p=1.0),
               engine.submit(requests[3], 1, temperature=0.7, top_p=1.0)]
    out = [list(s) for s in streams]
    assert all(len(tokens) == n or tokens[-1] in EOS
               for tokens, n in zip(out, [3, 9, 5, 1], strict=True))
    # The greedy ones are unaffected by the sampled ones beside them.
    assert out[0] == run_all(engine, [requests[0]], 3)[0]
    assert out[2] == run_all(engine, [requests[2]], 5)[0]
    assert engine.active == 0


def test_closing_a_stream_cancels_it_in_the_batch(engine: Any) -> None:
    stream = engine.submit(prompts(1)[0], 400, temperature=0.0, top_p=1.0)
    first = next(stream)
    assert isinstance(first, int)
    assert engine.active == 1
    stream.close()
    assert engine.active == 0
    # The batch goes on serving others.
    assert len(run_all(engine, prompts(2), 4)[1]) == 4


def test_a_cancelled_event_ends_a_waiting_stream(engine: Any) -> None:
    cancelled = threading.Event()
    stream = engine.submit(prompts(1)[0], 400, temperature=0.0, top_p=1.0,
                           cancelled=cancelled)
    next(stream)
    cancelled.set()
    rest = list(stream)  # ends within a poll once set, long before 400 tokens
    assert len(rest) < 399
    wait_until(lambda: engine.active == 0, timeout=10, what="the stream to leave the batch")


def test_a_suspended_batch_starts_again_on_the_next_request(engine: Any) -> None:
    before = run_all(engine, prompts(2), 5)
    engine.suspend()
    assert not engine._manager.is_running()
    assert run_all(engine, prompts(2), 5) == before


def _generation(model: Any, engine: Any, prompt: list[int], params: Any,
                cancelled: threading.Event | None = None) -> Any:
    return generation.Generation(model, Tokenizer(), prompt, params, 24, EOS, cancelled,
                                 "req", engine=engine)


def test_generation_gives_the_same_text_batched_or_alone(model: Any, engine: Any) -> None:
    params = generation.SamplingParams(max_tokens=None, temperature=0.0)
    prompt = prompts(3)[2]
    batched = _generation(model, engine, prompt, params)
    alone = _generation(model, None, prompt, params)
    assert batched.text() == alone.text()
    assert (batched.finish_reason, batched.completion_tokens) == ("length", 24)


def test_a_stop_sequence_ends_a_batched_request_and_leaves_the_batch(
        model: Any, engine: Any) -> None:
    prompt = prompts(3)[1]
    full = _generation(model, engine, prompt,
                       generation.SamplingParams(max_tokens=None, temperature=0.0)).text()
    words = full.split()
    stop = f" {words[3]}"  # a token the greedy answer reaches
    cut = _generation(model, engine, prompt, generation.SamplingParams(
        max_tokens=None, temperature=0.0, stop=(stop,)))
    text = cut.text()
    assert cut.finish_reason == "stop" and stop not in text and full.startswith(text)
    assert engine.active == 0


def test_a_seeded_sampled_request_repeats_and_runs_beside_the_batch(
        model: Any, engine: Any) -> None:
    params = generation.SamplingParams(max_tokens=None, temperature=1.3, seed=1234)
    prompt = prompts(2)[1]
    first = _generation(model, engine, prompt, params)
    hold = engine.submit(prompts(1)[0], 300, temperature=0.9, top_p=1.0)  # a busy batch
    next(hold)
    try:
        second = _generation(model, engine, prompt, params)
        assert first.text() == second.text()
    finally:
        hold.close()
    assert engine.active == 0


EXIT_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import transformers
from function.batching import BatchEngine
config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                  attn_implementation="sdpa")
engine = BatchEngine(transformers.LlamaForCausalLM(config).eval(), max_requests=2,
                     kv_tokens=512, eos_ids=frozenset({95}))
print(len(list(engine.submit([1, 2, 3], 3, temperature=0.0, top_p=1.0))))
"""


def test_a_process_with_a_running_batch_exits(tmp_path: Any) -> None:
    """The batch's generation thread runs until stopped; the process must still end
    when its main thread does (a handler's drain, the tracer's run)."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(FUNCTION.parent)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "3"


def test_a_prompt_longer_than_a_step_is_prefilled_in_chunks(
        model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batching, "STEP_TOKENS", 64)
    engine = batching.BatchEngine(model, max_requests=2, kv_tokens=1024, eos_ids=EOS)
    try:
        prompt = [(5 * j + 1) % (VOCAB - 1) for j in range(200)]  # four steps' worth
        assert run_all(engine, [prompt], 8)[0] == greedy(model, prompt, 8)
    finally:
        engine.suspend()


def test_only_requests_the_batch_did_not_end_are_cancelled_in_it(
        engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cancelled: list[str] = []
    real = engine._manager.cancel_request
    monkeypatch.setattr(engine._manager, "cancel_request",
                        lambda rid: (cancelled.append(rid), real(rid)))
    finished = engine.submit(prompts(1)[0], 4, temperature=0.0, top_p=1.0)
    assert len(list(finished)) == 4
    left = engine.submit(prompts(1)[0], 400, temperature=0.0, top_p=1.0)
    next(left)
    left.close()
    assert cancelled == [left.request_id]


def test_a_batch_that_fails_here_falls_back_to_running_alone(
        model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A device or release where the batch cannot run: every request is still answered,
    alone, and after a few failures the batch is given up for good."""
    engine = batching.BatchEngine(model, max_requests=2, kv_tokens=1024, eos_ids=EOS)
    real = model.forward

    @functools.wraps(real)  # the same signature: the token loop inspects it
    def forward(*args: Any, **kwargs: Any) -> Any:
        if "logits_indices" in kwargs:  # a batched step
            raise RuntimeError("no paged attention on this device")
        return real(*args, **kwargs)

    params = generation.SamplingParams(max_tokens=None, temperature=0.0)
    prompt = prompts(3)[2]
    expected = _generation(model, None, prompt, params).text()
    monkeypatch.setattr(model, "forward", forward)
    try:
        for _ in range(batching.FAILURES_TO_DISABLE + 1):
            with caplog.at_level("WARNING", logger="generation"):
                assert _generation(model, engine, prompt, params).text() == expected
        assert engine.disabled is not None and "no paged attention" in engine.disabled
        # Retried alone while the batch was tried; once given up, it is not offered.
        retried = [r for r in caplog.records if "generation_batch_failed" in r.getMessage()]
        assert 1 <= len(retried) <= batching.FAILURES_TO_DISABLE
        with pytest.raises(batching.BatchUnavailable):
            engine.submit(prompt, 4, temperature=0.0, top_p=1.0)
    finally:
        engine.suspend()


def test_a_batch_that_cannot_start_runs_the_request_alone(
        model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    engine = batching.BatchEngine(model, max_requests=2, kv_tokens=1024, eos_ids=EOS)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no paged attention here")

    params = generation.SamplingParams(max_tokens=None, temperature=0.0)
    prompt = prompts(2)[1]
    expected = _generation(model, None, prompt, params).text()
    monkeypatch.setattr(engine._manager, "switch_to_cb_friendly_attn", refuse, raising=False)
    try:
        with caplog.at_level("WARNING", logger="generation"):
            assert _generation(model, engine, prompt, params).text() == expected
        assert any("generation_batch_failed" in r.getMessage() and "no paged attention" in
                   r.getMessage() for r in caplog.records)
        assert engine.active == 0 and engine.disabled is None
    finally:
        engine.suspend()


@pytest.fixture
def paged_names() -> Iterator[dict[str, list[Any]]]:
    """A made-up attention function and its paged variant, registered as transformers
    before 5.23 registers its own (and removed afterwards)."""
    from transformers.modeling_utils import AttentionInterface

    calls: dict[str, list[Any]] = {"plain": [], "paged": []}

    def plain(module: Any, q: Any, k: Any, v: Any, mask: Any, **kwargs: Any) -> Any:
        calls["plain"].append((mask, kwargs))
        return "plain", None

    def paged(module: Any, q: Any, k: Any, v: Any, mask: Any, **kwargs: Any) -> Any:
        calls["paged"].append((mask, kwargs))
        return "paged", None

    mapping = AttentionInterface._global_mapping
    mapping.update({"fwtest": plain, "paged|fwtest": paged})
    try:
        yield calls
    finally:
        mapping.pop("fwtest", None)
        mapping.pop("paged|fwtest", None)


def test_a_paged_attention_function_lets_a_forward_without_the_batch_cache_through(
        paged_names: dict[str, list[Any]]) -> None:
    from transformers.generation.continuous_batching import PagedAttentionCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batching.let_standard_forwards_through()
    wrapped = ALL_ATTENTION_FUNCTIONS["paged|fwtest"]
    batching.let_standard_forwards_through()  # once only
    assert ALL_ATTENTION_FUNCTIONS["paged|fwtest"] is wrapped
    # A forward run alone: no cache, or a cache that is not the batch's.
    assert wrapped(None, 1, 2, 3, "mask", dropout=0.0, cache=None) == ("plain", None)
    assert wrapped(None, 1, 2, 3, None, cache="dynamic", scaling=0.5) == ("plain", None)
    assert paged_names["plain"] == [("mask", {"dropout": 0.0}),
                                    (None, {"cache": "dynamic", "scaling": 0.5})]
    # The batch's own forward carries its paged cache.
    cache = object.__new__(PagedAttentionCache)
    assert wrapped(None, 1, 2, 3, "mask4d", cache=cache) == ("paged", None)
    assert paged_names["paged"] == [("mask4d", {"cache": cache})]


def test_a_sliding_window_model_is_not_batched_where_paged_names_drop_its_window(
        paged_names: dict[str, list[Any]]) -> None:
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, sliding_window=16, attn_implementation="sdpa")
    sliding = transformers.MistralForCausalLM(config).eval()
    reason = batching.unavailable(sliding)
    assert reason is not None and "sliding window" in reason
    full = transformers.MistralConfig(**{**config.to_dict(), "sliding_window": None})
    assert batching.unavailable(transformers.MistralForCausalLM(full).eval()) is None
