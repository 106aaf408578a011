"""Activation predictors: which FFN neurons will a token activate, from what the FFN sees.

Per layer a small MLP, score = W2 · relu(W1 · x + b1) + b2 (PowerInfer/Deja Vu shape), trained with
torch on recorded activations. Targets are the active sets placement used (|h| > threshold).
Positives are weighted by their magnitude so the loss cares most about the neurons that carry the
FFN's output. The score is used as a ranking: each layer's threshold comes from the operating points
(quality.py), chosen for a perplexity budget, not from the classifier's own 0.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .cpus import idle_cores

PRED_BUDGET = 0.05  # predictor bytes at most ~5% of the FFN bytes it guards
MIN_STEPS = 300     # Adam steps at least, however few the tokens: steps, not passes, set the quality


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


def choose_pack_rank(n_embd: int, n_ff: list[int], ffn_bytes: list[int]) -> int:
    """One width for every layer (the pack holds one ripple.pack.pred_rank): the smallest layer's
    choice, so each stays within its budget. Layers differ in a mixed file: Q4_K_M keeps some layers'
    ffn_down in Q6_K, so at 8B size their choices differed (128 vs 152) and the pack was unreadable."""
    return min(choose_rank(n_embd, f, b) for f, b in zip(n_ff, ffn_bytes))


@contextmanager
def torch_threads(large: bool):
    """Run torch with one thread for small work, else as many as the machine has idle cores.

    OpenMP threads spin while they wait: on a busy 2-core machine, 2 threads made small layers 15x
    slower, and even 8B-size layers (placement and training) 1.2-3x slower than 1 thread. The
    1-minute load average stands in for "cores other processes keep busy"."""
    import torch
    n = idle_cores() if large else 1
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _targets(h: np.ndarray, act_threshold: float, order: np.ndarray, dtype, chunk: int = 2048):
    """Per token (rows of h in `order`) and neuron the loss weight S: 0 = inactive, else the
    positive's weight 1 + |h| / (the layer's mean active |h|), capped at 9 - the threshold is tuned
    for the layer's active mass, so a neuron that carries more of it weighs more. Also each
    neuron's active share. One pass over h; the mean comes from the first chunk."""
    import torch
    T, n_ff = len(order), h.shape[1]
    S = torch.empty((T, n_ff), dtype=dtype)
    n_act = torch.zeros(n_ff)
    inv_mean = None
    for lo in range(0, T, chunk):
        mag = torch.from_numpy(np.asarray(h[order[lo:lo + chunk]])).float().abs_()
        act = mag > act_threshold
        if inv_mean is None:
            inv_mean = float(act.sum()) / max(float(mag.mul(act).sum()), 1e-30)
        n_act += act.sum(0, dtype=torch.float32)
        S[lo:lo + chunk] = mag.mul_(inv_mean).clamp_(max=8.0).add_(1.0).mul_(act)
    density = (n_act / max(T, 1)).clamp(1e-4, 1 - 1e-4)
    return S, density


def _pca_init(Xn, rank: int, g):
    """W1 = the top rank/2 principal directions of the (standardised) input, whitened, in both
    signs: relu(z) and relu(-z) together keep the linear part, and training starts from the input's
    dominant subspace instead of random directions (fewer passes to the same quality)."""
    import torch
    sub = Xn[torch.randperm(Xn.shape[0], generator=g)[:4096]].float()
    half = max(1, rank // 2)
    # randomized subspace iteration (2 rounds) with our generator: top `half` right singular vectors
    q = min(half + 8, *sub.shape)
    Q = torch.linalg.qr(torch.randn(sub.shape[1], q, generator=g)).Q
    for _ in range(2):
        Q = torch.linalg.qr(sub.T @ (sub @ Q)).Q
    _, sv, vt = torch.linalg.svd(sub @ Q, full_matrices=False)
    sv, V = sv[:half], (Q @ vt.T)[:, :half]
    P = (V / (sv / np.sqrt(max(sub.shape[0] - 1, 1))).clamp_min(1e-6)).T  # unit-variance projections
    W1 = torch.cat([P, -P])[:rank]
    if W1.shape[0] < rank:
        W1 = torch.cat([W1, torch.randn(rank - W1.shape[0], Xn.shape[1], generator=g) / np.sqrt(Xn.shape[1])])
    return W1.contiguous()


def train_layer(x: np.ndarray, h: np.ndarray, act_threshold: float, rank: int, steps: int | None = None,
                batch: int = 256, lr: float = 4e-2, seed: int = 0, epochs: float = 4.0,
                bf16: bool | None = None) -> LayerPredictor:
    """x: (T, n_embd) FFN inputs, h: (T, n_ff) intermediates (pack order) of training tokens.

    W1 starts from PCA of x, W2 from zero; then AdamW with a cosine schedule from a high learning
    rate for `epochs` passes over the tokens (at least MIN_STEPS batches; exactly `steps` if given)
    on the magnitude-weighted BCE, with a hand-written backward pass (two layers need no autograd)
    and bf16 matmuls where the CPU has them. On SmolLM2 this matches the former recipe (1500
    autograd steps from a random start) on held-out text at ~1/12 of its CPU time; see
    tools/bench_convert_stages.py."""
    import torch

    T, n_embd = x.shape
    n_ff = h.shape[1]
    large = n_embd * n_ff >= 2**22
    with torch_threads(large):
        mm = torch.bfloat16 if (_bf16_fast() if bf16 is None else bf16) else torch.float32
        g = torch.Generator().manual_seed(seed)
        # tokens shuffled once, then every epoch visits the same batches in a new order: contiguous
        # slices instead of a gather per step
        order = torch.randperm(T, generator=g).numpy()
        X = torch.from_numpy(np.asarray(x[order])).float()
        mu = X[:4096].mean(0)  # only a normalisation (folded into W1 below): a sample is enough
        sd = (X[:4096] - mu).square_().mean(0).sqrt_()
        # relative floor: a near-constant input dimension (SmolLM2 layer 21: sd ~2e-5, its norm
        # weight ~0) would put 1/sd into W1 when the normalisation is folded and overflow f16 -> NaN
        sd = sd.clamp_min(max(1e-6, 1e-2 * float(sd.median())))
        Xn = X.sub_(mu).div_(sd).to(mm)
        del X
        # float16 weights halve the largest array (13k x 14336 at 8B size); small ones stay float32
        S, density = _targets(h, act_threshold, order, torch.float16 if large else torch.float32)

        W1 = _pca_init(Xn, rank, g)
        b1 = torch.zeros(rank)
        W2b = torch.zeros(n_ff, rank + 1)  # [W2 | b2]: b2's gradient comes out of W2's matmul
        W2b[:, rank] = torch.log(density / (1 - density))
        params = [W1, b1, W2b]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4,
                                **({"fused": True} if hasattr(torch, "_fused_adamw_") else {}))
        batch = min(batch, T)
        n_batches = T // batch
        steps = steps or max(MIN_STEPS, int(round(epochs * n_batches)))
        hid = torch.ones(batch, rank + 1, dtype=mm)  # last column stays 1 (the bias input)
        visit: list[int] = []
        for t in range(steps):
            if not visit:
                visit = (torch.randperm(n_batches, generator=g) * batch).tolist()
            lo = visit.pop()
            xb, sb = Xn[lo:lo + batch], S[lo:lo + batch].float()
            W2m = W2b.to(mm)
            pre = (xb @ W1.to(mm).T).float().add_(b1)
            hid[:, :rank] = pre.clamp(min=0)
            # gradient of the weighted BCE (Adam is invariant to its 1/(batch*n_ff) scale):
            # w * (sigmoid(z) - y) = sigmoid(z) * max(S, 1) - S  (see _targets)
            gz = torch.sigmoid_((hid @ W2m.T).float()).mul_(sb.clamp(min=1.0)).sub_(sb).to(mm)
            gh = (gz @ W2m[:, :rank]).float().mul_(pre > 0)
            W1.grad = (gh.to(mm).T @ xb).float()
            b1.grad = gh.sum(0)
            W2b.grad = (gz.T @ hid).float()
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
            opt.step()
        # fold the input normalisation into W1/b1 so the runtime sees a plain MLP on raw x
        w1 = W1 / sd
        b1 = b1 - (W1 * (mu / sd)).sum(1)
    return LayerPredictor(w1.numpy().astype(np.float32), b1.numpy().astype(np.float32),
                          W2b[:, :rank].numpy().astype(np.float32), W2b[:, rank].numpy().astype(np.float32))


def _bf16_fast() -> bool:
    """bf16 matmuls only where the CPU computes them natively (AVX512-BF16 / AMX): ~2x float32
    there, far slower than float32 where emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def tune_threshold(pred: LayerPredictor, x: np.ndarray, h: np.ndarray, act_threshold: float,
                   target_recall: float) -> float:
    """Highest score threshold whose predicted sets still cover `target_recall` of the active mass
    (a diagnostic: the pack's thresholds come from quality.py's operating points)."""
    s = pred.scores(x)
    mag = np.abs(np.asarray(h, dtype=np.float32))
    active = mag > act_threshold
    sa, ma = s[active], mag[active]
    if sa.size == 0:
        return float(np.max(s))
    order = np.argsort(-sa, kind="stable")
    cum = np.cumsum(ma[order], dtype=np.float64)  # float32 stalls once the sum is ~1e7
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
