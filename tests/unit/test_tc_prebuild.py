"""Tokenizers built ahead in a parent process (template_cache.prebuild): recorded by
the tracer's hooks, built from the record, handed to the start-up's call once, and
not handed out when the files changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fwatchdog.template_cache import fingerprint, prebuild
from fwatchdog.template_cache.intercept import intercept_loaders
from fwatchdog.template_cache.restore import restore
from fwatchdog.tracer import build
from fwatchdog.tracer.recorder import Recorder


def _tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "again": 3}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture
def traced(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    function_dir = tmp_path / "function"
    function_dir.mkdir()
    (function_dir / "handler.py").write_text("def handle(event, context):\n    return {}\n")
    _tokenizer(function_dir / "tok")
    recorder = Recorder(function_dir)
    with intercept_loaders(recorder):
        tok = AutoTokenizer.from_pretrained(str(function_dir / "tok"))
        AutoTokenizer.from_pretrained(str(function_dir / "tok"))  # the same call: one record
    assert tok("hello world")["input_ids"] == [1, 2]
    trace = {"prebuild": recorder.prebuild}
    template = build.write_template(recorder, tmp_path / "t", function_dir,
                                    fingerprint.current(function_dir), None, [], trace)
    return function_dir, template, recorder.prebuild


def test_the_trace_records_a_repeatable_tokenizer_call(traced: tuple[Path, Path, list]) -> None:
    _, template, entries = traced
    assert len(entries) == 1
    item = entries[0]
    assert item["args"] == ["function:tok"]  # AutoTokenizer adds its own plain kwargs
    assert item["key"].startswith("tokenizer|cls=") and ":" in item["class"]
    manifest = json.loads((template / "manifest.json").read_text())
    assert manifest["trace"]["prebuild"] == entries


def test_a_prebuilt_tokenizer_is_handed_out_once(traced: tuple[Path, Path, list]) -> None:
    function_dir, template, entries = traced
    made = prebuild.build(entries, function_dir)
    assert len(made.objects) == 1
    (ahead, _, _), = made.objects.values()
    with restore(template, function_dir, prebuilt=made) as stats:
        first = AutoTokenizer.from_pretrained(str(function_dir / "tok"))
        second = AutoTokenizer.from_pretrained(str(function_dir / "tok"))
    assert stats.used and stats.prebuilt == 1 and stats.misses == 0
    assert first is ahead and second is not ahead  # a second call builds its own
    assert second("hello again")["input_ids"] == first("hello again")["input_ids"] == [1, 3]


def test_a_tokenizer_whose_files_changed_is_built_again(traced: tuple[Path, Path, list]) -> None:
    function_dir, template, entries = traced
    made = prebuild.build(entries, function_dir)
    (ahead, _, _), = made.objects.values()
    config = function_dir / "tok" / "tokenizer_config.json"
    st = config.stat()
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with restore(template, function_dir, prebuilt=made) as stats:
        tok = AutoTokenizer.from_pretrained(str(function_dir / "tok"))
    assert tok is not ahead and stats.prebuilt == 0


def test_a_call_that_cannot_be_repeated_is_not_recorded_and_a_bad_record_is_skipped(
        tmp_path: Path) -> None:
    folder = _tokenizer(tmp_path / "tok")
    owner = PreTrainedTokenizerFast
    assert prebuild.entry(owner, (str(folder),), {"extra": object()}, "k", tmp_path) is None
    assert prebuild.entry(owner, (), {}, "k", tmp_path) is None
    made = prebuild.build([{"key": "k", "class": "no.such.module:Tok", "args": ["x"]},
                           "not a record"], tmp_path)
    assert made.objects == {}
