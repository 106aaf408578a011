"""Operating points: density chosen from a perplexity budget, several points stored, movable at load."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import FIXTURES, HELDOUT, all_logits, prompts, run_cli
from ripple_gguf import quality
from ripple_gguf.errors import RippleError
from ripple_gguf.runtime import RippleLlama, verified_pack

SWIGLU = "tiny-llama-swiglu"


def test_allocation_makes_cheap_layers_sparser():
    """Two layers, same bytes: the one whose error falls fast with density gets the sparser share."""
    g = quality.GRID
    cheap = quality.LayerCurve(np.linspace(1, 0, len(g)).astype(np.float32), np.clip(1 - g, 0, 1) ** 4)
    costly = quality.LayerCurve(np.linspace(1, 0, len(g)).astype(np.float32), np.clip(1 - g, 0, 1) ** 0.5)
    pts = quality.operating_points([cheap, costly], [1.0, 1.0], targets=(0.8, 0.6))
    assert [round(p.density, 3) for p in pts][0] == 1.0
    assert all(a.density > b.density for a, b in zip(pts, pts[1:]))
    for p in pts[1:]:
        d_cheap = g[list(cheap.threshold).index(p.thresholds[0])]
        d_costly = g[list(costly.threshold).index(p.thresholds[1])]
        assert d_cheap < d_costly


def test_layer_curve_thresholds_keep_their_share():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((400, 256)).astype(np.float32)
    scores = np.abs(h) + 0.1 * rng.standard_normal(h.shape).astype(np.float32)
    c = quality.layer_curve(scores, h, np.ones(256, np.float32))
    for d, t, e in zip(quality.GRID, c.threshold, c.error):
        assert abs((scores > t).mean() - d) < 0.01
        assert 0.0 <= e <= 1.0
    assert c.error[-1] == 0.0 and np.all(np.diff(c.error) <= 1e-12)  # more neurons, less lost


def test_budget_choice_is_conservative_against_noise():
    pts = [quality.OperatingPoint(d, np.zeros(1), q) for d, q in
           [(1.0, 0.0), (0.9, 0.01), (0.8, 0.025), (0.7, 0.015), (0.6, 0.05)]]
    half = 1 / quality.ESTIMATE_SHARE  # a point must measure within that share of the budget
    assert quality.choose(pts, 0.02 * half) == 1   # 0.7 measured +1.5% but 0.8 already broke the budget
    assert quality.choose(pts, 0.03 * half) == 3
    assert quality.choose(pts, 0.0) == 0
    assert quality.parse_budget("2%") == pytest.approx(0.02) == quality.parse_budget("0.02")
    # a bare 1 or more is percent (`--quality 1` meant +100%: the sparsest point, silently); > 100% refused
    assert quality.parse_budget("1") == pytest.approx(0.01) == quality.parse_budget(1)
    assert quality.parse_budget("0") == 0.0 == quality.parse_budget("0%")
    for bad in ("150%", "-1%", "101", "nan"):
        with pytest.raises(RippleError, match="out of range"):
            quality.parse_budget(bad)
    with pytest.raises(RippleError):
        quality.parse_budget("lots")


def test_masking_every_neuron_changes_nothing(converted):
    """The selection hook writes into llama.cpp's own graph: keeping everything is the stock model."""
    path = converted(SWIGLU, "f16")
    from ripple_gguf.llama_capture import LlamaRunner
    with LlamaRunner(path, capture_intermediate=False) as r:
        toks = r.tokenize(HELDOUT.read_text()[:4000])[:256]
    chunks = [[1] + toks[:127], [1] + toks[127:254]]
    dense, keep_all, oracle_half = quality.masked_perplexities(
        path, chunks, [None, quality.oracle_rule(1.0), quality.oracle_rule(0.3)], 512)
    assert keep_all == pytest.approx(dense, rel=1e-6)
    assert oracle_half != pytest.approx(dense, rel=1e-6)  # the mask really reaches ffn_down


@pytest.mark.parametrize("model", FIXTURES)
def test_pack_stores_points_within_budget_and_runtime_moves_along_them(converted, model):
    path = converted(model, "f16")
    pk = verified_pack(str(path))
    n = len(pk.op_density)
    assert n >= 4 and pk.op_density[0] == 1.0 and np.all(np.diff(pk.op_density) < 0)
    assert np.all(pk.op_ppl_increase[1:pk.op_default + 1] <= pk.op_budget)
    # stream_prefill=0: the prompts' batches at each point's own selection (not the dense FFN streamed)
    # stock_when_dense=False: the predictors stay to move along the curve (the default point may be dense
    # enough for the stock path otherwise)
    llm = RippleLlama(str(path), pack=pk, n_ctx=256, verbose=False, stream_prefill=0, stock_when_dense=False)
    try:
        assert llm.ripple_point["index"] == pk.op_default and llm.ripple_point["default"]
        assert llm.ripple_point["path"] == "pack"  # every load says which computation runs the point
        ps = prompts(llm, n=2, length=64)
        seen = []
        for i in range(n):
            llm.ripple_set_point(i)
            llm.ripple_reset_stats()
            for toks in ps:  # (only the stats: without logits_all the earlier rows of scores are never written)
                llm.reset()
                llm.eval(toks)
            seen.append(llm.ripple_stats()["predicted_density"])
        print(model, "stored", np.round(pk.op_density, 3), "on held-out prompts", np.round(seen, 3))
        assert seen[0] == 1.0
        assert all(b < a + 0.02 for a, b in zip(seen, seen[1:]))  # sparser points compute fewer neurons
        assert seen[-1] < 0.8
        with pytest.raises(RippleError):
            llm.ripple_set_point(n)
    finally:
        llm.close()


def test_quality_zero_computes_every_neuron(converted):
    """--quality 0% loads the dense point: the same logits as the debug all-active mode (with the
    pack kept attached; see the next test for what the default does)."""
    path = str(converted(SWIGLU, "f16"))
    pk = verified_pack(path)
    out = []
    for kw in ({"quality": "0%", "stock_when_dense": False, "stream_prefill": 0}, {"all_active": True}):
        llm = RippleLlama(path, pack=pk, n_ctx=256, verbose=False, logits_all=True, **kw)
        try:
            out.append(all_logits(llm, prompts(llm, n=2, length=48)))
        finally:
            llm.close()
    np.testing.assert_array_equal(out[0], out[1])


def test_dense_point_without_a_budget_runs_the_stock_path(converted):
    """Every neuron computed: the pack would read the same FFN bytes as llama.cpp and compute them
    slower (SmolLM2: 0.8x stock warm, ~0.6x at 50%/25% memory), so llama.cpp's stock path runs and
    says why. A given cache size or memory budget keeps the pack."""
    path = str(converted(SWIGLU, "f16"))
    llm = RippleLlama(path, quality="0%", n_ctx=256, verbose=False)
    st = llm.ripple_stats()
    assert st["mode"] == "dense" and "computes every neuron" in st["reason"] and llm.ripple_point["index"] == 0
    assert llm.ripple_point["path"] == "stock"
    got = [int(t) for t, _ in zip(llm.generate(llm.tokenize(b"def main("), temp=0.0, top_k=1), range(8))]
    llm.close()
    stock = RippleLlama(path, dense=True, n_ctx=256, verbose=False)
    want = [int(t) for t, _ in zip(stock.generate(stock.tokenize(b"def main("), temp=0.0, top_k=1), range(8))]
    stock.close()
    assert got == want
    kept = RippleLlama(path, quality="0%", cache_size=verified_pack(path).ffn_pack_bytes, n_ctx=256, verbose=False)
    assert kept.ripple_active and kept.ripple_point["index"] == 0 and kept.ripple_point["path"] == "stream"
    kept.close()
    proc = run_cli("run", path, "-p", "def ", "-n", "2", "--quality", "0%", check=True)
    assert "stock path: operating point 0 computes every neuron" in proc.stderr


def test_eval_curve_puts_predictor_next_to_oracle_and_gate_only(converted):
    path = converted(SWIGLU, "f16")
    proc = run_cli("eval", path, "--text", HELDOUT, "--ctx", 128, "--chunks", 4, "--curve", "--json", check=True)
    res = json.loads(proc.stdout)
    rows = res["curve"]
    assert len(rows) == len(verified_pack(str(path)).op_density)
    assert res["operating_point"]["default"]
    dense = rows[0]
    assert dense["density"] == 1.0 and dense["predictor"] == pytest.approx(dense["stock"], rel=2e-3)
    assert all(a["density"] > b["density"] for a, b in zip(rows, rows[1:]))
    for r in rows:
        assert r["oracle"] > 0 and r["gate_only"] > 0
    text = run_cli("eval", path, "--text", HELDOUT, "--ctx", 128, "--chunks", 2, "--curve", check=True).stdout
    assert "oracle top-d |h|" in text and "gate-only" in text and "operating point" in text


def test_bad_quality_is_a_one_line_error(converted):
    path = converted(SWIGLU, "f16")
    proc = run_cli("run", path, "-p", "hi", "-n", "2", "--quality", "lots")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "budget" in proc.stderr
    # a negative value is the value's mistake (argparse took "-1%" for an option: "expected one argument")
    proc = run_cli("run", path, "-p", "hi", "-n", "2", "--quality", "-1%")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: perplexity budget '-1%' is out of range; use e.g. 2% (0% = dense, 100% at most)"], proc.stderr


def test_starved_calibration_is_warned(tmp_path):
    from conftest import CALIB, MODELS
    proc = run_cli("convert", MODELS / SWIGLU, "-o", tmp_path / "m.gguf", "--calib", CALIB, "--calib-tokens", 1500,
                   check=True)
    assert "warning: only 1500 calibration tokens" in proc.stderr


def test_per_token_floor_keeps_the_top_share_of_every_token(converted):
    """The runtime's floor: with every threshold out of reach, each token computes exactly its top
    ceil(share * n_ff) neurons; a floor of 1 computes all (== the all-active logits)."""
    from ripple_gguf.runtime import ripple_lib
    import ctypes
    path = str(converted(SWIGLU, "f16"))
    pk = verified_pack(path)
    lib = ripple_lib()
    llm = RippleLlama(path, pack=pk, n_ctx=256, verbose=False, logits_all=True, stream_prefill=0, stock_when_dense=False)
    try:
        ps = prompts(llm, n=2, length=48)
        high = np.full(pk.n_layer, 1e30, dtype=np.float32)
        assert lib.llama_ripple_set_thresholds(llm.model, high.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), pk.n_layer) == 0
        assert lib.llama_ripple_set_floor(llm.model, 0.5) == 0
        llm.ripple_reset_stats()
        all_logits(llm, ps)
        assert llm.ripple_stats()["predicted_density"] == pytest.approx(0.5, abs=0.01)
        assert lib.llama_ripple_set_floor(llm.model, 1.0) == 0
        full = all_logits(llm, ps)
        assert lib.llama_ripple_set_floor(llm.model, 1.5) == -1  # refused, nothing changed
    finally:
        llm.close()
    ref = RippleLlama(path, pack=pk, n_ctx=256, verbose=False, logits_all=True, all_active=True)
    try:
        np.testing.assert_array_equal(full, all_logits(ref, ps))
    finally:
        ref.close()


def test_read_bytes_merges_runs_closer_than_a_page_and_reads_whole_pages():
    """What the pack reads for a selection (ripple.pack.op.read_share): each token's selected records
    (1,000 bytes each here) as runs merged across gaps under a page, each widened to 4 KiB pages,
    capped at the layer."""
    from ripple_gguf.quality import read_bytes
    m = np.zeros((3, 100), dtype=bool)
    m[0, [0, 1, 2]] = True   # [0, 3000) -> one page
    m[0, 50] = True          # [50000, 51000) -> the page at 49152
    m[1, [10, 13]] = True    # a 2,000-byte gap: one run [10000, 14000) -> pages 8192..16384
    m[1, [40, 45]] = True    # a 4,000-byte gap (< a page): one run [40000, 46000) -> 36864..49152
    m[2, :] = True           # every record: the layer, not the rounded-up pages
    assert read_bytes(m, 1000) == 4096 + 4096 + 8192 + 12288 + 100_000
    m2 = np.zeros((1, 100), dtype=bool)
    m2[0, [10, 30]] = True   # a 19,000-byte gap: two runs of a page each, not [8192, 32768)
    assert read_bytes(m2, 1000) == 8192
    assert read_bytes(np.zeros((2, 8), dtype=bool), 1000) == 0


def test_every_neuron_runs_where_dense_or_where_the_pack_would_read_nearly_every_byte():
    """The runtime's choice per point (quality.every_neuron_pays): at least 70% dense, or the pack's
    reads would take at least 90% of the FFN's bytes anyway; a pack written before read_share existed
    decides by density alone."""
    from types import SimpleNamespace
    from ripple_gguf.quality import every_neuron_pays
    pk = SimpleNamespace(op_density=np.array([1.0, 0.8, 0.6, 0.5]), op_read_share=np.array([1.0, 0.95, 0.92, 0.6]))
    assert [every_neuron_pays(pk, i) for i in range(4)] == [True, True, True, False]
    pk.op_read_share = None
    assert [every_neuron_pays(pk, i) for i in range(4)] == [True, True, False, False]
