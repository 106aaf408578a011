#!/usr/bin/env python3
"""Per-layer time and quality of the two convert stages that dominate its run time: neuron placement
and predictor training, the current code against a baseline (another git revision of
ripple_gguf/placement.py and ripple_gguf/predictor.py, loaded with `git show`).

Quality is measured on REAL activations of SmolLM2-135M-Instruct (Q4_1, tools/fetch_smollm2.py):
  - placement: ordered on models/text/calib.txt, reads/token (reads_by_method) on held-out
    models/text/heldout.txt;
  - predictors: trained on the first 80% of up to 16384 recorded calibration tokens, threshold tuned
    on the next 10% (as make_pack does), evaluated on held-out text (never used to calibrate or tune):
    mass_recall, predicted density at that recall (lower is better) and the true density.
Timing at Llama-3-8B layer size (n_embd 4096, n_ff 14336) uses synthetic data (timing only).

Activations are recorded once into --cache (about 4 GB, float16) and reused. Both variants run in the
same process, one after the other, so their time ratio is what to read on a shared machine.

    .venv/bin/python tools/bench_convert_stages.py [--baseline REV] [--layers 0,7,15,29] [--no-8b]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from ripple_gguf import placement as new_placement, predictor as new_predictor  # noqa: E402

N_CTX = 512
KEEP = 16384          # tokens with x/h recorded for predictor training (make_pack's default)
TARGET_RECALL = 0.97  # the active-mass recall make_pack tuned thresholds for before operating points (0.95 + 0.02 margin)


def module_at(rev: str, name: str) -> types.ModuleType:
    """ripple_gguf/<name>.py as it was at git revision `rev`, as a standalone module."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:ripple_gguf/{name}.py"],
                         check=True, capture_output=True, text=True).stdout
    mod = types.ModuleType(f"baseline_{name}")
    mod.__file__ = f"{rev}:ripple_gguf/{name}.py"
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


# ---------------------------------------------------------------- recording real activations
def record(model: Path, cache: Path) -> dict:
    """Activity of all calibration and held-out tokens, x/h of KEEP calibration tokens and of all
    held-out tokens; thresholds from profile.profile at density 0.3 on the calibration text."""
    meta_path = cache / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    from ripple_gguf.llama_capture import LlamaRunner
    from ripple_gguf.profile import capture_layers, chunk_tokens, profile
    cache.mkdir(parents=True, exist_ok=True)
    meta = {"model": str(model)}
    with LlamaRunner(model, n_ctx=N_CTX, capture_inputs=True) as runner:
        act = None
        for split, fname in (("calib", "calib.txt"), ("held", "heldout.txt")):
            tokens = runner.tokenize((ROOT / "models" / "text" / fname).read_text(encoding="utf-8"))
            chunks = chunk_tokens(tokens, N_CTX, runner.bos)
            a = profile(runner, chunks, 0.3, thresholds=None if act is None else act.thresholds,
                        kind=None if act is None else act.kind, desc=f"profiling {fname}")
            act = act or a
            (cache / split).mkdir(exist_ok=True)
            np.savez(cache / split / "active.npz", *[np.concatenate(a.packed[il]) for il in range(runner.n_layer)])
            keep = KEEP if split == "calib" else a.tokens
            _, _, n = capture_layers(runner, chunks, keep, cache / split, desc=f"recording {fname}")
            meta[split] = {"tokens": a.tokens, "kept": n}
        meta.update(n_layer=runner.n_layer, n_ff=act.n_ff, thresholds=act.thresholds.tolist(), kind=act.kind)
    meta_path.write_text(json.dumps(meta))
    return meta


def ffn_bytes_per_layer(model: Path, n_layer: int) -> list[int]:
    from gguf import GGUFReader
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(model).tensors}
    return [sum(sizes.get(f"blk.{il}.ffn_{k}.weight", 0) for k in ("gate", "up", "down")) for il in range(n_layer)]


class Data:
    def __init__(self, cache: Path, meta: dict):
        self.cache, self.meta = cache, meta
        self._active = {s: np.load(cache / s / "active.npz") for s in ("calib", "held")}

    def active(self, split: str, il: int) -> np.ndarray:
        return np.unpackbits(self._active[split][f"arr_{il}"], axis=1, count=self.meta["n_ff"][il]).astype(bool)

    def xh(self, split: str, il: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.meta[split]["kept"]
        x = np.load(self.cache / split / f"x{il}.npy", mmap_mode="r")[:n]
        h = np.load(self.cache / split / f"h{il}.npy", mmap_mode="r")[:n]
        return np.asarray(x), np.asarray(h)  # float16, as convert records them


# ---------------------------------------------------------------- measuring
class Timer:
    """Wall and CPU seconds of this process (CPU time is what a shared machine cannot inflate as
    much: other workers' load shows up in wall time only)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def rounded(v):
    if isinstance(v, dict):
        return {k: rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [rounded(x) for x in v]
    return round(float(v), 4) if isinstance(v, (float, np.floating)) else v


def density_at_recall(pred, x: np.ndarray, h: np.ndarray, act_threshold: float, recall: float) -> float:
    """Predicted density when the threshold is set on these very tokens to cover exactly `recall`
    of their active mass: one point of the predictor's curve, free of threshold-tuning noise."""
    s = pred.scores(x)
    mag = np.abs(np.asarray(h, dtype=np.float32))
    active = mag > act_threshold
    sa, ma = s[active], mag[active]
    order = np.argsort(-sa, kind="stable")
    cum = np.cumsum(ma[order], dtype=np.float64)
    k = min(int(np.searchsorted(cum, recall * cum[-1])), len(order) - 1)
    return float((s >= sa[order[k]]).mean())


def real_layers(args, variants: dict) -> dict:
    from ripple_gguf.placement import reads_by_method
    model = Path(args.model)
    meta = record(model, Path(args.cache))
    data = Data(Path(args.cache), meta)
    ffn_bytes = ffn_bytes_per_layer(model, meta["n_layer"])
    layers = range(meta["n_layer"]) if args.layers is None else [int(v) for v in args.layers.split(",")]
    rows = []
    print(f"SmolLM2-135M Q4_1: placement on {meta['calib']['tokens']} calibration tokens, predictors on "
          f"{int(0.8 * meta['calib']['kept'])} (+{int(0.1 * meta['calib']['kept'])} tuning); "
          f"evaluated on {meta['held']['tokens']} held-out tokens", flush=True)
    for il in layers:
        thr = meta["thresholds"][il]
        row = {"layer": il}
        if not args.no_placement:
            a, held = data.active("calib", il), data.active("held", il)
            for name, (pl, _) in variants.items():
                with Timer() as t:
                    order = pl.coactivation_order(a)
                r = reads_by_method(held[:, order], order, a.mean(axis=0)[order])
                row[f"place_{name}"] = {"wall": t.wall, "cpu": t.cpu, "reads": r["stored"]}
                row["reads_identity"], row["reads_frequency"], row["active"] = r["identity"], r["frequency"], r["active"]
        if not args.no_predictor:
            x, h = data.xh("calib", il)
            xe, he = data.xh("held", il)
            n = len(x)
            n_train, n_tune = int(n * 0.8), int(n * 0.9)
            rank = new_predictor.choose_rank(x.shape[1], h.shape[1], ffn_bytes[il])
            for name, (_, pr) in variants.items():
                with Timer() as t:
                    p = pr.train_layer(x[:n_train], h[:n_train], thr, rank, seed=il)
                p.threshold = new_predictor.tune_threshold(p, x[n_train:n_tune], h[n_train:n_tune], thr, TARGET_RECALL)
                e = new_predictor.evaluate(p, xe, he, thr)
                row[f"pred_{name}"] = {"wall": t.wall, "cpu": t.cpu, "rank": rank, "mass_recall": e["mass_recall"],
                                       "pred_density": e["pred_density"], "true_density": e["true_density"],
                                       "density_at_0.97": density_at_recall(p, xe, he, thr, TARGET_RECALL)}
        rows.append(row)
        print(json.dumps(rounded(row)), flush=True)
    return summarize(rows, list(variants))


def summarize(rows: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        s = {}
        pl = [r[f"place_{name}"] for r in rows if f"place_{name}" in r]
        if pl:
            s["place_s_per_layer"] = {"wall": np.mean([p["wall"] for p in pl]), "cpu": np.mean([p["cpu"] for p in pl])}
            s["reads_per_token"] = float(np.sum([p["reads"] for p in pl]))
        pr = [r[f"pred_{name}"] for r in rows if f"pred_{name}" in r]
        if pr:
            s["train_s_per_layer"] = {"wall": np.mean([p["wall"] for p in pr]), "cpu": np.mean([p["cpu"] for p in pr])}
            for k in ("mass_recall", "pred_density", "true_density", "density_at_0.97"):
                s[k] = float(np.mean([p[k] for p in pr]))
        out[name] = s
    if rows and "reads_identity" in rows[0]:
        out["reads_per_token_identity"] = float(np.sum([r["reads_identity"] for r in rows]))
        out["reads_per_token_frequency"] = float(np.sum([r["reads_frequency"] for r in rows]))
        out["active_per_token"] = float(np.sum([r["active"] for r in rows]))
    return out


def synthetic_xh(tokens: int, n_embd: int, n_ff: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Timing data only: x Gaussian, h low-rank in x plus noise, both float16 as convert records them."""
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_embd, generator=g)
    h = (x @ (torch.randn(n_embd, 64, generator=g) / 64)) @ torch.randn(64, n_ff, generator=g)
    h += 0.3 * torch.randn(tokens, n_ff, generator=g)
    return x.half().numpy(), h.half().numpy()


def size_8b(args, variants: dict) -> dict:
    from bench_placement import synthetic_activity
    n_embd, n_ff = 4096, 14336
    out = {}
    if not args.no_placement:
        active = synthetic_activity(n_ff, args.tokens_8b)
        for name, (pl, _) in variants.items():
            with Timer() as t:
                order = pl.coactivation_order(active)
            reads = float(new_placement.runs_per_token(active[:, order]).mean())
            out[f"place_{name}"] = {"wall": t.wall, "cpu": t.cpu, "reads_on_calibration_tokens": reads}
            print(json.dumps(rounded({"8b": f"place_{name}", **out[f"place_{name}"]})), flush=True)
    if not args.no_predictor:
        x, h = synthetic_xh(args.train_tokens_8b, n_embd, n_ff)
        thr = float(np.quantile(np.abs(h[:1024].astype(np.float32)), 0.7))
        # Q4_K_M: gate/up Q4_K (4.5 bits/weight), down Q6_K (6.5625)
        rank = args.rank_8b or new_predictor.choose_rank(n_embd, n_ff, int(n_embd * n_ff * (4.5 + 4.5 + 6.5625) / 8))
        for name, (_, pr) in variants.items():
            kw, scale = {}, 1.0
            if name == "baseline" and args.baseline_8b_steps:
                kw, scale = {"steps": args.baseline_8b_steps}, 1500 / args.baseline_8b_steps
            with Timer() as t:
                pr.train_layer(x, h, thr, rank, seed=0, **kw)
            out[f"train_{name}"] = {"wall": t.wall * scale, "cpu": t.cpu * scale, "rank": rank,
                                    "extrapolated_from_steps": kw.get("steps")}
            print(json.dumps(rounded({"8b": f"train_{name}", **out[f"train_{name}"]})), flush=True)
    return out


def warm_up(variants: dict) -> None:
    """First calls pay one-time imports (torch.optim pulls in torch._dynamo: ~3 s); keep them out
    of the per-layer times."""
    x, h = synthetic_xh(600, 64, 256)
    rng = np.random.default_rng(0)
    for pl, pr in variants.values():
        pr.train_layer(x, h, 0.5, 32, steps=2)
        pl.coactivation_order(rng.random((600, 256)) < 0.2)


def table(result: dict) -> str:
    """The before/after numbers as a markdown table."""
    lines = ["| stage | measure | baseline | new |", "|---|---|---|---|"]
    sm = result.get("smollm2", {})
    b, n = sm.get("baseline", {}), sm.get("new", {})
    get = lambda d, *ks: (lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))(
        __import__("functools").reduce(lambda a, k: a.get(k) if isinstance(a, dict) else None, ks, d))
    if n.get("place_s_per_layer"):
        lines += [f"| SmolLM2 placement | s/layer wall (CPU) | {get(b, 'place_s_per_layer', 'wall')} ({get(b, 'place_s_per_layer', 'cpu')}) "
                  f"| {get(n, 'place_s_per_layer', 'wall')} ({get(n, 'place_s_per_layer', 'cpu')}) |",
                  f"| SmolLM2 placement | held-out reads/token, all layers (identity {sm['reads_per_token_identity']:.1f}, "
                  f"frequency {sm['reads_per_token_frequency']:.1f}) | {get(b, 'reads_per_token')} | {get(n, 'reads_per_token')} |"]
    if n.get("train_s_per_layer"):
        lines += [f"| SmolLM2 predictor | s/layer wall (CPU) | {get(b, 'train_s_per_layer', 'wall')} ({get(b, 'train_s_per_layer', 'cpu')}) "
                  f"| {get(n, 'train_s_per_layer', 'wall')} ({get(n, 'train_s_per_layer', 'cpu')}) |"]
        for k in ("mass_recall", "pred_density", "density_at_0.97", "true_density"):
            lines.append(f"| SmolLM2 predictor | held-out {k}, mean of layers | {get(b, k)} | {get(n, k)} |")
    e = result.get("8b_size", {})
    for stage in ("place", "train"):
        if f"{stage}_new" in e:
            lines.append(f"| 8B-size {stage} | s/layer wall (CPU) | {get(e, f'{stage}_baseline', 'wall')} "
                         f"({get(e, f'{stage}_baseline', 'cpu')}) | {get(e, f'{stage}_new', 'wall')} ({get(e, f'{stage}_new', 'cpu')}) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="ee4bc20",
                    help="git revision of placement.py/predictor.py to compare with (default: the last "
                         "one with float32 placement and the 1500-step predictor recipe)")
    ap.add_argument("--model", default=None, help="GGUF (default: tools/fetch_smollm2.py's SmolLM2 Q4_1)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ripple-gguf" / "bench_convert_stages"))
    ap.add_argument("--layers", default=None, help="comma-separated layers (default: all)")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--no-8b", action="store_true")
    ap.add_argument("--no-placement", action="store_true")
    ap.add_argument("--no-predictor", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--tokens-8b", type=int, default=8192, help="calibration tokens for 8B-size placement")
    ap.add_argument("--train-tokens-8b", type=int, default=13107, help="predictor training tokens at 8B size "
                    "(make_pack: 80%% of 16384)")
    ap.add_argument("--rank-8b", type=int, default=None, help="default: choose_rank for a Q4_K_M layer")
    ap.add_argument("--baseline-8b-steps", type=int, default=150,
                    help="time the baseline's 1500-step training at 8B size from this many steps, scaled "
                         "(its cost is linear in steps); 0 = run all 1500")
    args = ap.parse_args()
    variants = {"new": (new_placement, new_predictor)}
    if not args.no_baseline:
        variants = {"baseline": (module_at(args.baseline, "placement"), module_at(args.baseline, "predictor")),
                    **variants}
    if args.model is None and not args.no_real:
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_smollm2.py")], check=True,
                             capture_output=True, text=True).stdout.split()
        args.model = out[0]
    import torch
    print(f"load average {os.getloadavg()}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    warm_up(variants)
    result = {}
    if not args.no_real:
        result["smollm2"] = real_layers(args, variants)
    if not args.no_8b:
        result["8b_size"] = size_8b(args, variants)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(rounded(result)))
    print(table(result))


if __name__ == "__main__":
    main()
