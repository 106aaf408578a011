"""Calibration runs: tokens in, per-layer binary FFN activity out (what placement and eval use).

A neuron is active for a token when |intermediate| > the layer's threshold. ReLU-family FFNs have
true zeros, so their threshold is 0 (active = nonzero); SwiGLU-style FFNs have none, so the
threshold is the per-layer magnitude quantile that leaves `target_density` of neurons active
(CATS/TEAL-style), fixed on the first calibration chunk and reused for everything after.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    """Evaluate every chunk and record binary activity per layer (original stored order)."""
    if not chunks:
        raise RippleError("no calibration tokens to profile; pass more text with --calib")
    act: Activity | None = None
    for chunk in tqdm(chunks, desc=desc, unit="chunk", leave=False):
        _, captured, names = runner.evaluate(chunk)
        layers = sorted(il for (k, il) in captured if k == "act")
        if len(layers) != runner.n_layer:
            raise RippleError(f"llama.cpp exposed the FFN intermediate of {len(layers)}/{runner.n_layer} "
                              "layers; this architecture's FFN graph is not supported")
        if act is None:
            this_kind = "zero" if all(names[il] in ZERO_ACTIVATIONS for il in layers) else "magnitude"
            kind = kind or this_kind
            if thresholds is None:
                thresholds = np.zeros(runner.n_layer, dtype=np.float32)
                if kind == "magnitude":
                    for il in layers:
                        mag = np.abs(captured[("act", il)])
                        thresholds[il] = np.quantile(mag, 1.0 - target_density)
            act = Activity(kind, np.asarray(thresholds, dtype=np.float32),
                           [captured[("act", il)].shape[1] for il in layers],
                           [[] for _ in layers])
        for il in layers:
            active = np.abs(captured[("act", il)]) > act.thresholds[il]
            act.packed[il].append(np.packbits(active, axis=1))
        act.tokens += len(chunk)
    return act


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
