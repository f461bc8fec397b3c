"""Loader hooks that record every traced weight load during a start-up.

For each load the recorder keeps the live tensors (to see later whether the samples
mutate them), their checksums at the moment the loader returned, and where their
bytes can be found again: an offset in an original safetensors file when the bytes
there are identical, otherwise a host copy taken at load time that the template will
pack (dtype casts, dequantised GGUF, fused or generated tensors).

Invariants:
- The loader's result is returned unchanged; recording never alters a tensor.
- The load-time copy is taken before any user code runs after the load, so packed
  bytes are what the loader returned, even for tensors the function mutates later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fwatchdog.template_cache import prebuild
from fwatchdog.template_cache.intercept import Loader, call_key
from fwatchdog.template_cache.module_state import attribute_diff
from fwatchdog.template_cache.restore import build_skeleton
from fwatchdog.template_cache.tensors import dtype_code, tensor_bytes

log = logging.getLogger("fwatchdog.tracer")

WEIGHT_SUFFIXES = {".safetensors", ".json", ".bin", ".pt", ".pth", ".gguf"}


@dataclass
class Captured:
    name: str  # index name: "<load number>/<first local name>"
    tensor: torch.Tensor
    dtype: str
    shape: tuple[int, ...]
    device: str
    sha256: str
    requires_grad: bool
    source: tuple[Path, int] | None  # (file, byte offset) holding identical bytes
    snapshot: bytes | None  # load-time bytes when there is no source


@dataclass
class LoadRecord:
    loader: Loader
    key: str
    files: list[Path]
    names: dict[str, str]  # local name -> index name
    tensors: list[Captured]
    container: str = "dict"
    model: dict[str, Any] | None = None
    model_object: Any = None


@dataclass
class Recorder:
    function_dir: Path
    # False for the checksum-only start-up: it needs no byte locations or copies.
    keep_bytes: bool = True
    loads: list[LoadRecord] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Tokenizer calls a parent process can repeat (template_cache.prebuild).
    prebuild: list[dict[str, Any]] = field(default_factory=list)

    def handle(self, loader: Loader, original: Callable[..., Any], owner: Any,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key, reason = call_key(loader, owner, args, kwargs, self.function_dir)
        if loader is Loader.TOKENIZER:
            result = original(*args, **kwargs)
            item = prebuild.entry(owner, args, kwargs, key, self.function_dir) if key else None
            if item is not None and all(p["key"] != key for p in self.prebuild):
                self.prebuild.append(item)
            return result
        if loader is Loader.SAFE_OPEN:
            handle = original(*args, **kwargs)
            if key is None:
                self._skip(loader, repr(args[:1]), reason)
                return handle
            return _RecordingSafeOpen(handle, self, key, _path_arg(args, kwargs))
        result = original(*args, **kwargs)
        if key is None:
            self._skip(loader, repr(args[:1]), reason)
        elif loader is Loader.FROM_PRETRAINED:
            self._record_model(key, result, args, kwargs)
        elif isinstance(result, Mapping) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in result.items()
        ):
            self._record_dict(loader, key, result, [_path_arg(args, kwargs)])
        else:
            self._skip(loader, key, f"result is a {type(result).__name__}, not a dict of tensors")
        return result

    def _skip(self, loader: Loader, key: str, reason: str) -> None:
        log.info("trace_load_skipped loader=%s key=%s reason=%s", loader.value, key, reason)
        self.skipped.append({"loader": loader.value, "key": key, "reason": reason})

    def _new_load(self, loader: Loader, key: str, files: list[Path]) -> LoadRecord:
        record = LoadRecord(loader=loader, key=key, files=files, names={}, tensors=[])
        self.loads.append(record)
        return record

    def _capture(self, record: LoadRecord, items: list[tuple[str, torch.Tensor]],
                 sources: _Sources) -> None:
        by_identity: dict[int, str] = {}
        for local, tensor in items:
            if id(tensor) in by_identity:  # tied weights: one entry, several names
                record.names[local] = by_identity[id(tensor)]
                continue
            name = f"{len(self.loads) - 1}/{local}"
            data = tensor_bytes(tensor)
            digest = hashlib.sha256(data).hexdigest()
            source = (sources.find(local, tensor.dtype, tuple(tensor.shape), data)
                      if self.keep_bytes else None)
            record.tensors.append(Captured(
                name=name, tensor=tensor, dtype=dtype_code(tensor.dtype),
                shape=tuple(tensor.shape), device=str(tensor.device), sha256=digest,
                requires_grad=bool(tensor.requires_grad), source=source,
                snapshot=None if source or not self.keep_bytes else bytes(data),
            ))
            by_identity[id(tensor)] = name
            record.names[local] = name

    def _record_dict(self, loader: Loader, key: str, result: Mapping[str, torch.Tensor],
                     files: list[Path]) -> None:
        record = self._new_load(loader, key, files)
        record.container = type(result).__name__
        self._capture(record, list(result.items()), _Sources(files))

    def record_tensor(self, record: LoadRecord, local: str, tensor: torch.Tensor) -> None:
        if local not in record.names:
            self._capture(record, [(local, tensor)], _Sources(record.files))

    def _record_model(self, key: str, model: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> None:
        if kwargs.get("adapter_name_or_path") or kwargs.get("adapter_kwargs"):
            self._skip(Loader.FROM_PRETRAINED, key, "adapter weights from another folder")
            return
        files = _model_files(args[0] if args else kwargs.get("pretrained_model_name_or_path"),
                             kwargs.get("gguf_file"), kwargs.get("subfolder"))
        if not any(f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") for f in files):
            # A hub id or a remote source: no files to fingerprint, so no way to tell
            # at restore that the weights are still the same. Never served.
            self._skip(Loader.FROM_PRETRAINED, key, "no local weight files (hub id?)")
            return
        record = self._new_load(Loader.FROM_PRETRAINED, key, files)
        params = list(model.named_parameters(remove_duplicate=False))
        buffers = list(model.named_buffers(remove_duplicate=False))
        self._capture(record, params + buffers, _Sources(files))
        record.model_object = model
        generation = getattr(model, "generation_config", None)
        record.model = {
            "class": _qualified(type(model)),
            "config_class": _qualified(type(model.config)),
            "config": json.loads(model.config.to_json_string(use_diff=False)),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "generation_config": (json.loads(generation.to_json_string(use_diff=False))
                                  if generation is not None else None),
            "parameters": [n for n, _ in params],
            "buffers": [n for n, _ in buffers],
            "training": bool(model.training),
        }
        try:
            settable, unrestorable = attribute_diff(model, build_skeleton(record.model))
        except Exception as exc:  # noqa: BLE001 - then the load is simply not served
            settable, unrestorable = {}, [f"cannot build the model skeleton: {exc!r}"]
        record.model["attributes"] = settable
        record.model["unrestorable"] = unrestorable


class _RecordingSafeOpen:
    """Wraps a safe_open handle; every get_tensor is one recorded tensor of the load."""

    def __init__(self, handle: Any, recorder: Recorder, key: str, path: Path) -> None:
        self._handle = handle
        self._recorder = recorder
        self._record = recorder._new_load(Loader.SAFE_OPEN, key, [path])

    def __enter__(self) -> _RecordingSafeOpen:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def get_tensor(self, name: str) -> torch.Tensor:
        tensor = self._handle.get_tensor(name)
        self._recorder.record_tensor(self._record, name, tensor)
        return tensor

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._handle, attr)


class _Sources:
    """Finds a tensor's exact bytes inside the safetensors files of a load."""

    def __init__(self, files: list[Path]) -> None:
        self._entries: dict[tuple[str, tuple[int, ...]], list[tuple[str, Path, int, int]]] = {}
        self._by_name: dict[str, list[tuple[Path, int, int, str, tuple[int, ...]]]] = {}
        for path in files:
            if path.suffix != ".safetensors":
                continue
            for name, (dtype, shape, offset, nbytes) in safetensors_header(path).items():
                self._entries.setdefault((dtype, shape), []).append((name, path, offset, nbytes))
                self._by_name.setdefault(name, []).append((path, offset, nbytes, dtype, shape))

    def find(self, local: str, dtype: torch.dtype, shape: tuple[int, ...],
             data: memoryview) -> tuple[Path, int] | None:
        try:
            code = dtype_code(dtype)
        except ValueError:
            return None
        candidates = self._entries.get((code, shape), [])
        # The same name first: almost always the right one, found with one compare.
        ordered = sorted(candidates, key=lambda c: c[0] != local)
        for _, path, offset, nbytes in ordered:
            if nbytes == len(data) and _file_bytes_equal(path, offset, data):
                return path, offset
        return None


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute offset, nbytes) from a safetensors file's header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    base = 8 + length
    result = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        result[name] = (info["dtype"], tuple(info["shape"]), base + start, end - start)
    return result


def _file_bytes_equal(path: Path, offset: int, data: memoryview) -> bool:
    if len(data) == 0:
        return True
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0,
                                               access=mmap.ACCESS_READ) as mapped:
        return mapped[offset : offset + len(data)] == data


def _model_files(path: Any, gguf_file: Any, subfolder: Any = None) -> list[Path]:
    """The files a local from_pretrained reads: configs and weights of its folder."""
    if not isinstance(path, str | Path):
        return []
    folder = Path(path) / subfolder if isinstance(subfolder, str) and subfolder else Path(path)
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and p.suffix in WEIGHT_SUFFIXES and p.suffix != ".gguf"]
    if isinstance(gguf_file, str | Path):
        files.append(folder / gguf_file)
    return files


def _path_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Path:
    value = args[0] if args else kwargs.get("filename", kwargs.get("f"))
    return Path(str(value))


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
