"""The neuron-cache size: the memory budget (--memory-budget: everything the process may use; by
default what the machine or its memory cgroup has left) minus what the process needs besides the cache.

Without `--memory-budget` the cache used to be the whole FFN plus a warm preload: in a cgroup smaller
than the model the one case this project exists for was OOM-killed. Now the default is

    available (the tightest of MemAvailable and every memory cgroup limit above this process)
  - non-FFN weights (read into memory where they fit, see non_ffn_fits: mapped, page-cache pressure
    thrashes them every token)
  - KV cache (f16 K and V for n_ctx tokens) and llama.cpp's compute buffers (llama_compute_bytes)
  - predictors and runtime metadata
  - headroom (10% of what is available, at least 64 MiB: the Python process, page cache of reads)

clamped to [one layer's working set, the whole FFN], so a machine with room to spare caches
everything, and one without it streams from the pack. Where the non-FFN weights cannot be resident,
split["mapped_fits"] says whether the pack path can still run with them mapped (mapped_pack_fits).
"""
from __future__ import annotations

import os

from .cgroup import available_memory
from .errors import RippleError
from .gguf_io import ffn_weight_bytes, kv, open_header, read_ffn_layout

MIB = 2**20
RUNTIME_ALLOWANCE = 32 * MIB   # staging, plan buffers, I/O threads' stacks
# the same, counted tightly where the weights stay mapped (runtime_mapped): each reader's O_DIRECT staging
# (520 KiB, the library's default 4 readers), the merge-gap buffer (<= 1 MiB), per-neuron tables (18 bytes
# a neuron, 24 counted) and cache slots. Measured on SmolLM2 Q4_1 without O_DIRECT: 0.9 MiB beside its
# cache and predictors (overhead_bytes); counted 4.1 MiB. It used to be a flat 8 MiB.
IO_READERS, IO_STAGING, GAP_BUFFER, PER_NEURON = 4, 520 * 1024, MIB, 24
STREAMED_RUNTIME = 2 * MIB     # the streamed FFN's own, beside its staging buffers (those are its cache)


HEADROOM_MIN, HEADROOM_SHARE = 64 * MIB, 0.10  # the Python process, the page cache of our reads
# At a sparse point, prompt batches of at least this many tokens compute the dense FFN from the GGUF's own
# tensors, each layer read whole into one of two staging buffers counted here (params.stream_prefill_tokens):
# their union of active neurons is most of each layer (crossover measured: README "Running sparse from flash")
STREAM_PREFILL_TOKENS = 32
STREAM_CHUNK = 2 * MIB  # the streamed FFN's smallest staging buffer (llama-ripple-stream.cpp, RIPPLE_STREAM_CHUNK)
PAGE = 4096
UNIT_ROWS = 32  # a chunked layer's units are multiples of this many rows (RIPPLE_UNIT_ROWS)


def _runtime_mapped(r) -> int:
    return IO_READERS * IO_STAGING + GAP_BUFFER + PER_NEURON * sum(read_ffn_layout(r).n_ff)


def headroom(total: int) -> int:
    return max(HEADROOM_MIN, int(total * HEADROOM_SHARE))


def _ffn_bytes(r) -> int:
    return sum(ffn_weight_bytes(r, read_ffn_layout(r).n_layer))


def _streamed_layers(r, n_layer: int) -> list[int]:
    return [b + 3 * 3 * PAGE for b in ffn_weight_bytes(r, n_layer)]


def prompt_staging_bytes(path: str) -> int:
    """The staging buffers of prompt batches streamed beside the pack (params.stream_prefill_tokens):
    two whole layers, as stream_layout counts them."""
    r = open_header(path)
    return 2 * max(_streamed_layers(r, read_ffn_layout(r).n_layer))


def stream_layout(path: str, chunk_bytes: int | None = None) -> tuple[int, int]:
    """(bytes of every layer's FFN, the least the streamed dense FFN accepts: two staging buffers) as
    llama-ripple-stream.cpp lays them out: each layer's gate/up/down read in 4 KiB-aligned ranges,
    tensors at most a page apart merged (counted here at their widest: three extra pages per tensor).
    A buffer is at most a layer, at least STREAM_CHUNK (`chunk_bytes`, params.stream_chunk_bytes)
    and UNIT_ROWS rows of gate and up (of down) with their pages: a layer larger than the buffers is
    read and computed in row chunks that fit one."""
    r = open_header(path)
    layout = read_ffn_layout(r)  # (2-D gate/up/down that agree on n_ff, or an error)
    layers = _streamed_layers(r, layout.n_layer)
    tensors = {t.name: t for t in r.tensors}

    def rows(il: int, kind: str, n: int) -> int:  # bytes of n rows of a layer's FFN tensor (0: none)
        t = tensors.get(f"blk.{il}.{kind}.weight")
        return 0 if t is None else n * (int(t.n_bytes) // int(t.shape[1]))

    unit = max(max(rows(il, "ffn_gate", g) + rows(il, "ffn_up", g) + 4 * PAGE, rows(il, "ffn_down", d) + 2 * PAGE)
               for il, g, d in ((il, min(UNIT_ROWS, ff), min(UNIT_ROWS, layout.n_embd))
                                for il, ff in enumerate(layout.n_ff)))
    smallest = -(-max(unit, chunk_bytes or STREAM_CHUNK) // PAGE) * PAGE
    return sum(layers), 2 * min(max(layers), smallest)


def gguf_ffn_split(path: str) -> tuple[int, int]:
    """(FFN weight bytes, everything else in the file) of a GGUF (header only: this runs on the load path)."""
    ffn = _ffn_bytes(open_header(path))
    return ffn, os.path.getsize(path) - ffn


def _kv_bytes(r, n_ctx: int) -> int:
    arch = kv(r, "general.architecture", "llama")
    n_layer = int(kv(r, f"{arch}.block_count", 0) or 0)
    n_embd = int(kv(r, f"{arch}.embedding_length", 0) or 0)
    heads = int(kv(r, f"{arch}.attention.head_count", 0) or 0)
    heads_kv = int(kv(r, f"{arch}.attention.head_count_kv", heads) or heads)
    width = n_embd * heads_kv // heads if heads else n_embd
    if n_ctx <= 0:  # llama.cpp's "the model's own context"
        n_ctx = int(kv(r, f"{arch}.context_length", 4096) or 4096)
    return 2 * 2 * n_layer * n_ctx * width


# llama.cpp's own memory beside its weights and KV cache, as a stock run through llama-cpp-python holds
# it. Measured (RssAnon growth of a load, a 64-token prompt and 16 decodes, less the KV cache, which is
# zeroed at load) on nine GGUFs, and fitted: ~3 MiB, 166 bytes a tokenizer piece and 125 a BPE merge
# (what the load keeps of the vocabulary), 60 KiB a layer, and a 64-token prompt's activations and one
# row of logits. Measured (estimate): the 1,024-piece fixture 3.7 MiB (3.9); a TinyStories-sized model
# (n_embd 288, 6 layers) with Llama-2's 32,000 pieces 9.4 (9.5), with Llama-3's 128,256 pieces and
# 280,147 merges 56.4 (58.5), with Qwen2's 151,936 and 151,387 46.7 (47.0) (the tokenizers of llama.cpp's
# models/ggml-vocab-*.gguf); SmolLM2 (49,152 and 48,901) 22.4 (20.4), its dimensions with Llama-2's
# pieces 11.8 (11.8); a 0.5B Qwen2 shape with 151,936 pieces and no merges 33.1 (33.2). A flat 16 MiB
# used to stand for all of it: 7 MiB too much for the TinyStories-sized model, whose defaults then
# streamed its FFN in a cgroup where stock runs at full speed (104 vs 403 tok/s), 6-40 MiB too little
# for SmolLM2 and larger vocabularies. Lines measured before: SmolLM2 F16 in a cgroup of stock's own
# size runs stock at full speed with 24 MiB to spare, and counted as not fitting there the runtime
# streamed part of its FFN at 0.25x (its estimate must stay below 24 MiB); the 0.5B shape at a 2048
# context re-read its weights with 14 MiB to spare (its estimate must stay above 14).
STOCK_FIXED, STOCK_PER_PIECE, STOCK_PER_MERGE, STOCK_PER_LAYER = 3 * MIB, 166, 125, 60 * 1024
STOCK_TOKENS = 64


def _llama_held(r) -> int:
    """What llama.cpp holds from the load on, whatever it computes: the vocabulary, per-layer state."""
    vocabulary = STOCK_PER_PIECE * r.count("tokenizer.ggml.tokens") + STOCK_PER_MERGE * r.count("tokenizer.ggml.merges")
    return STOCK_FIXED + vocabulary + STOCK_PER_LAYER * read_ffn_layout(r).n_layer


def _activations(r, tokens: int, n_ctx: int, logits_rows: int) -> int:
    """f32 activations of a batch of `tokens` as llama.cpp's compute buffers touch them: FFN
    intermediates and residual copies, attention scores against `n_ctx` cached tokens (scores and
    softmax), `logits_rows` rows of logits."""
    arch = kv(r, "general.architecture", "llama")
    n_embd = int(kv(r, f"{arch}.embedding_length", 0) or 0)
    heads = int(kv(r, f"{arch}.attention.head_count", 1) or 1)
    n_ff = max(read_ffn_layout(r).n_ff)
    n_vocab = next((int(t.shape[1]) for t in r.tensors if t.name == "token_embd.weight" and len(t.shape) > 1), 0)
    return 4 * (tokens * (2 * n_ff + 8 * n_embd) + 2 * tokens * n_ctx * heads + logits_rows * n_vocab)


def _stock_own(r) -> int:
    return _llama_held(r) + _activations(r, STOCK_TOKENS, 0, 1)


def _llama_compute_bytes(r, n_ctx: int, n_ubatch: int, logits_all: bool) -> int:
    """What llama.cpp (and llama-cpp-python) allocate besides weights and KV cache, touched at worst:
    one ubatch's activations against a full context, the logits (every token's with logits_all, in
    llama.cpp's buffer and llama-cpp-python's n_ctx x n_vocab array) and what the load keeps of the
    vocabulary and per layer (_llama_held, the part of stock_own that does not depend on the batch)."""
    if n_ctx <= 0:
        arch = kv(r, "general.architecture", "llama")
        n_ctx = int(kv(r, f"{arch}.context_length", 4096) or 4096)
    ub = max(1, min(n_ubatch, n_ctx))
    return _activations(r, ub, n_ctx, ub + n_ctx if logits_all else 2) + _llama_held(r)


def llama_compute_bytes(path: str, n_ctx: int, n_ubatch: int = 512, logits_all: bool = False) -> int:
    return _llama_compute_bytes(open_header(path), n_ctx, n_ubatch, logits_all)


def kv_cache_bytes(path: str, n_ctx: int) -> int:
    """f16 K and V of every layer for n_ctx tokens (grouped-query heads counted when the GGUF says)."""
    return _kv_bytes(open_header(path), n_ctx)


def default_cache_budget(model_path: str, n_ctx: int, ffn_pack_bytes: int, minimum: int,
                         predictor_bytes: int, total: int | None = None, n_ubatch: int = 512,
                         logits_all: bool = False, staging: int = 0, streamed: bool = False) -> tuple[int, dict]:
    """(cache bytes, the split as a dict for `run --verbose`/--json). `total` (--memory-budget): what
    the whole process may use, split the same way instead of the available memory; RippleError when
    it cannot hold even the tight split's unreclaimable parts (mapped_pack_fits). split["ffn_room"] is what is left
    for FFN weights of any kind (the neuron cache and predictors, or the GGUF's own FFN on the stock
    path), next to split["gguf_ffn"]."""
    avail, source = budget_or_available(total)
    r = open_header(model_path)
    ffn = _ffn_bytes(r)
    other, kv_bytes = os.path.getsize(model_path) - ffn, _kv_bytes(r, n_ctx)
    compute = _llama_compute_bytes(r, n_ctx, n_ubatch, logits_all)
    split = {"available": avail, "available_from": source, "non_ffn_weights": other, "gguf_ffn": ffn,
             "kv_cache": kv_bytes, "compute": compute + staging, "runtime": RUNTIME_ALLOWANCE + predictor_bytes,
             "predictors": predictor_bytes, "minimum": minimum, "prompt_staging": staging, "streamed": streamed,
             "stock_own": _stock_own(r), "runtime_mapped": _runtime_mapped(r)}
    if avail is None:
        split.update(headroom=0, ffn_room=None, cache=ffn_pack_bytes, note="available memory unknown: the whole FFN")
        return ffn_pack_bytes, split
    compute += staging  # prompt batches streamed beside the pack: two layers of the GGUF's FFN
    fixed = other + kv_bytes + compute + RUNTIME_ALLOWANCE
    room = avail - fixed - headroom(avail)
    left = room - predictor_bytes
    cache = int(min(ffn_pack_bytes, max(minimum, left)))
    split.update(headroom=headroom(avail), ffn_room=room, cache=cache)
    split["below_minimum"] = left < minimum
    # the tight split's cache: the minimum, and beyond it what still leaves every non-FFN weight held
    tight = int(min(ffn_pack_bytes, minimum + max(0, _cache_beside_all_weights(split))))
    if left >= minimum and total is None and tight > cache:
        # the usual allowances (runtime 32 MiB, headroom >= 64 MiB) can leave less cache than the tight
        # split's margins with every non-FFN weight still held: more memory gave a smaller cache (a 0.5B-
        # shaped Q8_0 at 75% of its size: 64 MiB, 2 of 24 layers held, 5.7-6.5 tok/s; now 137 MiB, 8
        # layers, 9.2-10.6). Not for a given --memory-budget: it also counts this Python process, which
        # the available memory (measured from inside it) does not, and the headroom covers
        cache = split["cache"] = tight
        split["note"] = "the tight split's margins, every non-FFN weight held: the usual allowances left less"
    split["mapped_fits"] = mapped_pack_fits(split)
    if left < minimum and total is not None and not split["mapped_fits"]:
        need = mapped_pack_need(split)
        given = f"{total / MIB:.0f} MiB" if total >= MIB else f"{total} bytes"
        raise RippleError(f"memory budget {given} cannot hold what the runtime cannot give back "
                          f"(KV cache {kv_bytes / MIB:.0f} MiB for {n_ctx} tokens, compute and runtime "
                          f"{(compute + split['runtime_mapped'] + predictor_bytes) / MIB:.0f} MiB, the minimum neuron cache "
                          f"{minimum / MIB:.1f} MiB, a 10% margin), even with the non-FFN weights "
                          f"({other / MIB:.0f} MiB) mapped: pass --memory-budget {-(-need // MIB)}MiB or more, "
                          f"or a smaller --ctx")
    if left < minimum:
        # tight: the minimum cache, the non-FFN weights held as far as the unreclaimable parts' margins
        # allow (resident_weight_bytes), and the cache gets what is left once all of them are. A given
        # budget splits the same way as the available memory does (it used to be refused below the
        # usual allowances, where default settings in a cgroup of that size ran)
        cache = split["cache"] = tight
        held = resident_weight_bytes(split, cache)
        split["note"] = ("less memory than the non-FFN weights and a neuron cache need with the usual allowances: "
                         + ("all non-FFN weights held" if held >= other else
                            f"{held / MIB:.0f} MiB of the non-FFN weights held, the rest mapped" if held else
                            "non-FFN weights mapped") + ", the minimum cache"
                         + (f" and {(cache - minimum) / MIB:.0f} MiB more" if cache > minimum else ""))
    return cache, split


def budget_or_available(total: int | None) -> tuple[int | None, str]:
    """(bytes, where from): the --memory-budget given, else what the machine or its memory cgroup has."""
    return available_memory() if total is None else (total, "--memory-budget")


def stock_own(path: str) -> int:
    """What llama.cpp (and llama-cpp-python) hold beside the weights and the KV cache on the stock path,
    for this GGUF (its tokenizer, a prompt's activations and logits): see STOCK_FIXED."""
    return _stock_own(open_header(path))


def stock_need(weights: int, kv_bytes: int, own: int) -> int:
    """What the stock path needs to run without re-reading its weights: all of them in the page cache,
    the KV cache and llama.cpp's own memory `own` (stock_own; model_fits and whole_model_fits both ask this)."""
    return weights + kv_bytes + own


def model_fits(path: str, n_ctx: int, total: int | None = None, own_twice: bool = False) -> bool:
    """Does stock_need fit in `total`, else in the memory available (True where that is unknown)?
    whole_model_fits, before any split is made; `own_twice`: with llama.cpp's own memory to spare."""
    avail = budget_or_available(total)[0]
    if avail is None:
        return True
    r = open_header(path)
    own = _stock_own(r)
    return stock_need(os.path.getsize(path), _kv_bytes(r, n_ctx), own) + (own if own_twice else 0) <= avail


def whole_model_fits(split: dict) -> bool:
    """Would the GGUF with every weight in memory (the stock path, its weights in the page cache) fit
    where this split was made? stock_need against what is available: llama.cpp's
    compute buffers are counted at their worst elsewhere, but a decode touches little of them, and stock falls
    off a cliff only once its weights do not fit (SmolLM2 Q4_1 in a cgroup of exactly its weights plus
    its measured overhead: stock 88 tok/s; at 75% of its weights: 9.8, where the pack path ran 16-20)."""
    return (split.get("available") is not None and
            stock_need(split["non_ffn_weights"] + split["gguf_ffn"], split["kv_cache"], split["stock_own"])
            <= split["available"])


def mapped_pack_fits(split: dict) -> bool:
    """Can the pack path run with its non-FFN weights mapped and the minimum neuron cache where this
    split was made? What the kernel cannot reclaim (KV cache, compute buffers at their worst, the
    minimum cache, predictors, runtime buffers) must fit with a 10% margin (at least MARGIN_MIN); the
    mapped weights are page cache, as all of stock llama.cpp's are. Such a run reads no more per token
    than stock (whose page cache must hold the FFN too) and reads the FFN in merged direct reads:
    SmolLM2 Q4_1 at a dense point, 50% of its size in a cgroup: 12.0 vs 4.8 tok/s; at 35%, where the
    margin says no, it would have been 3.3 vs 4.3."""
    return split.get("available") is not None and mapped_pack_need(split) <= split["available"]


# the unreclaimable parts' margin: max(4 MiB, a tenth of them). It was at least 8 MiB while the parts
# counted a flat 8 MiB for llama.cpp's vocabulary (SmolLM2's holds 17 MiB, a 1,024-piece one 0.2) and 8
# for the runtime's buffers; now each is counted for the model (_llama_held fits nine GGUFs within 2.1 MiB)
MARGIN_MIN, MARGIN_SHARE = 4 * MIB, 10


def _unreclaimable(split: dict, cache: int | None = None) -> int:
    """What the kernel cannot reclaim on the pack path with a neuron cache of `cache` bytes (default the
    minimum): KV cache, compute buffers at their worst, the cache, predictors, runtime buffers."""
    return (split["kv_cache"] + split["compute"] + (split["minimum"] if cache is None else cache)
            + split["predictors"] + split["runtime_mapped"])


def mapped_pack_need(split: dict, cache: int | None = None) -> int:
    """The memory mapped_pack_fits asks for: the unreclaimable parts plus their margin."""
    fixed = _unreclaimable(split, cache)
    return fixed + max(MARGIN_MIN, fixed // MARGIN_SHARE)


def non_ffn_fits(split: dict, cache: int) -> bool:
    """Can the non-FFN weights be read into memory (resident) next to a neuron cache of `cache` bytes
    where this split was made? The split already counts them as resident; this asks whether what is
    left after them still holds the predictors and the cache. Mapped instead, they are page cache
    that the pack's own memory pushes out: on SmolLM2 Q4_1 in a cgroup at half its size they were
    re-read every token (1.4-4.3 tok/s; resident 8.3 tok/s, stock 3.6-5.5)."""
    room = split.get("ffn_room")
    return room is not None and room - split.get("predictors", 0) >= cache


PAGE_CACHE_FLOOR = 4 * MIB  # left to the page cache the mapped rest of the non-FFN weights is faulted in through


def _all_held_relief(split: dict) -> int:
    """What mapped_pack_need counts that a streamed run does not use: the pack path's runtime buffers
    (the streamed FFN's staging is its cache)."""
    return split["runtime_mapped"] - STREAMED_RUNTIME if split.get("streamed") else 0


def _cache_beside_all_weights(split: dict) -> int:
    """In a tight split, the FFN cache beyond the minimum that still leaves every non-FFN weight held
    (<= 0: not even all of them fit beside the minimum): the largest s with
    mapped_pack_need(minimum + s) - _all_held_relief <= available - non-FFN weights. With every weight
    held there is no mapped rest, so no PAGE_CACHE_FLOOR: at 75% of SmolLM2 Q4_1 the allowances left
    ~20 MiB unused beside the minimum cache (23.7 tok/s); given to the cache, 32.8-33.8 (same cgroup)."""
    room = split["available"] - split["non_ffn_weights"] + _all_held_relief(split)
    fixed = _unreclaimable(split)  # mapped_pack_need inverted: both the margin's floor and its share hold
    return int(min(room - MARGIN_MIN - fixed, room * MARGIN_SHARE / (MARGIN_SHARE + 1) - fixed))


def resident_weight_bytes(split: dict, cache: int) -> int:
    """How many bytes of non-FFN weights to hold in memory next to a neuron cache of `cache` bytes (the
    runtime holds the largest tensors that fit, the rest stays mapped: llama-ripple-weights.cpp). All of
    them where non_ffn_fits; else as many as the room mapped_pack_fits leaves beside the unreclaimable
    parts and their margin, less PAGE_CACHE_FLOOR. Held, they are never re-read; mapped, a per-token
    sweep larger than what the page cache keeps re-reads all of them: SmolLM2 Q4_1 in a cgroup at half
    its size, 1.5 MiB more room took a run from 17 to 26 tok/s."""
    if non_ffn_fits(split, cache):
        return split["non_ffn_weights"]
    if split.get("available") is None:
        return 0
    room = split["available"] - mapped_pack_need(split, cache)
    if room + _all_held_relief(split) >= split["non_ffn_weights"]:
        return split["non_ffn_weights"]
    return int(min(split["non_ffn_weights"], max(0, room - PAGE_CACHE_FLOOR)))


def describe(split: dict) -> str:
    """One line for `run --verbose`: how the default cache size came about."""
    mib = lambda b: f"{b / MIB:.0f} MiB"
    if split.get("available") is None:
        return f"memory budget: {split.get('note')}"
    given = split["available_from"] == "--memory-budget"
    line = (f"memory budget{'' if given else ' (default)'}: {mib(split['available'])} {'given' if given else 'available'} ({split['available_from']}) - "
            f"non-FFN weights {mib(split['non_ffn_weights'])} - KV cache {mib(split['kv_cache'])} - compute "
            f"{mib(split['compute'])} - runtime {mib(split['runtime'])} - headroom {mib(split['headroom'])} "
            f"-> neuron cache {mib(split['cache'])}")
    if split.get("n_ubatch") and split["n_ubatch"] != 512:
        line += f"; compute counted for llama.cpp batches of {split['n_ubatch']} tokens"
    return line + (f" ({split['note']})" if split.get("note") else "")
