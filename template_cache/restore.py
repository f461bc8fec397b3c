"""Restore: run a function's unmodified start-up with its traced loads served from a
template.

    with restore(template_dir, function_dir) as stats:
        handler = import_handler(function_dir)

Invariants:
- Wrong weights are impossible, a slow start is acceptable: the template is used only
  when its manifest is sound, its fingerprint matches this environment, and its
  files' bytes match the manifest's per-tensor and rest checksums (checked by
  several threads, stream.py), or a holder that checked them hands out the bytes.
  Otherwise nothing is intercepted and the start-up runs the ordinary way;
  `stats.rejected` and a `template_rejected` log line say why.
- A load whose key was not traced runs the original loader (a miss); one the trace
  listed as skipped (dynamic, or not restorable) runs it too (`skipped`). Both are
  counted and logged. A served load that cannot be rebuilt falls
  back to the original loader too.
- Tensors come back on the device the running call asks for (its `device_map`,
  `device` or `map_location`, which the key leaves out), never the traced literal:
  "cuda" and a device_map strategy ("auto") mean the holder's GPU when the source
  is one, else the current GPU ("auto" with several visible GPUs, which would split
  the model, is a miss); no device argument means the loader's default. Unmutated
  tensors already on that device are zero-copy views of shared memory (file mmaps
  or a holder's buffer), listed in `stats.shared_tensors`; tensors the samples
  mutated are private copies.
- CPU file views are copy-on-write mappings: a handler writing to a weight changes
  only its own pages, never the files or other handlers.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import mmap
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fwatchdog.template_cache import fingerprint
from fwatchdog.template_cache.format import MANIFEST_NAME, Manifest, TemplateError, TensorEntry
from fwatchdog.template_cache.intercept import (
    DEVICE_MAP_STRATEGIES,
    Loader,
    call_key,
    device_argument,
    intercept_loaders,
    path_first,
    single_device,
)
from fwatchdog.template_cache.module_state import apply_attributes
from fwatchdog.template_cache.prebuild import Prebuilt
from fwatchdog.template_cache.stream import Verify, check_files
from fwatchdog.template_cache.tensors import view_tensor
from fwatchdog.template_cache.verify import CheckedManifest, read_manifest, structure_problems

LOG = logging.getLogger("fwatchdog.template_cache")


class TensorSource(Protocol):
    """Where a restore takes tensor bytes from: file mmaps, or a holder's buffer."""

    manifest_sha256: str
    verified: bool  # the bytes were already checked against the manifest

    def tensor(self, entry: TensorEntry) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SharedTensor:
    """A served tensor object that is a view of the source's bytes (a holder's buffer
    or a file mapping): a Parameter, a buffer or a dict value. The runtime uses these
    to point the objects at a new buffer after a reload (`repoint`)."""

    entry: TensorEntry  # where its bytes are in the template
    load_key: str  # the load that returned it
    local_name: str  # its name in that load (parameter, buffer or dict key)
    ref: weakref.ref[torch.Tensor]  # None once the function dropped it

    @property
    def index_name(self) -> str:
        return self.entry.name

    def tensor(self) -> torch.Tensor | None:
        return self.ref()


@dataclass
class RestoreStats:
    """Counters of one restore; the runtime exports them as metrics."""

    template: str
    used: bool = False
    rejected: str | None = None
    hits: int = 0
    misses: int = 0
    skipped: int = 0  # loads the trace listed in skipped_loads (dynamic, unservable)
    tensors_served: int = 0
    prebuilt: int = 0  # objects a parent built ahead, handed to the start-up (prebuild.py)
    check_s: float = 0.0  # manifest, fingerprint and file hashes
    served_s: float = 0.0  # inside served loads (model skeleton, views)
    miss_reasons: list[str] = field(default_factory=list)
    # Served objects that alias the source's bytes (not private copies), one per
    # tensor object (tied weights: one Parameter, listed under its first name).
    shared_tensors: list[SharedTensor] = field(default_factory=list)


class MappedFiles:
    """Zero-copy views of the template's files through private (copy-on-write) mmaps."""

    verified = False

    def __init__(self, manifest: Manifest, template_dir: Path, function_dir: Path | None,
                 manifest_sha256: str) -> None:
        self.manifest_sha256 = manifest_sha256
        self._paths = {f.id: f.resolve(template_dir, function_dir) for f in manifest.files}
        self._maps: dict[str, mmap.mmap] = {}

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        if entry.nbytes == 0:
            return view_tensor(b"", 0, entry.dtype, entry.shape)
        mapped = self._maps.get(entry.file)
        if mapped is None:
            with open(self._paths[entry.file], "rb") as handle:
                mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[entry.file] = mapped
        return view_tensor(mapped, entry.offset, entry.dtype, entry.shape)

    def close(self) -> None:
        # Tensors keep their mmaps alive; dropping our references is enough.
        self._maps.clear()


def manifest_sha256(template_dir: Path) -> str:
    return hashlib.sha256((Path(template_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def check_template(template_dir: Path, function_dir: Path | None,
                   source: TensorSource | None, verify: bool | str = True,
                   checked: CheckedManifest | None = None) -> Manifest:
    """The manifest when this template may be used here; TemplateError saying why not.
    `verify` says how the files' bytes are checked (stream.Verify); a verified source
    (a holder's buffer) needs no check of the files. `checked`: the manifest as a
    parent process already read and checked it, used when the file's bytes still have
    its digest (otherwise the file is read and checked again)."""
    digest = (manifest_sha256(template_dir)
              if checked is not None or source is not None else None)
    if checked is not None and checked.sha256 == digest:
        manifest = checked.manifest
    else:
        manifest = read_manifest(template_dir)
    problems = structure_problems(manifest, template_dir, function_dir)
    if problems:
        raise TemplateError("; ".join(problems))
    running = fingerprint.current(function_dir) if function_dir else {}
    differences = fingerprint.mismatches(manifest.raw["fingerprint"], running)
    if differences:
        raise TemplateError("fingerprint differs: " + "; ".join(differences))
    if source is not None:
        if source.manifest_sha256 != digest:
            raise TemplateError("the attached buffer holds another template")
        if source.verified:
            return manifest
    mode = Verify.of(verify)
    if mode is not Verify.NONE:
        paths = {entry.id: entry.resolve(template_dir, function_dir) for entry in manifest.files}
        check_files(manifest, paths, mode)
    return manifest


@contextmanager
def restore(template_dir: Path, function_dir: Path, *, source: TensorSource | None = None,
            verify: bool | str = True, checked: CheckedManifest | None = None,
            prebuilt: Prebuilt | None = None) -> Iterator[RestoreStats]:
    """Serve the traced loads of the start-up run inside this context from the
    template: from `source` (a holder's AttachedBuffer) or from the files, which are
    then checked as `verify` says ("full" by default, "quick" opt-in). `checked`: see
    :func:`check_template`. `prebuilt`: objects a parent process built for the
    start-up's tokenizer calls (prebuild.py), handed out once each."""
    template_dir = Path(template_dir)
    stats = RestoreStats(template=str(template_dir))
    started = time.perf_counter()
    try:
        manifest = check_template(template_dir, function_dir, source, verify, checked)
    except Exception as exc:  # noqa: BLE001 - any doubt about the template: ordinary start
        stats.check_s = time.perf_counter() - started
        stats.rejected = str(exc)
        LOG.warning("template_rejected template=%s reason=%r", template_dir, stats.rejected)
        yield stats
        _log_done(stats)
        return
    stats.used = True
    stats.check_s = time.perf_counter() - started
    with ExitStack() as stack:
        if source is None:
            source = MappedFiles(manifest, template_dir, function_dir,
                                 manifest_sha256(template_dir))
            stack.callback(source.close)
        server = _Server(manifest, source, Path(function_dir), stats, prebuilt)
        stack.enter_context(intercept_loaders(server))
        try:
            yield stats
        finally:
            _log_done(stats)


def _log_done(stats: RestoreStats) -> None:
    LOG.info("template_restore_done template=%s used=%s hits=%d misses=%d skipped=%d"
             " tensors=%d prebuilt=%d check_s=%.3f served_s=%.3f", stats.template, stats.used,
             stats.hits, stats.misses, stats.skipped, stats.tensors_served, stats.prebuilt,
             stats.check_s, stats.served_s)


class _Miss(Exception):
    """A traced load this restore cannot serve; the original loader runs instead."""


class _Server:
    def __init__(self, manifest: Manifest, source: TensorSource, function_dir: Path,
                 stats: RestoreStats, prebuilt: Prebuilt | None = None) -> None:
        self._prebuilt = prebuilt
        self._entries = manifest.tensor_map()
        self._loads = {load["key"]: load for load in manifest.raw["loads"]}
        self._skipped = {s["key"]: s["reason"] for s in manifest.raw["skipped_loads"]}
        self._source = source
        self._function_dir = function_dir
        self._stats = stats

    def handle(self, loader: Loader, original: Callable[..., Any], owner: Any,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key, reason = call_key(loader, owner, args, kwargs, self._function_dir)
        if loader is Loader.TOKENIZER:  # no tensors: an object built ahead, or the call
            obj = self._prebuilt.take(key) if self._prebuilt is not None else None
            if obj is None:
                return original(*args, **kwargs)
            self._stats.prebuilt += 1
            LOG.info("template_prebuilt_served key=%s", key)
            return obj
        load = self._loads.get(key) if key else None
        if load is None:
            if key in self._skipped:
                self._stats.skipped += 1
                LOG.info("template_skipped_load loader=%s key=%s reason=%r", loader.value, key,
                         self._skipped[key])
            else:
                self._miss(loader, key, reason or "not traced")
            return original(*args, **kwargs)
        started = time.perf_counter()
        try:
            device = self._target(loader, load, args, kwargs)
            if loader is Loader.FROM_PRETRAINED:
                result: Any = self._model(load, device)
            elif loader is Loader.SAFE_OPEN:
                result = _ServedSafeOpen(self, load, device, original, args, kwargs)
            else:
                result = self._mapping(load, device)
        except Exception as exc:  # noqa: BLE001 - never fail a start-up: load normally
            self._miss(loader, key, str(exc) if isinstance(exc, _Miss) else repr(exc))
            return original(*args, **kwargs)
        finally:
            self._stats.served_s += time.perf_counter() - started
        self._stats.hits += 1
        LOG.info("template_hit loader=%s key=%s tensors=%d", loader.value, key,
                 len(load["tensors"]))
        return result

    def _miss(self, loader: Loader, key: str | None, reason: str) -> None:
        self._stats.misses += 1
        self._stats.miss_reasons.append(f"{loader.value}: {reason}")
        LOG.info("template_miss loader=%s key=%s reason=%r", loader.value, key, reason)

    def _target(self, loader: Loader, load: dict[str, Any], args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> torch.device:
        """The device the running call asks for (module doc)."""
        if load["device"] == "mixed":
            raise _Miss("tensors on several devices")
        given, value = device_argument(loader, *path_first(args, kwargs))
        if not given or value is None:
            if loader is Loader.TORCH_LOAD:  # the locations saved in the file
                return torch.device(load["device"])
            if loader is Loader.FROM_PRETRAINED:  # a `with torch.device(...)` block
                return torch.get_default_device()
            return torch.device("cpu")
        name = single_device(value)
        if name is None:  # a literal in the key: the traced placement
            return torch.device(load["device"])
        held = getattr(self._source, "device", None)
        held_cuda = isinstance(held, torch.device) and held.type == "cuda"
        if name == "cuda" or name in DEVICE_MAP_STRATEGIES:
            if name != "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
                raise _Miss(f"device_map={name!r} over {torch.cuda.device_count()} GPUs"
                            " would split the model")
            if held_cuda:
                assert isinstance(held, torch.device)
                return held
            if name == "cuda" or torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device("cpu")
        return torch.device(name)

    def tensor(self, load: dict[str, Any], index_name: str, device: torch.device
               ) -> tuple[torch.Tensor, bool]:
        """(the tensor on `device`, whether it is a view of the source's bytes)."""
        entry = self._entries[index_name]
        shared = self._source.tensor(entry)
        tensor = shared if shared.device == device else shared.to(device)
        aliased = tensor.data_ptr() == shared.data_ptr() and tensor.device == shared.device
        if entry.mutated and aliased:
            tensor, aliased = tensor.clone(), False  # the function writes to it: never share
        self._stats.tensors_served += 1
        return tensor, aliased

    def share(self, load: dict[str, Any], local: str, index_name: str, obj: torch.Tensor,
              aliased: bool) -> torch.Tensor:
        if aliased and self._entries[index_name].nbytes:
            self._stats.shared_tensors.append(SharedTensor(
                self._entries[index_name], load["key"], local, weakref.ref(obj)))
        return obj

    def _mapping(self, load: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
        container: dict[str, torch.Tensor] = (
            OrderedDict() if load.get("container") == "OrderedDict" else {})
        for local, index_name in load["tensors"].items():
            tensor, aliased = self.tensor(load, index_name, device)
            container[local] = self.share(load, local, index_name, tensor, aliased)
        return container

    def _model(self, load: dict[str, Any], device: torch.device) -> Any:
        info = load["model"]
        try:
            model: Any = build_skeleton(info)
        except Exception as exc:  # noqa: BLE001 - any failure means: load the normal way
            raise _Miss(f"cannot build the model skeleton: {exc!r}") from exc
        params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        buffers = [n for n, _ in model.named_buffers(remove_duplicate=False)]
        if sorted(params) != sorted(info["parameters"]) or sorted(buffers) != sorted(
                info["buffers"]):
            raise _Miss("the model skeleton's tensors differ from the traced model's")
        grads = set(load.get("requires_grad", []))
        made: dict[str, Any] = {}  # index name -> Parameter or buffer tensor
        for local in params:
            index_name = load["tensors"][local]
            if index_name not in made:  # tied weights: one Parameter for every name
                tensor, aliased = self.tensor(load, index_name, device)
                made[index_name] = self.share(load, local, index_name, torch.nn.Parameter(
                    tensor, requires_grad=index_name in grads), aliased)
            module, leaf = _owner(model, local)
            module._parameters[leaf] = made[index_name]
        for local in buffers:
            index_name = load["tensors"][local]
            if index_name not in made:
                tensor, aliased = self.tensor(load, index_name, device)
                made[index_name] = self.share(load, local, index_name, tensor, aliased)
            module, leaf = _owner(model, local)
            module._buffers[leaf] = made[index_name]
        if info.get("generation_config") is not None:
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_dict(dict(info["generation_config"]))
        model.train(bool(info.get("training", False)))
        apply_attributes(model, info.get("attributes", {}))
        return model


class _ServedSafeOpen:
    """safe_open's handle: traced tensors from the template, others from the real file."""

    def __init__(self, server: _Server, load: dict[str, Any], device: torch.device,
                 original: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self._server = server
        self._load = load
        self._device = device
        self._open = lambda: original(*args, **kwargs)
        self._real: Any = None

    def _file(self) -> Any:
        if self._real is None:
            self._real = self._open()
        return self._real

    def __enter__(self) -> _ServedSafeOpen:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._real = None

    def get_tensor(self, name: str) -> torch.Tensor:
        index_name = self._load["tensors"].get(name)
        if index_name is None:
            self._server._miss(Loader.SAFE_OPEN, self._load["key"], f"tensor {name} not traced")
            return self._file().get_tensor(name)
        tensor, aliased = self._server.tensor(self._load, index_name, self._device)
        return self._server.share(self._load, name, index_name, tensor, aliased)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._file(), attr)


def repoint(shared: Iterable[SharedTensor], source: TensorSource) -> int:
    """Point every still-alive served object at the same tensor in `source` (a new
    buffer after a holder's reload): `obj.data = view`, so Parameters, tied weights
    and every reference to them stay the same objects. Returns how many moved.
    TemplateError if `source` holds another template or lacks a tensor."""
    moved = 0
    for item in shared:
        obj = item.tensor()
        if obj is None:
            continue
        view = source.tensor(item.entry)
        if view.shape != obj.shape or view.dtype != obj.dtype:
            raise TemplateError(f"tensor {item.index_name} differs in the new source")
        obj.data = view if view.device == obj.device else view.to(obj.device)
        moved += 1
    return moved


def build_skeleton(info: dict[str, Any]) -> torch.nn.Module:
    """The traced model's class built from its recorded config, tensors on meta."""
    model_cls = _import(info["class"])
    config = _import(info["config_class"]).from_dict(dict(info["config"]))
    if info.get("attn_implementation"):
        config._attn_implementation = info["attn_implementation"]
    with torch.device("meta"):
        model: torch.nn.Module = model_cls(config)
    return model


def _import(qualified: str) -> Any:
    module, _, name = qualified.partition(":")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    prefix, _, leaf = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), leaf
