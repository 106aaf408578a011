"""Thread counts for our own heavy work follow what the process may really use."""
from __future__ import annotations

import os

from ripple_gguf.cpus import idle_cores, usable_cpus


def test_ripple_threads_caps_every_thread_count(monkeypatch):
    monkeypatch.setenv("RIPPLE_THREADS", "1")
    assert usable_cpus() == 1 and idle_cores() == 1


def test_usable_cpus_never_exceed_the_affinity_mask():
    n = usable_cpus()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_a_cpu_quota_lowers_the_count(monkeypatch):
    import ripple_gguf.cpus as cpus
    monkeypatch.delenv("RIPPLE_THREADS", raising=False)
    monkeypatch.setattr(cpus, "cpu_quota", lambda: 0.5)  # docker --cpus=0.5
    assert usable_cpus() == 1
