"""bench probe / io / scale / report: the cost model, the runtime's counters per placement, the scale
measurements and projections, and the CLI on fixtures."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import CALIB, HELDOUT, run_cli
from ripple_gguf import iocost


def test_fit_recovers_a_known_cost_model():
    sizes = np.array([4096, 16384, 65536, 262144, 1 << 20])
    t = 80e-6 + sizes / 1.5e9
    m = iocost.fit_cost_model(sizes, t)
    assert m.t0_us == pytest.approx(80, rel=1e-6) and m.bw_mbps == pytest.approx(1500, rel=1e-6)
    assert m.merge_gap_bytes == int(80e-6 * 1.5e9)  # merge when the gap costs less than a request


def test_self_generated_calibration_label_round_trips():
    """bench io rebuilds the other placements from the calibration a GGUF's index records."""
    from ripple_gguf.calib import parse_self_generated, self_generated_source
    assert parse_self_generated(self_generated_source(8192, 3)) == (8192, 3)
    assert parse_self_generated("calib.txt") is None


def test_bench_probe_cli(tmp_path):
    proc = run_cli("bench", "probe", "--dir", tmp_path, "--size", "16MiB", "--json", check=True)
    r = json.loads(proc.stdout)
    assert {p["qd"] for p in r["points"]} == set(iocost.PROBE_DEPTHS)
    for f in r["fit"].values():
        assert f["t0_us"] > 0 and f["bw_mbps"] > 0
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_bench_io_decodes_through_the_runtime(converted):
    """Every figure is the runtime's own counter: the other placements are real conversions, the
    cache is the runtime's, and merging only ever trades more bytes for fewer reads."""
    path = converted("tiny-arcee-relu2", "f16")
    proc = run_cli("bench", "io", path, "--text", HELDOUT, "--tokens", "24", "--calib", CALIB, "--json", check=True)
    r = json.loads(proc.stdout)
    cfg = {(c["placement"], c["merge"], c["budget"]): c for c in r["configs"]}
    assert len(cfg) == 3 * 2 * 3 and r["tokens"] == 24 and r["target_density"] == 0.5
    assert "bench io:" in run_cli("bench", "io", path, "--text", HELDOUT, "--tokens", "8", "--calib", CALIB,
                                  check=True).stdout  # the terminal table renders too
    for (place, merge, budget), c in cfg.items():
        assert c["tokens"] == 24 and c["io_s_per_token"] > 0 and c["reads_per_token"] > 0
        assert c["bytes_per_token"] >= c["useful_bytes_per_token"] > 0  # every missed neuron is read
        assert 0 < c["predicted_density"] <= 1
        # merging: never more requests (bytes may be more: gaps, or fewer: O_DIRECT pads each request to 4 KiB)
        if merge:
            assert c["merge_gap_bytes"] > 0 and c["reads_per_token"] <= cfg[(place, False, budget)]["reads_per_token"]
        else:
            assert c["merge_gap_bytes"] == 0
    for place in ("identity", "coactivation"):  # a bigger cache: more hits, never more needed bytes
        small, big = cfg[(place, True, 0.0)], cfg[(place, True, 0.5)]
        assert big["cache_bytes"] > small["cache_bytes"] and big["cache_hit_rate"] >= small["cache_hit_rate"]
        assert big["useful_bytes_per_token"] <= small["useful_bytes_per_token"]
    # the converter's order needs fewer separate reads than model order on this ReLU-family model
    assert cfg[("coactivation", False, 0.0)]["reads_per_token"] < cfg[("identity", False, 0.0)]["reads_per_token"]
    assert r["model"]["placement_in_file"] == "coactivation"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # scratch conversions are gone


def test_bench_io_needs_the_calibration_text(converted):
    proc = run_cli("bench", "io", converted("tiny-arcee-relu2", "f16"), "--text", HELDOUT, "--tokens", "16")
    assert proc.returncode == 1 and "--calib" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_report_writes_the_document(converted, tmp_path):
    path = converted("tiny-arcee-relu2", "f16")
    out = tmp_path / "docs" / "BENCHMARKS.md"
    run_cli("bench", "report", path, "--text", HELDOUT, "--out", out, "--no-e2e", "--no-scale",
            "--tokens", "16", "--calib", CALIB, "--curve-chunks", "1", check=True)
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


def test_bench_scale_forces_densities_and_projects(tmp_path):
    """A small random-weight model stands in for the 8B layer: the forced density is what the runtime
    computed, cold reads cover every missed neuron, and the projections cover both model sizes."""
    from ripple_gguf.bench.scale_report import render_scale
    proc = run_cli("bench", "scale", "--shape", "256x1024", "--types", "f16,q4_k_m", "--work-dir", tmp_path,
                   "--tokens", "4", "--threads", "2", "--json", check=True)
    r = json.loads(proc.stdout)
    assert set(r["measured"]) == {"f16", "q4_k_m"}
    for t, m in r["measured"].items():
        assert m["n_embd"] == 256 and m["n_ff"] == 1024 and m["n_layer"] == 2
        for w in m["warm"]:  # every token computed exactly its top ceil(d * n_ff), all from the cache
            assert abs(w["predicted_density"] - w["density"]) <= 1 / 1024 + 1e-9
            if w["density"] > 0:
                assert w["cache_hit_rate"] == 1.0
        for c in m["cold"]:
            assert c["reads_per_token"] > 0 and c["bytes_per_token"] >= c["useful_bytes_per_token"] > 0
            assert c["useful_bytes_per_token"] <= c["density"] * 1024 * m["n_layer"] * m["bundle_bytes"] * 1.001
        assert m["stock_s_per_token"] > 0 and m["dense_ffn_s_per_layer"] is not None
    rows = r["projection"]["rows"]
    assert {(x["model"], x["type"]) for x in rows} == {(a, b) for a in ("8B", "70B") for b in ("f16", "q4_k_m")}
    assert all(x["tok_s"] > 0 and x["stock_tok_s"] > 0 for x in rows if x["fits"])
    assert r["placement"]["n_ff"] == 1024 and r["placement"]["seconds"] > 0
    text = "\n".join(render_scale(r))
    assert "random weights" in text and "projections, not measurements" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_bench_scale_refuses_bad_shapes(tmp_path):
    proc = run_cli("bench", "scale", "--shape", "4096by14336", "--work-dir", tmp_path)
    assert proc.returncode == 1 and "--shape" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "scale", "--types", "q5_9", "--work-dir", tmp_path)
    assert proc.returncode == 1 and "q5_9" in proc.stderr and "Traceback" not in proc.stderr
