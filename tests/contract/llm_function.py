"""A tiny-Llama function for mode=llm contract tests, and the helpers to trace it.

The handler loads a random tiny Llama at import with ``from_pretrained`` (what the
template serves) and answers on paths that exercise the runtime:

- ``/generate``: greedy tokens of the model (the template must not change them);
- ``/set`` and ``/get``: a module global, to show which process answered;
- ``/pid``: the handler's pid;
- ``/crash``: the process dies in the middle of the request;
- ``/hang``: never answers;
- ``/stream``: server-sent items, one per 50 ms, until the client leaves; it then
  writes ``$LLM_TEST_SIGNALS/stopped-<pid>``;
- ``/stream-crash``: one item, then the process dies;
- ``/cuda``: whether this process has initialised CUDA;
- ``/gc``: whether its cyclic garbage collector runs, and how many objects are frozen.

Its ``on_gpu_release`` and ``on_gpu_wake`` hooks write ``$LLM_TEST_SIGNALS/released-<pid>``
and ``woken-<pid>``.

Start-up waits for ``$LLM_TEST_SIGNALS/go`` when ``LLM_TEST_HOLD_START`` is set, and
fails when ``LLM_TEST_BOOT_FAIL`` is set, so tests can hold a handler before ready;
its warm-up requests wait for ``$LLM_TEST_SIGNALS/warm`` (every handler) or
``warm-<pid>`` (that one) when ``LLM_TEST_HOLD_WARMUP`` is set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HANDLER = r'''
import os, time
import torch
from transformers import AutoModelForCausalLM

SIGNALS = os.environ.get("LLM_TEST_SIGNALS", "/nonexistent")
if os.environ.get("LLM_TEST_BOOT_FAIL"):
    raise RuntimeError("the model cannot be loaded: LLM_TEST_BOOT_FAIL is set")
if os.environ.get("LLM_TEST_HOLD_START"):
    while not os.path.exists(os.path.join(SIGNALS, "go")):
        time.sleep(0.02)

MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
STATE = {}


def on_gpu_release():
    open(os.path.join(SIGNALS, f"released-{os.getpid()}"), "w").close()


def on_gpu_wake():
    open(os.path.join(SIGNALS, f"woken-{os.getpid()}"), "w").close()


def _json(body, status=200):
    return {"statusCode": status, "headers": {"Content-Type": "application/json"},
            "body": body}


def _stream(context, crash):
    n = 0
    try:
        while not context.cancelled.is_set():
            yield {"n": n}
            n += 1
            if crash:
                os._exit(9)
            time.sleep(0.05)
    finally:
        with open(os.path.join(SIGNALS, f"stopped-{os.getpid()}"), "w") as f:
            f.write(str(n))


def handle(event, context):
    if context.hostname == "warmup" and os.environ.get("LLM_TEST_HOLD_WARMUP"):
        while not (os.path.exists(os.path.join(SIGNALS, "warm"))
                   or os.path.exists(os.path.join(SIGNALS, f"warm-{os.getpid()}"))):
            time.sleep(0.02)
    path = event.path
    if path == "/generate":
        ids = torch.tensor([[1, 2, 3, 4]])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        return _json({"tokens": out[0].tolist(), "pid": os.getpid()})
    if path == "/set":
        STATE["x"] = event.body.decode() or "set"
        return _json({"pid": os.getpid()})
    if path == "/get":
        return _json({"x": STATE.get("x"), "pid": os.getpid()})
    if path == "/pid":
        return _json({"pid": os.getpid()})
    if path == "/crash":
        os._exit(7)
    if path == "/hang":
        time.sleep(3600)
    if path in ("/stream", "/stream-crash"):
        return {"statusCode": 200, "headers": {"Content-Type": "text/event-stream"},
                "body": _stream(context, path == "/stream-crash")}
    if path == "/cuda":
        return _json({"initialized": torch.cuda.is_initialized(), "pid": os.getpid()})
    if path == "/gc":
        import gc
        return _json({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                      "pid": os.getpid()})
    return _json({"path": path, "pid": os.getpid()})
'''

SAMPLE = {"method": "GET", "path": "/generate"}
SECOND_SAMPLE = {"method": "GET", "path": "/pid"}  # a plan of two: a warm-up can pause


# The same function placing its model where a GPU node would: on CUDA when there is one.
GPU_HANDLER = HANDLER.replace(
    "model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)",
    "DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
    "model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, device_map=DEVICE)",
).replace("torch.tensor([[1, 2, 3, 4]])", "torch.tensor([[1, 2, 3, 4]], device=model.device)")


def make_function(function_dir: Path, handler: str = HANDLER) -> Path:
    """A function folder: handler.py, a random tiny Llama, two samples."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
    try:
        import tc_helpers
    finally:
        sys.path.pop(0)
    tc_helpers.make_tiny_llama(function_dir, handler=handler)
    (function_dir / "samples").mkdir(exist_ok=True)
    (function_dir / "samples" / "generate.json").write_text(json.dumps(SAMPLE))
    (function_dir / "samples" / "pid.json").write_text(json.dumps(SECOND_SAMPLE))
    return function_dir


def trace(function_dir: Path, out: Path, *, hide_gpu: bool = False) -> Path:
    """The tracer as an image build runs it; ``hide_gpu``: as on a build machine
    without a GPU."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        [sys.executable, "-m", "fwatchdog.tracer", str(function_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False, env=env)
    if result.returncode != 0:
        raise AssertionError(f"tracer failed:\n{result.stdout}\n{result.stderr[-4000:]}")
    return out
