"""The generation's incremental decoding against SmolLM2's real tokenizer.

For random token sequences (the whole vocabulary, special tokens included), the
committed text plus the pending tail equals decoding every token at once, at
every step: the linear decoder changes nothing a client receives.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.unit.test_openai_protocol import load

pytestmark = pytest.mark.e2e


def test_incremental_decoding_matches_the_full_decode(converted_model: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(converted_model))
    generation = load("generation")
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
