"""Tests of the basket Pop and Markov-1 kernels against their plain-Python definitions."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core.basket_baselines import (
    BasketMarkov1Ranker,
    BasketPopRanker,
    basket_markov1_ranks_reference,
    basket_pop_ranks_reference,
)
from drnn_core.kernels import RANK_NOT_EVALUATED, RANK_UNKNOWN_ITEM

basket_streams = st.lists(
    st.tuples(st.integers(0, 3), st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True)),
    min_size=1,
    max_size=40,
)


def _csr(stream):
    users = np.array([user for user, _ in stream], dtype=np.int32)
    offsets = np.zeros(len(stream) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(items) for _, items in stream])
    items = np.array([item for _, basket in stream for item in basket], dtype=np.int32)
    return users, offsets, items


def _ranks(ranker_class, stream, chunk=None, **kwargs):
    baskets = _csr(stream)
    ranker = ranker_class(baskets, **kwargs)
    ranks = np.zeros(len(stream), dtype=np.int64)
    step = chunk or len(stream)
    for begin in range(0, len(stream), step):
        ranker.rank(begin, min(begin + step, len(stream)), ranks)
    return ranks.tolist()


@settings(max_examples=80, deadline=None)
@given(basket_streams)
def test_basket_pop_ranker_matches_reference(stream):
    expected = basket_pop_ranks_reference([u for u, _ in stream], [b for _, b in stream])

    assert _ranks(BasketPopRanker, stream) == expected


@settings(max_examples=80, deadline=None)
@given(basket_streams, st.integers(1, 7))
def test_basket_markov1_ranker_matches_reference(stream, chunk):
    expected = basket_markov1_ranks_reference([u for u, _ in stream], [b for _, b in stream])

    assert _ranks(BasketMarkov1Ranker, stream, chunk=chunk, pool_size=4) == expected


def test_basket_markov1_ranker_sums_previous_basket_transitions():
    stream = [
        (0, [0, 1]), (0, [2]),
        (1, [1]), (1, [3]),
        (1, [3]), (1, [3]),
        (2, [0, 1]), (2, [2, 3]),
    ]

    ranks = _ranks(BasketMarkov1Ranker, stream)

    # Item 2 scores T[0, 2] + T[1, 2] = 2, item 3 scores T[1, 3] = 1, so 2 ranks first.
    assert ranks[7] == 0
    assert ranks[0] == RANK_NOT_EVALUATED


def test_basket_pop_ranker_unknown_basket():
    stream = [(0, [0]), (0, [5, 6])]

    assert _ranks(BasketPopRanker, stream) == [RANK_NOT_EVALUATED, RANK_UNKNOWN_ITEM]


def test_basket_pop_ranker_best_item_counts():
    stream = [(0, [0, 1]), (1, [1]), (1, [2]), (0, [2, 1])]

    # Item 1 is in two baskets and ranks first; item 2's rank 1 is not the best.
    assert _ranks(BasketPopRanker, stream)[3] == 0
