"""Density vs perplexity on one text: the runtime's predictor at every stored operating point, next
to the oracle (top-d neurons by |h| per token: the best any predictor could do) and the gate-only
rule (top-d by |silu(gate)|) at the same densities. One implementation for `eval --curve` and the
benchmark report."""
from __future__ import annotations

from typing import Callable

from .perplexity import perplexity


def density_curve(gguf_path, llm, tokens: list[int], n_ctx: int, bos,
                  status: Callable[[str], None] | None = None) -> list[dict]:
    """Rows per stored point of `llm` (a RippleLlama with its pack attached and logits_all), on
    `tokens` in chunks of n_ctx: {"point", "density" (as selected on this text), "predictor",
    "oracle", "gate_only" (None without a gate), "stock"} perplexities. Leaves llm at the point it had."""
    from . import quality
    pk = llm.ripple_pack
    before = llm.ripple_point["index"]
    rows = []
    for i in range(len(pk.op_density)):
        llm.ripple_set_point(i)
        s0 = llm.ripple_stats()
        ppl, _ = perplexity(llm, tokens, n_ctx, bos)
        s1 = llm.ripple_stats()
        act = s1["active_neurons"] - s0["active_neurons"]
        tot = s1["total_neurons"] - s0["total_neurons"]
        rows.append({"point": i, "density": act / tot if tot else 0.0, "predictor": ppl})
        if status:
            status(f"[curve {i + 1}/{len(pk.op_density)}] predictor")
    llm.ripple_set_point(before)
    chunks = [[bos if bos is not None else tokens[c]] + list(tokens[c + 1:c + n_ctx]) for c in range(0, len(tokens), n_ctx)]
    gated = pk.has_gate
    rules = [None]
    for r in rows[1:]:
        rules += [quality.oracle_rule(r["density"])] + ([quality.gate_rule(r["density"])] if gated else [])
    if status:
        status("[curve] oracle and gate-only rules on the stock model")
    ppls = quality.masked_perplexities(gguf_path, chunks, rules, n_ctx)
    dense = ppls[0]
    rows[0].update(oracle=dense, gate_only=dense if gated else None, stock=dense)
    step = 2 if gated else 1
    for k, r in enumerate(rows[1:]):
        r.update(oracle=ppls[1 + step * k], gate_only=ppls[2 + step * k] if gated else None, stock=dense)
    return rows


def curve_on_text(gguf_path, text: str, ctx: int = 512, chunks: int = 4) -> dict:
    """The curve of a converted GGUF (with its pack) on `text`: the first `chunks` chunks of ctx tokens."""
    from .errors import RippleError
    from .runtime import RippleLlama
    llm = RippleLlama(str(gguf_path), stock_when_dense=False, logits_all=True, n_ctx=ctx, n_batch=ctx,
                      n_ubatch=ctx, stream_prefill=0, verbose=False)  # batches at the point's own selection
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
        n = min(chunks, len(tokens) // ctx) * ctx
        if n == 0:
            raise RippleError(f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx}; pass a longer text")
        bos = llm.token_bos() if llm.token_bos() >= 0 else None
        rows = density_curve(gguf_path, llm, tokens[:n], ctx, bos)
    finally:
        llm.close()
    return {"ctx": ctx, "tokens": n, "rows": rows}


def format_curve(rows: list[dict]) -> list[str]:
    dense = rows[0]["stock"]
    pct = lambda v: "-" if v is None else f"{v:.4f} ({100 * (v / dense - 1):+.1f}%)"
    lines = [f"density vs perplexity (stock dense {dense:.4f}):",
             f"  {'point':>5} {'density':>8}  {'predictor (runtime)':>22}  {'oracle top-d |h|':>22}  {'gate-only top-d':>22}"]
    for r in rows:
        lines.append(f"  {r['point']:>5} {r['density']:>8.3f}  {pct(r['predictor']):>22}  {pct(r['oracle']):>22}  "
                     f"{pct(r['gate_only']):>22}")
    return lines
