"""Item statistics and negative samplers: uniform over known items, and popularity**alpha.

The statistics are four arrays that the kernels update in place (the "sampler
tuple"): per-item event counts, the list of known items, a small int64 header,
and a Fenwick tree of the popularity weights, so that both sampling and the
update after each event take O(log n) time with no rebuild.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numba import njit, types

from drnn_core.rng import next_below, next_float

UNIFORM = 0
POPULARITY = 1

N_KNOWN = 0
N_ROWS = 1

MAX_NEGATIVE_TRIES = 16

_I64 = types.Array(types.int64, 1, "C")
_I32 = types.Array(types.int32, 1, "C")
_F64 = types.Array(types.float64, 1, "C")
_U64 = types.Array(types.uint64, 1, "C")
SAMPLER_TYPE = types.Tuple((_I64, _I32, _I64, _F64))


@dataclasses.dataclass
class ItemStats:
    """Per-item counts and the structures of both samplers.

    Attributes
    ----------
    item_count : ndarray, shape (capacity,), int64
        Number of events seen of each item; an item is known once its count is positive.
    known_items : ndarray, shape (capacity,), int32
        Indexes of the known items in the order they became known; the first
        ``meta[N_KNOWN]`` entries are valid.
    meta : ndarray, shape (2,), int64
        ``meta[N_KNOWN]``, the number of known items, and ``meta[N_ROWS]``, one
        more than the largest known item index.
    fenwick : ndarray, shape (capacity + 1,), float64
        Fenwick tree (1-based) of the weights ``count**alpha`` of known items.
    alpha : float
        Exponent of the popularity weights.
    """

    item_count: np.ndarray
    known_items: np.ndarray
    meta: np.ndarray
    fenwick: np.ndarray
    alpha: float

    @classmethod
    def empty(cls, capacity: int, alpha: float) -> "ItemStats":
        """Create statistics with no known item."""
        return cls(
            item_count=np.zeros(capacity, dtype=np.int64),
            known_items=np.full(capacity, -1, dtype=np.int32),
            meta=np.zeros(2, dtype=np.int64),
            fenwick=np.zeros(capacity + 1, dtype=np.float64),
            alpha=float(alpha),
        )

    @property
    def capacity(self) -> int:
        """Number of item slots allocated."""
        return self.item_count.shape[0]

    @property
    def n_known(self) -> int:
        """Number of items seen at least once."""
        return int(self.meta[N_KNOWN])

    def grow(self, capacity: int) -> None:
        """Enlarge every array to ``capacity`` slots and rebuild the Fenwick tree once."""
        old = self.capacity
        if capacity <= old:
            return

        item_count = np.zeros(capacity, dtype=np.int64)
        item_count[:old] = self.item_count
        known_items = np.full(capacity, -1, dtype=np.int32)
        known_items[:old] = self.known_items

        self.item_count = item_count
        self.known_items = known_items
        self.fenwick = build_fenwick(item_count, self.alpha)

    def as_tuple(self) -> tuple:
        """Return the arrays in the order the kernels take them."""
        return (self.item_count, self.known_items, self.meta, self.fenwick)


def build_fenwick(item_count: np.ndarray, alpha: float) -> np.ndarray:
    """Build the Fenwick tree of the weights ``count**alpha`` (0 for unseen items) in O(n).

    Parameters
    ----------
    item_count : ndarray, shape (n,), int64
    alpha : float

    Returns
    -------
    ndarray, shape (n + 1,), float64
    """
    weights = np.where(item_count > 0, np.power(item_count.astype(np.float64), alpha), 0.0)
    tree = np.zeros(item_count.shape[0] + 1, dtype=np.float64)
    tree[1:] = weights
    _fenwick_build_in_place(tree)
    return tree


@njit(types.void(_F64), nogil=True, cache=True)
def _fenwick_build_in_place(tree):
    n = tree.shape[0] - 1
    for i in range(1, n + 1):
        parent = i + (i & -i)
        if parent <= n:
            tree[parent] += tree[i]


@njit(types.void(_F64, types.int64, types.float64), nogil=True, cache=True)
def fenwick_add(tree, item, delta):
    """Add ``delta`` to the weight of ``item`` (0-based)."""
    n = tree.shape[0] - 1
    i = item + 1
    while i <= n:
        tree[i] += delta
        i += i & -i


@njit(types.int64(_F64, types.float64), nogil=True, cache=True)
def fenwick_find(tree, target):
    """Return the 0-based item whose cumulative weight interval contains ``target``."""
    n = tree.shape[0] - 1
    step = 1
    while step * 2 <= n:
        step *= 2

    position = 0
    remaining = target
    while step > 0:
        probe = position + step
        if probe <= n and tree[probe] <= remaining:
            position = probe
            remaining -= tree[probe]
        step //= 2
    if position >= n:
        position = n - 1
    return position


@njit(types.float64(_F64), nogil=True, cache=True)
def fenwick_total(tree):
    """Return the sum of all weights."""
    n = tree.shape[0] - 1
    total = 0.0
    i = n
    while i > 0:
        total += tree[i]
        i -= i & -i
    return total


@njit(types.void(SAMPLER_TYPE, types.int64, types.float64), nogil=True, cache=True)
def record_item(sampler, item, alpha):
    """Count one event of ``item``: update its count, the known list and its weight."""
    item_count, known_items, meta, fenwick = sampler
    old = item_count[item]
    item_count[item] = old + 1

    if old == 0:
        known_items[meta[N_KNOWN]] = item
        meta[N_KNOWN] += 1
        if item + 1 > meta[N_ROWS]:
            meta[N_ROWS] = item + 1
        fenwick_add(fenwick, item, 1.0)
    else:
        fenwick_add(fenwick, item, (old + 1.0) ** alpha - float(old) ** alpha)


@njit(types.int64(SAMPLER_TYPE, types.int64, types.int64, _U64), nogil=True, cache=True)
def sample_negative(sampler, positive, kind, rng_state):
    """Draw a known item other than ``positive``.

    Parameters
    ----------
    sampler : tuple
        The arrays of ItemStats.as_tuple().
    positive : int
        The item to exclude.
    kind : int
        UNIFORM or POPULARITY.
    rng_state : ndarray, shape (1,), uint64

    Returns
    -------
    int
        The negative item, or -1 when no other known item exists or
        MAX_NEGATIVE_TRIES draws all hit the positive.
    """
    item_count, known_items, meta, fenwick = sampler
    n_known = meta[N_KNOWN]
    others = n_known - 1 if item_count[positive] > 0 else n_known
    if others < 1:
        return -1

    total = fenwick_total(fenwick) if kind == POPULARITY else 0.0
    for _ in range(MAX_NEGATIVE_TRIES):
        if kind == POPULARITY:
            candidate = fenwick_find(fenwick, next_float(rng_state) * total)
        else:
            candidate = np.int64(known_items[next_below(rng_state, n_known)])
        if candidate != positive and item_count[candidate] > 0:
            return candidate
    return -1
