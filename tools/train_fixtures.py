"""Train the two tiny fixture checkpoints in models/ (plain torch, CPU, deterministic).

    .venv/bin/python tools/train_fixtures.py [--only NAME] [--steps N]

1. Training text: the stdlib train split (tools/fixture_text.py), written to build/fixtures/.
2. One SentencePiece BPE tokenizer (vocab 1024, Llama-2 style: byte fallback, split digits,
   whitespace kept) shared by both models.
3. models/tiny-llama-swiglu (LlamaForCausalLM, SwiGLU) and models/tiny-arcee-relu2
   (ArceeForCausalLM, relu^2 MLP without gate): AdamW, warmup + cosine LR, random 256-token windows.
4. Each model dir is a normal HF checkpoint (float32 safetensors + tokenizer files) that
   convert_hf_to_gguf.py converts; a MODEL_CARD.md records losses, FFN sparsity and a sample.
"""
import argparse
import importlib
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (ArceeConfig, ArceeForCausalLM, AutoModelForCausalLM, AutoTokenizer,
                          LlamaConfig, LlamaForCausalLM)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fixtures"  # git-ignored: train.txt, tokenizer
MODELS_DIR = ROOT / "models"
SEED = 1234
SEQ_LEN, BATCH = 256, 16
LR, MIN_LR_FRAC, WARMUP_FRAC, WEIGHT_DECAY = 3e-3, 0.1, 0.05, 0.1

# All dims are multiples of 32 so every tensor can be quantized to Q4_0/Q8_0 (block size 32).
COMMON = dict(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_theta=10000.0, initializer_range=0.02,
              bos_token_id=1, eos_token_id=2, pad_token_id=None)
MODELS = {
    "tiny-llama-swiglu": dict(cls=(LlamaConfig, LlamaForCausalLM), steps=1200,
                              config=dict(intermediate_size=512, hidden_act="silu")),
    "tiny-arcee-relu2": dict(cls=(ArceeConfig, ArceeForCausalLM), steps=1200,
                             config=dict(intermediate_size=1024, hidden_act="relu2")),
}

# Phi-3 layout with plain-text role markers: "<|user|>", "<|end|>" etc. are NOT tokens of our vocab,
# they tokenize as ordinary text, so no special tokens are needed. llama.cpp's built-in template
# detection maps this template to its PHI_3 formatter, which renders exactly the same string, so the
# jinja path and llama.cpp's C fallback agree. BOS comes from add_bos_token, not the template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
SAMPLE_PROMPTS = ["def ", "class Queue:\n    def __init__(self"]


# ----------------------------------------------------------------------------- data + tokenizer

def train_tokenizer(text):
    """Llama-2-style SentencePiece BPE. BPE (not unigram) because llama.cpp's SPM tokenizer merges
    pieces greedily by score, which reproduces BPE segmentation but not unigram's Viterbi."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        # lines from memory, model to memory: no file paths get recorded in the trainer spec
        sentence_iterator=iter(text.split("\n")), model_writer=buf,
        model_type="bpe", vocab_size=1024,
        byte_fallback=True,  # any byte (e.g. "\n", non-ASCII) is representable, no <unk>
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # code: keep spaces
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces
        split_digits=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # use every line, in file order: deterministic (no sampling, no shuffling)
        input_sentence_size=100_000_000, shuffle_input_sentence=False, num_threads=2,
        minloglevel=2)
    path = BUILD / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def encode_docs(sp, docs):
    """Each document as BOS + pieces (as llama.cpp / HF tokenize a prompt), concatenated."""
    ids = sp.encode(docs, num_threads=2)
    return torch.from_numpy(np.concatenate([[sp.bos_id()] + x for x in ids]).astype(np.int64))


def get_batch(tokens, gen, batch=BATCH):
    ix = torch.randint(len(tokens) - SEQ_LEN - 1, (batch,), generator=gen)
    x = torch.stack([tokens[i:i + SEQ_LEN + 1] for i in ix.tolist()])
    return x[:, :-1], x[:, 1:]


# ----------------------------------------------------------------------------- training + eval

def lr_at(step, steps):
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * t)))


def train(name, spec, tokens, steps, batch=BATCH, common=COMMON):
    torch.manual_seed(SEED)
    cfg_cls, model_cls = spec["cls"]
    config = cfg_cls(**common, **spec["config"], attn_implementation="sdpa")
    model = model_cls(config)
    n_params = sum(p.numel() for p in model.parameters())
    # nanoGPT-style: decay matrices (incl. embeddings), not norm gains
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    losses, loads, t0 = [], [], time.time()
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        x, y = get_batch(tokens, gen, batch)
        loss = F.cross_entropy(model(input_ids=x, use_cache=False).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}", lr=f"{lr_at(step, steps):.1e}")
        if step % 100 == 0 or step == steps - 1:
            loads.append(os.getloadavg()[0])  # other jobs on the 2 cores stretch the wall time
            tqdm.write(f"{name} step {step:5d} loss {np.mean(losses[-25:]):.4f}")
    wall = time.time() - t0
    return model, dict(n_params=n_params, steps=steps, wall_s=wall, load=float(np.mean(loads)),
                       train_loss_last50=float(np.mean(losses[-50:])),
                       loss_curve=[(s, float(np.mean(losses[max(0, s - 24):s + 1]))) for s in range(0, steps, max(1, steps // 10))])


@torch.no_grad()
def evaluate(model, tokens):
    """Mean next-token loss over non-overlapping SEQ_LEN windows (all positions)."""
    model.eval()
    n = (len(tokens) - 1) // SEQ_LEN
    x = tokens[:n * SEQ_LEN].view(n, SEQ_LEN)
    y = tokens[1:n * SEQ_LEN + 1].view(n, SEQ_LEN)
    tot = 0.0
    for i in range(0, n, 32):
        logits = model(input_ids=x[i:i + 32], use_cache=False).logits
        tot += F.cross_entropy(logits.flatten(0, 1), y[i:i + 32].flatten(), reduction="sum").item()
    return tot / y.numel(), y.numel()


@torch.no_grad()
def ffn_sparsity(model, tokens):
    """Per layer, over all held-out tokens, for h = the input of down_proj
    (relu2: relu(up x)^2; SwiGLU: silu(gate x) * up x):
      zero: fraction of entries exactly 0.0
      near: fraction with |h| < 0.1 * mean_j |h_j|, the mean taken over that token's neurons."""
    model.eval()
    stats = [[0, 0, 0] for _ in model.model.layers]  # zero, near, total
    def hook(i):
        def f(_mod, args):
            h = args[0].flatten(0, -2)
            s = stats[i]
            s[0] += (h == 0).sum().item()
            s[1] += (h.abs() < 0.1 * h.abs().mean(-1, keepdim=True)).sum().item()
            s[2] += h.numel()
        return f
    handles = [l.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, l in enumerate(model.model.layers)]
    n = len(tokens) // SEQ_LEN
    for i in range(0, n, 32):
        model(input_ids=tokens[:n * SEQ_LEN].view(n, SEQ_LEN)[i:i + 32], use_cache=False)
    for h in handles:
        h.remove()
    return [dict(zero=z / t, near=nz / t) for z, nz, t in stats]


# ----------------------------------------------------------------------------- checkpoint files

def save(model, final, tok_model):
    """Write into <name>.tmp, then swap it in, so readers never see a half-written checkpoint."""
    out = final.with_name(f".{final.name}.tmp")  # hidden *.tmp: git-ignored by ".*.tmp/"
    shutil.rmtree(out, ignore_errors=True)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy(tok_model, out / "tokenizer.model")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    tok_cfg = dict(
        tokenizer_class="LlamaTokenizer", **specials, pad_token=None,
        add_bos_token=True, add_eos_token=False,
        # legacy=True (Llama-2 behaviour): a dummy-prefix "▁" before every text segment, i.e. at
        # the start and after each special token, which is exactly what llama.cpp's SPM tokenizer
        # does. legacy=False differs from llama.cpp after special tokens, and its fast tokenizer
        # also drops the prefix of text that starts with a space (" x" -> "▁x", spm: "▁▁x").
        legacy=True,
        clean_up_tokenization_spaces=False,  # decoding must not rewrite " ." etc. in code
        spaces_between_special_tokens=False, sp_model_kwargs={},
        model_max_length=COMMON["max_position_embeddings"], chat_template=CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    write_tokenizer_json(out)
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        out.rename(final)
        shutil.rmtree(old)
    else:
        out.rename(final)


def write_tokenizer_json(out):
    """Ship tokenizer.json so AutoTokenizer loads LlamaTokenizerFast directly. Without it HF must
    build the fast tokenizer from tokenizer.model, and that imports sentencepiece's generated
    protobuf module, which needs protobuf>=5.26 while requirements.txt pins 4.25 (ImportError:
    runtime_version). Here we point HF at its own protobuf-4 compatible copy of that module."""
    # import_module: `transformers.convert_slow_tokenizer` the attribute is a function, not the module
    cst = importlib.import_module("transformers.convert_slow_tokenizer")
    tl = importlib.import_module("transformers.models.llama.tokenization_llama")
    from transformers import LlamaTokenizerFast
    from transformers.utils import sentencepiece_model_pb2_new as pb2
    saved = cst.import_protobuf, tl.import_protobuf
    cst.import_protobuf = tl.import_protobuf = lambda *a, **k: pb2
    try:
        # add_prefix_space=True must be explicit: left as None it reaches the converter as falsy and
        # the fast tokenizer silently drops sentencepiece's dummy prefix ("def" instead of "▁def")
        fast = LlamaTokenizerFast(vocab_file=str(out / "tokenizer.model"), legacy=True, from_slow=True,
                                  add_prefix_space=True, add_bos_token=True, add_eos_token=False)
    finally:
        cst.import_protobuf, tl.import_protobuf = saved
    fast.backend_tokenizer.save(str(out / "tokenizer.json"))


def check_and_sample(out, sp, heldout_text):
    """Reload through the Auto* classes (what users and tests do); check HF tokenization agrees
    with sentencepiece; greedy samples."""
    tok = AutoTokenizer.from_pretrained(out)
    slow = AutoTokenizer.from_pretrained(out, use_fast=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = [sp.bos_id()] + sp.encode(heldout_text)
    tok.model_max_length = slow.model_max_length = 10**9  # whole text at once, no length warning
    agree = tok(heldout_text)["input_ids"] == ref and slow(heldout_text)["input_ids"] == ref
    samples = []
    for p in SAMPLE_PROMPTS:
        ids = tok(p, return_tensors="pt")
        gen = model.generate(**ids, max_new_tokens=96, do_sample=False, pad_token_id=tok.eos_token_id)
        samples.append((p, tok.decode(gen[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    return dict(tokenizer_class=type(tok).__name__, hf_tokenization_matches_spm=agree, samples=samples, chat_example=chat)


def du(path):
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def model_card(name, spec, info, cmd):
    cfg = json.loads((MODELS_DIR / name / "config.json").read_text())
    keys = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "vocab_size",
            "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings"]
    d = info["data"]
    mlp = ("SwiGLU: down(silu(gate x) * up x)" if spec["config"]["hidden_act"] == "silu"
           else "relu^2, no gate: down(relu(up x)^2)")
    lines = [
        f"# {name}", "",
        "Tiny *trained* fixture model for ripple-gguf tests and the default demo (not a useful LM: it "
        "only writes Python-looking text). Trained on CPU from scratch by `tools/train_fixtures.py`.", "",
        "## Architecture", "",
        f"`{cfg['architectures'][0]}`, {info['n_params']:,} parameters, float32 safetensors "
        f"({info['dir_bytes'] / 2**20:.2f} MiB directory). MLP: {mlp}.", "",
        "| config | value |", "|---|---|",
        *[f"| {k} | {cfg.get(k)} |" for k in keys], "",
        "## Tokenizer", "",
        "SentencePiece BPE, vocab 1024 (3 specials `<unk>`=0 `<s>`=1 `</s>`=2, 256 byte-fallback pieces "
        "`<0x00>`..`<0xFF>`, the rest learned), shared with the other fixture model. Llama-2 style: "
        "identity normalization, whitespace kept, whitespace-only pieces allowed (indentation runs "
        "are single tokens), split digits, dummy-prefix `▁`. `\\n` and non-ASCII characters are byte "
        "tokens (`<0x0A>`). `tokenizer_config.json`: LlamaTokenizer, add_bos_token, no eos, "
        "legacy=true (dummy prefix at the start and after special tokens, as llama.cpp does); "
        "`tokenizer.json` is included so no protobuf is needed to load the fast tokenizer. "
        "Phi-3-layout chat template with plain-text markers (`<|user|>`, `<|end|>`, `<|assistant|>` "
        "are ordinary text, not tokens) "
        f"(`apply_chat_template([user: 'hi'], add_generation_prompt=True)` = `{info['chat_example']!r}`).", "",
        f"HF `AutoTokenizer` ({info['tokenizer_class']}, and the slow LlamaTokenizer) ids equal "
        "BOS + sentencepiece ids on "
        f"models/text/heldout.txt: **{info['hf_tokenization_matches_spm']}**.", "",
        "## Training data", "",
        f"Python {sys.version.split()[0]} standard library sources (`sysconfig.get_paths()['stdlib']`), "
        "`*.py` excluding `test/`, `tests/`, `idlelib/`, `tkinter/`, `site-packages/`, `encodings/`, "
        "`pydoc_data/`. Files are split by `sha256(relative path) % 100`: <90 train, <95 calib, else "
        "heldout (`tools/fixture_text.py`), so calib/heldout share no file with training.", "",
        f"- train: {d['train_files']} files, {d['train_bytes']:,} bytes, {d['train_tokens']:,} tokens "
        f"({d['train_bytes'] / d['train_tokens']:.2f} bytes/token); each file = BOS + tokens, concatenated",
        f"- heldout: models/text/heldout.txt, {d['heldout_tokens']:,} tokens "
        "(excerpts of the heldout files; calib.txt is built the same way from the calib files)", "",
        "## Training", "",
        f"- {info['steps']} steps x batch {BATCH} x seq {SEQ_LEN} = {info['steps'] * BATCH * SEQ_LEN:,} "
        f"tokens ({info['steps'] * BATCH * SEQ_LEN / d['train_tokens']:.2f} epochs), random windows, seed {SEED}",
        f"- AdamW (betas 0.9/0.95, weight decay {WEIGHT_DECAY} on matrices), peak LR {LR}, "
        f"{WARMUP_FRAC:.0%} linear warmup, cosine to {MIN_LR_FRAC:.0%}, grad clip 1.0, float32, "
        "torch.set_num_threads(2)",
        f"- wall time: {info['wall_s'] / 60:.1f} min ({info['wall_s'] / info['steps']:.2f} s/step) on 2 CPU "
        f"cores, mean 1-min load average {info['load']:.1f} while training "
        f"(torch {torch.__version__}, transformers {__import__('transformers').__version__})",
        "- loss curve (mean of 25 steps): " + ", ".join(f"{s}: {l:.2f}" for s, l in info["loss_curve"]), "",
        "## Results", "",
        f"- final train loss (mean of last 50 steps): **{info['train_loss_last50']:.3f}** nats/token",
        f"- heldout loss (models/text/heldout.txt, {SEQ_LEN}-token windows): **{info['heldout_loss']:.3f}** "
        f"nats/token (ppl {math.exp(info['heldout_loss']):.1f})", "",
        "FFN sparsity on heldout.txt, per layer, of h = the input of `down_proj`: *zero* = fraction "
        "exactly 0.0; *near-zero* = fraction with |h| < 0.1 x (mean |h| over that token's neurons).", "",
        "| layer | zero | near-zero |", "|---|---|---|",
        *[f"| {i} | {s['zero']:.3f} | {s['near']:.3f} |" for i, s in enumerate(info["sparsity"])],
        f"| mean | {np.mean([s['zero'] for s in info['sparsity']]):.3f} | "
        f"{np.mean([s['near'] for s in info['sparsity']]):.3f} |", "",
        "## Sample (greedy, 96 new tokens)", "",
    ]
    for p, s in info["samples"]:
        lines += [f"Prompt `{p!r}`:", "", "```python", p + s, "```", ""]
    lines += ["## Reproduce", "", "```sh", cmd, "```", "",
              "Retraining on another CPU, torch or Python version gives slightly different weights "
              "(and a different stdlib gives different text).", ""]
    (MODELS_DIR / name / "MODEL_CARD.md").write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=list(MODELS), help="train just this model")
    ap.add_argument("--steps", type=int, help="override the number of training steps")
    args = ap.parse_args()
    torch.set_num_threads(2)
    BUILD.mkdir(parents=True, exist_ok=True)

    train_docs = fixture_text.documents("train")
    text = fixture_text.train_text()
    train_txt = BUILD / "train.txt"  # not needed for training; kept to inspect what the models saw
    train_txt.write_text(text, encoding="utf-8")
    tok_model = train_tokenizer(text)
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    tokens = encode_docs(sp, [fixture_text.doc_text(rel, text) for rel, text in train_docs])
    heldout_text = (fixture_text.TEXT_DIR / "heldout.txt").read_text(encoding="utf-8")
    heldout = torch.tensor([sp.bos_id()] + sp.encode(heldout_text))
    data = dict(train_files=len(train_docs), train_bytes=train_txt.stat().st_size,
                train_tokens=len(tokens), heldout_tokens=len(heldout))
    print(f"tokenizer {tok_model} ({sp.vocab_size()} pieces); data {data}")

    for name, spec in MODELS.items():
        if args.only and name != args.only:
            continue
        steps = args.steps or spec["steps"]
        cmd = ".venv/bin/python tools/train_fixtures.py --only " + name + (f" --steps {args.steps}" if args.steps else "")
        model, info = train(name, spec, tokens, steps)
        info["heldout_loss"], _ = evaluate(model, heldout)
        info["sparsity"] = ffn_sparsity(model, heldout)
        out = MODELS_DIR / name
        save(model, out, tok_model)
        info.update(check_and_sample(out, sp, heldout_text), data=data, dir_bytes=0)
        model_card(name, spec, info, cmd)
        info["dir_bytes"] = du(out)
        model_card(name, spec, info, cmd)  # again, now that the card's own size is counted
        print(f"{name}: train {info['train_loss_last50']:.3f} heldout {info['heldout_loss']:.3f} "
              f"zero {[round(s['zero'], 3) for s in info['sparsity']]} near {[round(s['near'], 3) for s in info['sparsity']]} "
              f"{info['wall_s'] / 60:.1f} min, {info['dir_bytes'] / 2**20:.2f} MiB, hf tok == spm: {info['hf_tokenization_matches_spm']}")
        for p, s in info["samples"]:
            print(f"--- {p!r}\n{p + s}")


if __name__ == "__main__":
    main()
