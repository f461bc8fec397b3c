"""The template format: golden bytes, verify on sound and hostile templates, writer rules."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fwatchdog.template_cache.format import ALIGNMENT, TemplateError, is_safe_relative
from fwatchdog.template_cache.verify import verify_template
from fwatchdog.template_cache.writer import TemplateWriter

DATA = Path(__file__).resolve().parents[1] / "template_cache_data"
GOLDEN = DATA / "golden"
GOLDEN_FUNCTION = DATA / "golden-function"


def _load_make_files():
    spec = importlib.util.spec_from_file_location("tc_make_files", DATA / "make_files.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_files = _load_make_files()


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def test_writer_reproduces_golden_bytes(tmp_path: Path) -> None:
    make_files.build_golden(tmp_path / "golden")
    assert _tree_bytes(tmp_path / "golden") == _tree_bytes(GOLDEN)
    assert _tree_bytes(tmp_path / "golden-function") == _tree_bytes(GOLDEN_FUNCTION)


def test_committed_hostile_files_match_generator(tmp_path: Path) -> None:
    make_files.main(tmp_path)
    assert _tree_bytes(tmp_path / "hostile") == _tree_bytes(DATA / "hostile")


def test_golden_layout_is_aligned_and_packed() -> None:
    report = verify_template(GOLDEN, GOLDEN_FUNCTION)
    assert report.ok, report.problems
    assert report.manifest is not None
    packed = [t for t in report.manifest.tensors if t.file == "packed"]
    assert [t.offset for t in packed] == [0, ALIGNMENT, 2 * ALIGNMENT]
    assert (GOLDEN / "weights.bin").stat().st_size == 2 * ALIGNMENT + 8


def test_cli_accepts_golden() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fwatchdog.template_cache", "verify", str(GOLDEN),
         "--function-dir", str(GOLDEN_FUNCTION)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout


def test_every_hostile_case_is_committed() -> None:
    committed = {p.name for p in (DATA / "hostile").iterdir() if p.is_dir()}
    assert committed == set(make_files.HOSTILE)


@pytest.mark.parametrize("name", sorted(make_files.HOSTILE))
def test_verify_rejects_hostile(name: str) -> None:
    report = verify_template(DATA / "hostile" / name, GOLDEN_FUNCTION)
    assert not report.ok
    phrase = make_files.HOSTILE[name][1]
    assert any(phrase in problem for problem in report.problems), report.problems


@pytest.mark.parametrize("name", ["flipped_byte", "escaping_path", "bad_json"])
def test_cli_rejects_hostile_with_message(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fwatchdog.template_cache", "verify",
         str(DATA / "hostile" / name), "--function-dir", str(GOLDEN_FUNCTION)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 1
    assert make_files.HOSTILE[name][1] in result.stderr


def test_changed_source_file_is_rejected(tmp_path: Path) -> None:
    make_files.build_golden(tmp_path / "t")
    source = tmp_path / "t-function" / "weights.raw"
    data = bytearray(source.read_bytes())
    data[12] ^= 1
    source.write_bytes(bytes(data))
    report = verify_template(tmp_path / "t", tmp_path / "t-function")
    assert "file src0 (weights.raw): sha256 does not match" in report.problems
    assert "tensor 0/bias: sha256 does not match its bytes" in report.problems


def test_symlink_escape_is_rejected(tmp_path: Path) -> None:
    make_files.build_golden(tmp_path / "t")
    outside = tmp_path / "outside.bin"
    (tmp_path / "t" / "weights.bin").rename(outside)
    (tmp_path / "t" / "weights.bin").symlink_to(outside)
    report = verify_template(tmp_path / "t", tmp_path / "t-function")
    assert any("through a symlink" in p for p in report.problems), report.problems


@pytest.mark.parametrize(
    ("path", "safe"),
    [("a/b.bin", True), ("../a", False), ("/etc/passwd", False), ("a/../b", False),
     ("", False), ("a//b", False), ("./a", False), ("a\\..\\b", False)],
)
def test_is_safe_relative(path: str, safe: bool) -> None:
    assert is_safe_relative(path) is safe


def test_writer_refuses_wrong_sizes_and_duplicates(tmp_path: Path) -> None:
    writer = TemplateWriter(tmp_path / "t")
    with pytest.raises(TemplateError, match="bytes for F32"):
        writer.add_packed("x", b"\x00" * 3, "F32", (1,), mutated=False)
    writer.add_packed("x", b"\x00" * 4, "F32", (1,), mutated=False)
    with pytest.raises(TemplateError, match="added twice"):
        writer.add_packed("x", b"\x00" * 4, "F32", (1,), mutated=False)
    writer.abort()
    assert not (tmp_path / "t").exists()
    assert not (tmp_path / "t.partial").exists()


@pytest.mark.parametrize("name", sorted(make_files.HOSTILE))
def test_verify_without_jsonschema_rejects_hostile(name: str, monkeypatch) -> None:
    """Runtime images may lack jsonschema; the built-in checks still reject every case."""
    from fwatchdog.template_cache import verify

    monkeypatch.setattr(verify, "_validator", verify._MinimalValidator)
    report = verify.verify_template(DATA / "hostile" / name, GOLDEN_FUNCTION)
    assert not report.ok
    assert verify.verify_template(GOLDEN, GOLDEN_FUNCTION).ok
