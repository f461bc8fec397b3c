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
- Tensors come back on the device the traced loader returned them on. Unmutated ones
  are zero-copy views of shared memory (file mmaps or a holder's buffer), listed in
  `stats.shared_tensors`; tensors the samples mutated are private copies.
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
from fwatchdog.template_cache.intercept import Loader, call_key, intercept_loaders
from fwatchdog.template_cache.module_state import apply_attributes
from fwatchdog.template_cache.stream import Verify, check_files
from fwatchdog.template_cache.tensors import view_tensor
from fwatchdog.template_cache.verify import read_manifest, structure_problems

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
                   source: TensorSource | None, verify: bool | str = True) -> Manifest:
    """The manifest when this template may be used here; TemplateError saying why not.
    `verify` says how the files' bytes are checked (stream.Verify); a verified source
    (a holder's buffer) needs no check of the files."""
    manifest = read_manifest(template_dir)
    problems = structure_problems(manifest, template_dir, function_dir)
    if problems:
        raise TemplateError("; ".join(problems))
    running = fingerprint.current(function_dir) if function_dir else {}
    differences = fingerprint.mismatches(manifest.raw["fingerprint"], running)
    if differences:
        raise TemplateError("fingerprint differs: " + "; ".join(differences))
    if source is not None:
        if source.manifest_sha256 != manifest_sha256(template_dir):
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
            verify: bool | str = True) -> Iterator[RestoreStats]:
    """Serve the traced loads of the start-up run inside this context from the
    template: from `source` (a holder's AttachedBuffer) or from the files, which are
    then checked as `verify` says ("full" by default, "quick" opt-in)."""
    template_dir = Path(template_dir)
    stats = RestoreStats(template=str(template_dir))
    started = time.perf_counter()
    try:
        manifest = check_template(template_dir, function_dir, source, verify)
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
        server = _Server(manifest, source, Path(function_dir), stats)
        stack.enter_context(intercept_loaders(server))
        try:
            yield stats
        finally:
            _log_done(stats)


def _log_done(stats: RestoreStats) -> None:
    LOG.info("template_restore_done template=%s used=%s hits=%d misses=%d skipped=%d"
             " tensors=%d check_s=%.3f served_s=%.3f", stats.template, stats.used, stats.hits,
             stats.misses, stats.skipped, stats.tensors_served, stats.check_s, stats.served_s)


class _Miss(Exception):
    """A traced load this restore cannot serve; the original loader runs instead."""


class _Server:
    def __init__(self, manifest: Manifest, source: TensorSource, function_dir: Path,
                 stats: RestoreStats) -> None:
        self._entries = manifest.tensor_map()
        self._loads = {load["key"]: load for load in manifest.raw["loads"]}
        self._skipped = {s["key"]: s["reason"] for s in manifest.raw["skipped_loads"]}
        self._source = source
        self._function_dir = function_dir
        self._stats = stats

    def handle(self, loader: Loader, original: Callable[..., Any], owner: Any,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key, reason = call_key(loader, owner, args, kwargs, self._function_dir)
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
            if loader is Loader.FROM_PRETRAINED:
                result: Any = self._model(load)
            elif loader is Loader.SAFE_OPEN:
                result = _ServedSafeOpen(self, load, original, args, kwargs)
            else:
                result = self._mapping(load)
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

    def tensor(self, load: dict[str, Any], index_name: str) -> tuple[torch.Tensor, bool]:
        """(the tensor, whether it is a view of the source's bytes)."""
        entry = self._entries[index_name]
        shared = self._source.tensor(entry)
        tensor = shared if str(shared.device) == load["device"] else shared.to(load["device"])
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

    def _mapping(self, load: dict[str, Any]) -> dict[str, torch.Tensor]:
        if load["device"] == "mixed":
            raise _Miss("tensors on several devices")
        container: dict[str, torch.Tensor] = (
            OrderedDict() if load.get("container") == "OrderedDict" else {})
        for local, index_name in load["tensors"].items():
            tensor, aliased = self.tensor(load, index_name)
            container[local] = self.share(load, local, index_name, tensor, aliased)
        return container

    def _model(self, load: dict[str, Any]) -> Any:
        if load["device"] == "mixed":
            raise _Miss("tensors on several devices")
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
                tensor, aliased = self.tensor(load, index_name)
                made[index_name] = self.share(load, local, index_name, torch.nn.Parameter(
                    tensor, requires_grad=index_name in grads), aliased)
            module, leaf = _owner(model, local)
            module._parameters[leaf] = made[index_name]
        for local in buffers:
            index_name = load["tensors"][local]
            if index_name not in made:
                tensor, aliased = self.tensor(load, index_name)
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

    def __init__(self, server: _Server, load: dict[str, Any], original: Callable[..., Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._server = server
        self._load = load
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
        tensor, aliased = self._server.tensor(self._load, index_name)
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
