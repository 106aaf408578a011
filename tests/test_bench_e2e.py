"""`ripple-gguf bench e2e`: stock vs sparse runs in memory-limited cgroups, on the tiny SwiGLU fixture.

What a user would notice: every run decodes tokens (or says why not), both modes get the same limit
when cgroups are available, perplexities are finite and close, a worker killed by the limit is an
error entry (not a crashed bench), no cgroup directories are left behind, and bad input is a
one-line RippleError.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest

from ripple_gguf.bench.e2e import _worker, cache_budget, format_e2e, run_e2e
from ripple_gguf.cgroup import MemoryCgroup, _parents
from ripple_gguf.errors import RippleError
from ripple_gguf.pack import pack_path_for

from conftest import CALIB, HELDOUT, run_cli

MODEL = "tiny-llama-swiglu"


@pytest.fixture(scope="module")
def gguf(converted):
    path = converted(MODEL, "f32")
    if not pack_path_for(path).is_file():
        run_cli("pack", path, "--calib", CALIB, "--calib-tokens", 8192, check=True)
    return path


def _bench_dirs() -> set[str]:
    return {os.path.join(d, n) for _, d in _parents() if os.path.isdir(d)
            for n in os.listdir(d) if n.startswith(f"ripple-bench-{os.getpid()}-")}


def _cgroups_available() -> bool:
    cg = MemoryCgroup.create(1 << 30)
    if cg:
        cg.close()
    return cg is not None


@pytest.fixture(scope="module")
def result(gguf):
    # one compute thread: the batch path spins on a barrier, which a busy shared machine turns into noise
    return run_e2e(gguf, HELDOUT, fractions=(1.0, 0.5), gen_tokens=8, prompt_tokens=16, ctx=128, ppl_chunks=1,
                   timeout_s=60, threads=1, progress=False)


def test_every_run_decodes_or_says_why(result):
    assert [(r["mode"], r["fraction"]) for r in result["runs"]] == [
        (m, f) for f in (1.0, 0.5) for m in ("stock", "ripple", "ripple-same-ram", "ripple-default")]
    for r in result["runs"] + list(result["unconfined"].values()):
        if r["error"]:
            assert isinstance(r["error"], str) and r["error"].strip()
        else:
            assert r["decode_tokens"] == 8 and not r["timed_out"]
            assert r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["peak_rss_bytes"] > 0
            assert len(r["tokens"]) == 9
    # at 100% nothing should fail on the tiny model
    assert all(not r["error"] for r in result["runs"] if r["fraction"] == 1.0 and r["mode"] != "ripple-same-ram")


def test_limits_and_budgets(result):
    m = result["model"]
    assert m["gguf_bytes"] == m["ffn_bytes"] + m["non_ffn_bytes"]
    assert (m["predictor_bytes"] > 0) != m["streamed"]  # a dense default point streams, without predictors
    assert all(v > 4 * 2**20 for v in result["overheads"].values())
    for r in result["runs"]:
        assert r["budget_bytes"] == int(r["fraction"] * m["gguf_bytes"])
        if r["mode"] == "ripple-default":  # as a user runs it: the runtime sizes its cache from the limit
            assert "cache_budget_bytes" not in r
            assert r["error"] or r["path"] in ("stock", "pack")
        elif r["mode"] != "stock":
            assert r["cache_budget_bytes"] >= m["min_cache_bytes"]
            room = r["budget_bytes"] + (result["overheads"]["stock"] - result["overheads"]["ripple"]
                                        if r["mode"] == "ripple-same-ram" else 0)
            assert r["cache_floor_applied"] == (room - m["non_ffn_bytes"] - m["predictor_bytes"]
                                                < m["min_cache_bytes"])
    by = {(r["mode"], r["fraction"]): r for r in result["runs"]}
    if result["cgroup"]["version"]:
        for f in (1.0, 0.5):
            # the weight budget plus each mode's own non-weight memory; "same RAM": stock's limit for ripple too
            for run, own in (("stock", "stock"), ("ripple", "ripple"), ("ripple-same-ram", "stock"),
                             ("ripple-default", "stock")):
                assert by[(run, f)]["limit_bytes"] == by[(run, f)]["budget_bytes"] + result["overheads"][own]
            assert by[("stock", f)]["cgroup_peak_bytes"] <= by[("stock", f)]["limit_bytes"]
    else:
        assert "NOT memory-limited" in result["cgroup"]["note"]
        assert all(r["limit_bytes"] is None for r in result["runs"])
    assert _bench_dirs() == set()


def test_the_bench_budget_is_the_room_left_for_the_ffn():
    """What is left beside the non-FFN weights and predictors, at most the whole FFN, at least the minimum
    (a budget of every FFN tensor holds every streamed layer: the library's rule, test_stream)."""
    info = {"non_ffn_bytes": 100 << 20, "predictor_bytes": 0, "ffn_bytes": 300 << 20,
            "max_cache_bytes": (300 << 20) + 24 * 9 * 4096, "min_cache_bytes": 30 << 20, "streamed": True}
    assert cache_budget(400 << 20, info) == (300 << 20, False)
    assert cache_budget((400 << 20) - 1, info) == ((300 << 20) - 1, False)
    assert cache_budget(100 << 20, info) == (30 << 20, True)
    assert cache_budget(400 << 20, {**info, "streamed": False}) == (300 << 20, False)  # the pack's slots: exact


def test_perplexity_and_agreement(result):
    ppl = result["perplexity"]
    for mode in ("stock", "ripple"):
        assert math.isfinite(ppl[mode]["ppl"]) and ppl[mode]["ppl"] > 1 and ppl[mode]["tokens"] == 63
    # the predictor skips neurons, so sparse is not bit-identical to dense: compare quality instead
    assert abs(ppl["ripple"]["ppl"] / ppl["stock"]["ppl"] - 1) < 0.10
    by = {(r["mode"], r["fraction"]): r for r in result["runs"]}
    assert by[("stock", 1.0)]["tokens"] == by[("stock", 0.5)]["tokens"]  # a limit changes speed, not output
    assert by[("ripple", 1.0)]["decode_stats"]["tokens"] == 8
    assert set(result["speedup"]) == {"1.0", "0.5"} and result["speedup"]["1.0"] > 0


def test_table_names_both_modes(result):
    table = format_e2e(result)
    assert "stock" in table and "ripple" in table and "100%" in table and "50%" in table
    assert f"{result['perplexity']['stock']['ppl']:.3f}" in table


def test_oom_kill_is_an_error_entry(gguf):
    if not _cgroups_available():
        pytest.skip(MemoryCgroup.why_unavailable())
    args = {"mode": "stock", "gguf": str(gguf), "text": str(HELDOUT), "prompt_tokens": 16, "gen_tokens": 4,
            "n_ctx": 128, "ctx": 128, "timeout_s": 30, "threads": 1, "ppl_chunks": 0}
    rec = _worker(args, 8 * 2**20, 120)  # far below what the interpreter alone needs
    assert rec["error"] == "killed by the memory limit (OOM)" and rec["oom_killed"]
    assert _bench_dirs() == set()


def test_per_run_timeout_stops_decoding(gguf):
    args = {"mode": "stock", "gguf": str(gguf), "text": str(HELDOUT), "prompt_tokens": 16, "gen_tokens": 4,
            "n_ctx": 128, "ctx": 128, "timeout_s": 0, "threads": 1, "ppl_chunks": 0}
    rec = _worker(args, None, 120)
    assert rec["error"] is None and rec["timed_out"] and rec["decode_tokens"] == 0 and rec["ttft_s"] > 0


def test_bad_input_is_a_ripple_error(gguf, tmp_path):
    lone = tmp_path / "lone.gguf"
    shutil.copy(gguf, lone)
    with pytest.raises(RippleError, match="ripple-gguf pack"):
        run_e2e(lone, HELDOUT, progress=False)
    with pytest.raises(RippleError, match="no such file"):
        run_e2e(tmp_path / "missing.gguf", HELDOUT, progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(RippleError, match="longer --text"):
        run_e2e(gguf, short, progress=False)
