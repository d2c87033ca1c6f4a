"""NumPy float64 reference of the basket-mode model math, for testing ``drnn_core.basket``.

The functions follow the equations of ``drnn_core.basket`` directly and share no
code with its kernels. Parameters are the tuple ``(X, U, W, V, bias)`` of
float64 arrays as in ``drnn_core.reference``; tied embeddings are one array
passed as X and V. A basket is a sequence of item indexes, a window a sequence
of baskets, oldest first. Gradients are dense arrays of the parameters' shapes.
"""

from __future__ import annotations

import numpy as np

from drnn_core.reference import bpr_loss, distinct_items, sigmoid

POOLINGS = ("mean", "max")


def pool(X, basket, pooling):
    """Return the mean or per-dimension maximum of the X rows of ``basket``.

    Parameters
    ----------
    X : ndarray, shape (n, h), float64
    basket : sequence of int, length >= 1
    pooling : str
        "mean" or "max".

    Returns
    -------
    ndarray, shape (h,), float64
    """
    rows = X[np.asarray(basket, dtype=np.int64)]
    return rows.mean(axis=0) if pooling == "mean" else rows.max(axis=0)


def pool_backward(X, basket, pooling, pooled_grad):
    """Return dL/dX from dL/d(pooled input) for one basket, as a dense (n, h) array.

    Mean pooling gives each basket entry ``pooled_grad / len(basket)``. Max
    pooling gives each dimension's gradient to the first entry with the
    maximum.
    """
    basket = np.asarray(basket, dtype=np.int64)
    grad = np.zeros_like(X, dtype=np.float64)
    if pooling == "mean":
        for item in basket:
            grad[item] += pooled_grad / basket.shape[0]
        return grad
    winners = basket[np.argmax(X[basket], axis=0)]
    for k, item in enumerate(winners):
        grad[item, k] += pooled_grad[k]
    return grad


def forward_baskets(X, U, W, start_hidden, window, pooling):
    """Run ``h = sigmoid(pool(X[basket]) U + h W)`` over the window.

    Returns
    -------
    list of ndarray, shape (h,), float64
        ``len(window) + 1`` states: ``start_hidden``, then the state after each basket.
    """
    states = [np.asarray(start_hidden, dtype=np.float64)]
    for basket in window:
        states.append(sigmoid(pool(X, basket, pooling) @ U + states[-1] @ W))
    return states


def basket_bpr_loss(params, start_hidden, window, target, negatives, pooling):
    """Return the summed BPR loss of one basket event, one term per target item and negative."""
    X, U, W, V, bias = params
    last = forward_baskets(X, U, W, start_hidden, window, pooling)[-1]
    total = 0.0
    for positive in target:
        for negative in negatives:
            total += bpr_loss(last, V[positive], V[negative], bias[positive], bias[negative])[0]
    return total


def basket_gradients(params, start_hidden, window, target, negatives, pooling):
    """Compute the gradient of ``basket_bpr_loss`` (without L2) by truncated BPTT.

    Returns
    -------
    dict of str to ndarray, float64
        ``"X"`` and ``"V"`` of shape (n, h), kept apart also with tied
        embeddings; ``"U"``, ``"W"`` of shape (h, h); ``"bias"`` of shape (n,).
    """
    X, U, W, V, bias = params
    states = forward_baskets(X, U, W, start_hidden, window, pooling)
    last = states[-1]
    grads = {
        "X": np.zeros(X.shape), "U": np.zeros(U.shape), "W": np.zeros(W.shape),
        "V": np.zeros(V.shape), "bias": np.zeros(bias.shape),
    }

    grad_hidden = np.zeros(U.shape[0])
    for positive in target:
        for negative in negatives:
            _, dloss_dx = bpr_loss(last, V[positive], V[negative], bias[positive], bias[negative])
            grads["V"][positive] += dloss_dx * last
            grads["V"][negative] -= dloss_dx * last
            grads["bias"][positive] += dloss_dx
            grads["bias"][negative] -= dloss_dx
            grad_hidden += dloss_dx * (V[positive] - V[negative])

    for k in range(len(window) - 1, -1, -1):
        grad_pre = grad_hidden * states[k + 1] * (1.0 - states[k + 1])
        grads["U"] += np.outer(pool(X, window[k], pooling), grad_pre)
        grads["W"] += np.outer(states[k], grad_pre)
        grads["X"] += pool_backward(X, window[k], pooling, U @ grad_pre)
        grad_hidden = W @ grad_pre
    return grads


def touched_rows(params, window, target, negatives):
    """Return the rows one basket event touches: (input X rows, scored V rows), each distinct.

    The input rows are the items of the window's baskets, the scored rows the
    target's items and the negatives. With tied embeddings (``X is V``) every
    touched row is a V row, so the input rows leave out those already scored.
    """
    inputs = distinct_items([int(item) for basket in window for item in basket])
    scored = distinct_items([int(item) for item in target] + [int(item) for item in negatives])
    if params[0] is params[3]:
        inputs = inputs[~np.isin(inputs, scored)]
    return inputs, scored


def basket_loss(params, start_hidden, window, target, negatives, pooling, l2, *, item_bias=True):
    """Return the full loss of one basket event: the BPR terms plus ``l2 * ||theta||^2``.

    theta is the input rows, U, W, the scored rows and, with ``item_bias``,
    the scored rows' biases (see ``touched_rows``). This is the function that
    finite differences differentiate.
    """
    X, U, W, V, bias = params
    inputs, scored = touched_rows(params, window, target, negatives)
    penalty = np.sum(X[inputs] ** 2) + np.sum(U**2) + np.sum(W**2) + np.sum(V[scored] ** 2)
    if item_bias:
        penalty += np.sum(bias[scored] ** 2)
    return basket_bpr_loss(params, start_hidden, window, target, negatives, pooling) + l2 * float(penalty)


def full_basket_gradient(params, start_hidden, window, target, negatives, pooling, l2, *, item_bias=True):
    """Return the gradient of ``basket_loss``: the BPR gradient, the L2 term, and tied rows merged.

    Returns
    -------
    dict of str to ndarray, float64
        As ``basket_gradients``. With tied embeddings ``"V"`` contains the whole
        gradient of the shared array and ``"X"`` is zero.
    """
    X, U, W, V, bias = params
    grads = basket_gradients(params, start_hidden, window, target, negatives, pooling)
    inputs, scored = touched_rows(params, window, target, negatives)
    if X is V:
        grads["V"] += grads["X"]
        grads["X"] = np.zeros(X.shape)
        grads["V"][inputs] += 2.0 * l2 * V[inputs]
    else:
        grads["X"][inputs] += 2.0 * l2 * X[inputs]
    grads["V"][scored] += 2.0 * l2 * V[scored]
    grads["U"] += 2.0 * l2 * U
    grads["W"] += 2.0 * l2 * W
    if item_bias:
        grads["bias"][scored] += 2.0 * l2 * bias[scored]
    else:
        grads["bias"][:] = 0.0
    return grads


def best_rank(scores, item_count, basket):
    """Return the smallest rank of a basket's known items, or -1 when none is known.

    An item's rank is the number of other known items (``item_count > 0``)
    whose score is greater than or equal to its own.
    """
    known = item_count > 0
    ranks = [
        int(np.count_nonzero(known & (scores >= scores[item]))) - 1
        for item in basket
        if item < item_count.shape[0] and known[item]
    ]
    return min(ranks) if ranks else -1
