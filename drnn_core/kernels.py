"""Numba kernels of the recurrent BPR model: forward, loss, truncated BPTT, SGD and Adagrad, batches, ranking.

Notation, with row vectors and an item's embedding in row ``X[i]``::

    b(t) = X[i(t)] U + h(t-1) W,    h(t) = sigmoid(b(t))
    s(i) = h(t) . V[i] + c[i]
    x_uij = s(i) - s(j)
    L = sum over the negatives j of -ln sigmoid(x_uij) + l2 * ||theta||^2

c is the item bias (kept at zero when the model has none). theta is every
parameter the event touches: the X rows of the user's window, U, W, the V rows
and biases of i and of the negatives. Gradients flow back through the K window
steps and stop at the hidden state before the window (truncated BPTT). Every
kernel releases the GIL, takes C-ordered arrays of the dtypes in its signature,
and allocates nothing per event.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types

from drnn_core.config import MAX_ABS_PARAMETER
from drnn_core.rng import mix64
from drnn_core.sampling import SAMPLER_TYPE, record_item, sample_negative

STATUS_TRAINED = 0
STATUS_NO_HISTORY = 1
STATUS_NO_NEGATIVE = 2
STATUS_NON_FINITE = 3
STATUS_DUPLICATE = 4

RANK_UNKNOWN_ITEM = -1
RANK_NOT_EVALUATED = -2

OPTIMIZER_SGD = 0
OPTIMIZER_ADAGRAD = 1

# merge_duplicate_negatives writes this over a draw that repeats an earlier one.
REPEATED_NEGATIVE = -1

NEGATIVES_SUM = 0
NEGATIVES_HARDEST = 1

# Added to the square root of a row or bias Adagrad accumulator before dividing
# by it. The element-wise U and W step uses its square as a floor instead.
ADAGRAD_EPSILON = 1e-8

# LLVM may reorder float32 sums (so dot products and norms use SIMD lanes) and
# fuse multiply-adds, but must keep NaN and infinity semantics, because the
# divergence checks compare against them. Every kernel also uses NumPy's error
# model, so a division by zero gives inf or NaN (which those checks catch)
# instead of a per-element ZeroDivisionError test that stops vectorisation.
FAST = {"reassoc", "contract", "arcp", "nsz"}

_F32_1D = types.Array(types.float32, 1, "C")
_F32_2D = types.Array(types.float32, 2, "C")
_I32_1D = types.Array(types.int32, 1, "C")
_I32_2D = types.Array(types.int32, 2, "C")
_I64_1D = types.Array(types.int64, 1, "C")
_I8_1D = types.Array(types.int8, 1, "C")
_U64_1D = types.Array(types.uint64, 1, "C")
_I32_1D_ANY = types.Array(types.int32, 1, "A")

PARAMS_TYPE = types.Tuple((_F32_2D, _F32_2D, _F32_2D, _F32_2D, _F32_1D))
ACCUMULATORS_TYPE = types.Tuple((_F32_1D, _F32_2D, _F32_2D, _F32_1D, _F32_1D))
STATES_TYPE = types.Tuple((_F32_2D, _F32_2D, _I32_2D, _I32_1D, _I64_1D, _I32_1D, _I64_1D))
EVENTS_TYPE = types.Tuple((_I32_1D, _I32_1D, _I32_1D, _I64_1D))
HYPER_TYPE = types.Tuple((
    types.float64, types.float64, types.float64, types.float64, types.int64, types.int64,
    types.int64, types.int64, types.int64, types.int64, types.float64, types.int64,
))
OUTPUTS_TYPE = types.Tuple((_I8_1D, _F32_1D, _I64_1D))
GRADIENTS_TYPE = types.Tuple((_F32_2D, _F32_2D, _F32_2D, _F32_1D))
UPDATE_SCRATCH_TYPE = types.Tuple((_F32_2D, _F32_2D, _F32_2D, _F32_1D, _F32_1D, _F32_2D, _F32_1D, _F32_1D, _I64_1D))
STEP_HYPER_TYPE = types.Tuple((types.float64, types.float64, types.float64, types.int64, types.int64, types.float64,
                               types.int64))


@njit(types.float32(types.float32), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def sigmoid(z):
    """Return 1 / (1 + exp(-z)) without overflow for large |z|."""
    if z >= 0:
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-z))
    e = np.exp(z)
    return e / (np.float32(1.0) + e)


@njit(types.void(_F32_2D, _F32_2D, _F32_2D, types.int64, _F32_1D, _F32_1D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
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


@njit(types.void(_F32_2D, _F32_2D, _F32_2D, _F32_1D, _I32_1D_ANY, types.int64, _F32_2D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
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


@njit(types.float32(_F32_1D, _F32_1D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def dot(a, b):
    """Return the float32 dot product of two vectors."""
    total = np.float32(0.0)
    for k in range(a.shape[0]):
        total += a[k] * b[k]
    return total


@njit(types.float32(_F32_1D, _F32_2D, _F32_1D, types.int64), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def item_score(hidden, V, bias, item):
    """Return the score ``hidden . V[item] + bias[item]``."""
    return dot(hidden, V[item]) + bias[item]


@njit(types.UniTuple(types.float32, 2)(types.float32), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def bpr_margin_loss(x):
    """Return the BPR loss ``-ln sigmoid(x)`` and its derivative ``dL/dx = -sigmoid(-x)``.

    The loss is computed as ``log(1 + exp(-x))`` in a form that neither
    overflows nor loses precision.
    """
    e = np.exp(-abs(x))
    if x >= 0:
        return np.float32(np.log1p(e)), -e / (np.float32(1.0) + e)
    return np.float32(-x + np.log1p(e)), np.float32(-1.0) / (np.float32(1.0) + e)


@njit(types.UniTuple(types.float32, 2)(_F32_1D, _F32_1D, _F32_1D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def bpr_loss(hidden, v_pos, v_neg):
    """Return the BPR loss and ``dL/dx`` for ``x = hidden . v_pos - hidden . v_neg`` (no bias)."""
    return bpr_margin_loss(dot(hidden, v_pos) - dot(hidden, v_neg))


@njit(
    types.float32(
        PARAMS_TYPE, _I32_1D_ANY, types.int64, types.int64, _I64_1D, types.int64,
        _F32_2D, GRADIENTS_TYPE, _F32_1D, _F32_2D,
    ),
    nogil=True,
    cache=True,
    fastmath=FAST,
    error_model="numpy",
)
def bptt_gradients(params, items, length, positive, negatives, n_negatives, hs, grads, dh, delta):
    """Compute the gradient of the summed BPR terms (without L2) by truncated BPTT.

    Parameters
    ----------
    params : tuple
        (X (n, h), U (h, h), W (h, h), V (n, h), bias (n,)), float32.
    items : ndarray, shape (>= length,), int32
        The window items, oldest first; ``length`` >= 1 of them are used.
    positive : int
        Item i.
    negatives : ndarray, shape (>= n_negatives,), int64
        The negatives j; each one adds a BPR term, so a repeated j counts twice.
    n_negatives : int
        Number of BPR terms, >= 1.
    hs : ndarray, shape (>= length + 1, h), float32
        The states from ``forward_window``.
    grads : tuple
        Outputs (grad_x, grad_u_w, grad_v, grad_bias), float32:
        grad_x (>= length, h), row k is dL/dX[items[k]] for window position k;
        grad_u_w (2 h, h), rows [0, h) are dL/dU and rows [h, 2 h) dL/dW;
        grad_v (>= n_negatives + 1, h), row 0 is dL/dV[i] and row n + 1 the
        term of negatives[n] in dL/dV[j]; grad_bias (>= n_negatives + 1,), the
        same for the biases.
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
    grad_x, grad_u_w, grad_v, grad_bias = grads
    size = U.shape[0]
    h_t = hs[length]
    positive_score = item_score(h_t, V, bias, positive)

    total_loss = np.float32(0.0)
    grad_bias[0] = 0.0
    for j in range(size):
        grad_v[0, j] = 0.0
        dh[j] = 0.0
    for n in range(n_negatives):
        negative = negatives[n]
        loss, dl_dx = bpr_margin_loss(positive_score - item_score(h_t, V, bias, negative))
        total_loss += loss
        grad_bias[0] += dl_dx
        grad_bias[n + 1] = -dl_dx
        for j in range(size):
            grad_v[0, j] += dl_dx * h_t[j]
            grad_v[n + 1, j] = -dl_dx * h_t[j]
            dh[j] += dl_dx * (V[positive, j] - V[negative, j])

    for step in range(length - 1, -1, -1):
        h_now = hs[step + 1]
        step_delta = delta[step]
        for j in range(size):
            step_delta[j] = dh[j] * h_now[j] * (np.float32(1.0) - h_now[j])
        for k in range(size):
            grad_x[step, k] = dot(U[k], step_delta)
            dh[k] = dot(W[k], step_delta)

    for k in range(size):
        for j in range(size):
            grad_u_w[k, j] = 0.0
            grad_u_w[size + k, j] = 0.0
        for step in range(length):
            xk = X[items[step], k]
            hk = hs[step, k]
            step_delta = delta[step]
            for j in range(size):
                grad_u_w[k, j] += xk * step_delta[j]
                grad_u_w[size + k, j] += hk * step_delta[j]
    return total_loss


@njit(types.void(_I32_1D_ANY, types.int64, _F32_2D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
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


@njit(types.int64(_I64_1D, types.int64, types.int64), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def count_equal(values, length, target):
    """Return how many of ``values[:length]`` equal ``target``.

    The loop has no early exit, so LLVM compares several values per
    instruction. Callers search for the first match only when this count is
    positive.
    """
    matches = 0
    for k in range(length):
        if values[k] == target:
            matches += 1
    return matches


@njit(types.void(_I64_1D, types.int64, _F32_2D, _F32_1D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def merge_duplicate_negatives(negatives, n_negatives, grad_v, grad_bias):
    """Add the V and bias gradient of every repeated negative into the row of its first draw.

    Row n + 1 of ``grad_v`` and entry n + 1 of ``grad_bias`` belong to
    ``negatives[n]``. A repeated draw's own row is then zeroed and the draw is
    set to REPEATED_NEGATIVE in ``negatives``, so later loops skip it in O(1).
    """
    for n in range(1, n_negatives):
        if count_equal(negatives, n, negatives[n]) == 0:
            continue
        for first in range(n):
            if negatives[first] == negatives[n]:
                grad_v[first + 1, :] += grad_v[n + 1, :]
                grad_bias[first + 1] += grad_bias[n + 1]
                grad_v[n + 1, :] = 0.0
                grad_bias[n + 1] = 0.0
                negatives[n] = REPEATED_NEGATIVE
                break


@njit(types.void(_I32_1D_ANY, types.int64, types.int64, _I64_1D, types.int64, _F32_2D, _F32_2D, _I64_1D),
      nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def merge_tied_rows(items, length, positive, negatives, n_negatives, grad_x, grad_v, x_target):
    """Move the X gradient of each window item that is also scored into its V gradient row.

    With tied embeddings X and V are one array, so a row that is both a window
    item and the positive or a negative gets one update with the sum of both
    gradients. ``x_target[k]`` is set to the ``grad_v`` row that took window
    position k's gradient, or -1 when the position keeps its own X row.
    """
    for k in range(length):
        x_target[k] = -1
        row = items[k]
        if row == positive:
            x_target[k] = 0
        elif count_equal(negatives, n_negatives, row) > 0:
            for n in range(n_negatives):
                if negatives[n] == row:
                    x_target[k] = n + 1
                    break
        if x_target[k] >= 0:
            grad_v[x_target[k], :] += grad_x[k, :]
            grad_x[k, :] = 0.0


@njit(types.boolean(types.float32), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def _bounded(value):
    """Return whether a new parameter value is finite and within MAX_ABS_PARAMETER."""
    return math.isfinite(value) and abs(value) <= MAX_ABS_PARAMETER


@njit(types.boolean(_I32_1D_ANY, types.int64, types.int64), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def is_repeat(items, length, position):
    """Return whether ``items[position]`` also occurs at an earlier position."""
    for first in range(min(position, length)):
        if items[first] == items[position]:
            return True
    return False


@njit(types.boolean(_I64_1D, types.int64), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def is_repeat_negative(negatives, position):
    """Return whether ``merge_duplicate_negatives`` marked ``negatives[position]`` as a repeated draw."""
    return negatives[position] == REPEATED_NEGATIVE


@njit(types.float64(types.float64, types.float64, types.int64, types.float64), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def _step_factor(learning_rate, accumulator, optimizer, scale):
    """Return the learning rate of a parameter: plain, or divided by the root of its Adagrad sum."""
    if optimizer == OPTIMIZER_ADAGRAD:
        return learning_rate / (math.sqrt(accumulator) + ADAGRAD_EPSILON) * scale
    return learning_rate * scale


@njit(types.float32(_F32_1D, _F32_1D, types.float32), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def regularised_square_sum(grad, param, reg):
    """Return the sum over m of ``(grad[m] + reg * param[m]) ** 2``.

    Parameters
    ----------
    grad, param : ndarray, shape (m,), float32
    reg : float32
    """
    total = np.float32(0.0)
    for m in range(grad.shape[0]):
        g = grad[m] + reg * param[m]
        total += g * g
    return total


@njit(types.int64(_F32_1D, _F32_1D, _F32_1D, _F32_1D, _F32_1D, types.float32, types.float32, types.float32),
      nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def adagrad_elementwise(param, grad, acc, new_param, new_acc, rate, reg, clip_sq):
    """Write one Adagrad step with one accumulator per element, without changing ``param`` or ``acc``.

    With ``g = grad + reg * param``, ``new_acc = acc + clip_sq * g**2`` and
    ``new_param = param - rate * g / sqrt(max(new_acc, ADAGRAD_EPSILON**2))``.
    ``rate`` already includes the clip factor. The floor replaces the usual
    ``sqrt(new_acc) + ADAGRAD_EPSILON``: both give ``1 / ADAGRAD_EPSILON`` for an
    empty accumulator, and they differ by a relative ``ADAGRAD_EPSILON /
    sqrt(new_acc)``, below 1e-7 once ``new_acc`` exceeds 0.01 (the default
    initial accumulator is 0.1). This form lets LLVM use the SIMD reciprocal
    square root with one Newton step (about 2e-7 relative error), which
    measured about twice as fast as a square root and a division.

    Parameters
    ----------
    param, grad, acc : ndarray, shape (m,), float32
    new_param, new_acc : ndarray, shape (m,), float32
        Outputs; must not alias the inputs.
    rate, reg, clip_sq : float32

    Returns
    -------
    int
        How many new values are NaN, infinite or above MAX_ABS_PARAMETER in magnitude.
    """
    floor = np.float32(ADAGRAD_EPSILON * ADAGRAD_EPSILON)
    limit = np.float32(MAX_ABS_PARAMETER)
    bad = 0
    for m in range(param.shape[0]):
        g = grad[m] + reg * param[m]
        total = acc[m] + clip_sq * g * g
        new_acc[m] = total
        value = param[m] - rate * g / np.sqrt(max(total, floor))
        new_param[m] = value
        if not abs(value) <= limit:
            bad += 1
    return bad


@njit(types.int64(_F32_1D, _F32_1D, _F32_1D, types.float32, types.float32), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def sgd_elementwise(param, grad, new_param, rate, reg):
    """Write ``new_param = param - rate * (grad + reg * param)``, where ``new_param`` must not alias the inputs.

    Parameters
    ----------
    param, grad, new_param : ndarray, shape (m,), float32
    rate, reg : float32

    Returns
    -------
    int
        How many new values are NaN, infinite or above MAX_ABS_PARAMETER in magnitude.
    """
    limit = np.float32(MAX_ABS_PARAMETER)
    bad = 0
    for m in range(param.shape[0]):
        value = param[m] - rate * (grad[m] + reg * param[m])
        new_param[m] = value
        if not abs(value) <= limit:
            bad += 1
    return bad


@njit(
    types.int64(_F32_1D, _F32_1D, types.float32, types.float32, types.float32, types.float32, types.int64, _F32_1D),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def row_step(param, grad, new_acc, rate, reg, clip, optimizer, new_param):
    """Write one SGD or row-wise Adagrad step of an embedding row.

    ``new_param = param - factor * (grad + reg * param)``, where ``factor`` is
    ``_step_factor`` of the row's new accumulator.

    Parameters
    ----------
    param, grad : ndarray, shape (h,), float32
    new_acc : float32
        The row's Adagrad sum after this step (unused by SGD).
    rate, reg, clip : float32
        Learning rate, ``2 * l2`` and the clip factor.
    optimizer : int
        OPTIMIZER_SGD or OPTIMIZER_ADAGRAD.
    new_param : ndarray, shape (h,), float32
        Output; must not alias ``param`` or ``grad``.

    Returns
    -------
    int
        How many new values are NaN, infinite or above MAX_ABS_PARAMETER in magnitude.
    """
    factor = np.float32(_step_factor(rate, new_acc, optimizer, clip))
    return sgd_elementwise(param, grad, new_param, factor, reg)


@njit(types.float32(_F32_2D, _F32_2D, _F32_2D, types.float32), nogil=True, cache=True, fastmath=FAST,
      error_model="numpy")
def recurrent_square_sum(grad_u_w, U, W, reg):
    """Return the summed squares of the regularised U and W gradients.

    Parameters
    ----------
    grad_u_w : ndarray, shape (2 h, h), float32
        dL/dU in rows [0, h), dL/dW in rows [h, 2 h).
    U, W : ndarray, shape (h, h), float32
    reg : float32
        ``2 * l2``.
    """
    size = U.shape[0]
    return (regularised_square_sum(grad_u_w[:size].reshape(-1), U.reshape(-1), reg)
            + regularised_square_sum(grad_u_w[size:].reshape(-1), W.reshape(-1), reg))


@njit(
    types.int64(_F32_2D, _F32_2D, _F32_2D, _F32_2D, _F32_2D, _F32_2D, _F32_2D, types.float32, types.float32,
                types.float32, types.int64),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def recurrent_candidates(U, W, acc_u, acc_w, grad_u_w, new_u_w, new_acc_u_w, rate, reg, clip_sq, optimizer):
    """Write the SGD or element-wise Adagrad step of U and W into ``new_u_w`` and ``new_acc_u_w``.

    U and W have one accumulator per element, so the step is split by
    optimizer to keep the SGD step free of the h * h square roots. Nothing in
    U, W or their accumulators changes; ``commit_recurrent`` copies the
    candidates in.

    Parameters
    ----------
    U, W, acc_u, acc_w : ndarray, shape (h, h), float32
    grad_u_w, new_u_w, new_acc_u_w : ndarray, shape (2 h, h), float32
        Rows [0, h) belong to U and rows [h, 2 h) to W.
    rate : float32
        Learning rate of U and W, clip factor included.
    reg, clip_sq : float32
        ``2 * l2`` and the square of the clip factor.
    optimizer : int
        OPTIMIZER_SGD or OPTIMIZER_ADAGRAD.

    Returns
    -------
    int
        How many new values are NaN, infinite or above MAX_ABS_PARAMETER in magnitude.
    """
    entries = U.shape[0] * U.shape[0]
    flat_grad = grad_u_w.reshape(-1)
    flat_new = new_u_w.reshape(-1)
    flat_acc = new_acc_u_w.reshape(-1)
    if optimizer == OPTIMIZER_ADAGRAD:
        return (
            adagrad_elementwise(U.reshape(-1), flat_grad[:entries], acc_u.reshape(-1), flat_new[:entries],
                                flat_acc[:entries], rate, reg, clip_sq)
            + adagrad_elementwise(W.reshape(-1), flat_grad[entries:], acc_w.reshape(-1), flat_new[entries:],
                                  flat_acc[entries:], rate, reg, clip_sq)
        )
    return (sgd_elementwise(U.reshape(-1), flat_grad[:entries], flat_new[:entries], rate, reg)
            + sgd_elementwise(W.reshape(-1), flat_grad[entries:], flat_new[entries:], rate, reg))


@njit(types.void(_F32_2D, _F32_2D, _F32_2D, _F32_2D, _F32_2D, _F32_2D, types.boolean), nogil=True, cache=True)
def commit_recurrent(U, W, acc_u, acc_w, new_u_w, new_acc_u_w, adagrad):
    """Copy the candidates of ``recurrent_candidates`` into U and W, and their accumulators with Adagrad."""
    size = U.shape[0]
    U[:, :] = new_u_w[:size, :]
    W[:, :] = new_u_w[size:, :]
    if adagrad:
        acc_u[:, :] = new_acc_u_w[:size, :]
        acc_w[:, :] = new_acc_u_w[size:, :]


@njit(
    types.int64(_F32_1D, _F32_1D, _F32_1D, _F32_1D, _F32_1D, types.int64, types.int64, types.float64,
                types.float32, types.float64, types.int64),
    nogil=True, cache=True, fastmath=FAST, error_model="numpy",
)
def bias_candidate(bias, acc_bias, grad_bias, new_bias, new_acc_bias, row, slot, learning_rate, reg, clip, optimizer):
    """Write the SGD or Adagrad step of ``bias[row]`` into slot ``slot`` of ``new_bias`` and ``new_acc_bias``.

    Parameters
    ----------
    bias, acc_bias : ndarray, shape (n,), float32
        The item biases and their Adagrad sums, left unchanged.
    grad_bias, new_bias, new_acc_bias : ndarray, shape (>= slot + 1,), float32
        The gradient in, and the candidate value and sum out, at ``slot``.
    row, slot : int
    learning_rate : float
    reg : float32
        ``2 * l2``.
    clip : float
        The clip factor.
    optimizer : int

    Returns
    -------
    int
        1 if the new value is NaN, infinite or above MAX_ABS_PARAMETER in magnitude, else 0.
    """
    clip32 = np.float32(clip)
    g = grad_bias[slot] + reg * bias[row]
    new_acc_bias[slot] = acc_bias[row] + clip32 * clip32 * g * g
    factor = np.float32(_step_factor(learning_rate, new_acc_bias[slot], optimizer, clip))
    new_bias[slot] = bias[row] - factor * g
    return 0 if _bounded(new_bias[slot]) else 1


@njit(
    types.boolean(
        PARAMS_TYPE, ACCUMULATORS_TYPE, _I32_1D_ANY, types.int64, types.int64, _I64_1D, types.int64,
        GRADIENTS_TYPE, STEP_HYPER_TYPE, UPDATE_SCRATCH_TYPE,
    ),
    nogil=True,
    cache=True,
    fastmath=FAST,
    error_model="numpy",
)
def sgd_update(params, accumulators, items, length, positive, negatives, n_negatives, grads, step_hyper, scratch):
    """Apply one clipped SGD or Adagrad step with L2, unless it would diverge.

    The full gradient g is the BPR gradient plus ``2 * l2 * theta`` for every
    touched parameter (the biases only when the model has them). It is scaled by
    ``min(1, max_grad_norm / ||g||)`` with ||g|| the global L2 norm over all of
    them, each distinct row once. SGD then takes ``theta -= learning_rate * g``.
    Adagrad keeps one accumulator per X or V row (row-wise) and one per element
    of U and W and per bias. A row's accumulator grows by the mean of g**2 over
    the row, an element's by its g**2. Each entry's step is then divided by the
    square root of its accumulator.

    Parameters
    ----------
    params : tuple
        (X, U, W, V, bias), updated in place.
    accumulators : tuple
        Adagrad sums (X rows (n,), U (h, h), W (h, h), V rows (n,), bias (n,)),
        float32, updated in place by Adagrad steps.
    items, length, positive, negatives, n_negatives : see bptt_gradients.
        Repeated draws in ``negatives`` are overwritten with REPEATED_NEGATIVE.
    grads : tuple
        The BPR gradients from bptt_gradients; grad_x and grad_v are changed in
        place (repeated rows merged).
    step_hyper : tuple
        (learning_rate, l2, max_grad_norm, optimizer, item_bias 0/1,
        recurrent learning rate scale).
    scratch : tuple
        (new_x (>= length, h), new_u_w (2 h, h), new_v (>= n_negatives + 1, h),
        new_bias (>= n_negatives + 1,), new_acc_x (>= length,), new_acc_u_w
        (2 h, h), new_acc_v (>= n_negatives + 1,), new_acc_bias (>= n_negatives + 1,)),
        float32, and x_target (>= length,), int64: the candidate values, and
        where ``merge_tied_rows`` put each window position's gradient.

    Returns
    -------
    bool
        True if the step was applied, False if the gradient norm was non-finite
        or any new value, rounded to float32, was non-finite or above
        MAX_ABS_PARAMETER in magnitude (then nothing is changed).
    """
    X, U, W, V, bias = params
    acc_x, acc_u, acc_w, acc_v, acc_bias = accumulators
    grad_x, grad_u_w, grad_v, grad_bias = grads
    learning_rate, l2, max_grad_norm, optimizer, item_bias, recurrent_scale, tied = step_hyper
    new_x, new_u_w, new_v, new_bias, new_acc_x, new_acc_u_w, new_acc_v, new_acc_bias, x_target = scratch
    size = U.shape[0]
    reg = 2.0 * l2
    merge_duplicate_rows(items, length, grad_x)
    merge_duplicate_negatives(negatives, n_negatives, grad_v, grad_bias)
    for k in range(length):
        x_target[k] = -1
    if tied != 0:
        merge_tied_rows(items, length, positive, negatives, n_negatives, grad_x, grad_v, x_target)

    # The norm pass keeps each embedding row's square sum in its accumulator
    # slot, so that the row's Adagrad step does not sum it again.
    reg32 = np.float32(reg)
    sq = np.float32(0.0)
    for k in range(length):
        if not is_repeat(items, length, k) and x_target[k] < 0:
            new_acc_x[k] = regularised_square_sum(grad_x[k], X[items[k]], reg32)
            sq += new_acc_x[k]
    sq += recurrent_square_sum(grad_u_w, U, W, reg32)
    for n in range(n_negatives + 1):
        if n > 0 and is_repeat_negative(negatives, n - 1):
            continue
        row = positive if n == 0 else negatives[n - 1]
        new_acc_v[n] = regularised_square_sum(grad_v[n], V[row], reg32)
        sq += new_acc_v[n]
        if item_bias != 0:
            g = grad_bias[n] + reg32 * bias[row]
            sq += g * g
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
    for k in range(length):
        if is_repeat(items, length, k) or x_target[k] >= 0:
            continue
        row = items[k]
        new_acc_x[k] = acc_x[row] + new_acc_x[k] * row_scale
        bad += row_step(X[row], grad_x[k], new_acc_x[k], rate, reg32, clip32, optimizer, new_x[k])

    recurrent_rate = np.float32(learning_rate * recurrent_scale * clip)
    bad += recurrent_candidates(U, W, acc_u, acc_w, grad_u_w, new_u_w, new_acc_u_w, recurrent_rate, reg32,
                                clip32 * clip32, optimizer)

    for n in range(n_negatives + 1):
        if n > 0 and is_repeat_negative(negatives, n - 1):
            continue
        row = positive if n == 0 else negatives[n - 1]
        new_acc_v[n] = acc_v[row] + new_acc_v[n] * row_scale
        bad += row_step(V[row], grad_v[n], new_acc_v[n], rate, reg32, clip32, optimizer, new_v[n])
        if item_bias != 0:
            bad += bias_candidate(bias, acc_bias, grad_bias, new_bias, new_acc_bias, row, n, learning_rate, reg32,
                                  clip, optimizer)
    if bad > 0:
        return False

    adagrad = optimizer == OPTIMIZER_ADAGRAD

    for k in range(length):
        if not is_repeat(items, length, k) and x_target[k] < 0:
            X[items[k], :] = new_x[k, :]
            if adagrad:
                acc_x[items[k]] = new_acc_x[k]
    commit_recurrent(U, W, acc_u, acc_w, new_u_w, new_acc_u_w, adagrad)
    for n in range(n_negatives + 1):
        if n > 0 and is_repeat_negative(negatives, n - 1):
            continue
        row = positive if n == 0 else negatives[n - 1]
        V[row, :] = new_v[n, :]
        if adagrad:
            acc_v[row] = new_acc_v[n]
        if item_bias != 0:
            bias[row] = new_bias[n]
            if adagrad:
                acc_bias[row] = new_acc_bias[n]
    return True


@njit(
    types.int64(
        SAMPLER_TYPE, types.int64, types.int64, _U64_1D, types.int64, types.int64,
        _F32_1D, _F32_2D, _F32_1D, _I64_1D,
    ),
    nogil=True,
    cache=True,
    fastmath=FAST,
    error_model="numpy",
)
def draw_negatives(sampler, positive, kind, rng_state, count, mode, hidden, V, bias, out):
    """Draw ``count`` negatives and keep all of them (NEGATIVES_SUM) or the best-scored one (NEGATIVES_HARDEST).

    Parameters
    ----------
    sampler, positive, kind, rng_state : see ``sampling.sample_negative``.
    count : int
        Number of draws, >= 1.
    mode : int
        NEGATIVES_SUM or NEGATIVES_HARDEST.
    hidden : ndarray, shape (h,), float32
        The state that scores the draws in NEGATIVES_HARDEST mode.
    V : ndarray, shape (n, h), float32
    bias : ndarray, shape (n,), float32
    out : ndarray, shape (>= count,), int64
        Output: the kept negatives.

    Returns
    -------
    int
        The number of negatives kept in ``out``: 0 when no draw found another
        known item, else ``count`` minus failed draws (NEGATIVES_SUM) or 1.
    """
    kept = 0
    best_score = np.float32(-np.inf)
    for _ in range(count):
        candidate = sample_negative(sampler, positive, kind, rng_state)
        if candidate < 0:
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


@njit(types.int64(_F32_1D, _F32_2D, _F32_1D, _I64_1D, types.int64, types.int64), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def rank_item(hidden, V, bias, item_count, n_rows, target):
    """Return the full-ranking rank of ``target`` among the known items.

    The rank is the number of other known items whose score ``hidden . V[j] +
    bias[j]`` is greater than or equal to the target's, so ties count against
    the model and a constant scorer ranks every item last. An unknown target
    returns RANK_UNKNOWN_ITEM.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float32
    V : ndarray, shape (n, h), float32
    bias : ndarray, shape (n,), float32
    item_count : ndarray, shape (n,), int64
        An item is known when its count is positive.
    n_rows : int
        Items at or above this index are not known.
    target : int
    """
    if target >= n_rows or item_count[target] <= 0:
        return RANK_UNKNOWN_ITEM
    target_score = item_score(hidden, V, bias, target)
    rank = 0
    for j in range(n_rows):
        if j != target and item_count[j] > 0 and item_score(hidden, V, bias, j) >= target_score:
            rank += 1
    return rank


@njit(types.void(_F32_1D, _F32_2D, _F32_1D, _I64_1D, types.int64, _F32_1D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def score_items(hidden, V, bias, item_count, n_rows, scores):
    """Write ``hidden . V[j] + bias[j]`` for every known item j < n_rows and -inf for the others.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float32
    V : ndarray, shape (n, h), float32
    bias : ndarray, shape (n,), float32
    item_count : ndarray, shape (n,), int64
    n_rows : int
    scores : ndarray, shape (n,), float32
        Output.
    """
    for j in range(scores.shape[0]):
        if j < n_rows and item_count[j] > 0:
            scores[j] = item_score(hidden, V, bias, j)
        else:
            scores[j] = -np.inf


@njit(types.void(PARAMS_TYPE, STATES_TYPE, types.int64, types.int64, _I32_1D, _F32_2D, _F32_1D), nogil=True, cache=True, fastmath=FAST, error_model="numpy")
def advance_state(params, states, slot, item, items_buf, hs, scratch):
    """Append ``item`` to a user's window and recompute its states with the current parameters.

    When the window is full, its oldest item moves into ``start_hidden``.
    """
    X, U, W, V, bias = params
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


@njit(types.boolean(types.int64, types.int64, types.int64), nogil=True, cache=True)
def in_evaluation_sample(partition, offset, sample_every):
    """Return whether the event at ``partition`` and ``offset`` is ranked.

    ``sample_every`` 0 ranks nothing and 1 every event. A larger M ranks the
    events whose hashed position is a multiple of M: about one in M, spread
    over users and over each user's history, and the same events on every
    replay of the stream, whatever the micro-batches.
    """
    if sample_every <= 1:
        return sample_every == 1
    return mix64(partition, offset) % np.uint64(sample_every) == 0


@njit(
    types.void(PARAMS_TYPE, ACCUMULATORS_TYPE, STATES_TYPE, EVENTS_TYPE, SAMPLER_TYPE, HYPER_TYPE, _U64_1D,
               OUTPUTS_TYPE),
    nogil=True,
    cache=True,
    fastmath=FAST,
    error_model="numpy",
)
def train_batch(params, accumulators, states, events, sampler, hyper, rng_state, outputs):
    """Apply a micro-batch of events in order: rank, train, then advance each user's state.

    For each event e (user row ``slot``, item i, Kafka partition and offset):

    1. Skip it as STATUS_DUPLICATE if its offset is not newer than the last one
       applied to the user on the same partition.
    2. Rank i from the user's current state before learning from it, if the
       event is in the evaluation sample (see ``in_evaluation_sample``).
    3. If the user has history, draw the negatives and take one SGD or Adagrad
       step on the BPR loss, with truncated BPTT through the user's window.
    4. Append i to the user's window, recompute the states, and count the event
       (user count, last partition and offset, item statistics).

    Parameters
    ----------
    params : tuple
        (X (n, h), U (h, h), W (h, h), V (n, h), bias (n,)), float32, updated in place.
    accumulators : tuple
        The Adagrad sums, see ``sgd_update``; updated in place.
    states : tuple
        UserStateBatch.as_tuple(), updated in place.
    events : tuple
        (slot int32 (B,), item int32 (B,), partition int32 (B,), offset int64 (B,)).
    sampler : tuple
        ItemStats.as_tuple(), updated in place.
    hyper : tuple
        (learning_rate, l2, max_grad_norm, popularity_alpha, sampler kind,
        evaluation sample interval M (0: rank nothing, 1: rank every event),
        negatives per event, NEGATIVES_SUM or NEGATIVES_HARDEST,
        OPTIMIZER_SGD or OPTIMIZER_ADAGRAD, item_bias 0/1, recurrent learning
        rate scale).
    rng_state : ndarray, shape (1,), uint64
    outputs : tuple
        (status int8 (B,), loss float32 (B,), rank int64 (B,)), written per event.
        The loss is NaN for events without an SGD step; the rank is
        RANK_NOT_EVALUATED when not evaluated and RANK_UNKNOWN_ITEM for an item
        never seen before.
    """
    X, U, W, V, bias = params
    hidden, start_hidden, window, window_len, count, last_partition, last_offset = states
    event_slot, event_item, event_partition, event_offset = events
    (learning_rate, l2, max_grad_norm, alpha, sampler_kind, sample_every,
     n_draws, negative_mode, optimizer, item_bias, recurrent_scale, tied) = hyper
    status, losses, ranks = outputs
    item_count, known_items, meta, fenwick = sampler
    step_hyper = (learning_rate, l2, max_grad_norm, optimizer, item_bias, recurrent_scale, tied)

    size = U.shape[0]
    capacity = window.shape[1]
    terms = n_draws + 1
    hs = np.zeros((capacity + 2, size), dtype=np.float32)
    grads = (
        np.zeros((capacity, size), dtype=np.float32),
        np.zeros((2 * size, size), dtype=np.float32),
        np.zeros((terms, size), dtype=np.float32),
        np.zeros(terms, dtype=np.float32),
    )
    scratch = (
        np.zeros((capacity, size), dtype=np.float32),
        np.zeros((2 * size, size), dtype=np.float32),
        np.zeros((terms, size), dtype=np.float32),
        np.zeros(terms, dtype=np.float32),
        np.zeros(capacity, dtype=np.float32),
        np.zeros((2 * size, size), dtype=np.float32),
        np.zeros(terms, dtype=np.float32),
        np.zeros(terms, dtype=np.float32),
        np.zeros(capacity, dtype=np.int64),
    )
    negatives = np.zeros(n_draws, dtype=np.int64)
    dh = np.zeros(size, dtype=np.float32)
    delta = np.zeros((capacity, size), dtype=np.float32)
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
        if in_evaluation_sample(partition, offset, sample_every):
            ranks[e] = rank_item(hs[length], V, bias, item_count, meta[1], item)

        outcome = STATUS_NO_HISTORY
        if length > 0:
            kept = draw_negatives(sampler, item, sampler_kind, rng_state, n_draws, negative_mode,
                                  hs[length], V, bias, negatives)
            if kept == 0:
                outcome = STATUS_NO_NEGATIVE
            else:
                losses[e] = bptt_gradients(params, window[slot], length, item, negatives, kept, hs, grads, dh, delta)
                applied = sgd_update(params, accumulators, window[slot], length, item, negatives, kept,
                                     grads, step_hyper, scratch)
                outcome = STATUS_TRAINED if applied else STATUS_NON_FINITE

        advance_state(params, states, slot, item, items_buf, hs, dh)
        count[slot] += 1
        last_partition[slot] = partition
        last_offset[slot] = offset
        record_item(sampler, item, alpha)
        status[e] = outcome
