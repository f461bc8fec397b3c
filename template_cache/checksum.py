"""The fast checksums of format version 2: per tensor and per file, XXH3-128.

A tensor's `xxh3` is a two-level hash so that several threads can check the pieces
of one large tensor at once: its bytes are cut into PIECE_BYTES pieces (the last one
shorter), each piece is hashed with XXH3-128, and the tensor's checksum is the
XXH3-128 of the concatenated 16-byte piece digests. A tensor of zero bytes has no
pieces: its checksum is the XXH3-128 of no bytes.

A file's `rest_xxh3` covers every byte that no tensor entry of the manifest covers
(a safetensors header, a config file, tensors the template does not use), hashed as
one stream in file order. Per-tensor checksums plus the rest cover the whole file.

Invariants:
- Pure functions of bytes; no torch, no global state. xxhash releases the GIL while
  it hashes, so threads hash in parallel.
- `pieces` and `rest_ranges` only return ranges inside the sizes they were given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import xxhash

PIECE_BYTES = 8 << 20  # fixed by the format: changing it changes every checksum
DIGEST_BYTES = 16


def pieces(nbytes: int) -> list[tuple[int, int]]:
    """(start, length) of each piece of an `nbytes` long tensor."""
    return [(start, min(PIECE_BYTES, nbytes - start)) for start in range(0, nbytes, PIECE_BYTES)]


def piece_digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def combine(digests: Sequence[bytes]) -> str:
    """A tensor's checksum from its piece digests, in piece order."""
    return xxhash.xxh3_128_hexdigest(b"".join(digests))


def tensor_xxh3(data: bytes | memoryview) -> str:
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    return combine([piece_digest(view[start : start + length])
                    for start, length in pieces(len(view))])


def rest_ranges(size: int, covered: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) of the bytes of a `size`-byte file outside the `covered` ranges."""
    result: list[tuple[int, int]] = []
    position = 0
    for start, end in sorted(covered):
        start, end = max(0, min(start, size)), max(0, min(end, size))
        if start > position:
            result.append((position, start))
        position = max(position, end)
    if position < size:
        result.append((position, size))
    return result


def rest_xxh3(read: Callable[[int, int], bytes | memoryview], ranges: Iterable[tuple[int, int]],
              chunk: int = PIECE_BYTES) -> str:
    """Stream the `ranges` through one XXH3-128; `read(start, length)` returns bytes."""
    state = xxhash.xxh3_128()
    for start, end in ranges:
        for position in range(start, end, chunk):
            state.update(read(position, min(chunk, end - position)))
    return state.hexdigest()


def rest_xxh3_of(view: memoryview, ranges: Iterable[tuple[int, int]]) -> str:
    """`rest_xxh3` of bytes already in memory (a mapped file)."""
    return rest_xxh3(lambda start, length: view[start : start + length], ranges)


__all__ = ["PIECE_BYTES", "combine", "piece_digest", "pieces", "rest_ranges", "rest_xxh3",
           "rest_xxh3_of", "tensor_xxh3"]
