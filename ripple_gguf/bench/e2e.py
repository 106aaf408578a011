"""`ripple-gguf bench e2e`: stock llama-cpp-python vs the sparse runtime on one GGUF, end to end.

Each measurement is a fresh subprocess (cold page cache for the GGUF and the pack, nothing shared
with earlier runs) confined to a memory cgroup. The budget (a share of the model size) is the room
for weights; each mode's non-weight memory (interpreter, libraries, KV cache, compute buffers) is
measured in an unconfined run first. Two limits per budget:
  weights   budget + that mode's own non-weight memory (stock, ripple). This is what carries over
            to real model sizes, where a few MiB of fixed overhead do not matter;
  same RAM  budget + stock's non-weight memory for ripple too ("ripple-same-ram"): one emulated
            device for both, so ripple's extra fixed overhead comes out of its neuron cache. On a
            model of a few tens of MiB that overhead is a large share of the budget.
            "ripple-default" runs under the same limit with default settings, as a user would: no
            cache size given (the runtime splits the cgroup's limit itself) and the pack's default
            operating point, which may mean llama.cpp's stock path (the "path" column).
Ripple's weights are the non-FFN tensors (read into memory where the neuron cache fits after them,
else mapped), the predictors and the neuron cache (the rest).
The sparse runtime reads the pack with O_DIRECT by default (no second copy of what it caches in the
page cache, which the cgroup would charge). Reported per run:
time to first token, decode tokens/s and peak memory; per mode: perplexity on the same text.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

from ..cgroup import MemoryCgroup, drop_file_cache
from ..errors import RippleError

SLACK = 4 * 2**20           # added to the measured non-weight memory: allocator and interpreter jitter
MARK = "RIPPLE_E2E_RESULT "  # prefix of the worker's result line on stdout
MODES = ("stock", "ripple")
RUNS = ("stock", "ripple", "ripple-same-ram", "ripple-default")
# where each ripple run's decode speed over stock's at the same budget is kept in the result
SPEEDUP_KEY = {"ripple": "speedup", "ripple-same-ram": "speedup_same_ram", "ripple-default": "speedup_default"}


# --- worker: one measurement in a child process ------------------------------------------------------

def _anon() -> int:
    from ..process_stats import status_kb
    return status_kb("RssAnon") * 1024


class _AnonPeak:
    """Peak anonymous memory, sampled every 5 ms in a thread: the kernel keeps a peak only for RSS
    as a whole (VmHWM), which also counts the mmap'd weights, and load-time transients are short."""

    def __init__(self):
        import threading
        self.peak, self._stop = _anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _anon())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon())


def _load(a: dict, n_ctx: int, **kw):
    """Stock `llama_cpp.Llama` with default settings, or `RippleLlama` with the given cache budget
    (None: its defaults)."""
    import llama_cpp
    from ..runtime import RippleLlama
    kw.update(n_ctx=n_ctx, seed=0, verbose=False)
    if a.get("threads"):
        kw.update(n_threads=a["threads"], n_threads_batch=a["threads"])
    if a["mode"] == "stock":
        return llama_cpp.Llama(a["gguf"], **kw)
    return RippleLlama(a["gguf"], cache_size=a.get("cache_budget"), t0_us=a.get("t0_us"), bw_mbps=a.get("bw_mbps"),
                       direct_io=bool(a.get("direct_io")), resident_weights=a.get("resident_weights"),
                       read_ahead=a.get("read_ahead", True), stream_output=a.get("stream_output"), **kw)


def _measure(a: dict, text: str) -> dict:
    """Load, prompt (TTFT), then greedy decode one token per eval; EOS ignored so counts match."""
    import numpy as np
    from ..process_stats import peak_rss, phase, reset_peak_rss, storage_reads
    reset_peak_rss()
    anon = _AnonPeak()
    start = time.perf_counter()
    llm = _load(a, a["n_ctx"])
    load_s = time.perf_counter() - start
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # without logits_all, llama-cpp-python keeps no logits: read the context's
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
    stats = getattr(llm, "ripple_stats", dict)
    # a prefix of the text: llama.cpp's tokenizer on the whole file is a transient of several MiB that the
    # overhead measurement (sampled) can miss, and then the tight cgroups of the runs OOM-kill the worker
    prompt = llm.tokenize(text[:64 * a["prompt_tokens"]].encode(), add_bos=True, special=False)[:a["prompt_tokens"]]
    t0 = time.perf_counter()
    llm.eval(prompt)
    ids = [greedy()]
    ttft = time.perf_counter() - t0
    s0, io0, t1, timed_out = stats(), storage_reads(), time.perf_counter(), False
    for _ in range(a["gen_tokens"]):
        if time.perf_counter() - start > a["timeout_s"]:
            timed_out = True
            break
        llm.eval([ids[-1]])
        ids.append(greedy())
    decode_s = time.perf_counter() - t1
    s1, io1 = stats(), storage_reads()
    n = len(ids) - 1
    out = {"load_s": round(load_s, 4), "ttft_s": round(ttft, 5), "prompt_tokens": len(prompt), "decode_tokens": n,
           "decode_s": round(decode_s, 5), "decode_tok_s": round(n / decode_s, 3) if n and decode_s > 0 else None,
           "timed_out": timed_out, "tokens": ids, "peak_rss_bytes": peak_rss(), "peak_anon_bytes": anon.stop(),
           "path": "stock" if not getattr(llm, "ripple_active", False) else "pack",
           "stock_reason": getattr(llm, "ripple_dense_reason", None),
           "non_ffn_weights": getattr(llm, "ripple_non_ffn", None),
           # every read from storage while decoding (stock's page faults, the runtime's reads and faults)
           "decode_storage_bytes_per_token": round((io1[0] - io0[0]) / n) if n else None,
           "decode_major_faults_per_token": round((io1[1] - io0[1]) / n, 1) if n else None}
    if s1.get("mode") == "sparse":
        out["streamed"] = bool(s1.get("stream_dense"))  # dense point: the GGUF's own FFN tensors, streamed
        out["decode_stats"] = phase(s1, s0, n, decode_s)
        out.update({k: s1[k] for k in ("cache_bytes", "overhead_bytes", "t0_us", "bw_mbps")})
    llm.close()
    return out


def _perplexity(a: dict, text: str) -> dict:
    from ..perplexity import perplexity
    ctx = a["ctx"]
    # as `ripple-gguf eval` does: every batch at the operating point's own selection, none streamed dense
    llm = _load(a, ctx, logits_all=True, n_batch=ctx, n_ubatch=ctx, **({} if a["mode"] == "stock" else {"stream_prefill": 0}))
    tokens = llm.tokenize(text[:64 * ctx * (a["ppl_chunks"] + 1)].encode(), add_bos=True, special=False)  # see _measure
    bos = llm.token_bos() if llm.token_bos() >= 0 else None
    ppl, scored = perplexity(llm, tokens, ctx, bos, a["ppl_chunks"])
    llm.close()
    return {"ppl": ppl, "tokens": scored}


def worker_main(arg: str) -> int:
    """Child entry: run what the JSON asks, print one result line; errors become {"error": ...}."""
    a = json.loads(arg)
    try:
        with open(a["text"], encoding="utf-8", errors="replace") as f:
            text = f.read()
        out = _measure(a, text)
        if a.get("ppl_chunks"):
            out["perplexity"] = _perplexity(a, text)
    except Exception as e:  # noqa: BLE001  (reported to the parent, which carries on)
        out = {"error": str(e) if isinstance(e, RippleError) else f"{type(e).__name__}: {e}"}
    print(MARK + json.dumps(out), flush=True)
    return 1 if "error" in out else 0


# --- parent: plan, confine, collect ---------------------------------------------------------------------

def model_info(gguf: str, text_path: str, need_tokens: int) -> dict:
    """Sizes the budgets are built from; RippleError for a missing GGUF/pack or a too-short text."""
    if not os.path.isfile(gguf):
        raise RippleError(f"{gguf}: no such file; pass a converted .gguf")
    if not os.path.isfile(text_path):
        raise RippleError(f"{text_path}: no such file; pass a text file with --text")
    from ..pack import open_pack
    from ..memory_budget import gguf_ffn_split
    from ..runtime import ffn_layout, predictor_bytes, streams
    pack = open_pack(gguf)  # RippleError naming `ripple-gguf pack` when missing or not bound to this GGUF
    ffn, other = gguf_ffn_split(gguf)
    streamed = streams(pack, pack.op_default)  # a dense default point streams the GGUF's own FFN
    whole, minimum = ffn_layout(gguf, pack, streamed)
    info = {"gguf": os.path.abspath(gguf), "gguf_bytes": os.path.getsize(gguf), "ffn_bytes": ffn,
            "non_ffn_bytes": other, "pack": os.path.abspath(pack.path), "pack_bytes": pack.file_bytes,
            "predictor_bytes": 0 if streamed else predictor_bytes(pack, pack.op_default), "n_layer": pack.n_layer, "n_ff": list(pack.n_ff),
            "min_cache_bytes": minimum, "max_cache_bytes": whole,
            "streamed": streamed}
    import llama_cpp
    from llama_cpp._internals import LlamaModel
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True  # the tokenizer alone (a vocab-only `Llama` still makes a context and logs)
    vocab = LlamaModel(path_model=gguf, params=params, verbose=False)
    with open(text_path, encoding="utf-8", errors="replace") as f:
        n = len(vocab.tokenize(f.read().encode(), add_bos=True, special=False))
    vocab.close()
    del pack, vocab
    gc.collect()  # unmap the readers' memmaps, so dropping the page cache really empties it
    if n < need_tokens:
        raise RippleError(f"{text_path} has {n} tokens, the benchmark needs {need_tokens} (prompt and one "
                          "perplexity chunk); pass a longer --text or lower --prompt-tokens / --ctx")
    info["text_tokens"] = n
    return info


def cache_budget(budget: int, info: dict) -> tuple[int, bool]:
    """The neuron cache that keeps ripple's weights within `budget`: what is left after the non-FFN
    weights (mmap'd) and the predictors, floored at the runtime's minimum (one chunk of neurons, or two staging buffers)."""
    want = min(budget - info["non_ffn_bytes"] - info["predictor_bytes"], info["max_cache_bytes"])
    return max(want, info["min_cache_bytes"]), want < info["min_cache_bytes"]


def _worker(args: dict, limit: int | None, timeout: float) -> dict:
    """One child run, confined to `limit` bytes when given; never raises for a failed child."""
    for path in (args["gguf"], args.get("pack")):
        if path:
            drop_file_cache(path)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [pkg_parent, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "ripple_gguf.bench.e2e", "--worker", json.dumps(args)]
    cg = MemoryCgroup.create(limit) if limit else None
    rec = {"limit_bytes": cg.limit if cg else None}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                preexec_fn=cg.preexec() if cg else None)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            err, rec["oom_killed"] = f"did not finish within {timeout:.0f} s (killed)", False
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if cg:
            rec["cgroup_peak_bytes"] = cg.peak_bytes()
            rec.setdefault("oom_killed", cg.oom_killed())
    finally:
        if cg:
            cg.close()
    lines = [ln for ln in out.splitlines() if ln.startswith(MARK)]
    if lines:
        rec.update(json.loads(lines[-1][len(MARK):]))
    elif proc.returncode == -9 and cg and rec.get("oom_killed") is not False:
        rec["error"] = "killed by the memory limit (OOM)"
    else:
        tail = (err or "").strip().splitlines()
        rec["error"] = f"worker exited with {proc.returncode}: {tail[-1] if tail else 'no output'}"
    rec.setdefault("error", None)
    return rec


def run_e2e(gguf, text_path, fractions=(1.0, 0.75, 0.5, 0.35, 0.25), gen_tokens=64, prompt_tokens=64, ctx=512, ppl_chunks=4,
            timeout_s=300, t0_us=None, bw_mbps=None, threads=None, direct_io=True, read_ahead=True,
            progress=True) -> dict:
    """Stock vs ripple at each memory budget (a share of the GGUF size); see the module docstring."""
    from tqdm import tqdm
    if gen_tokens < 1 or prompt_tokens < 1 or ctx < 8 or not fractions or min(fractions) <= 0:
        raise RippleError("--gen-tokens and --prompt-tokens must be >= 1, --ctx >= 8 and every budget fraction > 0")
    gguf, text_path = str(gguf), str(text_path)
    info = model_info(gguf, text_path, max(prompt_tokens, ctx if ppl_chunks else 0))
    probe = MemoryCgroup.create(info["gguf_bytes"])
    if probe:
        probe.close()
        cgroup = {"version": probe.version, "note": f"runs confined in memory cgroups under {os.path.dirname(probe.path)}"}
    else:
        cgroup = {"version": None, "note": f"{MemoryCgroup.why_unavailable()}; runs were NOT memory-limited"}
    n_ctx = max(ctx, prompt_tokens + gen_tokens + 1)
    base = {"gguf": info["gguf"], "text": os.path.abspath(text_path), "prompt_tokens": prompt_tokens,
            "gen_tokens": gen_tokens, "n_ctx": n_ctx, "ctx": ctx, "timeout_s": timeout_s, "threads": threads,
            "t0_us": t0_us, "bw_mbps": bw_mbps, "direct_io": direct_io, "read_ahead": read_ahead}
    hard = timeout_s * 2 + 120  # the worker stops decoding at timeout_s; this kills a hung load or prompt
    bar = tqdm(total=2 + len(RUNS) * len(fractions), unit="run", file=sys.stderr, disable=not progress, leave=False)
    try:
        # unconfined: each mode's non-weight memory, and perplexity (it does not depend on the limit);
        # ripple runs with its smallest cache and mapped non-FFN weights, so that its anonymous memory
        # is nearly all overhead
        bar.set_description("stock unconfined")
        ref_stock = _worker({**base, "mode": "stock", "ppl_chunks": ppl_chunks}, None, hard)
        bar.update()
        bar.set_description("ripple unconfined")
        ref_ripple = _worker({**base, "mode": "ripple", "pack": info["pack"], "cache_budget": info["min_cache_bytes"],
                              "resident_weights": False, "ppl_chunks": ppl_chunks}, None, hard)
        bar.update()
        for name, ref in (("stock llama-cpp-python", ref_stock), ("the ripple runtime", ref_ripple)):
            if ref["error"]:
                raise RippleError(f"{name} could not run {gguf}: {ref['error']}")
        # ripple's cache and predictors are weights (inside the budget); its staging buffers are not
        overheads = {"stock": ref_stock["peak_anon_bytes"] + SLACK,
                     "ripple": max(ref_ripple["peak_anon_bytes"] - ref_ripple["cache_bytes"]
                                   - info["predictor_bytes"], 0) + SLACK}
        runs = []
        for frac in fractions:
            budget = int(frac * info["gguf_bytes"])
            for run in RUNS:
                own = overheads["ripple" if run == "ripple" else "stock"]
                limit = budget + own if cgroup["version"] else None
                bar.set_description(f"{run} {frac:.0%}")
                args = {**base, "mode": "stock" if run == "stock" else "ripple"}
                extra = {}
                if run == "ripple-default":
                    args.update(pack=info["pack"], cache_budget=None)
                elif run != "stock":
                    weights_room = budget + own - overheads["ripple"]
                    cache, floored = cache_budget(weights_room, info)
                    # the budget counts the non-FFN weights as memory the run holds: all resident where
                    # the cache fits after them, else the runtime's own rule for how many to hold (None):
                    # the page cache the mapped rest is read through matters as much as what is held
                    # (SmolLM2 Q4_1 at 25%, 3.3 MiB cache: 4 MiB held 11.4 tok/s, 8 MiB 6.2, 12 MiB 5.2,
                    # 16 MiB, all the room the budget left, OOM-killed)
                    held = True if not floored else None
                    args.update(pack=info["pack"], cache_budget=cache, resident_weights=held)
                    extra = {"cache_budget_bytes": cache, "cache_floor_applied": floored}
                rec = _worker(args, limit, hard)
                runs.append({"mode": run, "fraction": frac, "budget_bytes": budget, **extra, **rec})
                bar.update()
    finally:
        bar.close()
    tok_s = {(r["mode"], r["fraction"]): r.get("decode_tok_s") for r in runs}

    def ratio(run, f):
        a, b = tok_s.get((run, f)), tok_s.get(("stock", f))
        return round(a / b, 3) if a and b else None
    speedups = {key: {str(f): ratio(run, f) for f in fractions} for run, key in SPEEDUP_KEY.items()}
    ppl = {m: r.get("perplexity") or ({"error": r["error"]} if r["error"] else None)
           for m, r in (("stock", ref_stock), ("ripple", ref_ripple))}
    for r in (ref_stock, ref_ripple):
        r.pop("perplexity", None)
    return {"model": info, "cgroup": cgroup, "overhead_bytes": overheads["stock"], "overheads": overheads,
            "settings": {"fractions": list(fractions), "gen_tokens": gen_tokens, "prompt_tokens": prompt_tokens,
                         "ctx": ctx, "n_ctx": n_ctx, "ppl_chunks": ppl_chunks, "timeout_s": timeout_s,
                         "t0_us": t0_us, "bw_mbps": bw_mbps, "threads": threads, "direct_io": direct_io,
                         "read_ahead": read_ahead,
                         "slack_bytes": SLACK},
            "unconfined": {"stock": {"mode": "stock", "fraction": None, **ref_stock},
                           "ripple": {"mode": "ripple", "fraction": None, "cache_budget_bytes": info["min_cache_bytes"],
                                      **ref_ripple}},
            "runs": runs, "perplexity": ppl, **speedups}


def run_speedup(res: dict, r: dict) -> float | None:
    """A run's decode speed over stock's at its budget (None for stock and unconfined rows)."""
    key = SPEEDUP_KEY.get(r["mode"])
    return None if key is None or r.get("fraction") is None else res.get(key, {}).get(str(r["fraction"]))


def path_note(r: dict) -> str:
    """How a ripple run held its weights, when that is not the runtime with resident non-FFN weights."""
    if took_stock_path(r):
        why = "not even the minimum FFN cache fits" if "do not fit" in (r.get("stock_reason") or "") \
            else "dense default operating point, the model fits"
        return f"ran llama.cpp's stock path: {why}"
    streamed = "the GGUF's FFN streamed" if r.get("streamed") else ""
    return ", ".join(filter(None, [streamed, "non-FFN weights mapped" if non_ffn_mapped(r) else ""]))


def non_ffn_mapped(r: dict) -> bool:
    """A pack-path run whose non-FFN weights stayed mapped (RippleLlama.ripple_non_ffn "mapped (why)")."""
    return r.get("path") == "pack" and (r.get("non_ffn_weights") or "").startswith("mapped")


def took_stock_path(r: dict) -> bool:
    """A default-settings ripple run that ran llama.cpp's stock path (a dense default operating point, or
    not even one layer of neuron cache fits: RippleLlama._stock_is_the_same)."""
    return r["mode"] == "ripple-default" and r.get("path") == "stock"


HEAD = ("budget", "limit MiB", "cache MiB", "TTFT ms", "tok/s", "peak MiB", "ppl", "vs stock")
WIDTHS = (8, 11, 11, 10, 10, 10, 9, 10)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def format_e2e(res: dict) -> str:
    """A terminal table: one row per (mode, budget), with perplexity and ripple/stock decode speed."""
    m = res["model"]
    lines = [f"{os.path.basename(m['gguf'])}: {_mib(m['gguf_bytes'])} MiB (FFN {_mib(m['ffn_bytes'])}, other "
             f"{_mib(m['non_ffn_bytes'])}), pack {_mib(m['pack_bytes'])} MiB, predictors {_mib(m['predictor_bytes'])} MiB",
             f"memory limit = budget + non-weight memory (peak anonymous memory unconfined + {_mib(SLACK)} MiB): "
             f"stock {_mib(res['overheads']['stock'])} MiB, ripple {_mib(res['overheads']['ripple'])} MiB; "
             f"ripple-same-ram gets stock's limit; {res['cgroup']['note']}",
             "peak = the cgroup's peak charge (anonymous + page cache); unconfined rows: peak RSS",
             f"{'mode':<16}" + "".join(f"{c:>{w}}" for c, w in zip(HEAD, WIDTHS)) + "  note"]
    ppl = {k: (v or {}).get("ppl") for k, v in res["perplexity"].items()}
    for r in [res["unconfined"][k] for k in MODES] + res["runs"]:
        f, tok_s, ttft = r["fraction"], r.get("decode_tok_s"), r.get("ttft_s")
        p = ppl.get("stock" if r["mode"] == "stock" else "ripple")
        ratio = run_speedup(res, r)
        note = r.get("error") or ("timed out" if r.get("timed_out") else "") or \
            "; ".join(filter(None, ["cache at its floor" if r.get("cache_floor_applied") else "", path_note(r)]))
        cells = ["none" if f is None else f"{f:.0%}", _mib(r.get("limit_bytes")), _mib(r.get("cache_budget_bytes")),
                 "-" if ttft is None else f"{1000 * ttft:.1f}", "-" if not tok_s else f"{tok_s:.1f}",
                 _mib(r.get("cgroup_peak_bytes") or r.get("peak_rss_bytes")), "-" if p is None else f"{p:.3f}",
                 "-" if ratio is None else f"{ratio:.2f}x"]
        lines.append(f"{r['mode']:<16}" + "".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)) + f"  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m ripple_gguf.bench.e2e --worker JSON (use `ripple-gguf bench e2e` instead)")
