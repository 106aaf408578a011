"""Sparse flash-offload runtime (patched libllama + RippleLlama + run/chat/eval/serve).

What is checked: with the predictor off and every neuron active the sparse FFN computes what the
dense one does; with the predictor on perplexity stays within 5% of dense; memory stays under the
budget; the read counters are what the file offsets imply; and every bad pack or failing read is an
error, never a crash or silently wrong text.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ripple_gguf.errors import RippleError
from ripple_gguf.pack import PACK_MIN_CHUNK, open_pack, pack_path_for
from ripple_gguf.runtime import TIGHT_UBATCH, RippleLlama, parse_size, ripple_lib

from conftest import CALIB, FIXTURES, HELDOUT, MODELS, ROOT, all_logits, prompts, run_cli

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
# Sparse (all neurons active) vs dense logits, as max |diff| / max |logit|. F32 is the same arithmetic
# summed in another order; F16 also differs by dense's f16 rounding of the FFN intermediate.
# Measured on the fixtures: F32 <= 1.5e-4, F16 <= 6e-4.
REL_TOL = {"f32": 1e-3, "f16": 3e-3}
# Q8_0/Q4_0 cannot be token-identical: the pack's down rows are re-quantized along n_embd
# (docs/FORMAT.md) and dense quantizes the intermediate to Q8_0 along n_ff, two different roundings.
# The check is that sparse is as close to the model's F32 conversion as dense is. Measured (RMS
# logit error / logit std vs F32, dense -> sparse): llama Q8_0 7.1e-3 -> 6.4e-3, Q4_0 5.0e-2 ->
# 5.5e-2; arcee Q8_0 1.9e-3 -> 1.9e-3, Q4_0 8.7e-3 -> 8.9e-3.
QUANT_RMS_RATIO = 1.25
PPL_TOL = 0.05
# what a process holds besides non-FFN weights and the cache: llama.cpp's KV cache and compute buffers,
# the runtime's predictor weights and tables (reported as overhead_bytes), malloc arenas
STATED_OVERHEAD = 24 * 2**20
KW = dict(n_ctx=256, n_threads=2, seed=0, verbose=False)
# the sparse runtime itself: a given cache size keeps the pack even at an operating point dense enough
# that default settings run llama.cpp's stock path (RippleLlama._stock_is_the_same), and stream_dense=False
# its bundles and predictor where such a point would stream the GGUF's own FFN, stream_prefill=0 for
# prompt batches too (test_stream.py)
PACK = dict(cache_ratio=1.0, stream_dense=False, stream_prefill=0)
PACK_AT_CACHE = dict(stream_dense=False, stream_prefill=0)  # the same with a cache size of the test's own


# --- sparse == dense --------------------------------------------------------------------------------

def greedy(llm, toks, n=24) -> list[int]:
    return [int(t) for _, t in zip(range(n), llm.generate(toks, temp=0.0, top_k=1))]


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_all_neurons_active_equals_dense(packed, model, outtype):
    path = packed(model, outtype)
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense)
    ld, gd = all_logits(dense, ps), [greedy(dense, p[:32]) for p in ps]
    dense.close()
    sparse = RippleLlama(path, all_active=True, logits_all=True, **KW)
    ls, gs = all_logits(sparse, ps), [greedy(sparse, p[:32]) for p in ps]
    st = sparse.ripple_stats()
    sparse.close()
    rel = float(np.abs(ls - ld).max() / np.abs(ld).max())
    print(f"{model} {outtype}: max |logit diff| / max |logit| = {rel:.2e}")
    assert st["mode"] == "sparse" and st["all_active"] and st["predicted_density"] == 1.0
    assert st["tokens"] > 0 and not st["error"]
    assert rel <= REL_TOL[outtype]
    assert gs == gd
    assert (ls.argmax(1) == ld.argmax(1)).all()


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_all_neurons_active_quantized_is_as_exact_as_dense(packed, model, outtype):
    ref = RippleLlama(packed(model, "f32"), dense=True, logits_all=True, **KW)
    ps = prompts(ref)
    lr = all_logits(ref, ps)
    ref.close()
    path = packed(model, outtype)
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ld = all_logits(dense, ps)
    dense.close()
    sparse = RippleLlama(path, all_active=True, logits_all=True, **KW)
    ls = all_logits(sparse, ps)
    st = sparse.ripple_stats()
    sparse.close()

    def err(x):
        return float(np.sqrt(((x - lr) ** 2).mean()) / lr.std())
    agree = float((ls.argmax(1) == ld.argmax(1)).mean())
    print(f"{model} {outtype}: RMS logit error vs F32 dense {err(ld):.2e}, sparse {err(ls):.2e}; "
          f"sparse/dense argmax agreement {agree:.3f}")
    assert st["all_active"] and st["predicted_density"] == 1.0 and not st["error"]
    assert err(ld) < 0.3, "the F32 and quantized conversions are not the same model (fixture retrained?)"
    assert err(ls) <= QUANT_RMS_RATIO * err(ld) + 1e-4
    assert agree >= 0.85


def chunked_logits(llm, prompt_list, chunk: int) -> np.ndarray:
    """all_logits, but every prompt fed `chunk` tokens per decode (up to 8: the runtime's fused path)."""
    out = []
    for toks in prompt_list:
        llm.reset()
        for i in range(0, len(toks), chunk):
            llm.eval(toks[i:i + chunk])
        out.append(np.array(llm.scores[:len(toks)], dtype=np.float64))
    return np.concatenate(out)


@pytest.mark.parametrize("model", FIXTURES)
def test_batched_and_token_by_token_agree_at_several_thread_counts(packed, model):
    # decode (up to 8 tokens per batch) computes act and down in one pass per neuron with per-thread partial
    # sums; prompts take the act-then-down path with the output columns split across threads.
    # Both, at any thread count, must give the same model (predictor on: the selection itself may
    # differ at the threshold by the predictor's own rounding, so logits agree to a tolerance).
    path = packed(model, "f32")
    res = {}
    for threads in (1, 3):
        llm = RippleLlama(path, logits_all=True, **PACK, **{**KW, "n_threads": threads, "n_threads_batch": threads})
        ps = prompts(llm, n=2, length=40)
        res[threads] = (all_logits(llm, ps), chunked_logits(llm, ps, 1), chunked_logits(llm, ps, 5))
        st = llm.ripple_stats()
        llm.close()
        assert st["mode"] == "sparse" and st["predicted_density"] < 1.0 and not st["error"]
    ref = res[1][0]
    scale = np.abs(ref).max()
    for threads, (batched, single, fives) in res.items():
        for name, got in (("batched", batched), ("token by token", single), ("5 tokens per decode", fives)):
            rel = float(np.abs(got - ref).max() / scale)
            agree = float((got.argmax(1) == ref.argmax(1)).mean())
            print(f"{model} {threads} threads {name}: max rel diff {rel:.2e}, argmax agreement {agree:.3f}")
            assert rel <= 1e-3 and agree >= 0.99, (threads, name, rel, agree)  # measured <= 1e-4, 1.0


def test_read_ahead_computes_the_same_and_its_reads_are_used(packed):
    """While a layer computes, a background thread reads what the next layer needed for the previous
    token and the cache lacks; the next layer must find those neurons and compute exactly what it
    computes without read-ahead (same neurons, same bytes, same arithmetic)."""
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    res = {}
    for ahead in (False, True):
        llm = RippleLlama(path, cache_size=2 * max(pk.n_ff) * pk.bundle_bytes, pin_percent=0, warm_cache=False,
                          read_ahead=ahead, logits_all=True, **KW)
        ps = prompts(llm, n=2, length=40)
        res[ahead] = (chunked_logits(llm, ps, 1), chunked_logits(llm, ps, 5), llm.ripple_stats())
        llm.close()
    (off_1, off_5, off), (on_1, on_5, on) = res[False], res[True]
    print(f"read ahead: {on['ahead_neurons']} neurons, {on['ahead_used']} used; hidden {on['hidden_io_seconds']:.4f} s")
    assert off["ahead_neurons"] == 0 and 0 < on["ahead_used"] <= on["ahead_neurons"]
    assert not on["error"] and on["predicted_density"] < 1.0
    assert on["useful_bytes"] == on["cache_misses"] * pk.bundle_bytes  # read-ahead neurons count as misses
    np.testing.assert_array_equal(on_1, off_1)
    np.testing.assert_array_equal(on_5, off_5)


def test_direct_io_and_a_one_layer_cache_compute_the_same(packed):
    path = packed("tiny-arcee-relu2", "f16")
    pk = open_pack(path)
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense, n=2)
    ld = all_logits(dense, ps)
    dense.close()
    sparse = RippleLlama(path, all_active=True, direct_io=True, pin_percent=0, logits_all=True,
                         cache_size=max(pk.n_ff) * pk.bundle_bytes, **KW)
    ls = all_logits(sparse, ps)
    st = sparse.ripple_stats()
    sparse.close()
    if not st["direct_io"]:
        pytest.skip("the filesystem holding the test files refuses O_DIRECT")
    assert st["bytes_read"] >= 2 * pk.n_layer * max(pk.n_ff) * pk.bundle_bytes  # every layer re-read
    assert float(np.abs(ls - ld).max() / np.abs(ld).max()) <= REL_TOL["f16"]


def test_without_registration_the_same_file_loads_stock(packed):
    path = packed("tiny-llama-swiglu", "f32")
    sparse = RippleLlama(path, **PACK, **KW)
    plain = RippleLlama(path, dense=True, **KW)  # same file, no registration: stock path
    lib = ripple_lib()
    assert lib.llama_ripple_is_attached(sparse.model) and not lib.llama_ripple_is_attached(plain.model)
    assert plain.ripple_stats()["mode"] == "dense"
    sparse.close()
    plain.close()


# --- predictor on ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model", FIXTURES)
def test_eval_perplexity_within_5_percent_of_dense(packed, model):
    path = packed(model, "f16")
    res = {}
    # --keep-pack: the default point on the pack, though every neuron would run there by default
    for mode, flag in (("dense", "--dense"), ("sparse", "--keep-pack")):
        res[mode] = json.loads(run_cli("eval", path, "--text", HELDOUT, "--json", flag, check=True, timeout=1200).stdout)
    d, s = res["dense"]["perplexity"], res["sparse"]["perplexity"]
    e = res["sparse"]["eval"]
    print(f"{model} f16 on {HELDOUT.name} ({res['sparse']['scored_tokens']} tokens): perplexity dense {d:.3f}, "
          f"sparse {s:.3f} ({100 * (s / d - 1):+.2f}%), predicted density {e['predicted_density']:.3f}, "
          f"cache hit rate {e['cache_hit_rate']:.3f}")
    assert res["sparse"]["mode"] == "sparse" and res["dense"]["mode"] == "dense"
    assert e["predicted_density"] < 0.9  # the predictor really skipped neurons
    assert abs(s / d - 1) <= PPL_TOL


def test_eval_cli_reports_perplexity_and_stats(packed):
    path = packed("tiny-arcee-relu2", "f32")
    proc = run_cli("eval", path, "--text", HELDOUT, "--chunks", 2, "--ctx", 128, "--json", check=True)
    r = json.loads(proc.stdout)
    assert r["mode"] == "sparse" and r["scored_tokens"] == 2 * 63 and 1 < r["perplexity"] < 1024
    assert 0 < r["eval"]["predicted_density"] < 1 and r["eval"]["tokens"] == 256


# --- memory ----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def big_model(tmp_path_factory):
    """A random LLaMA large enough that its FFN (96 MiB f16) dwarfs everything else (14 MiB)."""
    out = tmp_path_factory.mktemp("big")
    script = f"""
import shutil, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=4096, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(cfg).save_pretrained({str(out / 'hf')!r}, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(Path({str(MODELS / 'tiny-llama-swiglu')!r}) / f, Path({str(out / 'hf')!r}) / f)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=600)
    gguf_path = out / "big.gguf"
    run_cli("convert", out / "hf", "-o", gguf_path, "--outtype", "f16", "--calib", CALIB,
            "--calib-tokens", 4096, check=True, timeout=1800)
    return gguf_path


def resident_bytes(path: Path) -> int:
    """Bytes of the file in the page cache (mincore over a map that touches nothing)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, os.sysconf("SC_PAGE_SIZE")
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        vec = ctypes.create_string_buffer((size + page - 1) // page)
        assert libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw) * page


def storage_read_bytes() -> int:
    """Bytes this process has had read from storage (page-cache misses, readahead included)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["resident", "mapped"])
def test_opening_and_running_never_reads_the_gguf_ffn(big_model, weights):
    """Verifying the pack and loading used to pull both whole files into the page cache (a memmap
    of each, and 8 MiB readahead windows): fatal for a model larger than RAM. Mapped non-FFN weights
    keep read-around only where its window cannot reach an FFN tensor."""
    from ripple_gguf.cgroup import drop_file_cache
    from ripple_gguf.memory_budget import gguf_ffn_split
    from ripple_gguf.runtime import verified_pack
    pack_file = pack_path_for(big_model)
    ffn, other = gguf_ffn_split(str(big_model))
    for f in (big_model, pack_file):
        drop_file_cache(f)
    pk = verified_pack(str(big_model))
    opened = resident_bytes(big_model), resident_bytes(pack_file)
    cache = 16 * 2**20
    before = storage_read_bytes()
    llm = RippleLlama(str(big_model), pack=pk, cache_size=cache, n_ctx=256, verbose=False, direct_io=True,
                      resident_weights=weights == "resident")
    loaded = storage_read_bytes() - before
    assert llm.ripple_non_ffn.startswith(weights)
    llm.create_completion("import os\n", max_tokens=8, temperature=0.0)
    ran = resident_bytes(big_model)
    llm.close()
    mib = 2**20
    print(f"resident after open_pack: GGUF {opened[0] / mib:.1f} MiB, pack {opened[1] / mib:.1f} MiB; load read "
          f"{loaded / mib:.1f} MiB; after generating: GGUF {ran / mib:.1f} MiB (non-FFN {other / mib:.1f} MiB, "
          f"FFN {ffn / mib:.1f} MiB)")
    assert opened[0] < 0.1 * ffn and opened[1] < 0.1 * pack_file.stat().st_size
    # the non-FFN weights and the cache's warm fill, not the FFN (readahead once ran on into it: the whole file)
    assert loaded < other + cache + 0.1 * ffn
    assert ran < other + 0.1 * ffn  # the non-FFN weights, not the FFN (read-around once pulled in ~30%)


def run_json(model, budget_args, n=16) -> dict:
    proc = run_cli("run", model, "-p", "import os\n", "-n", n, "--ctx", 256, "--json", *budget_args,
                   check=True, timeout=900)
    return json.loads(proc.stdout)


def rss_growth_and_bound(run: dict, budget: int) -> tuple[int, int]:
    """How much a `run --json`'s peak RSS grew over the load, and what it may grow by: the non-FFN
    weights, the cache budget, the runtime's reported overhead and the stated rest."""
    m = run["memory"]
    return (m["peak_rss_bytes"] - m["rss_before_load_bytes"],
            m["gguf_non_ffn_bytes"] + budget + m["runtime_overhead_bytes"] + STATED_OVERHEAD)


@pytest.mark.slow
def test_a_streamed_ffn_below_two_layers_runs_in_chunks_within_its_budget(big_model):
    """At a dense point the FFN streams from the GGUF; a cache smaller than two of its 12 MiB layers was
    refused, now each layer is read and computed in row chunks through the staging buffers: the same
    greedy tokens as the stock path, peak RSS within the non-FFN weights, the cache and the stated
    overhead, nothing of the FFN resident."""
    budget = 8 * 2**20
    c = run_json(big_model, ["--quality", "0%", "--cache-size", str(budget), "--direct-io"])
    d = run_json(big_model, ["--dense"])
    m, st = c["memory"], c["ripple"]
    grew, bound = rss_growth_and_bound(c, budget)
    print(f"chunked: {st['ffn_chunks']} chunks, cache {st['cache_bytes'] / 2**20:.1f} MiB, peak RSS grew "
          f"{grew / 2**20:.1f} MiB (bound {bound / 2**20:.1f}), {c['generation']['tokens_per_s']} tokens/s")
    assert st["stream_dense"] and st["ffn_chunks"] > 0 and st["resident_layers"] == 0 and not st["error"]
    assert st["cache_bytes"] <= budget and grew <= bound and grew < m["gguf_ffn_bytes"]
    assert c["tokens"] == d["tokens"]


@pytest.mark.slow
def test_a_pack_cache_below_one_layer_runs_in_chunks_within_its_budget(big_model):
    """The pack's bundles needed a cache of one whole layer (12 MiB here; a 7B's ~130 MiB at Q4_K_M); a
    4 MiB cache now plans, reads and computes each layer in chunks: the same greedy tokens as a one-layer
    cache, peak RSS within the non-FFN weights, the cache and the stated overhead."""
    budget = 4 * 2**20
    c, w = (run_json(big_model, ["--all-active", "--cache-size", str(cache), "--direct-io"]) for cache in (budget, 13 * 2**20))
    m, st = c["memory"], c["ripple"]
    grew, bound = rss_growth_and_bound(c, budget)
    print(f"chunked: {st['neuron_chunks']} plans, cache {st['cache_bytes'] / 2**20:.1f} MiB, peak RSS grew "
          f"{grew / 2**20:.1f} MiB (bound {bound / 2**20:.1f}), {c['generation']['tokens_per_s']} tokens/s "
          f"(one layer: {w['generation']['tokens_per_s']})")
    assert not st["stream_dense"] and st["neuron_chunks"] > 0 and w["ripple"]["neuron_chunks"] == 0
    assert not st["error"] and st["cache_bytes"] <= budget and grew <= bound and grew < m["gguf_ffn_bytes"]
    assert c["tokens"] == w["tokens"]


@pytest.mark.slow
def test_peak_rss_stays_under_non_ffn_weights_plus_budget(big_model):
    budget = 16 * 2**20  # the FFN is 96 MiB; one layer's working set is 12 MiB
    s, d = run_json(big_model, ["--cache-size", str(budget)], n=24), run_json(big_model, ["--dense"], n=24)
    m = s["memory"]
    grew, bound = rss_growth_and_bound(s, budget)
    dense_grew = d["memory"]["peak_rss_bytes"] - d["memory"]["rss_before_load_bytes"]
    mib = 2**20
    print(f"FFN {m['gguf_ffn_bytes'] / mib:.1f} MiB, non-FFN {m['gguf_non_ffn_bytes'] / mib:.1f} MiB, budget "
          f"{budget / mib:.0f} MiB, runtime overhead {m['runtime_overhead_bytes'] / mib:.1f} MiB: peak RSS grew "
          f"{grew / mib:.1f} MiB (bound {bound / mib:.1f} MiB) vs dense {dense_grew / mib:.1f} MiB; "
          f"{s['generation']['tokens_per_s']} tokens/s sparse, {d['generation']['tokens_per_s']} dense")
    assert len(s["tokens"]) == 24 and s["ripple"]["tokens"] >= 24 and not s["ripple"]["error"]
    assert s["ripple"]["cache_bytes"] <= budget
    assert grew <= bound
    assert grew < m["gguf_ffn_bytes"]  # the FFN was never resident
    assert dense_grew > m["gguf_ffn_bytes"]  # ... while the stock path maps all of it


def test_budget_below_one_chunk_is_refused_with_the_minimum(packed):
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    minimum = PACK_MIN_CHUNK * pk.bundle_bytes
    assert pk.min_cache_bytes == minimum < pk.layer_cache_bytes
    with pytest.raises(RippleError, match=f"minimum.*{minimum} bytes"):
        RippleLlama(path, cache_size=minimum - 1, **PACK_AT_CACHE, **KW)
    proc = run_cli("run", path, "-p", "x", "--cache-size", "1KiB")
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and str(minimum) in proc.stderr
    llm = RippleLlama(path, cache_size=minimum, **PACK_AT_CACHE, **KW)  # exactly one chunk works
    llm.create_completion("def ", max_tokens=8, temperature=0.0)
    st = llm.ripple_stats()
    llm.close()
    # the library's minimum is the one Python mirrors (RIPPLE_PACK_MIN_CHUNK)
    assert st["cache_slots"] == PACK_MIN_CHUNK and st["min_budget"] == minimum and not st["error"]


@pytest.mark.parametrize("model", FIXTURES)
def test_a_cache_below_one_layer_plans_each_layer_in_chunks(packed, model):
    """A batch's union of active neurons larger than the cache used to be refused (one layer minimum): each
    layer is now planned, read and computed in equal shares of at least PACK_MIN_CHUNK neurons, one after
    another. The same neurons are selected and the logits are the one-layer cache's up to summation order,
    predictor on and off, prompt batches and decodes, at 1 and 3 threads (measured: <= 1.3e-4 relative)."""
    path = packed(model, "f32")
    pk = open_pack(path)
    slots = PACK_MIN_CHUNK + 44  # below one layer (512 / 1024 neurons): shares of 256
    shares = -(-max(pk.n_ff) // PACK_MIN_CHUNK)
    for extra in ({}, {"all_active": True}):
        res = {}
        for threads, cache in ((2, pk.layer_cache_bytes), (1, slots * pk.bundle_bytes), (3, slots * pk.bundle_bytes)):
            llm = RippleLlama(path, cache_size=cache, pin_percent=0, logits_all=True, **PACK_AT_CACHE, **extra,
                              **{**KW, "n_threads": threads, "n_threads_batch": threads})
            ps = prompts(llm, n=2, length=40)
            res[threads] = (all_logits(llm, ps), chunked_logits(llm, ps, 1), chunked_logits(llm, ps, 5)), llm.ripple_stats()
            llm.close()
        (ref, ref_st) = res[2]
        assert ref_st["neuron_chunks"] == 0 and not ref_st["error"]
        for threads in (1, 3):
            got, st = res[threads]
            assert st["neuron_chunks"] == shares * pk.n_layer and st["cache_slots"] == slots and not st["error"]
            # the same selection, but for scores at the threshold moved by the summation order's rounding
            assert st["predicted_density"] == pytest.approx(ref_st["predicted_density"], rel=1e-4)
            assert st["predicted_density"] == 1.0 if extra else st["predicted_density"] < 1.0
            for name, a, b in zip(("batched", "token by token", "5 per decode"), got, ref):
                rel = float(np.abs(a - b).max() / np.abs(b).max())
                print(f"{model} {extra} {threads} threads {name}: max rel diff {rel:.1e}")
                assert rel <= 1e-3 and (a.argmax(1) == b.argmax(1)).mean() >= 0.99


def test_parse_size():
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("300k") == 300 * 1024 and parse_size("2MB") == 2_000_000 and parse_size(4096) == 4096
    with pytest.raises(RippleError):
        parse_size("lots")


# --- honest counters -------------------------------------------------------------------------------

def read_rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_bytes_read_are_what_the_file_offsets_imply(packed):
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    budget = 2 * max(pk.n_ff) * pk.bundle_bytes  # half the FFN: misses keep happening
    llm = RippleLlama(path, cache_size=budget, pin_percent=0, stream_prefill=0, **KW)  # the pack's reads only
    llm.ripple_trace(True)
    llm.ripple_reset_stats()
    rchar0 = read_rchar()
    llm.create_completion(HELDOUT.read_text()[:300], max_tokens=24, temperature=0.0)
    rchar = read_rchar() - rchar0
    trace, st = llm.ripple_trace(), llm.ripple_stats()
    llm.close()
    tables = [(off, off + n * pk.bundle_bytes) for off, n in zip(pk.bundle_offsets, pk.n_ff)]
    assert st["reads"] == len(trace) > 0
    assert st["bytes_read"] == sum(n for _, n in trace)
    for off, n in trace:  # every read lies in one layer's table and covers whole bundles
        lo, hi = next((lo, hi) for lo, hi in tables if lo <= off < hi)
        assert off + n <= hi and (off - lo) % pk.bundle_bytes == 0 and n % pk.bundle_bytes == 0
    assert st["bytes_read"] >= st["useful_bytes"] == st["cache_misses"] * pk.bundle_bytes
    assert st["bytes_read"] <= rchar  # the kernel counted at least these bytes
    print(f"{st['reads']} reads, {st['bytes_read']} bytes ({st['useful_bytes']} needed), rchar {rchar}")


def test_cold_all_active_first_token_reads_the_ffn_exactly_once(packed):
    path = packed("tiny-arcee-relu2", "f16")
    pk = open_pack(path)
    ffn = sum(pk.n_ff) * pk.bundle_bytes
    llm = RippleLlama(path, all_active=True, pin_percent=0, warm_cache=False, **KW)  # budget: the whole FFN
    llm.ripple_reset_stats()
    llm.eval(llm.tokenize(b"def f(x):"))
    first = llm.ripple_stats()
    llm.eval(llm.tokenize(b" return x", add_bos=False))
    second = llm.ripple_stats()
    llm.close()
    assert first["bytes_read"] == ffn and first["cache_misses"] == sum(pk.n_ff)
    assert first["reads"] <= 2 * pk.n_layer  # one merged read per layer (split only at 4 MiB)
    assert second["bytes_read"] == ffn and second["cache_hits"] > 0  # everything cached afterwards


def test_every_neuron_with_a_partial_cache_reads_only_what_it_misses(packed):
    """Every token needs every neuron at a dense point: the cache keeps the same leading share of each
    layer, so each layer misses one contiguous tail. Pinning the hottest (scattered) neurons left gaps
    that merged reads fetched a second time (SmolLM2 at 75% of its size: ~20% more bytes than missed)."""
    path = packed("tiny-arcee-relu2", "f16")
    pk = open_pack(path)
    llm = RippleLlama(path, all_active=True, cache_ratio=0.5, **KW)
    llm.eval(llm.tokenize(b"def f(x):"))
    llm.ripple_reset_stats()
    for tok in llm.tokenize(b" return x + 1", add_bos=False):
        llm.eval([tok])
    st = llm.ripple_stats()
    llm.close()
    assert st["cache_hits"] > 0 and st["cache_misses"] > 0
    assert st["bytes_read"] <= 1.02 * st["useful_bytes"]  # no cached neuron read again
    assert st["reads_per_token"] <= 2 * pk.n_layer  # one tail per layer (split only at 4 MiB)


def test_a_cache_that_holds_the_whole_ffn_is_filled_at_load(packed):
    """With a slot for every neuron nothing is ever evicted: the load fills it whole, so decoding
    never waits on a read (it used to keep one layer of slots free and miss ~2% of neurons)."""
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    llm = RippleLlama(path, cache_size=pk.every_slot_bytes, stream_dense=False, **KW)
    llm.ripple_reset_stats()
    for tok in llm.tokenize(b"def f(x):\n    return x + 1"):
        llm.eval([tok])
    st = llm.ripple_stats()
    llm.close()
    assert st["mode"] == "sparse" and st["predicted_density"] < 1.0
    assert st["cache_hits"] > 0 and st["cache_misses"] == 0 and st["bytes_read"] == 0


# --- bad input -------------------------------------------------------------------------------------

def copy_model(src: Path, dst_dir: Path, with_pack: bool = True) -> Path:
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    if with_pack:
        shutil.copy(pack_path_for(src), pack_path_for(dst))
    return dst


def test_missing_pack_is_a_clear_error_or_a_loud_fallback(packed, tmp_path):
    path = copy_model(packed("tiny-llama-swiglu", "f32"), tmp_path, with_pack=False)
    with pytest.raises(RippleError, match="no offload pack.*ripple-gguf pack"):
        RippleLlama(path, **KW)
    with pytest.warns(RuntimeWarning, match="dense"):
        llm = RippleLlama(path, dense_fallback=True, **KW)
    assert llm.ripple_stats()["mode"] == "dense"
    llm.close()
    proc = run_cli("run", path, "-p", "def ", "-n", 4)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: no offload pack")
    proc = run_cli("run", path, "-p", "def ", "-n", 4, "--allow-dense-fallback", "--json")
    assert proc.returncode == 0 and "warning:" in proc.stderr and json.loads(proc.stdout)["mode"] == "dense"


def test_mismatched_pack_is_refused(packed, tmp_path):
    path = copy_model(packed("tiny-llama-swiglu", "f32"), tmp_path, with_pack=False)
    shutil.copy(pack_path_for(packed("tiny-llama-swiglu", "f16")), pack_path_for(path))
    with pytest.raises(RippleError, match="different GGUF|does not describe|rebuild"):
        RippleLlama(path, **KW)


def test_truncated_pack_is_refused(packed, tmp_path):
    path = copy_model(packed("tiny-llama-swiglu", "f32"), tmp_path)
    pack = pack_path_for(path)
    os.truncate(pack, pack.stat().st_size // 2)
    with pytest.raises(RippleError, match="truncated"):
        RippleLlama(path, **KW)


def load_unverified(path: Path, pack: Path, **params):
    """Register a pack straight with the library (skipping the Python verification) to check that
    the C++ side validates structure itself. Returns (llm or None, error)."""
    import llama_cpp
    lib = ripple_lib()
    p = lib.llama_ripple_default_params()
    for k, v in params.items():
        setattr(p, k, v)
    assert lib.llama_ripple_register(str(path).encode(), str(pack).encode(), ctypes.byref(p)) == 0
    try:
        return llama_cpp.Llama(str(path), **KW), ""
    except ValueError:
        return None, lib.llama_ripple_last_error(None).decode()
    finally:
        lib.llama_ripple_unregister(str(path).encode())


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "garbage", "other-model"])
def test_library_validates_pack_structure(packed, tmp_path, damage):
    path = copy_model(packed("tiny-llama-swiglu", "f32"), tmp_path)
    pack = pack_path_for(path)
    size = pack.stat().st_size
    if damage == "truncate-data":
        os.truncate(pack, size - 4096)
    elif damage == "truncate-header":
        os.truncate(pack, 200)
    elif damage == "garbage":
        data = bytearray(pack.read_bytes())
        rng = np.random.default_rng(1)
        for i in rng.integers(8, 4096, 200):  # scribble over the KV section
            data[i] = rng.integers(0, 256)
        pack.write_bytes(bytes(data))
    else:
        shutil.copy(pack_path_for(packed("tiny-arcee-relu2", "f32")), pack)
    llm, err = load_unverified(path, pack)
    if llm is not None:  # scribbles can land on informational keys; then it must still run correctly
        assert damage == "garbage"
        llm.close()
        return
    assert err, "the library refused the pack without saying why"
    if damage.startswith("truncate"):
        assert "truncated" in err or "not a readable pack" in err


def test_pack_truncated_mid_run_stops_generation_with_an_error(packed, tmp_path):
    path = copy_model(packed("tiny-llama-swiglu", "f32"), tmp_path)
    pk = open_pack(path)
    llm = RippleLlama(path, cache_size=max(pk.n_ff) * pk.bundle_bytes, pin_percent=0, **KW)
    out = llm.create_completion("def ", max_tokens=4, temperature=0.0)  # works while the pack is whole
    assert out["choices"][0]["text"] is not None
    os.truncate(pk.path, pk.bundle_offsets[1])  # layers 1.. gone from under the running model
    with pytest.raises(RippleError, match="truncated"):
        llm.create_completion(HELDOUT.read_text()[:400], max_tokens=16, temperature=0.0)
    with pytest.raises(RippleError):  # sticky: no later call produces text from zeroed FFNs
        llm.create_completion("x", max_tokens=2, temperature=0.0)
    assert llm.ripple_stats()["error"]
    llm.close()
    # the CLI reports it as one line
    proc = run_cli("run", path, "-p", HELDOUT.read_text()[:400], "-n", 8, "--cache-size",
                   str(max(pk.n_ff) * pk.bundle_bytes), "--pin-percent", "0")
    assert proc.returncode == 1 and "error: " in proc.stderr


def test_detached_pack_fails_later_decodes(packed):
    llm = RippleLlama(packed("tiny-llama-swiglu", "f32"), **PACK, **KW)
    llm.create_completion("def ", max_tokens=4, temperature=0.0)
    assert ripple_lib().llama_ripple_detach(llm.model) == 0
    with pytest.raises(RippleError, match="detached"):
        llm.create_completion("def f", max_tokens=4, temperature=0.0)
    llm.close()


# --- glue and CLI ----------------------------------------------------------------------------------

def test_chat_completion_through_the_sparse_runtime(packed):
    llm = RippleLlama(packed("tiny-llama-swiglu", "f16"), cache_ratio=0.5, **KW)
    out = llm.create_chat_completion([{"role": "user", "content": "def add(a, b):"}], max_tokens=16,
                                     temperature=0.0)
    assert out["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=8, stream=True))
    assert chunks and llm.ripple_stats()["tokens"] > 0
    llm.close()


def test_run_cli_json(packed):
    path = packed("tiny-arcee-relu2", "q8_0")
    proc = run_cli("run", path, "-p", "import os\n", "-n", 12, "--cache-ratio", "0.5", "--json", check=True)
    r = json.loads(proc.stdout)
    assert r["mode"] == "sparse" and isinstance(r["text"], str) and len(r["tokens"]) <= 12
    g = r["generation"]
    for key in ("tokens_per_s", "reads_per_token", "bytes_per_token", "cache_hit_rate", "predicted_density"):
        assert key in g
    assert r["memory"]["peak_rss_bytes"] > 0 and r["ripple"]["cache_bytes"] <= r["ripple"]["ffn_bytes"] // 2 + 4096
    dense = json.loads(run_cli("run", path, "-p", "import os\n", "-n", 12, "--dense", "--json", check=True).stdout)
    assert dense["mode"] == "dense"


def test_cli_basics_a_new_user_hits(packed):
    """No command prints the help (was an argparse error), --version answers, a --memory-budget larger
    than the machine is a warning, and a thread or chunk count below 1 is one `error:` line (--threads 0
    ran, --chunks 0 scored everything)."""
    path = packed("tiny-llama-swiglu", "f32")
    proc = run_cli()
    assert proc.returncode == 0 and "usage: ripple-gguf" in proc.stdout and "convert" in proc.stdout
    assert run_cli("--version", check=True).stdout.startswith("ripple-gguf ")
    proc = run_cli("run", path, "-p", "x", "-n", "2", "--memory-budget", "1000TiB")  # runs, but says so
    assert proc.returncode == 0 and "warning: --memory-budget 1000TiB is more than the" in proc.stderr, proc.stderr
    for args in (("run", path, "-p", "x", "--threads", "0"), ("eval", path, "--text", HELDOUT, "--chunks", "0")):
        proc = run_cli(*args)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "pass 1 or more" in proc.stderr, args
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_chat_cli_streams_replies(packed):
    path = packed("tiny-llama-swiglu", "f32")
    proc = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", "chat", str(path), "-n", "8", "--cache-ratio", "1"],
                          input="def add(a, b):\n/stats\n/exit\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"tokens"' in proc.stderr  # /stats
    # --json: stdout is one JSON object (the replies streamed to stderr instead: they were mixed in)
    proc = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", "chat", str(path), "-n", "8", "--cache-ratio", "1",
                           "--json"], input="def add(a, b):\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"]
    assert r["messages"][1]["content"].strip() in proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_is_openai_compatible_on_loopback(packed):
    pytest.importorskip("fastapi")
    path = packed("tiny-llama-swiglu", "f32")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ripple_gguf.cli", "serve", str(path), "--port", str(port), "--cache-ratio", "1",
                             "--ctx", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"server exited: {proc.stderr.read()[-2000:]}")
                time.sleep(0.2)
        body = json.dumps({"messages": [{"role": "user", "content": "def "}], "max_tokens": 8,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(req, timeout=60))
        assert reply["choices"][0]["message"]["role"] == "assistant"
        stats = json.load(urllib.request.urlopen(url + "/ripple/stats", timeout=10))
        assert stats["mode"] == "sparse" and stats["tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_default_settings_run_in_a_cgroup_smaller_than_the_model(big_model):
    """`ripple-gguf run model.gguf` with no budget flags on a machine with less memory than the model:
    the default cache comes from the cgroup's limit (not the whole FFN), and the run completes on the
    runtime (its default point is dense: the streamed FFN): resident non-FFN weights plus the allowances
    do not fit what the cgroup leaves (~90 MiB after the Python process), the runtime with them mapped
    and a smaller cache does."""
    from ripple_gguf.cgroup import MemoryCgroup
    from ripple_gguf.memory_budget import gguf_ffn_split
    ffn, other = gguf_ffn_split(str(big_model))
    limit = 120 * 2**20  # the GGUF is 110 MiB; the Python process takes ~30 MiB before loading
    cg = MemoryCgroup.create(limit)
    if cg is None:
        pytest.skip(MemoryCgroup.why_unavailable())
    with cg:
        proc = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", "run", str(big_model), "-p", "import os",
                               "-n", "16", "--verbose", "--json"], preexec_fn=cg.preexec(), capture_output=True,
                              text=True, timeout=600)
        oom, peak = cg.oom_killed(), cg.peak_bytes()
    line = next((l for l in proc.stderr.splitlines() if l.startswith("memory budget")), "")
    print(line, f"; peak {(peak or 0) / 2**20:.1f} MiB of {limit / 2**20:.0f}")
    assert proc.returncode == 0 and not oom, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    split = res["memory"]["budget_split"]
    assert "memory cgroup" in split["available_from"] and split["available"] <= limit
    assert split["cache"] < ffn and len(res["tokens"]) == 16
    assert res["mode"] == "sparse" and split["below_minimum"] and split["mapped_fits"], split


@pytest.mark.slow
def test_the_pack_runs_in_chunks_in_a_cgroup_too_small_for_one_layer(big_model):
    """Every neuron on the pack's bundles (`--all-active`), default settings, in a 72 MiB cgroup: what is
    left after the Python process and the runtime's fixed memory is far below one 12 MiB layer of
    bundles (the former minimum: the stock path ran there). The cache is the minimum chunk of 256
    neurons, every layer is planned in chunks, nothing is OOM-killed and the tokens are those of an
    unconfined run with a one-layer cache."""
    from ripple_gguf.cgroup import MemoryCgroup
    limit = 72 * 2**20
    cg = MemoryCgroup.create(limit)
    if cg is None:
        pytest.skip(MemoryCgroup.why_unavailable())
    with cg:
        proc = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", "run", str(big_model), "-p", "import os\n",
                               "-n", "16", "--ctx", "256", "--all-active", "--json"], preexec_fn=cg.preexec(),
                              capture_output=True, text=True, timeout=600)
        oom, peak = cg.oom_killed(), cg.peak_bytes()
    assert proc.returncode == 0 and not oom, proc.stderr[-2000:]
    res, layer = json.loads(proc.stdout), run_json(big_model, ["--all-active", "--cache-size", str(13 * 2**20)])
    st = res["ripple"]
    print(f"peak {(peak or 0) / 2**20:.1f} MiB of {limit / 2**20:.0f}; cache {st['cache_bytes'] / 2**10:.0f} KiB, "
          f"{st['neuron_chunks']} plans, {res['generation']['tokens_per_s']} tokens/s")
    assert res["operating_point"]["path"] == "pack" and st["neuron_chunks"] > 0 and not st["error"]
    assert st["cache_bytes"] < open_pack(big_model).layer_cache_bytes
    assert res["tokens"] == layer["tokens"]


def test_available_memory_sees_the_cgroup_limit():
    """The default budget starts from the tightest limit: a memory cgroup, not the machine's RAM."""
    from ripple_gguf.cgroup import MemoryCgroup
    limit = 300 * 2**20
    cg = MemoryCgroup.create(limit)
    if cg is None:
        pytest.skip(MemoryCgroup.why_unavailable())
    with cg:
        proc = subprocess.run([sys.executable, "-c", "import json; from ripple_gguf.cgroup import available_memory; "
                               "print(json.dumps(available_memory()))"], preexec_fn=cg.preexec(),
                              capture_output=True, text=True, timeout=120)
    avail, source = json.loads(proc.stdout)
    assert 0 < avail <= limit and "memory cgroup" in source


def test_a_previous_runs_file_cache_counts_as_available(tmp_path):
    """A model read by an earlier process in the same memory cgroup stays there as file cache (read twice:
    on the active list). The kernel drops it on demand, so the next run's budget must count it as
    available: counting only inactive pages, a second `run` in a 90 MiB cgroup saw 20 MiB less and fell
    back to the stock path (16.8 -> 3.7 tok/s)."""
    from ripple_gguf.cgroup import MemoryCgroup, drop_file_cache
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(64 * 2**20))
    drop_file_cache(str(blob))  # so that the reads below are charged to the test's cgroup
    cg = MemoryCgroup.create(400 * 2**20)
    if cg is None:
        pytest.skip(MemoryCgroup.why_unavailable())
    ask = [sys.executable, "-c", "from ripple_gguf.cgroup import available_memory; print(available_memory()[0])"]
    read_twice = [sys.executable, "-c", f"[open({str(blob)!r}, 'rb').read() for _ in range(2)]"]
    with cg:
        before = int(subprocess.run(ask, preexec_fn=cg.preexec(), capture_output=True, text=True, timeout=120,
                                    check=True).stdout)
        subprocess.run(read_twice, preexec_fn=cg.preexec(), timeout=120, check=True)
        after = int(subprocess.run(ask, preexec_fn=cg.preexec(), capture_output=True, text=True, timeout=120,
                                   check=True).stdout)
    assert before - after < 16 * 2**20, (before, after)


def tight_split_parts(path, monkeypatch, **kw) -> dict:
    """The tight split's unreclaimable parts (KV cache, compute at the tight batch size, minimum cache)
    do not depend on the memory available: the split of a load with next to none (it runs stock)."""
    import ripple_gguf.memory_budget as mb
    monkeypatch.setattr(mb, "available_memory", lambda: (2**20, "1 MiB"))
    llm = RippleLlama(path, **kw, **KW)
    split = llm.ripple_budget_split
    llm.close()
    return split


def test_memory_budget_is_what_the_whole_process_may_use(packed, monkeypatch):
    """--memory-budget counts everything (issue 11): non-FFN weights, KV cache, compute, runtime and
    headroom come out of it and the neuron cache gets the rest; too small a budget names the parts."""
    from ripple_gguf import memory_budget as mb
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    _, other = mb.gguf_ffn_split(str(path))
    pred = pk.file_bytes - pk.ffn_pack_bytes
    fixed = other + mb.kv_cache_bytes(str(path), KW["n_ctx"]) + mb.llama_compute_bytes(str(path), KW["n_ctx"])
    fixed += mb.RUNTIME_ALLOWANCE + pred + mb.stream_layout(str(path))[1]  # (prompt batches streamed: test_stream)
    want_cache = pk.ffn_pack_bytes // 2
    total = fixed + 64 * 2**20 + want_cache  # headroom: 64 MiB below 640 MiB
    llm = RippleLlama(path, memory_budget=total, stream_dense=False, **KW)  # the pack's bundles (test_stream: streamed)
    split = llm.ripple_budget_split
    assert split["available_from"] == "--memory-budget" and split["available"] == total
    assert split["cache"] == want_cache
    assert abs(llm.ripple_stats()["cache_bytes"] - want_cache) <= pk.bundle_bytes * max(pk.n_ff)
    llm.close()
    # below what the usual allowances need, a given budget splits as tightly as the defaults do: some
    # non-FFN weights held, the rest mapped, the minimum cache, llama.cpp's batches shortened (it was
    # refused, where default settings in a memory cgroup of that size ran)
    dense_text = RippleLlama(path, dense=True, **KW)
    want = dense_text.create_completion("def ", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    dense_text.close()
    # (the page-cache floor scaled down to the fixture, whose ~2 MiB of weights it would otherwise exceed)
    monkeypatch.setattr(mb, "PAGE_CACHE_FLOOR", 2**16)
    parts = tight_split_parts(path, monkeypatch, stream_dense=False)
    tight = mb.mapped_pack_need(parts) + mb.PAGE_CACHE_FLOOR + other // 2
    llm = RippleLlama(path, memory_budget=tight, stream_dense=False, **KW)
    split, st = llm.ripple_budget_split, llm.ripple_stats()
    got = llm.create_completion("def ", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert split["below_minimum"] and split["mapped_fits"] and split["n_ubatch"] == TIGHT_UBATCH
    assert st["mode"] == "sparse" and 0 < st["pinned_weight_bytes"] < other and st["mapped_weight_bytes"] > 0
    assert st["cache_bytes"] <= pk.min_cache_bytes + pk.bundle_bytes * max(pk.n_ff) * 2 and not st["error"]
    if pk.op_density[pk.op_default] >= 1.0:
        assert got == want
    with pytest.raises(RippleError, match=r"cannot hold .* --memory-budget \d+MiB or more"):
        RippleLlama(path, memory_budget=4 * 2**20, **KW)
    proc = run_cli("run", path, "-p", "x", "--memory-budget", "4MiB")
    assert proc.returncode == 1 and proc.stderr.startswith("error: memory budget 4 MiB") and len(proc.stderr.splitlines()) == 1


def test_non_ffn_weights_resident_or_mapped_compute_the_same(packed):
    """On the pack path the non-FFN weights are read into memory where they fit (mapped, a memory
    limit made llama.cpp re-fault them page by page every token); either way the tokens are the same,
    and the choice is reported."""
    path = packed("tiny-llama-swiglu", "f32")
    out = {}
    for asked in (None, True, False):
        llm = RippleLlama(path, resident_weights=asked, **PACK, **KW)
        out[asked] = (llm.create_completion("def ", max_tokens=12, temperature=0.0)["choices"][0]["text"],
                      llm.ripple_stats()["non_ffn_weights"])
        llm.close()
    assert out[None][1] == "resident"  # this machine has room to spare
    assert out[True][1] == "resident" and out[False][1].startswith("mapped (resident_weights=False")
    assert out[None][0] == out[True][0] == out[False][0]


def test_non_ffn_fits_leaves_room_for_predictors_and_cache():
    from ripple_gguf.memory_budget import non_ffn_fits
    split = {"ffn_room": 100, "predictors": 10}
    assert non_ffn_fits(split, 90) and not non_ffn_fits(split, 91)
    assert not non_ffn_fits({"ffn_room": None}, 0)  # available memory unknown: stay mapped


def test_dense_point_leaves_the_predictors_out(packed):
    """At an operating point computing every neuron the predictors only cost memory (at 8B size
    ~150 MiB): they are not loaded unless the caller keeps them to move along the curve."""
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    assert len(pk.op_density) > 1 and pk.op_density[0] == 1.0
    llm = RippleLlama(path, quality="0%", **PACK, **KW)
    st = llm.ripple_stats()
    assert st["all_active"] and st["overhead_bytes"] < pk.predictor_bytes
    with pytest.raises(RippleError, match="needs the predictors"):
        llm.ripple_set_point(1)
    dense_text = llm.create_completion("def ", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    llm.close()
    llm = RippleLlama(path, quality="0%", stock_when_dense=False, **PACK, **KW)
    assert not llm.ripple_stats()["all_active"] and llm.ripple_stats()["overhead_bytes"] > pk.predictor_bytes
    assert llm.create_completion("def ", max_tokens=8, temperature=0.0)["choices"][0]["text"] == dense_text
    llm.ripple_set_point(1)
    llm.close()


def test_defaults_take_the_stock_path_when_not_even_one_layer_of_cache_fits(packed, monkeypatch):
    """Default settings where the pack path's fixed memory plus one layer of cache do not fit what is
    available: llama.cpp's stock path (its mapped weights are reclaimable), saying why, instead of a
    pack path that a memory limit kills (ReLU2 bench model at 25% of its size in a cgroup)."""
    import ripple_gguf.memory_budget as mb
    path = packed("tiny-arcee-relu2", "f16")
    # (the fixture's pack path needs ~12.5 MiB with its mapped weights: mapped_pack_need)
    monkeypatch.setattr(mb, "available_memory", lambda: (10 * 2**20, "a 10 MiB test limit"))
    llm = RippleLlama(path, **KW)
    st = llm.ripple_stats()
    reason = llm.ripple_dense_reason
    split = llm.ripple_budget_split
    assert split["below_minimum"] and not split["mapped_fits"]
    text = llm.create_completion("def ", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    n_ubatch = llm.context_params.n_ubatch
    llm.close()
    assert st["mode"] == "dense" and "do not fit in the 10 MiB available" in reason and "--cache-size" in reason
    assert text
    assert n_ubatch == TIGHT_UBATCH  # llama.cpp's compute buffer sized for short batches there too
    # a cache size given keeps the pack path (the user asked for it), as does room for the minimum
    pk = open_pack(path)
    llm = RippleLlama(path, cache_size=pk.min_cache_bytes, **KW)
    assert llm.ripple_stats()["mode"] == "sparse"
    llm.close()
    monkeypatch.setattr(mb, "available_memory", lambda: (8 * 2**30, "8 GiB"))
    llm = RippleLlama(path, **KW)
    assert llm.ripple_stats()["mode"] == "sparse" and not llm.ripple_budget_split["below_minimum"]
    llm.close()


def test_sparse_point_runs_stock_where_the_model_fits_but_not_the_pack_in_the_cache(packed, monkeypatch):
    """Default settings at a sparse point where the whole model fits but the split leaves the neuron
    cache only part of the pack: the pack path would read misses every token where stock, once loaded,
    reads nothing (the ReLU2 bench model in a cgroup of stock's own size: 181 vs 2643 tok/s). Stock
    runs and says why; --keep-pack keeps the pack; with room for the whole pack in the cache it runs."""
    import ripple_gguf.memory_budget as mb
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    quality = "50%"
    need = mb.mapped_pack_need(tight_split_parts(path, monkeypatch, quality=quality))
    monkeypatch.setattr(mb, "available_memory", lambda: (need + 2**20, "a test limit"))
    llm = RippleLlama(path, quality=quality, **KW)
    st, split, reason = llm.ripple_stats(), llm.ripple_budget_split, llm.ripple_dense_reason
    text = llm.create_completion("def ", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert mb.whole_model_fits(split) and split["mapped_fits"] and split["cache"] < pk.every_slot_bytes, split
    assert st["mode"] == "dense" and "the whole model fits" in reason and "--keep-pack" in reason and text
    llm = RippleLlama(path, quality=quality, stock_when_dense=False, **KW)
    assert llm.ripple_stats()["mode"] == "sparse"
    llm.close()
    monkeypatch.setattr(mb, "available_memory", lambda: (2**33, "8 GiB"))
    llm = RippleLlama(path, quality=quality, **KW)
    st, split = llm.ripple_stats(), llm.ripple_budget_split
    llm.close()
    assert split["cache"] >= pk.every_slot_bytes and st["mode"] == "sparse"


def test_defaults_keep_the_pack_with_mapped_weights_where_only_they_do_not_fit(packed, monkeypatch):
    """Room for the pack path's fixed memory but not for resident non-FFN weights next to one layer
    of cache: the pack path still runs, weights mapped, minimum cache (a sparse point here: at a dense
    one these fixtures are so small that the whole model fits, and stock runs; the slow cgroup test
    checks a dense point on a model larger than its limit)."""
    import ripple_gguf.memory_budget as mb
    path = packed("tiny-llama-swiglu", "f32")
    pk = open_pack(path)
    quality = "50%"
    assert pk.op_density[-1] < 0.9, "fixture has no sparse point"
    # the fixture is smaller than the pack path's fixed memory: where that fits, the whole model does,
    # and a sparse point whose cache cannot hold the pack runs stock; count stock's own memory as a
    # model larger than the memory would need it
    monkeypatch.setattr(mb, "_stock_own", lambda r: 2**30)
    split = tight_split_parts(path, monkeypatch, quality=quality)
    assert split["below_minimum"] and not split["mapped_fits"]
    avail = mb.mapped_pack_need(split) + 2**20  # less than PAGE_CACHE_FLOOR more: none of the weights held
    monkeypatch.setattr(mb, "available_memory", lambda: (avail, "a test limit"))
    llm = RippleLlama(path, quality=quality, **KW)
    st, split = llm.ripple_stats(), llm.ripple_budget_split
    text = llm.create_completion("def ", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    non_ffn = llm.ripple_non_ffn
    llm.close()
    assert split["below_minimum"] and split["mapped_fits"] and "non-FFN weights mapped" in split["note"]
    assert st["mode"] == "sparse" and non_ffn.startswith("mapped") and text
    assert st["cache_bytes"] == pk.min_cache_bytes and not st["error"]
    # a little less and the worst case of llama.cpp's buffers no longer fits, not even at the tight
    # batch size the split falls back to: stock
    assert split["n_ubatch"] == TIGHT_UBATCH
    monkeypatch.setattr(mb, "available_memory", lambda: (mb.mapped_pack_need(split) - 2**20, "a test limit"))
    llm = RippleLlama(path, quality=quality, **KW)
    assert llm.ripple_stats()["mode"] == "dense" and not llm.ripple_budget_split["mapped_fits"]
    llm.close()


def test_pack_reads_bypass_the_page_cache_by_default_where_the_model_does_not_fit(packed, monkeypatch):
    """Buffered reads would keep a second copy of what the neuron cache holds in the page cache,
    charged to the same memory limit: O_DIRECT is the default where the model does not fit, buffered
    where it does; --direct-io / --buffered-io (direct_io=) decide either way."""
    import ripple_gguf.memory_budget as mb
    path = packed("tiny-llama-swiglu", "f32")
    fits = (8 * 2**30, "8 GiB")
    monkeypatch.setattr(mb, "available_memory", lambda: fits)
    llm = RippleLlama(path, direct_io=True, stock_when_dense=False, **KW)  # the pack path at any point
    supported, split = llm.ripple_stats()["direct_io"], llm.ripple_budget_split
    llm.close()
    if not supported:
        pytest.skip("the filesystem holding the test files refuses O_DIRECT")
    # a byte short of the weights, KV cache and llama.cpp's own memory: the model does not fit (without
    # llama.cpp's own it "fitted" with 1 MiB to spare, and the stock path re-read every weight per token)
    tight = (split["non_ffn_weights"] + split["gguf_ffn"] + split["kv_cache"] + split["stock_own"] - 1, "a tight test limit")
    for avail, asked, want in ((fits, None, False), (tight, None, True), (tight, False, False), (fits, True, True)):
        monkeypatch.setattr(mb, "available_memory", lambda a=avail: a)
        llm = RippleLlama(path, direct_io=asked, stock_when_dense=False, **KW)
        st, split = llm.ripple_stats(), llm.ripple_budget_split
        llm.close()
        assert st["mode"] == "sparse" and mb.whole_model_fits(split) == (avail is fits), (avail, split)
        assert st["direct_io"] == want, (avail, asked, split)


# --- the C API's structs ---------------------------------------------------------------------------

def _c_list(macro: str) -> list[tuple[str, str, str]]:
    """(C type, field, default) of each X(...) in one of include/llama-ripple.h's field lists, as the patch
    declares it."""
    import re
    text = (ROOT / "patches" / "0001-ripple-sparse-ffn.patch").read_text()
    body = re.search(r"\+#define " + macro + r"\(X\) \\\n(.*?)\n\+\n", text, re.S).group(1)
    return re.findall(r"X\((u?int\d+_t|double),\s*(\w+),\s*(-?[\d.]+),", body)


@pytest.mark.parametrize("macro,struct", [("LLAMA_RIPPLE_PARAMS", "params"), ("LLAMA_RIPPLE_STATS", "stats")])
def test_ctypes_structs_are_the_libraries_own(macro, struct):
    """Python passes and reads these structs by layout: a field one side lacks would shift every later
    one (a wrong cache size, a stats dict of garbage) without any error. The ctypes structs are built
    from the layout the loaded library reports, so they are its own; that library is the patch's
    (field for field, in order), and the parameters' defaults read through the mirror are the patch's."""
    from ripple_gguf.runtime import ripple_c
    declared = _c_list(macro)
    c = ripple_c()
    cls = getattr(c, struct)
    ctype = {"uint64_t": ctypes.c_uint64, "int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "double": ctypes.c_double}
    assert declared and [(n, ctype[t]) for t, n, _ in declared] == list(cls._fields_)
    if struct == "params":
        defaults = ripple_lib().llama_ripple_default_params()
        assert {n: getattr(defaults, n) for _, n, _ in declared} == {n: float(d) for _, n, d in declared}
        assert {f.name: c.param_default(f.name) for f in c.param_fields} == {n: float(d) for _, n, d in declared}


# llama.cpp's memory beside the weights, as a stock run leaves it: load, a 64-token prompt, 16 decodes
STOCK_GROWTH = r"""
import sys, llama_cpp
def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
a0 = anon()
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_ubatch=64, verbose=False)
toks = (llm.tokenize(b"Once upon a time there was a little girl who lived in a village near the forest. " * 8))[:64]
llm.eval(toks)
for t in toks[:16]:
    llm.eval([t])
print(anon() - a0)
"""


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_stock_own_memory_is_what_llama_cpp_holds(which, converted, request):
    """Default settings run llama.cpp's stock path where the whole model fits (whole_model_fits), and
    that turns on what stock holds beside its weights and KV cache. A flat 16 MiB stood for it: 8 MiB
    too much for a TinyStories-sized model (32,000 pieces), whose defaults then streamed its FFN at
    0.26x stock in a cgroup where stock ran at full speed. memory_budget.stock_own (the tokenizer's
    strings, a prompt's activations) must be within 3 MiB of what llama.cpp really holds (measured: the
    1,024-token fixture 3.7 MiB, SmolLM2's 98,053 strings 22.4 MiB; the KV cache is zeroed at load, so
    all of it counts)."""
    from ripple_gguf import memory_budget as mb
    path = str(converted("tiny-llama-swiglu", "f32") if which == "tiny" else request.getfixturevalue("smollm2")["q4_1"])
    out = subprocess.run([sys.executable, "-c", STOCK_GROWTH, path], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    held = int(out.stdout.split()[-1]) - mb.kv_cache_bytes(path, 512)
    assert abs(mb.stock_own(path) - held) <= 3 * 2**20, (mb.stock_own(path) / 2**20, held / 2**20)


def test_default_context_keeps_2048_only_with_room_to_spare(smollm2, monkeypatch):
    """The default context is decided before the load, whose own check (whole_model_fits) comes later
    with a few MiB more in use: a 2048 context that fitted by less than that then ran on the runtime with
    every buffer sized for it (a 0.5B-shaped Q8_0 in 577 MiB: 6-7.6 tok/s, where 512 on the stock path
    ran 48.8). So 2048 stays only with llama.cpp's own memory to spare twice."""
    import argparse
    from ripple_gguf import memory_budget as mb
    from ripple_gguf.run_cli import _n_ctx
    path = str(smollm2["q4_1"])
    own = mb.stock_own(path)
    need = os.path.getsize(path) + mb.kv_cache_bytes(path, 2048) + own
    got = {}
    for avail in (need, need + own):
        monkeypatch.setattr(mb, "available_memory", lambda a=avail: (a, "a test limit"))
        args = argparse.Namespace(ctx=None, gguf=path, memory_budget=None, cache_size=None, cache_ratio=None)
        got[avail] = _n_ctx(args)
    assert got == {need: 512, need + own: 2048}


def test_run_default_context_shrinks_where_the_model_does_not_fit(smollm2):
    """`run`'s default context is 2048 tokens (or the model's own), but its KV cache is zeroed, so
    unreclaimable, at load: where the model does not fit in the memory available (here: a budget
    given), the default is 512 tokens and the run says so; a --ctx given stays (SmolLM2 in a 98 MiB
    cgroup: OOM-killed at 2048, a working run at 512)."""
    path = smollm2["q4_1"]
    out = {}
    for extra in (["--memory-budget", "64MiB"], ["--memory-budget", "8GiB"], ["--memory-budget", "64MiB", "--ctx", "1024"]):
        proc = run_cli("run", path, "--dense", "-p", "Hello", "-n", "4", "--json", *extra, check=True)
        res = json.loads(proc.stdout)
        out[" ".join(extra)] = (res["n_ctx"], res["ctx_note"])
    assert out["--memory-budget 64MiB"][0] == 512 and "does not fit" in out["--memory-budget 64MiB"][1]
    assert out["--memory-budget 8GiB"] == (2048, None)
    assert out["--memory-budget 64MiB --ctx 1024"] == (1024, None)


def test_sample_in_a_decode_loop_does_not_grow_memory(smollm2):
    """llama-cpp-python's Llama.sample() builds a sampler chain per call whose llama.cpp side (a
    candidate array of n_vocab entries, 576 KiB on SmolLM2) waited for Python's cycle collector: 40
    sample() + eval() steps grew RssAnon 23 MiB, and such a loop was OOM-killed in a cgroup where
    generate() ran. RippleLlama closes it after each call."""
    def anon_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

    llm = RippleLlama(str(smollm2["q4_1"]), dense=True, n_ctx=128, n_ubatch=32, verbose=False)
    try:
        llm.eval(llm.tokenize(b"The history of the city begins", add_bos=True))
        for _ in range(5):  # allocator warm-up
            llm.eval([llm.sample(temp=0.0)])
        gc.collect()
        before, sampled = anon_mib(), []
        for _ in range(40):
            sampled.append(llm.sample(temp=0.0))
            llm.eval([sampled[-1]])
        grew = anon_mib() - before
        assert grew < 6, f"RssAnon grew {grew:.1f} MiB over 40 sample() calls"
    finally:
        llm.close()
