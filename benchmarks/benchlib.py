"""Shared pieces of the benchmark suite: the machine, peak memory, timing, figures.

A *figure* is one measured value next to the baseline it is compared with, both measured in
the same run on the same machine:

    {"name", "value", "unit", "baseline", "baseline_value", "ratio", "better", "note"}

``ratio`` is always ``value / baseline_value``; ``better`` says which way is good for
``value`` ("higher" for rates, "lower" for times and memory), so a ratio of 8 on a rate
and of 0.125 on a time both mean "8 times better than the baseline".

Peak memory on the CPU is the resident-set high-water mark (VmHWM). Linux resets it when
"5" is written to /proc/self/clear_refs, which gives a per-measurement peak inside one
process; where that is not allowed, the process-lifetime ``ru_maxrss`` is used and the
measurement says so. Freed heap memory is handed back to the OS first (malloc_trim), so
what an earlier measurement freed does not hide this one's allocations. On CUDA it is
``torch.cuda.max_memory_allocated`` (reset per measurement).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "src",):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_counts(cores: int) -> list[int]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself."""
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def machine_info() -> dict:
    import numpy as np
    import torch

    flags = cpu_flags()
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_vector_extensions": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_gb": memory_total_gb(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": None,
        "cuda": torch.version.cuda,
        # other processes on the machine change every timing: the load average at the
        # start and the end of the run tells whether the figures were taken on a quiet machine
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _vm_hwm_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _vm_rss_kb() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it resident otherwise), so that
    the resident set at the start of a measurement holds only live data."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory while the ``with`` block runs.

    ``peak_rss_mb``: the process's resident-set peak during the block; ``peak_extra_mb``:
    that peak minus the resident set at the start (what the block itself added);
    ``cuda_peak_mb``: peak CUDA allocation (None without CUDA). ``resettable`` is False when
    the RSS peak could not be reset and is the whole process's lifetime peak.
    """

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.peak_rss_mb = self.peak_extra_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self.resettable = False

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        release_free_memory()
        self.resettable = _reset_hwm()
        self._rss_start_kb = _vm_rss_kb() or 0
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = _vm_hwm_kb() if self.resettable else None
        if peak_kb is None:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        self.peak_rss_mb = peak_kb / 1024
        self.peak_extra_mb = max(peak_kb - self._rss_start_kb, 0) / 1024
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20

    def as_dict(self) -> dict:
        return {"peak_rss_mb": round(self.peak_rss_mb, 1), "peak_extra_mb": round(self.peak_extra_mb, 1),
                "cuda_peak_mb": None if self.cuda_peak_mb is None else round(self.cuda_peak_mb, 1),
                "rss_peak_resettable": self.resettable}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_time(fn: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> float:
    """Fastest of ``repeats`` runs (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - start)
    return best


def figure(name: str, value: float, unit: str, baseline: str, baseline_value: float, better: str = "higher",
           note: str = "") -> dict:
    if better not in ("higher", "lower"):
        raise ValueError(better)
    return {"name": name, "value": float(value), "unit": unit, "baseline": baseline,
            "baseline_value": float(baseline_value),
            "ratio": float(value) / float(baseline_value) if baseline_value else float("nan"),
            "better": better, "note": note}


def improvement(fig: dict) -> float:
    """How many times better than its baseline a figure is (>1 = better)."""
    return fig["ratio"] if fig["better"] == "higher" else 1.0 / fig["ratio"]
