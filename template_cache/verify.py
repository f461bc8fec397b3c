"""Check that a template folder is sound before anything maps its bytes.

`verify_template` returns every problem it finds, each one sentence naming the file,
tensor or field at fault. Structure is checked first (JSON, version, schema, paths,
sizes, ranges, overlaps, holes); bytes are hashed only when the structure is sound,
so a hostile manifest never makes us read outside a file.

Invariants:
- Never follows a path that leaves its base folder (symlinks included).
- Reads files only; writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fwatchdog.template_cache import checksum
from fwatchdog.template_cache.format import (
    ALIGNMENT,
    DTYPE_ITEMSIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileBase,
    FileEntry,
    FileRole,
    Manifest,
    TemplateError,
    align_up,
    expected_nbytes,
    is_safe_relative,
    parse_manifest,
)

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


@dataclass(frozen=True)
class VerifyReport:
    template_dir: Path
    problems: tuple[str, ...]
    manifest: Manifest | None

    @property
    def ok(self) -> bool:
        return not self.problems


@cache
def _validator() -> Any:
    try:
        import jsonschema
    except ImportError:  # a runtime image without jsonschema: check what we read
        return _MinimalValidator()
    schema = json.loads(SCHEMA_PATH.read_text())
    return jsonschema.Draft202012Validator(schema)


@dataclass(frozen=True)
class _SchemaError:
    message: str
    absolute_path: tuple[Any, ...]


class _MinimalValidator:
    """The schema's rules for the fields that locate bytes, for when jsonschema is not
    installed (the GPU runtime image). Everything this module reads is type-checked."""

    FIELDS: dict[str, dict[str, type]] = {
        "files": {"id": str, "role": str, "base": str, "path": str, "size": int,
                  "sha256": str, "rest_xxh3": str},
        "tensors": {"name": str, "file": str, "offset": int, "nbytes": int, "dtype": str,
                    "shape": list, "sha256": str, "xxh3": str, "mutated": bool},
        "loads": {"loader": str, "key": str, "device": str, "tensors": dict,
                  "access_order": list},
        "skipped_loads": {"loader": str, "key": str, "reason": str},
    }
    ENUMS = {("files", "role"): {"packed", "source"},
             ("files", "base"): {"template", "function", "absolute"},
             ("tensors", "dtype"): set(DTYPE_ITEMSIZE)}

    def iter_errors(self, raw: dict[str, Any]) -> Any:
        for key in ("created_by", "fingerprint", "files", "tensors", "loads",
                    "skipped_loads", "trace"):
            if key not in raw:
                yield _SchemaError(f"{key!r} is a required property", ())
                return
        if not isinstance(raw["fingerprint"], dict):
            yield _SchemaError("is not of type 'object'", ("fingerprint",))
        for section, fields in self.FIELDS.items():
            if not isinstance(raw[section], list):
                yield _SchemaError("is not of type 'array'", (section,))
                continue
            for index, item in enumerate(raw[section]):
                if not isinstance(item, dict):
                    yield _SchemaError("is not of type 'object'", (section, index))
                    continue
                for name, kind in fields.items():
                    value = item.get(name)
                    where = (section, index, name)
                    if name not in item:
                        yield _SchemaError(f"{name!r} is a required property", (section, index))
                    elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                        yield _SchemaError(f"{value!r} is not of type {kind.__name__}", where)
                    elif isinstance(value, int) and value < 0:
                        yield _SchemaError(f"{value} is less than the minimum of 0", where)
                    elif (section, name) in self.ENUMS and value not in self.ENUMS[
                            (section, name)]:
                        yield _SchemaError(f"{value!r} is not one of the allowed values", where)
                shape = item.get("shape")
                mtime = item.get("mtime_ns")
                if section == "files" and mtime is not None and (
                        not isinstance(mtime, int) or isinstance(mtime, bool)):
                    yield _SchemaError(f"{mtime!r} is not of type int",
                                       (section, index, "mtime_ns"))
                if section == "tensors" and isinstance(shape, list) and not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0
                        for d in shape):
                    yield _SchemaError(f"{shape!r} is not a list of sizes",
                                       (section, index, "shape"))


@dataclass(frozen=True)
class CheckedManifest:
    """A manifest that passed :func:`read_manifest`'s checks, with the SHA-256 of its
    bytes. A process that checked it once (mode=llm's zygote) hands it to the children
    it forks, which then only compare the file's digest instead of parsing and
    validating it again (0.13 - 0.16 s of a forked handler's start for a 1B model's
    manifest on a 2-core machine, most of it building the JSON-schema validator)."""

    sha256: str
    manifest: Manifest


def read_checked(template_dir: Path) -> CheckedManifest:
    """:func:`read_manifest`, with the digest of the very bytes it checked."""
    path = template_dir / MANIFEST_NAME
    if not path.is_file():
        raise TemplateError(f"missing {MANIFEST_NAME} in {template_dir}")
    data = path.read_bytes()
    return CheckedManifest(hashlib.sha256(data).hexdigest(), _check_manifest(data))


def read_manifest(template_dir: Path) -> Manifest:
    """Parse and structurally check the manifest; raises TemplateError on the first problem."""
    return read_checked(template_dir).manifest


def _check_manifest(data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TemplateError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise TemplateError(f"{MANIFEST_NAME} must hold a JSON object")
    if raw.get("format") != FORMAT_NAME:
        raise TemplateError(f"format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise TemplateError(
            f"unsupported format_version {version!r}: this reader knows {FORMAT_VERSION};"
            " re-run the tracer with this fwatchdog version"
        )
    errors = sorted(_validator().iter_errors(raw), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise TemplateError(f"manifest field {where}: {first.message}")
    return parse_manifest(raw)


def structure_problems(
    manifest: Manifest, template_dir: Path, function_dir: Path | None
) -> list[str]:
    problems: list[str] = []
    files: dict[str, FileEntry] = {}
    for entry in manifest.files:
        if entry.id in files:
            problems.append(f"file id {entry.id!r} appears twice")
        files[entry.id] = entry
        problems.extend(_path_problems(entry, template_dir, function_dir))
    if problems:
        return problems
    packed = [f for f in manifest.files if f.role is FileRole.PACKED]
    if len(packed) > 1:
        problems.append("more than one packed file")
    for entry in manifest.files:
        path = entry.resolve(template_dir, function_dir)
        if not path.is_file():
            problems.append(f"file {entry.id} missing: {path}")
            continue
        actual = path.stat().st_size
        if actual != entry.size:
            problems.append(
                f"file {entry.id} ({entry.path}) is {actual} bytes, manifest says {entry.size}"
                + (" (truncated)" if actual < entry.size else "")
            )
    names: set[str] = set()
    by_file: dict[str, list[tuple[int, int, str]]] = {}
    for t in manifest.tensors:
        if t.name in names:
            problems.append(f"tensor {t.name!r} appears twice")
        names.add(t.name)
        entry = files.get(t.file)
        if entry is None:
            problems.append(f"tensor {t.name}: unknown file id {t.file!r}")
            continue
        if t.dtype not in DTYPE_ITEMSIZE or t.nbytes != expected_nbytes(t.dtype, t.shape):
            problems.append(
                f"tensor {t.name}: nbytes {t.nbytes} does not match {t.dtype}{list(t.shape)}"
            )
        if t.end > entry.size:
            problems.append(
                f"tensor {t.name}: bytes {t.offset}..{t.end} out of range of file {entry.id}"
                f" ({entry.size} bytes)"
            )
        if entry.role is FileRole.PACKED and t.offset % ALIGNMENT:
            problems.append(f"tensor {t.name}: offset {t.offset} not aligned to {ALIGNMENT}")
        by_file.setdefault(t.file, []).append((t.offset, t.end, t.name))
    for file_id, ranges in by_file.items():
        ranges.sort()
        for (_, end_a, name_a), (start_b, _, name_b) in zip(ranges, ranges[1:], strict=False):
            if start_b < end_a:
                problems.append(f"tensors {name_a} and {name_b} overlap in file {file_id}")
    for entry in packed:
        problems.extend(_hole_problems(entry, sorted(by_file.get(entry.id, []))))
    for load in manifest.raw["loads"]:
        for local, tensor_name in load["tensors"].items():
            if tensor_name not in names:
                problems.append(f"load {load['key']}: {local} names unknown tensor {tensor_name}")
    return problems


def content_problems(
    manifest: Manifest, template_dir: Path, function_dir: Path | None
) -> list[str]:
    problems: list[str] = []
    for entry in manifest.files:
        path = entry.resolve(template_dir, function_dir)
        tensors = [t for t in manifest.tensors if t.file == entry.id]
        with open(path, "rb") as handle:
            if entry.size == 0:
                view: Any = b""
            else:
                view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                if hashlib.sha256(view).hexdigest() != entry.sha256:
                    problems.append(f"file {entry.id} ({entry.path}): sha256 does not match")
                data = memoryview(view)
                for t in tensors:
                    if hashlib.sha256(view[t.offset : t.end]).hexdigest() != t.sha256:
                        problems.append(f"tensor {t.name}: sha256 does not match its bytes")
                    elif checksum.tensor_xxh3(data[t.offset : t.end]) != t.xxh3:
                        problems.append(f"tensor {t.name}: xxh3 does not match its bytes")
                ranges = checksum.rest_ranges(entry.size, [(t.offset, t.end) for t in tensors])
                rest = checksum.rest_xxh3_of(data, ranges)
                data.release()
                if rest != entry.rest_xxh3:
                    problems.append(f"file {entry.id} ({entry.path}): rest_xxh3 does not match"
                                    " the bytes outside its tensors")
                if entry.role is FileRole.PACKED:
                    problems.extend(_padding_problems(entry, view, tensors))
            finally:
                if isinstance(view, mmap.mmap):
                    view.close()
    return problems


def verify_template(
    template_dir: Path, function_dir: Path | None = None, content: bool = True
) -> VerifyReport:
    template_dir = Path(template_dir)
    try:
        manifest = read_manifest(template_dir)
    except TemplateError as exc:
        return VerifyReport(template_dir, (str(exc),), None)
    if function_dir is None:
        traced = manifest.raw.get("function", {}).get("traced_dir")
        function_dir = Path(traced) if traced else None
    problems = structure_problems(manifest, template_dir, function_dir)
    if not problems and content:
        problems = content_problems(manifest, template_dir, function_dir)
    return VerifyReport(template_dir, tuple(problems), manifest)


def _path_problems(entry: FileEntry, template_dir: Path, function_dir: Path | None) -> list[str]:
    if entry.base is FileBase.ABSOLUTE:
        if entry.role is FileRole.PACKED or not os.path.isabs(entry.path):
            return [f"file {entry.id}: {entry.path!r} must be a template-relative path"]
        return []
    if not is_safe_relative(entry.path):
        return [f"file {entry.id}: path {entry.path!r} escapes the {entry.base.value} folder"]
    if entry.role is FileRole.PACKED and entry.base is not FileBase.TEMPLATE:
        return [f"file {entry.id}: packed data must live in the template folder"]
    base = template_dir if entry.base is FileBase.TEMPLATE else function_dir
    if base is None:
        return [f"file {entry.id}: needs the function folder (--function-dir)"]
    resolved = (base / entry.path).resolve()
    if not resolved.is_relative_to(base.resolve()):
        return [f"file {entry.id}: path {entry.path!r} escapes the {entry.base.value} folder"
                " through a symlink"]
    return []


def _hole_problems(entry: FileEntry, ranges: list[tuple[int, int, str]]) -> list[str]:
    expected = 0
    for start, end, name in ranges:
        if start != align_up(expected):
            return [f"packed file has a hole or misplaced tensor before {name} (offset {start},"
                    f" expected {align_up(expected)})"]
        expected = end
    if expected != entry.size:
        return [f"packed file has {entry.size - expected} trailing bytes after its last tensor"]
    return []


def _padding_problems(entry: FileEntry, view: Any, tensors: list[Any]) -> list[str]:
    position = 0
    for t in sorted(tensors, key=lambda t: t.offset):
        if any(view[position : t.offset]):
            return [f"packed file: non-zero padding before tensor {t.name}"]
        position = t.end
    return []


__all__ = ["CheckedManifest", "VerifyReport", "read_checked", "read_manifest",
           "verify_template", "TemplateError"]
