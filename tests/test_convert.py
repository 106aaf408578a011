"""Converter: the output runs in unmodified llama-cpp-python, is function-preserving, and carries
a valid ripple index that cuts reads per token on text it was not calibrated on."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader
from llama_cpp import Llama

from ripple_gguf.gguf_io import read_ffn_layout
from ripple_gguf.index_keys import read_index
from ripple_gguf.llama_capture import LlamaRunner

from conftest import FIXTURES, HELDOUT, MODELS, run_cli

PROMPT = "def parse_args(argv):\n    "


def greedy_tokens(path, n=32) -> list[int]:
    llm = Llama(str(path), n_ctx=256, n_threads=2, seed=0, verbose=False)
    try:
        tokens = llm.tokenize(PROMPT.encode())
        out = []
        for tok in llm.generate(tokens, temp=0.0, top_k=1):
            out.append(tok)
            if len(out) == n:
                break
        return out
    finally:
        llm.close()


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_converted_gguf_is_the_source_plus_a_placement(converted, model, outtype):
    """The GGUF keeps llama.cpp's tensors byte for byte (the placement lives in the index and the
    pack's record order), so every GGUF tool computes exactly what it computed before."""
    placed = GGUFReader(converted(model, outtype, "coactivation"))
    plain = GGUFReader(converted(model, outtype, "identity"))
    index = read_index(placed, read_ffn_layout(placed).n_ff)
    # the placement really happened (otherwise the pack tests' order checks could not fail)
    assert any(not np.array_equal(o, np.arange(len(o))) for o in index.orders)
    a = {t.name: (t.tensor_type, np.asarray(t.data)) for t in placed.tensors}
    b = {t.name: (t.tensor_type, np.asarray(t.data)) for t in plain.tensors}
    assert list(a) == list(b)
    for name in a:
        assert a[name][0] == b[name][0], name
        np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)


@pytest.mark.parametrize("model", FIXTURES)
def test_logits_match_transformers(converted, model):
    """llama.cpp on the converted f32 GGUF vs transformers on the checkpoint, same token ids."""
    import torch
    from transformers import AutoModelForCausalLM
    path = converted(model, "f32")
    text = HELDOUT.read_text()[:2000]
    with LlamaRunner(path, n_ctx=256, capture_intermediate=False) as runner:
        ids = [runner.bos] + runner.tokenize(text)[:127]
        ours, _, _ = runner.evaluate(ids, want_logits=True)
    hf = AutoModelForCausalLM.from_pretrained(MODELS / model, torch_dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(ours - ref).max()
    scale = np.abs(ref).max()
    print(f"{model}: max |logit diff| {err:.2e} (max |logit| {scale:.1f}), argmax agreement "
          f"{(ours.argmax(1) == ref.argmax(1)).mean():.3f}")
    assert err < 1e-3 * max(scale, 1.0)  # stated tolerance: 0.1% of the largest logit
    assert (ours.argmax(1) == ref.argmax(1)).mean() == 1.0


@pytest.mark.parametrize("model", FIXTURES)
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_quantized_output_keeps_index_and_runs(converted, model, outtype):
    path = converted(model, outtype)
    reader = GGUFReader(path)
    layout = read_ffn_layout(reader)
    assert layout.weight_type == outtype.upper()
    assert read_index(reader, layout.n_ff) is not None
    assert len(greedy_tokens(path, n=8)) == 8


@pytest.mark.parametrize("outtype", ["q4_k_m", "q5_k_m", "q6_k", "q4_1", "q5_0", "q5_1"])
def test_llama_cpp_mixes_from_checkpoint(converted_with, outtype):
    """--outtype takes llama.cpp's file types, K-quant mixes included (its own quantizer picks each
    tensor's type; on n_embd 128 the K-quant rows of gate/up fall back to 32-block types)."""
    from ripple_gguf.gguf_header import GGUFHeader
    from ripple_gguf.llama_quantize import FTYPES
    path = converted_with(MODELS / "tiny-llama-swiglu", "--outtype", outtype, "--no-pack")
    h = GGUFHeader(path)
    assert h.get("general.file_type") == FTYPES[outtype]
    layout = read_ffn_layout(h)
    assert read_index(h, layout.n_ff) is not None
    if outtype in ("q4_1", "q5_0", "q5_1"):
        assert {q.name for v in layout.types.values() for q in v} == {outtype.upper()}
    if outtype == "q4_k_m":  # down rows (n_ff 512) fit K-quants: a real mix of Q4_K and Q6_K
        assert {q.name for q in layout.types["down"]} == {"Q4_K", "Q6_K"}
    assert len(greedy_tokens(path, n=8)) == 8


@pytest.mark.parametrize("model", FIXTURES)
def test_inspect_reports_fewer_reads_than_identity_on_unseen_text(converted, model):
    path = converted(model, "f16")
    proc = run_cli("inspect", path, "--text", HELDOUT, "--json", check=True)
    info = json.loads(proc.stdout)
    assert info["arch"] in ("llama", "arcee") and info["ripple"]["placement"] == "coactivation"
    unseen = info["ripple"]["reads"][-1]
    assert unseen["text"] == HELDOUT.name and unseen["tokens"] > 1000
    pt = unseen["per_token"]
    print(f"{model} reads/token on {HELDOUT.name}: stored {pt['stored']:.1f}, identity {pt['identity']:.1f}, "
          f"frequency {pt['frequency']:.1f}, active neurons {pt['active']:.1f}")
    assert pt["stored"] < pt["identity"]
    text = run_cli("inspect", path, check=True).stdout
    assert "contiguous reads per token" in text and "identity order" in text


def test_a_qwen2_checkpoint_converts_and_runs(tmp_path):
    """Qwen2 (attention biases, output tied to the token embedding) through the whole pipeline:
    convert, the pack, and the runtime at its every-neuron point (llama.cpp's own tokens, weights held
    or mapped) and at a sparse one."""
    import subprocess
    import sys
    from conftest import CALIB, ROOT
    from ripple_gguf.runtime import RippleLlama
    ckpt = tmp_path / "tiny-qwen2"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_qwen2_fixture.py"), str(ckpt)], check=True,
                   capture_output=True, timeout=600)
    out = tmp_path / "qwen2.gguf"
    run_cli("convert", ckpt, "-o", out, "--outtype", "f16", "--calib", CALIB, check=True)
    assert GGUFReader(out).fields["general.architecture"].contents() == "qwen2"
    # the pack names the GGUF it belongs to by the output's name, not convert's temporary one (a pack
    # moved beside another GGUF is refused quoting it)
    from ripple_gguf.pack import pack_path_for
    assert GGUFReader(pack_path_for(out)).fields["ripple.pack.gguf_name"].contents() == out.name
    want = greedy_tokens(out, n=24)
    kw = dict(n_ctx=256, n_threads=2, seed=0, verbose=False)
    for held in (True, False):
        llm = RippleLlama(out, quality="0%", memory_budget="256MiB", resident_weights=held, **kw)
        toks = llm.tokenize(PROMPT.encode())
        got = [t for _, t in zip(range(24), llm.generate(toks, temp=0.0, top_k=1))]
        st = llm.ripple_stats()
        llm.close()
        assert st["mode"] == "sparse" and not st["error"] and got == want, held
    llm = RippleLlama(out, quality="5%", memory_budget="256MiB", stream_dense=False, **kw)  # the pack at any density
    text = llm.create_completion(PROMPT, max_tokens=16, temperature=0.0)["choices"][0]["text"]
    st = llm.ripple_stats()
    llm.close()
    assert st["mode"] == "sparse" and not st["error"] and st["predicted_density"] < 1.0 and text
