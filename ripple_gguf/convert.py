"""`ripple-gguf convert`: a GGUF (any llama.cpp type mix) or an HF checkpoint -> GGUF with the
ripple index (co-activation neuron placement) + the offload pack, whose records are in that order.

Stages (each its own module): [hf_convert: llama.cpp's converter, HF sources only] -> one
llama.cpp pass over the calibration text (profile.record: activity, the down importance matrix and
the predictors' training data) -> placement (per-layer order) -> gguf_io (the source's tensors as
they are, index keys; ffn_down requantized only for --down-type) -> [llama.cpp's quantizer, with
--outtype] -> make_pack. Everything is built in a temporary directory next to OUT and renamed into
place at the end, so an error or Ctrl-C never leaves a partial OUT.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from . import ggml_quant
from .calib import (warn_if_starved, GEN_SEQS, MIN_CALIB_TOKENS, generate_batches, read_text_files,
                    self_generated_source)
from .errors import RippleError
from .gguf_io import (check_model, convert_down, down_target_type, open_header,
                      read_ffn_layout, tensor_bytes, write_converted)
from .hf_convert import check_checkpoint, hf_to_gguf, resolve_source
from .index_keys import RippleIndex
from .llama_capture import LlamaRunner
from .llama_quantize import FTYPES, quantize_gguf
from .make_pack import PackOptions, build_pack, pack_from_recording, runner_bos
from .quality import calibration_chunks, neutral_chunks
from .pack import check_pack_types, pack_path_for
from .placement import PLACEMENTS, group_starts, order_neurons, reads_by_method
from .profile import chunk_batches, chunk_tokens, record
from .stages import Stages

OUTTYPES = tuple(FTYPES)
SELF_GENERATED_TOKENS = 8192  # without --calib: tokens the model samples itself
HF_FLOAT = ("f32", "f16", "bf16")  # written by llama.cpp's converter itself, no quantizer pass
# --down-type: the float types and every type ggml can quantize rows of n_ff values into
DOWN_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_1", "q4_0", "iq4_nl",
              "iq4_xs", "q3_k", "q2_k")


@dataclass
class ConvertOptions:
    outtype: str | None = None       # None: HF -> f16, GGUF -> every tensor keeps its type
    down_type: str | None = None     # ffn_down in this type instead of the source's
    calib: list[str] = field(default_factory=list)
    placement: str = "coactivation"
    calib_tokens: int = 16384        # cap on tokens profiled (placement + held-out eval)
    heldout_fraction: float = 0.1    # tail of the calibration tokens kept out of placement
    target_density: float = 0.3      # SwiGLU-style FFNs: share of neurons counted active
    n_ctx: int = 512
    seed: int = 0
    pack: bool = True                # also write OUT.ripple (neuron bundles + predictors)
    max_ppl_increase: float = 0.02   # perplexity budget of the pack's default operating point


def _check_output(out: Path) -> None:
    if out.is_dir():
        raise RippleError(f"output {out} is a directory; pass a file name like {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise RippleError(f"output directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise RippleError(f"output directory {out.parent} is not writable")


def _check_options(opts: ConvertOptions) -> None:
    if opts.outtype is not None and opts.outtype not in OUTTYPES:
        raise RippleError(f"unknown --outtype {opts.outtype!r}; choose one of {', '.join(OUTTYPES)}")
    if opts.down_type is not None:
        if opts.down_type not in DOWN_TYPES:
            raise RippleError(f"unknown --down-type {opts.down_type!r}; choose one of {', '.join(DOWN_TYPES)}")
        if opts.outtype is not None and opts.outtype not in HF_FLOAT:
            raise RippleError(f"--down-type cannot be combined with --outtype {opts.outtype} (llama.cpp's "
                              "quantizer picks ffn_down's type itself); drop one of them")
    if opts.placement not in PLACEMENTS:
        raise RippleError(f"unknown --placement {opts.placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if not 0.0 < opts.target_density < 1.0:
        raise RippleError("--target-density must be between 0 and 1 (e.g. 0.3)")
    if opts.calib_tokens < MIN_CALIB_TOKENS:
        raise RippleError(f"--calib-tokens must be at least {MIN_CALIB_TOKENS}")


def _check_gguf(path: Path, fix: str):
    header = open_header(path, fix=fix)
    if int(header.get("split.count", 1) or 1) > 1:
        raise RippleError(f"{path.name} is one part of a split GGUF; merge the parts first "
                          "(`llama-gguf-split --merge FIRST.gguf OUT.gguf`) and convert the merged file")
    layout = read_ffn_layout(header)
    check_model(header, layout)
    return header, layout


def _gen_shape(opts: ConvertOptions) -> tuple[int, int, int]:
    """Self-generated calibration: (tokens, sequences side by side, tokens per sequence)."""
    n = min(opts.calib_tokens, SELF_GENERATED_TOKENS)
    n_seq = min(GEN_SEQS, max(1, n // 64))
    return n, n_seq, max(32, min(opts.n_ctx, -(-n // n_seq)))


def _calibration(runner: LlamaRunner, opts: ConvertOptions, text: str | None, sequences: list,
                 log) -> tuple[Iterator, str, int]:
    """(batches for profile.record, a description, tokens) from --calib text or, without it, text
    the model samples itself while it is profiled (one pass: generating is evaluating)."""
    if text is not None:
        tokens = runner.tokenize(text)[:opts.calib_tokens]
        if len(tokens) < MIN_CALIB_TOKENS:
            raise RippleError(f"calibration text has only {len(tokens)} tokens; pass at least "
                              f"{MIN_CALIB_TOKENS} tokens of text with --calib")
        sequences.append(tokens)
        warn_if_starved(len(tokens), log)
        n_held = max(int(len(tokens) * opts.heldout_fraction), 64)
        calib_chunks = chunk_tokens(tokens[:-n_held], opts.n_ctx, runner.bos)
        held_chunks = chunk_tokens(tokens[-n_held:], opts.n_ctx, runner.bos)
        source = ", ".join(Path(p).name for p in opts.calib)
        log(f"profiling {len(tokens) - n_held} calibration tokens ({source}), {n_held} held out")
        return chunk_batches(runner, calib_chunks, held_chunks, desc="profiling calibration text"), source, len(tokens)
    n, n_seq, _ = _gen_shape(opts)
    held = max(1, round(n_seq * opts.heldout_fraction)) if n_seq > 1 else 0
    log(f"profiling {n} tokens the model samples itself ({n_seq} sequences at a time; {held} held out)")
    return (generate_batches(runner, n, opts.seed, sequences, held_seqs=held),
            self_generated_source(n, opts.seed), n)


def convert(src: str, out: str | Path, opts: ConvertOptions, log=print, file: str | None = None) -> dict:
    """Run the whole conversion; returns a summary (also what `--json` prints)."""
    out = Path(out)
    _check_options(opts)
    _check_output(out)
    text = read_text_files(opts.calib) if opts.calib else None
    source = resolve_source(src, file)
    from_gguf = source.kind == "gguf"
    if from_gguf:
        header, layout = _check_gguf(source.path, "re-download it or pass a complete model GGUF")
    else:
        check_checkpoint(source.path)
    outtype = opts.outtype if opts.outtype or from_gguf else "f16"
    # the final weights differ from the profiled ones only when llama.cpp's quantizer runs
    quantize_to = outtype if outtype is not None and not (not from_gguf and outtype in HF_FLOAT) else None
    down_type = QT[opts.down_type.upper()] if opts.down_type else None
    pack_opts = PackOptions(calib=list(opts.calib), max_ppl_increase=opts.max_ppl_increase, n_ctx=opts.n_ctx, seed=opts.seed)
    stages = Stages(log)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if from_gguf:
            base = source.path
            log(f"converting {source.label} ({_types_label(layout)}) as it is")
        else:
            base = tmp / "base.gguf"
            float_type = outtype if outtype in HF_FLOAT else "f16"
            log(f"converting {source.path} with llama.cpp's converter ({float_type})")
            with stages("llama.cpp converter"):
                hf_to_gguf(source.path, base, float_type)
            header, layout = _check_gguf(base, "reconvert it")
        if opts.pack and quantize_to is None:
            check_pack_types(header, layout)  # refuse what the pack cannot hold before any work

        keep = pack_opts.calib_tokens if opts.pack and quantize_to is None else 0
        n_ctx, n_seq = opts.n_ctx, 1
        if text is None:
            _, n_seq, n_ctx = _gen_shape(opts)
        sequences: list[list[int]] = []
        with LlamaRunner(base, n_ctx=n_ctx, capture_inputs=keep > 0, n_seq=n_seq) as runner:
            batches, calib_source, n_tok = _calibration(runner, opts, text, sequences, log)
            name = "llama.cpp pass (" + ("generate + " if text is None else "") + "profile" + (" + predictor data)" if keep else ")")
            with stages(name):
                rec = record(batches, runner.n_layer, opts.target_density, keep_tokens=min(keep, n_tok), store_dir=tmp)
        tokens = [t for seq in sequences for t in seq]
        act, held = rec.activity, rec.held

        orders, groups, freqs = [], [], []
        evals = {k: [] for k in ("active", "stored", "identity", "frequency")}
        with stages(f"placement ({opts.placement})"):
            for il in tqdm(range(layout.n_layer), desc=f"placing neurons ({opts.placement})", unit="layer", leave=False):
                a = act.layer(il)
                order = order_neurons(a, opts.placement)
                freq = a.mean(axis=0)[order]
                orders.append(order)
                groups.append(group_starts(a[:, order]))
                freqs.append(freq)
                for k, v in reads_by_method(held.layer(il)[:, order], order, freq).items():
                    evals[k].append(v)

        downs = _convert_downs(header, layout, down_type, rec, stages, log) if down_type is not None else None
        index = RippleIndex(opts.placement, act.kind, opts.target_density, act.tokens, calib_source,
                            act.thresholds, orders, groups, freqs, held.tokens,
                            {k: np.array(v) for k, v in evals.items()}, source=source.label,
                            down_source_type=np.array([int(t) for t in layout.types["down"]]),
                            down_rel_rms=np.array([d.rel_rms for d in downs] if downs else [0.0] * layout.n_layer))
        # named as the output will be: the pack's binding records this name, and a mismatch error quotes it
        written = tmp / (f"unquantized-{out.name}" if quantize_to else out.name)
        total = sum(int(t.n_bytes) for t in header.tensors)
        with stages("write GGUF"), tqdm(total=total, desc="writing GGUF", unit="B", unit_scale=True, leave=False) as bar:
            write_converted(header, written, index.to_kv(), downs, progress=bar.update)
        del downs
        final = written
        if quantize_to:
            final = tmp / out.name
            with stages(f"llama.cpp quantizer ({quantize_to})"):
                quantize_gguf(written, final, quantize_to, allow_requantize=from_gguf)
            written.unlink()
        pack_summary = None
        if opts.pack:
            log("building the offload pack (neuron bundles + predictors)")
            part = tmp / "final.ripple"
            if quantize_to:  # new weights: the predictors learn from the quantized model itself
                pack_summary = build_pack(final, pack_opts, tokens=tokens, out=part, log=log, stages=stages)
            else:
                # perplexity of the operating points: on calibration text the predictors did not
                # train on (the text's tail; of self-generated text, the sequences finished last)
                tail = [sequences[0][int(len(sequences[0]) * 0.9):]] if text is not None else sequences[::-1]
                bos = runner_bos(final)
                chunk_sets = [calibration_chunks(tail, opts.n_ctx, bos)]
                if text is not None:  # and text of the model's own: the user's text alone came out optimistic
                    chunk_sets.append(neutral_chunks(final, bos, opts.seed + 1))
                pack_summary = pack_from_recording(final, rec.xs, rec.hs, rec.n_kept,
                                                   pack_opts, part, stages, chunk_sets)
        rec = None  # drop the memory maps before the directory goes
        os.replace(final, out)
        stale = pack_path_for(out)
        if pack_summary:
            os.replace(tmp / "final.ripple", stale)
            pack_summary["pack"] = str(stale)
        elif stale.exists():
            stale.unlink()  # bound to the GGUF just replaced; it could never be used again
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    out_layout = read_ffn_layout(open_header(out))
    ev = {k: float(np.sum(v)) for k, v in evals.items()}
    return {
        "output": str(out), "bytes": out.stat().st_size, "source": source.label, "source_kind": source.kind,
        "source_bytes": source.path.stat().st_size if from_gguf else None,
        "arch": layout.arch, "outtype": outtype or "as source", "ffn_types": _types(out_layout),
        "down_rel_rms": [round(float(x), 5) for x in index.down_rel_rms],
        "placement": opts.placement, "activation": act.kind, "n_layer": layout.n_layer,
        "n_ff": layout.n_ff[0], "calib_tokens": act.tokens, "calib_source": calib_source,
        "heldout_tokens": held.tokens, "density": float(np.mean(act.density())),
        "reads_per_token": {"stored": ev["stored"], "identity": ev["identity"], "frequency": ev["frequency"]},
        "active_per_token": ev["active"], "pack": pack_summary, "stages": dict(stages.times),
        "seconds": stages.total,
    }


def _convert_downs(header, layout, down_type: QT, rec, stages, log) -> list:
    """--down-type: every layer's ffn_down in that type (llama.cpp's fallback where ggml cannot
    write it), requantized with the calibration importance matrix."""
    downs = []
    tensors = {t.name: t for t in header.tensors}
    with stages(f"ffn_down -> {down_type.name}"):
        for il in tqdm(range(layout.n_layer), desc="converting ffn_down", unit="layer", leave=False):
            t = tensors[f"blk.{il}.ffn_down.weight"]
            src_type = QT(t.tensor_type)
            target = down_target_type(src_type, layout.n_ff[il], down_type)
            downs.append(convert_down(tensor_bytes(header, t), src_type, layout.n_embd, layout.n_ff[il],
                                      target, _imatrix(rec.imatrix(il))))
    _report_down(downs, down_type, log)
    return downs


def _imatrix(mean_sq: np.ndarray) -> np.ndarray:
    """The importance matrix handed to ggml: mean h^2 per neuron, floored at 1e-6 of its mean so a
    neuron that never fired on the calibration text (or a block of them) still gets a finite weight
    (ggml's weighted searches divide by the weights' sum)."""
    m = np.asarray(mean_sq, dtype=np.float32)
    return np.maximum(m, 1e-6 * max(float(m.mean()), 1e-30)).astype(np.float32)


def _types(layout) -> dict[str, list[str]]:
    return {k: [q.name for q in v] for k, v in layout.types.items()}


def _types_label(layout) -> str:
    seen = sorted({q.name for v in layout.types.values() for q in v})
    return "FFN " + "+".join(seen)


def _report_down(downs, down_type, log) -> None:
    """Say what happened to ffn_down, per type: requantization error, and any fallback."""
    by = {}
    for d in downs:
        by.setdefault((d.source_type, d.out_type), []).append(d.rel_rms)
    for (src, dst), errs in by.items():
        wanted = down_type if down_type is not None else src
        note = ""
        if dst != wanted:
            why = ("ggml cannot quantize it" if not ggml_quant.can_quantize(wanted)
                   else "its blocks do not divide n_ff")
            note = f"; {wanted.name} is not possible ({why}), written as llama.cpp's fallback {dst.name}"
        if src == dst:
            log(f"ffn_down {src.name}: kept as stored ({len(errs)} layers)")
        else:
            log(f"ffn_down {src.name} -> {dst.name}: requantized, relative RMS error vs the source "
                f"{100 * np.mean(errs):.2f}% mean, {100 * np.max(errs):.2f}% max ({len(errs)} layers){note}")
