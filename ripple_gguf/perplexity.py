"""Perplexity the way llama-perplexity measures it: independent chunks, each scored on its second half.

One implementation for `eval`, the benchmark and the operating-point measurement (quality.py)."""
from __future__ import annotations

import math

import numpy as np

from .errors import RippleError


def chunk_nll(logits, chunk: list[int], first: int, logits_start: int = 0) -> float:
    """Summed negative log-likelihood of chunk[first+1:] given the logits of positions first..n-2
    (row 0 of `logits` is position `logits_start`)."""
    n = len(chunk)
    lg = np.asarray(logits[first - logits_start:n - 1 - logits_start], dtype=np.float64)
    targets = np.asarray(chunk[first + 1:n])
    m = lg.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=1))
    return float(np.sum(lse - lg[np.arange(len(targets)), targets]))


def ppl_from_nll(nll: float, count: int) -> float:
    """exp(mean NLL); inf where that overflows (a damaged model's losses can be astronomical)."""
    mean = nll / max(count, 1)
    return math.exp(mean) if mean < 700 else math.inf


def perplexity(llm, tokens: list[int], n_ctx: int, bos: int | None, max_chunks: int | None = None,
               progress=None) -> tuple[float, int]:
    """llama-perplexity's measure on a `llama_cpp.Llama`: independent n_ctx chunks (first token
    replaced by BOS), each scored on its second half. Returns (perplexity, scored tokens)."""
    n_chunk = len(tokens) // n_ctx
    if max_chunks:
        n_chunk = min(n_chunk, max_chunks)
    if n_chunk < 1:
        raise RippleError(f"the text has {len(tokens)} tokens, fewer than one chunk of --ctx {n_ctx}; "
                          "pass a longer --text or a smaller --ctx")
    nll, count = 0.0, 0
    first = n_ctx // 2
    for c in range(n_chunk):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        nll += chunk_nll(llm.scores, chunk, first)
        count += len(chunk) - 1 - first
        if progress:
            progress(c + 1, n_chunk, ppl_from_nll(nll, count))
    return ppl_from_nll(nll, count), count
