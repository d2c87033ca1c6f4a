"""Pop and Markov-1 baselines of the prequential protocol: Numba ranking kernels and plain-Python references.

Like the model's kernel, both baselines rank an event's item among every known
item before they count the event. The rank is the number of other known items
whose score is greater than or equal to the item's, so ties count against. An
item never seen before gets ``RANK_UNKNOWN_ITEM``.

- Pop: score(j) = number of earlier events of j.
- Markov-1: score(j) = T[p, j] + pop(j) / (1 + max pop), where p is the user's
  previous item and T[p, j] the number of earlier times j directly followed p in
  any user's sequence. A user with no previous item gets the Pop order.

Because pop(j) / (1 + max pop) is below 1, the Markov-1 score orders items by
transitions first and popularity second, and two items have equal scores exactly
when both counts are equal. The kernel therefore compares integer pairs and has
no rounding to worry about.
"""

from __future__ import annotations

import collections
import fractions
from collections.abc import Hashable, Sequence

import numpy as np
from numba import njit, types

from drnn_core.errors import ConfigError
from drnn_core.kernels import RANK_UNKNOWN_ITEM

NO_ITEM = -1
INITIAL_LIST_CAPACITY = 4
POOL_USED = 0
POOL_NEEDED = 1

_I32_1D = types.Array(types.int32, 1, "C")
_I64_1D = types.Array(types.int64, 1, "C")

POP_STATE_TYPE = types.Tuple((_I64_1D, _I64_1D))
MARKOV_STATE_TYPE = types.Tuple(
    (_I64_1D, _I64_1D, _I32_1D, _I64_1D, _I64_1D, _I64_1D, _I32_1D, _I64_1D, _I64_1D)
)


@njit(types.int64(_I64_1D, _I64_1D, types.int64), nogil=True, cache=True)
def pop_rank(item_count, count_at_least, item):
    """Return the Pop rank of ``item``: the other known items with at least its count.

    Parameters
    ----------
    item_count : ndarray, shape (n_items,), int64
        Earlier events of each item.
    count_at_least : ndarray, shape (>= max count + 2,), int64
        ``count_at_least[c]`` is the number of items with at least c events, for c >= 1.
    item : int

    Returns
    -------
    int
        The rank (0 is the top), or RANK_UNKNOWN_ITEM for an item with no earlier event.
    """
    count = item_count[item]
    if count == 0:
        return RANK_UNKNOWN_ITEM
    return count_at_least[count] - 1


@njit(types.void(_I64_1D, _I64_1D, types.int64), nogil=True, cache=True)
def count_item(item_count, count_at_least, item):
    """Count one event of ``item``. Of ``count_at_least``, only the entry of the new count changes."""
    count = item_count[item] + 1
    item_count[item] = count
    count_at_least[count] += 1


@njit(types.void(_I32_1D, POP_STATE_TYPE, _I64_1D), nogil=True, cache=True)
def pop_ranks(items, state, ranks):
    """Rank each event's item by popularity, then count the event, in order.

    Parameters
    ----------
    items : ndarray, shape (B,), int32
        Dense item index of each event, below ``item_count.shape[0]``.
    state : tuple
        (item_count int64 (n_items,), count_at_least int64 (>= total events + 2,)),
        updated in place; ``count_at_least`` must hold every count the events can reach.
    ranks : ndarray, shape (B,), int64
        Output: the rank of each event's item, RANK_UNKNOWN_ITEM for a new item.
    """
    item_count, count_at_least = state
    for e in range(items.shape[0]):
        item = np.int64(items[e])
        ranks[e] = pop_rank(item_count, count_at_least, item)
        count_item(item_count, count_at_least, item)


@njit(
    types.int64(_I64_1D, _I64_1D, _I32_1D, _I64_1D, types.int64, types.int64, types.int64, types.int64, types.int64),
    nogil=True,
    cache=True,
)
def _markov1_rank(item_count, count_at_least, pool_item, pool_count, start, length, position, item, count):
    """Return the Markov-1 rank of ``item`` given the successor list of the user's previous item.

    ``position`` is the item's entry in that list, or -1 when it never followed
    the previous item.
    """
    if count == 0:
        return RANK_UNKNOWN_ITEM

    if position >= 0:
        transitions = pool_count[position]
        rank = np.int64(0)
        for k in range(start, start + length):
            other = pool_item[k]
            if other == item:
                continue
            other_transitions = pool_count[k]
            if other_transitions > transitions or (
                other_transitions == transitions and item_count[other] >= count
            ):
                rank += 1
        return rank

    # The item has no transition from the previous item, so every successor
    # scores above it. The rest tie with it on transitions (zero) and rank by
    # popularity: count the known items with at least its count, minus the
    # successors already counted.
    rank = length + count_at_least[count] - 1
    for k in range(start, start + length):
        if item_count[pool_item[k]] >= count:
            rank -= 1
    return rank


@njit(types.void(_I64_1D, _I64_1D, _I32_1D, _I64_1D, _I64_1D, types.int64, types.int64), nogil=True, cache=True)
def move_successor_list(list_start, list_capacity, pool_item, pool_count, pool_meta, owner, length):
    """Move the full successor list of ``owner`` to the end of the pool with twice the capacity."""
    capacity = max(INITIAL_LIST_CAPACITY, 2 * length)
    old_start = list_start[owner]
    new_start = pool_meta[POOL_USED]
    for k in range(length):
        pool_item[new_start + k] = pool_item[old_start + k]
        pool_count[new_start + k] = pool_count[old_start + k]
    list_start[owner] = new_start
    list_capacity[owner] = capacity
    pool_meta[POOL_USED] = new_start + capacity


@njit(types.int64(_I32_1D, _I32_1D, types.int64, MARKOV_STATE_TYPE, _I64_1D), nogil=True, cache=True)
def markov1_ranks(users, items, begin, state, ranks):
    """Rank each event's item by Markov-1 score, then count the event and its transition, in order.

    The transition counts are sparse: each item p owns a list of (successor,
    count) pairs in a shared pool, and a full list moves to the end of the pool
    with twice the capacity. Ranking an event costs O(successors of p).

    Parameters
    ----------
    users, items : ndarray, shape (B,), int32
        Dense user and item index of each event.
    begin : int
        Index of the first event to process.
    state : tuple
        Nine arrays, updated in place:

        - item_count int64 (n_items,) and count_at_least int64 (>= total events + 2,), as in pop_ranks.
        - last_item int32 (n_users,): each user's previous item, or NO_ITEM.
        - list_start, list_length, list_capacity int64 (n_items,): each item's successor list in the pool.
        - pool_item int32 (P,) and pool_count int64 (P,): the successors and their transition counts.
        - pool_meta int64 (2,): ``pool_meta[POOL_USED]`` is the number of pool entries in use, and
          ``pool_meta[POOL_NEEDED]`` the free entries that the first unprocessed event needs.
    ranks : ndarray, shape (B,), int64
        Output: the rank of each event's item, RANK_UNKNOWN_ITEM for a new item.

    Returns
    -------
    int
        B when every event was processed, else the index of the first event whose
        new transition does not fit in the pool. That event is not counted: grow
        the pool by ``pool_meta[POOL_NEEDED]`` entries and call again from there.
    """
    (item_count, count_at_least, last_item, list_start, list_length, list_capacity,
     pool_item, pool_count, pool_meta) = state

    for e in range(begin, items.shape[0]):
        user = users[e]
        item = np.int64(items[e])
        previous = np.int64(last_item[user])
        count = item_count[item]

        if previous == NO_ITEM:
            ranks[e] = pop_rank(item_count, count_at_least, item)
            count_item(item_count, count_at_least, item)
            last_item[user] = item
            continue

        start = list_start[previous]
        length = list_length[previous]
        position = np.int64(-1)
        for k in range(start, start + length):
            if pool_item[k] == item:
                position = k
                break

        if position < 0 and length == list_capacity[previous]:
            capacity = max(INITIAL_LIST_CAPACITY, 2 * length)
            free = pool_item.shape[0] - pool_meta[POOL_USED]
            if free < capacity:
                pool_meta[POOL_NEEDED] = capacity
                return e

        ranks[e] = _markov1_rank(item_count, count_at_least, pool_item, pool_count, start, length, position, item, count)

        if position >= 0:
            pool_count[position] += 1
        else:
            if length == list_capacity[previous]:
                move_successor_list(list_start, list_capacity, pool_item, pool_count, pool_meta, previous, length)
            slot = list_start[previous] + length
            pool_item[slot] = item
            pool_count[slot] = 1
            list_length[previous] = length + 1
        count_item(item_count, count_at_least, item)
        last_item[user] = item

    pool_meta[POOL_NEEDED] = 0
    return items.shape[0]


def _grown(array: np.ndarray, size: int, fill: int) -> np.ndarray:
    """Return ``array`` extended to at least ``size`` entries (doubling), new entries set to ``fill``."""
    if array.shape[0] >= size:
        return array
    grown = np.full(max(size, 2 * array.shape[0]), fill, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


def _as_indexes(values: np.ndarray, name: str) -> np.ndarray:
    array = np.ascontiguousarray(values, dtype=np.int32)
    if array.ndim != 1:
        raise ConfigError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and int(array.min()) < 0:
        raise ConfigError(f"{name} must be non-negative indexes, got {int(array.min())}")
    return array


class PopRanker:
    """Streaming Pop baseline: item counts kept across calls of ``rank``."""

    def __init__(self) -> None:
        self.item_count = np.zeros(0, dtype=np.int64)
        self.count_at_least = np.zeros(2, dtype=np.int64)
        self.events = 0

    def rank(self, items: np.ndarray) -> np.ndarray:
        """Rank every event's item, then count it, in order.

        Parameters
        ----------
        items : ndarray, shape (B,), int
            Dense item indexes (0, 1, 2, ...).

        Returns
        -------
        ndarray, shape (B,), int64
            The rank of each item before its event, RANK_UNKNOWN_ITEM for a new item.
        """
        items = _as_indexes(items, "items")
        ranks = np.empty(items.shape[0], dtype=np.int64)
        if items.size == 0:
            return ranks

        self.item_count = _grown(self.item_count, int(items.max()) + 1, 0)
        self.count_at_least = _grown(self.count_at_least, self.events + items.shape[0] + 2, 0)
        pop_ranks(items, (self.item_count, self.count_at_least), ranks)
        self.events += items.shape[0]
        return ranks


class Markov1Ranker:
    """Streaming Markov-1 baseline: item counts, transition counts and each user's previous item.

    Parameters
    ----------
    pool_size : int
        Initial number of (successor, count) entries; the pool doubles when full.
    """

    def __init__(self, pool_size: int = 1 << 16) -> None:
        self.item_count = np.zeros(0, dtype=np.int64)
        self.count_at_least = np.zeros(2, dtype=np.int64)
        self.last_item = np.zeros(0, dtype=np.int32)
        self.list_start = np.zeros(0, dtype=np.int64)
        self.list_length = np.zeros(0, dtype=np.int64)
        self.list_capacity = np.zeros(0, dtype=np.int64)
        self.pool_item = np.full(max(pool_size, INITIAL_LIST_CAPACITY), NO_ITEM, dtype=np.int32)
        self.pool_count = np.zeros(self.pool_item.shape[0], dtype=np.int64)
        self.pool_meta = np.zeros(2, dtype=np.int64)
        self.events = 0

    @property
    def transitions(self) -> int:
        """Number of distinct (previous item, item) pairs seen."""
        return int(self.list_length.sum())

    def rank(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Rank every event's item, then count it and its transition, in order.

        Parameters
        ----------
        users, items : ndarray, shape (B,), int
            Dense user and item indexes of the events.

        Returns
        -------
        ndarray, shape (B,), int64
            The rank of each item before its event, RANK_UNKNOWN_ITEM for a new item.
        """
        users = _as_indexes(users, "users")
        items = _as_indexes(items, "items")
        if users.shape != items.shape:
            raise ConfigError(f"users and items must have the same shape, got {users.shape} and {items.shape}")
        ranks = np.empty(items.shape[0], dtype=np.int64)
        if items.size == 0:
            return ranks

        self._grow_to(n_users=int(users.max()) + 1, n_items=int(items.max()) + 1, events=items.shape[0])
        done = 0
        while done < items.shape[0]:
            done = markov1_ranks(users, items, done, self._state(), ranks)
            if done < items.shape[0]:
                self._grow_pool(int(self.pool_meta[POOL_NEEDED]))
        self.events += items.shape[0]
        return ranks

    def _grow_to(self, *, n_users: int, n_items: int, events: int) -> None:
        self.last_item = _grown(self.last_item, n_users, NO_ITEM)
        self.item_count = _grown(self.item_count, n_items, 0)
        self.list_start = _grown(self.list_start, n_items, 0)
        self.list_length = _grown(self.list_length, n_items, 0)
        self.list_capacity = _grown(self.list_capacity, n_items, 0)
        self.count_at_least = _grown(self.count_at_least, self.events + events + 2, 0)

    def _grow_pool(self, needed: int) -> None:
        size = max(2 * self.pool_item.shape[0], int(self.pool_meta[POOL_USED]) + needed)
        self.pool_item = _grown(self.pool_item, size, NO_ITEM)
        self.pool_count = _grown(self.pool_count, size, 0)

    def _state(self) -> tuple:
        return (
            self.item_count, self.count_at_least, self.last_item,
            self.list_start, self.list_length, self.list_capacity,
            self.pool_item, self.pool_count, self.pool_meta,
        )


def pop_ranks_reference(items: Sequence[Hashable]) -> list[int]:
    """Return the Pop rank of every event, computed from the definition with dicts (for tests).

    Parameters
    ----------
    items : sequence of hashable
        The item of each event, in stream order.
    """
    counts: dict[Hashable, int] = {}
    ranks = []
    for item in items:
        if item not in counts:
            ranks.append(RANK_UNKNOWN_ITEM)
        else:
            score = counts[item]
            ranks.append(sum(1 for other, count in counts.items() if other != item and count >= score))
        counts[item] = counts.get(item, 0) + 1
    return ranks


def markov1_ranks_reference(users: Sequence[Hashable], items: Sequence[Hashable]) -> list[int]:
    """Return the Markov-1 rank of every event, from the score formula in exact fractions (for tests).

    score(j) = T[p, j] + pop(j) / (1 + max pop), with p the user's previous item
    and T[p, j] = 0 for a user with no previous item.
    """
    counts: dict[Hashable, int] = {}
    transitions: dict[Hashable, collections.Counter] = collections.defaultdict(collections.Counter)
    previous_of: dict[Hashable, Hashable] = {}
    ranks = []
    for user, item in zip(users, items, strict=True):
        previous = previous_of.get(user)
        if item not in counts:
            ranks.append(RANK_UNKNOWN_ITEM)
        else:
            followers = transitions[previous] if user in previous_of else collections.Counter()
            denominator = 1 + max(counts.values())

            def score(candidate: Hashable) -> fractions.Fraction:
                return followers[candidate] + fractions.Fraction(counts[candidate], denominator)

            target = score(item)
            ranks.append(sum(1 for other in counts if other != item and score(other) >= target))

        counts[item] = counts.get(item, 0) + 1
        if user in previous_of:
            transitions[previous][item] += 1
        previous_of[user] = item
    return ranks
