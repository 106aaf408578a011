"""`ripple-gguf inspect`: what a converted GGUF holds and how many reads per token its order needs."""
from __future__ import annotations

from pathlib import Path

import tempfile

import numpy as np

from .calib import read_text_files
from .errors import RippleError
from .gguf_io import ffn_weight_bytes, kv, open_header, read_ffn_layout
from .index_keys import read_index
from .placement import reads_by_method
from .quality import every_neuron_pays
from .profile import capture_layers, chunk_tokens, profile


def measure_text(path: Path, index, text: str, pack=None, n_ctx: int = 512, max_tokens: int = 16384) -> dict:
    """Run `text` through this GGUF in llama.cpp: reads/token per method and layer, and, with a
    pack, how its predictors do on this text (recall, precision, predicted density)."""
    from .llama_capture import LlamaRunner
    from .predictor import evaluate
    per, pred = [], []
    with LlamaRunner(path, n_ctx=n_ctx, capture_inputs=pack is not None) as runner:
        tokens = runner.tokenize(text)[:max_tokens]
        chunks = chunk_tokens(tokens, n_ctx, runner.bos)
        if not chunks:
            raise RippleError("--text is too short to measure anything; pass a longer file")
        act = profile(runner, chunks, thresholds=index.thresholds, kind=index.activation, desc="profiling text")
        per = [reads_by_method(index.in_pack_order(il, act.layer(il)), index.orders[il], index.act_freq[il])
               for il in range(len(index.orders))]
        if pack is not None:
            with tempfile.TemporaryDirectory() as d:
                xs, hs, n = capture_layers(runner, chunks, max_tokens, d, desc="recording activations")
                pred = [evaluate(p, xs[il][:n], index.in_pack_order(il, hs[il][:n]), float(pack.act_threshold[il]))
                        for il, p in enumerate(pack.predictors)]
                del xs, hs
    out = {"tokens": act.tokens, **{k: np.array([p[k] for p in per]) for k in per[0]}}
    if pred:
        out["predictor"] = {k: [round(p[k], 4) for p in pred] for k in pred[0]}
    return out


def pack_info(path: Path, reader) -> dict | None:
    """Presence, binding status and sizes of OUT.ripple; None when there is no pack."""
    from .pack import open_pack, pack_path_for
    pp = pack_path_for(path)
    if not pp.exists():
        return None
    try:
        pk = open_pack(path, pp)
    except RippleError as e:
        return {"file": str(pp), "status": f"unusable: {e}", "obj": None}
    ffn_bytes = sum(ffn_weight_bytes(reader, pk.n_layer))
    label = getattr(pk, "type_label", None) or pk.weight_type.name
    return {"file": str(pp), "status": "bound to this GGUF", "obj": pk, "bytes": pk.file_bytes,
            "overhead_vs_gguf": pk.file_bytes / path.stat().st_size, "bundle_bytes": pk.bundle_bytes,
            "weight_type": label, "predictor_bytes": pk.predictor_bytes,
            "predictor_vs_ffn": pk.predictor_bytes / ffn_bytes,
            "operating_points": [{"density": round(float(d), 4), "ppl_increase": round(float(q), 5),
                                  "read_share": None if pk.op_read_share is None else round(float(pk.op_read_share[i]), 4),
                                  "every_neuron": every_neuron_pays(pk, i)}
                                 for i, (d, q) in enumerate(zip(pk.op_density, pk.op_ppl_increase))],
            "default_point": pk.op_default, "max_ppl_increase": pk.op_budget,
            "train_tokens": pk.train_tokens, "validation_tokens": pk.eval_tokens,
            "validation": {k: [round(float(x), 4) for x in v] for k, v in pk.stats.items()}}


def inspect(path: str | Path, text_files: list[str] | None = None) -> dict:
    path = Path(path)
    reader = open_header(path)
    layout = read_ffn_layout(reader)
    index = read_index(reader, layout.n_ff)
    info = {
        "file": str(path), "bytes": path.stat().st_size, "arch": layout.arch,
        "name": kv(reader, "general.name", ""), "n_layer": layout.n_layer, "n_embd": layout.n_embd,
        "n_ff": layout.n_ff[0] if len(set(layout.n_ff)) == 1 else layout.n_ff,
        "ffn_gate": layout.has_gate, "ffn_weight_type": layout.weight_type,
        "ffn_types": {k: [q.name for q in v] for k, v in layout.types.items()}, "ripple": None,
    }
    if index is None:
        return info
    n_groups = [len(g) for g in index.group_starts]
    r = {
        "placement": index.placement, "activation": index.activation,
        "target_density": index.target_density if index.activation == "magnitude" else None,
        "calib_tokens": index.calib_tokens, "calib_source": index.calib_source,
        "groups_per_layer": n_groups,
        "mean_group_size": float(np.mean([n / g for n, g in zip(layout.n_ff, n_groups)])),
        "calib_density": float(np.mean([f.mean() for f in index.act_freq])),
        "source": index.source or None,
        "down_source_type": None if index.down_source_type is None else [_type_name(t) for t in index.down_source_type],
        "down_rel_rms": None if index.down_rel_rms is None else [round(float(e), 5) for e in index.down_rel_rms],
    }
    evals = []
    if index.eval:
        evals.append(("held-out split of the calibration text", index.eval_tokens, index.eval))
    pk = pack_info(path, reader)
    predictor_on_text = None
    if text_files:
        m = measure_text(path, index, read_text_files(text_files, what="--text"), pk and pk["obj"])
        predictor_on_text = m.pop("predictor", None)
        evals.append((", ".join(Path(t).name for t in text_files), m.pop("tokens"), m))
    r["reads"] = [{
        "text": name, "tokens": int(tokens),
        "per_token": {k: float(np.sum(v)) for k, v in ev.items()},
        "per_layer": {k: [round(float(x), 2) for x in v] for k, v in ev.items()},
    } for name, tokens, ev in evals]
    if pk:
        pk.pop("obj")
        if predictor_on_text:
            pk["on_text"] = {"text": evals[-1][0], "tokens": int(evals[-1][1]), **predictor_on_text}
    r["pack"] = pk
    info["ripple"] = r
    return info


def _type_name(t) -> str:
    from gguf import GGMLQuantizationType as QT
    try:
        return QT(int(t)).name
    except ValueError:
        return f"type {int(t)}"


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, il in enumerate(layers):
        if start is None:
            start = il
        if i + 1 == len(layers) or layers[i + 1] != il + 1:
            out.append(str(start) if start == il else f"{start}-{il}")
            start = None
    return ",".join(out)


def compact_types(types: list[str]) -> str:
    """Per-layer types in one line: "Q4_1 (all 30 layers)" or "Q6_K in 0-2,5; Q4_K in 3-4,6-29"."""
    if len(set(types)) == 1:
        return f"{types[0]} (all {len(types)} layers)"
    names = sorted(set(types), key=lambda n: types.index(n))
    return "; ".join(f"{n} in {_ranges([i for i, t in enumerate(types) if t == n])}" for n in names)


def format_report(info: dict) -> str:
    lines = [f"{info['file']}  ({info['bytes'] / 2**20:.1f} MiB)",
             f"  architecture  {info['arch']}  {info['name']}",
             f"  layers {info['n_layer']}  n_embd {info['n_embd']}  n_ff {info['n_ff']}  "
             f"FFN {'gate+up+down' if info['ffn_gate'] else 'up+down (no gate)'}"]
    lines += [f"  ffn_{k:<5} {compact_types(v)}" for k, v in info["ffn_types"].items()]
    r = info["ripple"]
    if r is None:
        lines.append("  no ripple index: a plain GGUF (convert it with `ripple-gguf convert`)")
        return "\n".join(lines)
    if r.get("down_rel_rms") is not None:
        lines.append("  ffn_down vs the source's (converted with --down-type when not as stored):")
        out_types = info["ffn_types"]["down"]
        by = {}
        for il, (src, dst, e) in enumerate(zip(r["down_source_type"], out_types, r["down_rel_rms"])):
            by.setdefault((src, dst), []).append((il, e))
        for (src, dst), v in by.items():
            errs = [e for _, e in v]
            what = "as stored, exact" if max(errs) == 0 else (f"requantized: relative RMS {100 * np.mean(errs):.2f}% mean, "
                                                   f"{100 * max(errs):.2f}% max (layer {max(v, key=lambda t: t[1])[0]})")
            lines.append(f"    {src} -> {dst} in {len(v)} layer(s): {what}")
    if r.get("source"):
        lines.append(f"  converted from {r['source']}")
    act = "nonzero (ReLU family)" if r["activation"] == "zero" else f"|x| > per-layer threshold (target density {r['target_density']:.2f})"
    lines += [f"  placement     {r['placement']}  (active = {act})",
              f"  calibration   {r['calib_tokens']} tokens from {r['calib_source']}; mean density {r['calib_density']:.3f}",
              f"  groups        {sum(r['groups_per_layer'])} ({r['mean_group_size']:.1f} neurons each on average)"]
    for ev in r["reads"]:
        pt = ev["per_token"]
        lines.append(f"  contiguous reads per token on {ev['text']} ({ev['tokens']} tokens), all layers:")
        lines.append(f"    active neurons {pt['active']:.1f}")
        for name in ("stored", "identity", "frequency"):
            label = f"{name} ({r['placement']})" if name == "stored" else f"{name} order"
            ratio = "" if name == "stored" else f"   stored needs {pt['stored'] / max(pt[name], 1e-9):.2f}x of this"
            lines.append(f"    {label:<26} {pt[name]:9.1f}{ratio}")
    pk = r.get("pack")
    if pk is None:
        lines.append("  offload pack  none (build it with `ripple-gguf pack`)")
    elif "bytes" not in pk:
        lines.append(f"  offload pack  {pk['file']}: {pk['status']}")
    else:
        lines += [f"  offload pack  {pk['file']} ({pk['status']})",
                  f"    {pk['bytes'] / 2**20:.2f} MiB = {100 * pk['overhead_vs_gguf']:.0f}% of the GGUF; "
                  f"{pk['bundle_bytes']} bytes per neuron bundle ({pk['weight_type']})",
                  f"    predictors {pk['predictor_bytes'] / 2**10:.0f} KiB = {100 * pk['predictor_vs_ffn']:.1f}% of the FFN bytes",
                  "    operating points (density: perplexity on calibration text; `run --quality PCT` picks one):"]
        lines += [f"      {op['density']:.3f}: {100 * op['ppl_increase']:+.2f}%"
                  + (f", the pack reads {100 * op['read_share']:.0f}% of the FFN bytes" if op["read_share"] and op["density"] < 1 else "")
                  + ("; runs every neuron (as fast, exact)" if op["every_neuron"] and op["density"] < 1 else "")
                  + (f"  <- default (budget {100 * pk['max_ppl_increase']:g}%)" if i == pk["default_point"] else "")
                  for i, op in enumerate(pk["operating_points"])]
        if pk["operating_points"][pk["default_point"]]["density"] >= 1.0:
            # its thresholds select every neuron: a per-layer table would only say "predicts 1.000" 30 times
            lines.append("    predictor: not used at the default point, which computes every neuron (this model showed "
                         "no sparsity within the budget); `run --quality PCT` picks a sparser point (per-layer figures "
                         "in --json)")
            return "\n".join(lines)
        for name, ev in [("validation tokens", {**pk["validation"], "tokens": pk["validation_tokens"]})] + (
                [(pk["on_text"]["text"], pk["on_text"])] if "on_text" in pk else []):
            lines.append(f"    predictor per layer on {name} ({ev['tokens']} tokens): mass recall / recall / precision / predicted vs true density")
            for il in range(len(ev["recall"])):
                misses = []
                if ev["pred_density"][il] > 2 * ev["true_density"][il]:
                    misses.append(f"predicts {ev['pred_density'][il] / max(ev['true_density'][il], 1e-9):.1f}x the true density (target <= 2x)")
                lines.append(f"      layer {il:2d}: {ev['mass_recall'][il]:.3f} / {ev['recall'][il]:.3f} / {ev['precision'][il]:.3f} / "
                             f"{ev['pred_density'][il]:.3f} vs {ev['true_density'][il]:.3f}"
                             + (f"   <- misses the target: {'; '.join(misses)}" if misses else ""))
    return "\n".join(lines)
