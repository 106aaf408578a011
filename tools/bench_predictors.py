#!/usr/bin/env python3
"""How close can a neuron selector get to the oracle on a real SwiGLU model? (issue 10, item 2)

On REAL activations of SmolLM2-135M-Instruct (Q4_1, tools/fetch_smollm2.py), recorded once with
tools/bench_convert_stages.py's recorder (calibration text models/text/calib.txt for training,
held-out models/text/heldout.txt for evaluation: never trained or tuned on), per layer and density d:
the share of the FFN output energy (sum of h^2 |down column|^2) lost when each token keeps its top-d
neurons by the selector's score. The oracle keeps the top-d by the true |h| |down column|; on
SmolLM2 its loss maps to perplexity as d 0.5 -> +3.2%, 0.8 -> +0.1% (facts.md).

Selectors:
  mlp-<loss>-<rank>  the runtime's predictor shape (relu MLP on the FFN input, predictor.py's PCA start,
                     AdamW, cosine schedule) trained with: bce (today's loss: magnitude-weighted BCE on
                     the top-30% set), bce70 (the same on the top-70% set), reg (regression of
                     log|h||d|), soft (listwise softmax cross-entropy on the energy)
  gate               |silu(gate . x)| |d| (CATS: needs the whole gate matrix)
  q<b>               |silu(Gq x) (Uq x)| |d| with gate/up quantized to b bits (blocks of 32): a sketch
  lowrank<r>         the same with the best rank-r approximation of gate and up in the data's norm
  prev-token         the previous token's true energy (what a cache of the last token's set sees)

    .venv/bin/python tools/bench_predictors.py [--layers 3,15,27] [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DENSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)


def lost(score: np.ndarray, energy: np.ndarray, d: float) -> float:
    """Share of the energy lost keeping per token the top-d entries by score."""
    k = int(np.ceil(d * score.shape[1]))
    idx = np.argpartition(-score, k - 1, axis=1)[:, :k]
    return float(1 - np.take_along_axis(energy, idx, 1).sum() / energy.sum())


def train_mlp(x, h, colsq, rank: int, loss: str, seed: int = 0, lr: float = 4e-2, batch: int = 256):
    """predictor.py's recipe (PCA start, AdamW, cosine, >= 300 steps / 4 epochs) with another target."""
    import torch
    from ripple_gguf import predictor as P
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g).numpy()
    X = torch.from_numpy(np.asarray(x[order], dtype=np.float32))
    mu = X[:4096].mean(0)
    sd = (X[:4096] - mu).square().mean(0).sqrt()
    sd = sd.clamp_min(max(1e-6, 1e-2 * float(sd.median())))
    Xn = (X - mu) / sd
    mag = torch.from_numpy(np.abs(np.asarray(h[order], dtype=np.float32)) * np.sqrt(colsq))
    n_ff = mag.shape[1]
    if loss == "reg":
        t = torch.log(mag + 1e-6 * float(mag.mean()))
        Y = (t - t.mean()) / t.std()
        b2 = Y.mean(0)
    elif loss == "soft":
        Y = mag.square() / mag.square().sum(1, keepdim=True).clamp_min(1e-30)
        b2 = torch.zeros(n_ff)
    else:  # bce<share>: predictor.py's magnitude-weighted BCE on the top-share set
        share = float(loss[3:] or 30) / 100
        act = mag > torch.quantile(mag[:2048].flatten(), 1 - share)
        Y = (mag * (float(act.sum()) / float((mag * act).sum()))).clamp(max=8.0).add(1.0).mul(act)
        dens = act.float().mean(0).clamp(1e-4, 1 - 1e-4)
        b2 = torch.log(dens / (1 - dens))
    W1, b1 = P._pca_init(Xn, rank, g), torch.zeros(rank)
    W2b = torch.zeros(n_ff, rank + 1)
    W2b[:, rank] = b2
    opt = torch.optim.AdamW([W1, b1, W2b], lr=lr, weight_decay=1e-4)
    nb = len(x) // batch
    steps = max(300, 4 * nb)
    hid, visit = torch.ones(batch, rank + 1), []
    for s in range(steps):
        if not visit:
            visit = (torch.randperm(nb, generator=g) * batch).tolist()
        lo = visit.pop()
        xb, yb = Xn[lo:lo + batch], Y[lo:lo + batch]
        pre = xb @ W1.T + b1
        hid[:, :rank] = pre.clamp(min=0)
        z = hid @ W2b.T
        gz = z - yb if loss == "reg" else torch.softmax(z, 1) - yb if loss == "soft" \
            else torch.sigmoid(z) * yb.clamp(min=1.0) - yb
        gh = (gz @ W2b[:, :rank]) * (pre > 0)
        W1.grad, b1.grad, W2b.grad = gh.T @ xb, gh.sum(0), gz.T @ hid
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * s / steps))
        opt.step()
    w1 = W1 / sd
    return P.LayerPredictor(w1.numpy(), (b1 - (W1 * (mu / sd)).sum(1)).numpy(),
                            W2b[:, :rank].numpy().copy(), W2b[:, rank].numpy().copy())


def quantized(w: np.ndarray, bits: int, block: int = 32) -> np.ndarray:
    r, c = w.shape
    wb = w.reshape(r, c // block, block)
    if bits == 1:
        return (np.sign(wb) * np.abs(wb).mean(-1, keepdims=True)).reshape(r, c)
    m = 2 ** (bits - 1) - 0.5
    s = np.abs(wb).max(-1, keepdims=True) / m + 1e-12
    return ((np.clip(np.round(wb / s - 0.5), -m - 0.5, m - 0.5) + 0.5) * s).reshape(r, c)


def low_rank_in_data_norm(w: np.ndarray, x: np.ndarray, r: int) -> np.ndarray:
    """argmin over rank-r W' of E|(W - W')x|^2: truncated SVD of W M^1/2, M = E[x x^T]."""
    ev, V = np.linalg.eigh(x.T @ x / len(x))
    ev = np.clip(ev, 1e-8 * ev.max(), None)
    u, s, vt = np.linalg.svd(w @ ((V * np.sqrt(ev)) @ V.T), full_matrices=False)
    return (u[:, :r] * s[:r]) @ (vt[:r] @ ((V / np.sqrt(ev)) @ V.T))


def layer_rows(data, header, il: int) -> dict:
    from ripple_gguf.ggml_quant import dequantize
    from ripple_gguf.gguf_io import tensor_bytes

    def weight(name):
        t = next(t for t in header.tensors if t.name == f"blk.{il}.{name}.weight")
        return dequantize(tensor_bytes(header, t), t.tensor_type, int(t.shape[0])).astype(np.float32)
    x, h = data.xh("calib", il)
    xe, he = data.xh("held", il)
    x = x.astype(np.float32)
    xe, he = xe[:4096].astype(np.float32), he[:4096].astype(np.float32)
    G, U, D = weight("ffn_gate"), weight("ffn_up"), weight("ffn_down")
    colsq = (D ** 2).sum(0)
    energy, dn = he ** 2 * colsq, np.sqrt(colsq)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    scores = {"oracle": energy, "gate": np.abs(silu(xe @ G.T)) * dn,
              "prev-token": np.vstack([energy[:1], energy[:-1]])}
    for bits in (1, 2, 3):
        Gq, Uq = quantized(G, bits), quantized(U, bits)
        scores[f"q{bits}"] = np.abs(silu(xe @ Gq.T) * (xe @ Uq.T)) * dn
    for r in (32, 128):
        Gr, Ur = low_rank_in_data_norm(G, x, r), low_rank_in_data_norm(U, x, r)
        scores[f"lowrank{r}"] = np.abs(silu(xe @ Gr.T) * (xe @ Ur.T)) * dn
    n = int(0.9 * len(x))
    for loss, rank in (("bce", 32), ("bce70", 32), ("reg", 32), ("soft", 32), ("bce", 128), ("reg", 128)):
        scores[f"mlp-{loss}-{rank}"] = train_mlp(x[:n], h[:n], colsq, rank, loss, seed=il).scores(xe)
    return {name: [round(lost(s, energy, d), 4) for d in DENSITIES] for name, s in scores.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--model", default=None, help="GGUF (default: tools/fetch_smollm2.py's SmolLM2 Q4_1)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ripple-gguf" / "bench_convert_stages"))
    args = ap.parse_args()
    import bench_convert_stages as rec
    from ripple_gguf.gguf_io import open_header
    model = args.model or subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_smollm2.py")], check=True,
                                         capture_output=True, text=True).stdout.split()[0]
    meta = rec.record(Path(model), Path(args.cache))
    data, header = rec.Data(Path(args.cache), meta), open_header(model)
    rows = {}
    for il in (int(v) for v in args.layers.split(",")):
        rows[il] = layer_rows(data, header, il)
        print(json.dumps({"layer": il, **rows[il]}), flush=True)
    names = list(next(iter(rows.values())))
    print(f"\nenergy lost (mean of layers {args.layers}) keeping per token the top-d by each selector")
    print("| selector | " + " | ".join(f"d={d}" for d in DENSITIES) + " |")
    print("|---|" + "---|" * len(DENSITIES))
    for name in names:
        mean = np.mean([rows[il][name] for il in rows], axis=0)
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}%" for v in mean) + " |")


if __name__ == "__main__":
    main()
