"""The function template format: constants, dtype table and the typed manifest.

FORMAT.md in this folder is the specification; this module is its executable half.
It imports no torch, so the front and the `verify` command can read a template
without paying for torch.

Invariants:
- A template is a folder holding `manifest.json` and the files it names.
- `format_version` is an integer; a reader refuses any version it does not know.
- Every tensor lives in exactly one file entry, at `offset`, `nbytes` long, and
  `nbytes == prod(shape) * itemsize(dtype)`.
- Packed tensors start on `ALIGNMENT`-byte boundaries; the packed file has no holes
  larger than the padding to the next boundary, and the padding is zero bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

FORMAT_NAME = "fwatchdog-template"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
PACKED_NAME = "weights.bin"
ALIGNMENT = 64

# safetensors' dtype codes, so a tensor index reads the same as a safetensors header.
DTYPE_ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class FileBase(str, Enum):
    """What a file entry's `path` is relative to."""

    TEMPLATE = "template"  # inside the template folder (packed data)
    FUNCTION = "function"  # inside the function folder (original weight files)
    ABSOLUTE = "absolute"  # an absolute path as traced, trusted only by size + sha256


class FileRole(str, Enum):
    PACKED = "packed"
    SOURCE = "source"


class TemplateError(ValueError):
    """A template is unusable; the message says what is wrong and where."""


@dataclass(frozen=True)
class FileEntry:
    id: str
    role: FileRole
    base: FileBase
    path: str
    size: int
    sha256: str
    rest_xxh3: str  # XXH3-128 of the bytes no tensor entry covers (checksum.py)
    mtime_ns: int | None = None  # as traced; only the opt-in quick check reads it

    def resolve(self, template_dir: Path, function_dir: Path | None) -> Path:
        if self.base is FileBase.ABSOLUTE:
            return Path(self.path)
        if self.base is FileBase.TEMPLATE:
            return template_dir / self.path
        if function_dir is None:
            raise TemplateError(f"file {self.id} ({self.path}) needs the function folder")
        return function_dir / self.path


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    sha256: str
    xxh3: str  # piece-wise XXH3-128 (checksum.py), checked while the bytes stream
    mutated: bool

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


@dataclass(frozen=True)
class Manifest:
    """The parts of a manifest that locate bytes; the rest stays a plain dict."""

    version: int
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorEntry, ...]
    raw: dict[str, Any]

    def file(self, file_id: str) -> FileEntry:
        for entry in self.files:
            if entry.id == file_id:
                return entry
        raise TemplateError(f"no file entry with id {file_id!r}")

    def tensor_map(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    return (value + alignment - 1) // alignment * alignment


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_ITEMSIZE[dtype]


def is_safe_relative(path: str) -> bool:
    """True for a normalised relative POSIX path that cannot leave its base folder."""
    if not path or "\\" in path or "\x00" in path:
        return False
    pure = PurePosixPath(path)
    if pure.is_absolute():
        return False
    return all(part not in ("..", ".", "") for part in path.split("/"))


def dumps_manifest(manifest: dict[str, Any]) -> bytes:
    """The one canonical serialisation: golden files compare these exact bytes."""
    return (json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def parse_manifest(raw: dict[str, Any]) -> Manifest:
    """Build the typed view of a manifest that already passed the JSON schema."""
    files = tuple(
        FileEntry(
            id=f["id"],
            role=FileRole(f["role"]),
            base=FileBase(f["base"]),
            path=f["path"],
            size=f["size"],
            sha256=f["sha256"],
            rest_xxh3=f["rest_xxh3"],
            mtime_ns=f.get("mtime_ns"),
        )
        for f in raw["files"]
    )
    tensors = tuple(
        TensorEntry(
            name=t["name"],
            file=t["file"],
            offset=t["offset"],
            nbytes=t["nbytes"],
            dtype=t["dtype"],
            shape=tuple(t["shape"]),
            sha256=t["sha256"],
            xxh3=t["xxh3"],
            mutated=t["mutated"],
        )
        for t in raw["tensors"]
    )
    return Manifest(version=raw["format_version"], files=files, tensors=tensors, raw=raw)
