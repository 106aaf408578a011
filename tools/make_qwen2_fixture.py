"""A Qwen2-architecture checkpoint from the trained tiny-llama-swiglu fixture, for tests: the same
trained weights, plus small random q/k/v biases and the output tied to the token embedding (what
Qwen2 models such as Qwen2.5-0.5B have and LLaMA does not), so the converter and the runtime meet a
second real llama.cpp architecture on every test run. Deterministic (seed 0).

    .venv/bin/python tools/make_qwen2_fixture.py OUT_DIR
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

SOURCE = Path(__file__).resolve().parents[1] / "models" / "tiny-llama-swiglu"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def make(out: Path) -> None:
    llama = LlamaForCausalLM.from_pretrained(SOURCE, dtype=torch.float32)
    c = llama.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    qwen = Qwen2ForCausalLM(config)
    trained, g = llama.state_dict(), torch.Generator().manual_seed(0)
    state = {k: trained[k] if k in trained else 0.02 * torch.randn(v.shape, generator=g) if k.endswith(".bias") else v
             for k, v in qwen.state_dict().items()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    qwen.load_state_dict(state)
    out.mkdir(parents=True, exist_ok=True)
    qwen.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(SOURCE / name, out / name)


if __name__ == "__main__":
    make(Path(sys.argv[1]))
    print(sys.argv[1])
