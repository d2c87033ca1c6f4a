"""Numba kernels of the recurrent BPR model: forward, loss, truncated BPTT, SGD, batches, ranking.

Notation, with row vectors and an item's embedding in row ``X[i]``::

    b(t) = X[i(t)] U + h(t-1) W,    h(t) = sigmoid(b(t))
    x_uij = h(t) . V[i] - h(t) . V[j]
    L = -ln sigmoid(x_uij) + l2 * ||theta||^2

theta is every parameter the event touches: the X rows of the user's window, U,
W, V[i] and V[j]. Gradients flow back through the K window steps and stop at the
hidden state before the window (truncated BPTT). Every kernel releases the GIL,
takes C-ordered arrays of the dtypes in its signature, and allocates nothing per
event.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types

from drnn_core.config import MAX_ABS_PARAMETER
from drnn_core.sampling import SAMPLER_TYPE, record_item, sample_negative

STATUS_TRAINED = 0
STATUS_NO_HISTORY = 1
STATUS_NO_NEGATIVE = 2
STATUS_NON_FINITE = 3
STATUS_DUPLICATE = 4

RANK_UNKNOWN_ITEM = -1
RANK_NOT_EVALUATED = -2

_F32_1D = types.Array(types.float32, 1, "C")
_F32_2D = types.Array(types.float32, 2, "C")
_I32_1D = types.Array(types.int32, 1, "C")
_I32_2D = types.Array(types.int32, 2, "C")
_I64_1D = types.Array(types.int64, 1, "C")
_I8_1D = types.Array(types.int8, 1, "C")
_U64_1D = types.Array(types.uint64, 1, "C")
_F32_1D_ANY = types.Array(types.float32, 1, "A")
_I32_1D_ANY = types.Array(types.int32, 1, "A")

PARAMS_TYPE = types.UniTuple(_F32_2D, 4)
STATES_TYPE = types.Tuple((_F32_2D, _F32_2D, _I32_2D, _I32_1D, _I64_1D, _I32_1D, _I64_1D))
EVENTS_TYPE = types.Tuple((_I32_1D, _I32_1D, _I32_1D, _I64_1D))
HYPER_TYPE = types.Tuple((types.float64, types.float64, types.float64, types.float64, types.int64, types.int64))
OUTPUTS_TYPE = types.Tuple((_I8_1D, _F32_1D, _I64_1D))


@njit(types.float32(types.float32), nogil=True, cache=True)
def sigmoid(z):
    """Return 1 / (1 + exp(-z)) without overflow for large |z|."""
    if z >= 0:
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
    e = np.exp(z)
    return e / (np.float32(1.0) + e)


@njit(types.void(_F32_2D, _F32_2D, _F32_2D, types.int64, _F32_1D_ANY, _F32_1D_ANY), nogil=True, cache=True)
def recurrent_step(X, U, W, item, h_prev, h_out):
    """Compute ``h_out = sigmoid(X[item] U + h_prev W)``.

    Parameters
    ----------
    X : ndarray, shape (n, h), float32
    U, W : ndarray, shape (h, h), float32
    item : int
    h_prev : ndarray, shape (h,), float32
    h_out : ndarray, shape (h,), float32
        Written in place; must not alias ``h_prev``.
    """
    size = U.shape[0]
    for j in range(size):
        h_out[j] = 0.0
    for k in range(size):
        xk = X[item, k]
        hk = h_prev[k]
        for j in range(size):
            h_out[j] += xk * U[k, j] + hk * W[k, j]
    for j in range(size):
        h_out[j] = sigmoid(h_out[j])


@njit(types.void(_F32_2D, _F32_2D, _F32_2D, _F32_1D_ANY, _I32_1D_ANY, types.int64, _F32_2D), nogil=True, cache=True)
def forward_window(X, U, W, start_hidden, items, length, hs):
    """Run the recurrence over the first ``length`` window items.

    Parameters
    ----------
    X : ndarray, shape (n, h), float32
    U, W : ndarray, shape (h, h), float32
    start_hidden : ndarray, shape (h,), float32
        The hidden state before ``items[0]``.
    items : ndarray, shape (>= length,), int32
    length : int
    hs : ndarray, shape (>= length + 1, h), float32
        Output: ``hs[0]`` is ``start_hidden`` and ``hs[k + 1]`` the state after ``items[k]``.
    """
    hs[0, :] = start_hidden
    for k in range(length):
        recurrent_step(X, U, W, items[k], hs[k], hs[k + 1])


@njit(types.float32(_F32_1D_ANY, _F32_1D_ANY), nogil=True, cache=True)
def dot(a, b):
    """Return the float32 dot product of two vectors."""
    total = np.float32(0.0)
    for k in range(a.shape[0]):
        total += a[k] * b[k]
    return total


@njit(types.UniTuple(types.float32, 2)(_F32_1D_ANY, _F32_1D_ANY, _F32_1D_ANY), nogil=True, cache=True)
def bpr_loss(hidden, v_pos, v_neg):
    """Return the BPR loss ``-ln sigmoid(x)`` and its derivative ``dL/dx = -sigmoid(-x)``.

    ``x = hidden . v_pos - hidden . v_neg``; the loss is computed as
    ``log(1 + exp(-x))`` in a form that neither overflows nor loses precision.
    """
    x = dot(hidden, v_pos) - dot(hidden, v_neg)
    if x >= 0:
        loss = np.log1p(np.exp(-x))
    else:
        loss = -x + np.log1p(np.exp(x))
    return np.float32(loss), -sigmoid(-x)


@njit(
    types.void(
        _F32_2D, _F32_2D, _F32_2D, _F32_2D, _I32_1D_ANY, types.int64, types.int64, types.int64,
        _F32_2D, _F32_2D, _F32_2D, _F32_1D, _F32_1D, _F32_1D, _F32_1D,
    ),
    nogil=True,
    cache=True,
)
def bptt_gradients(X, U, W, V, items, length, positive, negative, hs, grad_x, grad_u_w, grad_v_pos, grad_v_neg, dh, delta):
    """Compute the gradient of the BPR term (without L2) by truncated BPTT.

    Parameters
    ----------
    X, V : ndarray, shape (n, h), float32
    U, W : ndarray, shape (h, h), float32
    items : ndarray, shape (>= length,), int32
        The window items, oldest first; ``length`` >= 1 of them are used.
    positive, negative : int
        Items i and j of the BPR term.
    hs : ndarray, shape (>= length + 1, h), float32
        The states from ``forward_window``.
    grad_x : ndarray, shape (>= length, h), float32
        Output: row k is dL/dX[items[k]] for window position k.
    grad_u_w : ndarray, shape (2 h, h), float32
        Output: rows [0, h) are dL/dU, rows [h, 2 h) are dL/dW.
    grad_v_pos, grad_v_neg : ndarray, shape (h,), float32
        Outputs: dL/dV[i] and dL/dV[j].
    dh, delta : ndarray, shape (h,), float32
        Scratch space.
    """
    size = U.shape[0]
    h_t = hs[length]
    _, dl_dx = bpr_loss(h_t, V[positive], V[negative])

    for j in range(size):
        grad_v_pos[j] = dl_dx * h_t[j]
        grad_v_neg[j] = -dl_dx * h_t[j]
        dh[j] = dl_dx * (V[positive, j] - V[negative, j])
    grad_u_w[:, :] = 0.0

    for step in range(length - 1, -1, -1):
        h_now = hs[step + 1]
        h_prev = hs[step]
        item = items[step]
        for j in range(size):
            delta[j] = dh[j] * h_now[j] * (np.float32(1.0) - h_now[j])

        for k in range(size):
            xk = X[item, k]
            hk = h_prev[k]
            gx = np.float32(0.0)
            gh = np.float32(0.0)
            for j in range(size):
                grad_u_w[k, j] += xk * delta[j]
                grad_u_w[size + k, j] += hk * delta[j]
                gx += U[k, j] * delta[j]
                gh += W[k, j] * delta[j]
            grad_x[step, k] = gx
            dh[k] = gh


@njit(types.void(_I32_1D_ANY, types.int64, _F32_2D), nogil=True, cache=True)
def merge_duplicate_rows(items, length, grad_x):
    """Add the gradient of every repeated window item into the row of its first position.

    A repeated position's own row is then zeroed, so that each X row is updated
    once with the sum of its gradients.
    """
    for k in range(1, length):
        for first in range(k):
            if items[first] == items[k]:
                grad_x[first, :] += grad_x[k, :]
                grad_x[k, :] = 0.0
                break


@njit(types.boolean(types.float32), nogil=True, cache=True)
def _bounded(value):
    """Return whether a new parameter value is finite and within MAX_ABS_PARAMETER."""
    return math.isfinite(value) and abs(value) <= MAX_ABS_PARAMETER


@njit(types.boolean(_I32_1D_ANY, types.int64, types.int64), nogil=True, cache=True)
def is_repeat(items, length, position):
    """Return whether ``items[position]`` also occurs at an earlier position."""
    for first in range(min(position, length)):
        if items[first] == items[position]:
            return True
    return False


@njit(
    types.boolean(
        PARAMS_TYPE, _I32_1D_ANY, types.int64, types.int64, types.int64,
        _F32_2D, _F32_2D, _F32_1D, _F32_1D,
        types.float64, types.float64, types.float64,
        _F32_2D, _F32_2D, _F32_2D,
    ),
    nogil=True,
    cache=True,
)
def sgd_update(params, items, length, positive, negative, grad_x, grad_u_w, grad_v_pos, grad_v_neg,
               learning_rate, l2, max_grad_norm, new_x, new_u_w, new_v):
    """Apply one SGD step with L2 and gradient-norm clipping, unless it would diverge.

    The full gradient is the BPR gradient plus ``2 * l2 * theta`` for every touched
    parameter; it is scaled by ``min(1, max_grad_norm / ||g||)`` with ||g|| the
    global L2 norm over all of them.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V), updated in place.
    items, length, positive, negative : see bptt_gradients.
    grad_x, grad_u_w, grad_v_pos, grad_v_neg : ndarray, float32
        The BPR gradients from bptt_gradients; ``grad_x`` is changed in place
        (repeated items merged).
    learning_rate, l2, max_grad_norm : float
    new_x : ndarray, shape (>= length, h), float32
    new_u_w : ndarray, shape (2 h, h), float32
    new_v : ndarray, shape (2, h), float32
        Scratch space for the candidate values.

    Returns
    -------
    bool
        True if the step was applied, False if the gradient norm was non-finite
        or any new value, rounded to float32, was non-finite or above
        MAX_ABS_PARAMETER in magnitude (then nothing is changed).
    """
    X, U, W, V = params
    size = U.shape[0]
    reg = 2.0 * l2
    merge_duplicate_rows(items, length, grad_x)

    sq = 0.0
    for k in range(length):
        if not is_repeat(items, length, k):
            row = items[k]
            for j in range(size):
                g = grad_x[k, j] + reg * X[row, j]
                sq += g * g
    for k in range(size):
        for j in range(size):
            gu = grad_u_w[k, j] + reg * U[k, j]
            gw = grad_u_w[size + k, j] + reg * W[k, j]
            sq += gu * gu + gw * gw
    for j in range(size):
        gp = grad_v_pos[j] + reg * V[positive, j]
        gn = grad_v_neg[j] + reg * V[negative, j]
        sq += gp * gp + gn * gn
    norm = math.sqrt(sq)
    if not math.isfinite(norm):
        return False
    step = learning_rate
    if norm > max_grad_norm:
        step = learning_rate * max_grad_norm / norm

    finite = True
    for k in range(length):
        if not is_repeat(items, length, k):
            row = items[k]
            for j in range(size):
                value = np.float32(X[row, j] - step * (grad_x[k, j] + reg * X[row, j]))
                new_x[k, j] = value
                finite &= _bounded(value)
    for k in range(size):
        for j in range(size):
            value_u = np.float32(U[k, j] - step * (grad_u_w[k, j] + reg * U[k, j]))
            value_w = np.float32(W[k, j] - step * (grad_u_w[size + k, j] + reg * W[k, j]))
            new_u_w[k, j] = value_u
            new_u_w[size + k, j] = value_w
            finite &= _bounded(value_u) and _bounded(value_w)
    for j in range(size):
        value_p = np.float32(V[positive, j] - step * (grad_v_pos[j] + reg * V[positive, j]))
        value_n = np.float32(V[negative, j] - step * (grad_v_neg[j] + reg * V[negative, j]))
        new_v[0, j] = value_p
        new_v[1, j] = value_n
        finite &= _bounded(value_p) and _bounded(value_n)
    if not finite:
        return False

    for k in range(length):
        if not is_repeat(items, length, k):
            X[items[k], :] = new_x[k, :]
    U[:, :] = new_u_w[:size, :]
    W[:, :] = new_u_w[size:, :]
    V[positive, :] = new_v[0, :]
    V[negative, :] = new_v[1, :]
    return True


@njit(types.int64(_F32_1D_ANY, _F32_2D, _I64_1D, types.int64, types.int64), nogil=True, cache=True)
def rank_item(hidden, V, item_count, n_rows, target):
    """Return the full-ranking rank of ``target`` among the known items.

    The rank is the number of other known items whose score ``hidden . V[j]`` is
    greater than or equal to the target's, so ties count against the model and a
    constant scorer ranks every item last. An unknown target returns
    RANK_UNKNOWN_ITEM.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float32
    V : ndarray, shape (n, h), float32
    item_count : ndarray, shape (n,), int64
        An item is known when its count is positive.
    n_rows : int
        Items at or above this index are not known.
    target : int
    """
    if target >= n_rows or item_count[target] <= 0:
        return RANK_UNKNOWN_ITEM
    target_score = dot(hidden, V[target])
    rank = 0
    for j in range(n_rows):
        if j != target and item_count[j] > 0 and dot(hidden, V[j]) >= target_score:
            rank += 1
    return rank


@njit(types.void(_F32_1D_ANY, _F32_2D, _I64_1D, types.int64, _F32_1D), nogil=True, cache=True)
def score_items(hidden, V, item_count, n_rows, scores):
    """Write ``hidden . V[j]`` for every known item j < n_rows and -inf for the others.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float32
    V : ndarray, shape (n, h), float32
    item_count : ndarray, shape (n,), int64
    n_rows : int
    scores : ndarray, shape (n,), float32
        Output.
    """
    for j in range(scores.shape[0]):
        if j < n_rows and item_count[j] > 0:
            scores[j] = dot(hidden, V[j])
        else:
            scores[j] = -np.inf


@njit(types.void(PARAMS_TYPE, STATES_TYPE, types.int64, types.int64, _I32_1D, _F32_2D, _F32_1D), nogil=True, cache=True)
def advance_state(params, states, slot, item, items_buf, hs, scratch):
    """Append ``item`` to a user's window and recompute its states with the current parameters.

    When the window is full, its oldest item moves into ``start_hidden``.
    """
    X, U, W, V = params
    hidden, start_hidden, window, window_len, count, last_partition, last_offset = states
    capacity = window.shape[1]
    length = window_len[slot]

    for k in range(length):
        items_buf[k] = window[slot, k]
    items_buf[length] = item
    length += 1

    if length > capacity:
        recurrent_step(X, U, W, items_buf[0], start_hidden[slot], scratch)
        start_hidden[slot, :] = scratch
        for k in range(capacity):
            items_buf[k] = items_buf[k + 1]
        length = capacity

    forward_window(X, U, W, start_hidden[slot], items_buf, length, hs)
    hidden[slot, :] = hs[length]
    for k in range(capacity):
        window[slot, k] = items_buf[k] if k < length else -1
    window_len[slot] = length


@njit(types.void(PARAMS_TYPE, STATES_TYPE, EVENTS_TYPE, SAMPLER_TYPE, HYPER_TYPE, _U64_1D, OUTPUTS_TYPE), nogil=True, cache=True)
def train_batch(params, states, events, sampler, hyper, rng_state, outputs):
    """Apply a micro-batch of events in order: rank, train, then advance each user's state.

    For each event e (user row ``slot``, item i, Kafka partition and offset):

    1. Skip it as STATUS_DUPLICATE if its offset is not newer than the last one
       applied to the user on the same partition.
    2. Rank i from the user's current state (if ``evaluate``), before learning from it.
    3. If the user has history, sample a negative j and take one SGD step on the
       BPR loss, with truncated BPTT through the user's window.
    4. Append i to the user's window, recompute the states, and count the event
       (user count, last partition and offset, item statistics).

    Parameters
    ----------
    params : tuple
        (X (n, h), U (h, h), W (h, h), V (n, h)), float32, updated in place.
    states : tuple
        UserStateBatch.as_tuple(), updated in place.
    events : tuple
        (slot int32 (B,), item int32 (B,), partition int32 (B,), offset int64 (B,)).
    sampler : tuple
        ItemStats.as_tuple(), updated in place.
    hyper : tuple
        (learning_rate, l2, max_grad_norm, popularity_alpha, sampler kind, evaluate 0/1).
    rng_state : ndarray, shape (1,), uint64
    outputs : tuple
        (status int8 (B,), loss float32 (B,), rank int64 (B,)), written per event.
        The loss is NaN for events without an SGD step; the rank is
        RANK_NOT_EVALUATED when not evaluated and RANK_UNKNOWN_ITEM for an item
        never seen before.
    """
    X, U, W, V = params
    hidden, start_hidden, window, window_len, count, last_partition, last_offset = states
    event_slot, event_item, event_partition, event_offset = events
    learning_rate, l2, max_grad_norm, alpha, sampler_kind, evaluate = hyper
    status, losses, ranks = outputs
    item_count, known_items, meta, fenwick = sampler

    size = U.shape[0]
    capacity = window.shape[1]
    hs = np.zeros((capacity + 2, size), dtype=np.float32)
    grad_x = np.zeros((capacity, size), dtype=np.float32)
    grad_u_w = np.zeros((2 * size, size), dtype=np.float32)
    new_x = np.zeros((capacity, size), dtype=np.float32)
    new_u_w = np.zeros((2 * size, size), dtype=np.float32)
    new_v = np.zeros((2, size), dtype=np.float32)
    grad_v_pos = np.zeros(size, dtype=np.float32)
    grad_v_neg = np.zeros(size, dtype=np.float32)
    dh = np.zeros(size, dtype=np.float32)
    delta = np.zeros(size, dtype=np.float32)
    items_buf = np.zeros(capacity + 1, dtype=np.int32)

    for e in range(event_slot.shape[0]):
        slot = event_slot[e]
        item = np.int64(event_item[e])
        partition = event_partition[e]
        offset = event_offset[e]
        losses[e] = np.nan
        ranks[e] = RANK_NOT_EVALUATED

        if last_partition[slot] == partition and offset <= last_offset[slot]:
            status[e] = STATUS_DUPLICATE
            continue

        length = np.int64(window_len[slot])
        forward_window(X, U, W, start_hidden[slot], window[slot], length, hs)
        if evaluate != 0:
            ranks[e] = rank_item(hs[length], V, item_count, meta[1], item)

        outcome = STATUS_NO_HISTORY
        if length > 0:
            negative = sample_negative(sampler, item, sampler_kind, rng_state)
            if negative < 0:
                outcome = STATUS_NO_NEGATIVE
            else:
                loss, _ = bpr_loss(hs[length], V[item], V[negative])
                losses[e] = loss
                bptt_gradients(X, U, W, V, window[slot], length, item, negative, hs,
                               grad_x, grad_u_w, grad_v_pos, grad_v_neg, dh, delta)
                applied = sgd_update(params, window[slot], length, item, negative,
                                     grad_x, grad_u_w, grad_v_pos, grad_v_neg,
                                     learning_rate, l2, max_grad_norm, new_x, new_u_w, new_v)
                outcome = STATUS_TRAINED if applied else STATUS_NON_FINITE

        advance_state(params, states, slot, item, items_buf, hs, delta)
        count[slot] += 1
        last_partition[slot] = partition
        last_offset[slot] = offset
        record_item(sampler, item, alpha)
        status[e] = outcome
