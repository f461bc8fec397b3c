"""What a template depends on, and the check that a running environment matches it.

Invariants:
- Never initialises CUDA: GPU facts come from NVML (pynvml), so a process that must
  fork later (the zygote) may call this. NVML lists every GPU of the node, so
  CUDA_VISIBLE_DEVICES is applied here.
- A template traced on a CPU-only machine holds bytes whose values do not depend on
  the device, so its accelerator entry is not compared; a template traced with a GPU
  is only used where every visible GPU is a model (name and compute capability) it
  was traced on, with the same CUDA version. The number of GPUs is not compared: a
  template built on an 8-GPU node serves a 1-GPU pod.
- Library versions that change what a loader returns are compared (LIBRARIES).
"""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

SOURCE_SUFFIXES = (".py",)
SOURCE_NAMES = ("requirements.txt",)
SKIPPED_DIRS = {"__pycache__", "node_modules", "samples"}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def handler_sha256(function_dir: Path) -> str:
    """Hash of the function's code: every .py file and requirements.txt, by relative path."""
    digest = hashlib.sha256()
    root = Path(function_dir)
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") or part in SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        if not path.is_file():
            continue
        if path.suffix in SOURCE_SUFFIXES or path.name in SOURCE_NAMES:
            digest.update(relative.as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


# Packages that change what a loader returns beyond the call's arguments (quantised
# or fused loading, the attention implementation transformers picks, GGUF parsing).
LIBRARIES = ("accelerate", "gguf", "flash-attn", "kernels", "bitsandbytes", "numpy")


def visible_gpus(devices: list[dict[str, str]], visible: str | None) -> list[dict[str, str]]:
    """The NVML devices (each with index, uuid, name, capability) that CUDA shows under
    CUDA_VISIBLE_DEVICES=`visible` (None: all). Entries are indices or GPU uuids (or
    uuid prefixes); CUDA stops at the first entry it cannot match, and so does this.
    A MIG instance cannot be told apart through the parent list, so any MIG entry
    means every GPU of the node counts."""
    if visible is None:
        return devices
    chosen: list[dict[str, str]] = []
    for token in (t.strip() for t in visible.split(",")):
        if token.startswith("MIG-"):
            return devices
        if token.isdigit():
            match = next((d for d in devices if d["index"] == token), None)
        elif token.startswith("GPU-"):
            match = next((d for d in devices if d["uuid"].startswith(token)), None)
        else:
            match = None
        if match is None:
            break
        if match not in chosen:
            chosen.append(match)
    return chosen


def _nvml_devices() -> list[dict[str, str]]:
    """index, uuid, name and compute capability of every GPU, through NVML only."""
    import pynvml

    devices = []
    pynvml.nvmlInit()
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append({
                "index": str(index),
                "uuid": uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                "name": name.decode() if isinstance(name, bytes) else str(name),
                "capability": f"{major}.{minor}"})
    finally:
        pynvml.nvmlShutdown()
    return devices


def accelerator(env: Mapping[str, str]) -> dict[str, Any]:
    """The distinct GPU models (name and compute capability) this process can use,
    and the CUDA version; never touches torch.cuda (NVML only), and honours
    CUDA_VISIBLE_DEVICES from `env`, which NVML itself ignores."""
    import torch

    cuda = torch.version.cuda
    try:
        devices = _nvml_devices() if cuda else []
    except Exception:  # noqa: BLE001 - no driver or no NVML: a CPU machine
        devices = []
    devices = visible_gpus(devices, env.get("CUDA_VISIBLE_DEVICES"))
    models = sorted({(d["name"], d["capability"]) for d in devices})
    kind = "cuda" if models and cuda else "cpu"
    return {"kind": kind, "cuda": cuda if kind == "cuda" else None,
            "gpus": [{"name": name, "capability": capability} for name, capability in models]}


def current(function_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    import torch

    return {
        "handler_sha256": handler_sha256(function_dir),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "safetensors": package_version("safetensors"),
        "libraries": {name: package_version(name) for name in LIBRARIES},
        "machine": platform.machine(),
        "accelerator": accelerator(os.environ if env is None else env),
    }


def mismatches(recorded: dict[str, Any], running: dict[str, Any]) -> list[str]:
    """Each field that differs, as `field: recorded -> running`; empty when usable."""
    problems = []
    for field in ("handler_sha256", "python", "torch", "transformers", "safetensors", "machine"):
        if recorded.get(field) != running.get(field):
            problems.append(f"{field}: {recorded.get(field)} -> {running.get(field)}")
    libraries, here = recorded.get("libraries", {}), running.get("libraries", {})
    for name in sorted(set(libraries) | set(here)):
        if libraries.get(name) != here.get(name):
            problems.append(f"{name}: {libraries.get(name)} -> {here.get(name)}")
    traced = recorded.get("accelerator", {})
    if traced.get("kind") == "cuda":
        problems.extend(_gpu_mismatches(traced, running.get("accelerator", {})))
    return problems


def _gpu_mismatches(traced: dict[str, Any], running: dict[str, Any]) -> list[str]:
    """A GPU-traced template serves where every visible GPU is a model it was traced
    on, with the same CUDA version; how many GPUs there are does not matter."""
    if running.get("kind") != "cuda":
        return ["accelerator: traced on a GPU, no GPU is visible here"]
    problems = []
    if traced.get("cuda") != running.get("cuda"):
        problems.append(f"cuda: {traced.get('cuda')} -> {running.get('cuda')}")
    known = {(g.get("name"), g.get("capability")) for g in traced.get("gpus", [])}
    for gpu in running.get("gpus", []):
        if (gpu.get("name"), gpu.get("capability")) not in known:
            problems.append(f"gpu: {gpu.get('name')} (compute {gpu.get('capability')}) was not"
                            f" among the traced {sorted(known)}")
    return problems


__all__ = ["current", "handler_sha256", "mismatches"]
