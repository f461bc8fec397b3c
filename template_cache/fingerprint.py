"""What a template depends on, and the check that a running environment matches it.

Invariants:
- Never initialises CUDA: GPU facts come from NVML (pynvml), so a process that must
  fork later (the zygote) may call this.
- A template traced on a CPU-only machine holds bytes whose values do not depend on
  the device, so its accelerator entry is not compared; a template traced with a GPU
  is only used on the same GPU model and CUDA version.
"""

from __future__ import annotations

import hashlib
import platform
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


def accelerator() -> dict[str, Any]:
    """GPU model and CUDA version through NVML; never touches torch.cuda."""
    import torch

    cuda = torch.version.cuda
    devices: list[str] = []
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            for index in range(pynvml.nvmlDeviceGetCount()):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
                devices.append(name.decode() if isinstance(name, bytes) else str(name))
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver or no NVML: a CPU machine
        devices = []
    kind = "cuda" if devices and cuda else "cpu"
    return {"kind": kind, "cuda": cuda if kind == "cuda" else None, "devices": devices}


def current(function_dir: Path) -> dict[str, Any]:
    import torch

    return {
        "handler_sha256": handler_sha256(function_dir),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "safetensors": package_version("safetensors"),
        "machine": platform.machine(),
        "accelerator": accelerator(),
    }


def mismatches(recorded: dict[str, Any], running: dict[str, Any]) -> list[str]:
    """Each field that differs, as `field: recorded -> running`; empty when usable."""
    problems = []
    for field in ("handler_sha256", "python", "torch", "transformers", "safetensors", "machine"):
        if recorded.get(field) != running.get(field):
            problems.append(f"{field}: {recorded.get(field)} -> {running.get(field)}")
    traced = recorded.get("accelerator", {})
    if traced.get("kind") == "cuda" and traced != running.get("accelerator"):
        problems.append(f"accelerator: {traced} -> {running.get('accelerator')}")
    return problems


__all__ = ["current", "handler_sha256", "mismatches"]
