"""Module attributes beyond tensors: diffed at trace, re-applied at restore."""

from __future__ import annotations

import torch

from fwatchdog.template_cache.module_state import apply_attributes, attribute_diff


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    loaded = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(torch.nn.Linear(2, 2))
    return loaded, skeleton


def test_plain_differences_are_recorded_and_reapplied() -> None:
    loaded, skeleton = _pair()
    loaded.eval()
    loaded._is_hf_initialized = True  # type: ignore[assignment]
    loaded[0].plan = {"a": ("x", ["y"])}  # equal on both sides: not recorded
    skeleton[0].plan = {"a": ("x", ["y"])}
    loaded[0].tags = {"b", "a"}
    settable, unrestorable = attribute_diff(loaded, skeleton)
    assert unrestorable == []
    assert settable[""]["_is_hf_initialized"] == {"kind": "scalar", "value": True}
    assert settable["0"]["tags"] == {"kind": "set", "value": ["a", "b"]}
    assert "plan" not in settable["0"]
    apply_attributes(skeleton, settable)
    assert skeleton._is_hf_initialized is True
    assert skeleton[0].tags == {"a", "b"} and not skeleton.training
    assert attribute_diff(loaded, skeleton) == ({}, [])


def test_object_attributes_make_the_load_unrestorable() -> None:
    loaded, skeleton = _pair()
    loaded[0].hook = object()
    loaded.register_forward_hook(lambda *args: None)
    _, unrestorable = attribute_diff(loaded, skeleton)
    assert "0.hook: object" in unrestorable
    assert any(u.startswith("<model>._forward_hooks") for u in unrestorable)
