"""Activation predictors: which FFN neurons will a token activate, from what the FFN sees.

Per layer a small MLP, score = W2 · relu(W1 · x + b1) + b2 (PowerInfer/Deja Vu shape), trained with
torch on recorded activations. Targets are the active sets placement used (|h| > threshold).
Positives are weighted by their magnitude so the loss cares most about the neurons that carry the
FFN's output, and each layer's decision threshold is tuned on separate tokens for a target recall
of the *active mass* (sum of |h| over truly active neurons), not accuracy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

PRED_BUDGET = 0.05  # predictor bytes at most ~5% of the FFN bytes it guards


@dataclass
class LayerPredictor:
    w1: np.ndarray   # (rank, n_embd)
    b1: np.ndarray   # (rank,)
    w2: np.ndarray   # (n_ff, rank)
    b2: np.ndarray   # (n_ff,)
    threshold: float = 0.0

    def scores(self, x: np.ndarray) -> np.ndarray:
        """(tokens, n_embd) -> (tokens, n_ff) scores, with f16-rounded weights as stored."""
        w1 = self.w1.astype(np.float16).astype(np.float32)
        w2 = self.w2.astype(np.float16).astype(np.float32)
        hid = np.maximum(x.astype(np.float32) @ w1.T + self.b1, 0.0)
        return hid @ w2.T + self.b2

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scores(x) > self.threshold

    @property
    def nbytes(self) -> int:
        return 2 * (self.w1.size + self.w2.size) + 4 * (self.b1.size + self.b2.size)


def choose_rank(n_embd: int, n_ff: int, ffn_bytes: int, lo: int = 32, hi: int = 1024) -> int:
    """Largest multiple of 8 whose f16 predictor fits PRED_BUDGET of the layer's FFN bytes, but at
    least `lo`: below rank ~32 no predictor reached the recall/density target on the fixtures
    (n_embd 128, where 5% allows only rank ~12); at n_embd >= 2048 the floor never binds."""
    r = int(PRED_BUDGET * ffn_bytes / (2 * (n_embd + n_ff)))
    return int(np.clip(r - r % 8, lo, hi))


def train_layer(x: np.ndarray, h: np.ndarray, act_threshold: float, rank: int, steps: int = 1500,
                batch: int = 256, lr: float = 3e-3, seed: int = 0) -> LayerPredictor:
    """x: (T, n_embd) FFN inputs, h: (T, n_ff) intermediates (stored order) of training tokens."""
    import torch  # only training needs torch; the runtime imports this module for LayerPredictor

    # small layers: one thread; OpenMP spin-waiting on a busy 2-core machine made 2 threads 15x slower
    torch.set_num_threads(1 if x.shape[1] * h.shape[1] < 2**22 else max(1, os.cpu_count() or 1))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    X = torch.from_numpy(np.asarray(x, dtype=np.float32))
    mag = torch.from_numpy(np.abs(np.asarray(h, dtype=np.float32)))
    Y = (mag > act_threshold).float()
    n_embd, n_ff = X.shape[1], Y.shape[1]
    # magnitude-weighted positives; balance the rare class per neuron so cold neurons still learn
    density = Y.mean(0).clamp(1e-4, 1 - 1e-4)
    mean_active = (mag * Y).sum(0) / Y.sum(0).clamp_min(1)
    mu, sd = X.mean(0), X.std(0).clamp_min(1e-6)
    l1 = torch.nn.Linear(n_embd, rank)
    l2 = torch.nn.Linear(rank, n_ff)
    with torch.no_grad():
        l2.bias.copy_(torch.log(density / (1 - density)))
    params = list(l1.parameters()) + list(l2.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    T = X.shape[0]
    Xn = (X - mu) / sd
    W = 1.0 + Y * (mag / mean_active.clamp_min(1e-6)).clamp(max=4.0) * ((1 - density) / density).sqrt()
    del mag
    for _ in range(steps):
        idx = torch.randint(0, T, (min(batch, T),), generator=g)
        logits = l2(torch.relu(l1(Xn[idx])))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, Y[idx], weight=W[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    # fold the input normalisation into W1/b1 so the runtime sees a plain MLP on raw x
    with torch.no_grad():
        w1 = l1.weight / sd
        b1 = l1.bias - (l1.weight * (mu / sd)).sum(1)
    return LayerPredictor(w1.numpy().astype(np.float32), b1.numpy().astype(np.float32),
                          l2.weight.detach().numpy().astype(np.float32), l2.bias.detach().numpy().astype(np.float32))


def tune_threshold(pred: LayerPredictor, x: np.ndarray, h: np.ndarray, act_threshold: float,
                   target_recall: float) -> float:
    """Highest score threshold whose predicted sets still cover `target_recall` of the active mass."""
    s = pred.scores(x)
    mag = np.abs(np.asarray(h, dtype=np.float32))
    active = mag > act_threshold
    sa, ma = s[active], mag[active]
    if sa.size == 0:
        return float(np.max(s))
    order = np.argsort(-sa, kind="stable")
    cum = np.cumsum(ma[order])
    k = int(np.searchsorted(cum, target_recall * cum[-1]))
    k = min(k, len(order) - 1)
    return float(np.nextafter(np.float32(sa[order[k]]), np.float32(-np.inf)))


def evaluate(pred: LayerPredictor, x: np.ndarray, h: np.ndarray, act_threshold: float) -> dict[str, float]:
    predicted = pred.predict(x)
    mag = np.abs(np.asarray(h, dtype=np.float32))
    active = mag > act_threshold
    hit = predicted & active
    return {
        "recall": float(hit.sum() / max(active.sum(), 1)),
        "mass_recall": float((mag * hit).sum() / max((mag * active).sum(), 1e-12)),
        "precision": float(hit.sum() / max(predicted.sum(), 1)),
        "pred_density": float(predicted.mean()),
        "true_density": float(active.mean()),
    }
