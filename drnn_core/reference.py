"""NumPy reference of the recurrent BPR model math in float64, for testing the Numba kernels.

The functions follow the model equations directly and share no code with
``drnn_core.kernels``: row vectors, ``b(t) = X[i(t)] U + h(t-1) W``,
``h(t) = sigmoid(b(t))``, ``x_uij = h(t) . V[i] - h(t) . V[j]`` and
``L = -ln sigmoid(x_uij) + l2 * ||theta||^2``. Parameters are passed as the
tuple ``(X, U, W, V)`` of float64 arrays, X and V of shape (n, h), U and W of
shape (h, h).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from drnn_core.config import MAX_ABS_PARAMETER

STATUS_TRAINED = 0
STATUS_NO_HISTORY = 1
STATUS_NO_NEGATIVE = 2
STATUS_NON_FINITE = 3
STATUS_DUPLICATE = 4

RANK_UNKNOWN_ITEM = -1
RANK_NOT_EVALUATED = -2

NO_ITEM = -1


def sigmoid(z):
    """Compute the logistic function ``1 / (1 + exp(-z))`` elementwise without overflow.

    Parameters
    ----------
    z : float or ndarray
        Any shape; converted to float64.

    Returns
    -------
    float or ndarray, float64
        Values in [0, 1], of the shape of ``z``.
    """
    z = np.asarray(z, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def recurrent_step(X, U, W, item, h_prev):
    """Return ``sigmoid(X[item] U + h_prev W)``, the hidden state after ``item``.

    Parameters
    ----------
    X : ndarray, shape (n, h), float64
    U, W : ndarray, shape (h, h), float64
    item : int
    h_prev : ndarray, shape (h,), float64

    Returns
    -------
    ndarray, shape (h,), float64
    """
    return sigmoid(X[item] @ U + h_prev @ W)


def forward_window(X, U, W, start_hidden, items):
    """Run the recurrence from ``start_hidden`` over the window items.

    Parameters
    ----------
    X : ndarray, shape (n, h), float64
    U, W : ndarray, shape (h, h), float64
    start_hidden : ndarray, shape (h,), float64
        The hidden state before ``items[0]``.
    items : sequence of int, length K
        Window items, oldest first.

    Returns
    -------
    ndarray, shape (K + 1, h), float64
        Row 0 is ``start_hidden`` and row k + 1 the state after ``items[k]``.
    """
    states = np.empty((len(items) + 1, U.shape[0]), dtype=np.float64)
    states[0] = start_hidden
    for k, item in enumerate(items):
        states[k + 1] = recurrent_step(X, U, W, item, states[k])
    return states


def bpr_loss(hidden, v_pos, v_neg):
    """Return the BPR loss ``-ln sigmoid(x)`` and its derivative ``dL/dx = -sigmoid(-x)``.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float64
    v_pos, v_neg : ndarray, shape (h,), float64
        The output embeddings V[i] and V[j].

    Returns
    -------
    loss : float
        ``ln(1 + exp(-x))`` with ``x = hidden . v_pos - hidden . v_neg``.
    dloss_dx : float
    """
    x = float(hidden @ v_pos - hidden @ v_neg)
    loss = float(np.logaddexp(0.0, -x))
    dloss_dx = -float(sigmoid(-x))
    return loss, dloss_dx


def bptt_gradients(params, start_hidden, items, positive, negative):
    """Compute the gradient of the BPR term (without L2) by truncated BPTT.

    Gradients flow back through every window step and stop at ``start_hidden``.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), float64.
    start_hidden : ndarray, shape (h,), float64
    items : sequence of int, length K >= 1
        Window items, oldest first.
    positive, negative : int
        Items i and j of the BPR term.

    Returns
    -------
    dict of str to ndarray, float64
        ``"X"``, shape (K, h): row k is the gradient through window position k
        (a repeated item has one row per position). ``"U"`` and ``"W"``,
        shape (h, h). ``"V_pos"`` and ``"V_neg"``, shape (h,): dL/dV[i] and dL/dV[j].
    """
    X, U, W, V = params
    states = forward_window(X, U, W, start_hidden, items)
    last = states[-1]
    _, dloss_dx = bpr_loss(last, V[positive], V[negative])

    grads = {
        "X": np.zeros((len(items), U.shape[0])),
        "U": np.zeros_like(U, dtype=np.float64),
        "W": np.zeros_like(W, dtype=np.float64),
        "V_pos": dloss_dx * last,
        "V_neg": -dloss_dx * last,
    }

    # dL/dh(t) at the last step, then carried back one step at a time.
    grad_hidden = dloss_dx * (V[positive] - V[negative])
    for k in range(len(items) - 1, -1, -1):
        # Through the sigmoid: db = dh * h * (1 - h), with h = states[k + 1].
        grad_pre = grad_hidden * states[k + 1] * (1.0 - states[k + 1])
        grads["U"] += np.outer(X[items[k]], grad_pre)
        grads["W"] += np.outer(states[k], grad_pre)
        grads["X"][k] = U @ grad_pre
        grad_hidden = W @ grad_pre

    return grads


def distinct_items(items):
    """Return the distinct window items in order of first occurrence.

    Parameters
    ----------
    items : sequence of int

    Returns
    -------
    ndarray, shape (m,), int64
    """
    _, first = np.unique(np.asarray(items, dtype=np.int64), return_index=True)
    return np.asarray(items, dtype=np.int64)[np.sort(first)]


def window_loss(params, start_hidden, items, positive, negative, l2):
    """Return the full loss ``-ln sigmoid(x_uij) + l2 * ||theta||^2`` of one event.

    theta is the X rows of the distinct window items (each row once), U, W, V[i]
    and V[j]. This is the function that finite differences differentiate.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), float64.
    start_hidden : ndarray, shape (h,), float64
    items : sequence of int, length K >= 1
    positive, negative : int
    l2 : float

    Returns
    -------
    float
    """
    X, U, W, V = params
    states = forward_window(X, U, W, start_hidden, items)
    loss, _ = bpr_loss(states[-1], V[positive], V[negative])

    rows = distinct_items(items)
    penalty = np.sum(X[rows] ** 2) + np.sum(U**2) + np.sum(W**2)
    penalty += np.sum(V[positive] ** 2) + np.sum(V[negative] ** 2)
    return loss + l2 * float(penalty)


def full_gradient_with_l2(params, items, positive, negative, bpr_grads, l2):
    """Add the L2 term ``2 * l2 * theta`` to the BPR gradients and merge repeated X rows.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), float64.
    items : sequence of int, length K
    positive, negative : int
    bpr_grads : dict of str to ndarray
        The output of ``bptt_gradients``.
    l2 : float

    Returns
    -------
    dict of str to ndarray, float64
        ``"x_rows"``, shape (m,), int64: the distinct window items.
        ``"X"``, shape (m, h): dL/dX[x_rows[r]], summed over the positions of that item.
        ``"U"``, ``"W"``, shape (h, h), and ``"V_pos"``, ``"V_neg"``, shape (h,).
    """
    X, U, W, V = params
    items = np.asarray(items, dtype=np.int64)
    rows = distinct_items(items)

    grad_x = np.zeros((rows.shape[0], U.shape[0]))
    for r, row in enumerate(rows):
        grad_x[r] = bpr_grads["X"][items == row].sum(axis=0) + 2.0 * l2 * X[row]

    return {
        "x_rows": rows,
        "X": grad_x,
        "U": bpr_grads["U"] + 2.0 * l2 * U,
        "W": bpr_grads["W"] + 2.0 * l2 * W,
        "V_pos": bpr_grads["V_pos"] + 2.0 * l2 * V[positive],
        "V_neg": bpr_grads["V_neg"] + 2.0 * l2 * V[negative],
    }


def gradient_norm(full_grads):
    """Return the global L2 norm of a gradient from ``full_gradient_with_l2``.

    Each distinct X row counts once.

    Parameters
    ----------
    full_grads : dict of str to ndarray

    Returns
    -------
    float
    """
    parts = ("X", "U", "W", "V_pos", "V_neg")
    return float(np.sqrt(sum(np.sum(full_grads[name] ** 2) for name in parts)))


def sgd_update(params, items, positive, negative, bpr_grads, learning_rate, l2, max_grad_norm,
               storage_dtype=np.float32):
    """Apply one clipped SGD step in place, unless the step would make a parameter diverge.

    1. g = the BPR gradient plus ``2 * l2 * theta``, one row per distinct X row.
    2. g is scaled by ``min(1, max_grad_norm / ||g||)``, with ||g|| the global L2 norm.
    3. ``theta -= learning_rate * g``, unless ||g|| is non-finite or a new value,
       stored in ``storage_dtype``, is non-finite or above MAX_ABS_PARAMETER in
       absolute value.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), float64, updated in place.
    items : sequence of int, length K >= 1
    positive, negative : int
    bpr_grads : dict of str to ndarray
        The output of ``bptt_gradients``.
    learning_rate, l2, max_grad_norm : float
    storage_dtype : numpy dtype
        The dtype the parameters are stored in by the model. A new value is
        non-finite when it overflows this dtype (float32 for the kernels, where
        a value above about 3.4e38 becomes inf).

    Returns
    -------
    bool
        True if the step was applied, False if nothing changed.
    """
    X, U, W, V = params
    full = full_gradient_with_l2(params, items, positive, negative, bpr_grads, l2)
    norm = gradient_norm(full)
    if not np.isfinite(norm):
        return False

    scale = 1.0 if norm <= max_grad_norm else max_grad_norm / norm
    step = learning_rate * scale
    rows = full["x_rows"]
    new_values = {
        "X": X[rows] - step * full["X"],
        "U": U - step * full["U"],
        "W": W - step * full["W"],
        "V_pos": V[positive] - step * full["V_pos"],
        "V_neg": V[negative] - step * full["V_neg"],
    }

    with np.errstate(over="ignore", invalid="ignore"):
        stored = [value.astype(storage_dtype) for value in new_values.values()]
    if not all(np.all(np.isfinite(value)) for value in stored):
        return False
    if any(np.any(np.abs(value) > MAX_ABS_PARAMETER) for value in stored):
        return False

    X[rows] = new_values["X"]
    U[:, :] = new_values["U"]
    W[:, :] = new_values["W"]
    V[positive] = new_values["V_pos"]
    V[negative] = new_values["V_neg"]
    return True


def score_items(hidden, V, item_count, n_rows):
    """Return ``hidden . V[j]`` for every known item j < n_rows and -inf for the others.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float64
    V : ndarray, shape (n, h), float64
    item_count : ndarray, shape (n,), int64
        An item is known when its count is positive.
    n_rows : int
        Items at or above this index are not known.

    Returns
    -------
    ndarray, shape (n,), float64
    """
    known = (item_count > 0) & (np.arange(V.shape[0]) < n_rows)
    return np.where(known, V @ hidden, -np.inf)


def rank_item_bounds(hidden, V, item_count, n_rows, target, tolerance):
    """Return the range of ranks of ``target`` when scores may be off by ``tolerance``.

    A kernel that computes the scores in float32 can order two items either way
    when their scores differ by less than its rounding error. Its rank is then
    within these bounds.

    Parameters
    ----------
    hidden, V, item_count, n_rows, target : see ``rank_item``.
    tolerance : float
        Largest expected error of a score difference, >= 0.

    Returns
    -------
    low, high : int
        The number of other known items scoring above ``score + tolerance``, and
        the number scoring at least ``score - tolerance``. Both are
        RANK_UNKNOWN_ITEM for an unknown target.
    """
    if target >= n_rows or item_count[target] <= 0:
        return RANK_UNKNOWN_ITEM, RANK_UNKNOWN_ITEM

    scores = score_items(hidden, V, item_count, n_rows)
    target_score = scores[target]
    others = np.delete(scores, target)
    low = int(np.count_nonzero(others > target_score + tolerance))
    high = int(np.count_nonzero(others >= target_score - tolerance))
    return low, high


def rank_item(hidden, V, item_count, n_rows, target):
    """Return the number of other known items scoring at least as high as ``target``.

    Ties count against the model. An unknown target returns RANK_UNKNOWN_ITEM.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float64
    V : ndarray, shape (n, h), float64
    item_count : ndarray, shape (n,), int64
    n_rows : int
    target : int

    Returns
    -------
    int
        In [0, n_known - 1], or RANK_UNKNOWN_ITEM.
    """
    _, high = rank_item_bounds(hidden, V, item_count, n_rows, target, 0.0)
    return high


@dataclasses.dataclass
class ReferenceItemStats:
    """Per-item event counts, the known items in order of first event, and the row bound.

    Attributes
    ----------
    item_count : ndarray, shape (n,), int64
    known_items : list of int
    n_rows : int
        One more than the largest known item index (0 while none is known).
    """

    item_count: np.ndarray
    known_items: list
    n_rows: int = 0

    @classmethod
    def empty(cls, capacity):
        """Create statistics of ``capacity`` items with none known."""
        return cls(item_count=np.zeros(capacity, dtype=np.int64), known_items=[])

    def record(self, item):
        """Count one event of ``item``."""
        if self.item_count[item] == 0:
            self.known_items.append(int(item))
            self.n_rows = max(self.n_rows, int(item) + 1)
        self.item_count[item] += 1


@dataclasses.dataclass
class ReferenceBatchResult:
    """Per-event outputs of ``train_batch_reference``, shape (B,) each.

    Attributes
    ----------
    status : ndarray, int8
    loss : ndarray, float64
        NaN where no SGD step was attempted.
    rank : ndarray, int64
        Exact rank in float64, RANK_UNKNOWN_ITEM or RANK_NOT_EVALUATED.
    rank_low, rank_high : ndarray, int64
        Bounds of the rank from ``rank_item_bounds`` with the call's
        ``rank_tolerance``; equal to ``rank`` for unranked events.
    """

    status: np.ndarray
    loss: np.ndarray
    rank: np.ndarray
    rank_low: np.ndarray
    rank_high: np.ndarray


def advance_state(params, states, slot, item):
    """Append ``item`` to a user's window and recompute the user's states with ``params``.

    When the window overflows its K slots, the oldest item moves into
    ``start_hidden``: ``start_hidden = sigmoid(X[oldest] U + start_hidden W)``.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), float64.
    states : UserStateBatch-like
        Any object with the attributes of ``drnn_core.state.UserStateBatch``
        (hidden and start_hidden may be float64), updated in place.
    slot : int
        The user's row.
    item : int
    """
    X, U, W, _ = params
    capacity = states.window.shape[1]
    length = int(states.window_len[slot])
    items = [int(value) for value in states.window[slot, :length]] + [int(item)]

    if len(items) > capacity:
        states.start_hidden[slot] = recurrent_step(X, U, W, items[0], states.start_hidden[slot])
        items = items[1:]

    trajectory = forward_window(X, U, W, states.start_hidden[slot], items)
    states.hidden[slot] = trajectory[-1]
    states.window[slot] = NO_ITEM
    states.window[slot, : len(items)] = items
    states.window_len[slot] = len(items)


def train_batch_reference(params, states, item_stats, events, negatives, learning_rate, l2, max_grad_norm,
                          *, evaluate=True, rank_tolerance=0.0):
    """Replay a micro-batch of events like ``kernels.train_batch``, with the negatives given.

    For each event (user row, item i, partition, offset):

    1. Skip it as STATUS_DUPLICATE if its partition equals the user's last one and
       its offset is not greater than the last offset.
    2. Run the window forward from ``start_hidden``, and rank i if ``evaluate``.
    3. If the window is not empty, take the SGD step on the BPR loss with the
       given negative j, or report STATUS_NO_NEGATIVE when j < 0.
    4. Append i to the window with the updated parameters, count the event and
       record i in the item statistics.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), float64, updated in place.
    states : UserStateBatch-like
        See ``advance_state``; updated in place.
    item_stats : ReferenceItemStats
        Updated in place.
    events : tuple of ndarray
        (slot (B,), item (B,), partition (B,), offset (B,)), integers.
    negatives : ndarray, shape (B,), int
        The negative the sampler drew for each event, -1 where it found none.
        Ignored for duplicates and events of users with an empty window.
    learning_rate, l2, max_grad_norm : float
    evaluate : bool
    rank_tolerance : float
        Score tolerance for the ``rank_low`` and ``rank_high`` outputs.

    Returns
    -------
    ReferenceBatchResult
    """
    X, U, W, V = params
    slots, items, partitions, offsets = events
    size = slots.shape[0]
    result = ReferenceBatchResult(
        status=np.zeros(size, dtype=np.int8),
        loss=np.full(size, np.nan),
        rank=np.full(size, RANK_NOT_EVALUATED, dtype=np.int64),
        rank_low=np.full(size, RANK_NOT_EVALUATED, dtype=np.int64),
        rank_high=np.full(size, RANK_NOT_EVALUATED, dtype=np.int64),
    )

    for e in range(size):
        slot, item = int(slots[e]), int(items[e])
        partition, offset = int(partitions[e]), int(offsets[e])

        if states.last_partition[slot] == partition and offset <= states.last_offset[slot]:
            result.status[e] = STATUS_DUPLICATE
            continue

        length = int(states.window_len[slot])
        window = [int(value) for value in states.window[slot, :length]]
        trajectory = forward_window(X, U, W, states.start_hidden[slot], window)
        if evaluate:
            hidden = trajectory[-1]
            result.rank[e] = rank_item(hidden, V, item_stats.item_count, item_stats.n_rows, item)
            result.rank_low[e], result.rank_high[e] = rank_item_bounds(
                hidden, V, item_stats.item_count, item_stats.n_rows, item, rank_tolerance
            )

        result.status[e] = STATUS_NO_HISTORY
        if length > 0:
            result.status[e], result.loss[e] = _train_step(params, states.start_hidden[slot], window, item,
                                                           int(negatives[e]), learning_rate, l2, max_grad_norm)

        advance_state(params, states, slot, item)
        states.count[slot] += 1
        states.last_partition[slot] = partition
        states.last_offset[slot] = offset
        item_stats.record(item)

    return result


def _train_step(params, start_hidden, window, positive, negative, learning_rate, l2, max_grad_norm):
    """Take the SGD step of one event and return its status and its loss (NaN without a step)."""
    if negative < 0:
        return STATUS_NO_NEGATIVE, np.nan

    X, U, W, V = params
    trajectory = forward_window(X, U, W, start_hidden, window)
    loss, _ = bpr_loss(trajectory[-1], V[positive], V[negative])
    grads = bptt_gradients(params, start_hidden, window, positive, negative)
    applied = sgd_update(params, window, positive, negative, grads, learning_rate, l2, max_grad_norm)
    return (STATUS_TRAINED if applied else STATUS_NON_FINITE), loss
