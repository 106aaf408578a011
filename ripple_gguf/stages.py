"""Wall-clock time per pipeline stage: logged as each stage ends and returned in `--json`."""
from __future__ import annotations

import time
from contextlib import contextmanager


class Stages:
    def __init__(self, log=print):
        self.log = log
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        self.times[name] = round(self.times.get(name, 0.0) + dt, 2)
        self.log(f"  [{dt:6.1f} s] {name}")

    @property
    def total(self) -> float:
        return round(sum(self.times.values()), 1)
