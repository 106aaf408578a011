"""GGUF FFN layout and `ripple.*` keys; writing the converted GGUF (the source's tensors + index).

Reading goes through the light header reader (gguf_header.GGUFHeader) and tensor bytes through
np.memmap at the header's offsets; gguf-py's GGUFWriter only writes. Layout facts (ggml ne order):
  ffn_gate / ffn_up  {n_embd, n_ff}: neuron i is row i, quant blocks run along n_embd
  ffn_down           {n_ff, n_embd}: neuron i is column i, quant blocks run along n_ff, so moving
                     neurons would mean requantizing it (a second rounding: +1.5-2% perplexity on a
                     4-bit SmolLM2). The GGUF therefore keeps the source's neuron order and tensors
                     byte for byte; the placement order lives in the pack (docs/FORMAT.md).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType, GGUFWriter

from . import ggml_quant
from .errors import RippleError
from .gguf_header import GGUFHeader, HeaderError, HeaderTensor

FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
_FFN_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(weight|bias)$")
# FFN layouts we cannot permute neuron-wise (fused or expert tensors): refuse them clearly.
_UNSUPPORTED_FFN = re.compile(r"^blk\.\d+\.(ffn_gate_up|ffn_\w+_exps|ffn_\w+_shexp|ffn_gate_inp)\b")


@dataclass
class FfnLayout:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: list[int]          # per layer (some architectures vary it)
    has_gate: bool
    weight_type: str         # ggml type name of blk.0.ffn_up, e.g. "F16" (see `types` for all)
    types: dict[str, list[QT]] = field(default_factory=dict)  # "gate"/"up"/"down" -> per-layer type

    @property
    def ffn_tensor_kinds(self) -> tuple[str, ...]:
        return ("ffn_gate", "ffn_up", "ffn_down") if self.has_gate else ("ffn_up", "ffn_down")


def open_header(path: str | os.PathLike, fix: str = "reconvert it with `ripple-gguf convert`") -> GGUFHeader:
    """Metadata and tensor infos only, read without readahead (see gguf_header). Truncated or
    corrupt files are one clear error naming `fix`."""
    path = Path(path)
    if not path.is_file():
        raise RippleError(f"{path}: no such file; pass the path of a .gguf file")
    try:
        return GGUFHeader(path)
    except (HeaderError, OSError, UnicodeDecodeError) as e:
        raise RippleError(f"{path}: not a readable GGUF file, truncated or corrupt ({e}); {fix}") from None


def kv(reader, key: str, default=None):
    """Scalar or string value of a KV field (arrays: use kv_array); reader: GGUFHeader or gguf-py's
    GGUFReader (tests)."""
    if isinstance(reader, GGUFHeader):
        return reader.get(key, default)
    f = reader.get_field(key)
    return default if f is None else f.contents()


def kv_array(reader, key: str) -> np.ndarray | None:
    """Numeric array field as one numpy array, without a Python loop over elements."""
    if isinstance(reader, GGUFHeader):
        try:
            return reader.array(key)
        except HeaderError as e:
            raise RippleError(str(e)) from None
    f = reader.get_field(key)
    if f is None:
        return None
    if f.types[0] != GGUFValueType.ARRAY:
        raise RippleError(f"{key}: expected an array in the GGUF metadata")
    if not f.data:
        return np.zeros(0)
    return np.concatenate([np.asarray(f.parts[i]) for i in f.data])


def read_ffn_layout(reader) -> FfnLayout:
    """Where the FFN is and what types it has; refuses models whose FFN cannot be neuron-permuted."""
    arch = kv(reader, "general.architecture")
    if arch is None:
        raise RippleError("GGUF has no general.architecture key; it is not a model file")
    tensors = {t.name: t for t in reader.tensors}
    if not tensors:
        raise RippleError(f"this GGUF has no tensors (a vocab-only file of {arch!r}?); pass a model GGUF with weights")
    bad = sorted(n for n in tensors if _UNSUPPORTED_FFN.match(n))
    if bad:
        raise RippleError(f"unsupported model: {arch!r} with fused or mixture-of-experts FFN tensors "
                          f"({bad[0]}, ...) cannot be neuron-permuted; use a dense-FFN model (LLaMA, Qwen2, Mistral, ...)")
    n_layer = int(kv(reader, f"{arch}.block_count", 0))
    n_embd = int(kv(reader, f"{arch}.embedding_length", 0))
    if n_layer <= 0 or n_embd <= 0:
        raise RippleError(f"GGUF lacks {arch}.block_count/embedding_length; cannot locate its FFN")
    n_ff, has_gate = [], None
    types = {"gate": [], "up": [], "down": []}
    for il in range(n_layer):
        up, down = tensors.get(f"blk.{il}.ffn_up.weight"), tensors.get(f"blk.{il}.ffn_down.weight")
        gate = tensors.get(f"blk.{il}.ffn_gate.weight")
        if up is None or down is None:
            raise RippleError(f"unsupported architecture {arch!r}: layer {il} has no ffn_up/ffn_down "
                              "tensors (only dense-FFN models can be neuron-permuted)")
        if len(up.shape) != 2 or len(down.shape) != 2:
            raise RippleError(f"unsupported architecture {arch!r}: layer {il}'s FFN tensors are not matrices")
        ff = int(up.shape[1])  # ggml ne order: (n_embd, n_ff)
        if int(down.shape[0]) != ff or (gate is not None and int(gate.shape[1]) != ff):
            raise RippleError(f"layer {il}: ffn_up/ffn_gate/ffn_down disagree on n_ff; file is inconsistent")
        if has_gate is None:
            has_gate = gate is not None
        elif has_gate != (gate is not None):
            raise RippleError(f"unsupported architecture {arch!r}: only some layers have ffn_gate")
        n_ff.append(ff)
        if gate is not None:
            types["gate"].append(QT(gate.tensor_type))
        types["up"].append(QT(up.tensor_type))
        types["down"].append(QT(down.tensor_type))
    if not has_gate:
        del types["gate"]
    return FfnLayout(arch, n_layer, n_embd, n_ff, bool(has_gate), types["up"][0].name, types)


def check_model(header: GGUFHeader, layout: FfnLayout) -> None:
    """What convert needs beyond read_ffn_layout: an architecture llama.cpp knows, and no other
    per-neuron tensor (e.g. an FFN sub-norm over n_ff) that the permutation would have to follow."""
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if layout.arch not in known:
        raise RippleError(f"unknown architecture {layout.arch!r}: the llama.cpp this tool is built on cannot "
                          "run it; pass a GGUF of a dense llama-family model (LLaMA, Qwen2, Mistral, SmolLM, ...)")
    for t in header.tensors:
        m = re.match(r"^blk\.(\d+)\.(.*)$", t.name)
        if not m or _FFN_RE.match(t.name) or int(m.group(1)) >= layout.n_layer:
            continue
        ff = layout.n_ff[int(m.group(1))]
        if "ffn" in m.group(2) and ff != layout.n_embd and ff in tuple(int(s) for s in t.shape):
            raise RippleError(f"unsupported architecture {layout.arch!r}: {t.name} is indexed by FFN neuron "
                              "and cannot be permuted with them; use a plain gate/up/down FFN model")


def ffn_weight_bytes(reader, n_layer: int) -> list[int]:
    """Bytes of each layer's ffn_gate/ffn_up/ffn_down weights: what the pack duplicates, the
    predictor budget is measured against and the runtime keeps off RAM."""
    out = [0] * n_layer
    for t in reader.tensors:
        m = _FFN_RE.match(t.name)
        if m and m.group(3) == "weight" and int(m.group(1)) < n_layer:
            out[int(m.group(1))] += int(t.n_bytes)
    return out


def tensor_bytes(header: GGUFHeader, t: HeaderTensor) -> np.ndarray:
    """A tensor's raw bytes, memory-mapped read-only at the header's offset (no copy)."""
    if t.n_bytes == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(header.path, np.uint8, "r", int(t.data_offset), (int(t.n_bytes),))


# ---------------------------------------------------------------------------------------------
# ffn_down in another type (--down-type): the one tensor convert may requantize

@dataclass
class DownResult:
    data: np.ndarray        # (n_embd, row_bytes) uint8 in out_type
    source_type: QT
    out_type: QT
    rel_rms: float          # ||out - source|| / ||source|| on the dequantized values (0: exact)


def down_target_type(source: QT, n_ff: int, down_type: QT | None) -> QT:
    """The type ffn_down is written in: the source's, or --down-type; llama.cpp's fallback where ggml
    cannot write that type for rows of n_ff values (we always have an importance matrix)."""
    want = down_type if down_type is not None else source
    if want in FLOAT_TYPES:
        return want
    return ggml_quant.fallback_type(want, n_ff, have_imatrix=True)


def convert_down(raw: np.ndarray, source: QT, n_embd: int, n_ff: int, out_type: QT,
                 imatrix: np.ndarray | None) -> DownResult:
    """ffn_down in `out_type`: as stored when the type is unchanged; else through ggml's to_float
    and ggml_quantize_chunk with `imatrix` (the mean squared FFN intermediate per neuron: llama.cpp's
    importance matrix for down)."""
    rows = np.asarray(raw).reshape(n_embd, -1)
    if source == out_type:
        return DownResult(rows, source, out_type, 0.0)
    vals = ggml_quant.dequantize(rows, source, n_ff)
    q = ggml_quant.quantize(vals, out_type, imatrix if out_type not in FLOAT_TYPES else None)
    err = 0.0 if out_type == QT.F32 else ggml_quant.relative_rms(vals, ggml_quant.dequantize(q, out_type, n_ff))
    return DownResult(q, source, out_type, err)


# ---------------------------------------------------------------------------------------------
# writing

class _Writer(GGUFWriter):
    """GGUFWriter that also writes empty arrays (valid GGUF; gguf-py refuses them) and packs numpy
    arrays in one call instead of one struct.pack per element (vocabularies have 10^5 entries)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == GGUFValueType.ARRAY and sub_type is not None and (len(val) == 0 or isinstance(val, np.ndarray)):
            head = (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", len(val))
            if len(val) == 0:
                return head
            fmt = self._simple_value_packing[sub_type]
            dt = np.dtype(fmt).newbyteorder("<" if self.endianess == gguf.GGUFEndian.LITTLE else ">")
            return head + np.ascontiguousarray(val, dtype=dt).tobytes()
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _string_array(raw: bytes) -> list[bytes]:
    """The items of an array-of-strings KV entry (raw bytes of the whole entry), as bytes."""
    pos = 8 + struct.unpack_from("<Q", raw, 0)[0] + 8  # key, value type, item type
    count = struct.unpack_from("<Q", raw, pos)[0]
    pos += 8
    out = []
    for _ in range(count):
        n = struct.unpack_from("<Q", raw, pos)[0]
        out.append(raw[pos + 8:pos + 8 + n])
        pos += 8 + n
    return out


def _copy_kv(header: GGUFHeader, writer: GGUFWriter) -> None:
    """Every KV entry except general.architecture (GGUFWriter writes it first) and old ripple.*
    keys, in file order; strings as their stored bytes, so the metadata stays byte-identical."""
    for f in header.fields.values():
        if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("ripple."):
            continue
        if f.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(f.value)
        if f.type == GGUFValueType.STRING:
            raw = header.raw(f.start, f.end)  # key length, key, value type, string length, string
            writer.add_key_value(f.name, raw[8 + struct.unpack_from("<Q", raw)[0] + 4 + 8:], f.type)
        elif f.type == GGUFValueType.ARRAY and f.item_type == GGUFValueType.STRING:
            writer.add_key_value(f.name, _string_array(header.raw(f.start, f.end)), f.type, sub_type=f.item_type)
        elif f.type == GGUFValueType.ARRAY:
            writer.add_key_value(f.name, f.value, f.type, sub_type=f.item_type)
        else:
            writer.add_key_value(f.name, f.value, f.type)


def add_ripple_kv(writer: GGUFWriter, items: dict) -> None:
    """Write our index keys. Values: str, bool, int (u32/u64), float (f32) or 1-D numpy arrays."""
    for key, val in items.items():
        if isinstance(val, np.ndarray):
            if val.dtype.kind == "f":
                writer.add_key_value(key, val.astype(np.float32).tolist(), GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
            else:
                writer.add_key_value(key, val.astype(np.uint32).tolist(), GGUFValueType.ARRAY, GGUFValueType.UINT32)
        elif isinstance(val, bool):
            writer.add_bool(key, val)
        elif isinstance(val, int):
            writer.add_uint64(key, val) if val >= 2**32 else writer.add_uint32(key, val)
        elif isinstance(val, float):
            writer.add_float32(key, val)
        else:
            writer.add_string(key, str(val))


def _byte_shape(ne: tuple[int, ...], qtype: QT) -> tuple[int, ...]:
    """gguf-py's add_tensor_info convention for raw bytes: numpy order (ne reversed), the last
    dimension in bytes; with dtype uint8 and raw_dtype it converts that back to elements."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in reversed(ne))
    return (*shape[:-1], shape[-1] // block * size)


def write_converted(header: GGUFHeader, dst: Path, ripple_kv: dict, downs: list[DownResult] | None = None,
                    progress: Callable[[int], None] | None = None) -> None:
    """Copy the GGUF of `header` to `dst` with `ripple_kv` added (and ffn_down from `downs`, when
    given); every other tensor, the KV metadata, the alignment and the tensor order as they are.
    dst is written as given (callers pass a temporary name and rename)."""
    writer = _Writer(dst, str(header.get("general.architecture")))
    try:
        _copy_kv(header, writer)
        add_ripple_kv(writer, ripple_kv)
        plan = []  # (tensor, its replacement from `downs` or None)
        for t in header.tensors:
            m = _FFN_RE.match(t.name)
            d = downs[int(m.group(1))] if downs and m and m.group(2) == "ffn_down" and m.group(3) == "weight" else None
            qtype, n_bytes = (d.out_type, d.data.nbytes) if d is not None else (QT(t.tensor_type), int(t.n_bytes))
            writer.add_tensor_info(t.name, _byte_shape(t.shape, qtype), np.dtype(np.uint8), n_bytes, qtype)
            plan.append((t, d))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t, d in plan:
            data = d.data if d is not None else tensor_bytes(header, t)
            writer.write_tensor_data(np.asarray(data).reshape(-1).view(np.uint8))
            if progress:
                progress(int(t.n_bytes))
    finally:
        writer.close()
