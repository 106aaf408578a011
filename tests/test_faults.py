"""Faults while generating: read errors, a pack truncated, replaced or damaged under a running model,
a second context or a concurrent decode, a stale pack registered straight with the library.

What is checked: every one of them ends in an error that names the pack (RippleError in Python,
a non-zero llama_decode in C), never in text computed from zeroed or damaged FFN rows; the record
checks cost little next to decoding (the figure is printed).
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ripple_gguf.errors import RippleError
from ripple_gguf.pack import PACK_MIN_CHUNK, open_pack, pack_path_for
from ripple_gguf.runtime import RippleLlama, ripple_lib

from conftest import HELDOUT

# stream_prefill=0: these check the pack's reads, which prompt batches would otherwise leave to the
# streamed dense FFN (its read errors: test_stream.py)
KW = dict(n_ctx=512, n_threads=2, seed=0, verbose=False, stream_prefill=0)
PROMPT = HELDOUT.read_text()[:300]


@pytest.fixture
def model(converted, tmp_path) -> Path:
    """A private copy of a converted fixture and its pack (tests damage them)."""
    src = converted("tiny-llama-swiglu", "f16")
    dst = tmp_path / "m.gguf"
    shutil.copy(src, dst)
    shutil.copy(pack_path_for(src), pack_path_for(dst))
    return dst


def one_layer(path: Path) -> int:
    pk = open_pack(path)
    return max(pk.n_ff) * pk.bundle_bytes  # a cache of one layer: every token reads


def cache_for(path: Path, chunked: bool) -> int:
    """One layer, or less: each layer then planned in chunks of PACK_MIN_CHUNK (the fixture's n_ff is 512)."""
    return (PACK_MIN_CHUNK + 44) * open_pack(path).bundle_bytes if chunked else one_layer(path)


def tokens(llm, n: int) -> list[int]:
    out = []
    for t in llm.generate(llm.tokenize(PROMPT.encode()), temp=0.0, top_k=1):
        out.append(int(t))
        if len(out) >= n:
            return out
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_read_error_mid_generation_is_a_ripple_error_naming_the_pack(model, chunked):
    llm = RippleLlama(model, cache_size=cache_for(model, chunked), pin_percent=0, **KW)
    assert len(tokens(llm, 4)) == 4
    assert (llm.ripple_stats()["neuron_chunks"] > 0) == chunked
    assert ripple_lib().llama_ripple_inject_fault(llm.model, 3, errno.EIO) == 0
    with pytest.raises(RippleError, match=f"{pack_path_for(model)}.*(Input/output error|I/O error)"):
        tokens(llm, 8)
    with pytest.raises(RippleError):  # sticky: no later decode runs on a half-read cache
        llm.create_completion("x", max_tokens=2)
    llm.close()


@pytest.mark.parametrize("after_reads", [1, 2, 5])
def test_read_error_in_read_ahead_is_the_same_clear_error(model, after_reads):
    """Every neuron needed and a cache of two layers: each layer's misses are read ahead while the
    layer before computes, so the failing read runs on the read-ahead thread. The plan that takes it
    must fail the model as a read of its own would: an error naming the pack, sticky, no crash."""
    llm = RippleLlama(model, cache_size=2 * one_layer(model), pin_percent=0, all_active=True, warm_cache=False, **KW)
    assert len(tokens(llm, 3)) == 3
    assert llm.ripple_stats()["ahead_used"] > 0
    assert ripple_lib().llama_ripple_inject_fault(llm.model, after_reads, errno.EIO) == 0
    with pytest.raises(RippleError, match=f"{pack_path_for(model)}.*(Input/output error|I/O error)"):
        tokens(llm, 8)
    with pytest.raises(RippleError):
        llm.create_completion("x", max_tokens=2)
    llm.close()


def test_llama_decode_returns_nonzero_when_a_read_fails(model):
    """The C API: llama_decode reports the failure itself (-3) instead of returning zeroed FFNs."""
    import llama_cpp
    llm = RippleLlama(model, cache_size=one_layer(model), pin_percent=0, **KW)
    toks = llm.tokenize(PROMPT.encode())[:16]
    arr = (llama_cpp.llama_token * len(toks))(*toks)
    ctx = llm._ctx.ctx
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, 8)) == 0
    mem = llama_cpp.llama_get_memory(ctx)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 7
    ripple_lib().llama_ripple_inject_fault(llm.model, 0, errno.EIO)
    tail = (llama_cpp.llama_token * 8)(*toks[8:16])
    ret = llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tail, 8))
    err = ripple_lib().llama_ripple_last_error(llm.model).decode()
    print(f"llama_decode after an injected EIO: {ret} ({err})")
    assert ret == -3 and "Input/output error" in err and str(pack_path_for(model)) in err
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 7  # the failed batch left no KV entries behind
    assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tail, 8)) == -3  # and it stays failed
    llm.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_damaged_record_is_caught_when_first_read(model, chunked):
    pk = open_pack(model)
    il, p = 2, 300 if chunked else 77  # (chunked: in the layer's second chunk)
    with open(pk.path, "r+b") as f:  # one flipped bit in one record; the header and predictors are intact
        at = pk.bundle_offsets[il] + p * pk.layer_bundle_bytes[il] + 5
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x04]))
    llm = RippleLlama(model, all_active=True, warm_cache=False, pin_percent=0, **KW,  # loads; reads at first use
                      **({"cache_size": cache_for(model, True)} if chunked else {}))
    with pytest.raises(RippleError, match=f"layer {il} record {p} is damaged.*ripple-gguf verify"):
        llm.create_completion("def ", max_tokens=2)
    assert (llm.ripple_stats()["neuron_chunks"] > 0) == chunked
    llm.close()
    with pytest.raises(RippleError, match=f"layer {il} record {p} is damaged"):  # warm: caught while loading
        RippleLlama(model, all_active=True, **KW)


def test_pack_truncated_under_a_running_decode(model):
    pk = open_pack(model)
    llm = RippleLlama(model, cache_size=one_layer(model), pin_percent=0, **KW)
    result: dict = {}

    def generate():
        try:
            result["tokens"] = tokens(llm, 400)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            result["error"] = e

    t = threading.Thread(target=generate)
    t.start()
    while llm.ripple_stats()["tokens"] < 20 and t.is_alive():
        time.sleep(0.002)
    os.truncate(pk.path, pk.bundle_offsets[1])  # layers 1.. gone while tokens are being decoded
    at = llm.ripple_stats()["tokens"]
    t.join(timeout=120)
    assert not t.is_alive()
    print(f"truncated after {at} tokens: {result.get('error', result.get('tokens'))!r:.200}")
    assert isinstance(result.get("error"), RippleError), result
    assert "truncated" in str(result["error"]) and str(pk.path) in str(result["error"])
    llm.close()


def test_pack_replaced_mid_generation(model, converted):
    """Renamed over (the usual way to replace a file): the open pack is unaffected and the text is
    the same. Rewritten in place with another pack's bytes: the records fail their checksums."""
    other = pack_path_for(converted("tiny-arcee-relu2", "f16"))
    budget = one_layer(model)
    ref = RippleLlama(model, cache_size=budget, pin_percent=0, **KW)
    want = tokens(ref, 24)
    ref.close()
    llm = RippleLlama(model, cache_size=budget, pin_percent=0, **KW)
    first = tokens(llm, 4)
    tmp = model.with_name("new.ripple")
    shutil.copy(other, tmp)
    os.replace(tmp, pack_path_for(model))
    llm.reset()
    assert first == want[:4] and tokens(llm, 24) == want
    llm.close()
    shutil.copy(pack_path_for(converted("tiny-llama-swiglu", "f16")), pack_path_for(model))
    llm = RippleLlama(model, cache_size=budget, pin_percent=0, **KW)
    tokens(llm, 2)
    shutil.copyfile(other, pack_path_for(model))  # same inode, other bytes
    with pytest.raises(RippleError, match="damaged|truncated"):
        tokens(llm, 24)
    llm.close()


def test_second_context_on_a_ripple_model_is_refused(model):
    import llama_cpp
    llm = RippleLlama(model, stock_when_dense=False, **KW)  # the runtime at the default point
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 64
    assert not llama_cpp.llama_init_from_model(llm.model, params)  # NULL: refused, nothing shared
    assert llm.create_completion("def ", max_tokens=4)["choices"]  # the first context is unharmed
    llm.close()
    plain = RippleLlama(model, dense=True, **KW)  # the stock path is not limited
    ctx2 = llama_cpp.llama_init_from_model(plain.model, params)
    assert ctx2
    llama_cpp.llama_free(ctx2)
    plain.close()


def test_concurrent_decode_on_one_model_is_refused(model):
    llm = RippleLlama(model, **KW)
    started, release = threading.Event(), threading.Event()
    orig = type(llm).__mro__[1].eval

    def slow_eval(self, toks):  # hold a decode open so that a second one overlaps it
        started.set()
        release.wait(30)
        return orig(self, toks)
    errors = []
    try:
        type(llm).__mro__[1].eval = slow_eval
        t = threading.Thread(target=lambda: llm.eval(llm.tokenize(b"def ")))
        t.start()
        started.wait(30)
        try:
            llm.eval(llm.tokenize(b"x", add_bos=False))
        except RippleError as e:
            errors.append(str(e))
        release.set()
        t.join(30)
    finally:
        type(llm).__mro__[1].eval = orig
    assert errors and "another decode is running" in errors[0]
    llm.close()


def test_library_checks_the_binding_itself(model):
    """A pack of the right shape registered for a GGUF whose ripple index changed: refused in C."""
    from ripple_gguf.gguf_header import GGUFHeader
    import llama_cpp
    h = GGUFHeader(model)
    f = h.fields["ripple.blk.0.act_freq"]
    with open(model, "r+b") as fh:  # one act_freq value changes: a reconverted model, same shapes
        fh.seek(f.end - 4)
        fh.write(np.float32(0.123).tobytes())
    lib = ripple_lib()
    p = lib.llama_ripple_default_params()
    assert lib.llama_ripple_register(str(model).encode(), str(pack_path_for(model)).encode(), ctypes.byref(p)) == 0
    mp = llama_cpp.llama_model_default_params()
    m = llama_cpp.llama_model_load_from_file(str(model).encode(), mp)
    lib.llama_ripple_unregister(str(model).encode())
    assert not m
    assert "binding" in lib.llama_ripple_last_error(None).decode()


def test_record_checks_cost_little_next_to_decoding(model):
    """verify_seconds (checksums of records on their first read) against the decode time of 64 tokens
    from a cold cache (every record's first read falls inside the measured window), with a cache of
    one layer (every token reads ~ the whole FFN) and of half the FFN."""
    pk = open_pack(model)
    rows = []
    for name, budget in (("one layer", one_layer(model)), ("half the FFN", pk.ffn_pack_bytes // 2)):
        llm = RippleLlama(model, cache_size=max(budget, one_layer(model)), pin_percent=0, warm_cache=False,
                          io_threads=1, **KW)
        llm.ripple_reset_stats()
        t0 = time.perf_counter()
        n = len(tokens(llm, 64))
        dt = time.perf_counter() - t0
        st = llm.ripple_stats()
        llm.close()
        share = st["verify_seconds"] / dt
        rows.append((name, share))
        print(f"record checks, cold cache of {name}: {st['verify_seconds'] * 1e3:.2f} ms of {dt * 1e3:.0f} ms for {n} "
              f"tokens ({100 * share:.2f}%; {st['bytes_read'] / 2**20:.1f} MiB read, FFN {pk.ffn_pack_bytes / 2**20:.1f} MiB, "
              f"I/O {st['io_seconds'] * 1e3:.0f} ms)")
    assert all(share <= 0.02 for _, share in rows)
