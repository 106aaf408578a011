#!/usr/bin/env bash
# Create/refresh .venv with every dependency, including the patched llama-cpp-python wheel
# (built once, cached by tools/build_llama_cpp.sh) and llama.cpp's own HF->GGUF converter.
# Idempotent and fast when nothing changed: a stamp records the hash of what the venv was made from.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv"
PY_BOOT=${PYTHON:-python3}

stamp=$(cat requirements.txt pyproject.toml tools/setup.sh tools/build_llama_cpp.sh patches/series \
        $(ls patches/*.patch 2>/dev/null) | sha256sum | cut -c1-16)
if [ -f "$VENV/.ripple-setup" ] && [ "$(cat "$VENV/.ripple-setup")" = "$stamp" ] && [ -x "$VENV/bin/ripple-gguf" ]; then
  exit 0
fi

echo "setting up $VENV (first run builds llama-cpp-python: ~10 minutes on 2 cores)" >&2
[ -x "$VENV/bin/python" ] || "$PY_BOOT" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
quiet() { grep -v "is ignored: it is neither" >&2 || true; }
# torch first and pinned: the machine carries a CPU build of 2.13.0; an unpinned torch pulls CUDA wheels
$PIP install --quiet torch==2.13.0 2>&1 | quiet
$PIP install --quiet -r requirements.txt 2>&1 | quiet
"$VENV/bin/python" -c "import torch" >/dev/null

BUILT=$(PYTHON="$VENV/bin/python" tools/build_llama_cpp.sh)
$PIP install --quiet --no-deps --force-reinstall "$BUILT"/*.whl 2>&1 | quiet
$PIP install --quiet --no-deps --force-reinstall "$BUILT/llama.cpp/gguf-py" 2>&1 | quiet
# llama.cpp's converter (pinned with the wheel); ripple_gguf/hf_convert.py drives it in-process
rm -rf "$VENV/share/ripple-gguf/llama.cpp"; mkdir -p "$VENV/share/ripple-gguf"
cp -r "$BUILT/llama.cpp" "$VENV/share/ripple-gguf/llama.cpp"
rm -rf "$VENV/share/ripple-gguf/llama.cpp/gguf-py"
$PIP install --quiet --no-deps -e . 2>&1 | quiet
echo "$stamp" > "$VENV/.ripple-setup"
