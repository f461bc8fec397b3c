"""What the tracer watches besides loads: ops and first use of weights during the
samples, GPU kernels, peak memory, import costs, and the warm-up plan built from them.

Invariants:
- Watching never changes results: the dispatch mode only reads tensor metadata and
  calls the op unchanged.
- Nothing here initialises CUDA unless the traced function already did.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MAX_OPS = 2000
MAX_PROMPT_BUCKET = 8192


class OpWatch(TorchDispatchMode):
    """Records (op, input shapes) counts and the order in which watched tensors are
    first used. Watched tensors are matched by their data pointer, so views (a
    transpose inside a linear layer) count as a use of the weight they view."""

    def __init__(self, watched: dict[int, str]) -> None:
        super().__init__()
        self.watched = watched
        self.first_use: list[str] = []
        self.ops: Counter[tuple[str, tuple[tuple[int, ...], ...]]] = Counter()
        self._seen: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        shapes = []
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                shapes.append(tuple(leaf.shape))
                name = self.watched.get(_pointer(leaf))
                if name is not None and name not in self._seen:
                    self._seen.add(name)
                    self.first_use.append(name)
        self.ops[(str(func), tuple(shapes))] += 1
        return func(*args, **kwargs)

    def op_list(self) -> list[dict[str, Any]]:
        return [{"op": op, "shapes": [list(s) for s in shapes], "count": count}
                for (op, shapes), count in self.ops.most_common(MAX_OPS)]


def _pointer(tensor: torch.Tensor) -> int:
    try:
        return int(tensor.data_ptr()) if tensor.numel() else 0
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return 0


def cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def kernel_names(profile: Any) -> list[dict[str, Any]]:
    counts: Counter[str] = Counter()
    for event in profile.events():
        if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA:
            counts[event.name] += 1
    return [{"name": name, "count": count} for name, count in counts.most_common()]


def peak_memory() -> dict[str, int | None]:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = int(torch.cuda.max_memory_allocated()) if cuda_in_use() else None
    return {"cpu_max_rss_bytes": rss_kib * 1024, "cuda_max_allocated_bytes": cuda}


def shape_buckets(limit: int) -> list[int]:
    """Powers of two up to `limit`, and `limit` itself: the lengths a warm-up runs so
    that no prompt length meets a kernel for the first time in a request."""
    limit = max(1, min(limit, MAX_PROMPT_BUCKET))
    buckets = []
    value = 1
    while value < limit:
        buckets.append(value)
        value *= 2
    buckets.append(limit)
    return buckets


def warmup_plan(samples: Iterable[dict[str, Any]], max_context: int | None) -> dict[str, Any]:
    context = max_context or 2048
    return {
        "samples": list(samples),
        "prompt_lengths": shape_buckets(context),
        "decode_context_lengths": shape_buckets(context),
        "sampling": ["greedy", "sample"],
        "max_context": context,
    }


class LazyImportTimer:
    """Times `importlib.import_module` calls that import something new.

    `python -X importtime` sees only import statements; transformers imports model
    modules (`...modeling_llama`, seconds on a cold start) lazily through
    importlib.import_module, so the tracer times those itself. Installed for one
    traced start-up and removed on exit, the original put back."""

    def __init__(self, transparent: tuple[str, ...] = ("function",)) -> None:
        self.imports: list[dict[str, Any]] = []
        self._depth = 0
        # The handler's own import is not a preload candidate: what it imports is.
        self._transparent = transparent

    def __enter__(self) -> LazyImportTimer:
        self._original = importlib.import_module
        original = self._original

        def timed(name: str, package: str | None = None) -> Any:
            absolute = importlib.util.resolve_name(name, package) if name.startswith(".") else name
            if (self._depth or absolute in sys.modules
                    or absolute.partition(".")[0] in self._transparent):
                return original(name, package)
            self._depth += 1
            started = time.perf_counter()
            try:
                return original(name, package)
            finally:
                self._depth -= 1
                elapsed = int((time.perf_counter() - started) * 1e6)
                self.imports.append({"module": absolute, "self_us": None,
                                     "cumulative_us": elapsed})

        importlib.import_module = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        importlib.import_module = self._original


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def parse_importtime(lines: Iterable[str], modules: set[str]) -> list[dict[str, Any]]:
    """Top-level imports of `python -X importtime` among `modules`, in import order.

    An import's nesting shows as indentation; top-level ones (one space) are what a
    pre-warmed parent must import itself, the rest come along with them."""
    result = []
    modules = {m for m in modules if m.partition(".")[0] not in sys.stdlib_module_names}
    for line in lines:
        match = _IMPORT_LINE.match(line)
        if not match:
            continue
        self_us, cumulative_us, indent, module = match.groups()
        if len(indent) == 1 and module in modules:
            result.append({"module": module, "self_us": int(self_us),
                           "cumulative_us": int(cumulative_us)})
    return result
