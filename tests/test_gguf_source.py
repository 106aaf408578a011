"""`ripple-gguf convert X.gguf`: an existing GGUF of any llama.cpp type mix converts as it is.

Every tensor stays byte for byte what it was (the placement lives in the index and in the pack's
record order), unless --down-type asks for ffn_down in another type (requantized with ggml's
quantizer, its error stored in `ripple.down_rel_rms`); KV metadata, alignment and tensor order stay
byte-identical, `ripple.*` keys are added. Fast tests use the fixture models (a plain GGUF made by llama.cpp's
converter + quantizer); slow ones the real SmolLM2-135M-Instruct (Q4_1 and a Q4_K_M mix).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from llama_cpp import Llama

from ripple_gguf import ggml_quant
from ripple_gguf.gguf_header import GGUFHeader
from ripple_gguf.gguf_io import read_ffn_layout
from ripple_gguf.index_keys import read_index

from conftest import CALIB, HELDOUT, run_cli
from test_convert import greedy_tokens

MODEL = "tiny-llama-swiglu"
# stated bound on the relative RMS error ffn_down requantization adds, per type family
MAX_DOWN_ERR = {QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 5e-3,  # floats: rounding of a quantized source only
                QT.Q8_0: 0.01, QT.Q6_K: 0.03, QT.Q5_0: 0.06,
                QT.Q5_1: 0.06, QT.Q5_K: 0.06, QT.Q4_0: 0.12, QT.Q4_1: 0.12, QT.Q4_K: 0.12, QT.IQ4_NL: 0.12,
                QT.IQ4_XS: 0.12, QT.Q3_K: 0.2, QT.Q2_K: 0.4}


def header(path) -> tuple[GGUFHeader, dict]:
    h = GGUFHeader(path)
    return h, {t.name: t for t in h.tensors}


def data(h: GGUFHeader, t) -> np.ndarray:
    return np.fromfile(h.path, np.uint8, int(t.n_bytes), offset=int(t.data_offset))


def check_converted(src, out) -> dict:
    """Everything the conversion promises about OUT vs SRC; returns per-layer down errors (of a
    --down-type conversion; without one ffn_down must be the source's bytes)."""
    hs, ts = header(src)
    ho, to = header(out)
    # KV: every non-ripple entry byte-identical, nothing else added outside ripple.*
    keys_s = [k for k in hs.fields if not k.startswith("ripple.")]
    keys_o = [k for k in ho.fields if not k.startswith("ripple.")]
    assert sorted(keys_s) == sorted(keys_o)
    for k in keys_s:
        fs, fo = hs.fields[k], ho.fields[k]
        assert hs.raw(fs.start, fs.end) == ho.raw(fo.start, fo.end), k
    assert ho.alignment == hs.alignment
    assert [t.name for t in hs.tensors] == [t.name for t in ho.tensors]  # order kept
    layout = read_ffn_layout(ho)
    index = read_index(ho, layout.n_ff)
    assert index is not None and index.down_rel_rms is not None
    errs = {}
    for name, t in ts.items():
        o = to[name]
        assert o.shape == t.shape, name
        parts = name.split(".")
        if not name.startswith("blk.") or not parts[2].startswith("ffn_"):
            assert o.tensor_type == t.tensor_type and np.array_equal(data(hs, t), data(ho, o)), name
            continue
        il, kind = int(parts[1]), parts[2]
        assert np.array_equal(np.sort(index.orders[il]), np.arange(len(index.orders[il])))
        if kind != "ffn_down" or parts[3] != "weight" or o.tensor_type == t.tensor_type:
            assert o.tensor_type == t.tensor_type and np.array_equal(data(hs, t), data(ho, o)), name
            if kind == "ffn_down" and parts[3] == "weight":
                assert index.down_rel_rms[il] == 0.0
                errs.setdefault(QT(o.tensor_type).name, []).append(0.0)
        else:
            n_embd, n_ff = int(t.shape[1]), int(t.shape[0])
            ref = ggml_quant.dequantize(data(hs, t).reshape(n_embd, -1), t.tensor_type, n_ff)
            got = ggml_quant.dequantize(data(ho, o).reshape(n_embd, -1), o.tensor_type, n_ff)
            err = ggml_quant.relative_rms(ref, got)
            assert index.down_source_type[il] == int(t.tensor_type)
            assert abs(err - index.down_rel_rms[il]) <= 1e-4 + 1e-3 * err, (name, err, index.down_rel_rms[il])
            assert err <= MAX_DOWN_ERR.get(QT(o.tensor_type), 0.5), (name, QT(o.tensor_type).name, err)
            errs.setdefault(QT(o.tensor_type).name, []).append(err)
    return errs


@pytest.mark.parametrize("ftype", ["f16", "f32"])
def test_float_gguf_converts_exactly(plain_gguf, converted_with, ftype):
    src = plain_gguf(MODEL, ftype)
    out = converted_with(src, "--no-pack")
    errs = check_converted(src, out)
    assert all(e == 0.0 for v in errs.values() for e in v)
    index = read_index(GGUFHeader(out), read_ffn_layout(GGUFHeader(out)).n_ff)
    assert any(not np.array_equal(o, np.arange(len(o))) for o in index.orders)
    assert greedy_tokens(out) == greedy_tokens(src)  # nothing requantized: same tokens


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0", "q4_1", "q5_1", "q4_k_m", "q3_k_m", "iq4_nl"])
def test_quantized_gguf_keeps_every_type(plain_gguf, converted_with, ftype):
    src = plain_gguf(MODEL, ftype)
    out = converted_with(src, "--no-pack")
    errs = check_converted(src, out)
    assert all(e == 0.0 for v in errs.values() for e in v)  # nothing requantized, whatever the type
    assert read_ffn_layout(GGUFHeader(out)).types == read_ffn_layout(GGUFHeader(src)).types
    assert abs(out.stat().st_size - src.stat().st_size) <= 0.02 * src.stat().st_size
    assert len(greedy_tokens(out, n=8)) == 8


def test_down_type_option_writes_exact_down(plain_gguf, converted_with):
    src = plain_gguf(MODEL, "q4_1")
    out = converted_with(src, "--no-pack", "--down-type", "f16")
    layout = read_ffn_layout(GGUFHeader(out))
    assert set(layout.types["down"]) == {QT.F16}
    assert set(layout.types["up"]) == set(read_ffn_layout(GGUFHeader(src)).types["up"])
    errs = check_converted(src, out)
    assert 0 < max(max(v) for v in errs.values()) < 1e-3  # f16 rounding of Q4_1 values only
    assert out.stat().st_size > src.stat().st_size


def test_gguf_source_with_outtype_requantizes(plain_gguf, converted_with):
    src = plain_gguf(MODEL, "q4_1")
    out = converted_with(src, "--no-pack", "--outtype", "q8_0")
    h = GGUFHeader(out)
    types = read_ffn_layout(h).types
    assert all(set(v) == {QT.Q8_0} for v in types.values())
    assert read_index(h, read_ffn_layout(h).n_ff) is not None
    assert len(greedy_tokens(out, n=8)) == 8


def test_gguf_source_with_pack_and_inspect(plain_gguf, converted_with):
    src = plain_gguf(MODEL, "q4_k_m")
    proc = run_cli("convert", src, "-o", src.parent / "packed.gguf", "--calib", CALIB, "--calib-tokens", 4096,
                   "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["source_kind"] == "gguf" and summary["pack"] is not None
    for stage in ("llama.cpp pass (profile + predictor data)", "placement (coactivation)", "write GGUF",
                  "predictors", "write pack"):
        assert stage in summary["stages"], summary["stages"]
    assert "llama.cpp pass (pack)" not in summary["stages"]  # one pass: the weights did not change
    out = src.parent / "packed.gguf"
    info = json.loads(run_cli("inspect", out, "--json", check=True).stdout)
    assert info["ffn_types"]["down"] == [q.name for q in read_ffn_layout(GGUFHeader(src)).types["down"]]
    assert len(info["ripple"]["down_rel_rms"]) == info["n_layer"]
    assert info["ripple"]["pack"]["status"] == "bound to this GGUF"
    text = run_cli("inspect", out, check=True).stdout
    assert "ffn_down" in text


# ------------------------------------------------------------------------------------------------
# the real model (slow)

QUALITY_MARGIN = 0.02  # held-out text vs the calibration estimate the default point was chosen on


def stock_perplexity(path, max_chunks=None) -> float:
    from ripple_gguf.perplexity import perplexity
    from ripple_gguf.cpus import idle_cores
    llm = Llama(str(path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=idle_cores(), seed=0,
                verbose=False)
    try:
        tokens = llm.tokenize(HELDOUT.read_text().encode(), add_bos=True, special=False)
        ppl, _ = perplexity(llm, tokens, 512, llm.token_bos(), max_chunks)
        return ppl
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["q4_1", "q4_k_m"])
def test_smollm2_converts_from_its_gguf(smollm2, tmp_path, variant):
    src = smollm2[variant]
    out = tmp_path / f"smollm2-{variant}.gguf"
    t0 = time.time()
    proc = run_cli("convert", src, "-o", out, "--calib", CALIB, "--json", timeout=1800, check=True)
    wall = time.time() - t0
    s = json.loads(proc.stdout)
    check_converted(src, out)
    ppl_src, ppl_out = stock_perplexity(src, 16), stock_perplexity(out, 16)
    ratio = out.stat().st_size / src.stat().st_size
    print(f"SmolLM2 {variant}: {wall:.0f} s wall; stages " + ", ".join(f"{k} {v:.1f}s" for k, v in s["stages"].items()))
    print(f"  size {src.stat().st_size / 2**20:.1f} -> {out.stat().st_size / 2**20:.1f} MiB ({100 * (ratio - 1):+.2f}%), "
          f"perplexity on {HELDOUT.name} {ppl_src:.4f} -> {ppl_out:.4f} ({100 * (ppl_out / ppl_src - 1):+.2f}%)")
    assert s["pack"] is not None and (out.with_suffix(".ripple")).is_file()
    assert abs(ratio - 1) <= 0.02
    assert math.isfinite(ppl_out)
    # the quality budget (issue 10): the default operating point, chosen on calibration text, holds on
    # held-out text within a stated margin (the calibration estimate is ~800 tokens of another text)
    ev = json.loads(run_cli("eval", out, "--text", HELDOUT, "--ctx", 512, "--chunks", 8, "--json",
                            timeout=1800, check=True).stdout)
    dense = stock_perplexity(out, 8)
    pt = ev["operating_point"]
    print(f"  default operating point: density {pt['density']:.3f} (+{100 * pt['ppl_increase']:.2f}% on calibration "
          f"text); on {HELDOUT.name} {dense:.4f} -> {ev['perplexity']:.4f} ({100 * (ev['perplexity'] / dense - 1):+.2f}%), "
          f"predicted density {ev['eval'].get('predicted_density', 1.0):.3f} ({ev['mode']} path)")
    assert pt["default"] and pt["ppl_increase"] <= s["pack"]["operating_points"][pt["index"]]["ppl_increase"] + 1e-6
    assert ev["perplexity"] <= dense * (1 + 0.02 + QUALITY_MARGIN)
    # the GGUF's tensors are the source's bytes: stock llama.cpp computes the same model (target: 1%)
    assert ppl_out <= 1.01 * ppl_src


@pytest.mark.slow
def test_smollm2_f16_converts_exactly(smollm2, tmp_path):
    from ripple_gguf.llama_quantize import quantize_gguf
    src = tmp_path / "smollm2-f16.gguf"
    quantize_gguf(smollm2["q4_1"], src, "f16", allow_requantize=True)
    out = tmp_path / "smollm2-f16-ripple.gguf"
    run_cli("convert", src, "-o", out, "--calib", CALIB, "--no-pack", timeout=1800, check=True)
    errs = check_converted(src, out)
    assert all(e == 0.0 for v in errs.values() for e in v)
    assert greedy_tokens(out, n=48) == greedy_tokens(src, n=48)


def test_running_an_unconverted_gguf_says_to_convert_it(smollm2):
    """A user's own GGUF (SmolLM2 as shipped) given to `run` before `convert`: one line saying how to
    convert it (the pack's rebuild hint alone sent them to `pack`, which then asked for `convert`), or
    --dense."""
    src = smollm2["q4_1"]
    proc = run_cli("run", src, "-p", "x", "-n", "2")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "is not a ripple-gguf conversion" in proc.stderr and f"ripple-gguf convert {src}" in proc.stderr
    assert "--dense" in proc.stderr
    assert run_cli("run", src, "-p", "x", "-n", "2", "--dense").returncode == 0


def test_an_empty_prompt_is_a_clear_error(smollm2):
    """SmolLM2 adds no start token, so `-p ""` leaves llama.cpp nothing to continue: one `error:` line,
    not llama-cpp-python's AssertionError traceback (found by a walkthrough)."""
    proc = run_cli("run", smollm2["q4_1"], "-p", "", "-n", "2", "--dense")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: the prompt is empty and this model adds no start token; pass some text with -p"], proc.stderr
