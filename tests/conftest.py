"""Shared fixtures: the committed trained models in models/, converted once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
