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
