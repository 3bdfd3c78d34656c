"""Shared benchmark helpers: wall time, peak memory (CPU: the process's resident high-water mark,
reset per measurement; GPU: torch.cuda.max_memory_allocated) and the machine description."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

MB = 2**20


def single_thread() -> None:
    """Benchmarks share 2 cores with other jobs: one thread keeps timings comparable."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_hwm() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


@dataclass
class Measure:
    seconds: float = 0.0
    peak_mb: float | None = None  # peak above the memory in use when the measurement began
    peak_total_mb: float | None = None  # the process's (CPU) or the device's (GPU) peak in that window
    extra: dict = field(default_factory=dict)


@contextmanager
def measure(device: str = "cpu", memory: bool = True):
    """Time a block and its peak memory. CPU: VmHWM after a reset minus the RSS at the start, so
    memory the allocator returned to the OS inside the block still counts at its peak."""
    result = Measure()
    gc.collect()
    cuda = device.startswith("cuda")
    if memory:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / MB
        else:
            memory = _reset_hwm()
            base = rss_mb()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
        result.seconds = time.perf_counter() - start
        if memory:
            total = torch.cuda.max_memory_allocated() / MB if cuda else _status_kb("VmHWM") / 1024
            result.peak_total_mb, result.peak_mb = total, total - base


def best_of(fn, repeats: int, device: str = "cpu") -> tuple[float, object]:
    """Shortest of `repeats` timed calls (no memory tracking) and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        with measure(device, memory=False) as m:
            out = fn()
        best = min(best, m.seconds)
    return best, out


def machine() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "threads_used": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def ratio(slow: float, fast: float) -> float:
    return slow / fast if fast > 0 else float("inf")
