"""Calibration runs: tokens in, per-layer binary FFN activity out (what placement and eval use).

A neuron is active for a token when |intermediate| > the layer's threshold. ReLU-family FFNs have
true zeros, so their threshold is 0 (active = nonzero); SwiGLU-style FFNs have none, so the
threshold is the per-layer magnitude quantile that leaves `target_density` of neurons active
(CATS/TEAL-style), fixed on the first calibration chunk and reused for everything after.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from .errors import RippleError
from .llama_capture import ZERO_ACTIVATIONS, LlamaRunner


@dataclass
class Activity:
    kind: str                      # "zero" (ReLU family) or "magnitude"
    thresholds: np.ndarray         # (n_layer,) float32
    n_ff: list[int]
    packed: list[list[np.ndarray]] = field(default_factory=list)  # per layer: bit-packed chunks
    tokens: int = 0

    def layer(self, il: int) -> np.ndarray:
        """(tokens, n_ff) bool activity of one layer."""
        bits = np.concatenate(self.packed[il], axis=0)
        return np.unpackbits(bits, axis=1, count=self.n_ff[il]).astype(bool)

    def density(self) -> np.ndarray:
        return np.array([self.layer(il).mean() for il in range(len(self.n_ff))])


def chunk_tokens(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """Split a token stream into independent sequences that fit the context, each BOS-led."""
    step = n_ctx - (1 if bos is not None else 0)
    chunks = []
    for i in range(0, len(tokens), step):
        part = tokens[i:i + step]
        if len(part) >= 8:  # a few-token tail says nothing about co-activation
            chunks.append(([bos] if bos is not None else []) + part)
    return chunks


def profile(runner: LlamaRunner, chunks: list[list[int]], target_density: float = 0.3,
            thresholds: np.ndarray | None = None, kind: str | None = None, desc: str = "profiling") -> Activity:
    """Evaluate every chunk and record binary activity per layer (the GGUF's neuron order)."""
    return record(chunk_batches(runner, chunks, desc=desc), runner.n_layer, target_density, thresholds, kind).activity


def chunk_batches(runner: LlamaRunner, chunks: list[list[int]], held_chunks: list[list[int]] = (),
                  desc: str = "profiling") -> Iterator[tuple[dict, dict, np.ndarray]]:
    """What `record` consumes, from text: each chunk evaluated once; `held_chunks` marked held out."""
    if not chunks:
        raise RippleError("no calibration tokens to profile; pass more text with --calib")
    all_chunks = [(c, False) for c in chunks] + [(c, True) for c in held_chunks]
    for chunk, held in tqdm(all_chunks, desc=desc, unit="chunk", leave=False):
        _, captured, names = runner.evaluate(chunk)
        yield captured, names, np.full(len(chunk), held)


@dataclass
class Recording:
    """One llama.cpp pass over calibration tokens: what placement, the down importance matrix and
    predictor training need, so no second pass is run when the weights do not change."""
    activity: Activity                # calibration rows
    held: Activity                    # held-out rows (same thresholds)
    sq_sum: list[np.ndarray]          # per layer: sum over all rows of h^2 (float64, original order)
    xs: list[np.ndarray]              # per layer: FFN inputs of the first n_kept calibration rows (float16)
    hs: list[np.ndarray]              # per layer: FFN intermediates of the same rows (float16)
    n_kept: int = 0

    def imatrix(self, il: int) -> np.ndarray:
        """llama.cpp's importance matrix for ffn_down: mean of h^2 per neuron (original order)."""
        return (self.sq_sum[il] / max(self.activity.tokens + self.held.tokens, 1)).astype(np.float32)


def _merged(batches, min_rows: int):
    """Concatenate consecutive batches until each has at least min_rows rows (the first one fixes
    the thresholds; batched generation yields one row per sequence)."""
    buf = []
    for b in batches:
        buf.append(b)
        if sum(len(m) for _, _, m in buf) >= min_rows:
            yield _concat(buf)
            buf = []
    if buf:
        yield _concat(buf)


def _concat(buf):
    if len(buf) == 1:
        return buf[0]
    keys = buf[0][0].keys()
    return ({k: np.concatenate([c[k] for c, _, _ in buf]) for k in keys}, buf[0][1],
            np.concatenate([m for _, _, m in buf]))


def record(batches: Iterable[tuple[dict, dict, np.ndarray]], n_layer: int, target_density: float = 0.3,
           thresholds: np.ndarray | None = None, kind: str | None = None, keep_tokens: int = 0,
           store_dir=None, min_rows: int = 256) -> Recording:
    """Consume captured batches (chunk_batches or calib.generate_batches: FFN tensors of every
    evaluated token plus a held-out mask per row): binary activity of every row and the sum of h^2,
    plus x and h of the first `keep_tokens` calibration rows as float16 arrays memory-mapped under
    `store_dir` (predictor training data; the runner must capture inputs for those)."""
    from pathlib import Path
    rec: Recording | None = None
    for captured, names, held in _merged(batches, min_rows):
        layers = sorted(il for (k, il) in captured if k == "act")
        if len(layers) != n_layer:
            raise RippleError(f"llama.cpp exposed the FFN intermediate of {len(layers)}/{n_layer} "
                              "layers; this architecture's FFN graph is not supported")
        if rec is None:
            this_kind = "zero" if all(names[il] in ZERO_ACTIVATIONS for il in layers) else "magnitude"
            kind = kind or this_kind
            if thresholds is None:
                thresholds = np.zeros(n_layer, dtype=np.float32)
                if kind == "magnitude":
                    for il in layers:
                        thresholds[il] = np.quantile(np.abs(captured[("act", il)]), 1.0 - target_density)
            n_ff = [captured[("act", il)].shape[1] for il in layers]
            thr = np.asarray(thresholds, dtype=np.float32)
            rec = Recording(Activity(kind, thr, n_ff, [[] for _ in layers]), Activity(kind, thr, n_ff, [[] for _ in layers]),
                            [np.zeros(f, dtype=np.float64) for f in n_ff], [], [])
            if keep_tokens:
                for il in layers:
                    if ("input", il) not in captured:
                        raise RippleError(f"llama.cpp did not expose layer {il}'s FFN input; "
                                          "this architecture's FFN graph is not supported")
                    d = captured[("input", il)].shape[1]
                    rec.xs.append(np.lib.format.open_memmap(Path(store_dir) / f"x{il}.npy", "w+", np.float16, (keep_tokens, d)))
                    rec.hs.append(np.lib.format.open_memmap(Path(store_dir) / f"h{il}.npy", "w+", np.float16, (keep_tokens, n_ff[il])))
        cal = np.flatnonzero(~held)
        hel = np.flatnonzero(held)
        take = cal[:max(0, keep_tokens - rec.n_kept)]
        for il in layers:
            h = captured[("act", il)]
            bits = np.packbits(np.abs(h) > rec.activity.thresholds[il], axis=1)
            rec.activity.packed[il].append(bits[cal] if len(hel) else bits)
            if len(hel):
                rec.held.packed[il].append(bits[hel])
            rec.sq_sum[il] += np.einsum("ti,ti->i", h, h, dtype=np.float64)
            if len(take):
                rec.xs[il][rec.n_kept:rec.n_kept + len(take)] = captured[("input", il)][take]
                rec.hs[il][rec.n_kept:rec.n_kept + len(take)] = h[take]
        rec.n_kept += len(take)
        rec.activity.tokens += len(cal)
        rec.held.tokens += len(hel)
    if rec is None or rec.activity.tokens == 0:
        raise RippleError("no calibration tokens to profile; pass more text with --calib")
    return rec


def capture_layers(runner: LlamaRunner, chunks: list[list[int]], max_tokens: int, store_dir,
                   desc: str = "recording activations") -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Record, per layer, the FFN input (x) and the FFN intermediate (h) of up to `max_tokens`
    tokens, as float16 arrays memory-mapped under `store_dir` (predictor training data for big
    models does not fit in RAM). Returns (xs, hs, n_tokens)."""
    from pathlib import Path
    xs: list[np.ndarray] = []
    hs: list[np.ndarray] = []
    n = 0
    for chunk in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        if n >= max_tokens:
            break
        _, captured, _ = runner.evaluate(chunk)
        if not xs:
            for il in range(runner.n_layer):
                if ("input", il) not in captured or ("act", il) not in captured:
                    raise RippleError(f"llama.cpp did not expose layer {il}'s FFN input/intermediate; "
                                      "this architecture's FFN graph is not supported")
                d, f = captured[("input", il)].shape[1], captured[("act", il)].shape[1]
                xs.append(np.lib.format.open_memmap(Path(store_dir) / f"x{il}.npy", "w+", np.float16, (max_tokens, d)))
                hs.append(np.lib.format.open_memmap(Path(store_dir) / f"h{il}.npy", "w+", np.float16, (max_tokens, f)))
        take = min(len(chunk), max_tokens - n)
        for il in range(runner.n_layer):
            xs[il][n:n + take] = captured[("input", il)][:take]
            hs[il][n:n + take] = captured[("act", il)][:take]
        n += take
    if n == 0:
        raise RippleError("no tokens to record; pass more calibration text with --calib")
    return xs, hs, n
