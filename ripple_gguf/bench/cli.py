"""`ripple-gguf bench probe | io | e2e | report`: argument parsing and terminal output only."""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ..errors import RippleError


def _fractions(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise RippleError(f"--budgets {text!r}: write fractions of the model size like 1,0.5,0.25") from None
    if not vals or any(not 0 < v <= 4 for v in vals):
        raise RippleError(f"--budgets {text!r}: each fraction must be in (0, 4], e.g. 1,0.5,0.25")
    return vals


def _check_inputs(args) -> None:
    if not os.path.isfile(args.gguf):
        raise RippleError(f"{args.gguf}: no such file; pass a GGUF made by `ripple-gguf convert`")
    if not os.path.isfile(args.text):
        raise RippleError(f"{args.text}: no such file; pass held-out text with --text")


def format_probe(r: dict) -> str:
    lines = [f"bench probe: {r['file_bytes'] >> 20} MiB scratch file, {'O_DIRECT' if r['direct_io'] else 'buffered, cache dropped'}",
             f"{'QD':>3} {'request':>8} {'MB/s':>7} {'us/req':>8} {'p50 us':>8} {'p99 us':>8}"]
    for p in r["points"]:
        lines.append(f"{p['qd']:3d} {p['size'] >> 10:6d} K {p['mb_s']:7.0f} {p['per_request_us']:8.1f} "
                     f"{p['lat_p50_us']:8.1f} {p['lat_p99_us']:8.1f}")
    lines.append("cost model t = t0 + bytes/BW (merge gaps below t0 x BW):")
    for q, f in r["fit"].items():
        lines.append(f"  QD {q:>2}: t0 {f['t0_us']:7.1f} us, BW {f['bw_mbps']:6.0f} MB/s, merge gaps < {f['merge_gap_bytes']} B")
    u = r["ufs40"]
    lines.append(f"  {u['name']}: t0 {u['t0_us']:.1f} us, BW {u['bw_mbps']:.0f} MB/s, merge gaps < {u['merge_gap_bytes']} B")
    return "\n".join(lines)


def cmd_probe(args) -> dict:
    from .. import iocost
    from ..runtime import parse_size
    if args.file:
        if not os.path.isfile(args.file):
            raise RippleError(f"{args.file}: no such file; pass an existing file to probe, or --dir")
        result = iocost.probe(args.file, direct=not args.no_direct, progress=not args.json)
    else:
        d = args.dir or "."
        if not os.path.isdir(d):
            raise RippleError(f"{d}: no such directory; pass --dir on the filesystem to probe")
        path = iocost.make_probe_file(d, parse_size(args.size))
        try:
            result = iocost.probe(path, direct=not args.no_direct, progress=not args.json)
        finally:
            os.unlink(path)
    if not args.json:
        print(format_probe(result))
    return result


def cmd_io(args) -> dict:
    from .io_replay import format_io, run_io
    _check_inputs(args)
    if args.tokens < 8:
        raise RippleError("--tokens must be at least 8")
    result = run_io(args.gguf, args.text, max_tokens=args.tokens, calib=args.calib, density=args.density,
                    io_threads=args.io_threads, direct=not args.no_direct, progress=not args.json)
    if not args.json:
        print(format_io(result))
    return result


def cmd_e2e(args) -> dict:
    _check_inputs(args)
    fractions = _fractions(args.budgets)
    from .e2e import format_e2e, run_e2e
    result = run_e2e(args.gguf, args.text, fractions=fractions, gen_tokens=args.gen_tokens,
                     prompt_tokens=args.prompt_tokens, ctx=args.ctx, ppl_chunks=args.ppl_chunks,
                     timeout_s=args.timeout, threads=args.threads, direct_io=not args.buffered_io,
                     read_ahead=not args.no_read_ahead, progress=not args.json)
    if not args.json:
        print(format_e2e(result))
    return result


def _shape(text: str) -> dict:
    from .scale import LAYER
    try:
        e, f = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise RippleError(f"--shape {text!r}: write it as N_EMBDxN_FF, e.g. 4096x14336") from None
    if e % 256 or f % 256 or e <= 0 or f <= 0:
        raise RippleError(f"--shape {text!r}: n_embd and n_ff must be positive multiples of 256 (K-quant blocks)")
    return {**LAYER, "n_embd": e, "n_ff": f}


def cmd_scale(args) -> dict:
    from .scale import format_scale, run_scale
    types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    result = run_scale(Path(args.work_dir), types=types, layers=args.layers, tokens=args.tokens,
                       threads=args.threads, layer=_shape(args.shape), progress=not args.json)
    if not args.json:
        print(format_scale(result))
    return result


def cmd_report(args) -> dict:
    from .report import write_report
    for g in args.gguf:
        if not os.path.isfile(g):
            raise RippleError(f"{g}: no such file; pass GGUFs made by `ripple-gguf convert` (tools/bench.sh builds them)")
    if not os.path.isfile(args.text):
        raise RippleError(f"{args.text}: no such file; pass held-out text with --text")
    e2e_kw = dict(fractions=_fractions(args.budgets), gen_tokens=args.gen_tokens, prompt_tokens=args.prompt_tokens,
                  ctx=args.ctx, ppl_chunks=args.ppl_chunks, timeout_s=args.timeout, threads=args.threads,
                  direct_io=not args.buffered_io, read_ahead=not args.no_read_ahead)
    command = "ripple-gguf bench report " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if len(sys.argv) > 2 \
        else "ripple-gguf bench report"
    result = write_report(args.gguf, args.text, Path(args.out), command=command, io_tokens=args.tokens,
                          calib=args.calib, io_density=args.density, e2e_kw=e2e_kw, skip_e2e=args.no_e2e,
                          io_threads=args.io_threads, progress=not args.json, curve_chunks=args.curve_chunks,
                          scale_kw=None if args.no_scale else dict(work=Path(args.scale_dir), threads=args.threads))
    if not args.json:
        print(f"wrote {args.out}")
    return result


def register(sub) -> None:
    b = sub.add_parser("bench", help="cold-flash benchmarks: probe the device, replay I/O, end to end, report")
    bs = b.add_subparsers(dest="bench_command", required=True)

    p = bs.add_parser("probe", help="read latency/bandwidth vs request size and queue depth; fit the cost model")
    p.add_argument("--dir", default=None, help="directory on the filesystem to probe (default: current)")
    p.add_argument("--file", default=None, help="probe this existing file instead of a scratch file")
    p.add_argument("--size", default="256MiB", help="scratch file size (default 256MiB)")
    p.add_argument("--no-direct", action="store_true", help="buffered reads (cache dropped) instead of O_DIRECT")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_probe)

    def io_args(q):
        q.add_argument("--tokens", type=int, default=128,
                       help="held-out tokens decoded through the runtime per configuration (default 128)")
        q.add_argument("--io-threads", type=int, default=4, help="the runtime's parallel readers (default 4)")
        q.add_argument("--density", type=float, default=0.5,
                       help="bench io runs the pack's stored operating point nearest this density (default 0.5)")
        q.add_argument("--calib", action="append", metavar="FILE",
                       help="the calibration text a model was converted with (to build its other placements; "
                            "not needed for self-generated calibration)")

    def e2e_args(q):
        q.add_argument("--budgets", default="1,0.75,0.5,0.35,0.25", help="memory budgets as fractions of the GGUF size (default 1,0.75,0.5,0.35,0.25)")
        q.add_argument("--gen-tokens", type=int, default=64, help="greedy tokens decoded per run (default 64)")
        q.add_argument("--prompt-tokens", type=int, default=64, help="prompt tokens (default 64)")
        q.add_argument("--ctx", type=int, default=512, help="context, also the perplexity chunk (default 512)")
        q.add_argument("--ppl-chunks", type=int, default=8, help="perplexity chunks per mode (default 8; 0: skip)")
        q.add_argument("--timeout", type=float, default=600, help="seconds per run before it is cut short")
        q.add_argument("--threads", type=int, default=None, help="compute threads of both modes (default: llama-cpp-python's)")
        q.add_argument("--buffered-io", action="store_true",
                       help="the sparse runtime reads the pack through the page cache (default: O_DIRECT)")
        q.add_argument("--no-read-ahead", action="store_true",
                       help="the sparse runtime reads each layer's misses only when it needs them (default: read ahead)")

    i = bs.add_parser("io", help="held-out tokens through the runtime, cold, in each neuron placement")
    i.add_argument("gguf")
    i.add_argument("--text", required=True, metavar="FILE", help="held-out text (not the calibration text)")
    io_args(i)
    i.add_argument("--no-direct", action="store_true", help="buffered reads (cache dropped) instead of O_DIRECT")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_io)

    e = bs.add_parser("e2e", help="stock llama.cpp vs the sparse runtime in memory-limited cgroups")
    e.add_argument("gguf")
    e.add_argument("--text", required=True, metavar="FILE")
    e2e_args(e)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_e2e)

    sc = bs.add_parser("scale", help="the runtime at Llama-3-8B layer size (random weights) and projected 8B/70B tokens/s")
    sc.add_argument("--work-dir", default="build/bench/scale", help="where the converted scale models are kept (default build/bench/scale)")
    sc.add_argument("--types", default="f16,q8_0,q4_k_m", help="weight types (default f16,q8_0,q4_k_m)")
    sc.add_argument("--shape", default="4096x14336", help="n_embd x n_ff of each layer (default 4096x14336: Llama-3-8B)")
    sc.add_argument("--layers", type=int, default=2, help="8B-shaped layers in the model (default 2)")
    sc.add_argument("--tokens", type=int, default=16, help="decoded tokens per point (default 16)")
    sc.add_argument("--threads", type=int, default=None, help="compute threads (default: the CPUs, up to 8)")
    sc.add_argument("--json", action="store_true")
    sc.set_defaults(func=cmd_scale)

    r = bs.add_parser("report", help="run probe, io and e2e on the models and write docs/BENCHMARKS.md")
    r.add_argument("gguf", nargs="+", help="converted GGUFs (each with its pack)")
    r.add_argument("--text", required=True, metavar="FILE")
    r.add_argument("--out", default="docs/BENCHMARKS.md")
    r.add_argument("--no-e2e", action="store_true", help="skip the end-to-end runs")
    r.add_argument("--no-scale", action="store_true", help="skip `bench scale` (the 8B-layer-size section)")
    r.add_argument("--scale-dir", default="build/bench/scale", help="where `bench scale` keeps its models")
    r.add_argument("--curve-chunks", type=int, default=4,
                   help="512-token chunks of --text for the density vs perplexity curve (default 4; 0: skip)")
    io_args(r)
    e2e_args(r)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)
