"""Stream a template's tensors out of their files with several reader threads, checking
every piece as it passes.

    hashed = fill(manifest, paths, offsets, sink, Verify.FULL, readers=8)

`fill` cuts every tensor into `checksum.PIECE_BYTES` pieces and hands them to
`readers` threads. For each piece a thread asks the sink for a writable target
(`sink.target(buffer_offset, length)`), reads the bytes into it with `os.preadv`,
hashes them (when the tensor's file is checked), and calls `sink.after(...)` (the
CUDA sink starts the device copy there). Each file's bytes outside its tensors are
checked too. The holder's sinks write into its shared buffer; `ScratchSink` only
reads, for the check a restore from files makes.

Verify modes: FULL hashes every tensor; QUICK hashes only the tensors of files whose
size or mtime differ from the trace's (or whose mtime was not recorded); NONE hashes
no tensor. Every mode checks the bytes outside the tensors (headers, configs).

Invariants:
- The first mismatch stops the readers and `fill` raises a TemplateError naming the
  tensor (or the file); the caller discards what the sink received.
- Reads never go past the ranges the manifest gives (the structure check made sure
  they lie inside the files); a file that became shorter is an error, not a hang.
- No torch here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from fwatchdog.template_cache import checksum
from fwatchdog.template_cache.format import Manifest, TemplateError, TensorEntry


class Verify(str, Enum):
    """How the bytes of a template are checked when they are read (module doc)."""

    FULL = "full"
    QUICK = "quick"
    NONE = "none"

    @classmethod
    def of(cls, value: bool | str | Verify) -> Verify:
        if value is True:
            return cls.FULL
        if value is False:
            return cls.NONE
        try:
            return cls(value)
        except ValueError:
            raise TemplateError(f"verify must be True, False, 'full', 'quick' or 'none',"
                                f" not {value!r}") from None


def default_readers() -> int:
    return max(2, min(12, os.cpu_count() or 2))


class Sink(Protocol):
    def target(self, offset: int, length: int) -> memoryview: ...

    def after(self, offset: int, length: int) -> None: ...


class ScratchSink:
    """Reads into one scratch buffer per thread: checking without keeping the bytes."""

    def __init__(self) -> None:
        self._local = threading.local()

    def target(self, offset: int, length: int) -> memoryview:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = memoryview(bytearray(checksum.PIECE_BYTES))
        return scratch[:length]

    def after(self, offset: int, length: int) -> None:
        """Nothing to do: the bytes were only checked."""


@dataclass
class _Unit:
    entry: TensorEntry
    piece: int
    fd: int
    source: int  # offset in the file
    target: int  # offset in the sink's buffer
    length: int


@dataclass
class _Progress:
    digests: dict[str, list[bytes | None]] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    failure: BaseException | None = None
    hashed: int = 0
    files: dict[str, str] = field(default_factory=dict)  # file id -> manifest path
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if self.failure is None:
                self.failure = error


def hashed_files(manifest: Manifest, paths: dict[str, Path], mode: Verify) -> set[str]:
    """The ids of the files whose tensors are hashed in `mode`."""
    if mode is Verify.FULL:
        return {f.id for f in manifest.files}
    if mode is Verify.NONE:
        return set()
    return {entry.id for entry in manifest.files
            if entry.mtime_ns is None or paths[entry.id].stat().st_mtime_ns != entry.mtime_ns}


def fill(manifest: Manifest, paths: dict[str, Path], offsets: dict[str, int] | None,
         sink: Sink, mode: Verify, readers: int) -> int:
    """Read every tensor into `sink`, checking as `mode` says; returns the bytes hashed.
    `offsets` places each tensor in the sink's buffer (None: at its file offset)."""
    descriptors: dict[str, int] = {}
    progress = _Progress(files={f.id: f.path for f in manifest.files})
    try:
        for file_id, path in paths.items():
            descriptors[file_id] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(descriptors[file_id], 0, 0, os.POSIX_FADV_SEQUENTIAL)
        checked = hashed_files(manifest, paths, mode)
        units: list[_Unit] = []
        for entry in sorted(manifest.tensors, key=lambda t: (t.file, t.offset)):
            spans = checksum.pieces(entry.nbytes)
            if entry.file in checked:
                progress.digests[entry.name] = [None] * len(spans)
                progress.left[entry.name] = len(spans)
                if not spans:
                    _check_tensor(entry, [], progress)
            base = entry.offset if offsets is None else offsets[entry.name]
            for index, (start, length) in enumerate(spans):
                units.append(_Unit(entry, index, descriptors[entry.file], entry.offset + start,
                                   base + start, length))
        queue: Iterator[_Unit] = iter(units)
        lock = threading.Lock()

        def reader() -> None:
            try:
                while progress.failure is None:
                    with lock:
                        unit = next(queue, None)
                    if unit is None:
                        return
                    _copy_unit(unit, sink, progress, paths)
            except BaseException as exc:  # noqa: BLE001 - reported by fill, in order
                progress.fail(exc)

        def rest(file_id: str) -> None:
            try:
                _check_rest(manifest, file_id, descriptors[file_id], progress)
            except BaseException as exc:  # noqa: BLE001 - reported by fill
                progress.fail(exc)

        # The rest of each file first (small: headers and configs), then the tensors.
        threads = [threading.Thread(target=rest, args=(f.id,), name="fwatchdog-check")
                   for f in manifest.files]
        threads += [threading.Thread(target=reader, name=f"fwatchdog-reader-{n}")
                    for n in range(max(1, readers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if progress.failure is not None:
            if isinstance(progress.failure, TemplateError):
                raise progress.failure
            raise TemplateError(f"reading the template failed: {progress.failure!r}") from (
                progress.failure)
        return progress.hashed
    finally:
        for fd in descriptors.values():
            os.close(fd)


def _read_into(fd: int, target: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(target):
        count = os.preadv(fd, [target[done:]], offset + done)
        if count <= 0:
            raise TemplateError(f"file {path} ended before byte {offset + len(target)}"
                                " (truncated since the check?)")
        done += count


def _copy_unit(unit: _Unit, sink: Sink, progress: _Progress, paths: dict[str, Path]) -> None:
    entry = unit.entry
    target = sink.target(unit.target, unit.length)
    try:
        _read_into(unit.fd, target, unit.source, paths[entry.file])
        if entry.name in progress.digests:
            digest = checksum.piece_digest(target)
            with progress.lock:
                progress.hashed += unit.length
                digests = progress.digests[entry.name]
                digests[unit.piece] = digest
                progress.left[entry.name] -= 1
                complete = progress.left[entry.name] == 0
            if complete:
                _check_tensor(entry, [d for d in digests if d is not None], progress)
    finally:
        target.release()
    sink.after(unit.target, unit.length)


def _check_tensor(entry: TensorEntry, digests: list[bytes], progress: _Progress) -> None:
    if checksum.combine(digests) != entry.xxh3:
        progress.fail(TemplateError(
            f"tensor {entry.name}: its bytes in file {entry.file}"
            f" ({progress.files.get(entry.file, '?')}) do not match the template's checksum"
            " (changed since the trace)"))


def _check_rest(manifest: Manifest, file_id: str, fd: int, progress: _Progress) -> None:
    entry = manifest.file(file_id)
    covered = [(t.offset, t.end) for t in manifest.tensors if t.file == file_id]
    ranges = checksum.rest_ranges(entry.size, covered)

    def read(start: int, length: int) -> bytes:
        data = os.pread(fd, length, start)
        if len(data) != length:
            raise TemplateError(f"file {entry.id} ({entry.path}) is shorter than the manifest"
                                " says")
        return data

    if checksum.rest_xxh3(read, ranges) != entry.rest_xxh3:
        progress.fail(TemplateError(
            f"file {entry.id} ({entry.path}) changed since the trace: the bytes outside its"
            " tensors (header, config) differ"))
    with progress.lock:
        progress.hashed += sum(end - start for start, end in ranges)


def check_files(manifest: Manifest, paths: dict[str, Path], mode: Verify,
                readers: int | None = None) -> int:
    """Check a template's files without keeping their bytes (a restore from files)."""
    return fill(manifest, paths, None, ScratchSink(), mode, readers or default_readers())


__all__ = ["ScratchSink", "Sink", "Verify", "check_files", "default_readers", "fill",
           "hashed_files"]
