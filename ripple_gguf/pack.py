"""The offload pack `OUT.ripple` (spec: docs/FORMAT.md section 2): write, open, verify, read runs.

Per layer a neuron-major bundle table (record p = gate_p | up_p | down_p in the GGUF's stored
order, so a run of co-active neurons is one contiguous byte range), the predictors, and a binding
to the GGUF so a pack never runs against the wrong model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFReader, GGUFWriter

from .errors import RippleError
from .gguf_header import GGUFHeader, HeaderError
from .gguf_io import FfnLayout, add_ripple_kv, kv, kv_array, open_header, read_ffn_layout
from .predictor import LayerPredictor

PACK_VERSION = 1
PACK_ARCH = "ripple_pack"
PACK_ALIGN = 4096
PACK_TYPES = (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0)
_EDGE = 64 * 1024
REBUILD = "rebuild it with `ripple-gguf pack {gguf}`"


def pack_path_for(gguf_path: str | os.PathLike) -> Path:
    return Path(gguf_path).with_suffix(".ripple")


def row_bytes(qtype: QT, n: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n // block * size


def gguf_binding(header: GGUFHeader) -> str:
    """Hash of what makes a GGUF *this* model in *this* order (see FORMAT.md, Binding); reads only
    the hashed bytes (each ripple.* KV entry as stored, the edges of each FFN tensor)."""
    h = hashlib.sha256(b"ripple-pack-binding-v1")
    ffn = []
    for t in header.tensors:
        h.update(f"{t.name}|{int(t.tensor_type)}|{tuple(int(s) for s in t.shape)}|{int(t.data_offset)}|{int(t.n_bytes)}\n".encode())
        if ".ffn_" in t.name:
            ffn.append(t)
    for field in header.fields.values():
        if field.name.startswith("ripple."):
            h.update(header.raw(field.start, field.end))
    for t in ffn:
        lo, hi = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        h.update(header.raw(lo, min(hi, lo + _EDGE)))
        h.update(header.raw(max(lo, hi - _EDGE), hi))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# writing

def _rows_as(qtype: QT, tensor, rows_axis_last: bool) -> np.ndarray:
    """One neuron per row, in `qtype` bytes: (n_ff, row_bytes) uint8. gate/up rows are copied as
    they are when the type already matches; ffn_down columns are dequantized, transposed and
    re-quantized along n_embd."""
    n_embd = int(tensor.shape[0])
    if not rows_axis_last and tensor.tensor_type == qtype:
        return np.asarray(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)
    vals = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
    if rows_axis_last:  # ffn_down: numpy (n_embd, n_ff) -> neuron rows (n_ff, n_embd)
        vals = np.ascontiguousarray(vals.T)
    vals = vals.reshape(-1, n_embd if not rows_axis_last else vals.shape[1])
    if qtype == QT.F32:
        return vals.view(np.uint8)
    if qtype == QT.F16:
        return vals.astype(np.float16).view(np.uint8)
    return gguf.quants.quantize(vals, qtype).view(np.uint8).reshape(vals.shape[0], -1)


def layer_bundles(reader_tensors: dict, layout: FfnLayout, il: int, qtype: QT) -> np.ndarray:
    parts = []
    if layout.has_gate:
        parts.append(_rows_as(qtype, reader_tensors[f"blk.{il}.ffn_gate.weight"], False))
    parts.append(_rows_as(qtype, reader_tensors[f"blk.{il}.ffn_up.weight"], False))
    parts.append(_rows_as(qtype, reader_tensors[f"blk.{il}.ffn_down.weight"], True))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def pack_weight_type(reader: GGUFReader) -> QT:
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight").tensor_type
    if t not in PACK_TYPES:
        raise RippleError(f"FFN weights are {t.name}; packs support F32, F16, Q8_0 and Q4_0 "
                          "(reconvert with --outtype f16|q8_0|q4_0)")
    return t


def write_pack(gguf_path: Path, out: Path, predictors: list[LayerPredictor], stats: dict, meta: dict,
               progress: Callable[[int], None] | None = None) -> None:
    """Write the pack for `gguf_path` to `out` (callers pass a temporary name and rename)."""
    reader = GGUFReader(gguf_path)
    layout = read_ffn_layout(reader)
    qtype = pack_weight_type(reader)
    tensors = {t.name: t for t in reader.tensors}
    rb = row_bytes(qtype, layout.n_embd)
    bb = rb * (3 if layout.has_gate else 2)
    writer = GGUFWriter(out, PACK_ARCH)
    writer.add_custom_alignment(PACK_ALIGN)
    items = {
        "ripple.pack.format_version": PACK_VERSION,
        "ripple.pack.binding": gguf_binding(GGUFHeader(gguf_path)),
        "ripple.pack.gguf_name": Path(gguf_path).name,
        "ripple.pack.n_layer": layout.n_layer,
        "ripple.pack.n_embd": layout.n_embd,
        "ripple.pack.n_ff": np.asarray(layout.n_ff, dtype=np.uint32),
        "ripple.pack.has_gate": layout.has_gate,
        "ripple.pack.weight_type": int(qtype),
        "ripple.pack.row_bytes": rb,
        "ripple.pack.bundle_bytes": bb,
        "ripple.pack.activation": str(kv(reader, "ripple.activation", "zero")),
        "ripple.pack.act_threshold": np.asarray(meta["act_threshold"], dtype=np.float32),
        "ripple.pack.pred_rank": int(predictors[0].w1.shape[0]),
        "ripple.pack.pred_threshold": np.array([p.threshold for p in predictors], dtype=np.float32),
        "ripple.pack.target_recall": float(meta["target_recall"]),
        "ripple.pack.train_tokens": int(meta["train_tokens"]),
        "ripple.pack.eval.tokens": int(meta["eval_tokens"]),
    }
    for k, v in stats.items():
        items[f"ripple.pack.eval.{k}"] = np.asarray(v, dtype=np.float32)
    for il in range(layout.n_layer):
        g = kv_array(reader, f"ripple.blk.{il}.group_starts")
        items[f"ripple.blk.{il}.group_starts"] = g if g is not None else np.zeros(1, dtype=np.uint32)
    try:
        add_ripple_kv(writer, items)
        for il, p in enumerate(predictors):
            n_ff = layout.n_ff[il]
            writer.add_tensor_info(f"blk.{il}.ffn_bundles", (n_ff, bb), np.dtype(np.int8), n_ff * bb, QT.I8)
            writer.add_tensor_info(f"blk.{il}.pred_w1", p.w1.shape, np.dtype(np.float16), p.w1.size * 2, QT.F16)
            writer.add_tensor_info(f"blk.{il}.pred_b1", p.b1.shape, np.dtype(np.float32), p.b1.size * 4, QT.F32)
            writer.add_tensor_info(f"blk.{il}.pred_w2", p.w2.shape, np.dtype(np.float16), p.w2.size * 2, QT.F16)
            writer.add_tensor_info(f"blk.{il}.pred_b2", p.b2.shape, np.dtype(np.float32), p.b2.size * 4, QT.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for il, p in enumerate(predictors):
            bundles = layer_bundles(tensors, layout, il, qtype)
            assert bundles.shape == (layout.n_ff[il], bb), bundles.shape
            writer.write_tensor_data(bundles.view(np.int8))
            writer.write_tensor_data(p.w1.astype(np.float16))
            writer.write_tensor_data(p.b1.astype(np.float32))
            writer.write_tensor_data(p.w2.astype(np.float16))
            writer.write_tensor_data(p.b2.astype(np.float32))
            if progress:
                progress(1)
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# reading

@dataclass
class Pack:
    path: Path
    gguf_path: Path
    n_layer: int
    n_embd: int
    n_ff: list[int]
    has_gate: bool
    weight_type: QT
    row_bytes: int
    bundle_bytes: int
    bundle_offsets: list[int]        # absolute file offset of each layer's bundle table
    predictors: list[LayerPredictor]
    act_threshold: np.ndarray
    activation: str
    target_recall: float
    train_tokens: int
    eval_tokens: int
    stats: dict[str, np.ndarray]
    group_starts: list[np.ndarray]
    file_bytes: int

    @property
    def predictor_bytes(self) -> int:
        return sum(p.nbytes for p in self.predictors)

    def read_runs(self, il: int, runs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Bundles of neurons [start, start+count) for each run, one pread per run; returns float32
        gate/up/down rows (n, n_embd) in run order (the reference the C++ runtime is tested against)."""
        n_ff = self.n_ff[il]
        chunks = []
        with open(self.path, "rb", buffering=0) as f:
            for start, count in runs:
                if start < 0 or count <= 0 or start + count > n_ff:
                    raise ValueError(f"run ({start}, {count}) outside layer {il}'s {n_ff} neurons")
                want = count * self.bundle_bytes
                data = os.pread(f.fileno(), want, self.bundle_offsets[il] + start * self.bundle_bytes)
                if len(data) != want:
                    raise RippleError(f"{self.path}: short read in layer {il}; the pack is truncated — "
                                      + REBUILD.format(gguf=self.gguf_path))
                chunks.append(np.frombuffer(data, dtype=np.uint8).reshape(count, self.bundle_bytes))
        raw = np.concatenate(chunks, axis=0)
        rb = self.row_bytes
        names = ("gate", "up", "down") if self.has_gate else ("up", "down")
        out = {}
        for k, name in enumerate(names):
            rows = np.ascontiguousarray(raw[:, k * rb:(k + 1) * rb])
            out[name] = gguf.quants.dequantize(rows, self.weight_type).reshape(len(raw), self.n_embd).astype(np.float32)
        return out


def open_pack(gguf_path: str | os.PathLike, pack_path: str | os.PathLike | None = None) -> Pack:
    """Open and fully validate a pack against its GGUF; refuses anything that does not match.
    Reads only the two headers, the binding's bytes and the predictors (no readahead), so opening a
    pack for a model larger than RAM does not pull either file into the page cache."""
    gguf_path = Path(gguf_path)
    path = Path(pack_path) if pack_path else pack_path_for(gguf_path)
    fix = REBUILD.format(gguf=gguf_path)
    if not path.is_file():
        raise RippleError(f"no offload pack at {path}; {fix}")
    size = path.stat().st_size
    try:
        r = GGUFHeader(path)
    except (HeaderError, OSError, UnicodeDecodeError) as e:
        raise RippleError(f"{path} is truncated or not a ripple pack ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {fix}") from None
    if kv(r, "general.architecture") != PACK_ARCH:
        raise RippleError(f"{path} is not a ripple pack; {fix}")
    version = kv(r, "ripple.pack.format_version")
    if version != PACK_VERSION:
        raise RippleError(f"{path} has pack format {version}, this version reads {PACK_VERSION}; {fix}")
    for t in r.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise RippleError(f"{path} is truncated ({t.name} ends past the end of the file); {fix}")
    greader = open_header(gguf_path)
    if kv(r, "ripple.pack.binding") != gguf_binding(greader):
        raise RippleError(f"{path} was built for a different GGUF than {gguf_path.name} "
                          f"(built for {kv(r, 'ripple.pack.gguf_name')!r}); {fix}")
    layout = read_ffn_layout(greader)
    n_layer = int(kv(r, "ripple.pack.n_layer", -1))
    n_embd = int(kv(r, "ripple.pack.n_embd", -1))
    n_ff_arr = kv_array(r, "ripple.pack.n_ff")
    n_ff = [] if n_ff_arr is None else [int(v) for v in n_ff_arr]
    type_id = kv(r, "ripple.pack.weight_type", -1)
    qtype = QT(type_id) if type_id in {int(q) for q in PACK_TYPES} else None
    has_gate = bool(kv(r, "ripple.pack.has_gate", False))
    rb, bb = int(kv(r, "ripple.pack.row_bytes", -1)), int(kv(r, "ripple.pack.bundle_bytes", -1))
    if (n_layer != layout.n_layer or n_embd != layout.n_embd or n_ff != layout.n_ff or qtype is None
            or has_gate != layout.has_gate or rb != row_bytes(qtype, n_embd) or bb != rb * (3 if has_gate else 2)):
        raise RippleError(f"{path}: header does not describe {gguf_path.name}'s FFN; {fix}")
    tensors = {t.name: t for t in r.tensors}
    offsets, preds = [], []
    thresholds = kv_array(r, "ripple.pack.pred_threshold")
    act_threshold = kv_array(r, "ripple.pack.act_threshold")
    if thresholds is None or len(thresholds) != n_layer or act_threshold is None or len(act_threshold) != n_layer:
        raise RippleError(f"{path}: per-layer thresholds missing; {fix}")
    rank = int(kv(r, "ripple.pack.pred_rank", 0))
    for il in range(n_layer):
        def t(name, shape, qt):
            tt = tensors.get(f"blk.{il}.{name}")
            if tt is None or tt.tensor_type != qt or tuple(int(s) for s in reversed(tt.shape)) != shape:
                raise RippleError(f"{path}: tensor blk.{il}.{name} missing or malformed; {fix}")
            return tt
        b = t("ffn_bundles", (n_ff[il], bb), QT.I8)
        if int(b.data_offset) % PACK_ALIGN:
            raise RippleError(f"{path}: layer {il} bundles are not 4096-aligned; {fix}")
        offsets.append(int(b.data_offset))
        def arr(name, shape, qt):
            return np.asarray(r.tensor_data(t(name, shape, qt)), dtype=np.float32)
        p = LayerPredictor(arr("pred_w1", (rank, n_embd), QT.F16), arr("pred_b1", (rank,), QT.F32),
                           arr("pred_w2", (n_ff[il], rank), QT.F16), arr("pred_b2", (n_ff[il],), QT.F32),
                           float(thresholds[il]))
        preds.append(p)
    stats = {}
    for k in ("recall", "mass_recall", "precision", "pred_density", "true_density"):
        v = kv_array(r, f"ripple.pack.eval.{k}")
        if v is not None:
            stats[k] = v.astype(np.float64)
    groups = [kv_array(r, f"ripple.blk.{il}.group_starts") for il in range(n_layer)]
    return Pack(path, gguf_path, n_layer, n_embd, n_ff, has_gate, qtype, rb, bb, offsets, preds,
                act_threshold.astype(np.float32), str(kv(r, "ripple.pack.activation", "")),
                float(kv(r, "ripple.pack.target_recall", 0.0)), int(kv(r, "ripple.pack.train_tokens", 0)),
                int(kv(r, "ripple.pack.eval.tokens", 0)), stats, groups, size)
