"""The token loop behind the OpenAI API: sampling, stop sequences, cancellation.

``Generation`` is an iterator of text pieces; whoever iterates it runs the model,
or, given a ``BatchEngine`` (``batching.py``), waits for the request's tokens from
the shared batch. Text, stop sequences, finish reasons and logs are the same either
way: only where the tokens come from differs.

Invariants:
- It stops at the next token when closed or when ``cancelled`` (a
  ``threading.Event``) is set, and then logs ``generation_cancelled``; a finished
  run logs ``generation_finished``. ``on_end`` (the concurrency slot's release) runs
  exactly once, before either line is logged, whatever ended the run.
- Inference mode is entered per forward step, never held across a ``yield``:
  successive steps may run on different threads and grad mode is thread-local.
- Run alone, sampling uses a per-request ``torch.Generator`` (seeded from ``seed``
  when given): no global RNG state is read or changed. A sampled request with a
  ``seed`` always runs alone (beside the batch), so its output is reproducible; the
  batch samples with its own generator.
- A batched request leaves the batch (is cancelled there) as soon as the
  generation ends for any reason: stop text, the client leaving, an error.
- Stop text never reaches the output: text that could be the start of a stop
  sequence is held back until it is known not to be.
- The completion is decoded incrementally (:class:`IncrementalDecoder`): each
  step decodes a window of the last few tokens, not the whole completion, so a
  long answer costs linear, not quadratic, decoding time. The text it yields is
  what decoding the whole completion at each step would give.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a generation starts, so parsing stays light
    import torch

    from .batching import BatchEngine

LOG = logging.getLogger("generation")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None  # None: up to the default, bounded by the context
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class IncrementalDecoder:
    """The decoded text of a growing list of tokens, one window at a time.

    The window starts at the token that began the last committed text, so
    whatever a tokenizer does at the start of a decode (SentencePiece drops a
    leading space) happens to text that is already committed, and the new text
    is the difference of two decodes of a few tokens. Text ending in U+FFFD (a
    character whose bytes are not all there yet) stays pending until the next
    token completes it.

    :meth:`push` returns ``(committed, pending)``: text to append for good, and
    the uncommitted tail after it. The committed texts so far plus the latest
    pending text are the decode of every token pushed.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: the first token of the last committed text
        self._read = 0  # tokens up to here are committed
        self._chars = 0  # characters committed

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token: int) -> tuple[str, str]:
        ids = self._ids
        ids.append(token)
        before = self._decode(ids[self._prefix:self._read])
        now = self._decode(ids[self._prefix:])
        # A tokenizer whose window decode is not a prefix: decode it all, this once.
        new = now[len(before):] if now.startswith(before) else self._decode(ids)[self._chars:]
        if new and not new.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(ids)
            self._chars += len(new)
            return new, ""
        return "", new


class Generation:
    """Iterate to get text pieces; afterwards ``finish_reason`` and token counts hold.

    Stop sequences are found in the decoded text; a piece that might be the start
    of one is held back until it is known not to be, so stop text never leaks out.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        eos_ids: frozenset[int],
        cancelled: threading.Event | None,
        request_id: str,
        on_end: Callable[[], None] = lambda: None,
        engine: BatchEngine | None = None,
    ) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._model = model
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._params = params
        self._max_new_tokens = max_new_tokens
        self._eos_ids = eos_ids
        self._cancelled = cancelled
        self._request_id = request_id
        self._on_end = on_end
        self._engine = engine
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()

    def text(self) -> str:
        return "".join(self._pieces)

    def _next_token(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        import torch

        params = self._params
        if params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            drop = cumulative - sorted_probs >= params.top_p
            drop[0] = False
            sorted_probs[drop] = 0
            choice = torch.multinomial(sorted_probs, 1, generator=generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _steps(self) -> Generator[int, None, None]:
        """The model's next tokens, one forward step each, in this thread."""
        import torch
        from transformers import DynamicCache

        model, params = self._model, self._params
        device = model.device
        generator = torch.Generator(device=device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        cache = DynamicCache()
        kwargs: dict[str, Any] = {_cache_kwarg(model): cache, **_last_logits_only(model)}
        next_input = torch.tensor([self._prompt_ids], device=device)
        while True:
            with torch.inference_mode():
                out = model(input_ids=next_input, use_cache=True, **kwargs)
                token = self._next_token(out.logits[0, -1], generator)
            yield token
            next_input = torch.tensor([[token]], device=device)

    def _tokens(self) -> Iterator[int]:
        """The batch's tokens for this request, or this thread's own steps: a request
        with a seed samples from its own generator, which a batch cannot give it."""
        from .batching import BatchError, BatchUnavailable

        params = self._params
        if self._engine is None or (params.seed is not None and params.temperature > 0):
            return self._steps()
        try:
            return self._engine.submit(self._prompt_ids, self._max_new_tokens,
                                       temperature=params.temperature, top_p=params.top_p,
                                       cancelled=self._cancelled)
        except BatchUnavailable:
            return self._steps()
        except BatchError as exc:  # the batch could not take it: nothing was generated
            LOG.warning("generation_batch_failed id=%s error=%r retried=alone",
                        self._request_id, str(exc))
            return self._steps()

    def _next(self, tokens: Iterator[int],
              generated: list[int]) -> tuple[int | None, Iterator[int]]:
        """The next token, and the source to read from now: a request the batch failed
        before its first token runs alone instead."""
        from .batching import BatchError

        try:
            return next(tokens, None), tokens
        except BatchError as exc:
            if generated:
                raise
            LOG.warning("generation_batch_failed id=%s error=%r retried=alone",
                        self._request_id, str(exc))
            alone = self._steps()
            return next(alone), alone

    def _run(self) -> Generator[str, None, None]:
        params = self._params
        generated: list[int] = []
        decoder = IncrementalDecoder(self._tokenizer)
        committed = ""  # grows by appending: linear overall
        text = ""  # the decoded completion: committed + the pending tail
        emitted = 0  # characters of the decoded completion already yielded
        matched_stop = False
        started = time.monotonic()
        error: BaseException | None = None
        tokens: Iterator[int] = iter(())
        try:
            tokens = self._tokens()
            while len(generated) < self._max_new_tokens:
                if self._cancelled is not None and self._cancelled.is_set():
                    return
                token, tokens = self._next(tokens, generated)
                if token is None:
                    if self._cancelled is not None and self._cancelled.is_set():
                        return
                    raise RuntimeError("the batch ended the request before its end")
                if token in self._eos_ids:
                    self.finish_reason = "stop"
                    break
                generated.append(token)
                self.completion_tokens = len(generated)
                new, pending = decoder.push(token)
                committed += new
                text = committed + pending if pending else committed
                cut = _find_stop(text, params.stop, emitted)
                if cut is not None:
                    self.finish_reason = "stop"
                    matched_stop = True
                    if cut > emitted:
                        yield text[emitted:cut]
                    emitted = cut
                    break
                safe = _safe_end(text, params.stop)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
            else:
                self.finish_reason = "length"
            # Flush what was held back (a would-be stop prefix, a partial character).
            if not matched_stop and len(text) > emitted:
                yield text[emitted:]
        except Exception as exc:  # the model failed (out of memory, a bad kernel)
            error = exc
            raise
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # a batched request leaves the batch at once
            # Before the log line: whoever sees the line may reuse the slot at once.
            self._on_end()
            seconds = time.monotonic() - started
            if error is not None:
                LOG.error(
                    "generation_failed id=%s completion_tokens=%d error=%r",
                    self._request_id,
                    self.completion_tokens,
                    error,
                )
            elif self.finish_reason is None:
                LOG.info(
                    "generation_cancelled id=%s completion_tokens=%d seconds=%.3f",
                    self._request_id,
                    self.completion_tokens,
                    seconds,
                )
            else:
                LOG.info(
                    "generation_finished id=%s finish_reason=%s prompt_tokens=%d "
                    "completion_tokens=%d seconds=%.3f",
                    self._request_id,
                    self.finish_reason,
                    self.prompt_tokens,
                    self.completion_tokens,
                    seconds,
                )


def _cache_kwarg(model: Any) -> str:
    """The forward() argument that takes the KV cache: ``cache`` in recent transformers
    releases, ``past_key_values`` before. The wrong one would be silently
    swallowed by ``**kwargs`` and every step would forget the context."""
    parameters = inspect.signature(getattr(model, "forward", model)).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _last_logits_only(model: Any) -> dict[str, int]:
    """The forward() argument that computes logits for the last position only
    (``logits_to_keep``, ``num_logits_to_keep`` in 4.45 - 4.49), where the model has
    one: a prompt's other positions would cost a (length x vocabulary) matrix, 2 GB
    for 8000 tokens of a Llama 3 vocabulary in bf16, for nothing."""
    parameters = inspect.signature(getattr(model, "forward", model)).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Index where the earliest stop sequence starts, searching only new text."""
    best = None
    for stop in stops:
        # A stop may straddle what was emitted and what is new, but never starts
        # inside emitted text (that text was checked not to begin one).
        i = text.find(stop, max(0, emitted - len(stop) + 1))
        if i != -1 and (best is None or i < best):
            best = i
    return best


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of ``text`` can be emitted without risking part of a stop sequence."""
    end = len(text)
    # An incomplete multi-byte character decodes to U+FFFD until its last token.
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text.endswith(stop[:k], 0, end):
                hold = max(hold, k)
                break
    return end - hold
