"""`ripple-gguf verify OUT.gguf`: everything the runtime trusts, checked in full.

The GGUF's header and ripple index; the pack's header checksum, its binding to the GGUF (SHA-256
and the runtime's 64-bit sum), every predictor checksum and every bundle record's checksum
(docs/FORMAT.md section 2, "Checksums"). The runtime checks the same sums lazily (a record when it
is first read); this reads every byte of the bundle tables once, sequentially.
"""
from __future__ import annotations

import time
from pathlib import Path

from .errors import RippleError
from .gguf_io import kv, open_header, read_ffn_layout
from .index_keys import read_index
from .pack import REBUILD, gguf_binding_sum, not_converted, open_pack, pack_path_for, verify_records


def verify(gguf_path: str | Path, pack_path: str | Path | None = None, log=None) -> dict:
    t0 = time.perf_counter()
    gguf_path = Path(gguf_path)
    header = open_header(gguf_path)
    layout = read_ffn_layout(header)
    if read_index(header, layout.n_ff) is None:
        raise not_converted(gguf_path)
    pack = open_pack(gguf_path, pack_path)  # header checksum, structure, SHA-256 binding, predictor checksums
    fix = REBUILD.format(gguf=gguf_path)
    from .gguf_header import GGUFHeader
    stored = kv(GGUFHeader(pack.path), "ripple.pack.binding_sum")
    if stored != gguf_binding_sum(header):
        raise RippleError(f"{pack.path}: the runtime's binding sum does not match {gguf_path.name}; {fix}")
    checked = 0
    for il in range(pack.n_layer):
        bad = verify_records(pack, il)
        if bad is not None:
            raise RippleError(f"{pack.path}: layer {il} bundles are damaged (record {bad} fails its checksum); {fix}")
        checked += pack.n_ff[il] * pack.layer_bundle_bytes[il]
        if log:
            log(il)
    return {"gguf": str(gguf_path), "pack": str(pack.path), "ok": True, "layers": pack.n_layer,
            "records": sum(pack.n_ff), "bundle_bytes_checked": checked,
            "predictor_bytes_checked": pack.predictor_bytes, "seconds": round(time.perf_counter() - t0, 3)}


def format_result(r: dict) -> str:
    return (f"OK: {r['gguf']} and {Path(r['pack']).name} verified: header, ripple index, binding, {r['layers']} "
            f"layers' predictors and {r['records']} bundle records ({r['bundle_bytes_checked'] / 2**20:.1f} MiB) "
            f"in {r['seconds']:.2f} s")


__all__ = ["verify", "format_result", "pack_path_for"]
