"""Warm speed, everything in memory: prompt and decode tokens/s of llama.cpp's stock path against the
pack path with the whole FFN cached, on one converted GGUF (the README's "Speed, everything cached").

    .venv/bin/python tools/bench_warm.py build/bench/SmolLM2-135M-Instruct.Q4_1-ripple.gguf

Per round: stock (RippleLlama dense=True); every neuron streamed from the GGUF's own FFN tensors, all
held in memory (what a dense operating point runs); the pack path computing every neuron without the
predictor; every neuron with the predictor and selection on
(thresholds out of reach, floor 1); and the sparsest operating point the pack stores. Each figure is the best of `--repeats` timings in its process;
rounds alternate so that this shared machine's noise hits every mode alike: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ripple_gguf.bench.scale import force_density  # noqa: E402
from ripple_gguf.memory_budget import stream_layout  # noqa: E402
from ripple_gguf.runtime import RippleLlama, verified_pack  # noqa: E402

TEXT = Path(__file__).resolve().parents[1] / "models" / "text" / "heldout.txt"


def measure(llm, prompt: list[int], decode: int, repeats: int) -> dict:
    pp = dec = float("inf")
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pp = min(pp, time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(decode):
            llm.eval([prompt[i % len(prompt)]])
        dec = min(dec, time.perf_counter() - t)
    return {"prompt_tok_s": len(prompt) / pp, "decode_tok_s": decode / dec}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--prompt-tokens", type=int, default=447)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    pk = verified_pack(a.gguf)
    sparsest = min(range(len(pk.op_density)), key=lambda i: pk.op_density[i])
    common = dict(n_ctx=a.prompt_tokens + a.decode + 16, n_batch=512, n_threads=a.threads, verbose=False)
    rounds = []
    for _ in range(a.rounds):
        r = {}
        llm = RippleLlama(a.gguf, dense=True, **common)
        prompt = llm.tokenize(TEXT.read_text().encode())[:a.prompt_tokens]
        r["stock"] = measure(llm, prompt, a.decode, a.repeats)
        llm.close()
        llm = RippleLlama(a.gguf, pack=pk, stream_dense=True, cache_size=stream_layout(a.gguf)[0],
                          resident_weights=True, **common)
        r["every neuron, streamed (a dense point: the GGUF's own FFN, all in memory)"] = measure(
            llm, prompt, a.decode, a.repeats)
        llm.close()
        cached = dict(pack=pk, cache_size=pk.every_slot_bytes, stock_when_dense=False, resident_weights=True)
        llm = RippleLlama(a.gguf, all_active=True, **cached, **common)
        r["every neuron from the pack's bundles (no predictor)"] = measure(llm, prompt, a.decode, a.repeats)
        llm.close()
        llm = RippleLlama(a.gguf, **cached, **common)
        force_density(llm, 1.0)
        r["every neuron, predictor and selection on"] = measure(llm, prompt, a.decode, a.repeats)
        llm.ripple_set_point(sparsest)
        r[f"sparsest point (density {pk.op_density[sparsest]:.2f})"] = {
            **measure(llm, prompt, a.decode, a.repeats), "predicted_density": llm.ripple_stats()["predicted_density"]}
        llm.close()
        rounds.append(r)
    if a.json:
        print(json.dumps({"gguf": a.gguf, "rounds": rounds}, indent=1))
        return 0
    print(f"{Path(a.gguf).name}: {len(prompt)}-token prompt, {a.decode} one-token decodes, {a.threads} threads, "
          f"best of {a.repeats}, {a.rounds} rounds")
    for mode in rounds[0]:
        cells = []
        for r in rounds:
            m, s = r[mode], r["stock"]
            cells.append(f"prompt {m['prompt_tok_s']:.0f} ({m['prompt_tok_s'] / s['prompt_tok_s']:.2f}x), "
                         f"decode {m['decode_tok_s']:.1f} ({m['decode_tok_s'] / s['decode_tok_s']:.2f}x)")
        print(f"  {mode}: " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
