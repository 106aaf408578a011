"""Time and memory of co-activation placement for one real-size layer (n_ff = 14336, Llama-3-8B /
Mistral-7B), on synthetic activity with a hot set and co-active clusters. Prints one JSON line.
(tools/bench_convert_stages.py compares placement and predictor training with a former revision.)

    .venv/bin/python tools/bench_placement.py [--n-ff 14336] [--tokens 8192]
"""
import argparse
import json
import resource
import time

from ripple_gguf.bench.scale import synthetic_activity  # the same activity `bench scale` places
from ripple_gguf.placement import coactivation_order, frequency_order, runs_per_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-ff", type=int, default=14336)
    ap.add_argument("--tokens", type=int, default=8192)
    args = ap.parse_args()
    active = synthetic_activity(args.n_ff, args.tokens)
    t, c = time.perf_counter(), time.process_time()
    order = coactivation_order(active)
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({
        "n_ff": args.n_ff, "tokens": args.tokens, "density": round(float(active.mean()), 4),
        "seconds_per_layer": round(secs, 1), "cpu_seconds_per_layer": round(cpu, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "reads_per_token": {"coactivation": round(float(runs_per_token(active[:, order]).mean()), 1),
                            "frequency": round(float(runs_per_token(active[:, frequency_order(active)]).mean()), 1),
                            "identity": round(float(runs_per_token(active).mean()), 1)},
    }))


if __name__ == "__main__":
    main()
