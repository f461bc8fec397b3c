"""How fast the default handler's continuous batch steps, and which of its variants
to ship: the engine itself (``templates/python3-llm/function/batching.py``), no HTTP.

One process, one random-weight Llama built on the device, requests of 128 prompt
tokens and 64 new tokens (greedy), submitted together at 1, 4, 16 and 32 streams;
each level is run twice and the faster run kept. Per variant: ``tok_s`` (all streams'
tokens over the wall time), ``step_ms`` (the wall time over the longest stream's
tokens), the first requests' times (what lazy CUDA-graph capture costs), and
``greedy_same`` (whether four greedy requests gave the same tokens alone and
together; in bf16 the batch's shape changes the rounding, see docs/python3-llm.md).

Variants (``--variants``, in this order when named):
- ``shim``: the request run alone beside a live batch, and a suspended batch that
  starts again (correctness on transformers releases before 5.23);
- ``eager``: the batch as with ``CUDA_GRAPHS=off``;
- ``graphs``: as shipped on a GPU (CUDA graphs, padding 8 query tokens, 256 keys);
- ``graphs_coarse``: graphs padded to 32 and 1024;
- ``graphs_default``: graphs with transformers' own padding presets;
- ``graphs_async``: ``graphs_default`` with transformers' asynchronous batching;
- ``compile1``: transformers' ``default_compile_level=1`` (torch.compile) with graphs;
- ``sequential``: one request at a time, the handler's own loop (no batch);
- ``static_graph``: one stream on a static KV cache with the decode step captured by
  hand as one CUDA graph (what a non-batched fast path would give).

    python3 bench/batch_step.py --shape 8b --device cuda --out batch_step.json

CI runs the tiny shape on CPU to keep the script alive:

    .venv/bin/python bench/batch_step.py --shape tiny --device cpu --quick
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import template_common as common

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "templates" / "python3-llm"))

VARIANTS: dict[str, dict[str, Any]] = {
    "eager": {"cuda_graphs": False},
    "graphs": {"cuda_graphs": True},
    "graphs_coarse": {"cuda_graphs": True,
                      "over": {"q_padding_interval_size": 32, "kv_padding_interval_size": 1024}},
    "graphs_default": {"cuda_graphs": True,
                       "over": {"q_padding_interval_size": 0, "kv_padding_interval_size": 0}},
    "graphs_async": {"cuda_graphs": True,
                     "over": {"q_padding_interval_size": 0, "kv_padding_interval_size": 0,
                              "use_async_batching": True}},
    "compile1": {"cuda_graphs": True,
                 "over": {"q_padding_interval_size": 0, "kv_padding_interval_size": 0,
                          "default_compile_level": 1}},
}
ORDER = ("shim", "eager", "graphs", "graphs_coarse", "graphs_default", "graphs_async",
         "compile1", "sequential", "static_graph")
PROMPT_TOKENS, NEW_TOKENS = 128, 64


class Tokens:
    """Token ids as text (all Generation needs of a tokenizer)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


class Probe:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import LlamaConfig

        self.torch = torch
        self.device = args.device
        self.quick = args.quick
        self.levels = (1, 2) if args.quick else (1, 4, 16, 32)
        self.new_tokens = 8 if args.quick else NEW_TOKENS
        self.config = LlamaConfig(attn_implementation="sdpa", **common.SHAPES[args.shape])
        started = time.perf_counter()
        self.model = common.random_llama(self.config, args.device).eval()
        self.model_make_s = time.perf_counter() - started
        if args.device == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(False)
        vocab = self.config.vocab_size
        length = 16 if args.quick else PROMPT_TOKENS
        self.prompts = [[(7 * i + 13 * j) % (vocab - 2) + 1 for j in range(length)]
                        for i in range(max(self.levels))]
        self.eos = frozenset({vocab - 1})
        from function import batching, generation

        self.batching, self.generation = batching, generation

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def engine(self, cuda_graphs: bool, over: dict[str, Any] | None = None) -> Any:
        """A BatchEngine as the handler makes it, with transformers' batch settings
        ``over`` replaced."""
        from transformers.generation import configuration_utils

        original = configuration_utils.ContinuousBatchingConfig
        known = inspect.signature(original).parameters

        def patched(**kwargs: Any) -> Any:
            kwargs.update({k: v for k, v in (over or {}).items() if k in known})
            return original(**kwargs)

        patched.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
        configuration_utils.ContinuousBatchingConfig = patched  # type: ignore[misc]
        try:
            return self.batching.BatchEngine(self.model, max_requests=max(self.levels),
                                             kv_tokens=16384, eos_ids=self.eos,
                                             cuda_graphs=cuda_graphs)
        finally:
            configuration_utils.ContinuousBatchingConfig = original  # type: ignore[misc]

    def run(self, engine: Any, prompts: list[list[int]],
            tokens: int) -> tuple[list[list[int]], float]:
        started = time.perf_counter()
        streams = [engine.submit(p, tokens, temperature=0.0, top_p=1.0) for p in prompts]
        outs = [list(s) for s in streams]
        return outs, time.perf_counter() - started

    def unpage(self) -> None:
        """The model's own attention again: a batch whose thread died never stopped,
        and the next variant must not start from its paged attention."""
        implementation = str(getattr(self.model.config, "_attn_implementation", ""))
        if implementation.startswith("paged|"):
            self.model.set_attn_implementation(implementation.removeprefix("paged|"))

    def engine_case(self, name: str) -> dict[str, Any]:
        spec = VARIANTS[name]
        r: dict[str, Any] = {"settings": spec}
        engine = None
        try:
            started = time.perf_counter()
            engine = self.engine(spec["cuda_graphs"], spec.get("over"))
            r["init_s"] = time.perf_counter() - started
            r["cuda_graphs"] = engine.cuda_graphs
            r["first_request_s"] = self.run(engine, self.prompts[:1], 8)[1]
            r["first_full_batch_s"] = self.run(engine, self.prompts, 8)[1]
            r["second_request_s"] = self.run(engine, self.prompts[:1], 8)[1]
            alone = [self.run(engine, [p], 24)[0][0] for p in self.prompts[:4]]
            together = self.run(engine, self.prompts[:4], 24)[0]
            r["greedy_same"] = [a == b for a, b in zip(alone, together, strict=True)]
            for n in self.levels:
                best: dict[str, Any] | None = None
                for _ in range(2):
                    outs, wall = self.run(engine, self.prompts[:n], self.new_tokens)
                    tokens = sum(len(o) for o in outs)
                    now = {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall,
                           "step_ms": 1000 * wall / max(1, max(len(o) for o in outs))}
                    if best is None or now["tok_s"] > best["tok_s"]:
                        best = now
                r[f"n{n}"] = best
                print(name, n, best, flush=True)
            r["disabled"] = engine.disabled
            started = time.perf_counter()
            engine.suspend()
            r["suspend_s"] = time.perf_counter() - started
            r["restart_request_s"] = self.run(engine, self.prompts[:1], 8)[1]
        except Exception:  # noqa: BLE001 - a variant that fails here is a result
            r["error"] = traceback.format_exc()[-3000:]
        finally:
            if engine is not None:
                engine.suspend()
            self.unpage()
            if self.device == "cuda":
                self.torch.cuda.empty_cache()
                r["memory_reserved"] = self.torch.cuda.memory_reserved()
        return r

    def shim(self) -> dict[str, Any]:
        r: dict[str, Any] = {}
        engine = None
        try:
            engine = self.engine(cuda_graphs=True)
            # One request: alone, its steps have the same shapes every time.
            before = self.run(engine, self.prompts[:1], 12)[0]
            engine.suspend()
            after = self.run(engine, self.prompts[:1], 12)[0]
            r["same_after_suspend"] = after == before
            # Greedy in the batch is top-k 1, and a tie in bf16 logits is drawn at random;
            # an unpaged restart (the bug this checks) diverges at once.
            r["same_prefix_after_suspend"] = _first_difference(before[0], after[0])
            r["attention_while_batching"] = self.model.config._attn_implementation
            params = self.generation.SamplingParams(None, 1.0, seed=7)

            def seeded(request_id: str) -> str:
                return str(self.generation.Generation(
                    self.model, Tokens(), self.prompts[1], params, 16, self.eos, None,
                    request_id, engine=engine).text())

            first = seeded("s1")
            hold = engine.submit(self.prompts[0], 400, temperature=0.9, top_p=1.0)
            next(hold)
            second = seeded("s2")
            hold.close()
            r["seeded_beside_batch_repeats"] = bool(first) and first == second
            r["disabled"] = engine.disabled
        except Exception:  # noqa: BLE001
            r["error"] = traceback.format_exc()[-3000:]
        finally:
            if engine is not None:
                engine.suspend()
            self.unpage()
        return r

    def sequential(self) -> dict[str, Any]:
        r: dict[str, Any] = {}
        params = self.generation.SamplingParams(None, 0.0)
        for i in range(3):
            started = time.perf_counter()
            g = self.generation.Generation(self.model, Tokens(), self.prompts[0], params,
                                           self.new_tokens, self.eos, None, "q")
            g.text()
            r[f"run{i}_tok_s"] = g.completion_tokens / (time.perf_counter() - started)
        return r

    def static_graph(self) -> dict[str, Any]:
        torch = self.torch
        if self.device != "cuda":
            return {"skipped": "CUDA graphs need a GPU"}
        from transformers import StaticCache

        r: dict[str, Any] = {}
        model, ids = self.model, torch.tensor([self.prompts[0]], device="cuda")
        prompt = ids.shape[1]
        try:
            with torch.no_grad():
                reference = model.generate(ids, max_new_tokens=self.new_tokens,
                                           min_new_tokens=self.new_tokens, do_sample=False,
                                           pad_token_id=0)[0, prompt:].tolist()
                started = time.perf_counter()
                cache = StaticCache(config=model.config, max_cache_len=4096)
                positions = torch.arange(prompt, device="cuda")

                def prefill() -> Any:
                    return model(input_ids=ids, cache_position=positions,
                                 position_ids=positions[None], past_key_values=cache,
                                 use_cache=True, logits_to_keep=1).logits

                first = prefill()[0, -1].argmax()
                step_ids, step_pos = first.view(1, 1).clone(), torch.tensor([prompt], device="cuda")

                def step() -> Any:
                    return model(input_ids=step_ids, cache_position=step_pos,
                                 position_ids=step_pos.view(1, 1), past_key_values=cache,
                                 use_cache=True, logits_to_keep=1).logits

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = step()
                self.sync()
                r["capture_s"] = time.perf_counter() - started
                started = time.perf_counter()
                cache.reset()
                tokens = [int(prefill()[0, -1].argmax())]
                step_ids.fill_(tokens[0])
                step_pos.fill_(prompt)
                for _ in range(self.new_tokens - 1):
                    graph.replay()
                    nxt = logits[0, -1].argmax()
                    step_ids.copy_(nxt.view(1, 1))
                    step_pos.add_(1)
                    tokens.append(int(nxt))
                wall = time.perf_counter() - started
                r.update(tok_s=len(tokens) / wall, wall_s=wall,
                         first_difference=_first_difference(reference, tokens))
                self.sync()
                started = time.perf_counter()
                for _ in range(50):
                    graph.replay()
                self.sync()
                r["replay_ms"] = (time.perf_counter() - started) * 1000 / 50
                started = time.perf_counter()
                for _ in range(20):
                    step()
                self.sync()
                r["eager_static_step_ms"] = (time.perf_counter() - started) * 1000 / 20
        except Exception:  # noqa: BLE001
            r["error"] = traceback.format_exc()[-3000:]
        return r


def _first_difference(a: list[int], b: list[int]) -> int:
    """Where two token lists first differ (the shorter length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(common.SHAPES), default="8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default="shim,eager,graphs,graphs_coarse,sequential")
    parser.add_argument("--quick", action="store_true", help="2 streams, 8 tokens (CI)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(ORDER))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(ORDER)}")
    probe = Probe(args)
    result: dict[str, Any] = {"environment": common.environment(), "shape": args.shape,
                              "device": args.device, "prompt_tokens": len(probe.prompts[0]),
                              "new_tokens": probe.new_tokens, "levels": list(probe.levels),
                              "model_make_s": probe.model_make_s,
                              "unavailable": probe.batching.unavailable(probe.model)}
    for name in (v for v in ORDER if v in wanted):
        if name in VARIANTS:
            result[name] = probe.engine_case(name)
        else:
            result[name] = getattr(probe, name)()
        print(name, {k: v for k, v in result[name].items() if not k.startswith("n")}, flush=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
