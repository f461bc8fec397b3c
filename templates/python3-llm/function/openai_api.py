"""An OpenAI-compatible API over a Hugging Face causal LM, for the python3-llm handler.

``OpenAIServer(model, tokenizer, config).handle(event, context)`` answers
``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` and
``GET /v1/models/<id>`` in the python3-http return convention (a dict
``{statusCode, headers, body}``; a streamed body is an iterator the template's
``index.py`` writes as server-sent events). This module is the wire protocol:
validation, errors, response and chunk shapes. The token loop is ``generation.py``.

Invariants:
- A request whose ``model`` is neither the served name nor an accepted alias is a
  404 ``model_not_found`` and never reaches the model; no ``model`` means the
  served one.
- Every failure the client caused is a 4xx with OpenAI's error JSON
  ``{"error": {"message", "type", "param", "code"}}``; nothing it sends reaches the
  model before validation passed (types, ranges, UTF-8, context length).
- Concurrent generations share one continuous batch (``batching.py``) unless
  ``BATCHING=off`` or the installed transformers cannot batch (then each runs alone,
  in its request's thread; the log says which at start-up). A request's output does
  not depend on the batch around it, except the draws of an unseeded sampled one.
- At most ``config.max_concurrent`` generations run at once; up to
  ``config.max_queued`` more wait for a slot, first come first served, for at most
  ``config.max_queue_wait`` seconds (``admission.py``). A 503 ``overloaded`` with
  ``Retry-After`` answers only a request that finds the queue full or whose wait
  ran out. A slot is released exactly once, *before* the last byte of the
  answer is produced and before the generation's end is logged, so a client that
  got its answer (or saw the log) can start the next request without a race.
- A disconnected client stops its generation at the next token: the template sets
  ``context.cancelled`` and closes the streamed iterator.
- Importing this module does not import torch (tests and tools parse requests cheaply).

Why validation is written out here rather than declared as pydantic models: the
checks are few and each one's OpenAI wording and ``param`` matter to clients
(``messages[2].content``, ``stream_options.include_usage``); a model would need
a translation layer from pydantic's error locations and messages back to that
envelope, and custom validators for what is stricter than types (booleans are not
integers, lone surrogates refused, at most four stop sequences, ``n`` only 1,
explicit nulls meaning "not given"), so it would not be shorter. And importing
pydantic and building the models costs 130-200 ms in each fresh handler process
on the development machine, a start-up cost this template exists to remove.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from . import batching
from .admission import Admission, Busy, Left, Slot
from .generation import Generation, SamplingParams

LOG = logging.getLogger("openai_api")

MAX_STOP_SEQUENCES = 4
HTTP_THREADS = 32  # the handler server's default http_threads
BATCHED_SLOTS = 16  # default generations at once when they share a batch
ALONE_SLOTS = 2  # ... and when each runs alone (BATCHING=off, or none available)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServerConfig:
    """What the API needs to know beyond the model; built only by :meth:`from_env`."""

    model_name: str
    # Other names a request's "model" may give (MODEL_ALIASES); any name with any_model.
    aliases: frozenset[str] = frozenset()
    any_model: bool = False
    # Generations at once; None: BATCHED_SLOTS when batching runs, else ALONE_SLOTS.
    max_concurrent: int | None = None
    max_queued: int = 8  # requests that may wait for a generation slot
    max_queue_wait: float = 30.0  # seconds one may wait before it is a 503
    default_max_tokens: int = 512
    max_context: int | None = None  # None: the model's max_position_embeddings
    batching: bool = True  # BATCHING=continuous (default) or off
    kv_cache_tokens: int = 16384  # the batch's KV cache (KV_CACHE_TOKENS)
    cuda_graphs: bool = True  # the batch replays CUDA graphs on a GPU (CUDA_GRAPHS=on|off)

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_name: str) -> ServerConfig:
        """Read ``MODEL_NAME``, ``MODEL_ALIASES``, ``MAX_CONCURRENT_GENERATIONS``,
        ``MAX_QUEUED_GENERATIONS``, ``MAX_QUEUE_WAIT``, ``DEFAULT_MAX_TOKENS`` and
        ``MAX_MODEL_LEN``; a bad value raises ``ValueError`` naming every one. A
        waiting request holds one of the server's ``http_threads`` (default 32), so
        ``MAX_CONCURRENT_GENERATIONS + MAX_QUEUED_GENERATIONS`` may not exceed it:
        past it, requests would wait for a thread with no bound and no 503.

        ``MODEL_ALIASES`` is a comma-separated list of further names a request may
        ask for (``gpt-4o,gpt-4o-mini``), or ``*`` for any name."""
        errors: list[str] = []

        def whole(name: str, default: int | None, minimum: int = 1) -> int | None:
            raw = env.get(name, "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                value = minimum - 1
            if value < minimum:
                errors.append(f"{name}={raw!r} must be a positive integer" if minimum == 1
                              else f"{name}={raw!r} must be a whole number >= {minimum}")
                return default
            return value

        max_concurrent = whole("MAX_CONCURRENT_GENERATIONS", None)
        max_queued = whole("MAX_QUEUED_GENERATIONS", cls.max_queued, minimum=0)
        assert max_queued is not None
        max_queue_wait = cls.max_queue_wait
        raw = env.get("MAX_QUEUE_WAIT", "").strip()
        if raw:
            try:
                max_queue_wait = float(raw.removesuffix("s"))
            except ValueError:
                max_queue_wait = -1.0
            if not 0 <= max_queue_wait < float("inf"):
                errors.append(f"MAX_QUEUE_WAIT={raw!r} must be seconds >= 0 (30 or 30s)")
                max_queue_wait = cls.max_queue_wait
        threads_raw = env.get("http_threads", "").strip()
        # handler_server.Config's own default; a bad value is that server's error to give.
        threads = int(threads_raw) if threads_raw.isdigit() else HTTP_THREADS
        slots = max_concurrent if max_concurrent is not None else BATCHED_SLOTS
        if slots + max_queued > threads:
            errors.append(f"MAX_CONCURRENT_GENERATIONS + MAX_QUEUED_GENERATIONS = "
                          f"{slots} + {max_queued} exceeds http_threads={threads}: "
                          "each running or waiting request holds a thread")
        batching_raw = env.get("BATCHING", "").strip().lower() or "continuous"
        if batching_raw not in ("continuous", "off"):
            errors.append(f"BATCHING={env['BATCHING']!r} must be 'continuous' or 'off'")
        kv_cache_tokens = whole("KV_CACHE_TOKENS", cls.kv_cache_tokens)
        graphs_raw = env.get("CUDA_GRAPHS", "").strip().lower() or "on"
        if graphs_raw not in ("on", "off"):
            errors.append(f"CUDA_GRAPHS={env['CUDA_GRAPHS']!r} must be 'on' or 'off'")
        default_max_tokens = whole("DEFAULT_MAX_TOKENS", cls.default_max_tokens)
        max_context = whole("MAX_MODEL_LEN", None)
        names = [n.strip() for n in env.get("MODEL_ALIASES", "").split(",")]
        names = [n for n in names if n]
        any_model = "*" in names
        if any_model and len(names) > 1:
            errors.append(f"MODEL_ALIASES={env['MODEL_ALIASES']!r}: '*' (any name) stands alone")
        if errors:
            raise ValueError("; ".join(errors))
        assert default_max_tokens is not None and kv_cache_tokens is not None
        return cls(
            model_name=env.get("MODEL_NAME") or default_name,
            aliases=frozenset(n for n in names if n != "*"),
            any_model=any_model,
            max_concurrent=max_concurrent,
            max_queued=max_queued,
            max_queue_wait=max_queue_wait,
            default_max_tokens=default_max_tokens,
            max_context=max_context,
            batching=batching_raw == "continuous",
            kv_cache_tokens=kv_cache_tokens,
            cuda_graphs=graphs_raw != "off",
        )


    def serves(self, name: str) -> bool:
        """Whether a request's ``model`` names this function's model."""
        return self.any_model or name == self.model_name or name in self.aliases


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An answer in OpenAI's error format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> dict[str, Any]:
        return {"statusCode": self.status, "headers": self.headers, "body": self.body()}


def _invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------- request parsing


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _invalid(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(value, dict):
        raise _invalid("The request body must be a JSON object.")
    return value


def _check_text(value: str, param: str) -> str:
    # JSON escapes can smuggle lone surrogates (\ud800) that no tokenizer accepts.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(f"'{param}' contains an invalid Unicode code point.", param) from None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(obj: Mapping[str, Any], name: str) -> Any:
    # OpenAI clients send explicit nulls for "not given".
    return obj.get(name)


def parse_sampling(obj: Mapping[str, Any]) -> SamplingParams:
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = _optional(obj, name)
        if value is None:
            continue
        if not _is_int(value):
            raise _invalid(f"'{name}' must be an integer.", name)
        if value < 1:
            raise _invalid(f"'{name}' must be at least 1, got {value}.", name)
        # max_completion_tokens is the newer name; it wins when both are sent.
        max_tokens = value

    temperature = _optional(obj, "temperature")
    if temperature is None:
        temperature = 1.0
    elif not _is_number(temperature) or not 0 <= temperature <= 2:
        raise _invalid("'temperature' must be a number between 0 and 2.", "temperature")

    top_p = _optional(obj, "top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p) or not 0 <= top_p <= 1:
        raise _invalid("'top_p' must be a number between 0 and 1.", "top_p")

    stop_value = _optional(obj, "stop")
    if stop_value is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_value, str):
        stop = (stop_value,)
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        stop = tuple(stop_value)
    else:
        raise _invalid("'stop' must be a string or a list of strings.", "stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise _invalid(f"'stop' accepts at most {MAX_STOP_SEQUENCES} sequences.", "stop")
    stop = tuple(_check_text(s, "stop") for s in stop if s)

    seed = _optional(obj, "seed")
    if seed is not None and not _is_int(seed):
        raise _invalid("'seed' must be an integer.", "seed")

    n = _optional(obj, "n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _invalid("Only 'n': 1 is supported.", "n")
    if _optional(obj, "logprobs") not in (None, False, 0):
        raise _invalid("'logprobs' is not supported.", "logprobs")

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        stop=stop,
        seed=seed,
    )


def parse_stream(obj: Mapping[str, Any]) -> tuple[bool, bool]:
    """Return (stream, include_usage)."""
    stream = _optional(obj, "stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", "stream")
    options = _optional(obj, "stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid(
                "'stream_options' is only allowed when 'stream' is true.", "stream_options"
            )
        if not isinstance(options, dict):
            raise _invalid("'stream_options' must be an object.", "stream_options")
        include_usage = options.get("include_usage") or False
        if not isinstance(include_usage, bool):
            raise _invalid(
                "'stream_options.include_usage' must be a boolean.",
                "stream_options.include_usage",
            )
    return stream, include_usage


def parse_model(obj: Mapping[str, Any]) -> str | None:
    """The request's ``model``; None when it names none (the served model then answers)."""
    model = _optional(obj, "model")
    if model is not None and not isinstance(model, str):
        raise _invalid("'model' must be a string.", "model")
    return model


def model_not_found(name: str, served: str) -> APIError:
    """OpenAI's and vLLM's answer to a model name that is not served."""
    return APIError(
        404,
        f"The model '{name}' does not exist. This function serves '{served}' "
        "(its operator can accept other names with MODEL_ALIASES).",
        param="model",
        code="model_not_found",
    )


CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def parse_messages(obj: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = obj.get("messages")
    if messages is None:
        raise _invalid("'messages' is a required property.", "messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty array.", "messages")
    parsed = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(f"'{where}' must be an object.", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _invalid(f"'{where}.role' must be one of {sorted(CHAT_ROLES)}.", f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):
            # Content parts: only text parts exist for a text-only model.
            texts = []
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise _invalid(
                        f"'{where}.content[{j}]' must be a text part.", f"{where}.content"
                    )
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _invalid(
                f"'{where}.content' must be a string or an array of text parts.",
                f"{where}.content",
            )
        # The template maps developer to system: chat templates predate the role.
        parsed.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _check_text(content, f"{where}.content"),
            }
        )
    if obj.get("tools"):
        raise _invalid("'tools' is not supported by this server.", "tools")
    return parsed


def parse_prompt(obj: Mapping[str, Any]) -> str:
    prompt = obj.get("prompt")
    if prompt is None:
        raise _invalid("'prompt' is a required property.", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _invalid("'prompt' must be a string (one prompt per request).", "prompt")
    if _optional(obj, "echo"):
        raise _invalid("'echo' is not supported.", "echo")
    if _optional(obj, "suffix"):
        raise _invalid("'suffix' is not supported.", "suffix")
    return _check_text(prompt, "prompt")


# ---------------------------------------------------------------- the server


class _SSEStream:
    """The streamed body: yields chunk dicts then ``[DONE]``; close() always cleans up."""

    def __init__(self, chunks: Iterator[dict[str, Any] | str], closers: list[Any]) -> None:
        self._chunks = chunks
        self._closers = closers

    def __iter__(self) -> _SSEStream:
        return self

    def __next__(self) -> dict[str, Any] | str:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()  # type: ignore[attr-defined]
        for closer in self._closers:
            closer()


class OpenAIServer:
    """The OpenAI wire protocol for one loaded model."""

    def __init__(self, model: Any, tokenizer: Any, config: ServerConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.created = int(time.time())
        self.max_context = config.max_context or int(
            getattr(model.config, "max_position_embeddings", 2048)
        )
        self._eos_ids = _eos_ids(model, tokenizer)
        self.engine: batching.BatchEngine | None = None
        why_not = "BATCHING=off" if not config.batching else batching.unavailable(model)
        slots = config.max_concurrent or (ALONE_SLOTS if why_not else BATCHED_SLOTS)
        if why_not is None:
            self.engine = batching.BatchEngine(model, max_requests=slots,
                                               kv_tokens=config.kv_cache_tokens,
                                               eos_ids=self._eos_ids,
                                               cuda_graphs=config.cuda_graphs)
            # One request must fit in the batch's KV cache.
            self.max_context = min(self.max_context, config.kv_cache_tokens)
            LOG.info("batching=continuous slots=%d kv_cache_tokens=%d cuda_graphs=%s", slots,
                     config.kv_cache_tokens, "on" if self.engine.cuda_graphs else "off")
        else:
            LOG.info("batching=off slots=%d reason=%r", slots, why_not)
        self._admission = Admission(slots, config.max_queued, config.max_queue_wait)
        # Fast tokenizers may adjust their truncation state while encoding, and the
        # Rust side refuses concurrent mutation ("Already borrowed"): one encode at
        # a time (encoding takes microseconds to milliseconds).
        self._encode_lock = threading.Lock()

    # -- routing

    def handle(self, event: Any, context: Any) -> dict[str, Any]:
        path = (event.path or "/").rstrip("/") or "/"
        method = event.method.upper()
        try:
            if path == "/v1/chat/completions":
                _allow(method, "POST")
                return self.chat_completions(parse_json_object(event.body), context)
            if path == "/v1/completions":
                _allow(method, "POST")
                return self.completions(parse_json_object(event.body), context)
            if path == "/v1/models":
                _allow(method, "GET")
                return _json(200, {"object": "list", "data": [self._model_card()]})
            if path.startswith("/v1/models/"):
                _allow(method, "GET")
                self._check_model(path[len("/v1/models/") :])
                return _json(200, self._model_card())
            raise APIError(
                404,
                f"Invalid URL ({method} {event.path}). This server answers "
                "POST /v1/chat/completions, POST /v1/completions and GET /v1/models.",
                code="not_found",
            )
        except APIError as exc:
            LOG.info("request_rejected status=%d code=%s param=%s", exc.status, exc.code, exc.param)
            return exc.response()
        except Exception as exc:
            # Clients of this API parse errors as JSON, even ours.
            LOG.exception("request_failed path=%s", event.path)
            return APIError(500, f"The server failed: {exc!r}", type="server_error").response()

    def release_gpu(self) -> None:
        """Free what the batch holds on the device (its KV cache and generation
        thread) while the GPU is released; the next request starts them again."""
        if self.engine is not None:
            self.engine.suspend()

    def _check_model(self, name: str | None) -> None:
        if name is not None and not self.config.serves(name):
            raise model_not_found(name, self.config.model_name)

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.config.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "fwatchdog",
            "max_model_len": self.max_context,
        }

    # -- endpoints

    def chat_completions(self, obj: dict[str, Any], context: Any) -> dict[str, Any]:
        self._check_model(parse_model(obj))
        messages = parse_messages(obj)
        params = parse_sampling(obj)
        stream, include_usage = parse_stream(obj)
        if not getattr(self.tokenizer, "chat_template", None):
            raise _invalid("This model has no chat template; use /v1/completions.")
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # the model's Jinja template rejected the messages
            raise _invalid(f"The chat template rejected the messages: {exc}", "messages") from None
        # The chat template already contains any special tokens the model expects.
        with self._encode_lock:
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        max_new_tokens = self._budget(len(prompt_ids), params, "messages")
        return self._respond(
            "chat", prompt_ids, params, max_new_tokens, stream, include_usage, context
        )

    def completions(self, obj: dict[str, Any], context: Any) -> dict[str, Any]:
        self._check_model(parse_model(obj))
        prompt = parse_prompt(obj)
        params = parse_sampling(obj)
        stream, include_usage = parse_stream(obj)
        with self._encode_lock:
            prompt_ids = self.tokenizer(prompt)["input_ids"]
        if not prompt_ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise _invalid("'prompt' must not be empty for this model.", "prompt")
            prompt_ids = [bos]
        max_new_tokens = self._budget(len(prompt_ids), params, "prompt")
        return self._respond(
            "completion", prompt_ids, params, max_new_tokens, stream, include_usage, context
        )

    # -- shared

    def _budget(self, prompt_tokens: int, params: SamplingParams, prompt_param: str) -> int:
        """The completion's token budget, or a 400 naming what is too long."""
        room = self.max_context - prompt_tokens
        if params.max_tokens is not None and params.max_tokens > room:
            raise _invalid(
                f"This model's maximum context length is {self.max_context} tokens. "
                f"However, you requested {prompt_tokens + params.max_tokens} tokens "
                f"({prompt_tokens} in the prompt, {params.max_tokens} in the completion).",
                "max_tokens" if room > 0 else prompt_param,
                "context_length_exceeded",
            )
        if room < 1:
            raise _invalid(
                f"This model's maximum context length is {self.max_context} tokens. "
                f"However, your prompt has {prompt_tokens} tokens.",
                prompt_param,
                "context_length_exceeded",
            )
        return params.max_tokens or min(self.config.default_max_tokens, room)

    def _respond(
        self,
        kind: str,
        prompt_ids: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stream: bool,
        include_usage: bool,
        context: Any,
    ) -> dict[str, Any]:
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            slot = self._admission.enter(
                getattr(context, "cancelled", None),
                lambda position: LOG.info("request_queued id=%s position=%d running=%d",
                                          request_id, position, self._admission.running))
        except Busy as exc:
            LOG.info("request_refused id=%s reason=%s running=%d waiting=%d", request_id,
                     exc.reason, self._admission.running, self._admission.waiting)
            raise APIError(503, str(exc), type="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        except Left:
            LOG.info("request_left_queue id=%s", request_id)
            return {"statusCode": 499, "body": ""}
        if slot.waited_s:
            LOG.info("request_admitted id=%s waited=%.3f", request_id, slot.waited_s)
        generation = Generation(
            self.model,
            self.tokenizer,
            prompt_ids,
            params,
            max_new_tokens,
            self._eos_ids,
            getattr(context, "cancelled", None),
            request_id,
            on_end=slot.release,
            engine=self.engine,
        )
        if stream:
            chunks = self._stream_chunks(kind, request_id, generation, slot, include_usage)
            return {
                "statusCode": 200,
                "headers": {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                "body": _SSEStream(chunks, [generation.close, slot.release]),
            }
        try:
            text = generation.text()
        finally:
            generation.close()
            slot.release()
        if generation.finish_reason is None:
            # Cancelled because the client went away: nobody reads this answer.
            return {"statusCode": 499, "body": ""}
        usage = _usage(generation)
        created = int(time.time())
        if kind == "chat":
            body = {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": self.config.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": generation.finish_reason,
                    }
                ],
                "usage": usage,
            }
        else:
            body = {
                "id": request_id,
                "object": "text_completion",
                "created": created,
                "model": self.config.model_name,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": generation.finish_reason,
                    }
                ],
                "usage": usage,
            }
        return _json(200, body)

    def _stream_chunks(
        self,
        kind: str,
        request_id: str,
        generation: Generation,
        slot: Slot,
        include_usage: bool,
    ) -> Iterator[dict[str, Any] | str]:
        created = int(time.time())
        model = self.config.model_name
        chat = kind == "chat"
        extra: dict[str, Any] = {"usage": None} if include_usage else {}

        def chunk(piece: str | None, finish_reason: str | None, first: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                if piece is not None:
                    delta["content"] = piece
                choice: dict[str, Any] = {"index": 0, "delta": delta}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or ""}
                obj = "text_completion"
            choice["logprobs"] = None
            choice["finish_reason"] = finish_reason
            return {
                "id": request_id,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                **extra,
            }

        if chat:
            yield chunk("", None, first=True)
        try:
            for piece in generation:
                yield chunk(piece, None)
        except Exception as exc:
            # Headers are sent: report in-band as OpenAI does, the client raises it.
            yield APIError(500, f"Generation failed: {exc!r}", type="server_error").body()
            yield "[DONE]"
            return
        if generation.finish_reason is None:
            return  # cancelled: the client is gone
        # Release before the last bytes: a client that saw [DONE] may go again at once.
        slot.release()
        yield chunk(None if chat else "", generation.finish_reason)
        if include_usage:
            yield {
                "id": request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(generation),
            }
        yield "[DONE]"


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise APIError(
            405,
            f"Method {method} is not allowed here; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )


def _json(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": body}


def _usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(i for i in eos if isinstance(i, int))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def default_model_name(model_path: str | os.PathLike[str]) -> str:
    return os.path.basename(os.path.normpath(os.fspath(model_path)))
