"""`ripple-gguf pack` (and the last stage of `convert`): record activations of a converted GGUF
through llama.cpp, train and tune the per-layer predictors, and write `OUT.ripple`."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .calib import MIN_CALIB_TOKENS, read_text_files, self_generated_tokens
from .errors import RippleError
from .gguf_io import ffn_weight_bytes, open_gguf, read_ffn_layout
from .index_keys import read_index
from .llama_capture import LlamaRunner
from .pack import pack_path_for, pack_weight_type, write_pack
from .predictor import choose_rank, evaluate, train_layer, tune_threshold
from .profile import capture_layers, chunk_tokens


RECALL_MARGIN = 0.02


@dataclass
class PackOptions:
    calib: list[str] = field(default_factory=list)
    calib_tokens: int = 16384     # tokens recorded: 80% train, 10% threshold tuning, 10% eval
    target_recall: float = 0.95   # share of the active mass the predicted sets must cover
    rank: int | None = None       # predictor width; default: largest within 5% of the FFN bytes
    steps: int = 1500
    n_ctx: int = 512
    seed: int = 0


def build_pack(gguf_path: str | Path, opts: PackOptions, tokens: list[int] | None = None,
               out: Path | None = None, log=print) -> dict:
    """Build the pack for a converted GGUF. `tokens` (from convert) skips tokenizing --calib."""
    gguf_path = Path(gguf_path)
    if not 0.5 <= opts.target_recall < 1.0:
        raise RippleError("--target-recall must be in [0.5, 1.0), e.g. 0.95")
    reader = open_gguf(gguf_path)
    layout = read_ffn_layout(reader)
    index = read_index(reader, layout.n_ff)
    if index is None:
        raise RippleError(f"{gguf_path} has no ripple index; convert the model with `ripple-gguf convert` first")
    pack_weight_type(reader)  # refuse unsupported weight types before any work
    ffn_bytes = ffn_weight_bytes(reader, layout.n_layer)
    del reader
    out = Path(out) if out else pack_path_for(gguf_path)
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        with LlamaRunner(gguf_path, n_ctx=opts.n_ctx, capture_inputs=True) as runner:
            if tokens is None:
                if opts.calib:
                    tokens = runner.tokenize(read_text_files(opts.calib))
                else:
                    tokens = self_generated_tokens(gguf_path, min(opts.calib_tokens, 8192), opts.n_ctx, opts.seed)
            tokens = tokens[:opts.calib_tokens]
            if len(tokens) < MIN_CALIB_TOKENS:
                raise RippleError(f"only {len(tokens)} calibration tokens; pass at least {MIN_CALIB_TOKENS} with --calib")
            xs, hs, n = capture_layers(runner, chunk_tokens(tokens, opts.n_ctx, runner.bos), opts.calib_tokens, tmp)
        n_train, n_tune = int(n * 0.8), int(n * 0.9)
        predictors, stats = [], {k: [] for k in ("recall", "mass_recall", "precision", "pred_density", "true_density")}
        for il in tqdm(range(layout.n_layer), desc="training predictors", unit="layer", leave=False):
            x, h, thr = xs[il][:n], hs[il][:n], float(index.thresholds[il])
            rank = opts.rank or choose_rank(layout.n_embd, layout.n_ff[il], ffn_bytes[il])
            p = train_layer(x[:n_train], h[:n_train], thr, rank, steps=opts.steps, seed=opts.seed + il)
            # tuned with a margin: on unseen text recall came out 1-2 points below the tuning split
            p.threshold = tune_threshold(p, x[n_train:n_tune], h[n_train:n_tune], thr,
                                         min(0.995, opts.target_recall + RECALL_MARGIN))
            for k, v in evaluate(p, x[n_tune:], h[n_tune:], thr).items():
                stats[k].append(v)
            predictors.append(p)
        del xs, hs
        meta = {"act_threshold": index.thresholds, "target_recall": opts.target_recall,
                "train_tokens": n_train, "eval_tokens": n - n_tune}
        part = tmp / "pack.ripple"
        with tqdm(total=layout.n_layer, desc="writing pack", unit="layer", leave=False) as bar:
            write_pack(gguf_path, part, predictors, stats, meta, progress=bar.update)
        os.replace(part, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"pack": str(out), "bytes": out.stat().st_size, "gguf_bytes": gguf_path.stat().st_size,
            "predictor_bytes": sum(p.nbytes for p in predictors), "ffn_bytes": sum(ffn_bytes),
            "train_tokens": n_train, "eval_tokens": n - n_tune,
            "per_layer": {k: [round(v, 4) for v in vals] for k, vals in stats.items()},
            "seconds": round(time.time() - t0, 1)}
