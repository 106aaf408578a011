"""`ripple-gguf convert`: HF checkpoint -> GGUF with co-activation neuron placement + ripple index.

Stages (each its own module): hf_convert (llama.cpp's converter, F32/F16) -> profile (llama.cpp
runs calibration text) -> placement (per-layer order) -> gguf_io (permute + index keys) ->
llama.cpp's quantizer. Everything is built in a temporary directory next to OUT and renamed into
place at the end, so an error or Ctrl-C never leaves a partial OUT.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .calib import MIN_CALIB_TOKENS, read_text_files, self_generated_tokens
from .errors import RippleError
from .gguf_io import open_gguf, read_ffn_layout, write_permuted
from .hf_convert import check_checkpoint, hf_to_gguf, resolve_source
from .index_keys import RippleIndex
from .llama_capture import LlamaRunner
from .make_pack import PackOptions, build_pack
from .pack import pack_path_for
from .placement import PLACEMENTS, group_starts, order_neurons, reads_by_method
from .profile import chunk_tokens, profile

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
LLAMA_FTYPE = {"q8_0": 7, "q4_0": 2}  # enum llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0
QUANT_BYTES_PER_F16_BYTE = {"q8_0": 34 / 64, "q4_0": 18 / 64}  # for the progress estimate only


@dataclass
class ConvertOptions:
    outtype: str = "f16"
    calib: list[str] = field(default_factory=list)
    placement: str = "coactivation"
    calib_tokens: int = 32768        # cap on tokens profiled (placement + held-out eval)
    heldout_fraction: float = 0.1    # tail of the calibration tokens kept out of placement
    target_density: float = 0.3      # SwiGLU-style FFNs: share of neurons counted active
    n_ctx: int = 512
    seed: int = 0
    pack: bool = True                # also write OUT.ripple (neuron bundles + predictors)
    target_recall: float = 0.95


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise RippleError(f"output {out} is a directory; pass a file name like {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise RippleError(f"output directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise RippleError(f"output directory {out.parent} is not writable")


def _check_options(opts: ConvertOptions) -> None:
    if opts.outtype not in OUTTYPES:
        raise RippleError(f"unknown --outtype {opts.outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if opts.placement not in PLACEMENTS:
        raise RippleError(f"unknown --placement {opts.placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if not 0.0 < opts.target_density < 1.0:
        raise RippleError("--target-density must be between 0 and 1 (e.g. 0.3)")
    if opts.calib_tokens < MIN_CALIB_TOKENS:
        raise RippleError(f"--calib-tokens must be at least {MIN_CALIB_TOKENS}")


def _calibration_tokens(runner: LlamaRunner, base: Path, opts: ConvertOptions, text: str | None) -> tuple[list[int], str]:
    if text is not None:
        tokens = runner.tokenize(text)[:opts.calib_tokens]
        source = ", ".join(Path(p).name for p in opts.calib)
        if len(tokens) < MIN_CALIB_TOKENS:
            raise RippleError(f"calibration text has only {len(tokens)} tokens; pass at least "
                              f"{MIN_CALIB_TOKENS} tokens of text with --calib")
        return tokens, source
    n = min(opts.calib_tokens, 8192)
    return self_generated_tokens(base, n, opts.n_ctx, opts.seed), f"self-generated ({n} tokens, seed {opts.seed})"


def _quantize(src: Path, dst: Path, outtype: str) -> None:
    """llama.cpp's own quantizer (copies every KV key, ours included); progress = bytes written."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE[outtype]
    params.nthread = os.cpu_count() or 1
    result = {}
    # a daemon thread, so Ctrl-C in the main thread can end the process while llama.cpp is busy
    worker = threading.Thread(target=lambda: result.setdefault(
        "rc", llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))),
        daemon=True)
    expected = int(src.stat().st_size * QUANT_BYTES_PER_F16_BYTE[outtype])
    with tqdm(total=expected, desc=f"quantizing to {outtype}", unit="B", unit_scale=True, leave=False) as bar:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
            size = dst.stat().st_size if dst.exists() else 0
            bar.update(max(0, min(size, expected) - bar.n))
    if result.get("rc") != 0:
        raise RippleError(f"llama.cpp's quantizer failed ({result.get('rc')}); n_embd and n_ff must be "
                          "multiples of 32 for q8_0/q4_0")


def convert(src: str, out: str | Path, opts: ConvertOptions, log=print) -> dict:
    """Run the whole conversion; returns a summary (also what `--json` prints)."""
    out = Path(out)
    _check_options(opts)
    _check_output(out)
    text = read_text_files(opts.calib) if opts.calib else None
    model_dir = resolve_source(src)
    check_checkpoint(model_dir)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        t0 = time.time()
        base = tmp / "base.gguf"
        log(f"converting {model_dir} with llama.cpp's converter ({'f32' if opts.outtype == 'f32' else 'f16'})")
        hf_to_gguf(model_dir, base, "f32" if opts.outtype == "f32" else "f16")
        reader = open_gguf(base)
        layout = read_ffn_layout(reader)

        with LlamaRunner(base, n_ctx=opts.n_ctx) as runner:
            tokens, source = _calibration_tokens(runner, base, opts, text)
            n_held = max(int(len(tokens) * opts.heldout_fraction), 64)
            calib_chunks = chunk_tokens(tokens[:-n_held], opts.n_ctx, runner.bos)
            held_chunks = chunk_tokens(tokens[-n_held:], opts.n_ctx, runner.bos)
            log(f"profiling {len(tokens) - n_held} calibration tokens ({source}), {n_held} held out")
            act = profile(runner, calib_chunks, opts.target_density, desc="profiling calibration text")
            held = profile(runner, held_chunks, thresholds=act.thresholds, kind=act.kind, desc="profiling held-out text")

        orders, groups, freqs = [], [], []
        evals = {k: [] for k in ("active", "stored", "identity", "frequency")}
        for il in tqdm(range(layout.n_layer), desc=f"placing neurons ({opts.placement})", unit="layer", leave=False):
            a = act.layer(il)
            order = order_neurons(a, opts.placement)
            freq = a.mean(axis=0)[order]
            orders.append(order)
            groups.append(group_starts(a[:, order]))
            freqs.append(freq)
            for k, v in reads_by_method(held.layer(il)[:, order], order, freq).items():
                evals[k].append(v)
        index = RippleIndex(opts.placement, act.kind, opts.target_density, act.tokens, source,
                            act.thresholds, orders, groups, freqs, held.tokens,
                            {k: np.array(v) for k, v in evals.items()})

        permuted = tmp / "permuted.gguf"
        total = sum(int(t.n_bytes) for t in reader.tensors)
        with tqdm(total=total, desc="writing permuted GGUF", unit="B", unit_scale=True, leave=False) as bar:
            write_permuted(reader, permuted, orders, index.to_kv(), progress=bar.update)
        del reader
        final = permuted
        if opts.outtype in LLAMA_FTYPE:
            final = tmp / "quantized.gguf"
            _quantize(permuted, final, opts.outtype)
        pack_summary = None
        if opts.pack:
            log("building the offload pack (neuron bundles + predictors)")
            pack_summary = build_pack(final, PackOptions(target_recall=opts.target_recall, n_ctx=opts.n_ctx,
                                                         seed=opts.seed), tokens=tokens,
                                      out=tmp / "final.ripple", log=log)
        os.replace(final, out)
        stale = pack_path_for(out)
        if pack_summary:
            os.replace(tmp / "final.ripple", stale)
            pack_summary["pack"] = str(stale)
        elif stale.exists():
            stale.unlink()  # bound to the GGUF just replaced; it could never be used again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ev = {k: float(np.sum(v)) for k, v in evals.items()}
    return {
        "output": str(out), "bytes": out.stat().st_size, "arch": layout.arch, "outtype": opts.outtype,
        "placement": opts.placement, "activation": act.kind, "n_layer": layout.n_layer,
        "n_ff": layout.n_ff[0], "calib_tokens": act.tokens, "calib_source": source,
        "heldout_tokens": held.tokens, "density": float(np.mean(act.density())),
        "reads_per_token": {"stored": ev["stored"], "identity": ev["identity"], "frequency": ev["frequency"]},
        "active_per_token": ev["active"], "pack": pack_summary, "seconds": round(time.time() - t0, 1),
    }
