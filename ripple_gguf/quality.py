"""Operating points: per-layer predictor thresholds that trade density for perplexity.

A fixed active share loses too much on real SwiGLU models (SmolLM2: keeping the top 30% by |h| is
+20% perplexity even for an oracle), and layers differ a lot. So the pack stores a curve:
1. per layer, on calibration tokens the predictors did not train on, the share of the FFN output
   lost when only neurons scoring above a threshold are computed,
   error(d) = sum over dropped (token, neuron) of h^2 |down column|^2 / the same sum over all;
2. for each target mean density, the per-layer densities that lose the least error for the bytes
   read (equal-slope allocation: a layer is made sparser only where that is cheap in error);
3. each point's perplexity increase, measured by llama.cpp itself on held-out calibration tokens with
   exactly that selection applied inside its graph (LlamaRunner.ffn_mask), against the same tokens dense.
`run/eval/serve --quality 2%` then load the sparsest point within the budget; `eval --curve` puts
the predictor next to the oracle (top-d by |h| per token) and the gate-only rule (top-d by |silu(gate)|).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import RippleError
from .index_keys import in_gguf_order

GRID = np.round(np.arange(0.05, 1.0001, 0.025), 3)      # candidate per-layer densities
TARGETS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.1)  # mean densities of the stored points
DEFAULT_BUDGET = 0.02                                   # --max-ppl-increase default
DENSE_THRESHOLD = -1e30                                 # every score passes (finite: the C side checks)
FLOOR_RATIO = 0.75      # per-token floor of a point = this x its target density (see OperatingPoint.floor)
PPL_TOKENS = 1024                                       # held-out calibration tokens each point is measured on
# A point must measure within this share of the budget: ~1,000 tokens are a noisy estimate, and on
# SmolLM2 the sparsest points within 2% cost 3x their estimate on held-out prose (Q4_K_M: +1.9% ->
# +5.8%); the full budget would not hold.
ESTIMATE_SHARE = 0.5
# points are measured densest first up to the first costing more than max(4 x budget, 8%)
MEASURE_CAP_BUDGETS, MEASURE_CAP_MIN = 4.0, 0.08


@dataclass
class LayerCurve:
    threshold: np.ndarray  # per GRID density: the score threshold that keeps that share (calibration)
    error: np.ndarray      # per GRID density: share of the FFN output energy lost


@dataclass
class OperatingPoint:
    density: float              # mean predicted density, weighted by each layer's FFN bytes (measured
                                # with the floor on the held-out calibration tokens once `measure` ran)
    thresholds: np.ndarray      # per layer
    ppl_increase: float = math.nan  # relative, on held-out calibration tokens (0.02 = +2%)
    floor: float = 0.0          # per-token floor: every token keeps at least this share of each layer
                                # (its top by score). With one global threshold some tokens keep almost
                                # nothing; on SmolLM2 a floor of ~0.6 halved the loss at equal density
    read_share: float = 1.0     # share of the FFN's bytes the pack reads a token with no cache (read_bytes),
                                # measured with `density`


def layer_curve(scores: np.ndarray, h: np.ndarray, col_sq: np.ndarray) -> LayerCurve:
    """scores, h: (tokens, n_ff) predictor scores and true intermediates; col_sq: |down column|^2."""
    w = np.square(np.asarray(h, dtype=np.float32)) * col_sq
    flat = scores.reshape(-1)
    order = np.argsort(-flat, kind="stable")
    kept = np.concatenate([[0.0], np.cumsum(w.reshape(-1)[order], dtype=np.float64)])
    total = max(kept[-1], 1e-30)
    k = np.clip(np.round(GRID * flat.size).astype(np.int64), 1, flat.size)
    thr = flat[order[k - 1]]
    # a threshold just below the k-th score keeps (about) k entries: scores > thr
    thr = np.nextafter(thr.astype(np.float32), np.float32(-np.inf))
    thr[GRID >= 1.0] = DENSE_THRESHOLD
    return LayerCurve(thr.astype(np.float32), (1.0 - kept[k] / total).clip(0.0, 1.0))


def _pick(curves: list[LayerCurve], layer_bytes: np.ndarray, mu: float) -> np.ndarray:
    """Per layer the grid index minimising bytes read + mu * error lost."""
    return np.array([int(np.argmin(b * GRID + mu * c.error)) for c, b in zip(curves, layer_bytes)])


def allocate(curves: list[LayerCurve], layer_bytes, target: float) -> OperatingPoint:
    """The point with byte-weighted mean density closest to `target` (from above) on the
    equal-slope frontier."""
    b = np.asarray(layer_bytes, dtype=np.float64)
    share = b / b.sum()
    lo, hi = -12.0, 12.0   # log10 of mu in units of the total bytes: density rises with mu
    for _ in range(60):
        mid = (lo + hi) / 2
        d = float(share @ GRID[_pick(curves, b, 10 ** mid * b.sum())])
        lo, hi = (mid, hi) if d < target else (lo, mid)
    idx = _pick(curves, b, 10 ** hi * b.sum())
    return OperatingPoint(float(share @ GRID[idx]), np.array([c.threshold[i] for c, i in zip(curves, idx)], np.float32))


def operating_points(curves: list[LayerCurve], layer_bytes, targets=TARGETS) -> list[OperatingPoint]:
    """Dense first, then one point per target density (duplicates dropped), densest to sparsest."""
    points = [OperatingPoint(1.0, np.full(len(curves), DENSE_THRESHOLD, np.float32))]
    for t in sorted(targets, reverse=True):
        p = allocate(curves, layer_bytes, t)
        if p.density < points[-1].density - 1e-3:
            p.floor = round(FLOOR_RATIO * t, 4)
            points.append(p)
    return points


def choose(points: list[OperatingPoint], budget: float) -> int:
    """Index of the sparsest point (points run densest to sparsest) whose measured increase, and
    every denser point's, is within ESTIMATE_SHARE of `budget`; the dense point 0 always qualifies."""
    budget = budget * ESTIMATE_SHARE
    best, worst = 0, 0.0
    for i, p in enumerate(points[1:], 1):
        # conservative against measurement noise: a point counts only if every denser one also fits
        worst = max(worst, p.ppl_increase)
        if not worst <= budget:
            break
        best = i
    return best


def parse_budget(text) -> float:
    """'2%', '0.02' or 2 (a bare number of 1 or more is percent: `--quality 1` means 1%, not +100%
    perplexity, the sparsest point) -> 0.02; refused outside 0%..100%."""
    s = str(text).strip()
    percent = s.endswith("%")
    try:
        v = float(s[:-1] if percent else s)
    except ValueError:
        raise RippleError(f"perplexity budget {text!r} is not a number; use e.g. 2% or 0.02") from None
    if percent or v >= 1:
        v /= 100
    if not (0 <= v <= 1) or math.isnan(v):
        raise RippleError(f"perplexity budget {text!r} is out of range; use e.g. 2% (0% = dense, 100% at most)")
    return v


# --- which computation runs a point -------------------------------------------------------------

# Operating points at least this dense run llama.cpp's stock path unless a budget is given or the model
# does not fit (see runtime.RippleLlama._stock_is_the_same), and on the runtime they compute every neuron with the
# GGUF's own FFN tensors streamed (see runtime.streams). Measured on SmolLM2 F16 (README "Where the pack pays"):
# at densities 0.92 / 0.89 / 0.83 / 0.72 the pack's merged reads carried the gaps between active neurons
# (short runs, bundles under a 4 KiB page) and read as much a token as the streamed dense FFN, 148-152
# MiB, at 0.57-0.85x its speed in cgroups of 50% and 35% of the model; warm, at 0.83 / 0.74, 0.66-0.72x
# stock. The line was 0.9.
STOCK_PATH_DENSITY = 0.7
# ... and so do sparser ones where the pack would read at least this share of the FFN's bytes anyway
# (ripple.pack.op.read_share: its runs merged across gaps under a page; packs before it have none)
STREAM_READ_SHARE = 0.9


def every_neuron_pays(pk, point: int) -> bool:
    """Is every neuron (streamed, or stock where the model fits) the better computation of stored point
    `point`: dense enough (STOCK_PATH_DENSITY), or its active neurons so scattered that the pack would
    read nearly every byte anyway (STREAM_READ_SHARE)?"""
    share = pk.op_read_share
    return float(pk.op_density[point]) >= STOCK_PATH_DENSITY or \
        (share is not None and float(share[point]) >= STREAM_READ_SHARE)


# --- selection rules applied inside llama.cpp's graph (LlamaRunner.ffn_mask) ------------------------

def predictor_rule(predictors, orders, thresholds, floor: float = 0.0, counts: list | None = None,
                   record_bytes: list[int] | None = None):
    """The runtime's rule: pack position p of layer l computed when its predictor score >
    thresholds[l], or when it is among the token's top ceil(floor * n_ff) scores; the mask is put
    back into the GGUF's neuron order (position p holds neuron orders[l][p]). `counts` ([computed,
    total], and with `record_bytes`, the pack's bytes per record of each layer: [..., bytes read,
    bytes of every record]) accumulates the density it selects and what the pack would read for it."""
    def rule(il, x, gate, h):
        s = predictors[il].scores(x)
        m = s > thresholds[il]
        if floor > 0:
            m |= top_d(s, floor)
        if counts is not None:
            counts[0] += m.sum()
            counts[1] += m.size
            if record_bytes is not None:
                counts[2] += read_bytes(m, record_bytes[il])
                counts[3] += m.size * record_bytes[il]
        return in_gguf_order(orders[il], m)
    return rule


PAGE = 4096


def read_bytes(mask: np.ndarray, record: int) -> int:
    """Bytes the pack's direct reads take for the selected records (tokens x n_ff, pack order; records
    of `record` bytes back to back) with no cache: each token's runs of selected records, merged across
    gaps shorter than a page, widened to whole 4 KiB pages (O_DIRECT). The least the runtime can read
    (its merge gap is t0 x bandwidth, at least this): where it is most of the layer, the pack cannot
    read less than every neuron streamed (SmolLM2 F16 at density 0.72: 149 of 152 MiB a token)."""
    m = np.asarray(mask, dtype=bool)
    n = m.shape[1]
    idx = np.flatnonzero(m)
    if idx.size == 0:
        return 0
    row, pos = idx // n, idx % n
    # a run ends where the next selected record is on another token or more than a page further on
    brk = (row[1:] != row[:-1]) | ((pos[1:] - pos[:-1] - 1) * record >= PAGE)
    first = np.concatenate(([0], np.flatnonzero(brk) + 1))
    last = np.concatenate((np.flatnonzero(brk), [idx.size - 1]))
    lo = pos[first].astype(np.int64) * record // PAGE * PAGE
    hi = -(-(pos[last].astype(np.int64) + 1) * record // PAGE) * PAGE
    return int(np.minimum(hi - lo, n * record).sum())


def top_d(values: np.ndarray, d: float) -> np.ndarray:
    """Per row, the ceil(d * n) largest values."""
    k = int(min(values.shape[1], max(1, math.ceil(d * values.shape[1]))))
    kth = -np.partition(-values, k - 1, axis=1)[:, k - 1:k]
    return values >= kth


def oracle_rule(d: float):
    """The best any predictor could do at density d: per token the top-d neurons by |h|."""
    return lambda il, x, gate, h: top_d(np.abs(h), d)


def gate_rule(d: float):
    """Gate-only (CATS-style): per token the top-d neurons by |silu(gate)|."""
    def rule(il, x, gate, h):
        if gate is None:
            raise RippleError("the gate-only rule needs a gated FFN (SwiGLU/GeGLU)")
        return top_d(np.abs(gate / (1.0 + np.exp(-gate))), d)
    rule.needs_gate = True
    return rule


def calibration_chunks(sequences: list[list[int]], n_ctx: int, bos: int, n_tokens: int = PPL_TOKENS) -> list[list[int]]:
    """Chunks of at most n_ctx tokens (BOS first) from `sequences`, about n_tokens in all; each
    chunk long enough that its scored second half has tokens."""
    chunks, total = [], 0
    for seq in sequences:
        for lo in range(0, len(seq), n_ctx - 1):
            c = [bos] + list(seq[lo:lo + n_ctx - 1])
            if len(c) >= 16 and total < n_tokens:
                chunks.append(c)
                total += len(c)
    return chunks


def masked_perplexities(gguf_path, chunks: list[list[int]], rules: list, n_ctx: int,
                        stop_above: float = math.inf) -> list[float]:
    """Perplexity of the stock model on `chunks` (scored on each chunk's second half) for each rule
    (None: dense), in one loaded model. With rules[0] dense, the rules after the first one whose
    increase over it exceeds `stop_above` are not run (the list is shorter)."""
    from .llama_capture import LlamaRunner
    from .perplexity import chunk_nll, ppl_from_nll
    if not chunks:
        raise RippleError("no calibration tokens left to measure perplexity on; pass more --calib text")
    needs_gate = any(getattr(r, "needs_gate", False) for r in rules)
    out = []
    with LlamaRunner(gguf_path, n_ctx=max(len(c) for c in chunks), capture_intermediate=True,
                     capture_inputs=True, capture_gate=needs_gate) as runner:
        for rule in rules:
            runner.ffn_mask = rule
            nll, count = 0.0, 0
            for c in chunks:
                first = len(c) // 2  # only the scored half needs logits (half the vocabulary matmul)
                logits, _, _ = runner.evaluate(c, want_logits=True, logits_from=first)
                nll += chunk_nll(logits, c, first, logits_start=first)
                count += len(c) - 1 - first
            out.append(ppl_from_nll(nll, count))
            if len(out) > 1 and not out[-1] <= out[0] * (1 + stop_above):
                break
    return out


def neutral_chunks(gguf_path, bos: int, seed: int, n_tokens: int = PPL_TOKENS, seq_len: int = 256) -> list[list[int]]:
    """Text the model samples itself (untruncated), for a second estimate when calibration came from
    --calib: points measured only on the tail of the user's own text came out optimistic on other text
    (SmolLM2, calib.txt: a point measured +0.65% on its tail cost +5.3% on held-out prose)."""
    from .calib import self_generated_sequences
    seqs = self_generated_sequences(gguf_path, n_tokens, seq_len, max(1, n_tokens // seq_len), seed)
    return [[bos] + s[:seq_len - 1] for s in seqs if len(s) >= 16]


def measure_cap(budget: float) -> float:
    """Points are measured densest first until one costs more than this: sparser ones would cost
    more still, and no --quality a user would pick reaches them (on SmolLM2, whose predictor is far
    from the oracle, this halves the stage: issue 9's convert time)."""
    return max(MEASURE_CAP_BUDGETS * budget, MEASURE_CAP_MIN)


def measure(points: list[OperatingPoint], gguf_path, chunk_sets: list, n_ctx: int, predictors,
            orders, budget: float = DEFAULT_BUDGET, record_bytes: list[int] | None = None
            ) -> tuple[list[OperatingPoint], float]:
    """Each point's ppl_increase (the largest over the chunk sets: one estimate per kind of text) and
    the density it really selects (floor included) on the first set, with the share of the FFN's
    bytes the pack reads for it (read_bytes; given the pack's `record_bytes` per layer), densest
    first, up to the first point costing more than measure_cap(budget) on the first set; points that
    come out no sparser than a denser one are dropped. Returns (points, dense perplexity on the first set)."""
    counts = [[0, 0, 0, 0] for _ in points[1:]]
    incs, dense = [], None
    for k, chunks in enumerate(chunk_sets):
        todo = points[1:] if k == 0 else points[1:1 + len(incs[0])]
        rules = [None] + [predictor_rule(predictors, orders, p.thresholds, p.floor, c if k == 0 else None,
                                         record_bytes if k == 0 else None)
                          for p, c in zip(todo, counts)]
        ppls = masked_perplexities(gguf_path, chunks, rules, n_ctx, measure_cap(budget) if k == 0 else math.inf)
        if not math.isfinite(ppls[0]) or ppls[0] > 1e6:  # damaged weights that stay finite but say nothing
            raise RippleError(f"the model's perplexity on the calibration text is {ppls[0]:.3g}: its weights are "
                              "damaged; check the file (re-download or reconvert it)")
        incs.append([v / ppls[0] - 1.0 for v in ppls[1:]])
        dense = ppls[0] if dense is None else dense
    points[0].ppl_increase = 0.0
    kept = [points[0]]
    for i, (p, c) in enumerate(zip(points[1:1 + len(incs[0])], counts)):
        p.ppl_increase = max(inc[i] for inc in incs)
        p.density = float(c[0] / max(c[1], 1))
        p.read_share = float(min(1.0, c[2] / c[3])) if c[3] else 1.0
        if p.density < kept[-1].density - 1e-3:
            kept.append(p)
    return kept, dense
