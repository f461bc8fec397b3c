"""One copy of a template's static weights per host (CPU) or per GPU, shared by handlers.

    holder = hold(template_dir, function_dir, device="cpu")   # in the holder process
    info = holder.info                                         # send info.to_json()
    source = attach(HandleInfo.from_json(text))                # in each handler process
    with restore(template_dir, function_dir, source=source): ...

The buffer holds every tensor of the template at the offsets `buffer_layout` gives
(ALIGNMENT-aligned, in index order), so both sides compute the same layout from the
same manifest and the handle only names the buffer.

- CPU: a file in /dev/shm (shared memory). Handlers map it copy-on-write, so a
  handler that writes to a weight changes only its own pages.
- CUDA: one device buffer; `torch.multiprocessing`'s reduction exports one CUDA IPC
  handle for it (`cudaIpcGetMemHandle` underneath); handlers open it in milliseconds.
  The holder process must outlive its handlers.

Invariants:
- `hold` checks the template as a restore would (structure, fingerprint, the sha256
  of every file) before copying, so handlers that attach need not hash again.
- The handle carries the manifest's sha256; attaching to another template's buffer
  is refused.
- Closing the holder removes the shared memory file / frees the device buffer.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import pickle
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fwatchdog.template_cache.format import ALIGNMENT, Manifest, TemplateError, TensorEntry
from fwatchdog.template_cache.restore import MappedFiles, check_template, manifest_sha256
from fwatchdog.template_cache.tensors import TORCH_DTYPES, view_tensor

SHM_DIR = "/dev/shm"


@dataclass(frozen=True)
class HandleInfo:
    """What a handler needs to attach: JSON on the wire."""

    manifest_sha256: str
    kind: str  # "shm" or "cuda_ipc"
    device: str
    size: int
    offsets: dict[str, int]
    path: str | None = None  # shm file
    ipc: str | None = None  # base64 of the pickled CUDA IPC reduction

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HandleInfo:
        return cls(**json.loads(text))


def buffer_layout(manifest: Manifest) -> tuple[dict[str, int], int]:
    offsets: dict[str, int] = {}
    position = 0
    for entry in manifest.tensors:
        position = (position + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        offsets[entry.name] = position
        position += entry.nbytes
    return offsets, position


class Holder:
    """Owns the shared buffer; `close()` (or leaving `with`) releases it."""

    def __init__(self, info: HandleInfo, keep_alive: Any) -> None:
        self.info = info
        self._keep_alive = keep_alive

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.info.path:
            Path(self.info.path).unlink(missing_ok=True)
        self._keep_alive = None


def hold(template_dir: Path, function_dir: Path, device: str = "cpu") -> Holder:
    """Check the template as a restore would (structure, fingerprint, every file's
    sha256), then copy its tensors into one shared buffer on `device`."""
    manifest = check_template(Path(template_dir), Path(function_dir), None, hash_files=True)
    offsets, size = buffer_layout(manifest)
    files = MappedFiles(manifest, Path(template_dir), function_dir, "")
    digest = manifest_sha256(Path(template_dir))
    try:
        if torch.device(device).type == "cuda":
            return _hold_cuda(manifest, files, offsets, size, device, digest)
        return _hold_shm(manifest, files, offsets, size, digest)
    finally:
        files.close()


def _hold_shm(manifest: Manifest, files: MappedFiles, offsets: dict[str, int], size: int,
              digest: str) -> Holder:
    fd, path = tempfile.mkstemp(prefix="fwatchdog-template-", dir=SHM_DIR)
    try:
        os.ftruncate(fd, max(size, 1))
        with mmap.mmap(fd, max(size, 1)) as shared:
            for entry in manifest.tensors:
                if entry.nbytes:
                    source = files.tensor(entry).reshape(-1).view(torch.uint8)
                    start = offsets[entry.name]
                    shared[start : start + entry.nbytes] = memoryview(source.numpy())
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    info = HandleInfo(manifest_sha256=digest, kind="shm", device="cpu", size=size,
                      offsets=offsets, path=path)
    return Holder(info, None)


def _hold_cuda(manifest: Manifest, files: MappedFiles, offsets: dict[str, int], size: int,
               device: str, digest: str) -> Holder:
    from torch.multiprocessing.reductions import reduce_tensor

    buffer = torch.empty(max(size, 1), dtype=torch.uint8, device=device)

    def copy(entry: TensorEntry) -> None:
        source = files.tensor(entry).reshape(-1).view(torch.uint8)
        start = offsets[entry.name]
        buffer[start : start + entry.nbytes].copy_(source)

    # Several threads: page faults on the mapped files and host-to-device copies
    # release the GIL, one reader alone is bound far below the link.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(copy, [e for e in manifest.tensors if e.nbytes]))
    torch.cuda.synchronize(buffer.device)
    rebuild, args = reduce_tensor(buffer)
    payload = base64.b64encode(pickle.dumps((rebuild, args))).decode()
    info = HandleInfo(manifest_sha256=digest, kind="cuda_ipc", device=str(buffer.device),
                      size=size, offsets=offsets, ipc=payload)
    return Holder(info, buffer)


class AttachedBuffer:
    """A TensorSource over a holder's buffer; its bytes were verified by the holder."""

    verified = True

    def __init__(self, info: HandleInfo, base: Any) -> None:
        self.manifest_sha256 = info.manifest_sha256
        self._info = info
        self._base = base  # an mmap (shm) or a uint8 CUDA tensor

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        offset = self._info.offsets.get(entry.name)
        if offset is None:
            raise TemplateError(f"tensor {entry.name} is not in the held buffer")
        if isinstance(self._base, torch.Tensor):
            raw = self._base[offset : offset + entry.nbytes]
            return raw.view(TORCH_DTYPES[entry.dtype]).view(entry.shape)
        return view_tensor(self._base, offset, entry.dtype, entry.shape)

    def close(self) -> None:
        self._base = None


def attach(info: HandleInfo) -> AttachedBuffer:
    if info.kind == "shm":
        assert info.path is not None
        with open(info.path, "rb") as handle:
            base: Any = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return AttachedBuffer(info, base)
    if info.kind == "cuda_ipc":
        assert info.ipc is not None
        rebuild, args = pickle.loads(base64.b64decode(info.ipc))  # noqa: S301 - our own holder
        return AttachedBuffer(info, rebuild(*args))
    raise TemplateError(f"unknown holder kind {info.kind!r}")
