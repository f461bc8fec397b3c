"""Write a function template folder: packed weights, then the manifest, atomically.

Invariants:
- The folder appears complete or not at all: everything is written under a sibling
  `<name>.partial` folder that is renamed into place last.
- Packed tensors are written in the order they are added, each at the next
  ALIGNMENT boundary, zero padding between them and none after the last, so the same
  inputs always give the same bytes (golden files rely on it).
- The writer takes bytes, not torch tensors: the tracer converts, the format stays
  torch-free.
"""

from __future__ import annotations

import hashlib
import mmap
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwatchdog.template_cache import checksum
from fwatchdog.template_cache.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PACKED_NAME,
    FileBase,
    FileRole,
    TemplateError,
    align_up,
    dumps_manifest,
    expected_nbytes,
    is_safe_relative,
)

PACKED_ID = "packed"


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class TemplateWriter:
    """Collects files and tensors, then `finish()` writes the folder.

    Usage: add_source_file / add_source_tensor for bytes that stay in the original
    weight files, add_packed for bytes the template must hold itself.
    """

    out_dir: Path
    created_by: str = "fwatchdog.tracer"
    # Record each file's mtime for the opt-in quick check (off for golden files,
    # whose bytes must not depend on when they were written).
    record_mtimes: bool = False
    _files: list[dict[str, Any]] = field(default_factory=list)
    _tensors: list[dict[str, Any]] = field(default_factory=list)
    _packed_size: int = 0
    _packed_digest: Any = field(default_factory=hashlib.sha256)
    _packed_handle: Any = None
    _names: set[str] = field(default_factory=set)
    _local: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self._partial = self.out_dir.with_name(self.out_dir.name + ".partial")
        if self._partial.exists():
            shutil.rmtree(self._partial)
        self._partial.mkdir(parents=True)
        self._packed_handle = open(self._partial / PACKED_NAME, "wb")  # noqa: SIM115

    def add_source_file(self, path: str, base: FileBase, size: int, sha256: str, *,
                        local: Path) -> str:
        """`local` is where the file is now: the writer reads it for the checksums of
        version 2 (each tensor's xxh3 and the rest of the file)."""
        if base is FileBase.TEMPLATE:
            raise TemplateError("source files live outside the template")
        if base is FileBase.FUNCTION and not is_safe_relative(path):
            raise TemplateError(f"function-relative path {path!r} is not inside the folder")
        if base is FileBase.ABSOLUTE and not path.startswith("/"):
            raise TemplateError(f"absolute path expected, got {path!r}")
        for existing in self._files:
            if existing["path"] == path and existing["base"] == base.value:
                return str(existing["id"])
        file_id = f"src{len(self._files)}"
        entry: dict[str, Any] = {
            "id": file_id,
            "role": FileRole.SOURCE.value,
            "base": base.value,
            "path": path,
            "size": size,
            "sha256": sha256,
        }
        if self.record_mtimes:
            entry["mtime_ns"] = Path(local).stat().st_mtime_ns
        self._files.append(entry)
        self._local[file_id] = Path(local)
        return file_id

    def add_source_tensor(
        self,
        name: str,
        file_id: str,
        offset: int,
        dtype: str,
        shape: tuple[int, ...],
        sha256: str,
        mutated: bool,
    ) -> None:
        self._add_entry(name, file_id, offset, expected_nbytes(dtype, shape), dtype, shape, sha256,
                        mutated)

    def add_packed(
        self,
        name: str,
        data: bytes | memoryview,
        dtype: str,
        shape: tuple[int, ...],
        mutated: bool,
    ) -> None:
        nbytes = len(memoryview(data).cast("B"))
        if nbytes != expected_nbytes(dtype, shape):
            raise TemplateError(f"tensor {name}: {nbytes} bytes for {dtype}{list(shape)}")
        offset = align_up(self._packed_size) if self._packed_size else 0
        padding = offset - self._packed_size
        if padding:
            self._write_packed(b"\x00" * padding)
        self._write_packed(data)
        self._add_entry(name, PACKED_ID, offset, nbytes, dtype, shape, sha256_bytes(data), mutated,
                        checksum.tensor_xxh3(memoryview(data).cast("B")))

    def mark_mutated(self, name: str) -> None:
        for entry in self._tensors:
            if entry["name"] == name:
                entry["mutated"] = True

    def finish(self, fingerprint: dict[str, Any], body: dict[str, Any]) -> Path:
        """Write the manifest and move the folder into place. `body` holds function,
        loads, skipped_loads and trace."""
        self._packed_handle.close()
        packed: dict[str, Any] = {
            "id": PACKED_ID,
            "role": FileRole.PACKED.value,
            "base": FileBase.TEMPLATE.value,
            "path": PACKED_NAME,
            "size": self._packed_size,
            "sha256": self._packed_digest.hexdigest(),
        }
        if self.record_mtimes:
            packed["mtime_ns"] = (self._partial / PACKED_NAME).stat().st_mtime_ns
        self._local[PACKED_ID] = self._partial / PACKED_NAME
        files = [packed, *self._files]
        self._fast_checksums(files)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created_by": self.created_by,
            "fingerprint": fingerprint,
            "files": files,
            "tensors": self._tensors,
            **body,
        }
        (self._partial / MANIFEST_NAME).write_bytes(dumps_manifest(manifest))
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        self._partial.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        self._packed_handle.close()
        shutil.rmtree(self._partial, ignore_errors=True)

    def _fast_checksums(self, files: list[dict[str, Any]]) -> None:
        """Each source tensor's xxh3 and every file's rest_xxh3, read from the files."""
        for entry in files:
            tensors = [t for t in self._tensors if t["file"] == entry["id"]]
            path = self._local[entry["id"]]
            with open(path, "rb") as handle:
                view: Any = (mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
                             if entry["size"] else b"")
                try:
                    data = memoryview(view)
                    for t in tensors:
                        if t["xxh3"] is None:
                            t["xxh3"] = checksum.tensor_xxh3(
                                data[t["offset"] : t["offset"] + t["nbytes"]])
                    ranges = checksum.rest_ranges(
                        entry["size"], [(t["offset"], t["offset"] + t["nbytes"]) for t in tensors])
                    entry["rest_xxh3"] = checksum.rest_xxh3_of(data, ranges)
                    data.release()
                finally:
                    if isinstance(view, mmap.mmap):
                        view.close()

    def _write_packed(self, data: bytes | memoryview) -> None:
        self._packed_handle.write(data)
        self._packed_digest.update(data)
        self._packed_size += len(memoryview(data).cast("B"))

    def _add_entry(self, name: str, file_id: str, offset: int, nbytes: int, dtype: str,
                   shape: tuple[int, ...], sha256: str, mutated: bool,
                   xxh3: str | None = None) -> None:
        if name in self._names:
            raise TemplateError(f"tensor {name!r} added twice")
        self._names.add(name)
        self._tensors.append(
            {
                "name": name,
                "file": file_id,
                "offset": offset,
                "nbytes": nbytes,
                "dtype": dtype,
                "shape": list(shape),
                "sha256": sha256,
                "xxh3": xxh3,  # source tensors: filled from the file in finish()
                "mutated": mutated,
            }
        )


__all__ = ["PACKED_ID", "TemplateWriter", "sha256_bytes", "sha256_file"]
