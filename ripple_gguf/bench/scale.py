"""`ripple-gguf bench scale`: the runtime at Llama-3-8B layer size. Mechanics, not quality.

The weights are random (std 0.02, the fixture tokenizer), so this says what the runtime costs at real
dimensions, never how well a predictor works; the density is forced (predictor thresholds out of
reach and a per-token floor of exactly d: every token computes its top ceil(d * n_ff) neurons by
predictor score).
1. A checkpoint of `layers` layers of Llama-3-8B shape (n_embd 4096, n_ff 14336, 32 heads, 8 KV
   heads) is converted by `ripple-gguf convert` itself to each weight type (cached in the work dir).
2. Per type, decode tokens one at a time:
   stock    llama.cpp's own dense path (RippleLlama dense=True);
   warm     the runtime with the whole FFN cached, at densities 0..1 (0 isolates the rest of the
            model: FFN time(d) = t(d) - t(0)); and every neuron with the predictor off, so the
            predictor's cost per token = t(floor 1) - t(all neurons, no predictor);
   cold     a cache of one layer (each planned whole) with O_DIRECT: reads, bytes and I/O time.
3. Placement of one n_ff 14336 layer on synthetic clustered activity (own process: its peak RSS).
4. Projections (labelled so): tokens/s of an 8B and a 70B model at 50% of their size in memory on
   this disk, NVMe and a UFS 4.0 phone, from the measured per-layer costs; next to stock llama.cpp,
   whose page cache re-reads the whole model every token once it is larger than memory.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .. import iocost
from ..errors import RippleError
from ..iocost import CostModel

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "models" / "tiny-llama-swiglu"   # its tokenizer only (vocab 1024)
CALIB = REPO / "models" / "text" / "calib.txt"
LAYER = dict(n_embd=4096, n_ff=14336, n_head=32, n_kv=8)
MODELS = {  # shapes projected to (Llama-3-8B, Llama-3-70B)
    "8B": dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_kv=8, vocab=128256),
    "70B": dict(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_kv=8, vocab=128256),
}
NVME = dict(name="NVMe (facts.md: ~7 GB/s; ~75 us per 4 KiB read at QD1, 4 readers)", t0_us=75 / 4, bw_mbps=7000.0)
TYPES = ("f16", "q8_0", "q4_k_m")
DENSITIES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
PROJECT_AT = (0.3, 0.5, 0.75)
FORCED = 1e30  # a predictor threshold no score reaches: the floor alone sets the density


# ----------------------------------------------------------------------------- the model

def write_checkpoint(out: Path, layers: int, layer: dict = LAYER, seed: int = 0) -> None:
    """An HF Llama checkpoint of `layers` layers of shape `layer` with random f16 weights."""
    import shutil
    from safetensors.numpy import save_file
    out.mkdir(parents=True, exist_ok=True)
    e, f, nh, nkv = layer["n_embd"], layer["n_ff"], layer["n_head"], layer["n_kv"]
    hd = e // nh
    cfg = json.loads((TOKENIZER / "config.json").read_text())
    vocab = cfg["vocab_size"]
    cfg.update(hidden_size=e, intermediate_size=f, num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
               num_hidden_layers=layers, max_position_embeddings=2048, rope_theta=500000.0, dtype="float16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json"):
        if (TOKENIZER / name).exists():
            shutil.copy(TOKENIZER / name, out / name)
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    t = {"model.embed_tokens.weight": w(vocab, e), "lm_head.weight": w(vocab, e),
         "model.norm.weight": np.ones(e, np.float16)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": np.ones(e, np.float16),
                  p + "post_attention_layernorm.weight": np.ones(e, np.float16),
                  p + "self_attn.q_proj.weight": w(e, e), p + "self_attn.k_proj.weight": w(nkv * hd, e),
                  p + "self_attn.v_proj.weight": w(nkv * hd, e), p + "self_attn.o_proj.weight": w(e, e),
                  p + "mlp.gate_proj.weight": w(f, e), p + "mlp.up_proj.weight": w(f, e),
                  p + "mlp.down_proj.weight": w(e, f)})
    save_file(t, str(out / "model.safetensors"))


def scale_models(work: Path, types, layers: int, layer: dict, log) -> dict[str, Path]:
    """type -> converted GGUF (with its pack), made by `convert` itself and kept in `work` until the
    converter or these settings change."""
    from ..convert import ConvertOptions, convert
    work.mkdir(parents=True, exist_ok=True)
    src = REPO / "ripple_gguf"
    key = hashlib.sha256(json.dumps([layer, layers]).encode()
                         + b"".join((src / f"{m}.py").read_bytes() for m in
                                    ("convert", "make_pack", "predictor", "pack", "profile", "placement", "quality"))).hexdigest()[:16]
    tag = f"{layer['n_embd']}x{layer['n_ff']}-x{layers}"
    ckpt, out = work / f"checkpoint-{tag}", {}
    for t in types:
        gguf = work / f"llama-layer-{tag}-{t}.gguf"
        stamp = gguf.with_suffix(".stamp")
        if gguf.exists() and stamp.exists() and stamp.read_text() == key:
            out[t] = gguf
            continue
        if not (ckpt / "model.safetensors").exists():
            log(f"writing a checkpoint of {layers} layers of n_embd {layer['n_embd']}, n_ff {layer['n_ff']} (random weights)")
            write_checkpoint(ckpt, layers, layer)
        log(f"converting it to {t} with ripple-gguf convert")
        convert(str(ckpt), gguf, ConvertOptions(outtype=t, calib=[str(CALIB)], calib_tokens=512),
                log=lambda m: log(f"  {m}"))
        stamp.write_text(key)
        out[t] = gguf
    return out


# ----------------------------------------------------------------------------- measurements

def _decode_seconds(llm, n: int, first: int = 100) -> float:
    """Seconds per token of n one-token decodes after a short prompt."""
    llm.reset()
    llm.eval([first, first + 1, first + 2, first + 3])
    t = time.perf_counter()
    for i in range(n):
        llm.eval([first + 4 + i])
    return (time.perf_counter() - t) / n


def force_density(llm, d: float) -> None:
    """Every token computes exactly its top ceil(d * n_ff) neurons of each layer by predictor score."""
    llm.ripple_set_selection([FORCED] * llm.ripple_pack.n_layer, d)


def measure_type(gguf: Path, densities, n_tok: int, threads: int, cost: CostModel) -> dict:
    from ..gguf_io import open_header
    from ..runtime import RippleLlama, verified_pack
    pk = verified_pack(str(gguf))  # once: every load below reuses it
    header = open_header(gguf)
    ffn_layer = pk.n_ff[0] * pk.layer_bundle_bytes[0]
    common = dict(n_ctx=n_tok + 16, n_threads=threads, n_batch=8, verbose=False)
    llm = RippleLlama(str(gguf), dense=True, **common)
    try:
        stock = _decode_seconds(llm, n_tok)
    finally:
        llm.close()
    warm = []
    llm = RippleLlama(str(gguf), pack=pk, cache_size=pk.every_slot_bytes, stock_when_dense=False, resident_weights=True, **common)
    try:
        force_density(llm, 1.0)
        _decode_seconds(llm, 1)  # every neuron into the cache (the load's warm-up fills only part of it)
        for d in densities:
            force_density(llm, d)
            _decode_seconds(llm, 2)
            llm.ripple_reset_stats()
            s = _decode_seconds(llm, n_tok)
            st = llm.ripple_stats()
            warm.append(dict(density=d, s_per_token=s, predicted_density=st["predicted_density"],
                             cache_hit_rate=st["cache_hit_rate"]))
    finally:
        llm.close()
    llm = RippleLlama(str(gguf), pack=pk, cache_size=pk.every_slot_bytes, all_active=True, stock_when_dense=False, resident_weights=True, **common)
    try:
        _decode_seconds(llm, 2)
        all_active = _decode_seconds(llm, n_tok)
    finally:
        llm.close()
    cold = []
    llm = RippleLlama(str(gguf), pack=pk, cache_size=pk.layer_cache_bytes, direct_io=True, warm_cache=False,
                      t0_us=cost.t0_us, bw_mbps=cost.bw_mbps, stock_when_dense=False, resident_weights=True, **common)
    try:
        for d in densities[1:]:
            force_density(llm, d)
            llm.ripple_reset_stats()
            s = _decode_seconds(llm, n_tok)
            st = llm.ripple_stats()
            cold.append(dict(density=d, s_per_token=s, io_s_per_token=st["io_seconds_per_token"],
                             reads_per_token=st["reads_per_token"], bytes_per_token=st["bytes_per_token"],
                             useful_bytes_per_token=st["useful_bytes_per_token"], cache_hit_rate=st["cache_hit_rate"],
                             read_mbps=st["read_mbps"], direct_io=st["direct_io"]))
    finally:
        llm.close()
    t0 = warm[0]["s_per_token"] if warm[0]["density"] == 0 else None
    for w in warm:
        w["ffn_s_per_layer"] = (w["s_per_token"] - t0) / pk.n_layer if t0 is not None else None
        w["ffn_gbps"] = (w["density"] * ffn_layer / w["ffn_s_per_layer"] / 1e9
                         if w["ffn_s_per_layer"] and w["ffn_s_per_layer"] > 0 and w["density"] > 0 else None)
    dense_ffn = (stock - t0) / pk.n_layer if t0 is not None else None
    pred_bytes = max(0, pk.file_bytes - pk.ffn_pack_bytes)
    sizes = {t.name: t.n_bytes / max(1, int(np.prod(t.shape))) for t in header.tensors}
    return {
        "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "n_layer": pk.n_layer, "n_embd": pk.n_embd, "n_ff": pk.n_ff[0], "weight_type": pk.type_label,
        "bundle_bytes": pk.layer_bundle_bytes[0], "ffn_bytes_per_layer": ffn_layer,
        "predictor_bytes_per_layer": pred_bytes / pk.n_layer,
        "bytes_per_element": {"attn": sizes.get("blk.0.attn_q.weight"), "output": sizes.get("output.weight"),
                              "token_embd": sizes.get("token_embd.weight"),
                              **{k: sizes.get(f"blk.0.{k}.weight") for k in ("ffn_gate", "ffn_up", "ffn_down")}},
        "stock_s_per_token": stock, "rest_s_per_token": t0, "dense_ffn_s_per_layer": dense_ffn,
        "dense_ffn_gbps": ffn_layer / dense_ffn / 1e9 if dense_ffn and dense_ffn > 0 else None,
        "all_active_s_per_token": all_active,
        "predictor_s_per_layer": (next(w["s_per_token"] for w in warm if w["density"] == 1.0) - all_active) / pk.n_layer
        if 1.0 in densities else None,
        "warm": warm, "cold": cold,
    }


def placement_cost(n_ff: int = 14336, tokens: int = 8192) -> dict:
    """Co-activation placement of one layer, in its own process (its peak RSS is the placement's)."""
    code = ("import json,resource,time; from ripple_gguf.bench.scale import synthetic_activity;"
            "from ripple_gguf.placement import coactivation_order, runs_per_token;"
            f"a=synthetic_activity({n_ff},{tokens}); t=time.perf_counter(); o=coactivation_order(a);"
            "s=time.perf_counter()-t; print(json.dumps(dict(seconds=s,"
            "peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024,"
            "reads_coactivation=float(runs_per_token(a[:,o]).mean()), reads_identity=float(runs_per_token(a).mean()))))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise RippleError(f"placement at scale failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return {"n_ff": n_ff, "tokens": tokens, **json.loads(p.stdout.strip().splitlines()[-1])}


def synthetic_activity(n_ff: int, tokens: int, seed: int = 0) -> np.ndarray:
    """5% hot neurons, the rest in clusters of 16 that fire together, plus background noise."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_ff)
    n_hot = n_ff // 20
    hot, rest = perm[:n_hot], perm[n_hot:]
    clusters = rest[: len(rest) // 16 * 16].reshape(-1, 16)
    active = rng.random((tokens, n_ff), dtype=np.float32) < 0.01
    active[:, hot] |= rng.random((tokens, n_hot), dtype=np.float32) < 0.8
    picks = rng.integers(0, len(clusters), (tokens, len(clusters) // 20))
    for t in range(tokens):
        active[t, clusters[picks[t]].ravel()] = True
    return active


# ----------------------------------------------------------------------------- the whole mode

def run_scale(work: Path, types=TYPES, layers: int = 2, tokens: int = 16, threads: int | None = None,
              probe_result: dict | None = None, placement_tokens: int = 8192, layer: dict = LAYER,
              progress: bool = True) -> dict:
    from .project import ASSUMPTIONS, projections
    log = (lambda m: print(f"bench scale: {m}", file=sys.stderr)) if progress else (lambda m: None)
    if layers < 2:
        raise RippleError("--layers must be at least 2 (with one layer the minimum cache is the whole FFN)")
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise RippleError(f"unknown type {unknown[0]!r} for bench scale; choose from {', '.join(TYPES)}")
    threads = threads or min(os.cpu_count() or 1, 8)
    work = Path(work)
    ggufs = scale_models(work, types, layers, layer, log)
    if probe_result is None:
        probe_file = iocost.make_probe_file(work, 256 << 20)
        try:
            probe_result = iocost.probe(probe_file, depths=(1, 4), progress=progress)
        finally:
            os.unlink(probe_file)
    cost = iocost.model_at_depth(probe_result, 4)
    measured = {}
    for t, g in ggufs.items():
        log(f"timing {g.name}")
        measured[t] = measure_type(g, DENSITIES, tokens, threads, cost)
    log(f"placing one layer of n_ff {layer['n_ff']} ({placement_tokens} tokens of synthetic activity)")
    place = placement_cost(layer["n_ff"], placement_tokens)
    return {"layer": layer, "layers": layers, "tokens": tokens, "threads": threads, "note":
            "random weights: mechanics, not quality; density forced by the per-token floor",
            "measured": measured, "placement": place, "probe": probe_result,
            "projection": {"assumptions": list(ASSUMPTIONS), "rows": projections(measured, probe_result, PROJECT_AT)}}


def format_scale(r: dict) -> str:
    L = [f"bench scale: {r['layers']} layers of Llama-3-8B layer shape (n_embd {r['layer']['n_embd']}, n_ff "
         f"{r['layer']['n_ff']}), {r['note']}; {r['tokens']} tokens per point, {r['threads']} threads"]
    for t, m in r["measured"].items():
        L.append(f"{t} ({m['weight_type']}): stock {1e3 * m['stock_s_per_token']:.1f} ms/token "
                 f"(dense FFN {1e3 * (m['dense_ffn_s_per_layer'] or 0):.2f} ms/layer, {m['dense_ffn_gbps'] or 0:.1f} GB/s); "
                 f"predictor {1e3 * (m['predictor_s_per_layer'] or 0):.2f} ms/layer")
        L.append(f"  {'density':>7} {'warm ms/layer':>13} {'GB/s':>6} {'x dense':>7} | {'cold ms/tok':>11} {'io ms':>7} "
                 f"{'reads':>6} {'MiB/tok':>7} {'MB/s':>6}")
        cold = {c["density"]: c for c in m["cold"]}
        for w in m["warm"]:
            c = cold.get(w["density"], {})
            ratio = w["ffn_s_per_layer"] / m["dense_ffn_s_per_layer"] if w["ffn_s_per_layer"] is not None and m["dense_ffn_s_per_layer"] else 0
            L.append(f"  {w['density']:7.2f} {1e3 * (w['ffn_s_per_layer'] or 0):13.2f} {w['ffn_gbps'] or 0:6.1f} {ratio:7.2f} | "
                     + (f"{1e3 * c['s_per_token']:11.1f} {1e3 * c['io_s_per_token']:7.1f} {c['reads_per_token']:6.0f} "
                        f"{c['bytes_per_token'] / 2**20:7.1f} {c['read_mbps'] or 0:6.0f}" if c else f"{'':>11}"))
    p = r["placement"]
    L.append(f"placement of one layer (n_ff {p['n_ff']}, {p['tokens']} tokens): {p['seconds']:.1f} s, peak RSS "
             f"{p['peak_rss_mib']:.0f} MiB; reads/token {p['reads_identity']:.0f} -> {p['reads_coactivation']:.0f} (synthetic clusters)")
    L.append("projected tokens/s at 50% of the model in memory (PROJECTIONS; assumptions:")
    L += [f"  - {a}" for a in r["projection"]["assumptions"]]
    L.append(")")
    for row in r["projection"]["rows"]:
        if row["density"] != 0.5:
            continue
        if not row["fits"]:
            L.append(f"  {row['model']:>4} {row['type']:<7} {row['device']}: not projected ({row['reason']})")
            continue
        L.append(f"  {row['model']:>4} {row['type']:<7} d=0.5 cache {100 * row['cache_share']:3.0f}%: ripple "
                 f"{row['tok_s']:7.2f} tok/s, stock {row['stock_tok_s']:7.2f} ({row['speedup']:.1f}x)  {row['device']}")
    return "\n".join(L)
