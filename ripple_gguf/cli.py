"""`ripple-gguf` command line: argument parsing only; the work lives in the stage modules."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import RippleError


def _cmd_convert(args) -> dict:
    from .convert import ConvertOptions, convert
    opts = ConvertOptions(outtype=args.outtype, calib=args.calib or [], placement=args.placement,
                          calib_tokens=args.calib_tokens, target_density=args.target_density,
                          n_ctx=args.ctx, seed=args.seed)
    summary = convert(args.src, args.output, opts, log=lambda m: print(m, file=sys.stderr))
    if not args.json:
        rp = summary["reads_per_token"]
        print(f"wrote {summary['output']} ({summary['bytes'] / 2**20:.1f} MiB, {summary['outtype']}, "
              f"{summary['placement']} placement) in {summary['seconds']} s")
        print(f"reads/token on {summary['heldout_tokens']} held-out tokens: {rp['stored']:.1f} stored order, "
              f"{rp['identity']:.1f} identity, {rp['frequency']:.1f} frequency "
              f"({summary['active_per_token']:.1f} active neurons/token)")
    return summary


def _cmd_inspect(args) -> dict:
    from .inspect_gguf import format_report, inspect
    info = inspect(args.gguf, args.text)
    if not args.json:
        print(format_report(info))
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ripple-gguf", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="HF checkpoint -> GGUF with co-activation neuron placement")
    c.add_argument("src", help="local HF checkpoint directory or hub repo id (org/name)")
    c.add_argument("-o", "--output", required=True, help="output .gguf path")
    c.add_argument("--outtype", default="f16", help="f32 | f16 | q8_0 | q4_0 (default f16)")
    c.add_argument("--calib", action="append", metavar="FILE",
                   help="calibration text (repeatable); default: text the model generates itself")
    c.add_argument("--placement", default="coactivation", help="coactivation | frequency | identity")
    c.add_argument("--calib-tokens", type=int, default=32768, help="max calibration tokens (default 32768)")
    c.add_argument("--target-density", type=float, default=0.3,
                   help="SwiGLU-style FFNs: share of neurons counted active (default 0.3)")
    c.add_argument("--ctx", type=int, default=512, help="tokens per calibration sequence (default 512)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="describe a converted GGUF and its reads per token")
    i.add_argument("gguf")
    i.add_argument("--text", action="append", metavar="FILE",
                   help="also measure reads/token on this text through llama.cpp (repeatable)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except RippleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output file was written", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower --calib-tokens or close other programs", file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        json.dump(result, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
