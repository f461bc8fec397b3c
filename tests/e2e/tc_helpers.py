"""Helpers for the template tests: build tiny functions, start them in fresh processes.

Run as a script, it is one handler start-up in a fresh process:

    python tc_helpers.py start FUNCTION_DIR OUT_DIR [--template DIR] [--attach INFO.json]
        [--attach-fd N ...]

It imports the function's handler (ordinarily, or inside `restore`), then writes
OUT_DIR/result.json (timings, restore counters, greedy tokens) and OUT_DIR/logits.pt
(the logits of `handler.model` on a fixed input), so a test can compare two starts
bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PROMPT_IDS = [[1, 5, 9, 3, 7, 2, 11, 4]]

TINY_HANDLER = '''\
import os

import torch
from transformers import AutoModelForCausalLM

MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)


def handle(event, context):
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    return {"tokens": out[0].tolist()}
'''


def make_tiny_llama(function_dir: Path, seed: int = 0, handler: str = TINY_HANDLER) -> Path:
    """A function folder with a random tiny Llama (hidden 64, 2 layers, vocab 256)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(function_dir / "model")
    (function_dir / "handler.py").write_text(handler)
    return function_dir


def run_start(function_dir: Path, out_dir: Path, template: Path | None = None,
              attach: Path | None = None, timeout: float = 240,
              fds: list[int] | tuple[int, ...] = (),
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """One start-up in a fresh process; returns its result.json. `fds` (a holder's
    memfd) are inherited by the child under the same numbers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE), "start", str(function_dir), str(out_dir)]
    if template is not None:
        command += ["--template", str(template)]
    if attach is not None:
        command += ["--attach", str(attach)]
    for fd in fds:
        command += ["--attach-fd", str(fd)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            check=False, pass_fds=tuple(fds),
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"start failed ({result.returncode}):\n{result.stderr[-4000:]}")
    data: dict[str, Any] = json.loads((out_dir / "result.json").read_text())
    data["stderr"] = result.stderr
    return data


def trace(function_dir: Path, out: Path, *extra: str, timeout: float = 300,
          env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fwatchdog.tracer", str(function_dir), "--out", str(out), *extra],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"tracer failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def _attributes(model: Any) -> dict[str, str]:
    """Every module attribute besides tensors and submodules, comparable across processes."""
    from fwatchdog.template_cache.module_state import SKIPPED, encode

    result = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr not in SKIPPED:
                encoded = encode(value)
                result[f"{name}.{attr}"] = (json.dumps(encoded, sort_keys=True) if encoded
                                            else f"{type(value).__name__}:{len(value)}"
                                            if isinstance(value, dict) else type(value).__name__)
    return result


def _start(argv: list[str]) -> int:
    import argparse
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("function_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--template", type=Path)
    parser.add_argument("--attach", type=Path)
    parser.add_argument("--attach-fd", type=int, action="append", default=[])
    args = parser.parse_args(argv)
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    function_dir = args.function_dir.resolve()
    template = args.template.resolve() if args.template else None
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    started = time.perf_counter()
    import torch

    from fwatchdog.tracer.function import import_handler

    imported = time.perf_counter()
    stats: Any = None
    if template is None:
        handler = import_handler(function_dir)
    else:
        from fwatchdog.template_cache.restore import restore

        source = None
        if args.attach is not None:
            from fwatchdog.template_cache.holder import HandleInfo, attach

            info = HandleInfo.from_json(args.attach.read_text())
            source = attach(info, args.attach_fd)
        with restore(template, function_dir, source=source) as stats:
            handler = import_handler(function_dir)
    ready = time.perf_counter()
    model = handler.model
    prompt = torch.tensor(PROMPT_IDS, device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(prompt).logits
        first_forward = time.perf_counter()
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    torch.save(logits.cpu(), out_dir / "logits.pt")
    result = {
        "import_torch_s": imported - started,
        "startup_s": ready - imported,
        "first_forward_s": first_forward - ready,
        "tokens": tokens[0].tolist(),
        "stats": None if stats is None else {
            "used": stats.used, "rejected": stats.rejected, "hits": stats.hits,
            "misses": stats.misses, "skipped": stats.skipped,
            "tensors_served": stats.tensors_served, "miss_reasons": stats.miss_reasons},
        "attributes": _attributes(model),
        "tied": bool(getattr(model, "lm_head", None) is not None
                     and model.lm_head.weight is model.get_input_embeddings().weight),
    }
    (out_dir / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "start":
        sys.exit(_start(sys.argv[2:]))
    sys.exit("usage: tc_helpers.py start FUNCTION_DIR OUT_DIR [--template DIR]")
