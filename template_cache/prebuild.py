"""Objects a start-up builds from files without a GPU, built once in a parent process.

A tokenizer's ``from_pretrained`` parses its files: a Llama 3 ``tokenizer.json`` is
9 MB, 0.3 - 0.6 s of every start. The tracer records each such call in the manifest
(``trace.prebuild``: the class, the call's arguments and its key, see
:func:`entry`). mode=llm's zygote makes the same calls before it forks
(:func:`build`), and a handler's restore hands the forked copy of an object to the
first call of the start-up with the same key (:meth:`Prebuilt.take`).

Invariants:
- Only a call whose every argument is plain JSON (str, int, float, bool, None) is
  recorded, so the parent repeats exactly the call the start-up makes; its path
  is kept as ``function:<relative>`` inside the function folder.
- An object is handed out at most once per process: a second call with the same
  key builds its own, as it would without this module (two calls never share one
  mutable object).
- Before an object is handed out, the files its call read (every regular file under
  the path, or the path itself) are compared, by size and modification time, with
  what they were when it was built; any difference and the call runs normally.
- A build that fails is logged and skipped: the start-up's own call then runs.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fwatchdog.template_cache.intercept import normalise_path, path_first

LOG = logging.getLogger("fwatchdog.template_cache")
PLAIN = (str, int, float, bool, type(None))


def entry(owner: Any, args: tuple[Any, ...], kwargs: dict[str, Any], key: str,
          function_dir: Path) -> dict[str, Any] | None:
    """The manifest's record of one call, or None when it cannot be repeated."""
    args, kwargs = path_first(args, kwargs)
    if not args or owner is None:
        return None
    path = normalise_path(args[0], function_dir)
    rest = list(args[1:])
    if path is None or not all(isinstance(v, PLAIN) for v in [*rest, *kwargs.values()]):
        return None
    return {"key": key, "class": f"{owner.__module__}:{owner.__qualname__}",
            "args": [path, *rest], "kwargs": dict(kwargs)}


def _resolve(path: str, function_dir: Path) -> str:
    return str(function_dir / path[len("function:"):]) if path.startswith("function:") else path


def stamp(path: str) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of every regular file the call may read."""
    root = Path(path)
    try:
        if root.is_file():
            files = [root]
        elif root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
        else:
            return ()
        out = []
        for p in files:
            st = p.stat()
            out.append((str(p), st.st_size, st.st_mtime_ns))
        return tuple(out)
    except OSError:
        return ()


@dataclass
class Prebuilt:
    """Objects built ahead, by call key; each is taken at most once."""

    objects: dict[str, tuple[Any, str, tuple[tuple[str, int, int], ...]]] = field(
        default_factory=dict)
    seconds: float = 0.0

    def take(self, key: str | None) -> Any:
        """The object built for `key`, once, while its files are unchanged; else None."""
        if key is None or key not in self.objects:
            return None
        obj, path, built = self.objects.pop(key)
        if stamp(path) != built:
            LOG.info("template_prebuilt_stale key=%s reason='its files changed'", key)
            return None
        return obj


def build(entries: Any, function_dir: Path) -> Prebuilt:
    """Make each recorded call (the module doc); never raises."""
    prebuilt = Prebuilt()
    started = time.perf_counter()
    for item in entries if isinstance(entries, list) else []:
        try:
            module_name, _, qualname = str(item["class"]).partition(":")
            owner: Any = importlib.import_module(module_name)
            for part in qualname.split("."):
                owner = getattr(owner, part)
            args = list(item.get("args", []))
            args[0] = _resolve(str(args[0]), function_dir)
            kwargs = dict(item.get("kwargs", {}))
            before = stamp(args[0])
            obj = owner.from_pretrained(*args, **kwargs)
            prebuilt.objects[str(item["key"])] = (obj, args[0], before)
        except Exception as exc:  # noqa: BLE001 - the start-up's own call runs instead
            LOG.info("template_prebuild_failed class=%s error=%r",
                     item.get("class") if isinstance(item, dict) else None, str(exc))
    prebuilt.seconds = time.perf_counter() - started
    return prebuilt


__all__ = ["Prebuilt", "build", "entry", "stamp"]
