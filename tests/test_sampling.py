"""Checks of the item statistics, the Fenwick tree, the negative samplers and the SplitMix64 RNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core import rng, sampling
from drnn_core.sampling import POPULARITY, UNIFORM, ItemStats

MASK_64 = (1 << 64) - 1
N_DRAWS = 20_000
# z of the Wilson-Hilferty chi-square bound. A correct sampler exceeds the bound
# with probability about 3e-7 (the normal tail at z = 5), and the seeds are fixed,
# so the tests are deterministic.
CHI_SQUARE_Z = 5.0


# Pure-Python helpers.


def _prefix_sums(tree):
    """Return the prefix sums of a 1-based Fenwick tree, one per item."""
    n = tree.shape[0] - 1
    sums = np.zeros(n)
    for position in range(1, n + 1):
        total = 0.0
        index = position
        while index > 0:
            total += tree[index]
            index -= index & -index
        sums[position - 1] = total
    return sums


def _splitmix64(state, count):
    """Return ``count`` SplitMix64 outputs computed with Python integers from ``state``."""
    outputs = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK_64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK_64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK_64
        outputs.append(z ^ (z >> 31))
    return outputs


def _chi_square_limit(degrees):
    """Return the Wilson-Hilferty approximation of the chi-square quantile at CHI_SQUARE_Z."""
    c = 2.0 / (9.0 * degrees)
    return degrees * (1.0 - c + CHI_SQUARE_Z * math.sqrt(c)) ** 3


def _chi_square(observed, expected):
    return float(np.sum((observed - expected) ** 2 / expected))


def _stats_with_counts(counts, alpha, capacity=None):
    """Return ItemStats built by recording each item ``counts[item]`` times, in round-robin order."""
    counts = list(counts)
    stats = ItemStats.empty(capacity or len(counts), alpha)
    remaining = list(counts)
    while any(remaining):
        for item, left in enumerate(remaining):
            if left:
                sampling.record_item(stats.as_tuple(), item, alpha)
                remaining[item] -= 1
    return stats


def _draw(stats, positive, kind, seed, count=N_DRAWS):
    state = rng.new_rng_state(seed)
    return np.array([sampling.sample_negative(stats.as_tuple(), positive, kind, state) for _ in range(count)])


# Fenwick tree.


@pytest.mark.parametrize("size", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_build_fenwick_prefix_sums_match_cumsum(size, alpha):
    counts = np.random.default_rng(size).integers(0, 5, size).astype(np.int64)
    weights = np.where(counts > 0, counts.astype(np.float64) ** alpha, 0.0)

    tree = sampling.build_fenwick(counts, alpha)

    np.testing.assert_allclose(_prefix_sums(tree), np.cumsum(weights), rtol=1e-12)


def test_fenwick_add_prefix_sums_match_cumsum():
    generator = np.random.default_rng(3)
    weights = np.zeros(21)
    tree = np.zeros(22)

    for _ in range(200):
        item = int(generator.integers(21))
        delta = float(generator.uniform(0.0, 3.0))
        sampling.fenwick_add(tree, item, delta)
        weights[item] += delta

    np.testing.assert_allclose(_prefix_sums(tree), np.cumsum(weights), rtol=1e-12)


def test_fenwick_total_matches_sum():
    counts = np.arange(13, dtype=np.int64)

    tree = sampling.build_fenwick(counts, 1.0)

    assert sampling.fenwick_total(tree) == pytest.approx(float(counts.sum()), rel=1e-12)


def test_fenwick_find_matches_searchsorted():
    counts = np.array([3, 0, 1, 4, 0, 0, 2, 5, 1, 0, 6], dtype=np.int64)
    tree = sampling.build_fenwick(counts, 1.0)
    cumulative = np.cumsum(counts.astype(np.float64))
    # Integer weights make every sum exact, so the interval boundaries are checked too.
    targets = np.concatenate([np.arange(0.0, cumulative[-1]), np.arange(0.5, cumulative[-1], 1.0)])

    for target in targets:
        expected = int(np.searchsorted(cumulative, target, side="right"))
        assert sampling.fenwick_find(tree, float(target)) == expected, target


def test_fenwick_find_skips_zero_weights():
    counts = np.array([0, 0, 2, 0, 3], dtype=np.int64)
    tree = sampling.build_fenwick(counts, 1.0)

    found = {int(sampling.fenwick_find(tree, target)) for target in np.linspace(0.0, 4.99, 50)}

    assert found == {2, 4}


# Item statistics.


def test_record_item_counts_and_known_order():
    stats = ItemStats.empty(10, 0.75)

    for item in [4, 2, 4, 7, 2, 4]:
        sampling.record_item(stats.as_tuple(), item, 0.75)

    np.testing.assert_array_equal(stats.item_count, [0, 0, 2, 0, 3, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(stats.known_items[: stats.n_known], [4, 2, 7])
    np.testing.assert_array_equal(stats.known_items[stats.n_known:], -1)


def test_record_item_meta():
    stats = ItemStats.empty(10, 0.75)

    for item in [4, 2, 4, 7, 2]:
        sampling.record_item(stats.as_tuple(), item, 0.75)

    assert stats.meta[sampling.N_KNOWN] == 3
    assert stats.meta[sampling.N_ROWS] == 8


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.75, 1.0, 2.0])
def test_record_item_fenwick_matches_rebuild(alpha):
    stats = _stats_with_counts([5, 0, 1, 12, 3, 0, 7, 1], alpha)

    rebuilt = sampling.build_fenwick(stats.item_count, alpha)

    np.testing.assert_allclose(stats.fenwick, rebuilt, rtol=1e-12, atol=1e-12)


def test_item_stats_grow_keeps_counts_and_known_items():
    stats = _stats_with_counts([2, 0, 5, 1, 0, 3], 0.75)
    counts, known, meta = stats.item_count.copy(), stats.known_items.copy(), stats.meta.copy()

    stats.grow(16)

    assert stats.capacity == 16
    np.testing.assert_array_equal(stats.item_count[:6], counts)
    np.testing.assert_array_equal(stats.item_count[6:], 0)
    np.testing.assert_array_equal(stats.known_items[:6], known)
    np.testing.assert_array_equal(stats.known_items[6:], -1)
    np.testing.assert_array_equal(stats.meta, meta)


def test_item_stats_grow_keeps_weights():
    stats = _stats_with_counts([2, 0, 5, 1, 0, 3], 0.75)
    before = _prefix_sums(stats.fenwick)

    stats.grow(16)
    after = _prefix_sums(stats.fenwick)

    assert stats.fenwick.shape == (17,)
    np.testing.assert_allclose(after[:6], before, rtol=1e-12)
    np.testing.assert_allclose(after[6:], before[-1], rtol=1e-12)


def test_item_stats_grow_then_record_matches_rebuild():
    stats = _stats_with_counts([2, 0, 5, 1, 0, 3], 0.75)
    stats.grow(16)

    for item in [12, 3, 15, 12]:
        sampling.record_item(stats.as_tuple(), item, 0.75)

    np.testing.assert_allclose(stats.fenwick, sampling.build_fenwick(stats.item_count, 0.75), rtol=1e-12)


def test_item_stats_grow_smaller_is_noop():
    stats = _stats_with_counts([2, 0, 5], 0.75)
    arrays = [array.copy() for array in stats.as_tuple()]

    stats.grow(2)

    for actual, expected in zip(stats.as_tuple(), arrays):
        np.testing.assert_array_equal(actual, expected)


# Negative sampling.


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=2, max_size=12),
    st.integers(0, 11),
    st.sampled_from([UNIFORM, POPULARITY]),
    st.integers(0, 2**64 - 1),
)
def test_sample_negative_never_returns_positive(counts, positive, kind, seed):
    positive = positive % len(counts)
    stats = _stats_with_counts(counts, 0.75)

    draws = _draw(stats, positive, kind, seed, count=50)

    assert not np.any(draws == positive)
    assert np.all((draws == -1) | (stats.item_count[np.maximum(draws, 0)] > 0))


def test_sample_negative_uniform_frequencies():
    counts = [3, 0, 1, 7, 0, 2, 1, 9, 4, 0, 1, 2]
    positive = 3
    stats = _stats_with_counts(counts, 0.75)
    others = [item for item, count in enumerate(counts) if count > 0 and item != positive]

    draws = _draw(stats, positive, UNIFORM, seed=101)
    observed = np.array([np.count_nonzero(draws == item) for item in others])
    expected = np.full(len(others), draws.shape[0] / len(others))

    assert np.all(draws >= 0)
    assert observed.sum() == draws.shape[0]
    assert _chi_square(observed, expected) < _chi_square_limit(len(others) - 1)


@pytest.mark.parametrize("alpha", [0.0, 0.75, 1.0])
def test_sample_negative_popularity_frequencies(alpha):
    counts = [3, 0, 1, 7, 0, 2, 1, 30, 4, 0, 1, 12]
    positive = 3
    stats = _stats_with_counts(counts, alpha)
    others = [item for item, count in enumerate(counts) if count > 0 and item != positive]
    weights = np.array([counts[item] ** alpha for item in others])

    draws = _draw(stats, positive, POPULARITY, seed=202)
    observed = np.array([np.count_nonzero(draws == item) for item in others])
    expected = draws.shape[0] * weights / weights.sum()

    assert np.all(draws >= 0)
    assert observed.sum() == draws.shape[0]
    assert _chi_square(observed, expected) < _chi_square_limit(len(others) - 1)


@pytest.mark.parametrize("kind", [UNIFORM, POPULARITY])
@pytest.mark.parametrize(
    ("counts", "positive"),
    [([0, 0, 0], 1), ([0, 4, 0], 1)],
    ids=["no_known_item", "only_positive_known"],
)
def test_sample_negative_no_other_item_returns_minus_one(counts, positive, kind):
    stats = _stats_with_counts(counts, 0.75)

    negative = sampling.sample_negative(stats.as_tuple(), positive, kind, rng.new_rng_state(5))

    assert negative == -1


@pytest.mark.parametrize("kind", [UNIFORM, POPULARITY])
def test_sample_negative_unknown_positive_draws_only_known(kind):
    stats = _stats_with_counts([0, 0, 3, 0], 0.75)

    draws = _draw(stats, 0, kind, seed=6, count=100)

    np.testing.assert_array_equal(draws, 2)


@pytest.mark.parametrize("kind", [UNIFORM, POPULARITY])
def test_sample_negative_same_rng_state_same_draws(kind):
    stats = _stats_with_counts([3, 0, 1, 7, 2, 1], 0.75)
    first_state = rng.new_rng_state(77)
    second_state = first_state.copy()

    first = [sampling.sample_negative(stats.as_tuple(), 3, kind, first_state) for _ in range(200)]
    second = [sampling.sample_negative(stats.as_tuple(), 3, kind, second_state) for _ in range(200)]

    assert first == second
    np.testing.assert_array_equal(first_state, second_state)


def test_sample_negative_leaves_stats_unchanged():
    stats = _stats_with_counts([3, 0, 1, 7, 2, 1], 0.75)
    arrays = [array.copy() for array in stats.as_tuple()]

    _draw(stats, 3, POPULARITY, seed=8, count=100)
    _draw(stats, 3, UNIFORM, seed=8, count=100)

    for actual, expected in zip(stats.as_tuple(), arrays):
        np.testing.assert_array_equal(actual, expected)


# RNG.


def test_next_u64_matches_splitmix64_outputs():
    # The first SplitMix64 outputs for the state 0.
    expected = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    state = rng.new_rng_state(0)

    actual = [int(rng.next_u64(state)) for _ in range(3)]

    assert actual == expected


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_next_u64_matches_python_splitmix64(seed):
    state = rng.new_rng_state(seed)

    actual = [int(rng.next_u64(state)) for _ in range(5)]

    assert actual == _splitmix64(seed, 5)


def test_new_rng_state_masks_seed_to_64_bits():
    state = rng.new_rng_state((1 << 64) + 12345)

    assert state.dtype == np.uint64
    assert state.shape == (1,)
    assert int(state[0]) == 12345


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_next_float_in_unit_interval(seed):
    state = rng.new_rng_state(seed)

    values = [rng.next_float(state) for _ in range(20)]

    assert all(0.0 <= value < 1.0 for value in values)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**62), st.integers(0, 2**64 - 1))
def test_next_below_in_range(n, seed):
    state = rng.new_rng_state(seed)

    values = [rng.next_below(state, n) for _ in range(20)]

    assert all(0 <= value < n for value in values)


def test_next_below_one_returns_zero():
    state = rng.new_rng_state(9)

    values = {int(rng.next_below(state, 1)) for _ in range(100)}

    assert values == {0}


def test_next_below_frequencies_uniform():
    state = rng.new_rng_state(303)
    n = 7

    values = np.array([rng.next_below(state, n) for _ in range(N_DRAWS)])
    observed = np.bincount(values, minlength=n)

    assert observed.shape == (n,)
    assert _chi_square(observed, np.full(n, N_DRAWS / n)) < _chi_square_limit(n - 1)
