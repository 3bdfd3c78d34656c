"""Peak memory of this process: the CPU resident-set high-water mark and, on CUDA, the allocator's peak."""

from __future__ import annotations

import resource
import sys

import torch


def peak_rss_bytes() -> int:
    """This program's resident set size high-water mark. Linux's ru_maxrss carries the parent's
    mark across fork and exec (a CLI started by a large process reports the parent's peak), so
    VmHWM of this process's own memory map is read where /proc has it."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory() -> dict[str, float]:
    peak = {"cpu_max_rss_mb": peak_rss_bytes() / 2**20}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak
