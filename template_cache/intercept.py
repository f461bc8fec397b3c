"""Install and remove loader interception: one context manager, no global state.

The four weight loaders are replaced by thin wrappers that call a `LoaderHooks`
object: transformers `PreTrainedModel.from_pretrained`, `safetensors.torch.load_file`,
`safetensors.safe_open` and `torch.load`; so is transformers'
`PreTrainedTokenizerBase.from_pretrained`, which loads no tensors but whose object a
parent process can build ahead (`prebuild.py`). The tracer passes hooks that record;
the restore library passes hooks that serve tensors (and prebuilt objects) from a
template.

Invariants:
- Leaving the context (normally or by an exception) puts back exactly the objects
  that were there when it was entered, in reverse order, so nesting is safe.
- A loader called from inside another intercepted loader on the same thread
  (transformers calling safe_open inside from_pretrained) runs the original: only
  the outermost call of a user's start-up is one "load". The depth is per thread, so
  a load that another thread makes at the same time is still a load of its own.
- A load's key never depends on the device it asks for (`device_map`, `device`,
  `map_location`, given or not): the bytes a loader reads from a file do not depend
  on it, so a template traced on a CPU build machine serves a start-up that asks for
  a GPU; restore places the tensors where the running call asks.
  A device argument that could split the tensors across devices (a device_map
  naming several) stays in the key literally. The default dtype
  (`torch.get_default_dtype()`) is part of every key.
- Code that bound a loader before the context was entered (`from safetensors.torch
  import load_file` at an earlier import) keeps the original: enter the context
  before importing the function's handler.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Protocol


class Loader(str, Enum):
    FROM_PRETRAINED = "from_pretrained"
    LOAD_FILE = "load_file"
    SAFE_OPEN = "safe_open"
    TORCH_LOAD = "torch_load"
    TOKENIZER = "tokenizer"  # no tensors: recorded for prebuild.py


class LoaderHooks(Protocol):
    def handle(self, loader: Loader, original: Callable[..., Any], owner: Any,
               args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any: ...


PLAIN_TYPES = (str, int, float, bool, type(None))


def plain_repr(value: Any) -> str | None:
    """A stable text for a loader argument, or None when its identity cannot be told
    from its text (then the load is never served from a template)."""
    import torch

    if isinstance(value, (*PLAIN_TYPES, Path)):
        return repr(str(value) if isinstance(value, Path) else value)
    if isinstance(value, torch.dtype | torch.device):
        return repr(str(value))
    config_text = _config_repr(value)
    if config_text is not None:
        return config_text
    if isinstance(value, list | tuple) and all(isinstance(v, PLAIN_TYPES) for v in value):
        return repr(list(value))
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, (*PLAIN_TYPES, torch.device)) for k, v in value.items()
    ):
        return repr(sorted((k, str(v)) for k, v in value.items()))
    return None


def _config_repr(value: Any) -> str | None:
    """transformers passes the config object it read to the model class; it is the
    same on every start when it came from the same files. `_name_or_path` is left out
    because it moves with the folder."""
    configuration_utils = _optional_loaded("transformers.configuration_utils")
    if configuration_utils is None:
        return None
    if not isinstance(value, configuration_utils.PretrainedConfig):
        return None
    data = value.to_dict()
    data.pop("_name_or_path", None)
    text = json.dumps(data, sort_keys=True, default=str)
    return f"config:{type(value).__name__}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _optional_loaded(module: str) -> Any:
    return sys.modules.get(module)


def normalise_path(path: Any, function_dir: Path | None) -> str | None:
    """`function:<relative>` for paths inside the function folder, so a template
    traced at one location works when the folder is copied elsewhere."""
    if not isinstance(path, str | Path):
        return None
    text = str(path)
    if function_dir is not None:
        candidate = Path(text)
        absolute = candidate if candidate.is_absolute() else Path.cwd() / candidate
        try:
            relative = absolute.resolve().relative_to(function_dir.resolve())
            return "function:" + relative.as_posix()
        except (ValueError, OSError):
            pass
    return text


# Each loader's device argument: its keyword and its position in the call (after the
# path, which is position 0); None where it can only be given by keyword.
DEVICE_ARGUMENTS: dict[Loader, tuple[str, int | None]] = {
    Loader.FROM_PRETRAINED: ("device_map", None),
    Loader.LOAD_FILE: ("device", 1),
    Loader.SAFE_OPEN: ("device", 2),
    Loader.TORCH_LOAD: ("map_location", 1),
    Loader.TOKENIZER: ("", None),  # a tokenizer has no device argument
}
# device_map strategies that place every tensor on one device when one GPU is visible.
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_argument(loader: Loader, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[bool, Any]:
    """(given, value) of the call's device argument (args start with the path)."""
    name, position = DEVICE_ARGUMENTS[loader]
    if name in kwargs:
        return True, kwargs[name]
    if position is not None and len(args) > position:
        return True, args[position]
    return False, None


def single_device(value: Any) -> str | None:
    """The one device a device argument names ("cpu", "cuda", "cuda:1", or a device_map
    strategy such as "auto"), or None when it may name several or is not plain."""
    import torch

    if value is None:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return f"cuda:{value}" if value >= 0 else None
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, str):
        if value in DEVICE_MAP_STRATEGIES:
            return value
        try:
            return str(torch.device(value))
        except (RuntimeError, ValueError):
            return None
    if isinstance(value, dict) and value:
        devices = {single_device(v) for v in value.values()}
        if len(devices) == 1 and None not in devices:
            device = devices.pop()
            return None if device in DEVICE_MAP_STRATEGIES else device
    return None


def path_first(args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call with its path argument moved to the front of args, if given by keyword."""
    if not args:
        for name in ("pretrained_model_name_or_path", "filename", "f"):
            if name in kwargs:
                kwargs = dict(kwargs)
                return (kwargs.pop(name),), kwargs
    return args, kwargs


def call_key(loader: Loader, owner: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
             function_dir: Path | None) -> tuple[str | None, str]:
    """(key, reason): the key names one load; None with a reason when untraceable."""
    import torch

    args, kwargs = path_first(args, kwargs)
    if not args:
        return None, "no path argument"
    path = normalise_path(args[0], function_dir)
    if path is None:
        return None, f"path argument is a {type(args[0]).__name__}, not a path"
    parts = [loader.value]
    if owner is not None:
        parts.append(f"cls={owner.__module__}.{owner.__qualname__}")
    parts.append(f"path={path!r}")
    device_name, device_position = DEVICE_ARGUMENTS[loader]
    for index, value in enumerate(args[1:], start=1):
        if index == device_position and (value is None or single_device(value) is not None):
            continue  # the device never changes the bytes (module doc)
        text = plain_repr(value)
        if text is None:
            return None, f"argument {index} is a {type(value).__name__}"
        parts.append(f"arg{index}={text}")
    for name in sorted(kwargs):
        if name == device_name and (kwargs[name] is None
                                    or single_device(kwargs[name]) is not None):
            continue
        text = plain_repr(kwargs[name])
        if text is None:
            return None, f"argument {name} is a {type(kwargs[name]).__name__}"
        parts.append(f"{name}={text}")
    parts.append(f"default_dtype={str(torch.get_default_dtype())!r}")
    return "|".join(parts), ""


@contextmanager
def intercept_loaders(hooks: LoaderHooks) -> Iterator[None]:
    state = threading.local()  # per context and thread: inner loader calls pass through

    def guarded(loader: Loader, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(owner: Any, *args: Any, **kwargs: Any) -> Any:
            depth = getattr(state, "depth", 0)
            if depth:
                return original(*args, **kwargs) if owner is None else original(
                    owner, *args, **kwargs)
            state.depth = depth + 1
            try:
                bound = original if owner is None else _bind(original, owner)
                return hooks.handle(loader, bound, owner, args, kwargs)
            finally:
                state.depth = depth

        return call

    with ExitStack() as stack:
        torch = importlib.import_module("torch")
        _replace(stack, torch, "load", Loader.TORCH_LOAD, guarded, classmethod_=False)
        safetensors_torch = _optional("safetensors.torch")
        if safetensors_torch is not None:
            _replace(stack, safetensors_torch, "load_file", Loader.LOAD_FILE, guarded)
            _replace(stack, importlib.import_module("safetensors"), "safe_open",
                     Loader.SAFE_OPEN, guarded)
        modeling_utils = _optional("transformers.modeling_utils")
        if modeling_utils is not None:
            _replace(stack, modeling_utils.PreTrainedModel, "from_pretrained",
                     Loader.FROM_PRETRAINED, guarded, classmethod_=True)
        tokenization = _optional("transformers.tokenization_utils_base")
        if tokenization is not None:
            _replace(stack, tokenization.PreTrainedTokenizerBase, "from_pretrained",
                     Loader.TOKENIZER, guarded, classmethod_=True)
        yield


def _bind(function: Callable[..., Any], owner: Any) -> Callable[..., Any]:
    return lambda *args, **kwargs: function(owner, *args, **kwargs)


def _optional(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _replace(stack: ExitStack, owner: Any, attr: str, loader: Loader,
             guarded: Callable[[Loader, Callable[..., Any]], Callable[..., Any]],
             classmethod_: bool = False) -> None:
    saved = owner.__dict__[attr] if classmethod_ else getattr(owner, attr)
    if classmethod_:
        original = saved.__func__
        wrapper = guarded(loader, original)
        setattr(owner, attr, classmethod(lambda cls, *a, **k: wrapper(cls, *a, **k)))
    else:
        wrapper = guarded(loader, saved)
        setattr(owner, attr, lambda *a, **k: wrapper(None, *a, **k))
    stack.callback(setattr, owner, attr, saved)
