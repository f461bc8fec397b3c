"""The function under test for bench/coldstart.py: a random-weight Llama behind the
python3-llm template, in a build context laid out as faas-cli would.

As a script (run in a subprocess, so that the orchestrating process never imports
torch nor creates a CUDA context):

    python bench/coldstart_model.py build CONTEXT --shape tiny|1b|8b --device cpu|cuda

writes ``CONTEXT`` = a copy of templates/python3-llm (``index.py``, ``model_cache.py``,
``function/``) and ``CONTEXT/model/`` = the model in bf16 safetensors
(``save_pretrained``), its generation config and a word-level tokenizer, and prints
one JSON line: weight bytes, build seconds, vocabulary.

The tokenizer: every vocabulary entry is one word (``w17``) and the chat template adds
exactly one token per message plus one, so a prompt of N tokens is N-2 words in one
user message (:func:`prompt_words`); the builder checks that. The model has no
end-of-sequence token, so every generation runs to ``max_tokens``, and every token
decodes to visible text: the first streamed content chunk is the first token.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import template_common as common

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "templates" / "python3-llm"
SPECIALS = ("<unk>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEMPLATE_TOKENS = 2  # one role token for the one user message, one for the assistant's
# The tiny shape needs room for the 2048-token prompt of first_request_2048.
CONTEXT_LENGTH = {"tiny": 2304}


def shape_config(shape: str) -> dict[str, Any]:
    config = dict(common.SHAPES[shape])
    config["max_position_embeddings"] = CONTEXT_LENGTH.get(
        shape, config["max_position_embeddings"])
    return config


def prompt_words(tokens: int, vocab_size: int, seed: int) -> str:
    """A user message whose chat prompt is exactly ``tokens`` tokens long."""
    if tokens <= TEMPLATE_TOKENS:
        raise ValueError(f"a chat prompt has at least {TEMPLATE_TOKENS + 1} tokens")
    rng = random.Random(seed)
    words = vocab_size - len(SPECIALS)
    return " ".join(f"w{rng.randrange(words)}" for _ in range(tokens - TEMPLATE_TOKENS))


def copy_template(context: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".tox", ".pytest_cache",
                                    "handler_test.py", "tox.ini")
    shutil.copytree(TEMPLATE, context, ignore=ignore)
    (context / "function" / "__init__.py").touch()  # as the template's Dockerfile does


def build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update((f"w{i}", len(SPECIALS) + i) for i in range(vocab_size - len(SPECIALS)))
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>",
                                        additional_special_tokens=list(SPECIALS[1:]))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(model_dir: Path, shape: str, device: str) -> int:
    from transformers import GenerationConfig, LlamaConfig

    config = LlamaConfig(**shape_config(shape), bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    model = common.random_llama(config, device)
    model.generation_config = GenerationConfig(bos_token_id=None, eos_token_id=None,
                                               pad_token_id=None)
    model.save_pretrained(model_dir)
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def check_prompt_lengths(tokenizer: Any, vocab_size: int) -> None:
    for tokens in (7, 57, 300):
        messages = [{"role": "user", "content": prompt_words(tokens, vocab_size, tokens)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        got = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if got != tokens:
            raise AssertionError(f"a {tokens}-token prompt tokenised to {got} tokens")


def build(context: Path, shape: str, device: str) -> dict[str, Any]:
    started = time.perf_counter()
    copy_template(context)
    model_dir = context / "model"
    vocab_size = shape_config(shape)["vocab_size"]
    weight_bytes = build_model(model_dir, shape, device)
    tokenizer = build_tokenizer(vocab_size)
    check_prompt_lengths(tokenizer, vocab_size)
    tokenizer.save_pretrained(model_dir)
    return {"shape": shape, "config": shape_config(shape), "weight_bytes": weight_bytes,
            "vocab_size": vocab_size, "build_s": time.perf_counter() - started,
            "built_on": device}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="coldstart_model.py")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("context", type=Path)
    parser.add_argument("--shape", choices=sorted(common.SHAPES), required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.context, args.shape, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
