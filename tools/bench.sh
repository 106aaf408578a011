#!/usr/bin/env bash
# Regenerate docs/BENCHMARKS.md on real models first: SmolLM2-135M-Instruct as shipped on PyPI (Q4_1)
# and llama.cpp's Q4_K_M mix of it (tools/fetch_smollm2.py), each converted straight from its GGUF with
# default settings; then the self-trained ReLU² bench model (tools/train_bench_models.py, cached
# outside git) as the ReLU-family example. Conversions are cached in build/bench and redone when the
# source or the converter changes; then every bench mode runs on all three in one invocation.
# Extra arguments go to `ripple-gguf bench report` (e.g. --no-e2e, --gen-tokens 32).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/tools/setup.sh"
cd "$ROOT"
mapfile -t SMOL < <(.venv/bin/python tools/fetch_smollm2.py --variants)  # Q4_1, Q4_K_M, Q8_0
# training (first run only) logs to stdout too: the model's directory is the last line
RELU=$(.venv/bin/python tools/train_bench_models.py bench-arcee-relu2 | tail -n 1)
mkdir -p build/bench
# what a conversion depends on (a change here reconverts; runtime and bench code do not)
CONVERTER="convert hf_convert calib profile placement llama_capture gguf_io gguf_header index_keys make_pack predictor pack quality"
convert_cached() {  # SRC OUT STAMPFILE [convert args...]
  local src=$1 out=$2 stampfile=$3; shift 3
  local key
  key=$(cat "$stampfile" $(printf 'ripple_gguf/%s.py ' $CONVERTER) | sha256sum | cut -c1-16)
  if [ ! -f "$out" ] || [ ! -f "$out.stamp" ] || [ "$(cat "$out.stamp")" != "$key" ]; then
    .venv/bin/ripple-gguf convert "$src" -o "$out" "$@" >&2
    echo "$key" > "$out.stamp"
  fi
}
GGUFS=()
for src in "${SMOL[0]}" "${SMOL[1]}"; do
  out=build/bench/$(basename "$src" .gguf)-ripple.gguf
  convert_cached "$src" "$out" "$src"
  GGUFS+=("$out")
done
out=build/bench/$(basename "$RELU").gguf
convert_cached "$RELU" "$out" "$RELU/STAMP" --outtype f16 --calib models/text/calib.txt
GGUFS+=("$out")
.venv/bin/ripple-gguf bench report "${GGUFS[@]}" --text models/text/heldout.txt --calib models/text/calib.txt --out docs/BENCHMARKS.md "$@"
