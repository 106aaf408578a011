#!/usr/bin/env bash
# The README's test command: set up .venv (first run builds llama-cpp-python, ~10 min) and run
# every test, slow ones included. Extra arguments go to pytest (e.g. -m "not slow", -k convert).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
"$ROOT/tools/setup.sh"
cd "$ROOT"
exec .venv/bin/python -m pytest -m "slow or not slow" "$@"
