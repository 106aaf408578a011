"""The neuron-cache size: the memory budget (--memory-budget: everything the process may use; by
default what the machine or its memory cgroup has left) minus what the process needs besides the cache.

Without `--memory-budget` the cache used to be the whole FFN plus a warm preload: in a cgroup smaller
than the model the one case this project exists for was OOM-killed. Now the default is

    available (the tightest of MemAvailable and every memory cgroup limit above this process)
  - non-FFN weights (kept resident: llama.cpp maps them; page-cache pressure must not thrash them)
  - KV cache (f16 K and V for n_ctx tokens) and a compute-buffer allowance
  - predictors and runtime metadata
  - headroom (10% of what is available, at least 64 MiB: the Python process, page cache of reads)

clamped to [one layer's working set, the whole FFN], so a machine with room to spare caches
everything, and one without it streams from the pack.
"""
from __future__ import annotations

import os

from .cgroup import available_memory
from .errors import RippleError
from .gguf_io import ffn_weight_bytes, kv, open_header, read_ffn_layout

MIB = 2**20
COMPUTE_ALLOWANCE = 64 * MIB   # llama.cpp compute buffers + logits at the default batch (SmolLM2 measured: ~20-40 MiB)
RUNTIME_ALLOWANCE = 32 * MIB   # staging, plan buffers, I/O threads' stacks


def gguf_ffn_split(path: str) -> tuple[int, int]:
    """(FFN weight bytes, everything else in the file) of a GGUF (header only: this runs on the load path)."""
    r = open_header(path)
    ffn = sum(ffn_weight_bytes(r, read_ffn_layout(r).n_layer))
    return ffn, os.path.getsize(path) - ffn


def kv_cache_bytes(path: str, n_ctx: int) -> int:
    """f16 K and V of every layer for n_ctx tokens (grouped-query heads counted when the GGUF says)."""
    r = open_header(path)
    arch = kv(r, "general.architecture", "llama")
    n_layer = int(kv(r, f"{arch}.block_count", 0) or 0)
    n_embd = int(kv(r, f"{arch}.embedding_length", 0) or 0)
    heads = int(kv(r, f"{arch}.attention.head_count", 0) or 0)
    heads_kv = int(kv(r, f"{arch}.attention.head_count_kv", heads) or heads)
    width = n_embd * heads_kv // heads if heads else n_embd
    if n_ctx <= 0:  # llama.cpp's "the model's own context"
        n_ctx = int(kv(r, f"{arch}.context_length", 4096) or 4096)
    return 2 * 2 * n_layer * n_ctx * width


def default_cache_budget(model_path: str, n_ctx: int, ffn_pack_bytes: int, minimum: int,
                         predictor_bytes: int, total: int | None = None) -> tuple[int, dict]:
    """(cache bytes, the split as a dict for `run --verbose`/--json). `total` (--memory-budget): what
    the whole process may use, split the same way instead of the available memory; RippleError when
    it cannot hold the fixed parts plus one layer of neuron cache."""
    avail, source = available_memory() if total is None else (total, "--memory-budget")
    _, other = gguf_ffn_split(model_path)
    kv_bytes = kv_cache_bytes(model_path, n_ctx)
    split = {"available": avail, "available_from": source, "non_ffn_weights": other, "kv_cache": kv_bytes,
             "compute": COMPUTE_ALLOWANCE, "runtime": RUNTIME_ALLOWANCE + predictor_bytes}
    if avail is None:
        split.update(headroom=0, cache=ffn_pack_bytes, note="available memory unknown: the whole FFN")
        return ffn_pack_bytes, split
    headroom = max(64 * MIB, avail // 10)
    left = avail - other - kv_bytes - COMPUTE_ALLOWANCE - RUNTIME_ALLOWANCE - predictor_bytes - headroom
    if total is not None and left < minimum:
        fixed = other + kv_bytes + COMPUTE_ALLOWANCE + RUNTIME_ALLOWANCE + predictor_bytes + minimum
        need = int(max(fixed + 64 * MIB, fixed / 0.9)) + 1  # the headroom grows with the budget
        raise RippleError(f"memory budget {total / MIB:.0f} MiB cannot hold this model's fixed memory "
                          f"(non-FFN weights {other / MIB:.0f} MiB, KV cache {kv_bytes / MIB:.0f} MiB for {n_ctx} tokens, "
                          f"compute and runtime {(COMPUTE_ALLOWANCE + RUNTIME_ALLOWANCE + predictor_bytes) / MIB:.0f} MiB, "
                          f"headroom {headroom / MIB:.0f} MiB) plus one layer of neuron cache ({minimum / MIB:.1f} MiB): "
                          f"pass --memory-budget {-(-need // MIB)}MiB or more, or a smaller --ctx")
    cache = int(min(ffn_pack_bytes, max(minimum, left)))
    split.update(headroom=headroom, cache=cache)
    if left < minimum:
        split["note"] = "less memory than one layer's working set needs: running at the minimum cache"
    return cache, split


def whole_model_fits(model_path: str, n_ctx: int) -> tuple[bool, str]:
    """Does the whole GGUF (every weight resident), the KV cache and compute fit in what is available,
    with the same headroom as the default cache? (fits, a line saying so)."""
    avail, source = available_memory()
    if avail is None:
        return False, "available memory unknown"
    need = os.path.getsize(model_path) + kv_cache_bytes(model_path, n_ctx) + COMPUTE_ALLOWANCE + RUNTIME_ALLOWANCE
    headroom = max(64 * MIB, avail // 10)
    return need + headroom <= avail, (f"the whole model ({need / MIB:.0f} MiB with KV cache and compute) fits in "
                                      f"{avail / MIB:.0f} MiB available ({source})")


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
    return line + (f" ({split['note']})" if split.get("note") else "")
