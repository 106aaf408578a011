"""Neuron ordering: which FFN neurons sit next to each other on disk (numpy + torch kernels, no I/O).

A token's active neurons are read as maximal runs of adjacent positions, so for an order `pos`
    runs/token = E[#active] - sum over adjacent pairs (a, b) of P(a and b active).
Minimising reads therefore means a max-weight Hamiltonian path with weight = co-activation count,
which Ripple (arXiv 2410.19274) approximates with greedy-edge linking. We keep only the top-k
partners of each neuron (memory O(n*k) instead of O(n^2)) and then re-link the fragment ends over
the exact co-activation among ends, so leftovers are still joined where it pays.

Cost: one int8 matmul of the activity with itself (exact counts; symmetric, so only blocks on and
above the diagonal), kept whole up to FULL_COUNTS_MAX neurons so that every re-link round and the
final 2-opt pass are slices of it; torch.topk for the partners. On the 2-core dev box ~0.6 s CPU
per SmolLM2 layer (35k tokens x 1536 neurons) and ~6 s for an 8B-size one (8k x 14336): ~10x
less than float32 BLAS + argpartition, with slightly fewer held-out reads (the 2-opt pass);
tools/bench_convert_stages.py measures both.
"""
from __future__ import annotations

import numpy as np

PLACEMENTS = ("coactivation", "frequency", "identity")


class _Bits:
    """Neuron-major copy of a (tokens, n) activity matrix, for exact co-activation counts.

    Counts are A_I^T A_J of the 0/1 matrix as an int8 x int8 -> int32 matmul (torch._int_mm: VNNI
    on x86, exact, ~3x a float32 BLAS matmul on the 2-core dev box). `packed` holds the same bits
    8 tokens to a byte for cheap counts of single pairs.
    """

    def __init__(self, active: np.ndarray):
        import torch
        active = np.ascontiguousarray(active, dtype=bool)
        self.tokens = active.shape[0]
        # (n, tokens); torch transposes a byte matrix ~4x faster than numpy
        self.rows = torch.from_numpy(active.view(np.int8)).T.contiguous().numpy().view(bool)
        self.packed = np.packbits(self.rows, axis=1)
        self.freq = self.rows.sum(axis=1, dtype=np.int64)

    def take(self, idx: np.ndarray):
        """Rows (neurons) idx as an int8 tensor, gathered once so that blocks of it are slices
        (numpy's row gather: torch's index_select on int8 rows was ~50x slower)."""
        import torch
        return torch.from_numpy(self.rows[np.asarray(idx, dtype=np.int64)].view(np.int8))

    @staticmethod
    def counts(a, b) -> np.ndarray:
        """(len(a), len(b)) int32 co-activation counts of two row sets from `take`."""
        import torch
        if a.shape[0] < 17 or b.shape[0] < 17:  # int_mm wants more than 16 rows
            return (a.to(torch.int32) @ b.to(torch.int32).T).numpy()
        return torch._int_mm(a, b.T).numpy()

    def pair_counts(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Co-activation count of each pair (i[p], j[p])."""
        return np.bitwise_count(self.packed[i] & self.packed[j]).sum(axis=1, dtype=np.int64)

    def mean_runs(self, order: np.ndarray) -> float:
        """runs_per_token(active[:, order]).mean(), without permuting the matrix: each token needs
        one read per active neuron minus one per adjacent pair that is active together."""
        both = self.pair_counts(order[:-1], order[1:]).sum() if len(order) > 1 else 0
        return float((self.freq[order].sum() - both) / max(self.tokens, 1))


def _topk_rows(c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest entries of each row, in any order (torch.topk: ~15x
    numpy's argpartition on these shapes)."""
    import torch
    if k >= c.shape[1]:
        return np.array(np.broadcast_to(np.arange(c.shape[1]), c.shape)), c.copy()
    v, i = torch.topk(torch.from_numpy(c), k, dim=1, sorted=False)
    return i.numpy(), v.numpy()


def _topk_partners(bits: _Bits, cols: np.ndarray, k: int, block: int,
                   roots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k co-activation partners among `cols` (positions into cols) of every neuron in cols;
    pairs with equal `roots` (same fragment) count 0.

    The count matrix is symmetric, so only blocks on and above the diagonal are computed; each gives
    candidates to both its row block and (transposed) its column block, merged at the end."""
    n = len(cols)
    k = min(k, n - 1)
    bounds = [(lo, min(n, lo + block)) for lo in range(0, n, block)]
    cand_i: list[list[np.ndarray]] = [[] for _ in bounds]
    cand_v: list[list[np.ndarray]] = [[] for _ in bounds]
    rows = bits.take(cols)
    for bi, (lo, hi) in enumerate(bounds):
        for bj in range(bi, len(bounds)):
            lo2, hi2 = bounds[bj]
            c = bits.counts(rows[lo:hi], rows[lo2:hi2])
            if roots is not None:
                c[roots[lo:hi, None] == roots[None, lo2:hi2]] = 0  # would close a cycle
            elif bi == bj:
                np.fill_diagonal(c, -1)  # never partner with yourself
            idx, val = _topk_rows(c, k)
            cand_i[bi].append(idx + lo2)
            cand_v[bi].append(val)
            if bj != bi:
                idx, val = _topk_rows(c.T, k)
                cand_i[bj].append(idx + lo)
                cand_v[bj].append(val)
    partners = np.empty((n, k), dtype=np.int32)
    counts = np.empty((n, k), dtype=np.float32)
    for bi, (lo, hi) in enumerate(bounds):
        ci, cv = np.concatenate(cand_i[bi], axis=1), np.concatenate(cand_v[bi], axis=1)
        idx, val = _topk_rows(cv, k)
        partners[lo:hi] = np.take_along_axis(ci, idx, axis=1)
        counts[lo:hi] = val
    return partners, counts


FULL_COUNTS_MAX = 6144  # up to this many neurons the whole co-activation matrix is kept (int32)


def _count_matrix(bits: _Bits, cols: np.ndarray, block: int) -> np.ndarray:
    """Exact co-activation counts among `cols`, (n, n) int32, kept so that top-k partners, every
    re-link round and 2-opt are slices of it. Symmetric: blocks above the diagonal are mirrored."""
    rows = bits.take(cols)
    n = len(cols)
    if n <= 2 * 512:
        return bits.counts(rows, rows)
    block = min(block, -(-n // 2))  # at least two blocks: 3 of 4 products instead of 4
    full = np.empty((n, n), dtype=np.int32)
    for lo in range(0, n, block):
        for lo2 in range(lo, n, block):
            c = bits.counts(rows[lo:lo + block], rows[lo2:lo2 + block])
            full[lo:lo + block, lo2:lo2 + block] = c
            if lo2 != lo:
                full[lo2:lo2 + block, lo:lo + block] = c.T
    return full


def _topk_among(full: np.ndarray, sel: np.ndarray, k: int, block: int,
                roots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """_topk_partners from a kept count matrix: partners of each of `sel` among `sel` (positions
    into sel); pairs with equal `roots` count 0, else self-pairs are excluded."""
    n = len(sel)
    k = min(k, n - 1)
    partners = np.empty((n, k), dtype=np.int32)
    counts = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        c = full[np.ix_(sel[lo:hi], sel)]
        if roots is not None:
            c[roots[lo:hi, None] == roots[None, :]] = 0  # would close a cycle
        else:
            c[np.arange(hi - lo), np.arange(lo, hi)] = -1  # never partner with yourself
        partners[lo:hi], counts[lo:hi] = _topk_rows(c, k)
    return partners, counts


def coactivation_topk(active: np.ndarray, k: int = 32, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-k co-activation partners of every neuron.

    active: (tokens, n) bool. Returns (partners, counts), each (n, k); counts are how many tokens
    activate both; self-pairs excluded. Computed in blocks so memory stays O(block^2 + n * k).
    """
    bits = _Bits(active)
    return _topk_partners(bits, np.arange(active.shape[1]), k, block)


class _Linker:
    """Degree-<=2, acyclic edge linking (union-find): the greedy-edge path heuristic."""

    def __init__(self, n: int):
        self.parent = np.arange(n)
        self.degree = np.zeros(n, dtype=np.int8)
        self.nbr = np.full((n, 2), -1, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def link_greedy(self, i: np.ndarray, j: np.ndarray, w: np.ndarray) -> int:
        """Take edges by descending weight; link unless an end is full or it closes a cycle."""
        order = np.argsort(-w, kind="stable")
        linked = 0
        degree, nbr = self.degree, self.nbr
        for a, b in zip(i[order].tolist(), j[order].tolist()):
            if a == b or degree[a] >= 2 or degree[b] >= 2:
                continue
            ra, rb = self.find(a), self.find(b)
            if ra == rb:
                continue
            self.parent[ra] = rb
            nbr[a, degree[a]] = b
            nbr[b, degree[b]] = a
            degree[a] += 1
            degree[b] += 1
            linked += 1
        return linked

    def paths(self) -> list[list[int]]:
        """Walk every fragment from one end."""
        seen = np.zeros(len(self.degree), dtype=bool)
        out = []
        for start in np.flatnonzero(self.degree < 2).tolist():
            if seen[start]:
                continue
            path, prev, cur = [], -1, start
            while cur != -1:
                seen[cur] = True
                path.append(cur)
                a, b = self.nbr[cur]
                nxt = a if a != prev else b
                if nxt != -1 and seen[nxt]:
                    nxt = -1
                prev, cur = cur, int(nxt)
            out.append(path)
        return out


def coactivation_order(active: np.ndarray, k: int = 32, hot_freq: float = 0.5) -> np.ndarray:
    """Order neurons so that co-active ones are adjacent. active: (tokens, n) bool -> order (n,).

    Neurons active on at least `hot_freq` of tokens are read on almost every token anyway: they go
    first as one block (hottest first); the rest are ordered by the greedy-edge path. Near-always-on
    neurons make co-activation counts nearly tied, where greedy linking fragments the hot block
    (PowerInfer-2 makes the same split: hot neurons vs co-activation among the rest). The result is
    kept only if it needs fewer reads on the calibration tokens than plain frequency order.
    """
    from .predictor import torch_threads
    bits = _Bits(active)
    freq = bits.freq / max(bits.tokens, 1)
    hot = np.flatnonzero(freq >= hot_freq)
    hot = hot[np.argsort(-freq[hot], kind="stable")]
    rest = np.flatnonzero(freq < hot_freq)
    with torch_threads(large=active.size >= 2**22):
        order = np.concatenate([hot, rest[_greedy_path(bits, rest, k)]]) if len(rest) else hot
    by_freq = np.argsort(-bits.freq, kind="stable").astype(np.int64)  # = frequency_order(active)
    if bits.mean_runs(by_freq) < bits.mean_runs(order):
        return by_freq
    return order


def greedy_path(active: np.ndarray, k: int = 32, relink_rounds: int = 8) -> np.ndarray:
    """Greedy-edge Hamiltonian path over co-activation counts. active: (tokens, n) -> order (n,)."""
    return _greedy_path(_Bits(active), np.arange(active.shape[1]), k, relink_rounds)


def _greedy_path(bits: _Bits, cols: np.ndarray, k: int = 32, relink_rounds: int = 8,
                 block: int = 2048, two_opt_rounds: int = 8) -> np.ndarray:
    """greedy_path over the neurons `cols` of `bits`; returns positions into cols."""
    n = len(cols)
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    freq = bits.freq[cols].astype(np.float64)
    linker = _Linker(n)
    # small layers: all counts in one product, kept for the re-link rounds; large ones: blocks for
    # the first pass, then the ends' counts once they are few enough (ends only ever shrink)
    full, full_sel = (_count_matrix(bits, cols, block), np.arange(n)) if n <= FULL_COUNTS_MAX else (None, None)

    def topk(sel: np.ndarray, kk: int, roots: np.ndarray | None = None):
        nonlocal full, full_sel
        if full is None and len(sel) <= FULL_COUNTS_MAX and roots is not None:
            full, full_sel = _count_matrix(bits, cols[sel], block), sel
        if full is None:
            return _topk_partners(bits, cols[sel], kk, block, roots)
        return _topk_among(full, np.searchsorted(full_sel, sel), kk, block, roots)

    partners, counts = topk(np.arange(n), k)
    # Mutual top-k only: a cold neuron's best partners are hot ones, but linking it to a hot chain's
    # end early would cut the hot set into pieces; such edges are decided later, over exact counts.
    src = np.repeat(np.arange(n), partners.shape[1])
    dst = partners.ravel().astype(np.int64)
    pair = np.minimum(src, dst) * n + np.maximum(src, dst)
    uniq, seen = np.unique(pair, return_counts=True)
    mutual = np.isin(pair, uniq[seen == 2]) & (src < dst)
    keep = mutual & (counts.ravel() > 0)
    linker.link_greedy(src[keep], dst[keep], counts.ravel()[keep])

    # Re-link fragment ends: their best partners were often already full (hot neurons are everyone's
    # friend), so score ends against ends only, using exact counts over that smaller set.
    for _ in range(relink_rounds):
        ends = np.flatnonzero(linker.degree < 2)
        if len(ends) < 2:
            break
        roots = np.array([linker.find(int(e)) for e in ends])
        idx, w = topk(ends, min(k, len(ends) - 1), roots)
        i = np.repeat(ends, idx.shape[1])
        j = ends[idx.ravel()]
        w = w.ravel()
        keep = w > 0
        if not keep.any() or linker.link_greedy(i[keep], j[keep], w[keep]) == 0:
            break

    # Remaining fragments: hottest first (what LLM-in-a-flash/PowerInfer would keep resident),
    # each oriented so its hotter end leads.
    paths = linker.paths()
    for p in paths:
        if freq[p[-1]] > freq[p[0]]:
            p.reverse()
    paths.sort(key=lambda p: -freq[p].mean())
    order = np.fromiter((x for p in paths for x in p), dtype=np.int64, count=n)
    if full is not None and len(full_sel) == n:  # a round costs O(n^2): fewer rounds for big n
        order = _two_opt(full, order, int(two_opt_rounds * min(1.0, (2048 / n) ** 2)))
    return order


def _two_opt(counts: np.ndarray, order: np.ndarray, rounds: int) -> np.ndarray:
    """Improve a path by segment reversals (2-opt): reversing order[i..j] swaps the links
    (i-1, i) + (j, j+1) for (i-1, j) + (i, j+1). Each round scores every reversal at once from the
    count matrix and applies the best non-overlapping ones. Greedy linking leaves such crossings;
    a few rounds cut held-out reads by a further ~0.2-0.5% on SmolLM2."""
    o = order.copy()
    n = len(o)
    if n < 4:
        return o
    for _ in range(rounds):
        c = counts[np.ix_(o, o)]
        link = c[np.arange(n - 1), np.arange(1, n)]  # link[p]: count of the pair (p, p+1)
        gain = c[:-2, 1:-1] + c[1:-1, 2:]          # [i-1, j-1]: new links (i-1, j) and (i, j+1)
        gain -= link[:-1, None]
        gain -= link[None, 1:]
        flat = np.flatnonzero(gain.ravel() > 0)
        i, j = np.divmod(flat, n - 2)
        keep = j > i
        i, j, g = i[keep] + 1, j[keep] + 1, gain.ravel()[flat[keep]]
        if not len(g):
            break
        best = np.argpartition(-g, 1023)[:1024] if len(g) > 1024 else np.arange(len(g))
        done: list[tuple[int, int]] = []
        for k in best[np.argsort(-g[best], kind="stable")].tolist():
            a, b = int(i[k]), int(j[k])
            # the links an applied reversal changed or relies on must not be touched again
            if all(b + 1 < a2 - 1 or a - 1 > b2 + 1 for a2, b2 in done):
                o[a:b + 1] = o[a:b + 1][::-1].copy()
                done.append((a, b))
    return o


def frequency_order(active: np.ndarray) -> np.ndarray:
    """Hot neurons first (stable, so ties keep their original order)."""
    return np.argsort(-active.sum(axis=0), kind="stable").astype(np.int64)


def order_neurons(active: np.ndarray, method: str) -> np.ndarray:
    if method == "coactivation":
        return coactivation_order(active)
    if method == "frequency":
        return frequency_order(active)
    if method == "identity":
        return np.arange(active.shape[1], dtype=np.int64)
    raise ValueError(f"unknown placement {method!r}; choose one of {', '.join(PLACEMENTS)}")


def runs_per_token(active: np.ndarray) -> np.ndarray:
    """Contiguous reads each token needs: maximal runs of active positions. active: (tokens, n)."""
    a = active.astype(np.int8)
    starts = a[:, :1].sum(axis=1) + (np.diff(a, axis=1) == 1).sum(axis=1)
    return starts.astype(np.float64)


def group_starts(active: np.ndarray, min_link: float = 0.5, max_group: int = 64) -> np.ndarray:
    """Cut the pack order into neuron groups (active is already in pack order).

    A new group starts where two neighbours rarely fire together (co-activation below `min_link` of
    the rarer one's activations) or the group reached `max_group`: a group is a unit that tends to be
    read as one range. Returns the start position of each group (first is 0).
    """
    n = active.shape[1]
    a = active.astype(np.float32)
    both = (a[:, :-1] * a[:, 1:]).sum(axis=0)
    rarer = np.minimum(a[:, :-1].sum(axis=0), a[:, 1:].sum(axis=0))
    weak = both < min_link * np.maximum(rarer, 1)
    starts = [0]
    for p in range(1, n):
        if weak[p - 1] or p - starts[-1] >= max_group:
            starts.append(p)
    return np.asarray(starts, dtype=np.uint32)


def reads_by_method(active_stored: np.ndarray, order: np.ndarray, freq_stored: np.ndarray) -> dict[str, float]:
    """Mean contiguous reads per token of one layer under the pack (stored) order and the two baselines.

    active_stored: (tokens, n) activity with columns in pack order; order[p] = GGUF neuron index at
    stored position p; freq_stored: calibration activation frequency per stored position (the
    frequency baseline must not peek at the text being evaluated).
    """
    identity = active_stored[:, np.argsort(order, kind="stable")]
    by_freq = active_stored[:, np.argsort(-freq_stored, kind="stable")]
    return {"active": float(active_stored.sum(axis=1).mean()),
            "stored": float(runs_per_token(active_stored).mean()),
            "identity": float(runs_per_token(identity).mean()),
            "frequency": float(runs_per_token(by_freq).mean())}
