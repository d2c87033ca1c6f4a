"""Numba kernels and a driver of the recurrent BPR model on basket events (DREAM's next-basket setting).

A basket event carries several items. Its input to the recurrence is the
pooled embedding of the basket, with row vectors as in ``drnn_core.kernels``::

    b(t) = pool(X[basket(t)]) U + h(t-1) W,    h(t) = sigmoid(b(t))
    L = sum over the items p of basket(t) and the negatives j of
        -ln sigmoid(s(p) - s(j)) + l2 * ||theta||^2

where pool is the mean or the per-dimension maximum of the basket's X rows and
h(t-1) is the state after the user's previous basket. The gradient flows back
through the last K baskets of the user (truncated BPTT) and through the
pooling: mean pooling gives each of the n basket entries 1 / n of the pooled
gradient, max pooling routes each dimension to the entry with the
maximum (the first one on ties). Baskets are stored as a CSR pair: the items
of basket e are ``basket_items[basket_offsets[e]:basket_offsets[e + 1]]``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from numba import njit, types

from drnn_core.kernels import (
    ACCUMULATORS_TYPE,
    FAST,
    HYPER_TYPE,
    NEGATIVES_SUM,
    OPTIMIZER_ADAGRAD,
    PARAMS_TYPE,
    RANK_NOT_EVALUATED,
    RANK_UNKNOWN_ITEM,
    STATUS_NO_HISTORY,
    STATUS_NO_NEGATIVE,
    STATUS_NON_FINITE,
    STATUS_TRAINED,
    bias_candidate,
    bpr_margin_loss,
    commit_recurrent,
    dot,
    item_score,
    recurrent_candidates,
    recurrent_square_sum,
    regularised_square_sum,
    row_step,
    sigmoid,
)
from drnn_core.config import BASKET_POOLINGS
from drnn_core.errors import ConfigError
from drnn_core.sampling import SAMPLER_TYPE, record_item, sample_negative

POOLING_MEAN = 0
POOLING_MAX = 1
POOLINGS = BASKET_POOLINGS

NO_ROW = -1

_F32_1D = types.Array(types.float32, 1, "C")
_F32_2D = types.Array(types.float32, 2, "C")
_I8_1D = types.Array(types.int8, 1, "C")
_I32_1D = types.Array(types.int32, 1, "C")
_I32_2D = types.Array(types.int32, 2, "C")
_I64_1D = types.Array(types.int64, 1, "C")
_I64_2D = types.Array(types.int64, 2, "C")
_U64_1D = types.Array(types.uint64, 1, "C")

BASKETS_TYPE = types.Tuple((_I32_1D, _I64_1D, _I32_1D))
BASKET_STATES_TYPE = types.Tuple((_F32_2D, _I64_2D, _I32_1D, _I64_1D))
OUTPUTS_TYPE = types.Tuple((_I8_1D, _F32_1D, _I64_1D))
ROWS_TYPE = types.Tuple((_I64_1D, _I64_1D, _I8_1D, _I8_1D, _I8_1D))
ROW_GRADIENTS_TYPE = types.Tuple((_F32_2D, _F32_2D, _F32_1D, _F32_2D))
ROW_SCRATCH_TYPE = types.Tuple((_F32_2D, _F32_2D, _F32_1D, _F32_1D, _F32_1D, _F32_1D, _F32_2D, _F32_2D))
STEP_HYPER_TYPE = types.Tuple((types.float64, types.float64, types.float64, types.int64, types.int64, types.float64,
                               types.int64))


@njit(types.void(_F32_2D, _I32_1D, types.int64, types.int64, types.int64, _F32_1D, _I64_1D),
      nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def pool_basket(X, basket_items, start, stop, pooling, pooled, argmax):
    """Write the mean or per-dimension maximum of the X rows of ``basket_items[start:stop]``.

    Parameters
    ----------
    X : ndarray, shape (n, h), float32
    basket_items : ndarray, shape (total,), int32
    start, stop : int
        The basket's entries, ``stop > start``.
    pooling : int
        POOLING_MEAN or POOLING_MAX.
    pooled : ndarray, shape (h,), float32
        Output: the pooled embedding.
    argmax : ndarray, shape (h,), int64
        Output with POOLING_MAX: the item whose row has the maximum of each
        dimension, the first such entry on ties. Left unchanged with POOLING_MEAN.
    """
    size = pooled.shape[0]
    first = basket_items[start]
    for k in range(size):
        pooled[k] = X[first, k]
        if pooling == POOLING_MAX:
            argmax[k] = first
    for entry in range(start + 1, stop):
        item = basket_items[entry]
        for k in range(size):
            value = X[item, k]
            if pooling == POOLING_MAX:
                if value > pooled[k]:
                    pooled[k] = value
                    argmax[k] = item
            else:
                pooled[k] += value
    if pooling == POOLING_MEAN:
        scale = np.float32(1.0) / np.float32(stop - start)
        for k in range(size):
            pooled[k] *= scale


@njit(types.void(_F32_1D, _F32_2D, _F32_2D, _F32_1D, _F32_1D), nogil=True, cache=True, fastmath=FAST,
      error_model="numpy")
def pooled_step(pooled, U, W, h_prev, h_out):
    """Compute ``h_out = sigmoid(pooled U + h_prev W)``; ``h_out`` must not alias ``h_prev``."""
    size = U.shape[0]
    for j in range(size):
        h_out[j] = 0.0
    for k in range(size):
        xk = pooled[k]
        hk = h_prev[k]
        for j in range(size):
            h_out[j] += xk * U[k, j] + hk * W[k, j]
    for j in range(size):
        h_out[j] = sigmoid(h_out[j])


@njit(
    types.void(_F32_2D, _F32_2D, _F32_2D, _F32_1D, BASKETS_TYPE, _I64_1D, types.int64, types.int64,
               _F32_2D, _F32_2D, _I64_2D),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def forward_baskets(X, U, W, start_hidden, baskets, window, length, pooling, hs, pooled, argmax):
    """Run the recurrence over the first ``length`` baskets of a user's window.

    Parameters
    ----------
    X : ndarray, shape (n, h), float32
    U, W : ndarray, shape (h, h), float32
    start_hidden : ndarray, shape (h,), float32
        The hidden state before the window's oldest basket.
    baskets : tuple
        (users int32 (N,), basket_offsets int64 (N + 1,), basket_items int32 (total,)).
    window : ndarray, shape (>= length,), int64
        Basket indexes, oldest first.
    length : int
    pooling : int
    hs : ndarray, shape (>= length + 1, h), float32
        Output: ``hs[0]`` is ``start_hidden`` and ``hs[k + 1]`` the state after basket ``window[k]``.
    pooled : ndarray, shape (>= length, h), float32
        Output: row k is the pooled input of window position k.
    argmax : ndarray, shape (>= length, h), int64
        Output with max pooling, see ``pool_basket``.
    """
    _, offsets, basket_items = baskets
    hs[0, :] = start_hidden
    for k in range(length):
        basket = window[k]
        pool_basket(X, basket_items, offsets[basket], offsets[basket + 1], pooling, pooled[k], argmax[k])
        pooled_step(pooled[k], U, W, hs[k], hs[k + 1])


@njit(types.int64(_I64_1D, ROWS_TYPE, types.int64, types.int64), nogil=True, cache=True)
def register_row(row_slot, rows, item, role):
    """Return the gradient slot of ``item``, adding it to the touched rows on first use.

    ``role`` 0 marks the row as an X (input) row and 1 as a scored V row.
    """
    row_of, count, is_input, is_scored, _ = rows
    slot = row_slot[item]
    if slot == NO_ROW:
        slot = count[0]
        count[0] += 1
        row_slot[item] = slot
        row_of[slot] = item
        is_input[slot] = 0
        is_scored[slot] = 0
    if role == 0:
        is_input[slot] = 1
    else:
        is_scored[slot] = 1
    return slot


@njit(types.void(_I64_1D, ROWS_TYPE, ROW_GRADIENTS_TYPE), nogil=True, cache=True)
def release_rows(row_slot, rows, grads):
    """Reset the slot map and zero the row gradients of every touched row, for the next event."""
    row_of, count, _, _, _ = rows
    grad_x, grad_v, grad_bias, _ = grads
    for slot in range(count[0]):
        row_slot[row_of[slot]] = NO_ROW
        grad_x[slot, :] = 0.0
        grad_v[slot, :] = 0.0
        grad_bias[slot] = 0.0
    count[0] = 0


@njit(
    types.float32(
        PARAMS_TYPE, BASKETS_TYPE, _I64_1D, types.int64, types.int64, _I64_1D, types.int64, types.int64,
        _F32_2D, _F32_2D, _I64_2D, _I64_1D, ROWS_TYPE, ROW_GRADIENTS_TYPE, _F32_1D, _F32_2D,
    ),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def basket_gradients(params, baskets, window, length, target, negatives, n_negatives, pooling,
                     hs, pooled, argmax, row_slot, rows, grads, dh, delta):
    """Compute the gradient of the summed BPR terms of one basket event (without L2) by truncated BPTT.

    Parameters
    ----------
    params : tuple
        (X (n, h), U (h, h), W (h, h), V (n, h), bias (n,)), float32.
    baskets : tuple
        See ``forward_baskets``.
    window : ndarray, shape (>= length,), int64
        The user's earlier baskets, oldest first; ``length`` >= 1 of them are used.
    target : int
        Index of the basket whose items are the positives.
    negatives : ndarray, shape (>= n_negatives,), int64
        Each item p of the target and each negative j add the term -ln sigmoid(s(p) - s(j)).
    pooling : int
    hs, pooled, argmax : ndarray
        From ``forward_baskets`` over the same window.
    row_slot : ndarray, shape (n,), int64
        NO_ROW for every item on entry; ``register_row`` fills it and
        ``release_rows`` resets it.
    rows : tuple
        (row_of int64 (R,), count int64 (1,), is_input int8 (R,), is_scored
        int8 (R,), updates_v int8 (R,) for ``basket_update``): the touched rows,
        with R at least the number of distinct items of the window, the target
        and the negatives. ``count[0]`` must be 0 on entry.
    grads : tuple
        Outputs (grad_x (R, h), grad_v (R, h), grad_bias (R,), grad_u_w (2 h, h)),
        float32. Row r of grad_x and grad_v is dL/dX and dL/dV of item
        ``row_of[r]``, summed over all its uses. Rows [0, h) of grad_u_w are
        dL/dU and rows [h, 2 h) dL/dW. The row gradients must be zero on entry.
    dh : ndarray, shape (h,), float32
        Scratch space.
    delta : ndarray, shape (>= length, h), float32
        Scratch space: row k ends as dL/db at window position k.

    Returns
    -------
    float32
        The summed BPR loss.
    """
    X, U, W, V, bias = params
    _, offsets, basket_items = baskets
    grad_x, grad_v, grad_bias, grad_u_w = grads
    size = U.shape[0]
    h_t = hs[length]

    for j in range(size):
        dh[j] = 0.0
    total_loss = np.float32(0.0)
    for entry in range(offsets[target], offsets[target + 1]):
        positive = np.int64(basket_items[entry])
        positive_slot = register_row(row_slot, rows, positive, 1)
        positive_score = item_score(h_t, V, bias, positive)
        for n in range(n_negatives):
            negative = negatives[n]
            negative_slot = register_row(row_slot, rows, negative, 1)
            loss, dl_dx = bpr_margin_loss(positive_score - item_score(h_t, V, bias, negative))
            total_loss += loss
            grad_bias[positive_slot] += dl_dx
            grad_bias[negative_slot] -= dl_dx
            for j in range(size):
                grad_v[positive_slot, j] += dl_dx * h_t[j]
                grad_v[negative_slot, j] -= dl_dx * h_t[j]
                dh[j] += dl_dx * (V[positive, j] - V[negative, j])

    pooled_grad = np.empty(size, dtype=np.float32)
    for step in range(length - 1, -1, -1):
        h_now = hs[step + 1]
        step_delta = delta[step]
        for j in range(size):
            step_delta[j] = dh[j] * h_now[j] * (np.float32(1.0) - h_now[j])
        for k in range(size):
            pooled_grad[k] = dot(U[k], step_delta)
            dh[k] = dot(W[k], step_delta)

        basket = window[step]
        start, stop = offsets[basket], offsets[basket + 1]
        if pooling == POOLING_MAX:
            for entry in range(start, stop):
                register_row(row_slot, rows, np.int64(basket_items[entry]), 0)
            for k in range(size):
                grad_x[row_slot[argmax[step, k]], k] += pooled_grad[k]
        else:
            share = np.float32(1.0) / np.float32(stop - start)
            for entry in range(start, stop):
                slot = register_row(row_slot, rows, np.int64(basket_items[entry]), 0)
                for k in range(size):
                    grad_x[slot, k] += share * pooled_grad[k]

    for k in range(size):
        for j in range(size):
            grad_u_w[k, j] = 0.0
            grad_u_w[size + k, j] = 0.0
        for step in range(length):
            xk = pooled[step, k]
            hk = hs[step, k]
            step_delta = delta[step]
            for j in range(size):
                grad_u_w[k, j] += xk * step_delta[j]
                grad_u_w[size + k, j] += hk * step_delta[j]
    return total_loss


@njit(
    types.boolean(PARAMS_TYPE, ACCUMULATORS_TYPE, ROWS_TYPE, ROW_GRADIENTS_TYPE, STEP_HYPER_TYPE, ROW_SCRATCH_TYPE),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def basket_update(params, accumulators, rows, grads, step_hyper, scratch):
    """Apply one clipped SGD or Adagrad step with L2 to the rows of one basket event, unless it would diverge.

    The rules are those of ``kernels.sgd_update``. The L2 term ``2 * l2 *
    theta`` covers every touched parameter once: the X rows of the window's
    items, U, W, the V rows of the target's items and the negatives, and their
    biases when the model has them. The global norm clips the step, and Adagrad
    keeps one accumulator per X or V row, per element of U and W and per bias.
    With tied embeddings a row that is both an input and a scored row gets one
    update with the sum of both gradients.

    Parameters
    ----------
    params, accumulators : tuple
        As in ``kernels.sgd_update``, updated in place.
    rows, grads : tuple
        From ``basket_gradients``; with tied embeddings grad_v takes grad_x in place.
    step_hyper : tuple
        (learning_rate, l2, max_grad_norm, optimizer, item_bias 0/1,
        recurrent learning rate scale, tied 0/1).
    scratch : tuple
        (new_x (R, h), new_v (R, h), new_acc_x (R,), new_acc_v (R,),
        new_bias (R,), new_acc_bias (R,), new_u_w (2 h, h), new_acc_u_w (2 h, h)), float32.

    Returns
    -------
    bool
        True if the step was applied, False if the gradient norm was non-finite
        or any new value was non-finite or above MAX_ABS_PARAMETER in magnitude
        (then nothing is changed).
    """
    X, U, W, V, bias = params
    acc_x, acc_u, acc_w, acc_v, acc_bias = accumulators
    row_of, count, is_input, is_scored, updates_v = rows
    grad_x, grad_v, grad_bias, grad_u_w = grads
    learning_rate, l2, max_grad_norm, optimizer, item_bias, recurrent_scale, tied = step_hyper
    new_x, new_v, new_acc_x, new_acc_v, new_bias, new_acc_bias, new_u_w, new_acc_u_w = scratch
    size = U.shape[0]
    n_rows = count[0]
    reg32 = np.float32(2.0 * l2)

    # With tied embeddings every touched row is one V row whose gradient is the sum of both roles.
    for r in range(n_rows):
        updates_v[r] = is_scored[r]
        if tied != 0 and is_input[r] != 0:
            grad_v[r, :] += grad_x[r, :]
            updates_v[r] = 1

    sq = np.float32(0.0)
    for r in range(n_rows):
        row = row_of[r]
        new_acc_x[r] = 0.0
        new_acc_v[r] = 0.0
        if tied == 0 and is_input[r] != 0:
            new_acc_x[r] = regularised_square_sum(grad_x[r], X[row], reg32)
            sq += new_acc_x[r]
        if updates_v[r] != 0:
            new_acc_v[r] = regularised_square_sum(grad_v[r], V[row], reg32)
            sq += new_acc_v[r]
        if item_bias != 0 and is_scored[r] != 0:
            g = grad_bias[r] + reg32 * bias[row]
            sq += g * g
    sq += recurrent_square_sum(grad_u_w, U, W, reg32)
    norm = math.sqrt(sq)
    if not math.isfinite(norm):
        return False
    clip = 1.0
    if norm > max_grad_norm:
        clip = max_grad_norm / norm

    rate = np.float32(learning_rate)
    clip32 = np.float32(clip)
    row_scale = clip32 * clip32 / np.float32(size)
    bad = 0
    for r in range(n_rows):
        row = row_of[r]
        if tied == 0 and is_input[r] != 0:
            new_acc_x[r] = acc_x[row] + new_acc_x[r] * row_scale
            bad += row_step(X[row], grad_x[r], new_acc_x[r], rate, reg32, clip32, optimizer, new_x[r])
        if updates_v[r] != 0:
            new_acc_v[r] = acc_v[row] + new_acc_v[r] * row_scale
            bad += row_step(V[row], grad_v[r], new_acc_v[r], rate, reg32, clip32, optimizer, new_v[r])
        if item_bias != 0 and is_scored[r] != 0:
            bad += bias_candidate(bias, acc_bias, grad_bias, new_bias, new_acc_bias, row, r, learning_rate, reg32,
                                  clip, optimizer)

    recurrent_rate = np.float32(learning_rate * recurrent_scale * clip)
    bad += recurrent_candidates(U, W, acc_u, acc_w, grad_u_w, new_u_w, new_acc_u_w, recurrent_rate, reg32,
                                clip32 * clip32, optimizer)
    if bad > 0:
        return False

    adagrad = optimizer == OPTIMIZER_ADAGRAD
    for r in range(n_rows):
        row = row_of[r]
        if tied == 0 and is_input[r] != 0:
            X[row, :] = new_x[r, :]
            if adagrad:
                acc_x[row] = new_acc_x[r]
        if updates_v[r] != 0:
            V[row, :] = new_v[r, :]
            if adagrad:
                acc_v[row] = new_acc_v[r]
        if item_bias != 0 and is_scored[r] != 0:
            bias[row] = new_bias[r]
            if adagrad:
                acc_bias[row] = new_acc_bias[r]
    commit_recurrent(U, W, acc_u, acc_w, new_u_w, new_acc_u_w, adagrad)
    return True


@njit(
    types.int64(SAMPLER_TYPE, _I32_1D, types.int64, types.int64, types.int64, _U64_1D, types.int64, types.int64,
                _F32_1D, _F32_2D, _F32_1D, _I64_1D),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def draw_basket_negatives(sampler, basket_items, start, stop, kind, rng_state, count, mode, hidden, V, bias, out):
    """Draw ``count`` negatives outside the basket and keep all (NEGATIVES_SUM) or the best-scored one.

    Each draw is ``sampling.sample_negative`` with the basket's first item
    excluded. A draw that returns another item of the basket counts as a
    failed draw and is dropped, as is a draw that finds no other known item.

    Returns
    -------
    int
        The number of negatives written to ``out``.
    """
    kept = 0
    best_score = np.float32(-np.inf)
    first = np.int64(basket_items[start])
    for _ in range(count):
        candidate = sample_negative(sampler, first, kind, rng_state)
        if candidate < 0:
            continue
        in_basket = False
        for entry in range(start + 1, stop):
            if basket_items[entry] == candidate:
                in_basket = True
                break
        if in_basket:
            continue
        if mode == NEGATIVES_SUM:
            out[kept] = candidate
            kept += 1
            continue
        score = item_score(hidden, V, bias, candidate)
        if kept == 0 or score > best_score:
            out[0] = candidate
            best_score = score
            kept = 1
    return kept


@njit(types.int64(_F32_1D, _F32_2D, _F32_1D, _I64_1D, types.int64, _I32_1D, types.int64, types.int64, _F32_1D),
      nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def best_basket_rank(hidden, V, bias, item_count, n_rows, basket_items, start, stop, scores):
    """Return the smallest full-ranking rank of a basket's known items.

    An item's rank is that of ``kernels.rank_item``: the number of other known
    items with a score greater than or equal to its own. The smallest rank is
    the rank of the basket item with the highest score, so the scores are
    computed once. A basket with no known item returns RANK_UNKNOWN_ITEM.

    Parameters
    ----------
    scores : ndarray, shape (>= n_rows,), float32
        Scratch space.
    """
    for j in range(n_rows):
        if item_count[j] > 0:
            scores[j] = item_score(hidden, V, bias, j)
    best = np.int64(-1)
    for entry in range(start, stop):
        item = np.int64(basket_items[entry])
        if item < n_rows and item_count[item] > 0 and (best < 0 or scores[item] > scores[best]):
            best = item
    if best < 0:
        return RANK_UNKNOWN_ITEM
    target_score = scores[best]
    rank = 0
    for j in range(n_rows):
        if j != best and item_count[j] > 0 and scores[j] >= target_score:
            rank += 1
    return rank


@njit(
    types.void(PARAMS_TYPE, BASKET_STATES_TYPE, types.int64, BASKETS_TYPE, types.int64, types.int64,
               _F32_2D, _F32_2D, _I64_2D, _F32_1D),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def advance_basket_state(params, states, user, baskets, basket, pooling, hs, pooled, argmax, scratch):
    """Append ``basket`` to the user's window; when the window is full, fold its oldest basket into ``start_hidden``.

    The fold runs one recurrent step with the current parameters.
    """
    X, U, W, _, _ = params
    start_hidden, window, window_len, _ = states
    _, offsets, basket_items = baskets
    capacity = window.shape[1]
    length = window_len[user]
    if length == capacity:
        oldest = window[user, 0]
        pool_basket(X, basket_items, offsets[oldest], offsets[oldest + 1], pooling, pooled[0], argmax[0])
        pooled_step(pooled[0], U, W, start_hidden[user], scratch)
        start_hidden[user, :] = scratch
        for k in range(capacity - 1):
            window[user, k] = window[user, k + 1]
        length -= 1
    window[user, length] = basket
    window_len[user] = length + 1


@njit(
    types.void(PARAMS_TYPE, ACCUMULATORS_TYPE, BASKET_STATES_TYPE, BASKETS_TYPE, types.int64, types.int64,
               SAMPLER_TYPE, HYPER_TYPE, types.int64, types.int64, _U64_1D, OUTPUTS_TYPE),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def train_baskets(params, accumulators, states, baskets, begin, end, sampler, hyper, pooling, max_basket,
                  rng_state, outputs):
    """Apply basket events ``begin`` to ``end - 1`` in order: rank, train, then advance each user's window.

    For each basket event e of user u:

    1. If u has an earlier basket and ranking is on (``hyper`` sample interval
       not 0), write the smallest rank of e's known items from u's current
       state (``best_basket_rank``).
    2. If u has an earlier basket, draw the negatives and take one SGD or
       Adagrad step on the basket loss, with truncated BPTT through u's window.
    3. Append e to u's window and count every item of e in the item statistics.

    Parameters
    ----------
    params, accumulators : tuple
        As in ``kernels.train_batch``, updated in place; X and V must have a
        row for every item of the baskets.
    states : tuple
        (start_hidden float32 (S, h), window int64 (S, K) of basket indexes,
        window_len int32 (S,), count int64 (S,)), updated in place.
    baskets : tuple
        See ``forward_baskets``; ``users[e]`` is the row of e's user in ``states``.
    sampler : tuple
        ItemStats.as_tuple(), updated in place.
    hyper : tuple
        As in ``kernels.train_batch``; the sample interval only switches
        ranking on (>= 1) or off (0), because basket mode is offline.
    pooling : int
    max_basket : int
        At least the number of items of every basket in ``baskets``.
    rng_state : ndarray, shape (1,), uint64
    outputs : tuple
        (status int8 (N,), loss float32 (N,), rank int64 (N,)), written for the
        events in [begin, end). The loss is NaN without an SGD step; the rank
        is RANK_NOT_EVALUATED for a user's first basket or with ranking off.
    """
    X, U, W, V, bias = params
    start_hidden, window, window_len, count = states
    users, offsets, basket_items = baskets
    (learning_rate, l2, max_grad_norm, alpha, sampler_kind, sample_every,
     n_draws, negative_mode, optimizer, item_bias, recurrent_scale, tied) = hyper
    status, losses, ranks = outputs
    item_count, _, meta, _ = sampler
    step_hyper = (learning_rate, l2, max_grad_norm, optimizer, item_bias, recurrent_scale, tied)

    size = U.shape[0]
    capacity = window.shape[1]
    max_rows = capacity * max_basket + max_basket + n_draws
    hs = np.zeros((capacity + 1, size), dtype=np.float32)
    pooled = np.zeros((capacity, size), dtype=np.float32)
    argmax = np.zeros((capacity, size), dtype=np.int64)
    delta = np.zeros((capacity, size), dtype=np.float32)
    dh = np.zeros(size, dtype=np.float32)
    negatives = np.zeros(n_draws, dtype=np.int64)
    scores = np.zeros(X.shape[0], dtype=np.float32)
    row_slot = np.full(X.shape[0], NO_ROW, dtype=np.int64)
    rows = (
        np.zeros(max_rows, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(max_rows, dtype=np.int8),
        np.zeros(max_rows, dtype=np.int8), np.zeros(max_rows, dtype=np.int8),
    )
    grads = (
        np.zeros((max_rows, size), dtype=np.float32), np.zeros((max_rows, size), dtype=np.float32),
        np.zeros(max_rows, dtype=np.float32), np.zeros((2 * size, size), dtype=np.float32),
    )
    scratch = (
        np.zeros((max_rows, size), dtype=np.float32), np.zeros((max_rows, size), dtype=np.float32),
        np.zeros(max_rows, dtype=np.float32), np.zeros(max_rows, dtype=np.float32),
        np.zeros(max_rows, dtype=np.float32), np.zeros(max_rows, dtype=np.float32),
        np.zeros((2 * size, size), dtype=np.float32), np.zeros((2 * size, size), dtype=np.float32),
    )

    for e in range(begin, end):
        user = users[e]
        start, stop = offsets[e], offsets[e + 1]
        losses[e] = np.nan
        ranks[e] = RANK_NOT_EVALUATED
        length = np.int64(window_len[user])

        outcome = STATUS_NO_HISTORY
        if length > 0:
            forward_baskets(X, U, W, start_hidden[user], baskets, window[user], length, pooling, hs, pooled, argmax)
            if sample_every != 0:
                ranks[e] = best_basket_rank(hs[length], V, bias, item_count, meta[1], basket_items, start, stop,
                                            scores)
            kept = draw_basket_negatives(sampler, basket_items, start, stop, sampler_kind, rng_state, n_draws,
                                         negative_mode, hs[length], V, bias, negatives)
            if kept == 0:
                outcome = STATUS_NO_NEGATIVE
            else:
                losses[e] = basket_gradients(params, baskets, window[user], length, e, negatives, kept, pooling,
                                             hs, pooled, argmax, row_slot, rows, grads, dh, delta)
                applied = basket_update(params, accumulators, rows, grads, step_hyper, scratch)
                release_rows(row_slot, rows, grads)
                outcome = STATUS_TRAINED if applied else STATUS_NON_FINITE

        advance_basket_state(params, states, user, baskets, e, pooling, hs, pooled, argmax, dh)
        count[user] += 1
        for entry in range(start, stop):
            record_item(sampler, np.int64(basket_items[entry]), alpha)
        status[e] = outcome


@dataclasses.dataclass
class BasketStates:
    """The basket-mode states of S users, one row per user.

    Attributes
    ----------
    start_hidden : ndarray, shape (S, h), float32
        The hidden state before the oldest basket of the window.
    window : ndarray, shape (S, K), int64
        Indexes of the last K baskets in the stream, oldest first; the first
        ``window_len`` entries are valid.
    window_len : ndarray, shape (S,), int32
    count : ndarray, shape (S,), int64
        Number of baskets applied to the user.
    """

    start_hidden: np.ndarray
    window: np.ndarray
    window_len: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls, size: int, hidden_size: int, window: int) -> "BasketStates":
        """Create the states of ``size`` new users."""
        return cls(
            start_hidden=np.zeros((size, hidden_size), dtype=np.float32),
            window=np.full((size, window), -1, dtype=np.int64),
            window_len=np.zeros(size, dtype=np.int32),
            count=np.zeros(size, dtype=np.int64),
        )

    def as_tuple(self) -> tuple:
        """Return the arrays in the order the kernels take them."""
        return (self.start_hidden, self.window, self.window_len, self.count)


def pooling_code(pooling: str) -> int:
    """Return the kernel code of a basket pooling name ("mean" or "max").

    Raises
    ------
    ConfigError
        If the name is neither.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"Invalid basket_pooling={pooling!r}: expected one of {', '.join(POOLINGS)}")
    return POOLING_MEAN if pooling == "mean" else POOLING_MAX


def train_basket_range(model, states: BasketStates, baskets: tuple, begin: int, end: int, outputs: tuple, *,
                       pooling: str = "mean", evaluate: bool = True) -> None:
    """Apply basket events ``begin`` to ``end - 1`` to a ``RecurrentBPR`` model; see ``train_baskets``.

    Parameters
    ----------
    model : RecurrentBPR
        Its parameters, accumulators, item statistics and RNG state are updated
        in place; its capacity grows to fit the items of the events.
    states : BasketStates
    baskets : tuple
        (users int32 (N,), basket_offsets int64 (N + 1,), basket_items int32 (total,)),
        the whole stream, because the users' windows point to earlier baskets.
    begin, end : int
    outputs : tuple
        (status int8 (N,), loss float32 (N,), rank int64 (N,)).
    pooling : str
        "mean" or "max".
    evaluate : bool
        Rank the baskets of users with history before training on them.
    """
    code = pooling_code(pooling)
    users, offsets, basket_items = baskets
    lengths = np.diff(offsets)
    if lengths.size and int(lengths.min()) < 1:
        empty = int(np.argmin(lengths))
        raise ConfigError(f"Basket {empty} has no items: every basket event needs at least one item")
    if basket_items.size:
        model.ensure_capacity(int(basket_items[offsets[begin]:offsets[end]].max(initial=0)) + 1)
    max_basket = int(lengths.max(initial=1))
    train_baskets(
        (model.X, model.U, model.W, model.V, model.bias),
        (model.acc_x, model.acc_u, model.acc_w, model.acc_v, model.acc_bias),
        states.as_tuple(),
        baskets,
        int(begin),
        int(end),
        model.stats.as_tuple(),
        model.kernel_hyper(1 if evaluate else 0),
        code,
        max_basket,
        model.rng_state,
        outputs,
    )
