"""The non-FFN weights held in memory, mapped, or partly each (llama-ripple-weights.cpp;
memory_budget.resident_weight_bytes), and the default split where memory is tight.

What is checked: held, mapped (with and without reading the next layer's mapped weights ahead) or the
largest tensor alone held, the logits are bit-identical to stock (F16, streamed FFN); the runtime says
how many bytes it holds and maps, and an untied token embedding is never held; with default settings
where not all of them fit, as many as fit are held and llama.cpp's batches shrink so that its compute
buffer leaves them room.
"""
from __future__ import annotations

import numpy as np
import pytest

import ripple_gguf.memory_budget as mb
from ripple_gguf.gguf_io import open_header
from ripple_gguf.memory_budget import stream_layout
from ripple_gguf.runtime import TIGHT_UBATCH, RippleLlama

from conftest import FIXTURES, all_logits, prompts
from test_runtime import chunked_logits

KW = dict(n_ctx=256, n_threads=2, seed=0, verbose=False)
ALIGN = 64  # each held tensor's start in the runtime's buffer


def holdable(path) -> dict[str, int]:
    """Bytes of every non-FFN tensor the runtime may hold (an untied token embedding: never)."""
    tensors = {t.name: int(t.n_bytes) for t in open_header(str(path)).tensors}
    ffn = ("ffn_gate", "ffn_up", "ffn_down")
    out = {n: b for n, b in tensors.items() if not (n.startswith("blk.") and n.split(".")[2] in ffn)}
    if "output.weight" in tensors:
        out.pop("token_embd.weight", None)
    return out


def padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@pytest.mark.parametrize("model", FIXTURES)
def test_held_mapped_or_partly_held_weights_compute_the_same(packed, model):
    path = packed(model, "f16")
    dense = RippleLlama(path, dense=True, logits_all=True, **KW)
    ps = prompts(dense, n=2, length=40)
    ref = (all_logits(dense, ps), chunked_logits(dense, ps, 1))
    dense.close()
    sizes = holdable(path)
    total, largest = sum(sizes.values()), max(sizes.values())
    cases = [  # (resident_weights, read ahead, bytes held, description)
        (True, True, sum(map(padded, sizes.values())), "resident"),
        (False, True, 0, "mapped"),
        (False, False, 0, "mapped"),
        (padded(largest), True, padded(largest), "partly resident"),  # the largest tensor alone
    ]
    for asked, ahead, held, desc in cases:
        llm = RippleLlama(path, stream_dense=True, cache_ratio=1.0, resident_weights=asked, read_ahead=ahead,
                          logits_all=True, **KW)
        st = llm.ripple_stats()
        got = (all_logits(llm, ps), chunked_logits(llm, ps, 1))
        non_ffn = llm.ripple_non_ffn
        llm.close()
        what = (model, asked, ahead)
        assert non_ffn.startswith(desc), what
        assert st["pinned_weight_bytes"] == held, what
        assert st["mapped_weight_bytes"] == total - (total if held and desc == "resident" else 0) - \
            (largest if desc == "partly resident" else 0), what
        assert not st["error"] and st["stream_dense"], what
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, b, err_msg=str(what))


def test_tight_default_holds_what_fits_and_shrinks_llamas_batches(packed, monkeypatch):
    """Default budget settings with less memory than the non-FFN weights need with the usual allowances: the
    split is made for TIGHT_UBATCH-token batches (llama.cpp's compute buffer is sized for its largest),
    about half the non-FFN weights are held (the room the margins leave), the rest mapped, and it runs."""
    path = packed("tiny-llama-swiglu", "f16")
    whole, minimum = stream_layout(str(path))
    # the fixture's non-FFN weights (~1 MiB) are smaller than the page-cache floor and the streamed path's
    # runtime relief: scaled down, so that half of them fit (else all or none would, see the test below)
    monkeypatch.setattr(mb, "PAGE_CACHE_FLOOR", 2**16)
    monkeypatch.setattr(mb, "_runtime_mapped", lambda r: mb.STREAMED_RUNTIME)
    monkeypatch.setattr(mb, "available_memory", lambda: (2**33, "8 GiB"))
    _, split = mb.default_cache_budget(str(path), KW["n_ctx"], whole, minimum, 0, n_ubatch=TIGHT_UBATCH)
    half = split["non_ffn_weights"] // 2
    avail = mb.mapped_pack_need(split) + mb.PAGE_CACHE_FLOOR + half
    monkeypatch.setattr(mb, "available_memory", lambda: (avail, "a tight test limit"))
    # (stream_dense=True: the fixture is so small that the whole model fits, where defaults run stock)
    llm = RippleLlama(path, stream_dense=True, **KW)
    st, split, non_ffn = llm.ripple_stats(), llm.ripple_budget_split, llm.ripple_non_ffn
    ubatch = llm.context_params.n_ubatch
    text = llm.create_completion("def ", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    llm.close()
    assert st["mode"] == "sparse" and st["stream_dense"] and not st["error"] and text
    assert split["n_ubatch"] == TIGHT_UBATCH == ubatch and split["below_minimum"]
    assert non_ffn.startswith("partly resident"), non_ffn
    assert 0 < st["pinned_weight_bytes"] <= half and st["mapped_weight_bytes"] > 0
    assert split["cache"] == minimum and st["cache_bytes"] <= minimum and st["resident_layers"] == 0
    # the caller's own batch size is kept: then the split counts its compute buffer, and nothing fits
    llm = RippleLlama(path, stream_dense=True, n_ubatch=512, **KW)
    assert llm.ripple_budget_split["n_ubatch"] == 512 and llm.context_params.n_ubatch > TIGHT_UBATCH
    llm.close()


@pytest.mark.parametrize("streamed", [True, False])
def test_tight_split_gives_the_cache_what_no_mapped_rest_needs(streamed):
    """In a tight split where every non-FFN weight fits beside the minimum cache, the room the
    allowances keep for a mapped rest's page cache (and, streamed, for the pack path's runtime buffers)
    goes to the FFN cache: at 75% of SmolLM2 Q4_1 the defaults held every weight beside a 3.2 MiB cache,
    23.7 tok/s; with that room in the cache 32.8-33.8 in the same cgroup. One MiB more cache and a
    weight would have to be mapped, with the page-cache floor again."""
    from ripple_gguf import memory_budget as mb
    mib = 2**20  # (80 MiB: the margin's floor, MARGIN_MIN, binds at both caches below)
    split = {"available": 80 * mib, "non_ffn_weights": 40 * mib, "kv_cache": 10 * mib, "compute": 10 * mib,
             "minimum": 3 * mib, "predictors": 0, "streamed": streamed, "ffn_room": -1, "runtime_mapped": 4 * mib}
    extra = mb._cache_beside_all_weights(split)
    before = split["available"] - mb.mapped_pack_need(split) - mb.PAGE_CACHE_FLOOR - split["non_ffn_weights"]
    assert extra - before == mb.PAGE_CACHE_FLOOR + (split["runtime_mapped"] - mb.STREAMED_RUNTIME if streamed else 0)
    cache = split["minimum"] + extra
    assert mb.resident_weight_bytes(split, cache) == split["non_ffn_weights"]
    assert mb.resident_weight_bytes(split, cache + mib) <= split["non_ffn_weights"] - mb.PAGE_CACHE_FLOOR


def test_more_memory_never_gives_a_smaller_cache(packed, monkeypatch):
    """Default settings: where the usual allowances (runtime 32 MiB, headroom >= 64 MiB) leave room
    beyond the minimum cache, the cache is still at least what the tight split's margins give with every
    non-FFN weight held. It was less: a 0.5B-shaped Q8_0 at 75% of its size got a 64 MiB cache (2 of 24
    layers held, ~6 tok/s) where the same rule a little tighter gave 137 MiB (8 layers, ~10 tok/s). A
    --memory-budget, which also counts this process, keeps the usual allowances."""
    from ripple_gguf import memory_budget as mb
    path = str(packed("tiny-llama-swiglu", "f32"))
    whole, minimum = mb.stream_layout(path)
    _, other = mb.gguf_ffn_split(path)
    n_ctx = KW["n_ctx"]
    usual = other + mb.kv_cache_bytes(path, n_ctx) + mb.llama_compute_bytes(path, n_ctx) + mb.RUNTIME_ALLOWANCE
    avail = usual + mb.HEADROOM_MIN + minimum + (whole - minimum) // 4  # the usual rule: a quarter more than the minimum
    monkeypatch.setattr(mb, "available_memory", lambda: (avail, "a test limit"))
    cache, split = mb.default_cache_budget(path, n_ctx, whole, minimum, 0, streamed=True)
    beside = minimum + mb._cache_beside_all_weights(split)
    assert not split["below_minimum"] and beside > minimum + (whole - minimum) // 4
    assert cache == min(whole, beside) and mb.resident_weight_bytes(split, cache) == other
    given, _ = mb.default_cache_budget(path, n_ctx, whole, minimum, 0, total=avail, streamed=True)
    assert given == minimum + (whole - minimum) // 4
    # and from the tight split up, every step of memory gives at least the cache the step before
    caches = []
    for extra in range(0, 128 << 20, 4 << 20):
        monkeypatch.setattr(mb, "available_memory", lambda e=extra: (other + (16 << 20) + e, "a test limit"))
        caches.append(mb.default_cache_budget(path, n_ctx, whole, minimum, 0, streamed=True)[0])
    assert all(b >= a for a, b in zip(caches, caches[1:])), caches
