"""Where calibration tokens come from: the user's text files, or text the model writes itself."""
from __future__ import annotations

import re

from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .errors import RippleError

MIN_CALIB_TOKENS = 256
# below this the predictors (80% of the tokens) and the operating points' perplexity (the last 10%,
# ~1,000 tokens wanted) are measured on too little text to be stable: a warning, not an error
RECOMMENDED_CALIB_TOKENS = 4096


def warn_if_starved(n_tokens: int, log) -> None:
    if n_tokens < RECOMMENDED_CALIB_TOKENS:
        log(f"warning: only {n_tokens} calibration tokens; predictors and operating points need about "
            f"{RECOMMENDED_CALIB_TOKENS} (8192 by default) to be stable: pass more --calib text, or none to let the "
            "model generate its own")


def read_text_files(paths: list[str | Path], what: str = "calibration") -> str:
    """Read and concatenate UTF-8 text files; empty or unreadable ones are a clear error."""
    parts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise RippleError(f"{what} file {p} does not exist; pass a UTF-8 text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RippleError(f"{what} file {p} is not UTF-8 text; convert it or pass another file") from None
        if not text.strip():
            raise RippleError(f"{what} file {p} is empty; pass a file with real text "
                              f"(at least ~{MIN_CALIB_TOKENS} tokens)")
        parts.append(text)
    return "\n\n".join(parts)


GEN_SEQS = 32  # sequences sampled side by side: one batched decode step advances them all


def sample(logits: np.ndarray, rng: np.random.Generator, temp: float = 1.0, top_k: int = 1000,
           top_p: float = 1.0) -> np.ndarray:
    """One token per row of (n, n_vocab) logits: temperature, top-k, then top-p (nucleus).

    The defaults sample the model's own distribution (temperature 1, no nucleus cut; the top 1000
    tokens hold all but a negligible tail). Calibration must look like what users feed the model:
    truncated sampling (0.8 / top-k 40 / top-p 0.95) wrote low-entropy text on which SmolLM2's
    operating points measured +1.4% perplexity at density 0.95 but cost +6.8% on held-out prose;
    sampled untruncated, the same point measured +10.5% and cost +9.4% on the prose."""
    k = min(top_k, logits.shape[1])
    idx = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    val = np.take_along_axis(logits, idx, axis=1).astype(np.float64) / temp
    o = np.argsort(-val, axis=1)
    idx, val = np.take_along_axis(idx, o, axis=1), np.take_along_axis(val, o, axis=1)
    p = np.exp(val - val[:, :1])
    p /= p.sum(axis=1, keepdims=True)
    keep = (np.cumsum(p, axis=1) - p) < top_p  # the smallest prefix reaching top_p
    p = np.where(keep, p, 0.0)
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((len(p), 1))
    choice = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), k - 1)
    return idx[np.arange(len(idx)), choice]


def generate_batches(runner, n_tokens: int, seed: int, sequences: list[list[int]],
                     held_seqs: int = 0) -> Iterator[tuple[dict, dict, np.ndarray]]:
    """Sample calibration text from the model itself, `runner.n_seq` sequences at a time (from BOS,
    untruncated at temperature 1: see sample; a sequence ends at an end-of-generation token or after
    `runner.n_ctx` tokens and its slot starts a new one). Each decode step is also the profiling
    pass: yields (captured FFN tensors, node names, held-out mask per row) for the tokens just
    evaluated; the last `held_seqs` slots are held out. Finished token lists (BOS dropped) are
    appended to `sequences`."""
    import llama_cpp
    rng = np.random.default_rng(seed)
    n_seq, bos = runner.n_seq, runner.bos
    cur: list[list[int]] = [[] for _ in range(n_seq)]
    nxt = [bos] * n_seq
    held = np.arange(n_seq) >= n_seq - held_seqs
    done = 0
    bar = tqdm(total=n_tokens, desc="generating + profiling calibration text", unit="tok", leave=False)
    try:
        while done < n_tokens:
            k = min(n_seq, n_tokens - done)
            logits, captured, names = runner.step(nxt[:k], [len(c) for c in cur[:k]], list(range(k)))
            yield captured, names, held[:k]
            done += k
            bar.update(k)
            toks = sample(logits, rng)
            for s in range(k):
                cur[s].append(nxt[s])
                tok = int(toks[s])
                if llama_cpp.llama_vocab_is_eog(runner.vocab, tok) or len(cur[s]) >= runner.n_ctx:
                    sequences.append(cur[s][1:])
                    cur[s], nxt[s] = [], bos
                    runner.clear_seq(s)
                else:
                    nxt[s] = tok
    finally:
        bar.close()
    sequences.extend(c[1:] for c in cur if len(c) > 1)


def self_generated_source(n_tokens: int, seed: int) -> str:
    """How the index records self-generated calibration (ripple.calib.source)."""
    return f"self-generated ({n_tokens} tokens, seed {seed})"


def parse_self_generated(source: str) -> tuple[int, int] | None:
    """(tokens, seed) of a self_generated_source() label; None for text calibration."""
    m = re.fullmatch(r"self-generated \((\d+) tokens, seed (\d+)\)", source or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def self_generated_tokens(model_path: Path, n_tokens: int, n_ctx: int, seed: int = 0) -> list[int]:
    """Sample text from the model itself (see generate_batches): calibration that needs no data
    at all, for fully offline conversion. Real text from the target domain is better (--calib)."""
    n_seq = min(GEN_SEQS, max(1, n_tokens // 64))
    seq_len = max(32, min(n_ctx, -(-n_tokens // n_seq)))
    sequences = self_generated_sequences(model_path, n_tokens, seq_len, n_seq, seed)
    return [t for seq in sequences for t in seq][:n_tokens]


def self_generated_sequences(model_path: Path, n_tokens: int, seq_len: int, n_seq: int, seed: int) -> list[list[int]]:
    """About n_tokens of text the model samples itself, as token sequences of at most seq_len."""
    from .llama_capture import LlamaRunner
    sequences: list[list[int]] = []
    with LlamaRunner(model_path, n_ctx=seq_len, capture_intermediate=False, n_seq=n_seq) as runner:
        for _ in generate_batches(runner, n_tokens, seed, sequences):
            pass
    return sequences
