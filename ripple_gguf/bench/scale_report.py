"""The report's section for `bench scale`: measured tables at 8B layer size, then the projections."""
from __future__ import annotations


def _f(x, fmt=".2f", scale=1.0) -> str:
    return format(x * scale, fmt) if x is not None else ""


def render_scale(r: dict) -> list[str]:
    lay = r["layer"]
    L = ["## Scale: the runtime at Llama-3-8B layer size (`ripple-gguf bench scale`)", "",
         f"A model of {r['layers']} layers of Llama-3-8B shape (n_embd {lay['n_embd']}, n_ff {lay['n_ff']}, "
         f"{lay['n_head']} heads, {lay['n_kv']} KV heads) with **random weights** — this measures mechanics, not "
         "quality — converted by `ripple-gguf convert` to each type. The density is forced (every token computes "
         "its top ceil(d x n_ff) neurons by predictor score). Per point: "
         f"{r['tokens']} tokens decoded one at a time, {r['threads']} threads. Warm: the whole FFN in the "
         "neuron cache; the FFN's time is the token's time minus the same model's at density 0. Cold: the "
         "cache of one layer (each planned whole; half the model's FFN here, so at low densities most neurons stay cached from token to token; see the hit rate) and O_DIRECT reads of the pack.", ""]
    for t, m in r["measured"].items():
        pred, dense = m["predictor_s_per_layer"], m["dense_ffn_s_per_layer"]
        pred_txt = (f"{1e3 * pred:.3f} ms per layer ({pred / dense:.0%} of the dense FFN)" if pred and dense and pred > 0
                    else "below this machine's timing noise")
        L += [f"### {t} ({m['weight_type']})", "",
              f"Stock llama.cpp {1e3 * m['stock_s_per_token']:.1f} ms/token; its dense FFN "
              f"{_f(m['dense_ffn_s_per_layer'], '.2f', 1e3)} ms per layer ({_f(m['dense_ffn_gbps'], '.1f')} GB/s of "
              f"weights). Predictor and selection (every neuron with the predictor minus every neuron without it): "
              f"{pred_txt}; its weights {m['predictor_bytes_per_layer'] / 2**20:.1f} MiB per layer, "
              f"{m['predictor_bytes_per_layer'] / m['ffn_bytes_per_layer']:.1%} of the layer's FFN bytes.", "",
              "| density | warm FFN ms/layer | GB/s touched | x dense FFN time | cold ms/token | of which I/O ms | reads/token | MiB read/token | read MB/s | cache hit rate |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        cold = {c["density"]: c for c in m["cold"]}
        for w in m["warm"]:
            c = cold.get(w["density"])
            x = w["ffn_s_per_layer"] / m["dense_ffn_s_per_layer"] if w["ffn_s_per_layer"] is not None and m["dense_ffn_s_per_layer"] else None
            cells = ([_f(c["s_per_token"], ".1f", 1e3), _f(c["io_s_per_token"], ".1f", 1e3), f"{c['reads_per_token']:.0f}",
                      f"{c['bytes_per_token'] / 2**20:.1f}", _f(c["read_mbps"], ".0f"), f"{c['cache_hit_rate']:.2f}"]
                     if c else [""] * 6)
            L.append(f"| {w['density']:.2f} | {_f(w['ffn_s_per_layer'], '.2f', 1e3)} | {_f(w['ffn_gbps'], '.1f')} | "
                     f"{_f(x)} | " + " | ".join(cells) + " |")
        L.append("")
    p = r["placement"]
    L += [f"Placement of one layer of n_ff {p['n_ff']} from {p['tokens']} tokens of synthetic clustered activity "
          f"(5% hot, clusters of 16): {p['seconds']:.1f} s and {p['peak_rss_mib']:.0f} MiB peak RSS in its own "
          f"process; contiguous runs per token {p['reads_identity']:.0f} in model order, "
          f"{p['reads_coactivation']:.0f} after placement.", "",
          "### Projected tokens/s at 50% of the model in memory (projections, not measurements)", "",
          "Assumptions:", "", *[f"- {a}" for a in r["projection"]["assumptions"]], "",
          "| model | type | density | device | memory GiB | cache (% of FFN) | MiB read/token | ripple tok/s | stock tok/s | ripple / stock |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["projection"]["rows"]:
        if not row["fits"]:
            mem = f"{row['memory'] / 2**30:.1f}" if row.get("memory") else ""
            L.append(f"| {row['model']} | {row['type']} | {row['density']:.2f} | {row['device']} | {mem} | "
                     f"not projected: {row['reason']} | | | | |")
            continue
        L.append(f"| {row['model']} | {row['type']} | {row['density']:.2f} | {row['device']} | {row['memory'] / 2**30:.1f} | "
                 f"{100 * row['cache_share']:.0f}% | {row['read_bytes'] / 2**20:.0f} | {row['tok_s']:.2f} | "
                 f"{row['stock_tok_s']:.3f} | {row['speedup']:.1f}x |")
    L.append("")
    return L
