"""Pop and Markov-1 baselines for basket events: Numba ranking kernels and plain-Python references.

A basket event of a user with an earlier basket is ranked before it is
counted. Its rank is the smallest rank of its known items, where an item's rank
is the number of other known items whose score is greater than or equal to its
own (ties count against). A basket with no known item gets
``RANK_UNKNOWN_ITEM``, and a user's first basket ``RANK_NOT_EVALUATED``.

- Pop: score(j) = number of earlier baskets that contain j.
- Markov-1: score(j) = sum over the items p of the user's previous basket of
  T[p, j], plus pop(j) / (1 + max pop). T[p, j] is the number of earlier pairs
  of consecutive baskets of one user with p in the first and j in the second.

As in ``drnn_core.baselines``, the popularity term is below 1, so the kernels
compare (transitions, popularity) integer pairs, which is exact. Baskets must
hold distinct items, as ``streamer.datasets.read_baskets`` returns them.
"""

from __future__ import annotations

import collections
import fractions
from collections.abc import Hashable, Sequence

import numpy as np
from numba import njit, types

from drnn_core.baselines import INITIAL_LIST_CAPACITY, count_item, move_successor_list
from drnn_core.kernels import RANK_NOT_EVALUATED, RANK_UNKNOWN_ITEM

NO_BASKET = -1
POOL_USED = 0
POOL_NEEDED = 1
POOL_STAMP = 2

_I32_1D = types.Array(types.int32, 1, "C")
_I64_1D = types.Array(types.int64, 1, "C")

BASKETS_TYPE = types.Tuple((_I32_1D, _I64_1D, _I32_1D))
POP_STATE_TYPE = types.Tuple((_I64_1D, _I64_1D, _I64_1D))
MARKOV_STATE_TYPE = types.Tuple(
    (_I64_1D, _I64_1D, _I64_1D, _I64_1D, _I64_1D, _I64_1D, _I32_1D, _I64_1D, _I64_1D, _I64_1D, _I64_1D, _I64_1D)
)


@njit(types.void(BASKETS_TYPE, types.int64, types.int64, POP_STATE_TYPE, _I64_1D), nogil=True, cache=True)
def basket_pop_ranks(baskets, begin, end, state, ranks):
    """Rank baskets ``begin`` to ``end - 1`` by popularity, then count their items, in order.

    Parameters
    ----------
    baskets : tuple
        (users int32 (N,), basket_offsets int64 (N + 1,), basket_items int32 (total,)).
    state : tuple
        (item_count int64 (n_items,), count_at_least int64 (>= N + 2,),
        last_basket int64 (n_users,)), updated in place; ``count_at_least[c]``
        is the number of items in at least c baskets.
    ranks : ndarray, shape (N,), int64
        Output for the baskets in [begin, end).
    """
    users, offsets, basket_items = baskets
    item_count, count_at_least, last_basket = state
    for e in range(begin, end):
        user = users[e]
        if last_basket[user] == NO_BASKET:
            ranks[e] = RANK_NOT_EVALUATED
        else:
            best = np.int64(0)
            for entry in range(offsets[e], offsets[e + 1]):
                best = max(best, item_count[basket_items[entry]])
            ranks[e] = RANK_UNKNOWN_ITEM if best == 0 else count_at_least[best] - 1
        for entry in range(offsets[e], offsets[e + 1]):
            count_item(item_count, count_at_least, np.int64(basket_items[entry]))
        last_basket[user] = e


@njit(types.int64(_I64_1D, _I64_1D, _I64_1D, _I64_1D, types.int64, types.int64, types.int64), nogil=True, cache=True)
def _markov1_best_rank(item_count, count_at_least, transitions, touched, n_touched, best, best_transitions):
    """Return the rank of ``best`` given the summed transition counts of the touched items."""
    count = item_count[best]
    if best_transitions > 0:
        rank = np.int64(0)
        for k in range(n_touched):
            other = touched[k]
            if other == best:
                continue
            other_transitions = transitions[other]
            if other_transitions > best_transitions or (
                other_transitions == best_transitions and item_count[other] >= count
            ):
                rank += 1
        return rank

    # Every touched item has transitions and ranks above best; the rest tie with
    # it at zero transitions and rank by popularity.
    rank = n_touched + count_at_least[count] - 1
    for k in range(n_touched):
        if item_count[touched[k]] >= count:
            rank -= 1
    return rank


@njit(types.int64(BASKETS_TYPE, types.int64, types.int64, MARKOV_STATE_TYPE, _I64_1D), nogil=True, cache=True)
def basket_markov1_ranks(baskets, begin, end, state, ranks):
    """Rank baskets ``begin`` to ``end - 1`` by the basket Markov-1 score, then count them, in order.

    Each item p owns a list of (successor, count) pairs in a shared pool, as
    in ``baselines.markov1_ranks``. Ranking a basket costs time proportional to
    the summed list lengths of the previous basket's items.

    Parameters
    ----------
    baskets : tuple
        See ``basket_pop_ranks``.
    state : tuple
        Twelve arrays, updated in place:

        - item_count, count_at_least and last_basket as in ``basket_pop_ranks``.
        - list_start, list_length, list_capacity int64 (n_items,): each item's successor list in the pool.
        - pool_item int32 (P,) and pool_count int64 (P,): the successors and their transition counts.
        - pool_meta int64 (3,): the pool entries in use, the free entries that
          the first unprocessed basket needs, and a stamp counter.
        - Scratch space: transitions int64 (n_items,) of zeros, touched int64
          (n_items,) and stamp int64 (n_items,).
    ranks : ndarray, shape (N,), int64
        Output for the baskets in [begin, end).

    Returns
    -------
    int
        ``end`` when every basket was processed, else the index of the first
        basket whose new transitions may not fit in the pool. That basket is
        not counted: grow the pool by ``pool_meta[POOL_NEEDED]`` entries and
        call again from there.
    """
    users, offsets, basket_items = baskets
    (item_count, count_at_least, last_basket, list_start, list_length, list_capacity,
     pool_item, pool_count, pool_meta, transitions, touched, stamp) = state

    for e in range(begin, end):
        user = users[e]
        start, stop = offsets[e], offsets[e + 1]
        previous = last_basket[user]
        if previous == NO_BASKET:
            ranks[e] = RANK_NOT_EVALUATED
            for entry in range(start, stop):
                count_item(item_count, count_at_least, np.int64(basket_items[entry]))
            last_basket[user] = e
            continue

        # A list grows by at most the basket size, and its moves use at most
        # twice its final capacity, which bounds the pool entries this basket needs.
        needed = np.int64(0)
        for entry in range(offsets[previous], offsets[previous + 1]):
            p = basket_items[entry]
            needed += INITIAL_LIST_CAPACITY + 4 * (list_length[p] + stop - start)
        if pool_item.shape[0] - pool_meta[POOL_USED] < needed:
            pool_meta[POOL_NEEDED] = needed
            return e

        n_touched = 0
        for entry in range(offsets[previous], offsets[previous + 1]):
            p = basket_items[entry]
            for k in range(list_start[p], list_start[p] + list_length[p]):
                successor = pool_item[k]
                if transitions[successor] == 0:
                    touched[n_touched] = successor
                    n_touched += 1
                transitions[successor] += pool_count[k]

        best = np.int64(-1)
        for entry in range(start, stop):
            item = np.int64(basket_items[entry])
            if item_count[item] == 0:
                continue
            if best < 0 or transitions[item] > transitions[best] or (
                transitions[item] == transitions[best] and item_count[item] > item_count[best]
            ):
                best = item
        if best < 0:
            ranks[e] = RANK_UNKNOWN_ITEM
        else:
            ranks[e] = _markov1_best_rank(item_count, count_at_least, transitions, touched, n_touched, best,
                                          transitions[best])
        for k in range(n_touched):
            transitions[touched[k]] = 0

        for entry in range(offsets[previous], offsets[previous + 1]):
            p = basket_items[entry]
            pool_meta[POOL_STAMP] += 1
            mark = pool_meta[POOL_STAMP]
            for entry_now in range(start, stop):
                stamp[basket_items[entry_now]] = -mark
            for k in range(list_start[p], list_start[p] + list_length[p]):
                successor = pool_item[k]
                if stamp[successor] == -mark:
                    pool_count[k] += 1
                    stamp[successor] = mark
            for entry_now in range(start, stop):
                item = basket_items[entry_now]
                if stamp[item] == mark:
                    continue
                length = list_length[p]
                if length == list_capacity[p]:
                    move_successor_list(list_start, list_capacity, pool_item, pool_count, pool_meta, p, length)
                slot = list_start[p] + length
                pool_item[slot] = item
                pool_count[slot] = 1
                list_length[p] = length + 1
                stamp[item] = mark

        for entry in range(start, stop):
            count_item(item_count, count_at_least, np.int64(basket_items[entry]))
        last_basket[user] = e

    pool_meta[POOL_NEEDED] = 0
    return end


class BasketPopRanker:
    """Basket Pop baseline over one whole basket stream.

    Parameters
    ----------
    baskets : tuple
        (users int32 (N,), basket_offsets int64 (N + 1,), basket_items int32 (total,)),
        dense user and item indexes.
    """

    def __init__(self, baskets: tuple) -> None:
        users, offsets, items = baskets
        n_items = int(items.max()) + 1 if items.size else 0
        self.baskets = baskets
        self.state = (
            np.zeros(n_items, dtype=np.int64),
            np.zeros(users.shape[0] + 2, dtype=np.int64),
            np.full(int(users.max()) + 1 if users.size else 0, NO_BASKET, dtype=np.int64),
        )

    def rank(self, begin: int, end: int, ranks: np.ndarray) -> None:
        """Rank and count baskets ``begin`` to ``end - 1``; they must follow the last call's range."""
        basket_pop_ranks(self.baskets, begin, end, self.state, ranks)


class BasketMarkov1Ranker:
    """Basket Markov-1 baseline over one whole basket stream; see ``basket_markov1_ranks``.

    Parameters
    ----------
    baskets : tuple
        As in ``BasketPopRanker``.
    pool_size : int
        Initial number of (successor, count) entries; the pool grows when full.
    """

    def __init__(self, baskets: tuple, pool_size: int = 1 << 16) -> None:
        users, offsets, items = baskets
        n_items = int(items.max()) + 1 if items.size else 0
        self.baskets = baskets
        self.item_count = np.zeros(n_items, dtype=np.int64)
        self.count_at_least = np.zeros(users.shape[0] + 2, dtype=np.int64)
        self.last_basket = np.full(int(users.max()) + 1 if users.size else 0, NO_BASKET, dtype=np.int64)
        self.list_start = np.zeros(n_items, dtype=np.int64)
        self.list_length = np.zeros(n_items, dtype=np.int64)
        self.list_capacity = np.zeros(n_items, dtype=np.int64)
        self.pool_item = np.zeros(max(pool_size, INITIAL_LIST_CAPACITY), dtype=np.int32)
        self.pool_count = np.zeros(self.pool_item.shape[0], dtype=np.int64)
        self.pool_meta = np.zeros(3, dtype=np.int64)
        self.transitions = np.zeros(n_items, dtype=np.int64)
        self.touched = np.zeros(n_items, dtype=np.int64)
        self.stamp = np.zeros(n_items, dtype=np.int64)

    @property
    def transition_pairs(self) -> int:
        """Number of distinct (previous-basket item, item) pairs seen."""
        return int(self.list_length.sum())

    def rank(self, begin: int, end: int, ranks: np.ndarray) -> None:
        """Rank and count baskets ``begin`` to ``end - 1``; they must follow the last call's range."""
        done = begin
        while done < end:
            done = basket_markov1_ranks(self.baskets, done, end, self._state(), ranks)
            if done < end:
                needed = int(self.pool_meta[POOL_NEEDED])
                size = max(2 * self.pool_item.shape[0], int(self.pool_meta[POOL_USED]) + needed)
                self.pool_item = np.concatenate([self.pool_item, np.zeros(size - self.pool_item.shape[0], np.int32)])
                self.pool_count = np.concatenate([self.pool_count, np.zeros(size - self.pool_count.shape[0], np.int64)])

    def _state(self) -> tuple:
        return (
            self.item_count, self.count_at_least, self.last_basket,
            self.list_start, self.list_length, self.list_capacity,
            self.pool_item, self.pool_count, self.pool_meta,
            self.transitions, self.touched, self.stamp,
        )


def _best_rank(counts: dict, score, basket: Sequence[Hashable]) -> int:
    """Return the smallest rank of the basket's known items under ``score``, from the definition."""
    ranks = []
    for item in basket:
        if item in counts:
            target = score(item)
            ranks.append(sum(1 for other in counts if other != item and score(other) >= target))
    return min(ranks) if ranks else RANK_UNKNOWN_ITEM


def basket_pop_ranks_reference(users: Sequence[Hashable], baskets: Sequence[Sequence[Hashable]]) -> list[int]:
    """Return the basket Pop rank of every basket, computed from the definition with dicts (for tests)."""
    counts: dict[Hashable, int] = {}
    seen_users: set[Hashable] = set()
    ranks = []
    for user, basket in zip(users, baskets, strict=True):
        if user not in seen_users:
            ranks.append(RANK_NOT_EVALUATED)
        else:
            ranks.append(_best_rank(counts, counts.__getitem__, basket))
        for item in basket:
            counts[item] = counts.get(item, 0) + 1
        seen_users.add(user)
    return ranks


def basket_markov1_ranks_reference(users: Sequence[Hashable], baskets: Sequence[Sequence[Hashable]]) -> list[int]:
    """Return the basket Markov-1 rank of every basket, from the score formula in exact fractions (for tests)."""
    counts: dict[Hashable, int] = {}
    transitions: dict[Hashable, collections.Counter] = collections.defaultdict(collections.Counter)
    previous_of: dict[Hashable, Sequence[Hashable]] = {}
    ranks = []
    for user, basket in zip(users, baskets, strict=True):
        if user not in previous_of:
            ranks.append(RANK_NOT_EVALUATED)
        else:
            previous = previous_of[user]
            denominator = 1 + max(counts.values())

            def score(candidate: Hashable) -> fractions.Fraction:
                total = sum(transitions[p][candidate] for p in previous)
                return total + fractions.Fraction(counts[candidate], denominator)

            ranks.append(_best_rank(counts, score, basket))
            for p in previous:
                for item in basket:
                    transitions[p][item] += 1
        for item in basket:
            counts[item] = counts.get(item, 0) + 1
        previous_of[user] = list(basket)
    return ranks
