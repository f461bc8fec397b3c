"""An OpenAI-compatible chat server: the python3-llm template's default function.

The model is loaded once, at import, the ordinary way (``from_pretrained``); every
request then reuses it. Replace ``handle`` with your own code: it receives the
python3-http ``event`` (``.body``, ``.headers``, ``.method``, ``.query``, ``.path``)
and ``context`` (``.hostname``, ``.cancelled``), and returns a dict
``{"statusCode", "headers", "body"}``, ``None``, or an iterator to stream.

Environment: ``MODEL_PATH`` (a Hugging Face model folder; default: the embedded
SmolLM2-135M-Instruct), ``MODEL_NAME``, ``MODEL_ALIASES`` (other names a request's
``model`` may use, or ``*``), ``MAX_CONCURRENT_GENERATIONS``, ``MAX_QUEUED_GENERATIONS``,
``MAX_QUEUE_WAIT``, ``DEFAULT_MAX_TOKENS``, ``MAX_MODEL_LEN``, ``BATCHING``,
``KV_CACHE_TOKENS``, ``MODEL_DTYPE`` (``auto``: the checkpoint's own; ``float32``
makes greedy output independent of the batch on CPU, where bf16 rounding differs
with the batch's shape).

Concurrent requests share one continuous batch. ``on_gpu_release`` is called by
``fwatchdog mode=llm`` when it releases the GPU on idle: the batch's KV cache goes
with the weights.
"""

import os

import model_cache  # from the template, beside index.py
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .openai_api import OpenAIServer, ServerConfig, default_model_name

MODEL_PATH = model_cache.resolve_model_path(os.environ)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    # cuDNN's attention builds an execution plan for every new shape: on an H200 (8B)
    # each new prompt length and every decode step at a new context length paid
    # 100-250 ms once, which no warm-up can cover. Flash attention has no per-shape cost.
    torch.backends.cuda.enable_cudnn_sdp(False)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE = os.environ.get("MODEL_DTYPE", "").strip() or "auto"
if DTYPE not in DTYPES:
    raise ValueError(f"MODEL_DTYPE={DTYPE!r} must be one of {', '.join(DTYPES)}")

tokenizer = AutoTokenizer.from_pretrained(MODEL_PATH)
# device_map loads the weights straight onto the GPU, without a copy in host memory.
model = AutoModelForCausalLM.from_pretrained(MODEL_PATH, dtype=DTYPE, device_map=DEVICE)

api = OpenAIServer(
    model, tokenizer, ServerConfig.from_env(os.environ, default_model_name(MODEL_PATH))
)


def handle(event, context):
    return api.handle(event, context)


def on_gpu_release():
    api.release_gpu()
