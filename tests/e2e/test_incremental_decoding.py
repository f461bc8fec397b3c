"""The generation's incremental decoding against SmolLM2's real tokenizer.

For random token sequences (the whole vocabulary, special tokens included), the
committed text plus the pending tail equals decoding every token at once, at
every step: the linear decoder changes nothing a client receives.
"""

from __future__ import annotations

import importlib
import random
import sys
import types
from pathlib import Path

import pytest

FUNCTION = Path(__file__).resolve().parents[2] / "templates" / "python3-llm" / "function"
PACKAGE = "python3_llm_function"

pytestmark = pytest.mark.e2e


def _generation() -> types.ModuleType:
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(FUNCTION)]
        sys.modules[PACKAGE] = package
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # never write __pycache__ into the template
    try:
        return importlib.import_module(f"{PACKAGE}.generation")
    finally:
        sys.dont_write_bytecode = previous


def test_incremental_decoding_matches_the_full_decode(converted_model: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_model))
    generation = _generation()
    rng = random.Random(9)
    vocab = len(tokenizer)
    sample = "Héllo wörld, 你好 😀 — it's “quoted” .\n\tdone"
    text_ids = tokenizer.encode(sample, add_special_tokens=False)
    for trial in range(60):
        if trial % 3 == 0:
            tokens = text_ids[: rng.randint(1, len(text_ids))]
        else:
            tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        decoder = generation.IncrementalDecoder(tokenizer)
        committed = ""
        for n, token in enumerate(tokens, 1):
            new, pending = decoder.push(token)
            committed += new
            full = tokenizer.decode(tokens[:n], skip_special_tokens=True)
            assert committed + pending == full, (trial, tokens[:n])
