"""What the benchmark reads from outside the systems: Prometheus metrics and NVML.

NVML is read in the orchestrating process, which never creates a CUDA context; on a
host without it (CPU runs) every reader returns ``None`` and the records say so.
:class:`GpuSampler` integrates, over wall time, the moments when a process tree holds
more than ``threshold`` bytes of GPU memory: the measured GPU-seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str | None) -> Samples:
    """``{(sample name, sorted labels): value}``; empty for no text."""
    out: Samples = {}
    for family in text_string_to_metric_families(text or ""):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in samples.items()
             if n == name and all(dict(ls).get(k) == want for k, want in labels.items())]
    return sum(found) if found else None


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(ls)[label]: v for (n, ls), v in samples.items()
            if n == name and label in dict(ls)}


def phases(samples: Samples) -> dict[str, dict[str, float]]:
    """``fwatchdog_llm_phase_seconds``: ``{phase: {count, sum}}``."""
    sums = by_label(samples, "fwatchdog_llm_phase_seconds_sum", "phase")
    counts = by_label(samples, "fwatchdog_llm_phase_seconds_count", "phase")
    return {p: {"count": counts.get(p, 0.0), "sum": s} for p, s in sums.items()}


class Nvml:
    """Per-process GPU memory of device 0, or nothing when NVML is not there."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # no driver, no library, no device: a CPU host
            self._nvml = None

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def name(self) -> str | None:
        if not self.available:
            return None
        name = self._nvml.nvmlDeviceGetName(self._handle)
        return name.decode() if isinstance(name, bytes) else str(name)

    def per_process(self) -> dict[int, int] | None:
        if not self.available:
            return None
        nvml = self._nvml
        out: dict[int, int] = {}
        for getter in (nvml.nvmlDeviceGetComputeRunningProcesses,
                       nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in getter(self._handle):
                used = proc.usedGpuMemory
                out[proc.pid] = out.get(proc.pid, 0) + (int(used) if used else 0)
        return out

    def used_total(self) -> int | None:
        if not self.available:
            return None
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


def memory_of(nvml: Nvml, tree: dict[int, str], role: Callable[[str], str]) -> dict[str, Any]:
    """GPU memory of a process tree: per process (``role-pid``) and in total."""
    per = nvml.per_process()
    if per is None:
        return {"nvml": False}
    mine = {f"{role(title)}-{pid}": per[pid] for pid, title in tree.items() if pid in per}
    return {"nvml": True, "per_process_bytes": mine, "total_bytes": sum(mine.values()),
            "device_used_bytes": nvml.used_total()}


class GpuSampler:
    """Samples a tree's GPU memory every ``interval`` in a thread; see the module doc."""

    def __init__(self, nvml: Nvml, pids: Callable[[], set[int]], threshold: int,
                 interval: float = 0.05) -> None:
        self._nvml = nvml
        self._pids = pids
        self._threshold = threshold
        self._interval = interval
        self.held_s = 0.0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self._nvml.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            per = self._nvml.per_process() or {}
            pids = self._pids()
            used = sum(v for pid, v in per.items() if pid in pids)
            self.peak_bytes = max(self.peak_bytes, used)
            if used >= self._threshold:
                self.held_s += now - last
            last = now
