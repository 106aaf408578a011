"""`ripple-gguf bench io`: replay held-out activation sets against the pack's bundles, cold.

1. Run the text through the GGUF in llama.cpp; per layer and token, the neurons the pack's predictor
   selects (what the runtime reads) and the truly active ones.
2. A cache of 0/10/25% of the FFN bytes: half pinned to the calibration-hottest neurons (as the
   runtime pins), half LRU. Hits and misses do not depend on the placement, so they are simulated once.
3. Each placement's bundle table is written to a scratch file (the same layout as the pack, only the
   neuron order differs): identity (LLM in a flash: per-neuron bundles in model order), frequency
   (hot first), coactivation (the converter's order, i.e. the pack itself).
4. Misses become requests, with or without merging gaps < t0*BW (iocost.plan_runs), planned once;
   reads/token and bytes/token are counted over all tokens, and the first `time_tokens` tokens'
   requests are read for real from a cold file (O_DIRECT where possible), layer by layer with the
   runtime's parallelism.
5. Oracle bound: the missed active bytes read in one sequential pass at the probed bandwidth.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import iocost
from ..errors import RippleError
from ..iocost import CostModel

PLACEMENTS = ("identity", "frequency", "coactivation")
BUDGETS = (0.0, 0.10, 0.25)
PIN_SHARE = 0.5


def activation_sets(gguf: Path, pack, text: str, max_tokens: int, n_ctx: int = 512):
    """Per layer (tokens, n_ff) bool arrays in pack order: predicted (read) and truly active."""
    from ..index_keys import in_pack_order
    from ..llama_capture import LlamaRunner
    from ..profile import chunk_tokens
    pred = [[] for _ in range(pack.n_layer)]
    true = [[] for _ in range(pack.n_layer)]
    with LlamaRunner(gguf, n_ctx=n_ctx, capture_inputs=True) as runner:
        tokens = runner.tokenize(text)[:max_tokens]
        chunks = chunk_tokens(tokens, n_ctx, runner.bos)
        if not chunks:
            raise RippleError("--text is too short to replay anything; pass a longer file")
        for chunk in tqdm(chunks, desc="activation sets", unit="chunk", leave=False):
            _, cap, _ = runner.evaluate(chunk)
            for il, p in enumerate(pack.predictors):
                pred[il].append(p.predict(cap[("input", il)]))
                true[il].append(np.abs(in_pack_order(pack.orders[il], cap[("act", il)])) > pack.act_threshold[il])
    return [np.concatenate(p) for p in pred], [np.concatenate(t) for t in true]


def placement_positions(index, il: int) -> dict[str, np.ndarray]:
    """pos[name][p] = where stored neuron p sits in that placement's file."""
    n = len(index.orders[il])
    by_freq = np.empty(n, np.int64)
    by_freq[np.argsort(-index.act_freq[il], kind="stable")] = np.arange(n)
    return {"identity": index.orders[il].astype(np.int64), "frequency": by_freq,
            "coactivation": np.arange(n, dtype=np.int64)}


def simulate_cache(reads: np.ndarray, capacity: int, hot: np.ndarray) -> np.ndarray:
    """(tokens, n) neurons to read -> (tokens, n) misses under a cache of `capacity` neurons:
    PIN_SHARE pinned to the hottest (by calibration frequency), the rest LRU. The LRU content before
    token t is exactly the unpinned neurons with the latest last use, so it is a top-k per token."""
    t_n, n = reads.shape
    if capacity <= 0:
        return reads.copy()
    pinned = np.zeros(n, bool)
    pinned[np.argsort(-hot, kind="stable")[:int(capacity * PIN_SHARE)]] = True
    lru_cap = capacity - int(pinned.sum())
    last = np.full(n, -1, np.int64)
    last[pinned] = -2  # never in the LRU part
    misses = np.empty_like(reads)
    idx = np.arange(n)
    for t in range(t_n):
        cached = pinned.copy()
        seen = np.flatnonzero(last >= 0)
        if len(seen) <= lru_cap:
            cached[seen] = True
        elif lru_cap > 0:  # recency; within one token the runtime admits in position order
            key = last[seen] * n + idx[seen]
            cached[seen[np.argpartition(-key, lru_cap - 1)[:lru_cap]]] = True
        misses[t] = reads[t] & ~cached
        last[reads[t] & ~pinned] = t
    return misses


def write_placement_file(pack, positions: list[np.ndarray], path: Path) -> list[int]:
    """The pack's bundle tables with neurons at `positions`; returns each layer's table offset."""
    bases, off = [], 0
    with open(path, "wb") as f:
        for il in range(pack.n_layer):
            off = -(-off // iocost.ALIGN) * iocost.ALIGN
            f.seek(off)
            src = np.memmap(pack.path, np.uint8, "r", pack.bundle_offsets[il], (pack.n_ff[il], pack.layer_bundle_bytes[il]))
            out = np.empty_like(src)
            out[positions[il]] = src
            f.write(out.tobytes())
            bases.append(off)
            off += out.nbytes
        f.flush()
        os.fsync(f.fileno())
    return bases


def request_plans(misses: list[np.ndarray], positions: list[np.ndarray], bases: list[int], bbs: list[int],
                  gap: int | None) -> list[list[tuple[np.ndarray, np.ndarray, int]]]:
    """Per token, per layer: (offsets, lengths) of the requests and the useful (missed) bytes."""
    plans = []
    for t in range(len(misses[0])):
        per_layer = []
        for il, m in enumerate(misses):
            pos = np.sort(positions[il][np.flatnonzero(m[t])])
            bb = bbs[il]
            starts, counts = iocost.plan_runs(pos, bb, gap)
            per_layer.append((bases[il] + starts * bb, counts * bb, len(pos) * bb))
        plans.append(per_layer)
    return plans


def count_requests(plans) -> dict:
    reads = nbytes = aligned = useful = 0
    for per_layer in plans:
        for offs, lens, use in per_layer:
            reads += len(offs)
            nbytes += int(lens.sum())
            aligned += int(iocost.align_out(offs, lens)[1].sum())
            useful += use
    n = len(plans)
    return dict(reads_per_token=reads / n, bytes_per_token=nbytes / n,
                aligned_bytes_per_token=aligned / n, useful_bytes_per_token=useful / n)


def timed_replay(path: Path, plans, threads: int, direct: bool) -> dict:
    """Issue the planned reads for real from a cold file, layer by layer."""
    reader = iocost.Reader(path, threads=threads, direct=direct)
    try:
        reader.cold()
        got = 0
        t0 = time.perf_counter()
        for per_layer in plans:
            for offs, lens, _ in per_layer:
                if len(offs):
                    got += reader.read(offs, lens)
        seconds = time.perf_counter() - t0
    finally:
        reader.close()
    n = len(plans)
    return dict(io_s_per_token=seconds / n, transferred_per_token=got / n,
                eff_bw_mbps=got / seconds / 1e6 if seconds > 0 else None, direct_io=reader.direct)


def run_io(gguf, text_path, max_tokens: int = 1024, time_tokens: int = 64, budgets=BUDGETS,
           io_threads: int = 4, direct: bool = True, scratch_dir=None, probe_result: dict | None = None,
           progress: bool = True) -> dict:
    from ..gguf_io import open_header, read_ffn_layout
    from ..index_keys import read_index
    from ..pack import open_pack
    gguf = Path(gguf)
    if not gguf.is_file():
        raise RippleError(f"{gguf}: no such file; pass a GGUF made by `ripple-gguf convert`")
    if not os.path.isfile(text_path):
        raise RippleError(f"{text_path}: no such file; pass held-out text with --text")
    header = open_header(gguf)
    index = read_index(header, read_ffn_layout(header).n_ff)
    if index is None:
        raise RippleError(f"{gguf} has no ripple index; convert it with `ripple-gguf convert`")
    pack = open_pack(gguf)
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    pred, true = activation_sets(gguf, pack, text, max_tokens)
    n_tok = len(pred[0])
    time_tokens = max(1, min(time_tokens, n_tok))
    bb = pack.bundle_bytes  # the largest record (mixed-type files vary per layer)
    positions = {name: [] for name in PLACEMENTS}
    for il in range(pack.n_layer):
        for name, pos in placement_positions(index, il).items():
            positions[name].append(pos)
    ffn_bytes = pack.ffn_pack_bytes

    scratch = Path(tempfile.mkdtemp(prefix=".ripple-bench-io-", suffix=".tmp", dir=scratch_dir or gguf.parent))
    try:
        files, bases = {}, None
        for name in tqdm(PLACEMENTS, desc="writing placement files", leave=False, disable=not progress):
            files[name] = scratch / f"{name}.bundles"
            bases = write_placement_file(pack, positions[name], files[name])
        if probe_result is None:
            probe_file = iocost.make_probe_file(scratch, max(64 << 20, min(256 << 20, 2 * ffn_bytes)))
            probe_result = iocost.probe(probe_file, depths=sorted({1, io_threads}), direct=direct, progress=progress)
        model = iocost.model_at_depth(probe_result, io_threads)
        seq_bw = probe_result["seq_bw_mbps"]
        ufs = CostModel(iocost.UFS40["t0_us"], iocost.UFS40["bw_mbps"])
        configs = []
        grid = [(b, p, m) for b in budgets for p in PLACEMENTS for m in (False, True)]
        misses_at = {}
        for budget, place, merge in tqdm(grid, desc="replaying reads", unit="config", leave=False, disable=not progress):
            if budget not in misses_at:
                misses_at[budget] = [simulate_cache(pred[il], int(budget * pack.n_ff[il]), index.act_freq[il])
                                     for il in range(pack.n_layer)]
            misses = misses_at[budget]
            gap = model.merge_gap_bytes if merge else None
            plans = request_plans(misses, positions[place], bases, pack.layer_bundle_bytes, gap)
            c = dict(placement=place, merge=merge, budget=budget, **count_requests(plans))
            timed_counts = count_requests(plans[:time_tokens])
            c.update(timed_replay(files[place], plans[:time_tokens], io_threads, direct))
            c["oracle_s_per_token"] = timed_counts["useful_bytes_per_token"] / (seq_bw * 1e6)
            c["vs_oracle"] = c["io_s_per_token"] / c["oracle_s_per_token"] if c["oracle_s_per_token"] else None
            c["model_s_per_token"] = model.seconds(c["reads_per_token"], c["bytes_per_token"])
            c["ufs40_s_per_token"] = ufs.seconds(c["reads_per_token"], c["aligned_bytes_per_token"])
            c["ufs40_oracle_s_per_token"] = c["useful_bytes_per_token"] / (ufs.bw_mbps * 1e6)
            configs.append(c)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "model": {"gguf": str(gguf), "n_layer": pack.n_layer, "n_embd": pack.n_embd, "n_ff": pack.n_ff,
                  "weight_type": pack.type_label, "bundle_bytes": bb, "ffn_bytes": ffn_bytes,
                  "placement_in_file": index.placement, "activation": index.activation},
        "text": str(text_path), "tokens": n_tok, "timed_tokens": time_tokens, "io_threads": io_threads,
        "density": {"predicted": [float(p.mean()) for p in pred], "true": [float(t.mean()) for t in true]},
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


def format_io(r: dict) -> str:
    m = r["model"]
    lines = [f"bench io: {Path(m['gguf']).name} ({m['weight_type']}, {m['n_layer']} layers, bundle {m['bundle_bytes']} B), "
             f"{r['tokens']} tokens counted, {r['timed_tokens']} read cold; predicted density "
             f"{100 * np.mean(r['density']['predicted']):.1f}% (true {100 * np.mean(r['density']['true']):.1f}%)",
             f"cost model at QD {r['io_threads']}: t0 {r['cost_model']['t0_us']:.1f} us, {r['cost_model']['bw_mbps']:.0f} MB/s, "
             f"merge gaps < {r['cost_model']['merge_gap_bytes']} B; sequential {r['seq_bw_mbps']:.0f} MB/s",
             f"{'cache':>5} {'placement':<12} {'merge':<5} {'reads/tok':>9} {'KiB/tok':>8} {'io ms/tok':>9} "
             f"{'MB/s':>6} {'x oracle':>8} {'UFS4 ms':>7}"]
    for c in r["configs"]:
        lines.append(f"{100 * c['budget']:4.0f}% {c['placement']:<12} {'yes' if c['merge'] else 'no':<5} "
                     f"{c['reads_per_token']:9.1f} {c['bytes_per_token'] / 1024:8.1f} {1e3 * c['io_s_per_token']:9.3f} "
                     f"{c['eff_bw_mbps'] or 0:6.0f} {c['vs_oracle'] or 0:8.2f} {1e3 * c['ufs40_s_per_token']:7.3f}")
    for b, h in r["headline"].items():
        lines.append(f"cache {100 * float(b):.0f}%: coactivation+merging vs identity per-neuron: "
                     f"{h['reads_ratio']:.2f}x fewer reads, {h['io_time_ratio']:.2f}x less I/O time "
                     f"({h['ours_vs_oracle']:.2f}x the oracle; UFS 4.0 estimate {h['ufs40_time_ratio']:.2f}x)")
    return "\n".join(lines)
