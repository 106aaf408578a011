"""bench probe / io / report: the cost model, the replay's accounting, and the CLI on a fixture."""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from conftest import HELDOUT, run_cli
from ripple_gguf import iocost
from ripple_gguf.bench.io_replay import simulate_cache


def test_fit_recovers_a_known_cost_model():
    sizes = np.array([4096, 16384, 65536, 262144, 1 << 20])
    t = 80e-6 + sizes / 1.5e9
    m = iocost.fit_cost_model(sizes, t)
    assert m.t0_us == pytest.approx(80, rel=1e-6) and m.bw_mbps == pytest.approx(1500, rel=1e-6)
    assert m.merge_gap_bytes == int(80e-6 * 1.5e9)  # merge when the gap costs less than a request


def test_plan_runs_merges_only_cheap_gaps():
    pos = np.array([0, 1, 2, 5, 6, 40])
    s, c = iocost.plan_runs(pos, record_bytes=100, merge_gap_bytes=None)
    assert s.tolist() == [0, 5, 40] and c.tolist() == [3, 2, 1]
    s, c = iocost.plan_runs(pos, record_bytes=100, merge_gap_bytes=300)  # gap of 2 records merges, 33 does not
    assert s.tolist() == [0, 40] and c.tolist() == [7, 1]
    s, c = iocost.plan_runs(np.arange(100_000), record_bytes=1024, merge_gap_bytes=0)
    assert c.max() * 1024 <= iocost.MAX_REQ and c.sum() == 100_000  # long runs split like the runtime's


def test_cache_simulation_is_exact_lru_plus_pinned():
    rng = np.random.default_rng(0)
    reads = rng.random((200, 64)) < 0.2
    hot = rng.random(64)
    cap = 20
    misses = simulate_cache(reads, cap, hot)
    pinned = set(np.argsort(-hot, kind="stable")[:cap // 2].tolist())
    lru: OrderedDict[int, None] = OrderedDict()
    for t in range(len(reads)):
        want = [int(i) for i in np.flatnonzero(reads[t])]
        expect = {i for i in want if i not in pinned and i not in lru}
        assert set(np.flatnonzero(misses[t]).tolist()) == expect
        for i in want:
            if i not in pinned:
                lru.pop(i, None)
                lru[i] = None
        while len(lru) > cap - cap // 2:
            lru.popitem(last=False)
    assert (simulate_cache(reads, 0, hot) == reads).all()


def test_bench_probe_cli(tmp_path):
    proc = run_cli("bench", "probe", "--dir", tmp_path, "--size", "16MiB", "--json", check=True)
    r = json.loads(proc.stdout)
    assert {p["qd"] for p in r["points"]} == set(iocost.PROBE_DEPTHS)
    for f in r["fit"].values():
        assert f["t0_us"] > 0 and f["bw_mbps"] > 0
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


@pytest.mark.parametrize("model", ["tiny-arcee-relu2"])
def test_bench_io_accounting(converted, model):
    path = converted(model, "f16")
    proc = run_cli("bench", "io", path, "--text", HELDOUT, "--tokens", "256", "--time-tokens", "8", "--json", check=True)
    r = json.loads(proc.stdout)
    cfg = {(c["placement"], c["merge"], c["budget"]): c for c in r["configs"]}
    assert len(cfg) == 3 * 2 * 3
    for (place, merge, budget), c in cfg.items():
        # every missed neuron is read; merging only adds gap bytes and never adds requests
        assert c["bytes_per_token"] >= c["useful_bytes_per_token"] > 0
        assert c["io_s_per_token"] > 0 and c["oracle_s_per_token"] > 0
        if merge:
            assert c["reads_per_token"] <= cfg[(place, False, budget)]["reads_per_token"]
        else:
            assert c["bytes_per_token"] == pytest.approx(c["useful_bytes_per_token"])
        # placement changes how the bytes are laid out, never how many are needed
        assert c["useful_bytes_per_token"] == pytest.approx(cfg[("identity", merge, budget)]["useful_bytes_per_token"])
    for merge in (False, True):  # a bigger cache never means more bytes to fetch
        assert (cfg[("coactivation", merge, 0.25)]["useful_bytes_per_token"]
                <= cfg[("coactivation", merge, 0.0)]["useful_bytes_per_token"])
    # the converter's order needs fewer separate reads than model order on this ReLU-family model
    assert cfg[("coactivation", False, 0.0)]["reads_per_token"] < cfg[("identity", False, 0.0)]["reads_per_token"]


def test_bench_report_writes_the_document(converted, tmp_path):
    path = converted("tiny-arcee-relu2", "f16")
    out = tmp_path / "docs" / "BENCHMARKS.md"
    run_cli("bench", "report", path, "--text", HELDOUT, "--out", out, "--no-e2e", "--tokens", "128",
            "--time-tokens", "4", "--curve-chunks", "1", check=True)
    text = out.read_text()
    assert "## Targets" in text and "Device probe" in text and "tiny-arcee-relu2" in text
    assert "Density vs perplexity" in text
    for plot in ("io", "curve"):
        assert (out.parent / "bench" / f"{path.stem}-{plot}.png").stat().st_size > 1000
    raw = json.loads((out.parent / "benchmarks.json").read_text())
    assert raw["models"][0]["io"]["headline"]["0"]["reads_ratio"] > 1
    # the curve: one row per stored operating point, densest first, the dense one exactly stock
    rows = raw["models"][0]["curve"]["rows"]
    assert len(rows) >= 2 and rows[0]["density"] == 1.0 and rows[0]["oracle"] == rows[0]["stock"]
    assert all(a["density"] > b["density"] for a, b in zip(rows, rows[1:]))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_bench_errors_are_one_line(converted, tmp_path):
    proc = run_cli("bench", "io", tmp_path / "missing.gguf", "--text", HELDOUT)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    proc = run_cli("bench", "io", converted("tiny-arcee-relu2", "f16"), "--text", tmp_path / "none.txt")
    assert proc.returncode == 1 and "--text" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "e2e", converted("tiny-arcee-relu2", "f16"), "--text", HELDOUT, "--budgets", "1,x")
    assert proc.returncode == 1 and "--budgets" in proc.stderr and "Traceback" not in proc.stderr
