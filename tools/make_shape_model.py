"""A random-weight checkpoint with a real model's shapes, for mechanics and speed at real size.

    .venv/bin/python tools/make_shape_model.py qwen2-0.5b OUT_DIR

The real models this project is checked on differ from SmolLM2-135M in size both ways (a 0.5B Qwen2:
151,936-token vocabulary, n_ff 4864; a TinyStories llama2.c model), and none can be fetched here. A
checkpoint of the same shapes shows what size changes: convert time and memory, the budget split, the output matrix and the streamed layers at that
size, and speed against stock llama.cpp on the same file. Its weights are random (HF's init, seed 0),
so its text and perplexity mean nothing: use it for mechanics and speed only, never for quality.
The tokenizer is the committed fixture's, its vocabulary padded by llama.cpp's converter to the
model's size (the extra tokens are never produced by the tokenizer, but the embedding and output
matrices have the real size).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_qwen2_fixture import SOURCE as FIXTURE, TOKENIZER_FILES  # noqa: E402  (the same tokenizer copy)


def _llama2c(dim: int, n_layers: int, n_heads: int, hidden_dim: int, max_seq_len: int):
    """A llama2.c model's ModelArgs as the HF config its export writes."""
    return (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=32000, hidden_size=dim, intermediate_size=hidden_dim, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=max_seq_len,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True))


# published configs (config.json of each model on the hub)
SHAPES = {
    "qwen2-0.5b": (Qwen2Config, Qwen2ForCausalLM, dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    "tinyllama-1.1b": (LlamaConfig, LlamaForCausalLM, dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    # karpathy's llama2.c TinyStories models (export.py: tied classifier, no grouped-query heads)
    "stories15m": _llama2c(dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
    "stories110m": _llama2c(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024),
}


def make(shape: str, out: Path) -> None:
    config_cls, model_cls, kw = SHAPES[shape]
    torch.manual_seed(0)
    config = config_cls(bos_token_id=1, eos_token_id=2, **kw)
    model = model_cls(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE / name, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    make(a.shape, a.out)
    print(a.out)


if __name__ == "__main__":
    main()
