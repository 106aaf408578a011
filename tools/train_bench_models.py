"""Train the two benchmark checkpoints (n_ff 2048, both FFN families) into a cache outside git.

    .venv/bin/python tools/train_bench_models.py [--steps N] [--out DIR]   # prints the model dirs

The fixture models in models/ are too small for I/O to matter (a neuron of tiny-arcee-relu2 is
512 bytes in f16); these are 6 layers x n_ff 2048 x n_embd 256 (1-1.5 KiB per neuron in f16,
~16-22 MiB GGUFs). Same recipe, text and tokenizer as tools/train_fixtures.py (the committed
fixture tokenizer is reused), smaller batch and fewer steps so both train in ~25 min on 2 CPU
cores. A model is retrained only when what it is built from changes: its directory holds a stamp
of this script, train_fixtures.py, fixture_text.py, the tokenizer, the steps and the torch version.
Default cache: ~/.cache/ripple-gguf/bench-models (RIPPLE_BENCH_MODELS overrides).
"""
import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
from transformers import ArceeConfig, ArceeForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_text  # noqa: E402
import train_fixtures as tf  # noqa: E402

HERE = Path(__file__).resolve().parent
TOKENIZER = tf.MODELS_DIR / "tiny-llama-swiglu" / "tokenizer.model"
BATCH, STEPS = 8, 700
COMMON = dict(tf.COMMON, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "bench-llama-swiglu": dict(cls=(LlamaConfig, LlamaForCausalLM),
                               config=dict(intermediate_size=2048, hidden_act="silu")),
    "bench-arcee-relu2": dict(cls=(ArceeConfig, ArceeForCausalLM),
                              config=dict(intermediate_size=2048, hidden_act="relu2")),
}


def default_dir():
    return Path(os.environ.get("RIPPLE_BENCH_MODELS") or Path.home() / ".cache" / "ripple-gguf" / "bench-models")


def stamp(name, steps):
    h = hashlib.sha256()
    for f in (HERE / "train_bench_models.py", HERE / "train_fixtures.py", HERE / "fixture_text.py", TOKENIZER):
        h.update(f.read_bytes())
    h.update(f"{name} {steps} {torch.__version__}".encode())
    return h.hexdigest()[:16]


def card(out, name, info):
    cfg = json.loads((out / "config.json").read_text())
    s = info["sparsity"]
    lines = [
        f"# {name}", "",
        "Benchmark model for `ripple-gguf bench` (trained on CPU by `tools/train_bench_models.py`; "
        "same data, tokenizer and recipe as the fixture models in models/, not a useful LM).", "",
        f"- `{cfg['architectures'][0]}`, {info['n_params']:,} parameters: hidden {cfg['hidden_size']}, "
        f"n_ff {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, act {cfg['hidden_act']}",
        f"- {info['steps']} steps x batch {BATCH} x seq {tf.SEQ_LEN}; {info['wall_s'] / 60:.1f} min on 2 CPU cores "
        f"(load {info['load']:.1f})",
        f"- train loss {info['train_loss_last50']:.3f}; heldout loss {info['heldout_loss']:.3f} nats/token "
        f"(ppl {math.exp(info['heldout_loss']):.1f})",
        "- FFN zero fraction per layer: " + ", ".join(f"{x['zero']:.3f}" for x in s),
        "- FFN near-zero fraction per layer: " + ", ".join(f"{x['near']:.3f}" for x in s), ""]
    (out / "MODEL_CARD.md").write_text("\n".join(lines))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", type=Path, default=None, help="cache directory (default: %(default)s)")
    ap.add_argument("names", nargs="*", help=f"models to train (when not cached) and print (default: all of "
                                             f"{', '.join(MODELS)})")
    args = ap.parse_args()
    names = args.names or list(MODELS)
    if set(names) - set(MODELS):
        ap.error(f"unknown model {sorted(set(names) - set(MODELS))[0]!r}; choose from {', '.join(MODELS)}")
    root = args.out or default_dir()
    root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    todo = [n for n in names if not ((root / n / "STAMP").is_file()
                                       and (root / n / "STAMP").read_text().strip() == stamp(n, args.steps))]
    if todo:
        sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
        tokens = tf.encode_docs(sp, [fixture_text.doc_text(r, t) for r, t in fixture_text.documents("train")])
        heldout = torch.tensor([sp.bos_id()] + sp.encode((fixture_text.TEXT_DIR / "heldout.txt").read_text("utf-8")))
    for name in todo:
        model, info = tf.train(name, MODELS[name], tokens, args.steps, batch=BATCH, common=COMMON)
        info["heldout_loss"], _ = tf.evaluate(model, heldout)
        info["sparsity"] = tf.ffn_sparsity(model, heldout)
        out = root / name
        tf.save(model, out, TOKENIZER)
        card(out, name, info)
        (out / "STAMP").write_text(stamp(name, args.steps) + "\n")
        print(f"{name}: heldout loss {info['heldout_loss']:.3f}, {info['wall_s'] / 60:.1f} min, "
              f"zero {np.mean([x['zero'] for x in info['sparsity']]):.3f}", file=sys.stderr)
    for name in names:
        print(root / name)


if __name__ == "__main__":
    main()
