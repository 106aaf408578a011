"""Projected tokens/s of 8B- and 70B-shaped models at a share of their size in memory, from the
per-layer costs `bench scale` measured at 8B layer size. Projections, not measurements: every
assumption is stated in `ASSUMPTIONS` and printed with the numbers.
"""
from __future__ import annotations

import numpy as np

from ..iocost import UFS40, CostModel
from .scale import MODELS, NVME

ASSUMPTIONS = (
    "per-layer FFN compute and the runtime's reads per layer are measured at the scale model's layer size "
    "(8B: random weights, forced density) and scale with the layer's elements (70B: 4x)",
    "the neuron cache gets what is left of the memory after the non-FFN weights and the predictors "
    "(KV cache and compute buffers left out: small at short context)",
    "a needed neuron is cached with probability cache/FFN (no credit for pinning the hot neurons, which "
    "real activity rewards), and a miss costs the runtime's measured reads and over-read at that density; "
    "random weights select scattered neurons with no co-activation to exploit, the worst case for merging",
    "reads and compute do not overlap (the runtime does not overlap them yet)",
    "stock llama.cpp: once the model is larger than memory, its page cache (LRU under a cyclic scan) "
    "re-reads every weight each token at the device's sequential bandwidth (facts.md: a 20 GB model "
    "on a 16 GB laptop at ~1 GB/s ran ~20 s/token)",
)


def _interp(points: list[dict], key: str, d: float) -> float:
    xs = [p["density"] for p in points if p.get(key) is not None]
    ys = [p[key] for p in points if p.get(key) is not None]
    return float(np.interp(d, xs, ys))


def model_bytes(m: dict, shape: dict) -> dict:
    """GGUF bytes of a model of `shape` in the measured type mix."""
    b = m["bytes_per_element"]
    e, f, L = shape["n_embd"], shape["n_ff"], shape["n_layer"]
    kv = shape["n_kv"] * e // shape["n_head"]
    ffn = L * e * f * sum(b[k] for k in ("ffn_gate", "ffn_up", "ffn_down"))
    non_ffn = L * e * (2 * e + 2 * kv) * b["attn"] + shape["vocab"] * e * (b["token_embd"] + b["output"])
    scale = e * f / (m["n_embd"] * m["n_ff"])
    return {"ffn": ffn, "non_ffn": non_ffn, "total": ffn + non_ffn, "layer_scale": scale,
            "pack_ffn": L * scale * m["ffn_bytes_per_layer"], "predictors": L * scale * m["predictor_bytes_per_layer"]}


def project(m: dict, shape: dict, dev: CostModel, d: float, mem_share: float = 0.5) -> dict:
    """One model shape, one device, density d, memory = mem_share x the GGUF size."""
    sz = model_bytes(m, shape)
    L, k = shape["n_layer"], sz["layer_scale"]
    mem = mem_share * sz["total"]
    cache = mem - sz["non_ffn"] - sz["predictors"]
    if cache <= 0:
        return {"fits": False, "reason": "non-FFN weights do not fit", "memory": mem, **sz}
    miss = max(0.0, 1.0 - cache / sz["pack_ffn"])
    n_meas = m["n_layer"]
    reads = L * _interp(m["cold"], "reads_per_token", d) / n_meas * (shape["n_ff"] / m["n_ff"]) * miss
    over = _interp(m["cold"], "bytes_per_token", d) / max(_interp(m["cold"], "useful_bytes_per_token", d), 1.0)
    read_bytes = d * sz["pack_ffn"] * miss * over
    io = dev.seconds(reads, read_bytes)
    rest_per_layer = m["rest_s_per_token"] / n_meas  # attention, norms, a small output: an upper bound
    out_s = shape["vocab"] * shape["n_embd"] * m["bytes_per_element"]["output"] / (m["dense_ffn_gbps"] * 1e9)
    compute = L * k * _interp(m["warm"], "ffn_s_per_layer", d) + L * k * rest_per_layer + out_s
    stock_compute = L * k * (m["dense_ffn_s_per_layer"] + rest_per_layer) + out_s
    stock = stock_compute + (sz["total"] / (dev.bw_mbps * 1e6) if mem < sz["total"] else 0.0)
    return {"fits": True, "memory": mem, "cache_share": min(1.0, cache / sz["pack_ffn"]), "read_bytes": read_bytes,
            "reads": reads, "io_s": io, "compute_s": compute, "tok_s": 1 / (io + compute),
            "stock_tok_s": 1 / stock, "speedup": stock / (io + compute), **sz}


def devices(probe: dict | None, io_threads: int = 4) -> dict[str, CostModel]:
    out = {}
    if probe:
        from ..iocost import model_at_depth
        here = model_at_depth(probe, io_threads)
        out["this disk (probed)"] = CostModel(here.t0_us, max(here.bw_mbps, probe.get("seq_bw_mbps") or 0))
    out[NVME["name"]] = CostModel(NVME["t0_us"], NVME["bw_mbps"])
    out[UFS40["name"]] = CostModel(UFS40["t0_us"], UFS40["bw_mbps"])
    return out


def projections(measured: dict[str, dict], probe: dict | None, densities, mem_share: float = 0.5) -> list[dict]:
    rows = []
    for t, m in measured.items():
        for name, shape in MODELS.items():
            for dev_name, dev in devices(probe).items():
                for d in densities:
                    key = {"type": t, "model": name, "device": dev_name, "density": d, "mem_share": mem_share}
                    if m.get("dense_ffn_gbps") is None:  # stock's token no slower than density 0: nothing to scale
                        rows.append({**key, "fits": False, "memory": None,
                                     "reason": "the dense FFN's time was below this machine's timing noise"})
                    else:
                        rows.append({**key, **project(m, shape, dev, d, mem_share)})
    return rows
