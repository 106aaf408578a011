"""`ripple-gguf pack` (and the last stage of `convert`): record activations of a converted GGUF
through llama.cpp, train and tune the per-layer predictors, and write `OUT.ripple`."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .calib import MIN_CALIB_TOKENS, warn_if_starved, read_text_files, self_generated_tokens
from .errors import RippleError
from .ggml_quant import dequantize
from .gguf_io import ffn_weight_bytes, kv, open_header, read_ffn_layout, tensor_bytes
from .index_keys import read_index
from .llama_capture import LlamaRunner
from .pack import check_pack_types, pack_path_for, record_layout, write_pack
from .predictor import choose_pack_rank, evaluate, train_layer
from .profile import capture_layers, chunk_tokens
from .stages import Stages
from . import quality



@dataclass
class PackOptions:
    calib: list[str] = field(default_factory=list)
    calib_tokens: int = 16384     # tokens recorded: 80% train, 10% threshold tuning, 10% eval
    rank: int | None = None       # predictor width; default: largest within 5% of the FFN bytes
    steps: int | None = None     # training steps; None: predictor.train_layer's own default
    n_ctx: int = 512
    seed: int = 0
    down_policy: str = "auto"     # type of the packed down rows: auto (>= Q8_0), source or a type name
    max_ppl_increase: float = quality.DEFAULT_BUDGET  # the default operating point's budget (calibration text)


def build_pack(gguf_path: str | Path, opts: PackOptions, tokens: list[int] | None = None,
               out: Path | None = None, log=print, stages=None) -> dict:
    """Build the pack for a converted GGUF: one llama.cpp pass records x/h (the GGUF's neuron
    order; the index's orders put them in pack order). `tokens` (from convert) skips tokenizing --calib."""
    gguf_path = Path(gguf_path)
    _check(opts)
    header = open_header(gguf_path)
    layout = read_ffn_layout(header)
    index = read_index(header, layout.n_ff)
    if index is None:
        raise RippleError(f"{gguf_path} has no ripple index; convert the model with `ripple-gguf convert` first")
    check_pack_types(header, layout)  # refuse unsupported weight types before any work
    stages = stages or Stages(log)
    out = Path(out) if out else pack_path_for(gguf_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with LlamaRunner(gguf_path, n_ctx=opts.n_ctx, capture_inputs=True) as runner:
            if tokens is None:
                with stages("calibration text"):
                    if opts.calib:
                        tokens = runner.tokenize(read_text_files(opts.calib))
                    else:
                        tokens = self_generated_tokens(gguf_path, min(opts.calib_tokens, 8192), opts.n_ctx, opts.seed)
            tokens = tokens[:opts.calib_tokens]
            if len(tokens) < MIN_CALIB_TOKENS:
                raise RippleError(f"only {len(tokens)} calibration tokens; pass at least {MIN_CALIB_TOKENS} with --calib")
            warn_if_starved(len(tokens), log)
            with stages("llama.cpp pass (pack)"):
                xs, hs, n = capture_layers(runner, chunk_tokens(tokens, opts.n_ctx, runner.bos), opts.calib_tokens, tmp)
        n_eval = int(min(n, opts.calib_tokens) * 0.9)  # the predictors train on the first 80%
        bos = runner_bos(gguf_path)
        chunk_sets = [quality.calibration_chunks([tokens[n_eval:]], opts.n_ctx, bos)]
        if opts.calib:
            chunk_sets.append(quality.neutral_chunks(gguf_path, bos, opts.seed + 1))
        return pack_from_recording(gguf_path, xs, hs, n, opts, out, stages, chunk_sets)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def runner_bos(gguf_path) -> int:
    return int(kv(open_header(gguf_path), "tokenizer.ggml.bos_token_id", 1))


def down_col_sq(header, il: int, n_ff: int) -> np.ndarray:
    """|column i of ffn_down|^2 per neuron (GGUF order): how much of the output a unit of h moves."""
    t = next(t for t in header.tensors if t.name == f"blk.{il}.ffn_down.weight")
    return np.square(dequantize(tensor_bytes(header, t), t.tensor_type, n_ff)).sum(0, dtype=np.float64).astype(np.float32)


def pack_from_recording(gguf_path: Path, xs: list[np.ndarray], hs: list[np.ndarray], n: int,
                        opts: PackOptions, out: Path, stages, ppl_chunk_sets: list) -> dict:
    """Train and evaluate the per-layer predictors on recorded FFN inputs `xs` and intermediates
    `hs` (first `n` tokens; columns in the GGUF's neuron order, put into pack order by the GGUF index's
    orders, against its activity thresholds), derive the operating points (quality.py; perplexity measured on each set of token
    chunks in `ppl_chunk_sets`, text the predictors did not train on, the worst kept) and write the
    pack for `gguf_path` to `out`."""
    _check(opts)
    header = open_header(gguf_path)
    layout = read_ffn_layout(header)
    index = read_index(header, layout.n_ff)
    orders, thresholds = index.orders, index.thresholds
    ffn_bytes = ffn_weight_bytes(header, layout.n_layer)
    n = min(n, opts.calib_tokens)
    n_train, n_tune = int(n * 0.8), int(n * 0.9)
    predictors, stats = [], {k: [] for k in ("recall", "mass_recall", "precision", "pred_density", "true_density")}
    for il in range(layout.n_layer):  # damaged weights (NaN/Inf) would otherwise surface as a torch error
        if not (np.isfinite(xs[il][:n]).all() and np.isfinite(hs[il][:n]).all()):
            raise RippleError(f"layer {il}'s activations on the calibration text are not finite: the GGUF's weights "
                              "are damaged or overflow; check the file (re-download or reconvert it)")
    curves = []
    rank = opts.rank or choose_pack_rank(layout.n_embd, layout.n_ff, ffn_bytes)
    with stages("predictors"):
        for il in tqdm(range(layout.n_layer), desc="training predictors", unit="layer", leave=False):
            x, h, thr = np.asarray(xs[il][:n]), index.in_pack_order(il, hs[il][:n]), float(thresholds[il])
            p = train_layer(x[:n_train], h[:n_train], thr, rank, seed=opts.seed + il,
                            **({"steps": opts.steps} if opts.steps else {}))
            curves.append(quality.layer_curve(p.scores(x[n_train:n_tune]), h[n_train:n_tune],
                                              index.in_pack_order(il, down_col_sq(header, il, layout.n_ff[il]))))
            predictors.append(p)
    with stages("operating points (perplexity per density)"):
        points = quality.operating_points(curves, ffn_bytes)
        points, dense_ppl = quality.measure(points, gguf_path, ppl_chunk_sets, opts.n_ctx, predictors, orders,
                                            opts.max_ppl_increase, record_layout(header, layout, opts.down_policy)[1])
        default = quality.choose(points, opts.max_ppl_increase)
    for p, t in zip(predictors, points[default].thresholds):
        p.threshold = float(t)
    for il, p in enumerate(predictors):
        x, h = np.asarray(xs[il][n_tune:n]), index.in_pack_order(il, hs[il][n_tune:n])
        for k, v in evaluate(p, x, h, float(thresholds[il])).items():
            stats[k].append(v)
    meta = {"act_threshold": thresholds,
            "train_tokens": n_train, "eval_tokens": n - n_tune, "points": points, "default_point": default,
            "max_ppl_increase": opts.max_ppl_increase, "ppl_tokens": sum(len(c) for cs in ppl_chunk_sets for c in cs)}
    part = out.with_name(f".{out.name}.part")
    try:
        with stages("write pack"), tqdm(total=layout.n_layer, desc="writing pack", unit="layer", leave=False) as bar:
            held = write_pack(gguf_path, part, orders, predictors, stats, meta, progress=bar.update,
                              down_policy=opts.down_policy)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return {"pack": str(out), "bytes": out.stat().st_size, "gguf_bytes": gguf_path.stat().st_size,
            "predictor_bytes": sum(p.nbytes for p in predictors), "ffn_bytes": sum(ffn_bytes),
            "train_tokens": n_train, "eval_tokens": n - n_tune,
            "operating_points": [{"density": round(p.density, 4), "ppl_increase": round(p.ppl_increase, 5),
                                  "read_share": round(p.read_share, 4)} for p in points],
            "default_point": default, "calib_perplexity": dense_ppl,
            "per_layer": {k: [round(v, 4) for v in vals] for k, vals in stats.items()},
            "records": held if isinstance(held, dict) else None, "stages": dict(stages.times),
            "seconds": stages.total}


def _check(opts: PackOptions) -> None:
    if not 0.0 <= opts.max_ppl_increase < 10:
        raise RippleError("--max-ppl-increase must be a share like 2% (0% = dense)")
