"""Neuron ordering: which FFN neurons sit next to each other on disk (pure numpy, no I/O).

A token's active neurons are read as maximal runs of adjacent positions, so for an order `pos`
    runs/token = E[#active] - sum over adjacent pairs (a, b) of P(a and b active).
Minimising reads therefore means a max-weight Hamiltonian path with weight = co-activation count,
which Ripple (arXiv 2410.19274) approximates with greedy-edge linking. We keep only the top-k
partners of each neuron (memory O(n*k) instead of O(n^2)) and then re-link the fragment ends over
the exact co-activation among ends, so leftovers are still joined where it pays.
"""
from __future__ import annotations

import numpy as np

PLACEMENTS = ("coactivation", "frequency", "identity")


def coactivation_topk(active: np.ndarray, k: int = 32, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Top-k co-activation partners of every neuron.

    active: (tokens, n) bool. Returns (partners, counts), each (n, k); counts are how many tokens
    activate both; self-pairs excluded. Computed in row blocks so memory stays O(block * n).
    """
    n = active.shape[1]
    k = min(k, n - 1)
    a = active.astype(np.float32)
    partners = np.empty((n, k), dtype=np.int32)
    counts = np.empty((n, k), dtype=np.float32)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        c = a[:, lo:hi].T @ a  # (hi-lo, n) co-activation counts
        c[np.arange(hi - lo), np.arange(lo, hi)] = -1.0  # never partner with yourself
        idx = np.argpartition(-c, k - 1, axis=1)[:, :k]
        partners[lo:hi] = idx
        counts[lo:hi] = np.take_along_axis(c, idx, axis=1)
    return partners, counts


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
    freq = active.mean(axis=0)
    hot = np.flatnonzero(freq >= hot_freq)
    hot = hot[np.argsort(-freq[hot], kind="stable")]
    rest = np.flatnonzero(freq < hot_freq)
    order = np.concatenate([hot, rest[greedy_path(active[:, rest], k)]]) if len(rest) else hot
    by_freq = frequency_order(active)
    if runs_per_token(active[:, by_freq]).mean() < runs_per_token(active[:, order]).mean():
        return by_freq
    return order


def greedy_path(active: np.ndarray, k: int = 32, relink_rounds: int = 8) -> np.ndarray:
    """Greedy-edge Hamiltonian path over co-activation counts. active: (tokens, n) -> order (n,)."""
    n = active.shape[1]
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    freq = active.sum(axis=0).astype(np.float64)
    linker = _Linker(n)
    partners, counts = coactivation_topk(active, k)
    # Mutual top-k only: a cold neuron's best partners are hot ones, but linking it to a hot chain's
    # end early would cut the hot set into pieces; such edges are decided later, over exact counts.
    src = np.repeat(np.arange(n), partners.shape[1])
    dst = partners.ravel()
    pair = np.minimum(src, dst).astype(np.int64) * n + np.maximum(src, dst)
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
        a = active[:, ends].astype(np.float32)
        c = a.T @ a
        roots = np.array([linker.find(int(e)) for e in ends])
        c[roots[:, None] == roots[None, :]] = 0  # same fragment: would close a cycle
        kk = min(k, len(ends) - 1)
        idx = np.argpartition(-c, kk - 1, axis=1)[:, :kk]
        w = np.take_along_axis(c, idx, axis=1).ravel()
        i = np.repeat(ends, kk)
        j = ends[idx.ravel()]
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
    return order


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
    """Cut the stored order into neuron groups (active is already in stored order).

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
    """Mean contiguous reads per token of one layer under the stored order and the two baselines.

    active_stored: (tokens, n) activity with columns in stored order; order[p] = original index of
    stored position p; freq_stored: calibration activation frequency per stored position (the
    frequency baseline must not peek at the text being evaluated).
    """
    identity = active_stored[:, np.argsort(order, kind="stable")]
    by_freq = active_stored[:, np.argsort(-freq_stored, kind="stable")]
    return {"active": float(active_stored.sum(axis=1).mean()),
            "stored": float(runs_per_token(active_stored).mean()),
            "identity": float(runs_per_token(identity).mean()),
            "frequency": float(runs_per_token(by_freq).mean())}
