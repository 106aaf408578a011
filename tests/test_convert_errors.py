"""Bad input: one `error:` line, non-zero exit, no traceback, and no output file left behind."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

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


@pytest.mark.parametrize("delay", [1.0, 6.0])
def test_ctrl_c_mid_conversion_leaves_nothing(tmp_path, delay):
    out = tmp_path / "out"; out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "ripple_gguf.cli", "convert", str(MODEL), "-o", str(out / "m.gguf"),
                             "--calib", str(CALIB)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.endswith(".tmp") for p in os.listdir(out)):
        time.sleep(0.05)
    assert any(p.endswith(".tmp") for p in os.listdir(out)), "conversion never started writing"
    time.sleep(delay)  # inside the conversion (early: converter/profiling; later: placement/pack)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    proc_result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
    assert_clean_failure(proc_result, out, "interrupted")
