"""Reading GGUF FFN layout and `ripple.*` keys; writing a GGUF with permuted FFN neurons.

Layout facts this relies on (gguf-py numpy views reverse ggml's ne order):
  ffn_gate / ffn_up  numpy (n_ff, n_embd): neuron i is row i        -> permute axis 0
  ffn_down           numpy (n_embd, n_ff): neuron i is column i     -> permute axis 1
  1-D ffn_gate/ffn_up biases have one value per neuron              -> permute axis 0
Everything is permuted while still float (before quantization: Q blocks run along n_ff in down).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import gguf
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from .errors import RippleError
from .gguf_header import GGUFHeader, HeaderError

FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
_FFN_RE = re.compile(r"^blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(weight|bias)$")
# FFN layouts we cannot permute neuron-wise (fused or expert tensors): refuse them clearly.
_UNSUPPORTED_FFN = re.compile(r"^blk\.\d+\.(ffn_gate_up|ffn_\w+_exps|ffn_\w+_shexp)\b")


@dataclass
class FfnLayout:
    arch: str
    n_layer: int
    n_embd: int
    n_ff: list[int]          # per layer (some architectures vary it)
    has_gate: bool
    weight_type: str         # ggml type name of ffn_up, e.g. "F16"

    @property
    def ffn_tensor_kinds(self) -> tuple[str, ...]:
        return ("ffn_gate", "ffn_up", "ffn_down") if self.has_gate else ("ffn_up", "ffn_down")


def _open(path: str | os.PathLike, make, errors):
    path = Path(path)
    if not path.is_file():
        raise RippleError(f"{path}: no such file; pass the path of a .gguf file")
    try:
        return make(path)
    except errors as e:
        raise RippleError(f"{path}: not a readable GGUF file ({e}); reconvert it with `ripple-gguf convert`") from None


def open_header(path: str | os.PathLike) -> GGUFHeader:
    """Metadata and tensor infos only, read without readahead (the load path: see gguf_header)."""
    return _open(path, GGUFHeader, (HeaderError, OSError, UnicodeDecodeError))


def open_gguf(path: str | os.PathLike) -> GGUFReader:
    """gguf-py's reader (memory-maps the whole file: for conversion and inspection, not loading)."""
    return _open(path, GGUFReader, Exception)  # gguf-py raises ValueError/struct errors on garbage


def kv(reader, key: str, default=None):
    """Scalar or string value of a KV field (arrays: use kv_array); reader: GGUFReader or GGUFHeader."""
    if isinstance(reader, GGUFHeader):
        return reader.get(key, default)
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def kv_array(reader, key: str) -> np.ndarray | None:
    """Numeric array field as one numpy array, without a Python loop over elements."""
    if isinstance(reader, GGUFHeader):
        try:
            return reader.array(key)
        except HeaderError as e:
            raise RippleError(str(e)) from None
    field = reader.get_field(key)
    if field is None:
        return None
    if field.types[0] != GGUFValueType.ARRAY:
        raise RippleError(f"{key}: expected an array in the GGUF metadata")
    if not field.data:
        return np.zeros(0)
    return np.concatenate([np.asarray(field.parts[i]) for i in field.data])


def read_ffn_layout(reader: GGUFReader) -> FfnLayout:
    arch = kv(reader, "general.architecture")
    if arch is None:
        raise RippleError("GGUF has no general.architecture key; it is not a model file")
    tensors = {t.name: t for t in reader.tensors}
    bad = sorted(n for n in tensors if _UNSUPPORTED_FFN.match(n))
    if bad:
        raise RippleError(f"unsupported architecture {arch!r}: fused or mixture-of-experts FFN tensors "
                          f"({bad[0]}, ...) cannot be neuron-permuted yet; use a dense-FFN model")
    n_layer = int(kv(reader, f"{arch}.block_count", 0))
    n_embd = int(kv(reader, f"{arch}.embedding_length", 0))
    if n_layer <= 0 or n_embd <= 0:
        raise RippleError(f"GGUF lacks {arch}.block_count/embedding_length; cannot locate its FFN")
    n_ff, has_gate = [], None
    for il in range(n_layer):
        up, down = tensors.get(f"blk.{il}.ffn_up.weight"), tensors.get(f"blk.{il}.ffn_down.weight")
        gate = tensors.get(f"blk.{il}.ffn_gate.weight")
        if up is None or down is None:
            raise RippleError(f"unsupported architecture {arch!r}: layer {il} has no ffn_up/ffn_down "
                              "tensors (only dense-FFN models can be neuron-permuted)")
        ff = int(up.shape[1])  # gguf-py shape is ggml ne order: (n_embd, n_ff)
        if int(down.shape[0]) != ff or (gate is not None and int(gate.shape[1]) != ff):
            raise RippleError(f"layer {il}: ffn_up/ffn_gate/ffn_down disagree on n_ff; file is inconsistent")
        if has_gate is None:
            has_gate = gate is not None
        elif has_gate != (gate is not None):
            raise RippleError(f"unsupported architecture {arch!r}: only some layers have ffn_gate")
        n_ff.append(ff)
    return FfnLayout(arch, n_layer, n_embd, n_ff, bool(has_gate),
                     tensors["blk.0.ffn_up.weight"].tensor_type.name)


def ffn_weight_bytes(reader: GGUFReader, n_layer: int) -> list[int]:
    """Bytes of each layer's ffn_gate/ffn_up/ffn_down weights: what the pack duplicates, the
    predictor budget is measured against and the runtime keeps off RAM."""
    out = [0] * n_layer
    for t in reader.tensors:
        m = _FFN_RE.match(t.name)
        if m and m.group(3) == "weight" and int(m.group(1)) < n_layer:
            out[int(m.group(1))] += int(t.n_bytes)
    return out


def permute_ffn(name: str, data: np.ndarray, perms: list[np.ndarray]) -> np.ndarray:
    """Apply the layer's neuron order to one tensor if it is an FFN tensor; else return it unchanged."""
    m = _FFN_RE.match(name)
    if not m:
        return data
    il, kind, part = int(m.group(1)), m.group(2), m.group(3)
    perm = perms[il]
    if kind == "ffn_down":
        return data if part == "bias" else np.ascontiguousarray(data[:, perm])
    return np.ascontiguousarray(data[perm])


def _copy_kv(reader: GGUFReader, writer: GGUFWriter) -> None:
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        if field.name.startswith("ripple."):
            continue  # an older index would contradict the new order
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


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


def write_permuted(src: GGUFReader, dst: Path, perms: list[np.ndarray], ripple_kv: dict,
                   progress: Callable[[int], None] | None = None) -> None:
    """Copy `src` to `dst` with FFN neurons in `perms` order and `ripple_kv` added. dst is written
    as given (callers pass a temporary name and rename)."""
    arch = kv(src, "general.architecture")
    writer = GGUFWriter(dst, arch)
    try:
        _copy_kv(src, writer)
        add_ripple_kv(writer, ripple_kv)
        for t in src.tensors:
            if _FFN_RE.match(t.name) and t.tensor_type not in FLOAT_TYPES:
                raise RippleError(f"{t.name} is {t.tensor_type.name}; permutation needs an F32/F16 source")
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in src.tensors:
            writer.write_tensor_data(permute_ffn(t.name, t.data, perms), tensor_endianess=src.endianess)
            if progress:
                progress(t.n_bytes)
    finally:
        writer.close()
