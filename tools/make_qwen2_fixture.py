"""A Qwen2-architecture checkpoint from the trained tiny-llama-swiglu fixture, for tests: the same
trained weights, plus small random q/k/v biases and the output tied to the token embedding (what
Qwen2 models such as Qwen2.5-0.5B have and LLaMA does not), so the converter and the runtime meet a
second real llama.cpp architecture on every test run. Deterministic (seed 0).

    .venv/bin/python tools/make_qwen2_fixture.py OUT_DIR
"""
import shutil
import sys

import torch
from pathlib import Path
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
src = Path(__file__).resolve().parents[1] / "models" / "tiny-llama-swiglu"; out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
ll = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
c = ll.config
qc = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                 num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                 rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True,
                 bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
q = Qwen2ForCausalLM(qc)
sd = ll.state_dict()
g = torch.Generator().manual_seed(0)
new = {}
for k, v in q.state_dict().items():
    if k in sd:
        new[k] = sd[k]
    elif k.endswith(".bias"):
        new[k] = 0.02 * torch.randn(v.shape, generator=g)
    else:
        new[k] = v
new["lm_head.weight"] = new["model.embed_tokens.weight"]
q.load_state_dict(new)
q.save_pretrained(out, safe_serialization=True)
for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
    shutil.copy(src / f, out / f)
print("ok", out)
