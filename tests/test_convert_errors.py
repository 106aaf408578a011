"""Bad input: one `error:` line, non-zero exit, no traceback, and no output file left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import CALIB, MODELS, run_cli

MODEL = MODELS / "tiny-llama-swiglu"


def assert_clean_failure(proc, out_dir, *fragments):
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[-1], lines[-1]
    if out_dir is not None:
        assert os.listdir(out_dir) == [], "partial output or temp files left behind"


def copy_model(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(MODEL, dst)
    return dst


def test_missing_safetensors(tmp_path):
    src = copy_model(tmp_path)
    (src / "model.safetensors").unlink()
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf", "--calib", CALIB), out, "no *.safetensors")


def test_truncated_safetensors(tmp_path):
    src = copy_model(tmp_path)
    w = src / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf", "--calib", CALIB), out, "corrupt or truncated")


def test_unsupported_architecture(tmp_path):
    src = copy_model(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "unsupported architecture")


def test_empty_calibration_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", MODEL, "-o", out / "m.gguf", "--calib", empty), out, "is empty")


def test_output_in_missing_directory(tmp_path):
    proc = run_cli("convert", MODEL, "-o", tmp_path / "nope" / "m.gguf", "--calib", CALIB)
    assert_clean_failure(proc, None, "does not exist")
    assert not (tmp_path / "nope").exists()


def test_missing_model_offline(tmp_path):
    out = tmp_path / "out"; out.mkdir()
    proc = run_cli("convert", "no-such-org/no-such-model", "-o", out / "m.gguf",
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert_clean_failure(proc, out, "not in the local Hugging Face cache")


def test_corrupt_gguf_for_inspect(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_clean_failure(run_cli("inspect", bad), None, "not a readable GGUF")


@pytest.mark.parametrize("marker", ["profiling", "building the offload pack"])
def test_ctrl_c_mid_conversion_leaves_nothing(tmp_path, marker):
    """Ctrl-C inside the llama.cpp pass (a C call with Python callbacks) and inside predictor training.
    The signal is sent when the conversion's own log reaches that stage: a fixed delay was too long
    on a fast machine (the whole conversion finished first) and would be too short on a slow one."""
    import threading
    out = tmp_path / "out"; out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ripple_gguf.cli", "convert", str(MODEL), "-o", str(out / "m.gguf"),
                             "--calib", str(CALIB)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, reached = [], threading.Event()

    def read_stderr():
        for ch in iter(lambda: proc.stderr.read(1), ""):
            seen.append(ch)
            if not reached.is_set() and marker in "".join(seen[-200:]):
                proc.send_signal(signal.SIGINT)
                reached.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    proc.stdout.read()
    proc.wait(timeout=300)
    reader.join(timeout=30)
    stderr = "".join(seen)
    assert reached.is_set(), f"the conversion never logged {marker!r}:\n{stderr}"
    assert_clean_failure(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), out, "interrupted")


# ------------------------------------------------------------------------------------------------
# GGUF sources

def write_gguf(path, arch="llama", tensors=(), kv=None):
    """A small GGUF made with gguf-py: `tensors` = [(name, numpy array)], `kv` extra string keys."""
    import numpy as np
    from gguf import GGUFWriter
    w = GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c"])
    for k, v in (kv or {}).items():
        w.add_string(k, v)
    for name, arr in tensors:
        w.add_tensor(name, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dense_ffn(n_embd=64, n_ff=128, prefix="blk.0."):
    import numpy as np
    z = np.zeros
    return [("token_embd.weight", z((8, n_embd))), (prefix + "ffn_gate.weight", z((n_ff, n_embd))),
            (prefix + "ffn_up.weight", z((n_ff, n_embd))), (prefix + "ffn_down.weight", z((n_embd, n_ff)))]


def test_vocab_only_gguf(tmp_path):
    src = write_gguf(tmp_path / "vocab.gguf")
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "no tensors", "vocab-only")


def test_moe_gguf(tmp_path):
    import numpy as np
    t = [("token_embd.weight", np.zeros((8, 64))), ("blk.0.ffn_gate_inp.weight", np.zeros((4, 64))),
         ("blk.0.ffn_gate_exps.weight", np.zeros((4, 128, 64))), ("blk.0.ffn_up_exps.weight", np.zeros((4, 128, 64))),
         ("blk.0.ffn_down_exps.weight", np.zeros((4, 64, 128)))]
    src = write_gguf(tmp_path / "moe.gguf", tensors=t)
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "mixture-of-experts")


def test_unknown_architecture_gguf(tmp_path):
    src = write_gguf(tmp_path / "fancy.gguf", arch="fancynet", tensors=dense_ffn())
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "unknown architecture 'fancynet'")


def test_architecture_without_dense_ffn(tmp_path):
    import numpy as np
    src = write_gguf(tmp_path / "noffn.gguf", tensors=[("token_embd.weight", np.zeros((8, 64))),
                                                        ("blk.0.attn_q.weight", np.zeros((64, 64)))])
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "no ffn_up/ffn_down")


def test_split_gguf(tmp_path):
    import numpy as np
    from gguf import GGUFWriter
    w = GGUFWriter(tmp_path / "part.gguf", "llama")
    w.add_uint16("split.count", 3)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", tmp_path / "part.gguf", "-o", out / "m.gguf"), out, "split GGUF")


def test_truncated_gguf(tmp_path, converted):
    src = tmp_path / "truncated.gguf"
    data = converted("tiny-llama-swiglu", "f16", "identity").read_bytes()
    src.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "truncated or corrupt", "re-download")


def test_corrupt_gguf_header(tmp_path, converted):
    src = tmp_path / "corrupt.gguf"
    data = bytearray(converted("tiny-llama-swiglu", "f16", "identity").read_bytes())
    data[16:24] = (2**40).to_bytes(8, "little")  # KV count far beyond the file
    src.write_bytes(bytes(data))
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "truncated or corrupt")


def test_not_a_gguf_file(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"PK\x03\x04" + os.urandom(256))
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", src, "-o", out / "m.gguf"), out, "not a GGUF file")


@pytest.mark.parametrize("flag,value", [("--outtype", "q4_k_x"), ("--down-type", "q9_0")])
def test_unknown_types(tmp_path, flag, value):
    out = tmp_path / "out"; out.mkdir()
    assert_clean_failure(run_cli("convert", MODEL, "-o", out / "m.gguf", flag, value), out, f"unknown {flag}")


def test_missing_hub_gguf_offline(tmp_path):
    out = tmp_path / "out"; out.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for src in (["no-such-org/no-such-model:model.Q4_K_M.gguf"], ["no-such-org/no-such-model", "model.gguf"]):
        proc = run_cli("convert", *src, "-o", out / "m.gguf", env=env)
        assert_clean_failure(proc, out, "not in the local Hugging Face cache")
    proc = run_cli("convert", "no-such-org/no-such-model:Q4_K_M", "-o", out / "m.gguf", env=env)
    assert_clean_failure(proc, out, "Q4_K_M")
