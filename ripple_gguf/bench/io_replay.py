"""`ripple-gguf bench io`: held-out tokens through the runtime itself, cold, in each neuron placement.

1. Placements: the GGUF's own (its pack) and, to compare, the same weights converted with each other
   placement (`convert --placement`, with the calibration its index records) into a scratch directory.
   identity = LLM in a flash's per-neuron bundles in model order; frequency = hot first; coactivation =
   the converter's default (Ripple's order).
2. For each placement, neuron-cache size (one layer, the least that plans each layer whole; 25% and 50% of the FFN
   bytes) and merging on/off (merge_gap_bytes 0 vs the probed cost model's t0 x BW): a RippleLlama with
   O_DIRECT reads decodes the held-out tokens one at a time (teacher-forced, at the stored operating
   point nearest `density`: a pack whose default computes every neuron would read the whole FFN in
   any order), and its own counters are the result: read syscalls, bytes, needed bytes, I/O
   seconds, cache hits, predicted density. Nothing here models the cache, the planner or the predictor.
3. Derived from those counts: the same reads under the probed cost model and on a UFS 4.0 phone
   (facts.md), and a bound: the needed (missed) bytes in one sequential pass at the probed bandwidth.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import iocost
from ..errors import RippleError
from ..iocost import CostModel

PLACEMENTS = ("identity", "frequency", "coactivation")
BUDGETS = (0.0, 0.25, 0.5)  # share of the FFN bytes; 0 = one layer (the least that plans each layer whole)


def calibration_of(index, calib: list[str] | None) -> dict:
    """ConvertOptions fields that repeat the calibration a GGUF's index records: self-generated text
    (its token count and seed), or the text files named there, which the caller passes as `calib`."""
    from ..calib import parse_self_generated
    generated = parse_self_generated(index.calib_source)
    if generated:
        return dict(calib=[], calib_tokens=generated[0], seed=generated[1])
    if not calib:
        raise RippleError(f"the GGUF was calibrated on {index.calib_source!r}; pass that text with --calib "
                          "so the other placements are built from the same calibration")
    return dict(calib=list(calib), calib_tokens=int(index.calib_tokens + index.eval_tokens))


def placement_ggufs(gguf: Path, index, scratch: Path, calib: list[str] | None, progress: bool) -> dict[str, Path]:
    """placement -> a GGUF with its pack: the given one for its own placement, the others converted
    from it (the GGUF keeps the source's tensors, so the weights are the same)."""
    from ..convert import ConvertOptions, convert
    cal = calibration_of(index, calib)
    out = {index.placement: gguf}
    for place in PLACEMENTS:
        if place in out:
            continue
        path = scratch / f"{place}.gguf"
        opts = ConvertOptions(placement=place, target_density=float(index.target_density), **cal)
        print(f"bench io: converting the same weights with --placement {place}", file=sys.stderr)
        convert(str(gguf), path, opts, log=(lambda msg: print(f"  {msg}", file=sys.stderr)) if progress else (lambda msg: None))
        out[place] = path
    return out


def held_out_tokens(gguf: Path, text: str, n: int) -> list[int]:
    from ..llama_capture import LlamaRunner
    with LlamaRunner(gguf, n_ctx=64, capture_intermediate=False) as runner:
        tokens = runner.tokenize(text)
    if len(tokens) < 8:
        raise RippleError("--text is too short to replay anything; pass a longer file")
    return [runner.bos] + tokens[:n - 1] if runner.bos is not None else tokens[:n]


def nearest_point(pk, density: float) -> int:
    return int(np.argmin(np.abs(np.asarray(pk.op_density, dtype=np.float64) - density)))


def run_config(gguf: Path, pk, tokens: list[int], cache_share: float, merge: bool, cost: CostModel, io_threads: int,
               direct: bool, threads: int | None, density: float) -> dict:
    """Decode `tokens` one at a time through the runtime (its cost model pinned to the bench's probe,
    merging on or off; `pk` the GGUF's pack, verified once); its counters per token."""
    from ..cgroup import drop_file_cache
    from ..runtime import RippleLlama
    cache = max(pk.layer_cache_bytes, int(cache_share * pk.ffn_pack_bytes))  # at least one layer: each planned whole
    drop_file_cache(pk.path)
    kw = dict(n_threads=threads) if threads else {}
    llm = RippleLlama(str(gguf), pack=pk, cache_size=cache, io_threads=io_threads, direct_io=direct,
                      t0_us=cost.t0_us, bw_mbps=cost.bw_mbps,
                      merge_gap_bytes=None if merge else 0, stock_when_dense=False, resident_weights=True,
                      read_ahead=False,  # the reads each placement makes, not how well they hide
                      n_ctx=max(64, len(tokens) + 8), n_batch=8, verbose=False, **kw)
    try:
        point = llm.ripple_set_point(nearest_point(pk, density))
        llm.ripple_reset_stats()
        for t in tokens:
            llm.eval([t])
        st = llm.ripple_stats()
    finally:
        llm.close()
    return dict(cache_bytes=st["cache_bytes"], cache_share=st["cache_bytes"] / st["ffn_bytes"],
                reads_per_token=st["reads_per_token"], bytes_per_token=st["bytes_per_token"],
                useful_bytes_per_token=st["useful_bytes_per_token"], io_s_per_token=st["io_seconds_per_token"],
                eff_bw_mbps=st["read_mbps"], cache_hit_rate=st["cache_hit_rate"], predicted_density=st["predicted_density"],
                merge_gap_bytes=st["merge_gap_bytes"], direct_io=st["direct_io"], tokens=st["tokens"],
                point_density=point["density"], point_ppl_increase=point["ppl_increase"])


def run_io(gguf, text_path, max_tokens: int = 128, budgets=BUDGETS, io_threads: int = 4, direct: bool = True,
           density: float = 0.5,
           calib: list[str] | None = None, scratch_dir=None, probe_result: dict | None = None,
           threads: int | None = None, progress: bool = True) -> dict:
    from ..gguf_io import open_header, read_ffn_layout
    from ..index_keys import read_index
    from ..runtime import verified_pack
    gguf = Path(gguf)
    if not 0 < density <= 1:
        raise RippleError("--density must be in (0, 1], e.g. 0.5")
    if not gguf.is_file():
        raise RippleError(f"{gguf}: no such file; pass a GGUF made by `ripple-gguf convert`")
    if not os.path.isfile(text_path):
        raise RippleError(f"{text_path}: no such file; pass held-out text with --text")
    header = open_header(gguf)
    index = read_index(header, read_ffn_layout(header).n_ff)
    if index is None:
        raise RippleError(f"{gguf} has no ripple index; convert it with `ripple-gguf convert`")
    if index.placement not in PLACEMENTS:
        raise RippleError(f"{gguf} uses placement {index.placement!r}; bench io compares {', '.join(PLACEMENTS)}")
    pack = verified_pack(str(gguf))
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    tokens = held_out_tokens(gguf, text, max_tokens)

    scratch = Path(tempfile.mkdtemp(prefix=".ripple-bench-io-", suffix=".tmp", dir=scratch_dir or gguf.parent))
    try:
        if probe_result is None:
            probe_file = iocost.make_probe_file(scratch, max(64 << 20, min(256 << 20, 2 * pack.ffn_pack_bytes)))
            probe_result = iocost.probe(probe_file, depths=sorted({1, io_threads}), direct=direct, progress=progress)
            os.unlink(probe_file)
        model = iocost.model_at_depth(probe_result, io_threads)
        seq_bw = probe_result["seq_bw_mbps"]
        ufs = CostModel(iocost.UFS40["t0_us"], iocost.UFS40["bw_mbps"])
        files = placement_ggufs(gguf, index, scratch, calib, progress)
        packs = {place: pack if path == gguf else verified_pack(str(path)) for place, path in files.items()}
        configs = []
        grid = [(b, p, m) for b in budgets for p in PLACEMENTS for m in (False, True)]
        for budget, place, merge in tqdm(grid, desc="decoding through the runtime", unit="config", leave=False,
                                         disable=not progress):
            c = dict(placement=place, merge=merge, budget=budget,
                     **run_config(files[place], packs[place], tokens, budget, merge, model, io_threads, direct, threads, density))
            c["oracle_s_per_token"] = c["useful_bytes_per_token"] / (seq_bw * 1e6)
            c["vs_oracle"] = c["io_s_per_token"] / c["oracle_s_per_token"] if c["oracle_s_per_token"] else None
            c["model_s_per_token"] = model.seconds(c["reads_per_token"], c["bytes_per_token"])
            c["ufs40_s_per_token"] = ufs.seconds(c["reads_per_token"], c["bytes_per_token"])
            configs.append(c)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    by_place = {p: float(np.mean([c["predicted_density"] for c in configs if c["placement"] == p])) for p in PLACEMENTS}
    return {
        "model": {"gguf": str(gguf), "n_layer": pack.n_layer, "n_embd": pack.n_embd, "n_ff": pack.n_ff,
                  "weight_type": pack.type_label, "bundle_bytes": pack.bundle_bytes, "ffn_bytes": pack.ffn_pack_bytes,
                  "placement_in_file": index.placement, "activation": index.activation,
                  "calib_source": index.calib_source},
        "text": str(text_path), "tokens": len(tokens), "io_threads": io_threads, "target_density": density,
        "density": {"predicted": by_place[index.placement], "by_placement": by_place},
        "probe": probe_result, "cost_model": model.as_dict(), "seq_bw_mbps": seq_bw,
        "configs": configs, "headline": headline(configs),
    }


def _find(configs, place, merge, budget):
    return next(c for c in configs if c["placement"] == place and c["merge"] == merge and c["budget"] == budget)


def _ratio(a, b):
    return a / b if b else None


def headline(configs: list[dict]) -> dict:
    """Per budget: identity per-neuron bundles (no merging; LLM in a flash) vs coactivation+merging."""
    out = {}
    for b in sorted({c["budget"] for c in configs}):
        base, ours = _find(configs, "identity", False, b), _find(configs, "coactivation", True, b)
        base_m, ours_n = _find(configs, "identity", True, b), _find(configs, "coactivation", False, b)
        out[f"{b:g}"] = {
            "reads_ratio": _ratio(base["reads_per_token"], ours["reads_per_token"]),
            "io_time_ratio": _ratio(base["io_s_per_token"], ours["io_s_per_token"]),
            "ours_vs_oracle": ours["vs_oracle"],
            "ufs40_time_ratio": _ratio(base["ufs40_s_per_token"], ours["ufs40_s_per_token"]),
            "placement_reads_ratio": _ratio(base["reads_per_token"], ours_n["reads_per_token"]),
            "merged_time_ratio": _ratio(base_m["io_s_per_token"], ours["io_s_per_token"]),
        }
    return out


def budget_label(c: dict) -> str:
    return f"min ({100 * c['cache_share']:.0f}%)" if c["budget"] == 0 else f"{100 * c['cache_share']:.0f}%"


def format_io(r: dict) -> str:
    m = r["model"]
    dens = ", ".join(f"{p} {100 * d:.1f}%" for p, d in r["density"]["by_placement"].items())
    lines = [f"bench io: {Path(m['gguf']).name} ({m['weight_type']}, {m['n_layer']} layers, bundle {m['bundle_bytes']} B), "
             f"{r['tokens']} held-out tokens decoded one at a time through the runtime, cold, at the stored operating "
             f"point nearest density {r['target_density']:g}; predicted density {dens}",
             f"cost model at QD {r['io_threads']}: t0 {r['cost_model']['t0_us']:.1f} us, {r['cost_model']['bw_mbps']:.0f} MB/s, "
             f"merge gaps < {r['cost_model']['merge_gap_bytes']} B; sequential {r['seq_bw_mbps']:.0f} MB/s",
             f"{'cache':>9} {'placement':<12} {'merge':<5} {'reads/tok':>9} {'KiB/tok':>8} {'hit':>5} {'io ms/tok':>9} "
             f"{'MB/s':>6} {'x oracle':>8} {'UFS4 ms':>7}"]
    for c in r["configs"]:
        lines.append(f"{budget_label(c):>9} {c['placement']:<12} {'yes' if c['merge'] else 'no':<5} "
                     f"{c['reads_per_token']:9.1f} {c['bytes_per_token'] / 1024:8.1f} {c['cache_hit_rate']:5.2f} "
                     f"{1e3 * c['io_s_per_token']:9.3f} {c['eff_bw_mbps'] or 0:6.0f} {c['vs_oracle'] or 0:8.2f} "
                     f"{1e3 * c['ufs40_s_per_token']:7.3f}")
    for b, h in r["headline"].items():
        lines.append(f"cache {'min' if float(b) == 0 else f'{100 * float(b):.0f}%'}: coactivation+merging vs identity "
                     f"per-neuron: {h['reads_ratio'] or 0:.2f}x fewer reads, {h['io_time_ratio'] or 0:.2f}x less I/O time "
                     f"({h['ours_vs_oracle'] or 0:.2f}x the oracle; UFS 4.0 estimate {h['ufs40_time_ratio'] or 0:.2f}x)")
    return "\n".join(lines)
