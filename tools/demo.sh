#!/usr/bin/env bash
# The README's main job: set up .venv, convert the bundled default model with co-activation
# placement, show its index and reads/token on held-out text, generate with plain llama_cpp.Llama
# (the stock path), then generate sparsely from the offload pack under a memory budget.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/tools/setup.sh"
cd "$ROOT"
MODEL=${1:-models/tiny-llama-swiglu}
OUT=out/$(basename "$MODEL").gguf
mkdir -p out
.venv/bin/ripple-gguf convert "$MODEL" -o "$OUT" --calib models/text/calib.txt
.venv/bin/ripple-gguf inspect "$OUT" --text models/text/heldout.txt
.venv/bin/python - "$OUT" <<'PY'
import sys
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=512, verbose=False)
prompt = "def read_config(path):\n    "
out = llm(prompt, max_tokens=64, temperature=0.0)["choices"][0]["text"]
print(f"\nplain llama_cpp.Llama (stock dense path), greedy continuation of {prompt!r}:\n{prompt}{out}")
PY
echo; echo "sparse from the offload pack (RippleLlama), FFN cache budget 512KiB:"
.venv/bin/ripple-gguf run "$OUT" -p "def read_config(path):" -n 48 --cache-size 512KiB
