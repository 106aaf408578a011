"""Ordering algorithms: permutations, planted structure, and the reads metric."""
import numpy as np
import pytest

from ripple_gguf.placement import (
    PLACEMENTS, coactivation_topk, group_starts, order_neurons, runs_per_token)


def planted_blocks(n_blocks=16, block=16, tokens=2000, per_token=2, noise=0.01, seed=0):
    """Neurons in hidden blocks that always fire together, scattered by a random permutation."""
    rng = np.random.default_rng(seed)
    n = n_blocks * block
    scatter = rng.permutation(n)  # scatter[b*block + m] = original index of block b's m-th neuron
    active = rng.random((tokens, n)) < noise
    for t in range(tokens):
        for b in rng.choice(n_blocks, per_token, replace=False):
            active[t, scatter[b * block:(b + 1) * block]] = True
    return active, scatter.reshape(n_blocks, block)


@pytest.mark.parametrize("method", PLACEMENTS)
def test_every_placement_is_a_permutation(method):
    active, _ = planted_blocks(tokens=300)
    order = order_neurons(active, method)
    assert sorted(order.tolist()) == list(range(active.shape[1]))


def test_coactivation_recovers_planted_blocks():
    active, blocks = planted_blocks()
    order = order_neurons(active, "coactivation")
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))
    for members in blocks:
        p = np.sort(pos[members])
        assert p[-1] - p[0] == len(members) - 1, "a planted block was split"
    # and the metric the project exists to reduce: ~2 blocks per token -> ~2 runs (+ noise)
    ident = runs_per_token(active).mean()
    placed = runs_per_token(active[:, order]).mean()
    assert placed < ident / 3


def test_frequency_order_puts_hot_neurons_first():
    rng = np.random.default_rng(1)
    p = np.linspace(0.01, 0.9, 64)
    active = rng.random((4000, 64)) < p[None, :]
    order = order_neurons(active, "frequency")
    assert set(order[:8].tolist()) <= set(range(48, 64))


def test_topk_excludes_self_and_counts_pairs():
    active = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 1]], dtype=bool)
    partners, counts = coactivation_topk(active, k=1, block=2)
    assert partners[:, 0].tolist() == [1, 0, 3, 2]
    assert counts[:, 0].tolist() == [2, 2, 2, 2]


def test_runs_per_token_counts_maximal_runs():
    active = np.array([[1, 1, 0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], dtype=bool)
    assert runs_per_token(active).tolist() == [3, 0, 1]


def test_group_starts_split_at_weak_links():
    active, blocks = planted_blocks(noise=0.0)
    order = order_neurons(active, "coactivation")
    starts = group_starts(active[:, order], max_group=64)
    assert starts[0] == 0 and np.all(np.diff(starts.astype(int)) > 0)
    assert len(starts) == 16  # one group per planted block


def test_two_opt_undoes_a_crossing_and_never_loses_weight():
    from ripple_gguf.placement import _two_opt
    n = 40
    w = np.zeros((n, n), dtype=np.int32)
    w[np.arange(n - 1), np.arange(1, n)] = 10  # best path: 0, 1, ..., n-1
    w = w + w.T
    crossed = np.r_[0:10, 29:9:-1, 30:40]  # segment 10..29 reversed: two links lost
    fixed = _two_opt(w, crossed, rounds=4)
    assert sorted(fixed.tolist()) == list(range(n))
    assert path_weight(w, fixed) == 10 * (n - 1) > path_weight(w, crossed)
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 50, (n, n)).astype(np.int32)
    noisy = noisy + noisy.T
    start = rng.permutation(n)
    assert path_weight(noisy, _two_opt(noisy, start, rounds=8)) > path_weight(noisy, start)


def path_weight(w, order):
    return int(w[order[:-1], order[1:]].sum())


def test_coactivation_order_matches_float_counts():
    """The int8 counting kernel gives the same top-k partners as a float32 matmul (ties aside)."""
    rng = np.random.default_rng(2)
    active = rng.random((3000, 300)) < rng.uniform(0.02, 0.4, 300)
    partners, counts = coactivation_topk(active, k=8, block=128)  # several blocks, mirrored
    a = active.astype(np.float32)
    c = a.T @ a
    np.fill_diagonal(c, -1)
    assert np.array_equal(np.sort(counts, axis=1), np.sort(c, axis=1)[:, -8:])
    assert np.array_equal(np.take_along_axis(c, partners.astype(np.int64), axis=1), counts)
