"""One copy of a template's static weights per host (CPU) or per GPU, shared by handlers.

    holder = hold(template_dir, function_dir, device="cuda")    # the holder process
    text, fds = holder.info.to_json(), holder.fds()             # fds go with SCM_RIGHTS
    source = attach(HandleInfo.from_json(text), received_fds)   # each handler process
    with restore(template_dir, function_dir, source=source) as stats: ...
    holder.release(); ...; info = holder.reload()                # GPU idle, then wake

The buffer holds every tensor of the template at the offsets `buffer_layout` gives
(ALIGNMENT-aligned, in index order); the handle lists them, so a handler needs only
the handle and (on CPU) the buffer's file descriptor.

- CPU: an anonymous `memfd_create` file, never a name in /dev/shm. Its pages are
  reserved with `posix_fallocate` before anything is copied, so too little memory is
  a `TemplateError` saying so, never a SIGBUS; it is sealed (no shrink, grow or
  write) once filled, and freed when its last descriptor and mapping go.
  Handlers map it read-only.
- CUDA: one device buffer. Its CUDA IPC handle (raw bytes, base64 in JSON: plain
  data, never a pickle) opens it in a handler in milliseconds.

Loading: the weight files are read with `os.preadv` by several reader threads, in
pieces of `checksum.PIECE_BYTES`. On CPU each piece lands straight in the memfd
mapping; on CUDA in a small ring of pinned host buffers (two per reader), then
copied to the device on the reader's own stream, so the whole model is never pinned
and reading, hashing and copying overlap.

Verification (`verify`): "full" (True, the default) hashes every tensor's pieces in
the reader threads, right after they were read, and compares them with the
manifest's per-tensor XXH3-128; "quick" (opt-in, for read-only images) trusts a file
whose size and mtime are as traced and checks only the bytes outside its tensors
(the safetensors header, config files); "none" (False) checks sizes only, for
measuring what verification costs. In every mode the bytes outside the tensors of
each file are checked, and any mismatch fails the fill with a TemplateError that
names the tensor or file, after discarding whatever was copied.

Invariants:
- `hold` checks structure and fingerprint as a restore would before it reads.
- A handle carries the manifest's sha256 and a generation number that `reload`
  increments; attaching to another template's buffer is refused by restore.
- `release` and `close` free the buffer; the holder's caller makes sure no live
  handler maps it first (CUDA memory freed under a handler is undefined behaviour).
- On CUDA torch's own IPC reference counting is not used: the holder accounts for
  the one export it makes and releases it itself, so `release` frees device memory
  at once.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import mmap
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fwatchdog.template_cache import checksum
from fwatchdog.template_cache.format import ALIGNMENT, Manifest, TemplateError, TensorEntry
from fwatchdog.template_cache.restore import check_template, manifest_sha256
from fwatchdog.template_cache.stream import Verify, default_readers, fill
from fwatchdog.template_cache.tensors import TORCH_DTYPES, view_tensor

LOG = logging.getLogger("fwatchdog.template_cache")

MEMFD_NAME = "fwatchdog-template"
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
RING_SLOTS = 2  # pinned buffers per reader: one being read while one is copied


@dataclass(frozen=True)
class HandleInfo:
    """What a handler needs to attach, besides the memfd on CPU: JSON on the wire."""

    manifest_sha256: str
    kind: str  # "memfd" or "cuda_ipc"
    device: str  # "cpu" or "cuda:N" (N as the holder's CUDA_VISIBLE_DEVICES numbers it)
    size: int  # bytes of the buffer
    offsets: dict[str, int]  # tensor index name -> byte offset in the buffer
    generation: int = 0  # incremented by each reload
    verified: str = Verify.FULL.value  # how the holder checked the bytes
    ipc_handle: str | None = None  # base64 of the raw cudaIpcMemHandle bytes
    ipc_storage_size: int = 0  # bytes of the exported allocation
    ipc_storage_offset: int = 0  # where the buffer starts in it

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> HandleInfo:
        """Parse and type-check a handle; TemplateError for anything malformed."""
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TemplateError(f"holder handle is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise TemplateError("holder handle must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TemplateError(f"holder handle has unknown fields {unknown}")
        types: dict[str, tuple[type, ...]] = {
            "manifest_sha256": (str,), "kind": (str,), "device": (str,), "size": (int,),
            "offsets": (dict,), "generation": (int,), "verified": (str,),
            "ipc_handle": (str, type(None)), "ipc_storage_size": (int,),
            "ipc_storage_offset": (int,)}
        for name in ("manifest_sha256", "kind", "device", "size", "offsets"):
            if name not in raw:
                raise TemplateError(f"holder handle lacks {name!r}")
        for name, value in raw.items():
            if not isinstance(value, types[name]) or (
                    isinstance(value, bool) and bool not in types[name]):
                raise TemplateError(f"holder handle field {name} has the wrong type")
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                raise TemplateError(f"holder handle field {name} is negative")
        size = raw["size"]
        for name, offset in raw["offsets"].items():
            if not isinstance(offset, int) or isinstance(offset, bool) or not (
                    0 <= offset <= size):
                raise TemplateError(f"holder handle: offset of {name!r} is out of range")
        if raw["kind"] not in ("memfd", "cuda_ipc"):
            raise TemplateError(f"unknown holder kind {raw['kind']!r}")
        return cls(**raw)


def buffer_layout(manifest: Manifest) -> tuple[dict[str, int], int]:
    offsets: dict[str, int] = {}
    position = 0
    for entry in manifest.tensors:
        position = (position + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        offsets[entry.name] = position
        position += entry.nbytes
    return offsets, position


@dataclass(frozen=True)
class LoadStats:
    """One fill of the buffer; the runtime exports `seconds` as holder_load."""

    bytes: int
    seconds: float
    verify: str
    readers: int
    hashed_bytes: int

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


# --- memory ----------------------------------------------------------------------

def memory_available(cgroup_root: Path = Path("/sys/fs/cgroup"),
                     meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes this process may still fill with shared memory, or None when unknown:
    the smaller of the host's MemAvailable and what the cgroup (v2 or v1) allows,
    counting its reclaimable page cache as free."""
    candidates: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    limit = _cgroup_headroom(cgroup_root)
    if limit is not None:
        candidates.append(limit)
    return min(candidates) if candidates else None


def _cgroup_headroom(root: Path) -> int | None:
    def number(path: Path) -> int | None:
        try:
            text = path.read_text().strip()
        except OSError:
            return None
        return None if text in ("max", "") else int(text) if text.isdigit() else None

    def stat(path: Path) -> dict[str, int]:
        try:
            pairs = (line.split() for line in path.read_text().splitlines())
            return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
        except OSError:
            return {}

    limit, used = number(root / "memory.max"), number(root / "memory.current")
    if limit is not None and used is not None:  # cgroup v2
        values = stat(root / "memory.stat")
        reclaimable = values.get("file", 0) - values.get("shmem", 0)
        return max(0, limit - used + max(0, reclaimable))
    v1 = root / "memory"
    limit, used = number(v1 / "memory.limit_in_bytes"), number(v1 / "memory.usage_in_bytes")
    if limit is not None and used is not None and limit < 1 << 60:
        values = stat(v1 / "memory.stat")
        reclaimable = values.get("total_cache", values.get("cache", 0)) - values.get(
            "total_shmem", values.get("shmem", 0))
        return max(0, limit - used + max(0, reclaimable))
    return None


# --- the buffers ---------------------------------------------------------------

class _MemfdBuffer:
    """The CPU buffer: readers write straight into a shared mapping of the memfd."""

    def __init__(self, size: int, available: int | None) -> None:
        length = max(size, 1)
        if available is not None and length > available:
            raise TemplateError(
                f"not enough memory to hold the template: it needs {length} bytes of shared"
                f" memory, {available} are available to this process")
        self.fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                os.posix_fallocate(self.fd, 0, length)
            except OSError as exc:
                raise TemplateError(
                    f"not enough memory to hold the template: reserving {length} bytes of"
                    f" shared memory failed ({os.strerror(exc.errno or 0)})") from exc
            self._map: mmap.mmap | None = mmap.mmap(self.fd, length)
            self.view: memoryview | None = memoryview(self._map)
        except BaseException:
            os.close(self.fd)
            raise

    def target(self, offset: int, length: int) -> memoryview:
        assert self.view is not None
        return self.view[offset : offset + length]

    def after(self, offset: int, length: int) -> None:
        """Nothing to copy: the bytes are already in place."""

    def finish(self) -> None:
        """Unmap and seal: from now on nobody can write, shrink or grow it."""
        if self.view is not None:
            self.view.release()
            self.view = None
        if self._map is not None:
            self._map.close()
            self._map = None
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)

    def discard(self) -> None:
        try:
            with contextlib.suppress(BufferError):  # a view still alive: freed with it
                if self.view is not None:
                    self.view.release()
                if self._map is not None:
                    self._map.close()
        finally:
            self.view, self._map = None, None
            os.close(self.fd)


class _CudaBuffer:
    """The device buffer, filled through per-reader rings of pinned host buffers."""

    def __init__(self, size: int, device: torch.device, readers: int) -> None:
        self.device = device
        try:
            self.tensor: torch.Tensor | None = torch.empty(
                max(size, 1), dtype=torch.uint8, device=device)
        except torch.cuda.OutOfMemoryError as exc:
            raise TemplateError(f"not enough GPU memory to hold the template ({size} bytes):"
                                f" {exc}") from exc
        self._local = threading.local()
        self._rings: list[Any] = []
        self._lock = threading.Lock()

    def _ring(self) -> Any:
        ring = getattr(self._local, "ring", None)
        if ring is None:
            stream = torch.cuda.Stream(device=self.device)
            slots = [(torch.empty(checksum.PIECE_BYTES, dtype=torch.uint8, pin_memory=True),
                      torch.cuda.Event()) for _ in range(RING_SLOTS)]
            ring = self._local.ring = {"stream": stream, "slots": slots, "next": 0,
                                       "pending": None}
            with self._lock:
                self._rings.append(ring)
        return ring

    def target(self, offset: int, length: int) -> memoryview:
        ring = self._ring()
        pinned, event = ring["slots"][ring["next"]]
        event.synchronize()  # the copy that last used this slot is done
        ring["pending"] = (pinned, event, offset, length)
        array: Any = pinned[:length].numpy()
        return memoryview(array).cast("B")

    def after(self, offset: int, length: int) -> None:
        ring = self._ring()
        pinned, event, _, _ = ring["pending"]
        assert self.tensor is not None
        with torch.cuda.device(self.device), torch.cuda.stream(ring["stream"]):
            self.tensor[offset : offset + length].copy_(pinned[:length], non_blocking=True)
            event.record(ring["stream"])
        ring["next"] = (ring["next"] + 1) % RING_SLOTS

    def finish(self) -> None:
        for ring in self._rings:
            ring["stream"].synchronize()
        torch.cuda.synchronize(self.device)
        self._free_ring()

    def _free_ring(self) -> None:
        """The pinned ring goes back to the system, not to torch's pinned-memory cache:
        nothing stays pinned after a fill. (The readers' thread-local references died
        with the reader threads.)"""
        self._rings.clear()
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if empty_host_cache is not None:
            empty_host_cache()

    def discard(self) -> None:
        for ring in self._rings:
            ring["stream"].synchronize()
        self._free_ring()
        self.tensor = None
        torch.cuda.empty_cache()


# --- the holder ------------------------------------------------------------------

class Holder:
    """Owns the shared buffer of one template on one device.

    `info` and `fds()` describe the current buffer; `release()` frees it, `reload()`
    fills a new one (a new generation, new fds); `close()` (or leaving `with`)
    releases for good."""

    def __init__(self, template_dir: Path, function_dir: Path, device: str, verify: Verify,
                 readers: int) -> None:
        self.template_dir = Path(template_dir)
        self.function_dir = Path(function_dir)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.type not in ("cpu", "cuda"):
            raise TemplateError(f"the holder keeps weights on cpu or cuda, not {device!r}")
        self.verify = verify
        self.readers = readers
        self.stats: LoadStats | None = None
        self._info: HandleInfo | None = None
        self._generation = -1
        self._memfd: int | None = None
        self._cuda: torch.Tensor | None = None
        self._ipc_counter: tuple[bytes, int] | None = None
        self._closed = False

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def info(self) -> HandleInfo:
        if self._info is None:
            raise TemplateError("the holder's buffer is released; reload() first")
        return self._info

    @property
    def loaded(self) -> bool:
        return self._info is not None

    def fds(self) -> list[int]:
        """The descriptors a handler needs with `info`: [memfd] on CPU, [] on CUDA.
        The holder keeps owning them; send duplicates over SCM_RIGHTS."""
        return [self._memfd] if self._memfd is not None else []

    def reload(self) -> HandleInfo:
        """Fill a fresh buffer (checks again, streams and verifies), freeing the old."""
        if self._closed:
            raise TemplateError("the holder is closed")
        self.release()
        manifest = check_template(self.template_dir, self.function_dir, None, verify=False)
        digest = manifest_sha256(self.template_dir)
        offsets, size = buffer_layout(manifest)
        paths = {f.id: f.resolve(self.template_dir, self.function_dir) for f in manifest.files}
        started = time.perf_counter()
        sink: Any = (_CudaBuffer(size, self.device, self.readers) if self.device.type == "cuda"
                     else _MemfdBuffer(size, memory_available()))
        try:
            hashed = fill(manifest, paths, offsets, sink, self.verify, self.readers)
            sink.finish()
        except BaseException as exc:
            sink.discard()
            LOG.warning("template_hold_failed template=%s device=%s reason=%r",
                        self.template_dir, self.device, str(exc))
            raise
        self._generation += 1
        base = {"manifest_sha256": digest, "size": size, "offsets": offsets,
                "generation": self._generation, "verified": self.verify.value}
        if isinstance(sink, _CudaBuffer):
            assert sink.tensor is not None
            self._cuda = sink.tensor
            shared = self._cuda.untyped_storage()._share_cuda_()
            _, handle, storage_size, storage_offset, counter, counter_offset = shared[:6]
            self._ipc_counter = (counter, counter_offset)
            self._info = HandleInfo(kind="cuda_ipc", device=str(self.device),
                                    ipc_handle=base64.b64encode(handle).decode(),
                                    ipc_storage_size=storage_size,
                                    ipc_storage_offset=storage_offset, **base)
        else:
            self._memfd = sink.fd
            self._info = HandleInfo(kind="memfd", device="cpu", **base)
        seconds = time.perf_counter() - started
        self.stats = LoadStats(bytes=size, seconds=seconds, verify=self.verify.value,
                               readers=self.readers, hashed_bytes=hashed)
        LOG.info("template_hold_done template=%s device=%s kind=%s generation=%d bytes=%d"
                 " seconds=%.3f gb_per_s=%.2f verify=%s readers=%d hashed_bytes=%d",
                 self.template_dir, self.device, self._info.kind, self._generation, size,
                 seconds, self.stats.gb_per_s, self.verify.value, self.readers, hashed)
        return self._info

    def release(self) -> None:
        """Free the buffer (device memory, or the holder's memfd). Handlers that still
        map a CPU buffer keep its pages until they unmap; a CUDA buffer must not be
        mapped by any live handler."""
        if self._info is None:
            return
        kind = self._info.kind
        self._info = None
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
        if self._cuda is not None:
            if self._ipc_counter is not None:
                # Our one export: give its reference back so torch frees the block now
                # instead of keeping it for consumers it thinks may still exist.
                torch.UntypedStorage._release_ipc_counter_cuda(*self._ipc_counter)
                self._ipc_counter = None
            self._cuda = None
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
        LOG.info("template_hold_released template=%s device=%s kind=%s generation=%d",
                 self.template_dir, self.device, kind, self._generation)

    def close(self) -> None:
        self.release()
        self._closed = True


def hold(template_dir: Path, function_dir: Path, device: str = "cpu", *,
         verify: bool | str = True, readers: int | None = None) -> Holder:
    """Check the template (structure, fingerprint), then stream its tensors into one
    shared buffer on `device`, verifying them on the way (see the module doc)."""
    holder = Holder(template_dir, function_dir, device, Verify.of(verify),
                    readers or default_readers())
    holder.reload()
    return holder


# --- the handler side ---------------------------------------------------------------

class AttachedBuffer:
    """A TensorSource over a holder's buffer; its bytes were verified by the holder."""

    verified = True

    def __init__(self, info: HandleInfo, base: Any) -> None:
        self.manifest_sha256 = info.manifest_sha256
        self.info = info
        self._base = base  # a read-only mmap (memfd) or a uint8 CUDA tensor

    @property
    def device(self) -> torch.device:
        return torch.device(self.info.device)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        offset = self.info.offsets.get(entry.name)
        if offset is None:
            raise TemplateError(f"tensor {entry.name} is not in the held buffer")
        if offset + entry.nbytes > self.info.size:
            raise TemplateError(f"tensor {entry.name} lies outside the held buffer")
        if self._base is None:
            raise TemplateError("the attached buffer is closed")
        if isinstance(self._base, torch.Tensor):
            dtype = TORCH_DTYPES[entry.dtype]
            start = self._base.storage_offset() + offset
            if start % dtype.itemsize:
                raise TemplateError(f"tensor {entry.name} is not aligned in the held buffer")
            # Straight on the buffer's storage. Slicing then viewing would keep the
            # intermediate dtype view alive as the tensor's `_base`, and that would pin
            # the whole buffer after a GPU release points the tensor elsewhere.
            shape = tuple(entry.shape)
            strides, step = [], 1
            for n in reversed(shape):  # contiguous, as the bytes lie in the file
                strides.append(step)
                step *= n
            out = torch.empty(0, dtype=dtype, device=self._base.device)
            return out.set_(self._base.untyped_storage(), start // dtype.itemsize, shape,
                            tuple(reversed(strides)))
        with warnings.catch_warnings():
            # Read-only on purpose: torch warns that it cannot mark tensors read-only.
            warnings.simplefilter("ignore", UserWarning)
            return view_tensor(self._base, offset, entry.dtype, entry.shape)

    def close(self) -> None:
        """Drop this object's reference; tensors handed out keep the mapping alive."""
        self._base = None


def attach(info: HandleInfo, fds: Sequence[int] = ()) -> AttachedBuffer:
    """Open a holder's buffer in this process. CPU: `fds[0]` is the memfd (this call
    maps it read-only and does not take ownership: close it afterwards). CUDA: opens
    the IPC handle on `info.device`."""
    if info.kind == "memfd":
        if len(fds) != 1:
            raise TemplateError(f"a memfd handle needs exactly one fd, got {len(fds)}")
        fd = fds[0]
        length = max(info.size, 1)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            actual = os.fstat(fd).st_size
        except OSError as exc:
            raise TemplateError(f"the holder's fd is not a memfd: {exc}") from exc
        if seals & MEMFD_SEALS != MEMFD_SEALS:
            raise TemplateError("the holder's memfd is not sealed against writes and resizing")
        if actual < length:
            raise TemplateError(f"the holder's memfd has {actual} bytes, the handle says"
                                f" {length}")
        base: Any = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        return AttachedBuffer(info, base)
    if info.kind == "cuda_ipc":
        if info.ipc_handle is None:
            raise TemplateError("a cuda_ipc handle without ipc_handle")
        device = torch.device(info.device)
        if device.type != "cuda" or device.index is None:
            raise TemplateError(f"a cuda_ipc handle names device {info.device!r}")
        if info.ipc_storage_size < info.size:
            raise TemplateError("the exported CUDA allocation is smaller than the buffer")
        try:
            handle = base64.b64decode(info.ipc_handle, validate=True)
        except ValueError as exc:
            raise TemplateError(f"ipc_handle is not base64: {exc}") from exc
        torch.cuda.init()
        # No reference counter and no event: the holder finished and synchronised its
        # copies before exporting, and accounts for its export itself.
        open_shared: Callable[..., Any] = torch.UntypedStorage._new_shared_cuda
        storage = open_shared(device.index, handle, info.ipc_storage_size,
                              info.ipc_storage_offset, b"", 0, b"", False)
        base = torch.empty(0, dtype=torch.uint8, device=device)
        base.set_(storage, 0, (max(info.size, 1),))
        return AttachedBuffer(info, base)
    raise TemplateError(f"unknown holder kind {info.kind!r}")


__all__ = ["AttachedBuffer", "HandleInfo", "Holder", "LoadStats", "Verify", "attach",
           "buffer_layout", "default_readers", "hold", "memory_available"]
