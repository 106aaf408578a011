"""`ripple-gguf run | chat | eval | serve`: generation through the sparse flash-offload runtime.

Every command loads the GGUF with `RippleLlama` (the pack `OUT.ripple` next to it) or, with
`--dense`, on llama.cpp's stock path, so the two can be compared on the same file.
"""
from __future__ import annotations

import json
import os
import sys
import time

from .errors import RippleError
from .memory_budget import STREAM_PREFILL_TOKENS, gguf_ffn_split
from .perplexity import perplexity
from .quality import STOCK_PATH_DENSITY, STREAM_READ_SHARE
from .process_stats import peak_rss, phase, reset_peak_rss

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- loading -------------------------------------------------------------------------------------

def _add_either_or(p, dest: str, on: tuple[str, str], off: tuple[str, str]) -> None:
    """Two exclusive flags setting `dest` to True / False; None (the runtime decides) when neither is given."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(on[0], dest=dest, action="store_const", const=True, default=None, help=on[1])
    g.add_argument(off[0], dest=dest, action="store_const", const=False, help=off[1])


def _runtime_defaults() -> dict:
    """The library's parameter defaults for --help; {} where llama-cpp-python or the patched library
    cannot be loaded (every command's parser is built at start: `convert` must not need it)."""
    try:
        from .runtime import runtime_param_defaults
        return runtime_param_defaults()
    except (ImportError, OSError):
        return {}


# where every neuron runs instead of the pack (quality.every_neuron_pays), for --help (argparse's %%)
EVERY_NEURON_WHERE = (f"a point computing >= {STOCK_PATH_DENSITY:.0%} of the neurons, or where the pack would read "
                      f">= {STREAM_READ_SHARE:.0%} of the FFN's bytes anyway").replace("%", "%%")


def _add_runtime_args(p, generation: bool = True) -> None:
    p.add_argument("gguf", help="converted .gguf (its OUT.ripple pack is found next to it)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--memory-budget", metavar="SIZE",
                   help="everything the process may use, e.g. 1GiB (default: what this machine or its memory cgroup "
                        "has available); the FFN cache gets what is left after non-FFN weights, KV cache, compute "
                        "buffers and 10%% headroom, at most the whole FFN (`run --verbose` prints the split). At "
                        f"{EVERY_NEURON_WHERE} (`inspect` shows it per point) every neuron is computed from the GGUF's "
                        "own FFN tensors: the layers that fit held in memory, the rest streamed; elsewhere from the pack. "
                        "Without it, where the model fits, llama.cpp's stock path runs at such a point. Where the "
                        "non-FFN weights and the cache do not fit (given or not), the minimum cache, as many non-FFN "
                        "weights held as fit (the rest mapped, read a layer ahead) and llama.cpp batches of 64 tokens "
                        "(a smaller compute buffer); where not even the unreclaimable part fits, without it the stock "
                        "path (its mapped weights are reclaimable: slower, never killed for memory), with it an error")
    m.add_argument("--cache-size", metavar="SIZE",
                   help="the FFN cache alone, e.g. 256MiB (instead of a memory budget; keeps the runtime)")
    m.add_argument("--cache-ratio", type=float, metavar="R", help="neuron cache as a share of the FFN bytes, e.g. 0.25")
    _add_either_or(p, "resident_weights",
                   ("--resident-weights", "hold all the non-FFN weights in memory even where they do not seem to fit "
                    "(default: all where they fit next to the neuron cache, else as many as fit, the largest first; "
                    "mapped, page-cache pressure re-reads them every token)"),
                   ("--map-weights", "keep the non-FFN weights mapped from the GGUF, as stock llama.cpp does"))
    p.add_argument("--dense", action="store_true", help="run the same GGUF on llama.cpp's stock dense path")
    p.add_argument("--allow-dense-fallback", action="store_true",
                   help="if the pack is missing or unusable, warn and run dense instead of failing")
    p.add_argument("--pack", metavar="FILE", help="pack path (default: OUT.ripple next to the GGUF)")
    p.add_argument("--ctx", type=int, default=None, help="context size (default: 2048, or the model's if smaller; 512 where the model does not fit in memory)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: llama-cpp-python's)")
    lib = _runtime_defaults()  # the runtime's own defaults (include/llama-ripple.h), where it loads
    default = lambda name, fmt="{}": f"default {fmt.format(lib[name])}" if name in lib else "default: the runtime's"
    p.add_argument("--io-threads", type=int, default=None, help=f"parallel pread workers ({default('io_threads')})")
    _add_either_or(p, "direct_io",
                   ("--direct-io", "read the pack with O_DIRECT, bypassing the page cache (default: where the model "
                    "does not fit in the memory available; buffered reads would keep a second copy of the cache there)"),
                   ("--buffered-io", "read the pack through the page cache even where the model does not fit"))
    p.add_argument("--all-active", action="store_true", help="debug: predictor off, every neuron computed")
    p.add_argument("--keep-pack", action="store_true",
                   help="run the operating point on the pack's bundles with its predictors even where every neuron "
                        f"runs by default ({EVERY_NEURON_WHERE}: streamed or llama.cpp's stock path, as fast or "
                        "faster, exact): to measure the point itself, e.g. `eval --quality 5%% --keep-pack`")
    p.add_argument("--pin-percent", type=int, default=None,
                   help=f"share of the cache pinned to hot neurons ({default('pin_percent')}; 100 where every neuron "
                        "is computed)")
    p.add_argument("--cold-cache", action="store_true",
                   help="start with only the pinned neurons cached (default: fill the rest with the next hottest at load)")
    p.add_argument("--no-read-ahead", action="store_true",
                   help="read a layer's missing neurons only when it needs them (default: while a layer computes, "
                        "read what the next layer needed for the previous token and the cache lacks)")
    p.add_argument("--stream-prefill", type=int, default=None, metavar="TOKENS",
                   help="at a sparse point, prompt batches of at least this many tokens compute the dense FFN from "
                        "the GGUF's own tensors, each layer read whole (default %d; 0: every batch sparse)"
                        % STREAM_PREFILL_TOKENS)
    p.add_argument("--t0-us", type=float, default=None, help="cost model: per-read latency in us (default: probed)")
    p.add_argument("--bw-mbps", type=float, default=None, help="cost model: bandwidth in MB/s (default: probed)")
    p.add_argument("--merge-gap", type=int, default=None, metavar="BYTES",
                   help="merge gaps up to this many bytes into one read (default: t0 x bandwidth)")
    p.add_argument("--quality", metavar="PCT", default=None,
                   help="operating point: the sparsest one the pack stores within this perplexity increase on "
                        "calibration text, e.g. 1%% (a bare 1 is 1%% too; 0%% = every neuron); default: the pack's "
                        "(chosen at convert)")
    p.add_argument("--threshold-offset", type=float, default=None, metavar="LOGIT",
                   help=f"added to the pack's predictor thresholds: < 0 computes more neurons ({default('threshold_offset', '{:g}')})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    if generation:
        p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (default 0: greedy)")


def _ripple_kwargs(args) -> dict:
    return dict(pack_path=args.pack, memory_budget=args.memory_budget, cache_size=args.cache_size,
                cache_ratio=args.cache_ratio,
                dense=args.dense, dense_fallback=args.allow_dense_fallback, all_active=args.all_active,
                io_threads=args.io_threads, direct_io=args.direct_io, pin_percent=args.pin_percent,
                t0_us=args.t0_us, bw_mbps=args.bw_mbps, merge_gap_bytes=args.merge_gap,
                threshold_offset=args.threshold_offset, warm_cache=False if args.cold_cache else None,
                read_ahead=False if args.no_read_ahead else None, quality=args.quality, stream_prefill=args.stream_prefill,
                stock_when_dense=not (args.keep_pack or getattr(args, "curve", False)),  # the curve moves along every point
                resident_weights=args.resident_weights)


TIGHT_CTX = 512  # the default context where the model does not fit in memory


def _n_ctx(args, default: int = 2048, needs: int = 0) -> int:
    """--ctx, else `default` (or the model's own context if smaller). Where the model does not fit in
    the memory available (or in --memory-budget), the default is TIGHT_CTX tokens, or `needs` (what the
    command is known to use) if more: the KV cache is zeroed, so unreclaimable, at load (SmolLM2 at
    2048 tokens: 45 MiB, 4x its size at 512), and in a memory cgroup a little smaller than the model it
    was what OOM-killed `run`'s default settings. args.ctx_note says so."""
    args.ctx_note = None
    if args.ctx is not None:
        if args.ctx < 8:
            raise RippleError("--ctx must be at least 8")
        return args.ctx
    from .gguf_io import kv, open_header
    r = open_header(args.gguf)
    arch = kv(r, "general.architecture")
    train = kv(r, f"{arch}.context_length")
    ctx = min(default, int(train)) if train else default
    tight = max(TIGHT_CTX, -(-needs // 256) * 256)
    if ctx > tight and not _fits_in_memory(args, ctx):
        args.ctx_note = (f"context: {tight} tokens, not {ctx}: the model does not fit in the memory available "
                         "(pass --ctx to set it)")
        return tight
    return ctx


def _fits_in_memory(args, n_ctx: int) -> bool:
    """memory_budget.model_fits for the command's budget (True where --cache-size/--cache-ratio sized
    the cache alone)."""
    from .memory_budget import model_fits
    from .runtime import parse_size
    if getattr(args, "cache_size", None) is not None or getattr(args, "cache_ratio", None) is not None:
        return True
    budget = getattr(args, "memory_budget", None)
    # with room to spare: the load's own check (whole_model_fits) comes later, with a few MiB more in use,
    # and a longer context it then finds too big runs on the runtime with every compute buffer sized for
    # it (a 0.5B-shaped Q8_0 in 577 MiB: a 2048 context there ran 6-7.6 tok/s; 512 on the stock path, 48.8)
    return model_fits(args.gguf, n_ctx, None if budget is None else parse_size(budget), own_twice=True)


def _warn_budget_above_available(text: str) -> None:
    """A --memory-budget larger than the memory there is splits memory that does not exist: say so."""
    from .cgroup import available_memory
    from .runtime import parse_size
    total = parse_size(text)
    avail, source = available_memory()
    if avail is not None and total > avail:
        print(f"warning: --memory-budget {text} is more than the {avail / 2**20:.0f} MiB available ({source}): "
              "the split assumes memory this machine does not have", file=sys.stderr)


def prepare(args) -> dict:
    """Everything checked before the model loads: the file, the context size and (unless --dense)
    the pack verified against the GGUF. Done before the peak-RSS window opens: verification parses
    both files' headers, a transient cost reported separately as verify_peak_rss_bytes."""
    if not os.path.isfile(args.gguf):
        raise RippleError(f"{args.gguf}: no such file; pass a converted .gguf")
    if args.threads is not None and args.threads < 1:
        raise RippleError(f"--threads {args.threads}: pass 1 or more (or leave it out for llama-cpp-python's default)")
    if getattr(args, "chunks", None) is not None and args.chunks < 1:
        raise RippleError(f"--chunks {args.chunks}: pass 1 or more (or leave it out to score the whole text)")
    if getattr(args, "memory_budget", None) and not args.dense:
        _warn_budget_above_available(args.memory_budget)
    from .runtime import verified_pack
    reset_peak_rss()
    # `run` needs its prompt's tokens (at most one per byte, plus special ones) and -n
    needs = len(args.prompt.encode()) + 16 + args.n if getattr(args, "prompt", None) is not None else 0
    prep = {"n_ctx": _n_ctx(args, needs=needs), "pack": None}
    if not args.dense:
        try:
            prep["pack"] = verified_pack(args.gguf, args.pack)
        except RippleError:
            if not args.allow_dense_fallback:
                raise  # with the fallback, RippleLlama repeats the check and warns
    prep["verify_peak_rss_bytes"] = peak_rss()
    return prep


def load(args, prep: dict, **llama_kwargs):
    """RippleLlama for the command's arguments; llama.cpp's own log is silenced unless --verbose."""
    from .runtime import RippleLlama
    kw = dict(n_ctx=prep["n_ctx"], seed=args.seed, verbose=args.verbose)
    if args.threads:
        kw.update(n_threads=args.threads, n_threads_batch=args.threads)
    kw.update(llama_kwargs)
    return RippleLlama(args.gguf, pack=prep["pack"], **_ripple_kwargs(args), **kw)


def _memory(args, llm, prep: dict, rss_before: int) -> dict:
    peak = peak_rss()  # before gguf_ffn_split parses the GGUF again
    ffn, other = gguf_ffn_split(args.gguf)
    st = llm.ripple_stats()
    return {"peak_rss_bytes": peak, "rss_before_load_bytes": rss_before, "gguf_ffn_bytes": ffn,
            "gguf_non_ffn_bytes": other, "cache_bytes": st.get("cache_bytes"),
            "runtime_overhead_bytes": st.get("overhead_bytes"),
            "verify_peak_rss_bytes": prep["verify_peak_rss_bytes"], "budget_split": getattr(llm, "ripple_budget_split", None)}


# --- commands ------------------------------------------------------------------------------------

def cmd_run(args) -> dict:
    if args.n < 1:
        raise RippleError("-n must be at least 1")
    prep = prepare(args)
    rss_before = reset_peak_rss()
    llm = load(args, prep)
    prompt = llm.tokenize(args.prompt.encode(), add_bos=True, special=True)
    if not prompt:  # (a model without a BOS token and an empty -p: llama.cpp has nothing to continue)
        raise RippleError("the prompt is empty and this model adds no start token; pass some text with -p")
    if len(prompt) + args.n > llm.n_ctx():
        raise RippleError(f"prompt ({len(prompt)} tokens) + -n {args.n} exceeds the context of {llm.n_ctx()}; "
                          "raise --ctx or lower -n")
    ids: list[int] = []
    s0 = llm.ripple_stats()
    t0 = time.perf_counter()
    t_first = s_first = None
    import llama_cpp
    vocab = getattr(llm._model, "vocab", None)
    eog = (lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))) if vocab else (lambda t: t == llm.token_eos())
    for tok in llm.generate(prompt, temp=args.temp, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
        if t_first is None:
            t_first, s_first = time.perf_counter(), llm.ripple_stats()
        if eog(tok):
            break
        ids.append(int(tok))
        if not args.json:
            sys.stdout.write(llm.detokenize([tok], prev_tokens=prompt + ids[:-1]).decode(errors="replace"))
            sys.stdout.flush()
        if len(ids) >= args.n:
            break
    t_end = time.perf_counter()
    s_end = llm.ripple_stats()
    llm.check_ripple()
    t_first = t_first or t_end
    s_first = s_first or s_end
    text = llm.detokenize(ids, prev_tokens=prompt).decode(errors="replace")
    result = {
        "text": text, "prompt_tokens": prompt, "tokens": ids, "mode": s_end.get("mode"),
        "prompt": phase(s_first, s0, len(prompt), t_first - t0),
        "generation": phase(s_end, s_first, max(len(ids) - 1, 0), t_end - t_first),
        "memory": _memory(args, llm, prep, rss_before), "operating_point": llm.ripple_point,
        "n_ctx": llm.n_ctx(), "ctx_note": args.ctx_note,
        "ripple": s_end,
    }
    g = result["generation"]
    if not args.json:
        print()
        line = f"{len(ids)} tokens, {g['tokens_per_s'] or 0:.1f} tokens/s ({result['mode']})"
        if result["mode"] == "sparse":
            line += (f"; per token: {g['reads_per_token']:.1f} reads, {g['bytes_per_token'] / 1024:.1f} KiB; "
                     f"cache hit rate {100 * (g['cache_hit_rate'] or 0):.1f}%, predicted density "
                     f"{100 * (g['predicted_density'] or 0):.1f}%")
        # (RSS counts the mapped model and shared libraries, page cache a memory limit may charge elsewhere)
        line += f"; peak RSS {result['memory']['peak_rss_bytes'] / 2**20:.1f} MiB (mapped files included)"
        print(line, file=sys.stderr)
        print_mode_note(args, llm, sys.stderr)
        if args.verbose and llm.ripple_budget_split:
            from .memory_budget import describe
            stock = " (the split the runtime would have made: the stock path above ran instead)" \
                if llm.ripple_dense_reason else ""
            print(describe(llm.ripple_budget_split) + stock, file=sys.stderr)
    llm.close()
    return result


def cmd_eval(args) -> dict:
    if not os.path.isfile(args.text):
        raise RippleError(f"{args.text}: no such file; pass a text file with --text")
    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    args.ctx = _n_ctx(args, default=512)
    if args.stream_prefill is None:
        # perplexity is measured in batches of --ctx tokens: streamed, they would be the dense FFN's, not the
        # operating point's (what generation's decode computes)
        args.stream_prefill = 0
    prep = prepare(args)
    n_ctx = prep["n_ctx"]
    rss_before = reset_peak_rss()
    llm = load(args, prep, logits_all=True, n_batch=n_ctx, n_ubatch=n_ctx)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    bos = llm.token_bos() if llm.token_bos() >= 0 else None
    s0 = llm.ripple_stats()
    t0 = time.perf_counter()

    def progress(c, n, ppl):
        if not args.json:
            print(f"\r[{c}/{n}] perplexity {ppl:.4f}", end="", file=sys.stderr, flush=True)
    ppl, scored = perplexity(llm, tokens, n_ctx, bos, args.chunks, progress)
    seconds = time.perf_counter() - t0
    s_end = llm.ripple_stats()
    llm.check_ripple()
    n_eval = (len(tokens) // n_ctx if not args.chunks else min(args.chunks, len(tokens) // n_ctx)) * n_ctx
    result = {"perplexity": ppl, "text": args.text, "ctx": n_ctx, "scored_tokens": scored,
              "evaluated_tokens": n_eval, "mode": s_end.get("mode"), "operating_point": llm.ripple_point,
              "eval": phase(s_end, s0, n_eval, seconds), "memory": _memory(args, llm, prep, rss_before),
              "ripple": s_end}
    if args.curve and llm.ripple_active:
        result["curve"] = _curve(args, llm, tokens[:n_eval], n_ctx, bos)
    if not args.json:
        print(file=sys.stderr)
        e = result["eval"]
        extra = ""
        if result["mode"] == "sparse":
            extra = (f"; predicted density {100 * (e['predicted_density'] or 0):.1f}%, "
                     f"{e['reads_per_token']:.2f} reads/token, cache hit rate {100 * (e['cache_hit_rate'] or 0):.1f}%")
        print(f"perplexity {ppl:.4f} over {scored} tokens ({result['mode']}; {e['tokens_per_s'] or 0:.0f} tokens/s{extra})")
        print_mode_note(args, llm, sys.stdout)
        if "curve" in result:
            from .curve import format_curve
            print("\n".join(format_curve(result["curve"])))
    llm.close()
    return result


def print_mode_note(args, llm, out) -> None:
    """The operating point in use, and why the stock path ran if it did."""
    if getattr(args, "ctx_note", None):
        print(args.ctx_note, file=out)
    stock = llm.ripple_dense_reason and not args.dense  # the stock path ran instead of the runtime
    if llm.ripple_point:  # (on the stock path its perplexity increase does not apply)
        print(point_line(llm.ripple_point) + ("; not in use: the stock path computes every neuron" if stock else ""),
              file=out)
        if "asked" in llm.ripple_point:
            print(f"instead of {point_line(llm.ripple_point['asked'])}: there the pack's reads would carry the "
                  "gaps between active neurons (nearly as many bytes as every neuron), so every neuron runs, exact "
                  "(--keep-pack runs the point itself)", file=out)
    if stock:
        print(f"stock path: {llm.ripple_dense_reason}", file=out)
    if llm.ripple_non_ffn:
        print(f"non-FFN weights: {llm.ripple_non_ffn}", file=out)
    if llm.ripple_streamed:
        st = llm.ripple_stats()
        held, n_layer = st["resident_layers"], llm.ripple_pack.n_layer
        how = f"in {st['ffn_chunks']} row chunks, several ahead" if st.get("ffn_chunks") else "whole, one layer ahead"
        where = "all in memory" if held >= n_layer else f"{held} of {n_layer} layers in memory, the rest streamed {how}"
        print(f"FFN: every neuron, llama.cpp's kernels over the GGUF's own FFN tensors: {where}", file=out)
    elif llm.ripple_active and not stock:
        st = llm.ripple_stats()
        if st.get("neuron_chunks"):
            print(f"FFN: the pack's bundles; the cache ({st['cache_bytes'] / 2**20:.1f} MiB) holds less than one "
                  f"layer, so each layer is planned and computed in {st['neuron_chunks'] // llm.ripple_pack.n_layer} "
                  "chunks", file=out)


def point_line(pt: dict) -> str:
    return (f"operating point {pt['index']}: density {pt['density']:.3f}, {100 * pt['ppl_increase']:+.2f}% perplexity "
            f"on calibration text{' (the pack default)' if pt['default'] else ''}")


def _curve(args, llm, tokens: list[int], n_ctx: int, bos) -> list[dict]:
    from .curve import density_curve
    status = None if args.json else (lambda msg: print(f"\r{msg}", end="", file=sys.stderr, flush=True))
    rows = density_curve(args.gguf, llm, tokens, n_ctx, bos, status)
    if not args.json:
        print(file=sys.stderr)
    return rows


def cmd_chat(args) -> dict:
    llm = load(args, prepare(args), chat_format=args.chat_format)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    shown = sys.stderr if args.json else sys.stdout  # with --json, stdout is the one JSON object
    if interactive:
        print("chat with the model; /stats for runtime counters, /reset to start over, /exit or Ctrl-D to quit",
              file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/stats":
            print(json.dumps(llm.ripple_stats(), indent=1), file=sys.stderr)
            continue
        if cmd == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=args.n, temperature=args.temp,
                                                    seed=args.seed):
                delta = chunk["choices"][0]["delta"].get("content")
                if delta:
                    reply.append(delta)
                    shown.write(delta)
                    shown.flush()
        except ValueError as e:
            if "context" in str(e).lower():
                raise RippleError("the conversation no longer fits the context; /reset or raise --ctx") from None
            raise
        print(file=shown)
        messages.append({"role": "assistant", "content": "".join(reply)})
    st = llm.ripple_stats()
    if not args.json and st.get("mode") == "sparse":
        print(f"{st['tokens']} tokens; {st['reads_per_token']:.1f} reads and {st['bytes_per_token'] / 1024:.1f} KiB "
              f"per token; cache hit rate {100 * st['cache_hit_rate']:.1f}%", file=sys.stderr)
    llm.close()
    return {"messages": messages, "ripple": st}


def cmd_serve(args) -> dict:
    try:
        import uvicorn
        from .serve import make_app
    except ImportError as e:
        raise RippleError(f"the server needs llama-cpp-python's server extras ({e.name} is missing); "
                          "re-run tools/setup.sh") from None
    if args.host not in LOOPBACK:
        print(f"warning: serving on {args.host}, reachable from other machines"
              + ("" if args.api_key else "; there is no authentication unless you pass --api-key"), file=sys.stderr)
    kw = {"chat_format": args.chat_format} if args.chat_format else {}
    # the loader re-verifies the pack: after a runtime error the model is reloaded from what is on disk now
    app = make_app(lambda: load(args, prepare(args), **kw), args.alias or os.path.basename(args.gguf), args.api_key)
    print(f"serving {args.gguf} on http://{args.host}:{args.port}/v1 (OpenAI-compatible; "
          f"runtime counters at /ripple/stats{'; every route needs the API key' if args.api_key else ''}); "
          "Ctrl-C to stop", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return {}


def register(sub) -> None:
    """Add run / chat / eval / serve to the `ripple-gguf` subparsers."""
    r = sub.add_parser("run", help="generate text with the sparse flash-offload runtime")
    _add_runtime_args(r)
    r.add_argument("-p", "--prompt", required=True, help="the text to continue")
    r.add_argument("-n", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--json", action="store_true", help="print text, token ids and runtime stats as JSON")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="interactive chat (streamed) through the chat template in the GGUF")
    _add_runtime_args(c)
    c.add_argument("-n", type=int, default=256, help="max tokens per reply (default 256)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the GGUF's template)")
    c.add_argument("--json", action="store_true", help="print the transcript and stats as JSON at the end")
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("eval", help="perplexity on a text file (like llama-perplexity) plus runtime stats")
    e.add_argument("--curve", action="store_true",
                   help="also every stored operating point: density vs perplexity of the predictor (runtime), "
                        "the oracle (top-d by |h| per token) and the gate-only rule (top-d by |silu(gate)|)")
    _add_runtime_args(e, generation=False)
    e.add_argument("--text", required=True, metavar="FILE", help="text not used for calibration")
    e.add_argument("--chunks", type=int, default=None, help="score at most this many chunks (default: the whole text)")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (llama-cpp-python's) on the sparse runtime")
    _add_runtime_args(s)
    s.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--alias", default=None, help="model name clients use (default: the file name)")
    s.add_argument("--api-key", default=os.environ.get("RIPPLE_API_KEY"),
                   help="require this bearer token on every route (default: $RIPPLE_API_KEY; none)")
    s.add_argument("--chat-format", default=None, help="llama-cpp-python chat format (default: the GGUF's template)")
    s.set_defaults(func=cmd_serve)
