"""A handler's Weights: letting go of the holder's buffer on GPU release.

The source here is the handler-side AttachedBuffer over a uint8 torch tensor, the
form a CUDA IPC attach takes (on CPU the test uses host memory for the same code
path; only the device differs)."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from fwatchdog.llm.handler import Weights
from fwatchdog.template_cache.format import TensorEntry
from fwatchdog.template_cache.holder import AttachedBuffer, HandleInfo
from fwatchdog.template_cache.restore import SharedTensor


def entry(name: str, offset: int, shape: tuple[int, ...]) -> TensorEntry:
    nbytes = 4
    for n in shape:
        nbytes *= n
    return TensorEntry(name=name, file="model.safetensors", offset=offset, nbytes=nbytes,
                       dtype="F32", shape=shape, sha256="", xxh3="", mutated=False)


def attached(base: torch.Tensor) -> tuple[AttachedBuffer, TensorEntry, TensorEntry]:
    a, b = entry("a", 0, (2, 3)), entry("b", 24, (4,))
    info = HandleInfo(manifest_sha256="0" * 64, kind="cuda_ipc", device="cpu",
                      size=base.numel(), offsets={"a": 0, "b": 24})
    return AttachedBuffer(info, base), a, b


def test_release_parks_every_view_and_drops_the_source_s_own_buffer_tensor() -> None:
    base = torch.arange(40, dtype=torch.uint8)
    source, a, b = attached(base)
    weight = torch.nn.Parameter(source.tensor(a), requires_grad=False)
    bias = torch.nn.Parameter(source.tensor(b), requires_grad=False)
    cache = {"a": source.tensor(a)}  # a second view that the restore did not hand out
    weights = Weights(source, [SharedTensor(a, "load", "a", weakref.ref(weight)),
                               SharedTensor(b, "load", "b", weakref.ref(bias))])
    storage = weakref.ref(base)
    lo = base.data_ptr()
    del base  # the source keeps the only reference to its whole-buffer tensor

    moved = weights.release()

    assert moved == 3
    assert weight.shape == cache["a"].shape == (2, 3) and bias.shape == (4,)
    assert all(float(t.abs().sum()) == 0.0 for t in (weight, bias, cache["a"]))
    assert weights.source is None and storage() is None
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        left = [tuple(t.shape) for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and lo <= t.data_ptr() < lo + 40]
    assert not left, f"tensors still view the released buffer: {left}"


def test_release_refuses_a_view_it_could_not_point_at_the_new_buffer() -> None:
    base = torch.arange(40, dtype=torch.uint8)
    source, a, _ = attached(base)
    weight = torch.nn.Parameter(source.tensor(a), requires_grad=False)
    flat = source.tensor(a).view(-1)  # views tensor a's bytes with another shape
    weights = Weights(source, [SharedTensor(a, "load", "a", weakref.ref(weight))])
    del base
    with pytest.raises(RuntimeError, match="is not one of its tensors"):
        weights.release()
    assert flat.numel() == 6
