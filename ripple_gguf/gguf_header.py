"""A light GGUF header reader for the load path: metadata and tensor infos, nothing else.

gguf-py's GGUFReader memory-maps the whole file and makes one numpy view per array element. On a
model larger than RAM that is the wrong tool for startup: touching the map faults in readahead
windows (8 MiB on a virtio disk here), so verifying a pack used to pull both files into the page
cache, and a 128K-entry vocabulary costs ~10^5 Python objects. This reader parses the header with
buffered reads under POSIX_FADV_RANDOM (no readahead beyond what is asked), keeps numeric arrays
as single numpy arrays, skips string arrays' contents, and records each KV field's byte range (the
pack binding hashes those bytes, exactly as GGUFReader's field parts concatenate). Every count and
length read from the file is checked against the file size before it is used.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

GGUF_MAGIC = b"GGUF"
_SCALAR = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
           VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_NUMPY = {VT.UINT8: np.uint8, VT.INT8: np.int8, VT.UINT16: np.uint16, VT.INT16: np.int16, VT.UINT32: np.uint32,
          VT.INT32: np.int32, VT.FLOAT32: np.float32, VT.BOOL: np.bool_, VT.UINT64: np.uint64,
          VT.INT64: np.int64, VT.FLOAT64: np.float64}
MAX_DIMS = 4


class HeaderError(ValueError):
    pass


@dataclass
class HeaderField:
    name: str
    type: VT                  # the value's type (ARRAY for arrays)
    item_type: VT | None      # arrays: the element type
    value: object             # scalar, str, numeric np.ndarray, or None (array of strings: skipped)
    start: int                # byte range of the whole KV entry (key included) in the file
    end: int
    count: int = 0            # arrays: how many elements (string arrays too, whose contents are skipped)


@dataclass
class HeaderTensor:
    name: str
    shape: tuple[int, ...]    # ggml ne order (like gguf-py's ReaderTensor.shape)
    tensor_type: QT
    data_offset: int          # absolute
    n_bytes: int


class _Cursor:
    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"header runs past the end of the file at byte {self.pos}")
        b = self.f.read(n)
        if len(b) != n:
            raise HeaderError(f"short read at byte {self.pos}")
        self.pos += n
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise HeaderError(f"header runs past the end of the file at byte {self.pos}")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n


class GGUFHeader:
    """`GGUFHeader(path)`: .fields (name -> HeaderField), .tensors, .alignment, .data_start, .file_size."""

    def __init__(self, path):
        self.path = str(path)
        self.file_size = os.path.getsize(self.path)
        with open(self.path, "rb", buffering=1 << 16) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            c = _Cursor(f, self.file_size)
            if c.take(4) != GGUF_MAGIC:
                raise HeaderError("bad magic (not a GGUF file)")
            self.version = c.scalar("<I")
            if self.version not in (2, 3):
                raise HeaderError(f"GGUF version {self.version} is not supported")
            n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
            if n_tensors > self.file_size // 8 or n_kv > self.file_size // 8:
                raise HeaderError("tensor or KV count larger than the file can hold")
            self.fields: dict[str, HeaderField] = {}
            for _ in range(n_kv):
                start = c.pos
                name = c.string()
                vtype = self._type(c.scalar("<I"))
                item, value, count = self._value(c, vtype)
                self.fields[name] = HeaderField(name, vtype, item, value, start, c.pos, count)
            self.alignment = int(self.get("general.alignment", 32))
            if self.alignment <= 0 or self.alignment & (self.alignment - 1):
                raise HeaderError(f"general.alignment {self.alignment} is not a power of two")
            infos = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.scalar("<I")
                if n_dims > MAX_DIMS:
                    raise HeaderError(f"tensor {name} has {n_dims} dimensions")
                shape = tuple(c.scalar("<Q") for _ in range(n_dims))
                raw_type = c.scalar("<I")
                try:
                    qt = QT(raw_type)
                    block, size = GGML_QUANT_SIZES[qt]
                except (ValueError, KeyError):
                    raise HeaderError(f"tensor {name} has unknown type {raw_type}") from None
                offset = c.scalar("<Q")
                n_el = int(np.prod(shape, dtype=np.float64)) if shape else 1
                if n_el > self.file_size * 8 or n_el % block:
                    raise HeaderError(f"tensor {name} has an impossible shape {shape}")
                infos.append((name, shape, qt, offset, n_el // block * size))
            self.data_start = -(-c.pos // self.alignment) * self.alignment
        self.tensors = []
        for name, shape, qt, offset, n_bytes in infos:
            start = self.data_start + offset
            if start + n_bytes > self.file_size:
                raise HeaderError(f"tensor {name} ends past the end of the file (truncated?)")
            self.tensors.append(HeaderTensor(name, shape, qt, start, n_bytes))

    @staticmethod
    def _type(raw: int) -> VT:
        try:
            return VT(raw)
        except ValueError:
            raise HeaderError(f"unknown metadata value type {raw}") from None

    def _value(self, c: _Cursor, vtype: VT):
        if vtype == VT.STRING:
            return None, c.string(), 0
        if vtype in _SCALAR:
            return None, c.scalar(_SCALAR[vtype]), 0
        if vtype != VT.ARRAY:
            raise HeaderError(f"unsupported metadata value type {vtype}")
        item = self._type(c.scalar("<I"))
        count = c.scalar("<Q")
        if count > self.file_size:
            raise HeaderError("array longer than the file")
        if item in _NUMPY:
            dt = np.dtype(_NUMPY[item]).newbyteorder("<")
            return item, np.frombuffer(c.take(count * dt.itemsize), dtype=dt).copy(), count
        if item == VT.STRING:
            for _ in range(count):  # contents not needed on the load path (tokenizer pieces)
                c.skip(c.scalar("<Q"))
            return item, None, count
        raise HeaderError("nested metadata arrays are not supported")

    # --- the accessors gguf_io.kv / kv_array use --------------------------------------------------
    def count(self, key: str) -> int:
        """How many elements an array field holds (0 where it is absent or not an array)."""
        f = self.fields.get(key)
        return 0 if f is None else f.count

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None or f.type == VT.ARRAY else f.value

    def array(self, key: str) -> np.ndarray | None:
        f = self.fields.get(key)
        if f is None:
            return None
        if f.type != VT.ARRAY or f.value is None:
            raise HeaderError(f"{key}: expected a numeric array in the GGUF metadata")
        return f.value

    def raw(self, start: int, end: int) -> bytes:
        """File bytes [start, end) with one pread (no readahead beyond them), not left in the page
        cache afterwards: verification reads must not crowd out the weights under a memory limit."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            data = os.pread(fd, end - start, start)
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if len(data) != end - start:
            raise HeaderError(f"short read at byte {start} (truncated?)")
        return data

    def tensor_data(self, t: HeaderTensor) -> np.ndarray:
        """One tensor's bytes as a numpy array in gguf-py's (reversed ne) shape; float types decoded."""
        data = self.raw(t.data_offset, t.data_offset + t.n_bytes)
        np_types = {QT.F32: np.float32, QT.F16: np.float16, QT.I8: np.int8, QT.I32: np.int32}
        if t.tensor_type in np_types:
            return np.frombuffer(data, dtype=np_types[t.tensor_type]).reshape(tuple(reversed(t.shape)))
        return np.frombuffer(data, dtype=np.uint8)
