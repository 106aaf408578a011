"""The `ripple.*` neuron-group index kept in the GGUF's KV metadata (spec: docs/FORMAT.md).

Stock llama.cpp ignores unknown keys, so the file stays loadable everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import RippleError
from .gguf_io import kv, kv_array

# 2: the GGUF keeps the source neuron order; `order` places the pack's records (1: the GGUF was permuted)
FORMAT_VERSION = 2
EVAL_METHODS = ("stored", "identity", "frequency")


def in_pack_order(order: np.ndarray, per_neuron: np.ndarray) -> np.ndarray:
    """(tokens, n_ff) values in the GGUF's neuron order (what llama.cpp computes) -> pack order
    (position p holds GGUF neuron order[p])."""
    return np.asarray(per_neuron)[..., order]


def in_gguf_order(order: np.ndarray, per_position: np.ndarray) -> np.ndarray:
    """The inverse: (tokens, n_ff) values per pack position -> the GGUF's neuron order."""
    out = np.empty_like(per_position)
    out[..., order] = per_position
    return out


def blk(il: int, name: str) -> str:
    return f"ripple.blk.{il}.{name}"


@dataclass
class RippleIndex:
    placement: str
    activation: str                 # "zero" | "magnitude"
    target_density: float
    calib_tokens: int
    calib_source: str
    thresholds: np.ndarray          # (n_layer,)
    orders: list[np.ndarray]        # per layer: GGUF neuron index at each pack position (placement order)
    group_starts: list[np.ndarray]  # per layer: first pack position of each group
    act_freq: list[np.ndarray]      # per layer, per pack position: fraction of calib tokens active
    eval_tokens: int = 0
    eval: dict[str, np.ndarray] | None = None  # "active"/"stored"/"identity"/"frequency" -> (n_layer,)
    source: str = ""                # what was converted (file name or checkpoint)
    down_source_type: np.ndarray | None = None  # (n_layer,) ggml type of the source's ffn_down
    down_rel_rms: np.ndarray | None = None      # (n_layer,) error --down-type added to ffn_down (0: as stored)

    def in_pack_order(self, il: int, per_neuron: np.ndarray) -> np.ndarray:
        return in_pack_order(self.orders[il], per_neuron)

    def to_kv(self) -> dict:
        items = {
            "ripple.format_version": FORMAT_VERSION,
            "ripple.placement": self.placement,
            "ripple.activation": self.activation,
            "ripple.target_density": float(self.target_density),
            "ripple.calib.tokens": int(self.calib_tokens),
            "ripple.calib.source": self.calib_source,
            "ripple.n_layer": len(self.orders),
            "ripple.act_threshold": np.asarray(self.thresholds, dtype=np.float32),
        }
        for il, (o, g, f) in enumerate(zip(self.orders, self.group_starts, self.act_freq)):
            items[blk(il, "order")] = np.asarray(o, dtype=np.uint32)
            items[blk(il, "group_starts")] = np.asarray(g, dtype=np.uint32)
            items[blk(il, "act_freq")] = np.asarray(f, dtype=np.float32)
        if self.source:
            items["ripple.source"] = self.source
        if self.down_rel_rms is not None:
            items["ripple.down_source_type"] = np.asarray(self.down_source_type, dtype=np.uint32)
            items["ripple.down_rel_rms"] = np.asarray(self.down_rel_rms, dtype=np.float32)
        if self.eval:
            items["ripple.eval.tokens"] = int(self.eval_tokens)
            for name in ("active",) + EVAL_METHODS:
                items[f"ripple.eval.reads_per_token.{name}"] = np.asarray(self.eval[name], dtype=np.float32)
        return items


def read_index(reader, n_ff: list[int]) -> RippleIndex | None:
    """The index of a converted GGUF, validated against its FFN shapes; None for a plain GGUF."""
    version = kv(reader, "ripple.format_version")
    if version is None:
        return None
    if int(version) != FORMAT_VERSION:
        raise RippleError(f"ripple index format {version} is not supported (this version reads "
                          f"{FORMAT_VERSION}); reconvert with `ripple-gguf convert`")
    n_layer = int(kv(reader, "ripple.n_layer", -1))
    if n_layer != len(n_ff):
        raise RippleError(f"ripple index covers {n_layer} layers but the model has {len(n_ff)}; reconvert")

    def need(key: str, length: int, dtype) -> np.ndarray:
        arr = kv_array(reader, key)
        if arr is None or len(arr) != length:
            raise RippleError(f"ripple index key {key} is missing or has the wrong length; reconvert")
        return arr.astype(dtype)

    orders, groups, freqs = [], [], []
    for il, n in enumerate(n_ff):
        o = need(blk(il, "order"), n, np.int64)
        if not np.array_equal(np.sort(o), np.arange(n)):
            raise RippleError(f"{blk(il, 'order')} is not a permutation of the layer's neurons; reconvert")
        g = kv_array(reader, blk(il, "group_starts"))
        if g is None or len(g) == 0 or g[0] != 0 or np.any(np.diff(g.astype(np.int64)) <= 0) or g[-1] >= n:
            raise RippleError(f"{blk(il, 'group_starts')} is malformed; reconvert")
        orders.append(o)
        groups.append(g.astype(np.int64))
        freqs.append(need(blk(il, "act_freq"), n, np.float64))
    eval_ = None
    if kv(reader, "ripple.eval.tokens") is not None:
        eval_ = {name: need(f"ripple.eval.reads_per_token.{name}", n_layer, np.float64)
                 for name in ("active",) + EVAL_METHODS}
    down_type = kv_array(reader, "ripple.down_source_type")
    down_err = kv_array(reader, "ripple.down_rel_rms")
    if (down_type is None) != (down_err is None) or (down_err is not None and (len(down_err) != n_layer or len(down_type) != n_layer)):
        raise RippleError("ripple index keys ripple.down_source_type/down_rel_rms are malformed; reconvert")
    return RippleIndex(
        placement=str(kv(reader, "ripple.placement", "?")),
        activation=str(kv(reader, "ripple.activation", "?")),
        target_density=float(kv(reader, "ripple.target_density", 0.0)),
        calib_tokens=int(kv(reader, "ripple.calib.tokens", 0)),
        calib_source=str(kv(reader, "ripple.calib.source", "")),
        thresholds=need("ripple.act_threshold", n_layer, np.float32),
        orders=orders, group_starts=groups, act_freq=freqs,
        eval_tokens=int(kv(reader, "ripple.eval.tokens", 0)), eval=eval_,
        source=str(kv(reader, "ripple.source", "")),
        down_source_type=None if down_type is None else down_type.astype(np.int64),
        down_rel_rms=None if down_err is None else down_err.astype(np.float64))
