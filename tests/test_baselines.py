"""Checks of the Pop and Markov-1 kernels against the plain-Python references and hand-made streams."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core.baselines import (
    Markov1Ranker,
    PopRanker,
    markov1_ranks_reference,
    pop_ranks_reference,
)
from drnn_core.errors import ConfigError
from drnn_core.kernels import RANK_UNKNOWN_ITEM

# Few users and items, so that ties, repeats, self-transitions and new items are common.
EVENTS = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9)), max_size=80)


def _columns(events):
    users = np.array([user for user, _ in events], dtype=np.int32)
    items = np.array([item for _, item in events], dtype=np.int32)
    return users, items


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_pop_ranker_matches_reference(events):
    _, items = _columns(events)

    ranks = PopRanker().rank(items)

    assert ranks.tolist() == pop_ranks_reference(items.tolist())


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_markov1_ranker_matches_reference(events):
    users, items = _columns(events)

    ranks = Markov1Ranker(pool_size=1).rank(users, items)

    assert ranks.tolist() == markov1_ranks_reference(users.tolist(), items.tolist())


@settings(max_examples=100, deadline=None)
@given(EVENTS, st.data())
def test_markov1_ranker_chunks_match_one_call(events, data):
    users, items = _columns(events)
    cut = data.draw(st.integers(0, len(events)))
    whole = Markov1Ranker().rank(users, items)

    chunked = Markov1Ranker(pool_size=1)
    parts = [chunked.rank(users[:cut], items[:cut]), chunked.rank(users[cut:], items[cut:])]

    assert np.concatenate(parts).tolist() == whole.tolist()


@settings(max_examples=100, deadline=None)
@given(EVENTS, st.data())
def test_pop_ranker_chunks_match_one_call(events, data):
    _, items = _columns(events)
    cut = data.draw(st.integers(0, len(events)))
    whole = PopRanker().rank(items)

    chunked = PopRanker()
    parts = [chunked.rank(items[:cut]), chunked.rank(items[cut:])]

    assert np.concatenate(parts).tolist() == whole.tolist()


def test_markov1_ranker_large_stream_matches_reference():
    rng = np.random.default_rng(5)
    users = rng.integers(0, 30, size=3000).astype(np.int32)
    items = np.minimum(rng.zipf(1.5, size=3000), 60).astype(np.int32) - 1

    ranker = Markov1Ranker(pool_size=8)
    ranks = ranker.rank(users, items)

    assert ranks.tolist() == markov1_ranks_reference(users.tolist(), items.tolist())
    assert ranker.pool_item.shape[0] > 8


def test_pop_ranker_new_item_is_unknown():
    ranks = PopRanker().rank(np.array([3, 3, 5], dtype=np.int32))

    assert ranks.tolist() == [RANK_UNKNOWN_ITEM, 0, RANK_UNKNOWN_ITEM]


def test_pop_ranker_ties_count_against():
    ranks = PopRanker().rank(np.array([0, 1, 2, 1], dtype=np.int32))

    assert ranks[3] == 2


def test_pop_ranker_more_popular_item_ranks_first():
    ranks = PopRanker().rank(np.array([0, 1, 1, 0, 1, 1], dtype=np.int32))

    assert ranks[3] == 1
    assert ranks[5] == 0


def test_markov1_ranker_transition_beats_popularity():
    # u1 walks 0 -> 1; u2 makes item 2 the most popular; u3 then goes 0 -> 1.
    users = np.array([1, 1, 2, 2, 2, 3, 3], dtype=np.int32)
    items = np.array([0, 1, 2, 2, 2, 0, 1], dtype=np.int32)

    markov = Markov1Ranker().rank(users, items)
    pop = PopRanker().rank(items)

    assert markov[6] == 0
    assert pop[6] == 2


def test_markov1_ranker_new_user_gets_pop_order():
    users = np.array([0, 0, 0, 1], dtype=np.int32)
    items = np.array([4, 2, 4, 2], dtype=np.int32)

    markov = Markov1Ranker().rank(users, items)
    pop = PopRanker().rank(items)

    assert markov[3] == pop[3]
    assert markov[3] == 1


def test_markov1_ranker_unseen_successor_ranks_after_successors():
    # Item 3 is the most popular but never followed item 0, so the two successors of 0 outrank it.
    users = np.array([0, 0, 1, 1, 2, 2, 2, 2, 3, 3], dtype=np.int32)
    items = np.array([0, 1, 0, 2, 3, 3, 3, 3, 0, 3], dtype=np.int32)

    ranks = Markov1Ranker().rank(users, items)

    assert ranks[9] == 2


def test_markov1_ranker_self_transition_counts():
    users = np.array([0, 0, 1, 1], dtype=np.int32)
    items = np.array([5, 5, 6, 5], dtype=np.int32)

    ranks = Markov1Ranker().rank(users, items)

    assert ranks.tolist() == markov1_ranks_reference(users.tolist(), items.tolist())


def test_markov1_ranker_new_item_is_unknown():
    users = np.array([0, 0], dtype=np.int32)
    items = np.array([0, 1], dtype=np.int32)

    ranks = Markov1Ranker().rank(users, items)

    assert ranks.tolist() == [RANK_UNKNOWN_ITEM, RANK_UNKNOWN_ITEM]


def test_markov1_ranker_counts_distinct_transitions():
    users = np.array([0, 0, 0, 1, 1, 1], dtype=np.int32)
    items = np.array([0, 1, 0, 0, 1, 2], dtype=np.int32)

    ranker = Markov1Ranker()
    ranker.rank(users, items)

    assert ranker.transitions == 3


def test_markov1_ranker_rejects_shape_mismatch():
    with pytest.raises(ConfigError, match="same shape"):
        Markov1Ranker().rank(np.zeros(3, dtype=np.int32), np.zeros(2, dtype=np.int32))


def test_pop_ranker_rejects_negative_item():
    with pytest.raises(ConfigError, match="non-negative"):
        PopRanker().rank(np.array([0, -1], dtype=np.int32))


def test_reference_rankers_accept_string_ids():
    users = ["a", "a", "b", "b"]
    items = ["x", "y", "x", "y"]

    assert pop_ranks_reference(items) == [RANK_UNKNOWN_ITEM, RANK_UNKNOWN_ITEM, 1, 1]
    assert markov1_ranks_reference(users, items) == [RANK_UNKNOWN_ITEM, RANK_UNKNOWN_ITEM, 1, 0]
