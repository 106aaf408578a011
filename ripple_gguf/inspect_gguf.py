"""`ripple-gguf inspect`: what a converted GGUF holds and how many reads per token its order needs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .calib import read_text_files
from .errors import RippleError
from .gguf_io import kv, open_gguf, read_ffn_layout
from .index_keys import read_index
from .placement import reads_by_method
from .profile import chunk_tokens, profile


def measure_reads(path: Path, index, text: str, n_ctx: int = 512, max_tokens: int = 16384) -> dict:
    """Profile `text` on this GGUF through llama.cpp and count reads/token per method and layer."""
    from .llama_capture import LlamaRunner
    with LlamaRunner(path, n_ctx=n_ctx) as runner:
        tokens = runner.tokenize(text)[:max_tokens]
        act = profile(runner, chunk_tokens(tokens, n_ctx, runner.bos), thresholds=index.thresholds,
                      kind=index.activation, desc="profiling text")
    per = [reads_by_method(act.layer(il), index.orders[il], index.act_freq[il]) for il in range(len(index.orders))]
    return {"tokens": act.tokens, **{k: np.array([p[k] for p in per]) for k in per[0]}}


def inspect(path: str | Path, text_files: list[str] | None = None) -> dict:
    path = Path(path)
    reader = open_gguf(path)
    layout = read_ffn_layout(reader)
    index = read_index(reader, layout.n_ff)
    info = {
        "file": str(path), "bytes": path.stat().st_size, "arch": layout.arch,
        "name": kv(reader, "general.name", ""), "n_layer": layout.n_layer, "n_embd": layout.n_embd,
        "n_ff": layout.n_ff[0] if len(set(layout.n_ff)) == 1 else layout.n_ff,
        "ffn_gate": layout.has_gate, "ffn_weight_type": layout.weight_type, "ripple": None,
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
    }
    evals = []
    if index.eval:
        evals.append(("held-out split of the calibration text", index.eval_tokens, index.eval))
    if text_files:
        m = measure_reads(path, index, read_text_files(text_files, what="--text"))
        evals.append((", ".join(Path(t).name for t in text_files), m.pop("tokens"), m))
    r["reads"] = [{
        "text": name, "tokens": int(tokens),
        "per_token": {k: float(np.sum(v)) for k, v in ev.items()},
        "per_layer": {k: [round(float(x), 2) for x in v] for k, v in ev.items()},
    } for name, tokens, ev in evals]
    info["ripple"] = r
    return info


def format_report(info: dict) -> str:
    lines = [f"{info['file']}  ({info['bytes'] / 2**20:.1f} MiB)",
             f"  architecture  {info['arch']}  {info['name']}",
             f"  layers {info['n_layer']}  n_embd {info['n_embd']}  n_ff {info['n_ff']}  "
             f"FFN {'gate+up+down' if info['ffn_gate'] else 'up+down (no gate)'}  weights {info['ffn_weight_type']}"]
    r = info["ripple"]
    if r is None:
        lines.append("  no ripple index: a plain GGUF (convert it with `ripple-gguf convert`)")
        return "\n".join(lines)
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
    return "\n".join(lines)
