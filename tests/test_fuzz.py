"""The fuzz campaign (tools/fuzz.py): 1000 damaged copies of a fixture's GGUF and pack through
`run`, the C API, `inspect`, `verify` and `pack`, in two long-lived worker processes.

0 crashes (signals), 0 tracebacks, 0 hangs, 0 runs that produced different text from damage the
checksums or the binding cover, and `verify` refuses every covered damage. The counts are printed.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_fuzz_campaign(converted):
    sys.path.insert(0, str(ROOT / "tools"))
    import fuzz
    path = converted("tiny-llama-swiglu", "f16")
    before = set(Path(tempfile.gettempdir()).glob("ripple-fuzz-*"))
    res = fuzz.campaign(path, cases=1000, seed=13, workers=2, timeout=120, log=lambda m: print(m, flush=True))
    c = res["counts"]
    print(f"fuzz: {res['cases']} cases (seed {res['seed']}) in {res['seconds']} s: {c}")
    print("by driver:", res["by_driver"])
    print("slowest case per driver (s):", res["slowest_seconds"])
    for f in res["failures"]:
        print("  FAILURE", f)
    assert sum(c.values()) == 1000
    for bad in ("crash", "traceback", "hang", "silent", "missed"):
        assert c.get(bad, 0) == 0, (bad, res["failures"][:5])
    # the workers are killed at the end: their scratch copies (4 MiB each) used to stay in /tmp
    assert set(Path(tempfile.gettempdir()).glob("ripple-fuzz-*")) == before
    assert c.get("refused", 0) > 300  # most damage is caught before or while running
