"""`ripple-gguf` command line: argument parsing only; the work lives in the stage modules."""
from __future__ import annotations

import argparse
import json
import re
import sys

from .errors import RippleError

DEFAULT_BUDGET = 0.02  # quality.DEFAULT_BUDGET (not imported: the CLI starts without numpy)


def parse_budget(text: str) -> float:
    from .quality import parse_budget as parse
    try:
        return parse(text)
    except RippleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def log_line(message: str) -> None:
    """One progress line on stderr in a single write: print() writes the text and the newline apart,
    and a Ctrl-C between the two glued `error: interrupted` onto the end of the log line."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def _cmd_convert(args) -> dict:
    from .convert import ConvertOptions, convert
    opts = ConvertOptions(outtype=args.outtype, down_type=args.down_type, calib=args.calib or [],
                          placement=args.placement, calib_tokens=args.calib_tokens,
                          target_density=args.target_density, n_ctx=args.ctx, seed=args.seed,
                          pack=not args.no_pack, max_ppl_increase=args.max_ppl_increase)
    summary = convert(args.src, args.output, opts, log=log_line, file=args.file)
    if not args.json:
        rp = summary["reads_per_token"]
        size = f"{summary['bytes'] / 2**20:.1f} MiB"
        if summary["source_bytes"]:
            size += f", {100 * summary['bytes'] / summary['source_bytes']:.1f}% of the source"
        print(f"wrote {summary['output']} ({size}, {summary['outtype']}, "
              f"{summary['placement']} placement) in {summary['seconds']} s")
        print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["stages"].items()))
        print(f"reads/token on {summary['heldout_tokens']} held-out tokens: {rp['stored']:.1f} pack order, "
              f"{rp['identity']:.1f} identity, {rp['frequency']:.1f} frequency "
              f"({summary['active_per_token']:.1f} active neurons/token)")
        if summary["pack"]:
            _print_pack_summary(summary["pack"])
    return summary


def _print_pack_summary(p: dict) -> None:
    print(f"wrote {p['pack']} ({p['bytes'] / 2**20:.1f} MiB, {100 * p['bytes'] / p['gguf_bytes']:.0f}% of the GGUF; "
          f"predictors {p['predictor_bytes'] / 2**10:.0f} KiB = {100 * p['predictor_bytes'] / p['ffn_bytes']:.1f}% of FFN bytes)")
    pl = p["per_layer"]
    print(f"predictor on {p['eval_tokens']} validation tokens: mass recall {min(pl['mass_recall']):.3f}-{max(pl['mass_recall']):.3f}, "
          f"predicted density {sum(pl['pred_density']) / len(pl['pred_density']):.3f} vs true {sum(pl['true_density']) / len(pl['true_density']):.3f}")
    print("operating points (calibration text; `run --quality PCT` picks one at load time):")
    for i, op in enumerate(p["operating_points"]):
        mark = "  <- default" if i == p["default_point"] else ""
        share = f"  pack reads {100 * op['read_share']:.0f}% of the FFN bytes" if op['density'] < 1 else ""
        print(f"  density {op['density']:.3f}  perplexity {100 * op['ppl_increase']:+.2f}%{share}{mark}")


def _cmd_pack(args) -> dict:
    from .make_pack import PackOptions, build_pack
    opts = PackOptions(calib=args.calib or [], calib_tokens=args.calib_tokens, max_ppl_increase=args.max_ppl_increase,
                       rank=args.rank, n_ctx=args.ctx, seed=args.seed)
    summary = build_pack(args.gguf, opts, log=log_line)
    if not args.json:
        _print_pack_summary(summary)
    return summary


def _cmd_inspect(args) -> dict:
    from .inspect_gguf import format_report, inspect
    info = inspect(args.gguf, args.text)
    if not args.json:
        print(format_report(info))
    return info


def _cmd_verify(args) -> dict:
    from .verify import format_result, verify
    result = verify(args.gguf, args.pack)
    if not args.json:
        print(format_result(result))
    return result


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="ripple-gguf", description=(
        "Run GGUF models that do not fit in memory: convert a GGUF (or a Hugging Face checkpoint) into one that "
        "every GGUF tool still runs unchanged, plus an offload pack of co-activation-ordered FFN neurons and "
        "predictors; then run, chat, evaluate or serve it within a memory budget."),
        epilog="e.g.  ripple-gguf convert model.gguf -o out/model.gguf  &&  ripple-gguf run out/model.gguf -p Hello")
    p.add_argument("--version", action="version", version=f"ripple-gguf {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="GGUF or HF checkpoint -> GGUF with co-activation neuron placement")
    c.add_argument("src", help="a .gguf file (any llama.cpp types, kept), an HF checkpoint directory, a hub "
                               "repo id (org/name), or a hub GGUF: org/name:FILE.gguf or org/name:Q4_K_M")
    c.add_argument("file", nargs="?", help="GGUF file name inside the hub repo SRC (same as SRC:FILE)")
    c.add_argument("-o", "--output", required=True, help="output .gguf path")
    c.add_argument("--outtype", default=None,
                   help="llama.cpp file type: f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 q4_k_m q4_k_s q4_1 "
                        "q4_0 q3_k_l q3_k_m q3_k_s q2_k iq4_nl iq4_xs (default: f16 for a checkpoint; "
                        "a GGUF keeps every tensor's type)")
    c.add_argument("--down-type", default=None,
                   help="write ffn_down in this type (f32 f16 bf16 q8_0 q6_k ...; requantized from the "
                        "source's with the calibration importance matrix); default: every tensor as stored")
    c.add_argument("--calib", action="append", metavar="FILE",
                   help="calibration text (repeatable); default: text the model generates itself")
    c.add_argument("--placement", default="coactivation", help="coactivation | frequency | identity")
    c.add_argument("--calib-tokens", type=int, default=16384,
                   help="max calibration tokens profiled (default 16384, what the predictors train on; each costs a "
                        "llama.cpp forward pass)")
    c.add_argument("--target-density", type=float, default=0.3,
                   help="SwiGLU-style FFNs: share of neurons counted active (default 0.3)")
    c.add_argument("--ctx", type=int, default=512, help="tokens per calibration sequence (default 512)")
    c.add_argument("--seed", type=int, default=0, help="seed of the self-generated calibration text (default 0)")
    c.add_argument("--no-pack", action="store_true", help="do not write the OUT.ripple offload pack")
    c.add_argument("--max-ppl-increase", type=parse_budget, default=DEFAULT_BUDGET, metavar="PCT",
                   help="perplexity the default operating point may add on calibration text, e.g. 2%% (default); "
                        "the pack stores several points, `run --quality` picks another at load time")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.set_defaults(func=_cmd_convert)

    k = sub.add_parser("pack", help="(re)build OUT.ripple (neuron bundles + predictors) for a converted GGUF")
    k.add_argument("gguf", help="a converted .gguf; its pack is written next to it (OUT.ripple)")
    k.add_argument("--calib", action="append", metavar="FILE",
                   help="calibration text (repeatable); default: text the model generates itself")
    k.add_argument("--calib-tokens", type=int, default=16384, help="tokens recorded (default 16384)")
    k.add_argument("--max-ppl-increase", type=parse_budget, default=DEFAULT_BUDGET, metavar="PCT",
                   help="perplexity budget of the default operating point (default 2%%)")
    k.add_argument("--rank", type=int, default=None, help="predictor width (default: within 5%% of FFN bytes)")
    k.add_argument("--ctx", type=int, default=512, help="tokens per calibration sequence (default 512)")
    k.add_argument("--seed", type=int, default=0, help="seed of the self-generated calibration text (default 0)")
    k.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    k.set_defaults(func=_cmd_pack)

    i = sub.add_parser("inspect", help="describe a converted GGUF and its reads per token")
    i.add_argument("gguf", help="a .gguf (converted or not)")
    i.add_argument("--text", action="append", metavar="FILE",
                   help="also measure reads/token on this text through llama.cpp (repeatable)")
    i.add_argument("--json", action="store_true", help="print everything as one JSON object on stdout")
    i.set_defaults(func=_cmd_inspect)

    v = sub.add_parser("verify", help="check a converted GGUF and its pack in full: headers, binding, every checksum")
    v.add_argument("gguf", help="a converted .gguf; its pack is found next to it")
    v.add_argument("--pack", metavar="FILE", help="pack path (default: OUT.ripple next to the GGUF)")
    v.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    v.set_defaults(func=_cmd_verify)
    from .run_cli import register; register(sub)
    from .bench import cli as bench_cli; bench_cli.register(sub)
    return p


def one_line(msg: str) -> str:
    """An error message as one printable line (names read from a damaged file can hold anything)."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(msg.split("\n")))


# options whose value may be negative (a mistake to name, not an option): argparse takes "-1%" for an
# option and says only "expected one argument"; joined as --quality=-1%, the value's own check answers
SIGNED_VALUE_OPTIONS = ("--quality", "--max-ppl-increase")


def _join_signed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    for a in argv:
        if out and out[-1] in SIGNED_VALUE_OPTIONS and re.fullmatch(r"-[0-9.]+%?", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_signed_values(sys.argv[1:] if argv is None else list(argv)))
    if not getattr(args, "command", None):  # no subcommand: what there is to do, not an error
        parser.print_help()
        return 0
    from .interrupt import install
    install()
    try:
        result = args.func(args)
    except RippleError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # an object the interrupt left half-built (e.g. a progress bar interrupted in its constructor)
        # would print "Exception ignored ... Traceback" when collected: noise after a clean abort
        sys.unraisablehook = lambda unraisable: None
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
