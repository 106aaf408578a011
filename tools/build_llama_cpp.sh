#!/usr/bin/env bash
# Build (or reuse) the llama-cpp-python wheel with our patch series applied, and unpack the pinned
# llama.cpp converter (convert_hf_to_gguf.py, conversion/, gguf-py) next to it.
# Prints the cache directory holding `*.whl` and `llama.cpp/`. Building from source takes ~9 min on
# 2 cores, so the result is cached under a key of everything it is built from.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VERSION=0.3.36
PY=${PYTHON:-python3}
CACHE=${RIPPLE_CACHE:-$HOME/.cache/ripple-gguf}
# AMX off: ggml's AMX mul_mat segfaults on Q8_0/Q4_0 models here (llama.cpp issue #20824, open);
# GCC honours an explicit -mno-* over -march=native whatever the order.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"

# Key: version, patches, build flags, this script, python ABI and the CPU (GGML_NATIVE).
key=$( {
  echo "$VERSION $CMAKE_FLAGS"
  $PY -c 'import sys,platform; print(sys.version_info[:2], platform.machine())'
  grep -m1 '^flags' /proc/cpuinfo || true
  cat "$0" "$ROOT/patches/series"
  for p in $(grep -v '^#' "$ROOT/patches/series" | sed '/^\s*$/d'); do cat "$ROOT/patches/$p"; done
} | sha256sum | cut -c1-16)
OUT="$CACHE/llama-cpp-python-$VERSION-$key"
if ls "$OUT"/*.whl >/dev/null 2>&1 && [ -f "$OUT/llama.cpp/convert_hf_to_gguf.py" ]; then
  echo "$OUT"; exit 0
fi

echo "building patched llama-cpp-python $VERSION (key $key); takes ~9 minutes on 2 cores" >&2
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
SDIST_CACHE="$CACHE/sdist"; mkdir -p "$SDIST_CACHE"
if [ ! -f "$SDIST_CACHE/llama_cpp_python-$VERSION.tar.gz" ]; then
  # download into the work dir and rename, so an interrupted download never poisons the cache
  $PY -m pip download --quiet --no-deps --no-binary :all: -d "$WORK/sdist" "llama-cpp-python==$VERSION" 2>&1 \
    | grep -v "is ignored: it is neither" >&2 || true
  [ -f "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" ] || { echo "error: could not download llama-cpp-python==$VERSION (sdist); check network access to PyPI" >&2; exit 1; }
  mv "$WORK/sdist/llama_cpp_python-$VERSION.tar.gz" "$SDIST_CACHE/"
fi
tar xzf "$SDIST_CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION"
for p in $(grep -v '^#' "$ROOT/patches/series" | sed '/^\s*$/d'); do
  echo "applying patches/$p" >&2
  patch -d "$SRC/vendor/llama.cpp" -p1 --forward --batch < "$ROOT/patches/$p" >&2
done
mkdir -p "$WORK/out"
CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  $PY -m pip wheel --no-deps -w "$WORK/out" "$SRC" >&2
mkdir -p "$WORK/out/llama.cpp"
cp -r "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$SRC/vendor/llama.cpp/conversion" \
      "$SRC/vendor/llama.cpp/gguf-py" "$WORK/out/llama.cpp/"
rm -rf "$OUT"; mkdir -p "$CACHE"; mv "$WORK/out" "$OUT"
echo "$OUT"
