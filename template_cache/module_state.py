"""Module attributes that a `from_pretrained` sets beyond tensors, and their restore.

transformers marks loaded modules (`_is_hf_initialized`, `_weight_conversions`,
`_use_kernels`, ...) and may add more in later versions. A model rebuilt from its
config under the meta device lacks them; a later call that looks at them (say
`init_weights` skipping initialised modules) would then behave differently. So the
tracer builds the same skeleton, diffs every module's attributes against the loaded
model, and records the differences; restore applies them.

Invariants:
- Only plain values are recorded (None, bool, int, float, str, and lists, tuples,
  sets, dicts of them), tagged with their container type so they come back as the
  same type, plus the few objects with a recipe (GGUF's quantizer marker).
- An attribute that differs and is not plain (accelerate hooks from a device map,
  any object) makes the load unservable: it is listed in `unrestorable`, and restore
  runs the ordinary loader for it.
"""

from __future__ import annotations

from typing import Any

import torch

SKIPPED = {"_parameters", "_buffers", "_modules", "config", "generation_config"}
_MISSING = object()
_PLAIN = (type(None), bool, int, float, str)


def encode(value: Any) -> dict[str, Any] | None:
    if isinstance(value, _PLAIN):
        return {"kind": "scalar", "value": value}
    if isinstance(value, list | tuple | set | frozenset) and all(
            isinstance(v, _PLAIN) for v in value):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else list(value)
        return {"kind": type(value).__name__, "value": items}
    if isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, _PLAIN) for k, v in value.items()):
        return {"kind": "dict", "value": dict(value)}
    return None


def _recipe(attr: str, value: Any) -> dict[str, Any] | None:
    """Objects that can be rebuilt from the model's config. Only GGUF's quantizer: its
    weights are plain dequantised tensors, the object just marks the model as loaded
    from GGUF (save_pretrained refuses it). Other quantizers change tensors and stay
    unrestorable."""
    if attr == "hf_quantizer" and type(value).__name__ == "GgufHfQuantizer":
        return {"kind": "hf_quantizer", "value": "gguf"}
    return None


def _decode(encoded: dict[str, Any], module: torch.nn.Module) -> Any:
    kind, value = encoded["kind"], encoded["value"]
    if kind == "hf_quantizer":
        from transformers.quantizers.auto import AutoHfQuantizer

        config: Any = module.config
        return AutoHfQuantizer.from_config(config.quantization_config, pre_quantized=True)
    if kind == "scalar":
        return value
    return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset,
            "dict": dict}[kind](value)


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    encoded_a, encoded_b = encode(a), encode(b)
    if encoded_a is not None or encoded_b is not None:
        return encoded_a == encoded_b
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False
    try:  # nested plain data (transformers' parallelism plans): compare by value
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable equality differ
        return False


def attribute_diff(model: torch.nn.Module, skeleton: torch.nn.Module
                   ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(attributes to set per module, names of differences that cannot be recorded)."""
    settable: dict[str, dict[str, Any]] = {}
    unrestorable: list[str] = []
    skeleton_modules = dict(skeleton.named_modules(remove_duplicate=False))
    for name, module in model.named_modules(remove_duplicate=False):
        other = skeleton_modules.get(name)
        if other is None or type(other) is not type(module):
            unrestorable.append(f"{name or '<model>'}: module differs")
            continue
        theirs = vars(other)
        for attr, value in vars(module).items():
            if attr in SKIPPED or _same(value, theirs.get(attr, _MISSING)):
                continue
            encoded = encode(value) or _recipe(attr, value)
            if encoded is None:
                unrestorable.append(f"{name or '<model>'}.{attr}: {type(value).__name__}")
            else:
                settable.setdefault(name, {})[attr] = encoded
    return settable, unrestorable


def apply_attributes(model: torch.nn.Module, settable: dict[str, dict[str, Any]]) -> None:
    for name, attributes in settable.items():
        module = model.get_submodule(name) if name else model
        for attr, encoded in attributes.items():
            setattr(module, attr, _decode(encoded, module))
