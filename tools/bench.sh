#!/usr/bin/env bash
# Regenerate docs/BENCHMARKS.md: set up .venv, train the two benchmark models once (cached outside
# git, tools/train_bench_models.py), convert each to f16 GGUF + pack (cached in build/bench, redone
# when the model or the converter changes), then run every bench mode on both in one invocation.
# Extra arguments go to `ripple-gguf bench report` (e.g. --no-e2e, --gen-tokens 32).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/tools/setup.sh"
cd "$ROOT"
mapfile -t MODELS < <(.venv/bin/python tools/train_bench_models.py)
mkdir -p build/bench
# what a conversion depends on (a change here reconverts; runtime and bench code do not)
CONVERTER="convert hf_convert calib profile placement llama_capture gguf_io gguf_header index_keys make_pack predictor pack"
GGUFS=()
for m in "${MODELS[@]}"; do
  name=$(basename "$m")
  out=build/bench/$name.gguf
  key=$(cat "$m/STAMP" $(printf 'ripple_gguf/%s.py ' $CONVERTER) | sha256sum | cut -c1-16)
  if [ ! -f "$out" ] || [ ! -f "$out.stamp" ] || [ "$(cat "$out.stamp")" != "$key" ]; then
    .venv/bin/ripple-gguf convert "$m" -o "$out" --outtype f16 --calib models/text/calib.txt
    echo "$key" > "$out.stamp"
  fi
  GGUFS+=("$out")
done
.venv/bin/ripple-gguf bench report "${GGUFS[@]}" --text models/text/heldout.txt --out docs/BENCHMARKS.md "$@"
