"""`ripple_sum`: the pack's checksum (docs/FORMAT.md section 2, "Checksums").

A Fletcher-style positional sum over little-endian 32-bit words, two 32-bit halves in one u64:

    w_0 .. w_{m-1} = the bytes, zero-padded to a multiple of 4, then the tag words (e.g. p, layer)
    A = sum(w_j)            mod 2^32
    B = sum((j + 1) * w_j)  mod 2^32
    sum = A | B << 32

Why this one: the C++ runtime checks every bundle when it first lands in memory, on the decode
path, so the check must run at memory speed. A and B are 32-bit adds and 32-bit multiply-adds
with no carried state between words, which compilers vectorize (vpaddd/vpmulld) and numpy computes
column-wise; a CRC or a cryptographic hash runs a serial dependency chain per byte or block. A
flips any single bit (never a multiple of 2^32), B catches swapped or shifted words, and the tag
words make a record read from the wrong offset (another neuron, another layer) fail too. It is an
integrity check against damaged storage, not a defence against someone forging a pack.
"""
from __future__ import annotations

import numpy as np

_MASK = 0xFFFFFFFF
_CHUNK_BYTES = 32 << 20  # numpy temporaries per step (records are summed in row chunks)


def _words(data) -> np.ndarray:
    b = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    if len(b) % 4:
        b = np.concatenate([b, np.zeros(4 - len(b) % 4, np.uint8)])
    return b.view("<u4")


def ripple_sum(data, tag: tuple[int, ...] = ()) -> int:
    """The checksum of one byte string (bytes, memoryview or a numpy array's bytes) with its tag."""
    w = _words(data)
    a = b = 0
    step = _CHUNK_BYTES // 8
    for lo in range(0, len(w), step):
        c = w[lo:lo + step].astype(np.uint64)
        a += int(c.sum(dtype=np.uint64))
        b += int((c * np.arange(lo + 1, lo + 1 + len(c), dtype=np.uint64)).sum(dtype=np.uint64))
    m = len(w)
    for k, t in enumerate(tag):
        a += int(t) & _MASK
        b += (m + k + 1) * (int(t) & _MASK)
    return (a & _MASK) | (b & _MASK) << 32


def record_sums(rows: np.ndarray, first: int, layer: int) -> np.ndarray:
    """Checksums (uint64) of records rows[r] (uint8 (n, bytes)), record r tagged (first + r, layer)."""
    rows = np.ascontiguousarray(rows).view(np.uint8)
    n, nb = rows.shape
    if nb % 4:
        rows = np.concatenate([rows, np.zeros((n, 4 - nb % 4), np.uint8)], axis=1)
    w = rows.view("<u4")
    m = w.shape[1]
    weights = np.arange(1, m + 1, dtype=np.uint64)
    out = np.empty(n, dtype=np.uint64)
    step = max(1, _CHUNK_BYTES // (8 * m))
    for lo in range(0, n, step):
        c = w[lo:lo + step].astype(np.uint64)
        out[lo:lo + step] = (c.sum(axis=1, dtype=np.uint64) & _MASK) | ((c * weights).sum(axis=1, dtype=np.uint64) & _MASK) << 32
    idx = np.arange(first, first + n, dtype=np.uint64) & _MASK
    lay = np.uint64(layer & _MASK)
    a = (out & _MASK) + idx + lay
    b = (out >> np.uint64(32)) + np.uint64(m + 1) * idx + np.uint64(m + 2) * lay
    return (a & _MASK) | (b & _MASK) << np.uint64(32)
