"""How many threads our own heavy work (llama.cpp passes, torch, ggml quantizers) should use.

os.cpu_count() is the host's count: in a container limited by a CPU quota (docker --cpus, a CI
runner) or pinned to some cores it is far too many, and ggml's threads spin at every barrier, so
oversubscribed passes ran many times slower. RIPPLE_THREADS caps it for a user (or a harness
running several of us side by side).
"""
from __future__ import annotations

import math
import os

from .cgroup import own_dirs, read_text


def cpu_quota() -> float | None:
    """The tightest CPU quota (in CPUs) of this process's cgroups, None if unlimited."""
    best = None
    for version, d in own_dirs("cpu"):
        if version == "v2":
            quota, _, period = (read_text(os.path.join(d, "cpu.max")) or "").strip().partition(" ")
        else:
            quota, period = (read_text(os.path.join(d, "cpu.cfs_quota_us")) or "").strip(), \
                (read_text(os.path.join(d, "cpu.cfs_period_us")) or "").strip()
        if quota.isdigit() and period.strip().isdigit() and int(period) > 0:
            cpus = int(quota) / int(period)
            best = cpus if best is None else min(best, cpus)
    return best


def usable_cpus() -> int:
    """CPUs this process may run on: affinity, cgroup quota and RIPPLE_THREADS, the tightest."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    env = os.environ.get("RIPPLE_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        n = min(n, int(env))
    return max(1, n)


def idle_cores() -> int:
    """Threads for a llama.cpp pass or torch: the usable CPUs other processes leave idle (1-minute
    load average), at least 1. ggml's threads spin at every barrier, and observing nodes (cb_eval)
    puts a barrier after each of them: on a 2-core machine with one other busy process, 2 threads
    decoded 4-6x slower than 1 (SmolLM2, batched generation with capture: 13-21 vs 80 tokens/s)."""
    cpus = usable_cpus()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return int(max(1, min(cpus, cpus + 1 - round(busy))))
