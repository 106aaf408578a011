"""The streamed dense FFN (operating points that compute every neuron; llama-ripple-stream.cpp).

What is checked: llama.cpp's own dense FFN over the GGUF's own tensors, read into memory or streamed
layer by layer (one layer ahead or not, O_DIRECT or not, an even or odd number of streamed layers), with
a mapped output matrix read in chunks or not, is bit-identical to the stock path for prompt batches and token by token (F16; Q4_0 within rounding:
stock repacks it for other kernels); it reads only the GGUF's FFN
tensors; the defaults choose it at a dense point; layers larger than the staging buffers are read and
computed in row chunks, with the same numbers; a budget below two staging buffers and a failing read are
clear errors.
"""
from __future__ import annotations

import errno

import numpy as np
import pytest

from ripple_gguf.errors import RippleError
from ripple_gguf.gguf_io import open_header
from ripple_gguf.memory_budget import stream_layout
from ripple_gguf.runtime import RippleLlama, ripple_lib

from conftest import FIXTURES, all_logits, prompts
from test_runtime import chunked_logits

KW = dict(n_ctx=256, n_threads=2, seed=0, verbose=False)
# stock runs Q4_0 weights repacked for ggml's interleaved kernels (another summation order), the streamed
# layers the plain ones: max |diff| / max |logit| measured 1.2e-3 on the arcee fixture, 0 on llama
REPACK_TOL = 5e-3


def pages(t) -> tuple[int, int]:
    """[start, end) of a GGUF tensor's bytes in the file, widened to 4 KiB pages."""
    return int(t.data_offset) // 4096 * 4096, -(-(int(t.data_offset) + int(t.n_bytes)) // 4096) * 4096


def ffn_ranges(path) -> list[tuple[int, int]]:
    """The pages of every FFN weight tensor in the GGUF."""
    return [pages(t) for t in open_header(str(path)).tensors
            if t.name.startswith("blk.") and t.name.split(".")[2] in ("ffn_gate", "ffn_up", "ffn_down")]


def within(trace, ranges) -> bool:
    """Is every read (offset, length) inside the ranges, merged where they touch (a streamed layer's
    tensors are read as one range), up to the 4 KiB page past the end?"""
    merged = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return all(any(a <= off and off + n <= b + 4096 for a, b in merged) for off, n in trace)


def assert_stock_numbers(ref, got, outtype: str, what: str) -> None:
    """The stock path's logits: bit for bit (F16), within rounding where stock repacks the weights."""
    for r, g in zip(ref, got):
        if outtype == "f16":
            np.testing.assert_array_equal(g, r, err_msg=what)
        else:  # stock runs Q4_0 on ggml's repacked (interleaved) kernels, ours on the plain ones
            assert np.abs(g - r).max() <= REPACK_TOL * np.abs(r).max(), what
            assert (g.argmax(1) == r.argmax(1)).mean() >= 0.99, what


def layer_bytes(path) -> int:
    whole, minimum = stream_layout(str(path))
    return minimum // 2


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["f16", "q4_0"])
def test_streamed_dense_is_bit_identical_to_stock(packed, model, outtype):
    path = packed(model, outtype)
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense, n=2, length=40)
    ref = (all_logits(dense, ps), chunked_logits(dense, ps, 1), chunked_logits(dense, ps, 5))
    dense.close()
    _, minimum = stream_layout(str(path))
    cases = [  # (budget, read ahead, O_DIRECT, layers expected in memory)
        (None, True, False, 4),              # everything in memory
        (minimum, True, True, 0),            # every layer streamed, 4: the next batch's first is read ahead
        (minimum, False, False, 0),
        # 3 streamed: the wrap shares a buffer (a page under a layer more, as the tiny fixtures' padded
        # layout makes minimum + a layer as much as their tensors, and that holds every layer)
        (minimum + layer_bytes(path) - 4096, True, False, 1),
    ]
    for budget, ahead, direct, resident in cases:
        llm = RippleLlama(path, stream_dense=True, logits_all=True, read_ahead=ahead, direct_io=direct,
                          **({} if budget is None else {"cache_size": budget}), **KW)
        llm.ripple_trace(True)
        got = (all_logits(llm, ps), chunked_logits(llm, ps, 1), chunked_logits(llm, ps, 5))
        st, trace = llm.ripple_stats(), llm.ripple_trace(False)
        llm.close()
        what = f"{model} {outtype} budget {budget} ahead {ahead} direct {direct}"
        assert st["stream_dense"] and st["all_active"] and not st["error"], what
        assert st["resident_layers"] == resident, what
        assert_stock_numbers(ref, got, outtype, what)
        assert within(trace, ffn_ranges(path)), what
        if resident < 4:
            assert st["bytes_read"] >= st["useful_bytes"] > 0 and st["cache_misses"] > 0, what
            assert (st["ahead_used"] > 0) == ahead, what
        else:
            assert st["bytes_read"] == 0 and trace == [], what


def test_a_budget_of_every_ffn_tensor_holds_every_streamed_layer(packed):
    """The streamed layers' reads are 4 KiB-aligned ranges, a few KiB a layer more than the tensors: a
    budget of the FFN's tensor bytes (the whole GGUF's room, as bench e2e gives it at 100%) fell those
    KiB short and streamed three layers every token (a 0.5B-shaped Q8_0 at 100%: 0.48x stock); a page
    less streams."""
    from ripple_gguf.memory_budget import gguf_ffn_split
    path = packed("tiny-llama-swiglu", "q8_0")
    ffn, _ = gguf_ffn_split(str(path))
    held = {}
    for budget in (ffn, ffn - 4096):
        llm = RippleLlama(path, stream_dense=True, cache_size=budget, **KW)
        held[budget] = llm.ripple_stats()["resident_layers"]
        llm.close()
    assert held[ffn] == 4 and held[ffn - 4096] < 4


def test_defaults_stream_a_dense_point(packed):
    """At an operating point that computes every neuron (--quality 0%), the runtime streams the GGUF's
    own FFN tensors instead of the pack's bundles: the stock path's numbers, bit for bit."""
    path = packed("tiny-llama-swiglu", "q8_0")
    whole, minimum = stream_layout(str(path))
    llm = RippleLlama(path, quality="0%", cache_size=minimum, **KW)
    out = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    st = llm.ripple_stats()
    llm.close()
    dense = RippleLlama(path, dense=True, **KW)
    ref = dense.create_completion("Once upon a time", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    dense.close()
    assert st["stream_dense"] and st["resident_layers"] == 0 and st["bytes_read"] > 0
    assert out == ref


def test_a_point_above_the_stock_path_density_streams_every_neuron(packed):
    """Points at least STOCK_PATH_DENSITY dense compute every neuron from the GGUF's own tensors (the
    stock path's tokens); sparser ones run on the pack. On SmolLM2 F16 the pack at densities 0.72-0.92
    read as many bytes a token as the streamed FFN and ran slower (README "Where the pack pays"): with
    the line at 0.9, `--quality` at such a point got the slower path and less quality."""
    from ripple_gguf.quality import ESTIMATE_SHARE, STOCK_PATH_DENSITY, every_neuron_pays
    from ripple_gguf.runtime import choose_point, verified_pack
    path = packed("tiny-llama-swiglu", "f16")
    dense = RippleLlama(path, dense=True, **KW)
    ref = dense.create_completion("Once upon a time", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    dense.close()
    whole, _ = stream_layout(str(path))
    pk = verified_pack(str(path))
    print("read shares", [(round(d, 3), round(r, 3)) for d, r in zip(pk.op_density, pk.op_read_share)])
    worst = np.maximum.accumulate(np.maximum(pk.op_ppl_increase, 0.0))
    seen = {}  # every point a budget can reach: the sparsest whose denser points are all within it
    for quality in sorted({f"{100 * w / ESTIMATE_SHARE + 1e-4:.6f}%" for w in worst[1:]}):
        index = choose_point(pk, quality)
        asked = float(pk.op_density[index])
        llm = RippleLlama(path, quality=quality, cache_size=whole, **KW)
        out = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)["choices"][0]["text"]
        point, streamed = llm.ripple_point, llm.ripple_streamed
        llm.close()
        seen[round(asked, 3)] = streamed
        assert streamed == every_neuron_pays(pk, index), (quality, asked)
        if streamed:  # says so: every neuron, the dense point's numbers
            assert point["density"] == 1.0 and point["path"] == "stream" and out == ref, (quality, point)
            assert asked == 1.0 or point["asked"]["density"] == asked  # and which point was asked for
        else:
            assert point["density"] == asked and point["path"] == "pack", (quality, point)
    assert any(STOCK_PATH_DENSITY <= d < 0.9 for d in seen), f"no fixture point between the lines: {seen}"
    assert any(d < STOCK_PATH_DENSITY for d in seen), f"no fixture point below the line: {seen}"


def output_range(path) -> tuple[int, int]:
    """The pages of the matrix the output multiplies by (token_embd where tied)."""
    ts = {t.name: t for t in open_header(str(path)).tensors}
    return pages(ts.get("output.weight") or ts["token_embd.weight"])


@pytest.mark.parametrize("model", FIXTURES)
def test_a_mapped_output_matrix_is_read_in_chunks_and_computes_the_same(packed, model):
    """Beside a streamed FFN, an output matrix left mapped (it did not fit) is multiplied in row chunks
    read whole through the staging buffers (each read after the one before, or one ahead; more chunks than
    one gather op takes): the logits are the stock path's, bit for bit, for prompt batches and token by
    token, and every byte read is the FFN's or the output matrix's. Where the page cache holds the matrix
    (nothing evicts it here) nothing of it is read; stream_output=0 leaves it to the page cache."""
    path = packed(model, "f16")
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense, n=2, length=40)
    ref = (all_logits(dense, ps), chunked_logits(dense, ps, 1), chunked_logits(dense, ps, 5))
    dense.close()
    _, minimum = stream_layout(str(path))
    ranges = ffn_ranges(path) + [output_range(path)]
    cases = [  # (stream_output, chunk bytes, read ahead, O_DIRECT)
        (2, 16384, True, True), (2, 16384, False, False), (2, 0, True, True), (1, 16384, True, True), (0, 0, True, True)]
    for mode, chunk, ahead, direct in cases:
        llm = RippleLlama(path, stream_dense=True, cache_size=minimum, resident_weights=False, stream_output=mode,
                          output_chunk_bytes=chunk, read_ahead=ahead, direct_io=direct, logits_all=True, **KW)
        llm.ripple_trace(True)
        got = (all_logits(llm, ps), chunked_logits(llm, ps, 1), chunked_logits(llm, ps, 5))
        st, trace, non_ffn = llm.ripple_stats(), llm.ripple_trace(False), llm.ripple_non_ffn
        llm.close()
        what = f"{model} stream_output {mode} chunk {chunk} ahead {ahead} direct {direct}"
        assert not st["error"] and st["stream_dense"] and st["mapped_weight_bytes"] > 0, what
        for r, g in zip(ref, got):
            np.testing.assert_array_equal(g, r, err_msg=what)
        assert within(trace, ranges), what
        if mode == 0:
            assert st["output_chunks"] == 0 and "output matrix" not in non_ffn, what
            continue
        assert (st["output_chunks"] > 9) == (chunk == 16384) and f"read in {st['output_chunks']} chunks" in non_ffn, what
        out_a, out_b = output_range(path)
        out_reads = sum(n for off, n in trace if out_a <= off < out_b)
        if mode == 2:  # every chunk of every batch (the tests evaluate many)
            assert st["output_chunks_read"] >= 10 * st["output_chunks"] and out_reads >= 10 * (out_b - out_a) - 4096, what
        else:
            assert st["output_chunks_read"] == 0 and out_reads == 0, what


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["f16", "q4_0"])
def test_layers_larger_than_the_staging_buffers_stream_in_row_chunks(packed, model, outtype):
    """A budget below two whole layers used to be refused: now a layer larger than the staging buffers is
    read and computed in units of rows (gate and up rows, then down rows, in up to 6 buffers, several read
    ahead) with llama.cpp's own ops on them: the stock path's numbers, bit for bit (F16), for prompt
    batches and token by token, with or without read-ahead and O_DIRECT, beside held layers and beside a
    mapped output matrix read in chunks through the same buffers; every byte read is the FFN's (or the
    output's)."""
    path = packed(model, outtype)
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense, n=2, length=40)
    ref = (all_logits(dense, ps), chunked_logits(dense, ps, 1), chunked_logits(dense, ps, 5))
    dense.close()
    chunk = 4096  # raised by the library to 32 rows of gate and up (of down) with their pages
    _, minimum = stream_layout(str(path), chunk)
    layer = layer_bytes(path)
    assert minimum < 2 * layer  # refused before
    cases = [  # (budget, read ahead, O_DIRECT, held layers, more keyword arguments)
        (minimum, True, False, 0, {}),
        (minimum, False, False, 0, {}),
        (minimum, True, True, 0, {}),
        (3 * minimum, True, False, 0, {}),       # more buffers: more read ahead
        (3 * layer - 4096, True, False, 1, {}),  # a layer held, the rest in chunks (a page less: see above)
        (minimum, True, True, 0, {"resident_weights": False, "stream_output": 2}),
    ]
    for budget, ahead, direct, held, more in cases:
        llm = RippleLlama(path, stream_dense=True, logits_all=True, read_ahead=ahead, direct_io=direct,
                          cache_size=budget, stream_chunk_bytes=chunk, **more, **KW)
        llm.ripple_trace(True)
        got = (all_logits(llm, ps), chunked_logits(llm, ps, 1), chunked_logits(llm, ps, 5))
        st, trace = llm.ripple_stats(), llm.ripple_trace(False)
        llm.close()
        what = f"{model} {outtype} budget {budget} ahead {ahead} direct {direct} {more}"
        assert st["stream_dense"] and not st["error"] and st["ffn_chunks"] > 0, what
        assert st["resident_layers"] == held and st["cache_bytes"] <= budget, what
        assert_stock_numbers(ref, got, outtype, what)
        assert within(trace, ffn_ranges(path) + ([output_range(path)] if more else [])), what
        assert st["bytes_read"] >= st["useful_bytes"] > 0 and (st["ahead_used"] > 0) == ahead, what
        assert (st["output_chunks"] > 0) == bool(more), what
    with pytest.raises(RippleError, match=f"minimum for this model is .*\\({minimum} bytes"):
        RippleLlama(path, stream_dense=True, cache_size=minimum - 4096, stream_chunk_bytes=chunk, **KW)


def test_a_prompt_reads_the_output_matrix_once_not_once_per_batch(packed):
    """A prompt runs in llama.cpp batches (n_ubatch), and only its last token's logits are needed: the
    batches before have no outputs, and the chunked output matrix must not be read for them (a 512-token
    prompt in the tight split's 64-token batches would read it 8 times)."""
    path = packed("tiny-llama-swiglu", "f16")
    _, minimum = stream_layout(str(path))
    llm = RippleLlama(path, stream_dense=True, cache_size=minimum, resident_weights=False, stream_output=2,
                      output_chunk_bytes=16384, n_batch=64, n_ubatch=8, **KW)
    toks = prompts(llm, n=1, length=40)[0]
    llm.ripple_reset_stats()
    llm.eval(toks)  # 5 batches of 8 tokens
    st = llm.ripple_stats()
    llm.close()
    assert len(toks) == 40 and st["tokens"] == 40 and not st["error"]
    assert st["output_chunks"] > 9 and st["output_chunks_read"] == st["output_chunks"]


def test_budget_below_two_staging_buffers_is_refused_with_the_minimum(packed):
    path = packed("tiny-llama-swiglu", "f16")
    _, minimum = stream_layout(str(path))
    with pytest.raises(RippleError, match=f"minimum for this model is .*\\({minimum} bytes"):
        RippleLlama(path, stream_dense=True, cache_size=minimum - 4096, **KW)


@pytest.mark.parametrize("after_reads", [0, 3])
def test_read_error_while_streaming_is_a_clear_sticky_error(packed, after_reads):
    path = packed("tiny-llama-swiglu", "f16")
    _, minimum = stream_layout(str(path))
    llm = RippleLlama(path, stream_dense=True, cache_size=minimum, **KW)
    llm.create_completion("Once", max_tokens=2)
    assert ripple_lib().llama_ripple_inject_fault(llm.model, after_reads, errno.EIO) == 0
    with pytest.raises(RippleError, match=f"{path}.*(Input/output error|I/O error)"):
        llm.create_completion("Once upon a time there", max_tokens=6)
    with pytest.raises(RippleError):  # sticky
        llm.create_completion("x", max_tokens=2)
    llm.close()


def test_room_short_of_two_whole_layers_takes_smaller_llama_batches_not_a_smaller_cache(packed, monkeypatch):
    """llama.cpp's compute buffer is sized for its largest batch; where the FFN room left beside 512-token
    batches is short of two whole layers, the defaults take 64-token batches and give the difference to
    the FFN cache. Chunked layers need less than two layers, and with that as the bar 512-token batches
    were kept (a 0.5B-shaped Q8_0 at 75% of its size: 86 MiB of cache instead of 143, 8.3 vs 11 tok/s)."""
    import ripple_gguf.memory_budget as mb
    path = str(packed("tiny-llama-swiglu", "f32"))
    chunk = 4096
    _, minimum = stream_layout(path, chunk)
    two_layers = mb.prompt_staging_bytes(path)
    assert minimum < two_layers
    _, other = mb.gguf_ffn_split(path)
    fixed = other + mb.kv_cache_bytes(path, KW["n_ctx"]) + mb.llama_compute_bytes(path, KW["n_ctx"], 512) \
        + mb.RUNTIME_ALLOWANCE
    avail = fixed + mb.HEADROOM_MIN + (minimum + two_layers) // 2  # room at 512 tokens: between the two
    monkeypatch.setattr(mb, "available_memory", lambda: (avail, "a test limit"))
    llm = RippleLlama(path, stream_dense=True, stream_chunk_bytes=chunk, **KW)
    split, st = llm.ripple_budget_split, llm.ripple_stats()
    llm.close()
    assert st["stream_dense"] and not st["error"] and split["n_ubatch"] == 64


def test_memory_budget_at_a_dense_point_holds_the_layers_that_fit(packed):
    """--memory-budget at a dense point: what is left after the fixed parts holds whole layers of the
    GGUF's FFN in memory (no predictors are loaded), the rest is streamed."""
    from ripple_gguf import memory_budget as mb
    path = packed("tiny-llama-swiglu", "f32")
    whole, minimum = stream_layout(str(path))
    _, other = mb.gguf_ffn_split(str(path))
    fixed = other + mb.kv_cache_bytes(str(path), KW["n_ctx"]) + mb.llama_compute_bytes(str(path), KW["n_ctx"])
    fixed += mb.RUNTIME_ALLOWANCE
    want = minimum + whole // 4
    llm = RippleLlama(path, quality="0%", memory_budget=fixed + 64 * 2**20 + want, **KW)  # headroom 64 MiB
    split, st = llm.ripple_budget_split, llm.ripple_stats()
    llm.close()
    assert st["stream_dense"] and split["cache"] == want and split["predictors"] == 0
    assert 1 <= st["resident_layers"] < 4 and st["cache_bytes"] <= want


def test_a_cache_size_given_keeps_the_stream_where_its_minimum_would_not_fit(packed, monkeypatch):
    """The streamed FFN's minimum is two whole layers, the pack's one layer of bundles: default settings
    fall back to the pack where only its minimum fits what is available, but a cache size given that
    holds two layers is what the user asked for."""
    import ripple_gguf.memory_budget as mb
    path = packed("tiny-llama-swiglu", "f32")
    _, minimum = stream_layout(str(path))
    monkeypatch.setattr(mb, "available_memory", lambda: (8 * 2**20, "an 8 MiB test limit"))
    llm = RippleLlama(path, quality="0%", cache_size=minimum, **KW)
    st, split = llm.ripple_stats(), llm.ripple_budget_split
    llm.close()
    assert split is None and st["stream_dense"] and st["resident_layers"] == 0 and not st["error"]


def test_prompt_batches_at_a_sparse_point_stream_the_dense_ffn(packed):
    """At a sparse point, a batch of at least stream_prefill tokens computes the dense FFN from the
    GGUF's own tensors (its union of active neurons is most of each layer): the prompt's logits are
    the stock path's, bit for bit (F16); shorter batches and the decode stay sparse."""
    path = packed("tiny-llama-swiglu", "f16")
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense, n=2, length=40)
    ref = all_logits(dense, ps)
    dense.close()
    _, minimum = stream_layout(str(path))
    out = {}
    for prefill in (0, 16):
        llm = RippleLlama(path, quality="50%", stream_prefill=prefill, logits_all=True, stock_when_dense=False, **KW)
        got = all_logits(llm, ps)
        llm.ripple_reset_stats()
        for t in ps[0][:8]:
            llm.eval([t])
        out[prefill] = (got, llm.ripple_stats(), llm.ripple_budget_split)
        llm.close()
    (sparse, st0, _), (streamed, st, split) = out[0], out[16]
    np.testing.assert_array_equal(streamed, ref)
    assert np.abs(sparse - ref).max() > 0  # without it the prompt is sparse: not the stock numbers
    assert st["stream_prefill_bytes"] >= minimum // 2 and not st["stream_dense"] and not st["error"]
    assert st["predicted_density"] < 1.0 and st["cache_hits"] + st["cache_misses"] > 0  # decode: sparse
    assert st0["stream_prefill_bytes"] == 0 and split["prompt_staging"] == minimum


def test_gguf_rewritten_under_a_streaming_model_is_a_clear_error(packed, tmp_path):
    """The streamed layers are read from the GGUF every batch: a file rewritten in place since load
    (size, mtime or inode changed) is an error naming it, not numbers from whatever is there now."""
    import os
    import shutil
    from ripple_gguf.pack import pack_path_for
    src = packed("tiny-llama-swiglu", "f16")
    path = tmp_path / "m.gguf"
    shutil.copy(src, path)
    shutil.copy(pack_path_for(src), pack_path_for(path))
    _, minimum = stream_layout(str(path))
    llm = RippleLlama(path, stream_dense=True, cache_size=minimum, **KW)
    llm.create_completion("Once", max_tokens=2)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(RippleError, match=f"{path} changed on disk"):
        llm.create_completion("Once upon a time there", max_tokens=4)
    llm.close()
