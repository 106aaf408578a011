"""ggml's own quantizers and dequantizers, called through ctypes on the libggml-base that the patched
llama-cpp-python wheel ships (the same code llama.cpp's quantizer and the runtime use).

Rows move between float32 and any ggml type: `dequantize(raw, type, n)` (ggml's `to_float`) and
`quantize(values, type, imatrix)` (`ggml_quantize_chunk`, threads over row chunks: ctypes drops the
GIL). `fallback_type` mirrors llama.cpp's `tensor_type_fallback` (src/llama-quant.cpp) for rows
whose length is not a multiple of a type's block.
"""
from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT

from .cpus import usable_cpus
from .errors import RippleError

# llama.cpp's tensor_type_fallback: 256-block types -> a 32-block type of similar size
_FALLBACK = {
    QT.IQ1_S: QT.IQ4_NL, QT.IQ1_M: QT.IQ4_NL, QT.IQ2_XXS: QT.IQ4_NL, QT.IQ2_XS: QT.IQ4_NL,
    QT.IQ2_S: QT.IQ4_NL, QT.IQ3_XXS: QT.IQ4_NL, QT.IQ3_S: QT.IQ4_NL, QT.IQ4_XS: QT.IQ4_NL,
    QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.TQ1_0: QT.Q4_0, QT.TQ2_0: QT.Q4_0,
    QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
}
# the types ggml_quantize_chunk has a quantizer for (ggml/src/ggml.c); any other type reaches its
# `default: assert(false)` and then aborts the process, so quantize() refuses it first
_QUANTIZABLE = {QT[n] for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "TQ1_0", "TQ2_0", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_S", "IQ1_M",
    "IQ4_NL", "IQ4_XS", "Q1_0", "Q2_0", "NVFP4") if n in QT.__members__}
if "Q2_0" in QT.__members__:
    _FALLBACK[QT["Q2_0"]] = QT.Q4_0


class _Traits(ctypes.Structure):
    """struct ggml_type_traits (ggml/include/ggml.h of the pinned llama.cpp)."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_lib = None


def _ggml():
    global _lib
    if _lib is None:
        import llama_cpp  # loads libggml-base/libggml-cpu/libllama from the wheel's lib/
        libdir = Path(llama_cpp.__file__).parent / "lib"
        cands = sorted(libdir.glob("libggml-base.*")) + sorted(libdir.glob("libggml.*"))
        if not cands:
            raise RippleError(f"libggml-base not found in {libdir}; rerun tools/setup.sh")
        lib = ctypes.CDLL(str(cands[0]))
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _lib = lib
    return _lib


def _traits(qtype) -> _Traits:
    return _ggml().ggml_get_type_traits(int(qtype)).contents


def block_size(qtype) -> int:
    return int(_traits(qtype).blck_size)


def row_bytes(qtype, n: int) -> int:
    t = _traits(qtype)
    if n % t.blck_size:
        raise RippleError(f"a row of {n} values is not a whole number of {QT(qtype).name} blocks ({t.blck_size})")
    return int(n // t.blck_size * t.type_size)


def can_quantize(qtype) -> bool:
    """Whether ggml has a quantizer for this type (it can dequantize more types than it can write)."""
    return QT(qtype) in _QUANTIZABLE


def requires_imatrix(qtype) -> bool:
    return bool(_ggml().ggml_quantize_requires_imatrix(int(qtype)))


def fallback_type(qtype, n_per_row: int, have_imatrix: bool = False) -> QT:
    """The type rows of `n_per_row` values are written in when asked for `qtype`: `qtype` itself
    where its block divides the row (and ggml can quantize it), else llama.cpp's fallback (F16 when
    even that does not fit)."""
    qtype = QT(qtype)

    def unusable(t):
        return not can_quantize(t) or n_per_row % block_size(t) or (requires_imatrix(t) and not have_imatrix)
    t = qtype
    if unusable(t):
        t = _FALLBACK.get(t, t)
    if unusable(t):
        t = QT.F16
    return t


def _threads(n_rows: int) -> int:
    return max(1, min(usable_cpus(), n_rows // 64 or 1))


def dequantize(raw: np.ndarray, qtype, n_per_row: int) -> np.ndarray:
    """(rows, row_bytes) or flat bytes of `qtype` -> (rows, n_per_row) float32, via ggml's to_float."""
    qtype = QT(qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    rb = row_bytes(qtype, n_per_row)
    if raw.size % rb:
        raise RippleError(f"{raw.size} bytes are not whole {qtype.name} rows of {n_per_row} values")
    n_rows = raw.size // rb
    out = np.empty((n_rows, n_per_row), dtype=np.float32)
    if qtype == QT.F32:
        out.reshape(-1)[:] = raw.view(np.float32)
        return out
    fn = _traits(qtype).to_float
    if not fn:
        raise RippleError(f"ggml cannot dequantize {qtype.name}")
    to_float = _TO_FLOAT(fn)
    nt = _threads(n_rows)
    bounds = [n_rows * i // nt for i in range(nt + 1)]

    def work(i):
        a, b = bounds[i], bounds[i + 1]
        if b > a:
            to_float(raw[a * rb:].ctypes.data, out[a:].ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                     (b - a) * n_per_row)
    with ThreadPoolExecutor(nt) as ex:
        list(ex.map(work, range(nt)))
    return out


def quantize(values: np.ndarray, qtype, imatrix: np.ndarray | None = None) -> np.ndarray:
    """(rows, n_per_row) float -> (rows, row_bytes) uint8 in `qtype` with ggml_quantize_chunk.
    `imatrix` (n_per_row,) weights each column's error (llama.cpp's importance matrix)."""
    qtype = QT(qtype)
    vals = np.ascontiguousarray(values, dtype=np.float32)
    n_rows, n = vals.shape
    rb = row_bytes(qtype, n)
    if not can_quantize(qtype):
        raise RippleError(f"ggml has no quantizer for {qtype.name}")
    if requires_imatrix(qtype) and imatrix is None:
        raise RippleError(f"ggml needs an importance matrix to quantize {qtype.name}")
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n,):
            raise ValueError(f"imatrix has shape {imat.shape}, expected ({n},)")
    out = np.empty((n_rows, rb), dtype=np.uint8)
    lib = _ggml()
    lib.ggml_quantize_init(int(qtype))  # once, before the threads (its tables are shared)
    nt = _threads(n_rows)
    bounds = [n_rows * i // nt for i in range(nt + 1)]
    done = [0] * nt

    def work(i):
        a, b = bounds[i], bounds[i + 1]
        if b > a:
            done[i] = lib.ggml_quantize_chunk(int(qtype), vals.ctypes.data, out.ctypes.data, a * n, b - a, n,
                                              imat.ctypes.data if imat is not None else None)
    with ThreadPoolExecutor(nt) as ex:
        list(ex.map(work, range(nt)))
    if sum(done) != out.nbytes:
        raise RippleError(f"ggml quantized {sum(done)} of {out.nbytes} bytes of {qtype.name}")
    return out


def relative_rms(reference: np.ndarray, approx: np.ndarray) -> float:
    """||approx - reference|| / ||reference||: the error figure stated for requantized tensors."""
    ref = np.asarray(reference, dtype=np.float64)
    den = float(np.sqrt(np.mean(ref * ref)))
    return float(np.sqrt(np.mean((np.asarray(approx, dtype=np.float64) - ref) ** 2))) / max(den, 1e-30)
