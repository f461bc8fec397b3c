"""mode=llm's metrics, in the watchdog's own registry beside of-watchdog's three.

- ``fwatchdog_llm_phase_seconds{phase}``: histogram of each start-up phase:
  ``holder_load``, ``zygote_import``, ``handler_attach``, ``handler_restore``,
  ``handler_warmup``, ``handler_start`` (fork to ready, as the front saw it) and
  ``wake`` (a request on a released GPU until a handler was ready again).
- ``fwatchdog_llm_template_loads_total{outcome}``: hit, miss, skipped: loads of
  handler start-ups served from the template, run normally, or listed as dynamic.
- ``fwatchdog_llm_template_rejected_total{reason}``: handler start-ups without a
  usable template; the reason is a short class (missing, fingerprint, damaged,
  holder, other), the full text is in the log.
- ``fwatchdog_llm_handlers{state}``: handler processes by state.
- ``fwatchdog_llm_gpu_memory_bytes{process}``: GPU memory per runtime process as
  NVML counts it (holder, zygote, handler-<pid>), read at scrape time; absent
  without NVML or a GPU.
- ``fwatchdog_llm_gpu_released``: 1 while the GPU is released on idle, else 0.
- ``fwatchdog_llm_requests_total{outcome}``: ok, error (a 5xx the function sent
  or a failed relay), timeout, crashed (the handler died under it), client_gone,
  unavailable (no handler could be had).

Invariants: nothing here imports torch; NVML is optional and read only on scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

PHASE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
HANDLER_STATES = ("starting", "attaching", "restoring", "warming", "ready", "serving",
                  "retiring")


def rejection_class(reason: str) -> str:
    low = reason.lower()
    if "no manifest" in low or "no such file" in low or "missing" in low or "not found" in low:
        return "missing"
    if "fingerprint" in low:
        return "fingerprint"
    if "holder" in low or "attach" in low or "memory" in low:
        return "holder"
    if "changed" in low or "checksum" in low or "damaged" in low or "invalid" in low:
        return "damaged"
    return "other"


class GpuMemory(Collector):
    """Per-process GPU memory from NVML for the pids ``processes()`` names."""

    def __init__(self, processes: Callable[[], dict[int, str]]) -> None:
        self._processes = processes
        self._nvml: Any = None
        self._failed = False

    def _init(self) -> Any:
        if self._nvml is None and not self._failed:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception:  # noqa: BLE001 - no NVML, no GPU: no samples
                self._failed = True
        return self._nvml

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("fwatchdog_llm_gpu_memory_bytes",
                                   "GPU memory used by each runtime process (NVML)",
                                   labels=("process",))
        nvml = self._init()
        if nvml is not None:
            names = self._processes()
            used: dict[str, int] = {}
            try:
                for index in range(nvml.nvmlDeviceGetCount()):
                    device = nvml.nvmlDeviceGetHandleByIndex(index)
                    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(device):
                        name = names.get(int(proc.pid))
                        if name is not None and proc.usedGpuMemory is not None:
                            used[name] = used.get(name, 0) + int(proc.usedGpuMemory)
            except Exception:  # noqa: BLE001 - a GPU that went away mid-scrape
                used = {}
            for name, value in sorted(used.items()):
                family.add_metric([name], value)
        yield family


class LlmMetrics:
    def __init__(self, registry: CollectorRegistry,
                 processes: Callable[[], dict[int, str]]) -> None:
        self.phase = Histogram("fwatchdog_llm_phase_seconds",
                               "Seconds spent in each mode=llm start-up phase", ("phase",),
                               buckets=PHASE_BUCKETS, registry=registry)
        self.template_loads = Counter("fwatchdog_llm_template_loads_total",
                                      "Handler start-up loads by template outcome",
                                      ("outcome",), registry=registry)
        self.template_rejected = Counter("fwatchdog_llm_template_rejected_total",
                                         "Handler start-ups without a usable template",
                                         ("reason",), registry=registry)
        self.handlers = Gauge("fwatchdog_llm_handlers", "Handler processes by state",
                              ("state",), registry=registry)
        for state in HANDLER_STATES:
            self.handlers.labels(state).set(0)
        self.requests = Counter("fwatchdog_llm_requests_total",
                                "Requests for the function by outcome", ("outcome",),
                                registry=registry)
        self.gpu_released = Gauge("fwatchdog_llm_gpu_released",
                                  "1 while the GPU is released on idle (a request wakes it)",
                                  registry=registry)
        registry.register(GpuMemory(processes))

    def set_handlers(self, counts: dict[str, int]) -> None:
        for state in HANDLER_STATES:
            self.handlers.labels(state).set(counts.get(state, 0))
