"""Device probe, the I/O cost model, and run merging (what `bench probe` and `bench io` share).

Cost of one read request of b bytes in a stream of requests at queue depth q:
    t(b) = t0_q + b / BW_q
fitted by least squares on the *relative* error over the probed request sizes, so small and large
requests weigh alike. Merging two runs separated by g bytes saves one request (t0) and costs g/BW,
independently per gap, so the optimal rule is: merge when g < t0 * BW (design.md). The runtime
applies the same rule with its own attach-time probe; here the probe is thorough and reported.

Cold reads: O_DIRECT where the filesystem allows it (offsets/lengths rounded out to 4096), otherwise
buffered reads with readahead off (POSIX_FADV_RANDOM) after POSIX_FADV_DONTNEED.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

ALIGN = 4096
MAX_GAP = 1 << 20         # the runtime never merges gaps larger than this (RIPPLE_MAX_GAP)
MAX_REQ = 4 << 20         # nor issues one request larger than this (RIPPLE_MAX_REQ)
PROBE_SIZES = (4096, 16384, 65536, 262144, 1 << 20)
PROBE_DEPTHS = (1, 4, 16)

# Phone flash (UFS 4.0, ../shared/facts.md): ~4 GB/s sequential (512 KiB reads), ~450 MB/s with
# 4 KiB reads. Solving t(4096) = 4096 / 450e6 with BW = 4e9 gives t0 = 8.1 us.
UFS40 = dict(name="UFS 4.0 (phone flash, facts.md)", t0_us=4096 / 450e6 * 1e6 - 4096 / 4e9 * 1e6, bw_mbps=4000.0)


@dataclass
class CostModel:
    t0_us: float
    bw_mbps: float          # MB/s (1e6 bytes)

    def seconds(self, n_requests: float, n_bytes: float) -> float:
        return n_requests * self.t0_us * 1e-6 + n_bytes / (self.bw_mbps * 1e6)

    @property
    def merge_gap_bytes(self) -> int:
        """Largest gap worth reading through rather than starting a new request."""
        return int(min(self.t0_us * 1e-6 * self.bw_mbps * 1e6, MAX_GAP))

    def as_dict(self) -> dict:
        return {"t0_us": round(self.t0_us, 3), "bw_mbps": round(self.bw_mbps, 1),
                "merge_gap_bytes": self.merge_gap_bytes}


def fit_cost_model(sizes: np.ndarray, seconds_per_request: np.ndarray) -> CostModel:
    """Least squares of t = t0 + b/BW, each point weighted by 1/t (relative error); both >= tiny."""
    sizes = np.asarray(sizes, dtype=np.float64)
    t = np.asarray(seconds_per_request, dtype=np.float64)
    a = np.stack([np.ones_like(sizes), sizes], axis=1) / t[:, None]
    (t0, inv_bw), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
    if inv_bw <= 0:  # flat curve (everything cached or latency-bound): bandwidth from the largest size
        inv_bw = t[-1] / sizes[-1]
    return CostModel(t0_us=max(float(t0), 1e-7) * 1e6, bw_mbps=1.0 / float(inv_bw) / 1e6)


# ----------------------------------------------------------------------------- cold reads

def drop_cache(fd: int) -> None:
    """Evict the file's pages (no root needed; dirty ones are flushed first so they can go) and turn
    readahead off for buffered reads."""
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def open_cold(path, direct: bool = True) -> tuple[int, bool]:
    """(fd, is_direct): O_DIRECT when asked and the filesystem accepts an aligned read."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            fd = -1
        if fd >= 0:
            buf = mmap.mmap(-1, ALIGN)
            try:
                os.preadv(fd, [buf], 0)
                return fd, True
            except OSError:
                os.close(fd)
            finally:
                buf.close()
    fd = os.open(path, os.O_RDONLY)
    drop_cache(fd)
    return fd, False


def align_out(offsets: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round each [off, off+len) out to ALIGN boundaries (what O_DIRECT and the flash really read)."""
    lo = offsets // ALIGN * ALIGN
    hi = -(-(offsets + lengths) // ALIGN) * ALIGN
    return lo, hi - lo


class Reader:
    """Issues batches of reads with `threads` workers, like the runtime's parallel preadv: each
    batch is split into contiguous shares and waited for (one barrier per layer and token)."""

    def __init__(self, path, threads: int = 4, direct: bool = True):
        self.fd, self.direct = open_cold(path, direct)
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self._local = threading.local()

    def _buf(self, n: int) -> memoryview:
        b = getattr(self._local, "buf", None)
        if b is None or len(b) < n:
            if b is not None:
                b.close()
            b = self._local.buf = mmap.mmap(-1, max(n, MAX_REQ + 2 * ALIGN))  # page-aligned
        return memoryview(b)[:n]

    def _read_share(self, offsets, lengths) -> int:
        got = 0
        for off, n in zip(offsets.tolist(), lengths.tolist()):
            got += os.preadv(self.fd, [self._buf(n)], off)
        return got

    def read(self, offsets: np.ndarray, lengths: np.ndarray) -> int:
        """Read every (offset, length); returns bytes transferred (after alignment when direct)."""
        if self.direct:
            offsets, lengths = align_out(offsets, lengths)
        if self.pool is None or len(offsets) < 2:
            return self._read_share(offsets, lengths)
        k = min(self.threads, len(offsets))
        parts = np.array_split(np.arange(len(offsets)), k)
        futs = [self.pool.submit(self._read_share, offsets[p], lengths[p]) for p in parts]
        return sum(f.result() for f in futs)

    def cold(self) -> None:
        drop_cache(self.fd)

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()
        os.close(self.fd)


# ----------------------------------------------------------------------------- the probe

def make_probe_file(directory, size: int) -> str:
    """A scratch file of random bytes (incompressible, not sparse) on the filesystem under test."""
    import tempfile
    fd, path = tempfile.mkstemp(prefix=".ripple-probe-", suffix=".tmp", dir=directory)
    try:
        chunk = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
        left = size
        while left > 0:
            left -= os.write(fd, chunk[:min(left, len(chunk))])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def probe(path, sizes=PROBE_SIZES, depths=PROBE_DEPTHS, direct: bool = True, bytes_per_point: int = 64 << 20,
          max_requests: int = 4096, progress: bool = True) -> dict:
    """Cold random reads of each size at each queue depth (threads) over `path`.
    Returns the measured points and the fitted cost model per depth."""
    file_bytes = os.path.getsize(path)
    rng = np.random.default_rng(1234)
    points = []
    grid = [(q, s) for q in depths for s in sizes if s <= file_bytes]
    for q, size in tqdm(grid, desc="probing reads", unit="point", disable=not progress, leave=False):
        n = int(min(max_requests, max(32, bytes_per_point // size)))
        slots = file_bytes // size
        offs = (rng.choice(slots, size=min(n, slots), replace=False) * size).astype(np.int64)
        lens = np.full(len(offs), size, dtype=np.int64)
        reader = Reader(path, threads=q, direct=direct)
        reader._read_share(offs[:1], lens[:1])  # warm the thread/buffer machinery, not the data
        reader.cold()
        # one request per submit so every request's latency is seen (as a stream at depth q)
        lat = np.zeros(len(offs))

        def one(i):
            t = time.perf_counter()
            reader._read_share(offs[i:i + 1], lens[i:i + 1])  # sizes and offsets are 4096-aligned
            lat[i] = time.perf_counter() - t
        t0 = time.perf_counter()
        if reader.pool:
            list(reader.pool.map(one, range(len(offs))))
        else:
            for i in range(len(offs)):
                one(i)
        wall = time.perf_counter() - t0
        direct_used = reader.direct
        reader.close()
        points.append(dict(size=size, qd=q, requests=len(offs), seconds=wall,
                           mb_s=len(offs) * size / wall / 1e6, per_request_us=wall / len(offs) * 1e6,
                           lat_p50_us=float(np.median(lat) * 1e6), lat_p99_us=float(np.quantile(lat, 0.99) * 1e6)))
    fits = {}
    for q in depths:
        pts = [p for p in points if p["qd"] == q]
        if len(pts) >= 2:
            m = fit_cost_model([p["size"] for p in pts], [p["per_request_us"] * 1e-6 for p in pts])
            fits[str(q)] = m.as_dict()
    seq = max(points, key=lambda p: p["mb_s"]) if points else None
    return {"file": str(path), "file_bytes": file_bytes, "direct_io": bool(points) and direct_used,
            "points": points, "fit": fits, "seq_bw_mbps": seq["mb_s"] if seq else None,
            "ufs40": {**UFS40, "merge_gap_bytes": CostModel(UFS40["t0_us"], UFS40["bw_mbps"]).merge_gap_bytes}}


def model_at_depth(probe_result: dict, qd: int) -> CostModel:
    """The fitted model at the probed depth nearest `qd` (the runtime's io_threads)."""
    fits = probe_result["fit"]
    if not fits:
        raise ValueError("the probe has no fitted cost model")
    best = min(fits, key=lambda q: abs(int(q) - qd))
    return CostModel(fits[best]["t0_us"], fits[best]["bw_mbps"])
