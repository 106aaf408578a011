"""The offload pack `OUT.ripple` (spec: docs/FORMAT.md section 2): write, open, verify, read runs.

Per layer a neuron-major bundle table (record p = gate | up | down of GGUF neuron order[p], the
placement order, so a run of co-active neurons is one contiguous byte range), the predictors, and
a binding to the GGUF so a pack never runs against the wrong model.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFWriter

from . import ggml_quant
from .checksum import record_sums, ripple_sum
from .errors import RippleError
from .gguf_header import GGUFHeader, HeaderError
from .gguf_io import FfnLayout, add_ripple_kv, kv, kv_array, open_header, read_ffn_layout, tensor_bytes
from .predictor import LayerPredictor

PACK_VERSION = 3  # 2: per-layer, per-part row types (any ggml type), checksums; 3: records in placement order of the unpermuted GGUF (ripple.blk.{i}.order)
PACK_ARCH = "ripple_pack"
PACK_ALIGN = 4096
# a neuron cache below one layer plans each layer in chunks of at least this many neurons (the runtime's
# RIPPLE_PACK_MIN_CHUNK, llama-ripple-impl.h; tests compare the two)
PACK_MIN_CHUNK = 256
_EDGE = 64 * 1024
REBUILD = "rebuild it with `ripple-gguf pack {gguf}`"
HEADER_SUM = "header_sum"  # tensor holding the checksum of the pack's header (last in the file)
PRED_PARTS = ("pred_w1", "pred_b1", "pred_w2", "pred_b2")


def pack_path_for(gguf_path: str | os.PathLike) -> Path:
    return Path(gguf_path).with_suffix(".ripple")


def row_bytes(qtype: QT, n: int) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return n // block * size


def _binding_parts(header: GGUFHeader, lines: Callable) -> list[bytes]:
    parts, ffn = [], []
    for t in header.tensors:
        parts.append(lines(t).encode())
        if ".ffn_" in t.name:
            ffn.append(t)
    for field in header.fields.values():
        if field.name.startswith("ripple."):
            parts.append(header.raw(field.start, field.end))
    for t in ffn:
        lo, hi = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        parts.append(header.raw(lo, min(hi, lo + _EDGE)))
        parts.append(header.raw(max(lo, hi - _EDGE), hi))
    return parts


def _sha_line(t) -> str:
    return f"{t.name}|{int(t.tensor_type)}|{tuple(int(s) for s in t.shape)}|{int(t.data_offset)}|{int(t.n_bytes)}\n"


def _sum_line(t) -> str:
    ne = [int(s) for s in t.shape] + [1] * (4 - len(t.shape))
    return f"{t.name}|{int(t.tensor_type)}|{','.join(map(str, ne))}|{int(t.data_offset)}|{int(t.n_bytes)}\n"


def gguf_binding(header: GGUFHeader) -> str:
    """Hash of what makes a GGUF *this* model in *this* order (see FORMAT.md, Binding); reads only
    the hashed bytes (each ripple.* KV entry as stored, the edges of each FFN tensor)."""
    h = hashlib.sha256(b"ripple-pack-binding-v1")
    for part in _binding_parts(header, _sha_line):
        h.update(part)
    return h.hexdigest()


def gguf_binding_sum(header: GGUFHeader) -> int:
    """The same binding as a ripple_sum the C++ runtime recomputes at attach (FORMAT.md, Binding):
    tensor lines with all four ne, so they follow from what llama.cpp's GGUF reader exposes."""
    parts = [b"ripple-pack-binding-sum-v1"] + _binding_parts(header, _sum_line)
    return ripple_sum(b"".join(parts))


def header_sum(path: Path, data_start: int) -> int:
    """Checksum of a pack's header (magic, KV, tensor infos, padding: bytes [0, data_start))."""
    with open(path, "rb") as f:
        data = f.read(data_start)
    if len(data) != data_start:
        raise RippleError(f"{path} is truncated (header)")
    return ripple_sum(data)


# ---------------------------------------------------------------------------------------------
# writing

PARTS = ("gate", "up", "down")


def _raw_rows(header: GGUFHeader, t, n_rows: int) -> np.ndarray:
    """A tensor's bytes as (n_rows, row_bytes) uint8, memory-mapped (read once, in order)."""
    return tensor_bytes(header, t).reshape(n_rows, -1)


DOWN_POLICIES = ("auto", "source")


def _bits(qtype: QT) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


def pack_down_type(src: QT, n_embd: int, policy: str = "auto") -> QT:
    """The type a layer's down rows are packed in. They are re-quantized along n_embd (a second
    rounding on top of the GGUF's), which on a real 4-5 bit model costs several times the model's
    own quantization error, so "auto" writes at least Q8_0 (F16/BF16/F32 stay exact); "source" keeps
    the GGUF's type (llama.cpp's fallback where n_embd does not fit its block); a type name forces it."""
    src = QT(src)
    if policy == "source":
        return ggml_quant.fallback_type(src, n_embd)
    if policy == "auto":
        t = ggml_quant.fallback_type(src, n_embd)
        return t if _bits(t) >= _bits(QT.Q8_0) else ggml_quant.fallback_type(QT.Q8_0, n_embd)
    try:
        t = QT[policy.upper()]
    except KeyError:
        raise RippleError(f"unknown down type {policy!r}; use auto, source or a ggml type such as q8_0 or f16") from None
    if not ggml_quant.can_quantize(t) or n_embd % ggml_quant.block_size(t) or ggml_quant.requires_imatrix(t):
        raise RippleError(f"down rows cannot be written as {t.name} for n_embd {n_embd}; use q8_0 or f16")
    return t


def down_rows(header: GGUFHeader, t, n_embd: int, n_ff: int, qtype: QT) -> tuple[np.ndarray, float]:
    """ffn_down (ggml {n_ff, n_embd}: a neuron is a column, blocks run along n_ff) as one row per
    neuron in `qtype`: dequantized with ggml, transposed, re-quantized along n_embd with ggml's
    quantizer. Returns (rows, relative RMS error of the rows against the GGUF's dequantized down)."""
    src_type = QT(t.tensor_type)
    vals = ggml_quant.dequantize(_raw_rows(header, t, n_embd), src_type, n_ff)      # (n_embd, n_ff)
    cols = np.ascontiguousarray(vals.T)                                          # (n_ff, n_embd)
    rows = ggml_quant.quantize(cols, qtype)
    err = 0.0
    if qtype not in (QT.F32,) and not (qtype == src_type and qtype in (QT.F16, QT.BF16)):
        err = ggml_quant.relative_rms(cols, ggml_quant.dequantize(rows, qtype, n_embd))
    return rows, err


def layer_bundles(header: GGUFHeader, tensors: dict, layout: FfnLayout, il: int, order: np.ndarray,
                  down_policy: str = "auto") -> tuple[np.ndarray, dict]:
    """Layer il's records (n_ff, bundle_bytes), record p holding GGUF neuron order[p], and what they
    hold: {part: type, 'down_source': type, 'down_rel_rms': float}."""
    n_ff, n_embd = layout.n_ff[il], layout.n_embd
    parts, info = [], {}
    for part in ("gate", "up"):
        t = tensors.get(f"blk.{il}.ffn_{part}.weight")
        if t is None:
            continue
        parts.append(_raw_rows(header, t, n_ff)[order])  # neuron i is row i: copied as stored
        info[part] = QT(t.tensor_type)
    t = tensors[f"blk.{il}.ffn_down.weight"]
    info["down"] = pack_down_type(QT(t.tensor_type), n_embd, down_policy)
    rows, info["down_rel_rms"] = down_rows(header, t, n_embd, n_ff, info["down"])
    info["down_source"] = QT(t.tensor_type)
    parts.append(rows[order])
    return np.ascontiguousarray(np.concatenate(parts, axis=1)), info


def check_pack_types(header: GGUFHeader, layout: FfnLayout) -> None:
    """Refuse FFN weights the runtime cannot compute, before any work."""
    for t in header.tensors:
        if ".ffn_" not in t.name or not t.name.endswith(".weight"):
            continue
        qt = QT(t.tensor_type)
        if qt in (QT.I8, QT.I16, QT.I32, QT.I64, QT.F64):
            raise RippleError(f"{t.name} is {qt.name}, not a weight type llama.cpp computes FFNs in; "
                              "reconvert the model with `ripple-gguf convert`")
        if t.name.endswith("ffn_down.weight"):
            ggml_quant.fallback_type(qt, layout.n_embd)  # raises if ggml has no such type


def record_layout(header: GGUFHeader, layout, down_policy: str = "auto") -> tuple[dict, list[int]]:
    """({"gate"?, "up", "down", "down_source"} -> per-layer ggml types of a record's rows, per-layer
    record bytes) of the pack write_pack makes for this GGUF."""
    tensors = {t.name: t for t in header.tensors}
    kinds = ("gate", "up") if layout.has_gate else ("up",)
    types = {k: [] for k in ("gate", "up", "down", "down_source")}
    for il in range(layout.n_layer):
        for part in kinds:
            types[part].append(QT(tensors[f"blk.{il}.ffn_{part}.weight"].tensor_type))
        src = QT(tensors[f"blk.{il}.ffn_down.weight"].tensor_type)
        types["down_source"].append(src)
        types["down"].append(pack_down_type(src, layout.n_embd, down_policy))
    return types, [sum(row_bytes(types[k][il], layout.n_embd) for k in (*kinds, "down")) for il in range(layout.n_layer)]


def write_pack(gguf_path: Path, out: Path, orders: list[np.ndarray], predictors: list[LayerPredictor],
               stats: dict, meta: dict, progress: Callable[[int], None] | None = None,
               down_policy: str = "auto") -> dict:
    """Write the pack for `gguf_path` to `out` (callers pass a temporary name and rename), record p
    of layer i holding GGUF neuron orders[i][p] (the index's placement). Returns what each layer's
    records hold (types, down requantization error)."""
    gguf_path = Path(gguf_path)
    header = GGUFHeader(gguf_path)
    layout = read_ffn_layout(header)
    check_pack_types(header, layout)
    tensors = {t.name: t for t in header.tensors}
    # record sizes follow from the types alone, so the header is written before any weight is read
    kinds = ("gate", "up") if layout.has_gate else ("up",)
    types, bundle = record_layout(header, layout, down_policy)
    ranks = {int(p.w1.shape[0]) for p in predictors}
    if len(ranks) != 1:  # one ripple.pack.pred_rank: a reader would refuse the pack we wrote
        raise RippleError(f"predictors of different widths {sorted(ranks)}; the pack holds one rank for every layer")
    writer = GGUFWriter(out, PACK_ARCH)
    writer.add_custom_alignment(PACK_ALIGN)
    items = {
        "ripple.pack.format_version": PACK_VERSION,
        "ripple.pack.binding": gguf_binding(header),
        "ripple.pack.gguf_name": gguf_path.name,
        "ripple.pack.n_layer": layout.n_layer,
        "ripple.pack.n_embd": layout.n_embd,
        "ripple.pack.n_ff": np.asarray(layout.n_ff, dtype=np.uint32),
        "ripple.pack.has_gate": layout.has_gate,
        "ripple.pack.down_policy": down_policy,
        **{f"ripple.pack.{k}_type": np.asarray([int(q) for q in types[k]], dtype=np.uint32)
           for k in (*kinds, "down", "down_source")},
        "ripple.pack.bundle_bytes": np.asarray(bundle, dtype=np.uint32),
        "ripple.pack.activation": str(kv(header, "ripple.activation", "zero")),
        "ripple.pack.act_threshold": np.asarray(meta["act_threshold"], dtype=np.float32),
        "ripple.pack.pred_rank": int(predictors[0].w1.shape[0]),
        "ripple.pack.pred_threshold": np.array([p.threshold for p in predictors], dtype=np.float32),
        # operating points (FORMAT.md "Operating points"): dense first, densest to sparsest
        "ripple.pack.op.density": np.array([q.density for q in meta["points"]], dtype=np.float32),
        "ripple.pack.op.ppl_increase": np.array([q.ppl_increase for q in meta["points"]], dtype=np.float32),
        "ripple.pack.op.thresholds": np.concatenate([q.thresholds for q in meta["points"]]).astype(np.float32),
        "ripple.pack.op.floor": np.array([q.floor for q in meta["points"]], dtype=np.float32),
        "ripple.pack.op.read_share": np.array([q.read_share for q in meta["points"]], dtype=np.float32),
        "ripple.pack.pred_floor": float(meta["points"][meta["default_point"]].floor),
        "ripple.pack.op.default": int(meta["default_point"]),
        "ripple.pack.op.max_ppl_increase": float(meta["max_ppl_increase"]),
        "ripple.pack.op.ppl_tokens": int(meta["ppl_tokens"]),
        "ripple.pack.train_tokens": int(meta["train_tokens"]),
        "ripple.pack.eval.tokens": int(meta["eval_tokens"]),
    }
    for k, v in stats.items():
        items[f"ripple.pack.eval.{k}"] = np.asarray(v, dtype=np.float32)
    for il in range(layout.n_layer):
        g = kv_array(header, f"ripple.blk.{il}.group_starts")
        items[f"ripple.blk.{il}.group_starts"] = g if g is not None else np.zeros(1, dtype=np.uint32)
        items[f"ripple.blk.{il}.order"] = np.asarray(orders[il], dtype=np.uint32)
    # down_rel_rms is known only once each layer's rows are made: written as zeros (fixed size),
    # then patched in place, so layers stream through one at a time
    items["ripple.pack.down_rel_rms"] = np.zeros(layout.n_layer, dtype=np.float32)
    errors = np.zeros(layout.n_layer, dtype=np.float32)
    pred_arrays = [(p.w1.astype(np.float16), p.b1.astype(np.float32), p.w2.astype(np.float16), p.b2.astype(np.float32))
                   for p in predictors]
    pred_sums = [ripple_sum(a, (k, il)) for il, arrs in enumerate(pred_arrays) for k, a in enumerate(arrs)]
    try:
        add_ripple_kv(writer, items)
        # checksums (FORMAT.md "Checksums"): u64 values written as such whatever their size
        writer.add_uint64("ripple.pack.binding_sum", gguf_binding_sum(header))
        writer.add_key_value("ripple.pack.pred_sums", pred_sums, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT64)
        for il, p in enumerate(predictors):
            n_ff = layout.n_ff[il]
            writer.add_tensor_info(f"blk.{il}.ffn_bundles", (n_ff, bundle[il]), np.dtype(np.int8), n_ff * bundle[il], QT.I8)
            writer.add_tensor_info(f"blk.{il}.ffn_bundle_sums", (n_ff,), np.dtype(np.int64), n_ff * 8, QT.I64)
            writer.add_tensor_info(f"blk.{il}.pred_w1", p.w1.shape, np.dtype(np.float16), p.w1.size * 2, QT.F16)
            writer.add_tensor_info(f"blk.{il}.pred_b1", p.b1.shape, np.dtype(np.float32), p.b1.size * 4, QT.F32)
            writer.add_tensor_info(f"blk.{il}.pred_w2", p.w2.shape, np.dtype(np.float16), p.w2.size * 2, QT.F16)
            writer.add_tensor_info(f"blk.{il}.pred_b2", p.b2.shape, np.dtype(np.float32), p.b2.size * 4, QT.F32)
        writer.add_tensor_info(HEADER_SUM, (1,), np.dtype(np.int64), 8, QT.I64)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for il, p in enumerate(predictors):
            rows, info = layer_bundles(header, tensors, layout, il, orders[il], down_policy)
            assert rows.shape == (layout.n_ff[il], bundle[il]) and info["down"] == types["down"][il], (rows.shape, info)
            errors[il] = info["down_rel_rms"]
            writer.write_tensor_data(rows.view(np.int8))
            writer.write_tensor_data(record_sums(rows, 0, il).view(np.int64))
            del rows
            for a in pred_arrays[il]:
                writer.write_tensor_data(a)
            if progress:
                progress(1)
        writer.write_tensor_data(np.zeros(1, dtype=np.int64))  # header_sum, patched below
    finally:
        writer.close()
    written = GGUFHeader(out)
    field = written.fields["ripple.pack.down_rel_rms"]
    with open(out, "r+b") as f:
        f.seek(field.end - errors.nbytes)
        f.write(errors.astype("<f4").tobytes())
    # last: the header checksum covers every KV value, the patched down_rel_rms included
    hs = next(t for t in written.tensors if t.name == HEADER_SUM)
    value = header_sum(out, written.data_start)
    with open(out, "r+b") as f:
        f.seek(hs.data_offset)
        f.write(np.array([value], dtype="<u8").tobytes())
    return {"types": {k: [q.name for q in v] for k, v in types.items()}, "down_rel_rms": errors.tolist()}


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
    part_types: list[dict[str, QT]]  # per layer: {"gate"?, "up", "down"} -> ggml type of its rows
    down_source_type: list[QT]       # per layer: the GGUF's ffn_down type the down rows came from
    down_rel_rms: np.ndarray         # per layer: relative RMS error of the down rows vs the GGUF
    layer_bundle_bytes: list[int]    # per layer: bytes of one record
    bundle_offsets: list[int]        # absolute file offset of each layer's bundle table
    predictors: list[LayerPredictor]
    act_threshold: np.ndarray
    activation: str
    op_density: np.ndarray           # per operating point: mean predicted density (bytes-weighted)
    op_ppl_increase: np.ndarray      # per operating point: relative perplexity increase on calibration text
    op_thresholds: np.ndarray        # (points, n_layer) predictor thresholds
    op_floor: np.ndarray             # per operating point: per-token floor share (ripple.pack.op.floor)
    op_default: int                  # the point whose thresholds are ripple.pack.pred_threshold
    op_budget: float                 # the budget the default was chosen for
    train_tokens: int
    eval_tokens: int
    stats: dict[str, np.ndarray]
    group_starts: list[np.ndarray]
    file_bytes: int
    sum_offsets: list[int] = None    # absolute file offset of each layer's record checksums (u64[n_ff])
    orders: list[np.ndarray] = None  # per layer: the GGUF neuron each record holds
    op_read_share: np.ndarray | None = None  # per operating point: FFN bytes the pack reads a token, uncached
                                             # (ripple.pack.op.read_share; None in packs before it)

    @property
    def predictor_bytes(self) -> int:
        return sum(p.nbytes for p in self.predictors)

    @property
    def bundle_bytes(self) -> int:
        """The largest record: one neuron-cache slot (the runtime sizes every slot to it)."""
        return max(self.layer_bundle_bytes)

    @property
    def min_cache_bytes(self) -> int:
        """The smallest neuron cache the runtime accepts: one chunk of slots (RIPPLE_PACK_MIN_CHUNK in
        llama-ripple-impl.h; below one layer the runtime plans each layer in chunks)."""
        return min(max(self.n_ff), PACK_MIN_CHUNK) * self.bundle_bytes

    @property
    def layer_cache_bytes(self) -> int:
        """A neuron cache that plans every layer whole: one layer of slots."""
        return max(self.n_ff) * self.bundle_bytes

    @property
    def every_slot_bytes(self) -> int:
        """A neuron cache with a slot for every neuron (slots are the largest record's size, so a
        mixed-type file needs more than its FFN bytes)."""
        return sum(self.n_ff) * self.bundle_bytes

    @property
    def ffn_pack_bytes(self) -> int:
        return sum(n * b for n, b in zip(self.n_ff, self.layer_bundle_bytes))

    @property
    def type_label(self) -> str:
        """e.g. "F16", or "gate Q5_0, up Q5_0, down Q5_0+Q8_0" for mixed files."""
        parts = list(self.part_types[0])
        seen = {k: sorted({t[k].name for t in self.part_types}) for k in parts}
        names = {n for v in seen.values() for n in v}
        if len(names) == 1:
            return names.pop()
        return ", ".join(f"{k} {'+'.join(v)}" for k, v in seen.items())

    def read_runs(self, il: int, runs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Bundles of neurons [start, start+count) for each run, one pread per run; returns float32
        gate/up/down rows (n, n_embd) in run order (the reference the C++ runtime is tested against)."""
        n_ff, bb = self.n_ff[il], self.layer_bundle_bytes[il]
        chunks = []
        with open(self.path, "rb", buffering=0) as f:
            for start, count in runs:
                if start < 0 or count <= 0 or start + count > n_ff:
                    raise ValueError(f"run ({start}, {count}) outside layer {il}'s {n_ff} neurons")
                want = count * bb
                data = os.pread(f.fileno(), want, self.bundle_offsets[il] + start * bb)
                if len(data) != want:
                    raise RippleError(f"{self.path}: short read in layer {il}; the pack is truncated — "
                                      + REBUILD.format(gguf=self.gguf_path))
                rec = np.frombuffer(data, dtype=np.uint8).reshape(count, bb)
                sums = os.pread(f.fileno(), count * 8, self.sum_offsets[il] + start * 8)
                if len(sums) != count * 8 or (record_sums(rec, start, il) != np.frombuffer(sums, "<u8")).any():
                    raise RippleError(f"{self.path}: layer {il} bundles are damaged (checksum mismatch near record "
                                      f"{start}); " + REBUILD.format(gguf=self.gguf_path))
                chunks.append(rec)
        raw = np.concatenate(chunks, axis=0)
        out, at = {}, 0
        for name, qt in self.part_types[il].items():
            rb = row_bytes(qt, self.n_embd)
            out[name] = ggml_quant.dequantize(raw[:, at:at + rb], qt, self.n_embd)
            at += rb
        return out


def _expected_down(src: QT, n_embd: int, policy: str) -> QT | None:
    try:
        return pack_down_type(src, n_embd, policy)
    except RippleError:
        return None


def _type_array(r: GGUFHeader, key: str, n_layer: int) -> list[QT] | None:
    v = kv_array(r, key)
    if v is None or len(v) != n_layer:
        return None
    try:
        return [QT(int(x)) for x in v]
    except ValueError:
        return None


def not_converted(gguf_path) -> RippleError:
    """The error for a GGUF without ripple-gguf's index (never converted), naming the command that makes one."""
    gguf_path = Path(gguf_path)
    out = gguf_path.with_name(gguf_path.stem + "-ripple.gguf")
    return RippleError(f"{gguf_path} is not a ripple-gguf conversion (no ripple index): "
                       f"`ripple-gguf convert {gguf_path} -o {out}` makes one (and its pack); "
                       "or pass --dense to run it on llama.cpp's stock path")


def _has_ripple_index(gguf_path: Path) -> bool:
    """Does this GGUF carry ripple-gguf's neuron-group index (was it converted)? True where its header
    cannot be read: the pack's own checks then say what is wrong."""
    from .gguf_io import open_header, read_ffn_layout
    from .index_keys import read_index
    try:
        header = open_header(gguf_path)
        return read_index(header, read_ffn_layout(header).n_ff) is not None
    except (RippleError, OSError):
        return True


def open_pack(gguf_path: str | os.PathLike, pack_path: str | os.PathLike | None = None,
              predictors: bool = True) -> Pack:
    """Open and fully validate a pack against its GGUF; refuses anything that does not match.
    Reads only the two headers, the binding's bytes and the predictors (no readahead), so opening a
    pack for a model larger than RAM does not pull either file into the page cache.
    predictors=False leaves them unread (Pack.predictors empty; the library that reads them checks
    their checksums): decoded to float32 they are 2x their file size (32 MiB at 0.5B size), and a run
    that does not use them kept ~7 MiB of that freed memory, page cache a model that just fits lacks."""
    gguf_path = Path(gguf_path)
    path = Path(pack_path) if pack_path else pack_path_for(gguf_path)
    fix = REBUILD.format(gguf=gguf_path)
    if not path.is_file():
        if not pack_path and not _has_ripple_index(gguf_path):
            raise not_converted(gguf_path)
        raise RippleError(f"no offload pack at {path}; {fix}")
    size = path.stat().st_size
    try:
        r = GGUFHeader(path)
    except (HeaderError, OSError, UnicodeDecodeError) as e:
        raise RippleError(f"{path} is truncated or not a ripple pack ({str(e).splitlines()[0] if str(e) else type(e).__name__}); {fix}") from None
    for t in r.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise RippleError(f"{path} is truncated ({t.name} ends past the end of the file); {fix}")
    check_header_sum(r, path, fix)
    if kv(r, "general.architecture") != PACK_ARCH:
        raise RippleError(f"{path} is not a ripple pack; {fix}")
    version = kv(r, "ripple.pack.format_version")
    if version != PACK_VERSION:
        raise RippleError(f"{path} has pack format {version}, this version reads {PACK_VERSION}; {fix}")
    if not any(t.name == HEADER_SUM for t in r.tensors):
        raise RippleError(f"{path} has no checksums (written by an earlier version); {fix}")
    greader = open_header(gguf_path)
    if kv(r, "ripple.pack.binding") != gguf_binding(greader):
        raise RippleError(f"{path} was built for a different GGUF than {gguf_path.name} "
                          f"(built for {kv(r, 'ripple.pack.gguf_name')!r}); {fix}")
    layout = read_ffn_layout(greader)
    gt = {t.name: QT(t.tensor_type) for t in greader.tensors}
    n_layer = int(kv(r, "ripple.pack.n_layer", -1))
    n_embd = int(kv(r, "ripple.pack.n_embd", -1))
    n_ff_arr = kv_array(r, "ripple.pack.n_ff")
    n_ff = [] if n_ff_arr is None else [int(v) for v in n_ff_arr]
    has_gate = bool(kv(r, "ripple.pack.has_gate", False))
    bad = RippleError(f"{path}: header does not describe {gguf_path.name}'s FFN; {fix}")
    if n_layer != layout.n_layer or n_embd != layout.n_embd or n_ff != layout.n_ff or has_gate != layout.has_gate:
        raise bad
    kinds = ("gate", "up") if has_gate else ("up",)
    policy = str(kv(r, "ripple.pack.down_policy", "source"))
    types = {k: _type_array(r, f"ripple.pack.{k}_type", n_layer) for k in (*kinds, "down", "down_source")}
    bb = kv_array(r, "ripple.pack.bundle_bytes")
    rel = kv_array(r, "ripple.pack.down_rel_rms")
    if any(v is None for v in types.values()) or bb is None or len(bb) != n_layer or rel is None or len(rel) != n_layer:
        raise bad
    part_types = []
    for il in range(n_layer):
        parts = {k: types[k][il] for k in (*kinds, "down")}
        # gate/up are the GGUF's rows as stored; down follows from the GGUF's down type
        if (any(parts[k] != gt.get(f"blk.{il}.ffn_{k}.weight") for k in kinds)
                or types["down_source"][il] != gt.get(f"blk.{il}.ffn_down.weight")
                or parts["down"] != _expected_down(types["down_source"][il], n_embd, policy)
                or int(bb[il]) != sum(row_bytes(q, n_embd) for q in parts.values())):
            raise bad
        part_types.append(parts)
    tensors = {t.name: t for t in r.tensors}
    offsets, preds = [], []
    thresholds = kv_array(r, "ripple.pack.pred_threshold")
    act_threshold = kv_array(r, "ripple.pack.act_threshold")
    if thresholds is None or len(thresholds) != n_layer or act_threshold is None or len(act_threshold) != n_layer:
        raise RippleError(f"{path}: per-layer thresholds missing; {fix}")
    rank = int(kv(r, "ripple.pack.pred_rank", 0))
    pred_sums = kv_array(r, "ripple.pack.pred_sums")
    if (pred_sums is None or pred_sums.dtype != np.uint64 or len(pred_sums) != len(PRED_PARTS) * n_layer
            or not isinstance(kv(r, "ripple.pack.binding_sum"), int)):
        raise RippleError(f"{path}: checksum keys missing or malformed; {fix}")
    sum_offsets = []
    for il in range(n_layer):
        def t(name, shape, qt):
            tt = tensors.get(f"blk.{il}.{name}")
            if tt is None or tt.tensor_type != qt or tuple(int(s) for s in reversed(tt.shape)) != shape:
                raise RippleError(f"{path}: tensor blk.{il}.{name} missing or malformed; {fix}")
            return tt
        b = t("ffn_bundles", (n_ff[il], int(bb[il])), QT.I8)
        if int(b.data_offset) % PACK_ALIGN:
            raise RippleError(f"{path}: layer {il} bundles are not 4096-aligned; {fix}")
        offsets.append(int(b.data_offset))
        sum_offsets.append(int(t("ffn_bundle_sums", (n_ff[il],), QT.I64).data_offset))

        def arr(name, shape, qt):
            tt = t(name, shape, qt)
            raw = r.raw(tt.data_offset, tt.data_offset + tt.n_bytes)
            if ripple_sum(raw, (PRED_PARTS.index(name), il)) != int(pred_sums[len(PRED_PARTS) * il + PRED_PARTS.index(name)]):
                raise RippleError(f"{path}: layer {il} predictor ({name}) is damaged (checksum mismatch); {fix}")
            dt = np.float16 if qt == QT.F16 else np.float32
            return np.frombuffer(raw, dtype=dt).reshape(shape).astype(np.float32)
        parts = [("pred_w1", (rank, n_embd), QT.F16), ("pred_b1", (rank,), QT.F32),
                 ("pred_w2", (n_ff[il], rank), QT.F16), ("pred_b2", (n_ff[il],), QT.F32)]  # PRED_PARTS' order
        if predictors:
            preds.append(LayerPredictor(*(arr(*part) for part in parts), float(thresholds[il])))
        else:
            for part in parts:
                t(*part)  # present and well-formed; the bytes are the library's to check
    *ops, read_share = _operating_points(r, n_layer, thresholds, path, fix)
    stats = {}
    for k in ("recall", "mass_recall", "precision", "pred_density", "true_density"):
        v = kv_array(r, f"ripple.pack.eval.{k}")
        if v is not None:
            stats[k] = v.astype(np.float64)
    groups = [kv_array(r, f"ripple.blk.{il}.group_starts") for il in range(n_layer)]
    orders = [kv_array(r, f"ripple.blk.{il}.order") for il in range(n_layer)]
    for il, o in enumerate(orders):
        if o is None or len(o) != n_ff[il] or not np.array_equal(np.sort(o.astype(np.int64)), np.arange(n_ff[il])):
            raise RippleError(f"{path}: ripple.blk.{il}.order is missing or not a permutation of the layer's neurons; {fix}")
    return Pack(path, gguf_path, n_layer, n_embd, n_ff, has_gate, part_types, types["down_source"],
                rel.astype(np.float64), [int(v) for v in bb], offsets, preds,
                act_threshold.astype(np.float32), str(kv(r, "ripple.pack.activation", "")),
                *ops, int(kv(r, "ripple.pack.train_tokens", 0)),
                int(kv(r, "ripple.pack.eval.tokens", 0)), stats, groups, size, sum_offsets,
                [o.astype(np.int64) for o in orders], op_read_share=read_share)


def _operating_points(r, n_layer: int, default_thresholds: np.ndarray, path, fix: str):
    """ripple.pack.op.*, validated: shapes agree, densities in (0, 1] falling, thresholds finite and
    the default point's equal to pred_threshold; the read shares last (None where the pack has none)."""
    dens = kv_array(r, "ripple.pack.op.density")
    ppl = kv_array(r, "ripple.pack.op.ppl_increase")
    thr = kv_array(r, "ripple.pack.op.thresholds")
    floor = kv_array(r, "ripple.pack.op.floor")
    default = kv(r, "ripple.pack.op.default")
    budget = kv(r, "ripple.pack.op.max_ppl_increase")
    pred_floor = kv(r, "ripple.pack.pred_floor")
    share = kv_array(r, "ripple.pack.op.read_share")  # (packs before it have none: None)
    if (dens is None or ppl is None or thr is None or floor is None or not isinstance(default, int)
            or not isinstance(budget, float) or not isinstance(pred_floor, float)):
        raise RippleError(f"{path}: operating points missing; {fix}")
    n = len(dens)
    if (n < 1 or len(ppl) != n or len(thr) != n * n_layer or len(floor) != n or not 0 <= default < n
            or not np.all((floor >= 0) & (floor <= 1)) or np.float32(pred_floor) != np.float32(floor[default])
            or not np.all(np.isfinite(thr)) or not np.all((dens > 0) & (dens <= 1)) or np.any(np.diff(dens) >= 0)
            or not np.array_equal(thr.reshape(n, n_layer)[default].astype(np.float32), default_thresholds.astype(np.float32))):
        raise RippleError(f"{path}: operating points malformed; {fix}")
    if share is not None and (len(share) != n or not np.all((share > 0) & (share <= 1))):
        raise RippleError(f"{path}: ripple.pack.op.read_share malformed; {fix}")
    return (dens.astype(np.float64), ppl.astype(np.float64), thr.reshape(n, n_layer).astype(np.float32),
            floor.astype(np.float32), int(default), float(budget),
            None if share is None else share.astype(np.float64))


def check_header_sum(r: GGUFHeader, path: Path, fix: str) -> None:
    """Refuse a pack whose header (any KV value, any tensor info) does not match its checksum."""
    hs = next((t for t in r.tensors if t.name == HEADER_SUM), None)
    if hs is None:
        return  # older packs: refused by the version/checksum checks with a clearer message
    if hs.tensor_type != QT.I64 or int(hs.n_bytes) != 8:
        raise RippleError(f"{path}: {HEADER_SUM} is malformed; {fix}")
    stored = int(np.frombuffer(r.raw(hs.data_offset, hs.data_offset + 8), dtype="<u8")[0])
    if stored != header_sum(path, r.data_start):
        raise RippleError(f"{path}: header is damaged (checksum mismatch over its metadata and tensor table); {fix}")


def verify_records(pack: Pack, il: int, chunk_bytes: int = 64 << 20) -> int | None:
    """First record of layer il whose bytes do not match its checksum, or None (reads the whole table)."""
    n_ff, bb = pack.n_ff[il], pack.layer_bundle_bytes[il]
    with open(pack.path, "rb", buffering=0) as f:
        fd = f.fileno()
        os.posix_fadvise(fd, pack.bundle_offsets[il], n_ff * bb, os.POSIX_FADV_SEQUENTIAL)
        want = os.pread(fd, n_ff * 8, pack.sum_offsets[il])
        if len(want) != n_ff * 8:
            raise RippleError(f"{pack.path}: short read in layer {il}'s checksums (truncated?)")
        sums = np.frombuffer(want, dtype="<u8")
        step = max(1, chunk_bytes // bb)
        for lo in range(0, n_ff, step):
            n = min(step, n_ff - lo)
            data = os.pread(fd, n * bb, pack.bundle_offsets[il] + lo * bb)
            if len(data) != n * bb:
                raise RippleError(f"{pack.path}: short read in layer {il}'s bundles (truncated?)")
            got = record_sums(np.frombuffer(data, np.uint8).reshape(n, bb), lo, il)
            bad = np.nonzero(got != sums[lo:lo + n])[0]
            if len(bad):
                return lo + int(bad[0])
        os.posix_fadvise(fd, pack.bundle_offsets[il], n_ff * bb, os.POSIX_FADV_DONTNEED)
    return None
