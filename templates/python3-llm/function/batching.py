"""One continuous batch per model: concurrent requests share each forward step.

``BatchEngine(model, ...)`` runs transformers' own continuous batching
(``ContinuousBatchingManager``: a paged KV cache, a scheduler, one generation
thread); :meth:`BatchEngine.submit` adds a request and returns a
:class:`BatchStream`, an iterator of the request's token ids as they are made.
Requests join and leave the batch between steps. ``generation.py`` turns the
tokens into text, stop sequences and finish reasons, as for a request run alone.

Invariants:
- Every request keeps its own sampling: the manager samples, and each request
  passes its temperature, top-p and top-k (greedy is top-k 1: only the most likely
  token keeps any probability, whatever the batch around it). The manager draws
  from one shared random generator, so a sampled request's tokens depend on the
  batch; a request that asks for a ``seed`` is not batched (``generation.py``).
- One dispatcher thread reads the manager's results and hands each to its
  request's queue; a request's thread waits only on its own queue, polling its
  ``cancelled`` event. Closing a stream (the client left, a stop sequence was
  found, the request ended) cancels it in the manager at once, and its later
  results are dropped.
- The manager is started on the first request after the engine was made or
  :meth:`suspend` ed; :meth:`suspend` stops it and frees its KV cache, which is
  what a GPU release needs.
- A batch that does not work here never takes the function down: a request it
  fails ends with :class:`BatchError` (``generation.py`` then runs it alone when it
  had no token yet), and after :data:`FAILURES_TO_DISABLE` failures in a row, or
  when its generation thread dies, the engine gives the batch up for the process's
  life (``disabled`` says why; the log says ``batching_disabled``) and every
  request runs alone.
- A request run alone shares the model with the batch. From the engine's making
  until the manager stops, the model's attention implementation is the manager's
  paged one (``paged|sdpa``), which before transformers 5.23 refuses any forward
  without the batch's paged cache; :func:`let_standard_forwards_through` makes each
  ``paged|<impl>`` function hand such a forward to ``<impl>`` itself. It changes
  nothing for the batch's own forwards. Those releases also build no mask for a
  ``paged|`` name, so a request run alone gets plain causal attention: right for
  full attention, not for a sliding window, and :func:`unavailable` refuses to batch
  a model with sliding-window layers there.
- On CUDA the batch replays CUDA graphs (``cuda_graphs``, on by default): each
  step shape is captured once, at its first use, and a suspend drops them with the
  rest of the batch (the first steps after a wake capture them again). Elsewhere
  the batch runs eagerly.
- Its threads are daemons: a process with a batch exits like one without.
- The KV cache is bounded (``kv_tokens``): with several handlers on one GPU, none
  may take the device's free memory for its cache, which the manager would
  otherwise size from.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import queue
import threading
from typing import Any

LOG = logging.getLogger("batching")

POLL_S = 0.05  # how often a waiting request looks at its cancelled event
PAGE_TOKENS = 256  # tokens per page of the paged KV cache
# Tokens one forward step takes (longer prompts are prefilled in chunks): it sizes the
# step's activations and attention masks, which transformers would otherwise size for
# 8192 tokens.
STEP_TOKENS = 2048
# With CUDA graphs, a step's shape is padded so a few graphs serve every step: the
# queries to a multiple of Q_PAD_TOKENS, the keys and values read to one of a page.
# Finer padding wastes less of a step and captures more graphs (one each, lazily, at
# its first step); measured on an H200, 8B bf16 sdpa: 8 and 256 gave 97 tokens/s for
# one stream and 1238 over 32, 32 and 1024 gave 81 and 1166, no graphs 31 and 946.
Q_PAD_TOKENS = 8


class BatchError(RuntimeError):
    """The batch failed this request (its generation thread died, or it refused it)."""


class BatchUnavailable(BatchError):
    """Batching is off in this process since it kept failing; run the request alone."""


FAILURES_TO_DISABLE = 3  # requests the batch failed in a row before it is given up


def unavailable(model: Any) -> str | None:
    """Why this model cannot be served by a continuous batch here, or None."""
    if not callable(getattr(model, "init_continuous_batching", None)):
        return "this transformers release has no continuous batching"
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    except ImportError:
        return "this transformers release has no ContinuousBatchingConfig"
    if "per_request_processors" not in inspect.signature(ContinuousBatchingConfig).parameters:
        return "this transformers release has no per-request sampling in its batches"
    if _paged_names_registered() and _has_sliding_layers(model.config.get_text_config()):
        return ("this transformers release (before 5.23) would drop the sliding window "
                "of a request run beside the batch")
    implementation = getattr(model.config, "_attn_implementation", None)
    if implementation != "sdpa" and "flash" not in str(implementation):
        # The manager would switch the model to its paged variant, and a request
        # run outside the batch (a seeded one) needs the ordinary one.
        return f"the model's attention implementation is {implementation!r}, not sdpa or flash"
    return None


def _paged_names_registered() -> bool:
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    return any(str(name).startswith("paged|") and name != "paged|eager"
               for name in ALL_ATTENTION_FUNCTIONS)


def _has_sliding_layers(config: Any) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any("sliding" in str(kind) for kind in layer_types)
    return bool(getattr(config, "sliding_window", None)) and bool(
        getattr(config, "use_sliding_window", True))


def let_standard_forwards_through() -> None:
    """Make every registered ``paged|<impl>`` attention function run a forward that
    carries no paged cache (a request run alone, beside the batch) with ``<impl>``.

    transformers registers these functions process-wide, so this wraps them there,
    once (a wrapped function is marked); where the paged names are gone (5.23 and
    later treat ``paged|<impl>`` as ``<impl>``) there is nothing to wrap."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError:
        return
    try:
        from transformers.generation.continuous_batching import PagedAttentionCache
    except ImportError:
        return  # no continuous batching, no paged names to mind
    for name in list(ALL_ATTENTION_FUNCTIONS.keys()):
        base = name.removeprefix("paged|")
        if base == name or base not in ALL_ATTENTION_FUNCTIONS:
            continue
        paged = ALL_ATTENTION_FUNCTIONS[name]
        if getattr(paged, "standard_forwards_through", False):
            continue
        AttentionInterface.register(name, _paged_or_standard(
            paged, ALL_ATTENTION_FUNCTIONS[base], PagedAttentionCache))


def _paged_or_standard(paged: Any, standard: Any, paged_cache: type) -> Any:
    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                  *args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache")
        if isinstance(cache, paged_cache):
            return paged(module, query, key, value, attention_mask, *args, **kwargs)
        if cache is None:
            kwargs.pop("cache", None)
        return standard(module, query, key, value, attention_mask, *args, **kwargs)

    attention.standard_forwards_through = True  # type: ignore[attr-defined]
    attention.__name__ = getattr(paged, "__name__", "paged_attention")
    return attention


class BatchStream:
    """A request's tokens, in order, as the batch makes them; close() cancels it
    (also before the first token was read)."""

    def __init__(self, engine: BatchEngine, request_id: str,
                 cancelled: threading.Event | None) -> None:
        self._engine = engine
        self.request_id = request_id
        self._cancelled = cancelled
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._seen = 0
        self._closed = False
        self._pending: list[int] = []
        self._done = False  # nothing more will be read
        self._finished = False  # the batch ended the request itself

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> int:
        if self._cancelled is not None and self._cancelled.is_set():
            self._done, self._pending = True, []  # the client left: nobody reads more
        while not self._pending:
            if self._done or self._closed:
                self.close()
                raise StopIteration
            self._pending = self._wait()
        return self._pending.pop(0)

    def _wait(self) -> list[int]:
        """The next new tokens; [] once the request has ended or was cancelled."""
        while True:
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if self._cancelled is not None and self._cancelled.is_set():
                    self._done = True
                    return []
                continue
            if isinstance(item, BaseException):
                self._done = True
                self.close()
                self._engine._failed(item)
                raise item
            tokens, finished = item
            new = tokens[self._seen:]
            self._seen = len(tokens)
            self._done = self._finished = finished
            if finished:
                self._engine._succeeded()
            if new or finished:
                return list(new)

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._engine._forget(self, finished=self._finished)


class BatchEngine:
    """Requests to one model, batched; thread-safe."""

    def __init__(self, model: Any, *, max_requests: int, kv_tokens: int,
                 eos_ids: frozenset[int], cuda_graphs: bool = True) -> None:
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.max_requests = max_requests
        self.kv_tokens = kv_tokens
        vocab = int(model.config.get_text_config().vocab_size)
        self._vocab = vocab
        # Sampling with per-request values needs each processor to exist: a default
        # that is not neutral makes transformers create it (every request passes its
        # own value, so these defaults are never used).
        generation = GenerationConfig(
            do_sample=True, temperature=0.7, top_k=vocab, top_p=0.9,
            eos_token_id=sorted(eos_ids) or -1, pad_token_id=min(eos_ids, default=0),
            max_new_tokens=16)
        self.cuda_graphs = cuda_graphs and getattr(model.device, "type", "") == "cuda"
        pages = -(-kv_tokens // PAGE_TOKENS)
        wanted: dict[str, Any] = {
            "num_blocks": pages, "page_size": PAGE_TOKENS,
            "max_requests_per_batch": max_requests, "per_request_processors": True,
            "max_batch_tokens": min(STEP_TOKENS, kv_tokens),
            "auto_switch_to_flash": False, "use_cuda_graph": self.cuda_graphs,
            "allow_block_sharing": False,
        }
        if self.cuda_graphs:
            wanted.update(q_padding_interval_size=Q_PAD_TOKENS,
                          kv_padding_interval_size=PAGE_TOKENS)
        known = inspect.signature(ContinuousBatchingConfig).parameters
        if "page_size" not in known:
            wanted["block_size"] = wanted.pop("page_size")
        self._manager = model.init_continuous_batching(
            generation_config=generation,
            continuous_batching_config=ContinuousBatchingConfig(
                **{k: v for k, v in wanted.items() if k in known}))
        # The model is paged from here on, and making the manager may have loaded
        # attention kernels that registered their paged names (a flash kernel from
        # the hub): wrap what is registered now.
        let_standard_forwards_through()
        self._lock = threading.Lock()
        self._streams: dict[str, BatchStream] = {}
        self._ids = itertools.count()
        self._generation = 0  # which start of the manager the dispatcher serves
        self._failures = 0  # requests failed in a row
        self.disabled: str | None = None  # why the batch was given up

    # -- requests

    def submit(self, prompt_ids: list[int], max_new_tokens: int, *, temperature: float,
               top_p: float, cancelled: threading.Event | None = None) -> BatchStream:
        """Add a request to the batch. ``temperature`` 0 is greedy. Raises
        :class:`BatchUnavailable` once the batch has been given up, and
        :class:`BatchError` when it cannot take the request now (which counts toward
        giving it up)."""
        if self.disabled is not None:
            raise BatchUnavailable(self.disabled)
        sampling: dict[str, Any] = (
            {"temperature": 1.0, "top_k": 1, "top_p": 1.0} if temperature == 0 else
            {"temperature": float(temperature), "top_k": self._vocab, "top_p": float(top_p)})
        try:
            with self._lock:
                self._ensure_running()
                request_id = f"b{next(self._ids)}"
                stream = BatchStream(self, request_id, cancelled)
                self._streams[request_id] = stream
            added = self._manager.add_request(list(prompt_ids), request_id=request_id,
                                              max_new_tokens=max_new_tokens, streaming=True,
                                              **sampling)
            if added is None:
                with self._lock:
                    self._streams.pop(request_id, None)
                raise BatchError("the batch refused the request (its generation thread stopped)")
        except BatchError as exc:
            self._failed(exc)  # counts toward giving the batch up, as a failed stream does
            raise
        return stream

    def _forget(self, stream: BatchStream, finished: bool) -> None:
        """A stream is closed: it leaves the batch, unless the batch ended it."""
        with self._lock:
            known = self._streams.pop(stream.request_id, None) is not None
        if known and not finished and self._manager.is_running():
            self._manager.cancel_request(stream.request_id)

    def _failed(self, error: BaseException) -> None:
        with self._lock:
            self._failures += 1
            if self._failures < FAILURES_TO_DISABLE or self.disabled is not None:
                return
            self.disabled = f"{FAILURES_TO_DISABLE} requests in a row failed in the batch: {error}"
        LOG.error("batching_disabled reason=%r", self.disabled)

    def _succeeded(self) -> None:
        self._failures = 0

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- the manager's life

    def _ensure_running(self) -> None:
        """With the lock held: the manager's generation thread and the dispatcher run."""
        if self._manager.is_running():
            return
        # A thread is a daemon when the thread that made it is: the manager's
        # generation thread, made in a daemon thread, never keeps the process from
        # exiting (it runs until stopped, and nothing stops it at exit).
        self._page_attention()
        starter = threading.Thread(target=self._manager.start, name="batch-start",
                                   daemon=True)
        starter.start()
        starter.join()
        self._generation += 1
        threading.Thread(target=self._dispatch, args=(self._generation,),
                         name="batch-dispatch", daemon=True).start()
        LOG.info("batch_started max_requests=%d kv_tokens=%d cuda_graphs=%s",
                 self.max_requests, self.kv_tokens, "on" if self.cuda_graphs else "off")

    def _page_attention(self) -> None:
        """The model's attention is the manager's paged one again: stopping the
        manager (a suspend) restored the model's own, and before transformers 5.23
        starting it does not switch back (an unpaged function would ignore the
        batch's cache)."""
        switch = getattr(self._manager, "switch_to_cb_friendly_attn", None)
        if not callable(switch):
            return
        known = inspect.signature(switch).parameters
        try:
            switch(self._manager.model,
                   **({"auto_switch_to_flash": False} if "auto_switch_to_flash" in known else {}))
        except Exception as exc:
            raise BatchError(f"the batch could not page the model's attention: {exc!r}") from exc
        let_standard_forwards_through()

    def _dispatch(self, generation: int) -> None:
        """Hand each result to its request's stream, until this start of the manager
        ends; then fail the streams it still held."""
        manager = self._manager
        error: BaseException | None = None
        try:
            while generation == self._generation:
                result = manager.get_result(timeout=0.1)
                if result is None:
                    if manager.is_running():
                        continue
                    break  # the generation thread ended: stopped, or died
                with self._lock:
                    stream = self._streams.get(result.request_id)
                if stream is None:
                    continue  # cancelled: nobody reads it
                if result.error is not None:
                    stream.put(BatchError(f"the batch failed the request: {result.error}"))
                else:
                    stream.put((list(result.generated_tokens), result.is_finished()))
        except Exception as exc:  # noqa: BLE001 - a stream must never wait for nothing
            LOG.exception("batch_dispatch_failed")
            error = exc
        with self._lock:
            if generation != self._generation and error is None:
                return  # a newer start serves the streams now
            orphans = list(self._streams.values())
            self._streams.clear()
        error = error or getattr(manager.background_thread_status, "fatal_error", None)
        if error is not None:
            with self._lock:
                self.disabled = f"the batch's generation thread died: {error!r}"
            LOG.error("batching_disabled reason=%r requests=%d", self.disabled, len(orphans))
        for stream in orphans:
            stream.put(BatchError(f"the batch's generation thread stopped: {error!r}"))

    def suspend(self) -> None:
        """Stop the generation thread and free the KV cache (the GPU is released);
        the next request starts them again. Requests still running end with
        :class:`BatchError`."""
        with self._lock:
            if not self._manager.is_running():
                return
            self._manager.stop(block=True, timeout=30, hard_stop=True)
        LOG.info("batch_suspended")
