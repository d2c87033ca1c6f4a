"""NumPy reference of the recurrent BPR model math in float64, for testing the Numba kernels.

The functions follow the model equations directly and share no code with
``drnn_core.kernels``: row vectors, ``b(t) = X[i(t)] U + h(t-1) W``,
``h(t) = sigmoid(b(t))``, ``s(i) = h(t) . V[i] + c[i]``, ``x_uij = s(i) - s(j)``
and ``L = sum over the negatives j of -ln sigmoid(x_uij) + l2 * ||theta||^2``.
Parameters are passed as the tuple ``(X, U, W, V, bias)`` of float64 arrays, X
and V of shape (n, h), U and W of shape (h, h), bias of shape (n,). Tied
embeddings are the same array passed as X and V.
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

# Added to the square root of an Adagrad accumulator before dividing by it.
ADAGRAD_EPSILON = 1e-8


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


def bpr_loss(hidden, v_pos, v_neg, bias_pos=0.0, bias_neg=0.0):
    """Return the BPR loss ``-ln sigmoid(x)`` and its derivative ``dL/dx = -sigmoid(-x)``.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float64
    v_pos, v_neg : ndarray, shape (h,), float64
        The output embeddings V[i] and V[j].
    bias_pos, bias_neg : float
        The item biases c[i] and c[j].

    Returns
    -------
    loss : float
        ``ln(1 + exp(-x))`` with ``x = hidden . v_pos + bias_pos - hidden . v_neg - bias_neg``.
    dloss_dx : float
    """
    x = float(hidden @ v_pos + bias_pos - hidden @ v_neg - bias_neg)
    loss = float(np.logaddexp(0.0, -x))
    dloss_dx = -float(sigmoid(-x))
    return loss, dloss_dx


def bptt_gradients(params, start_hidden, items, positive, negatives):
    """Compute the gradient of the summed BPR terms (without L2) by truncated BPTT.

    Gradients flow back through every window step and stop at ``start_hidden``.
    With tied embeddings (``X is V``) the X and V gradients are still returned
    apart; ``full_gradient_with_l2`` adds them up.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V, bias), float64.
    start_hidden : ndarray, shape (h,), float64
    items : sequence of int, length K >= 1
        Window items, oldest first.
    positive : int
        Item i.
    negatives : sequence of int, length N >= 1
        The negatives j, one BPR term each.

    Returns
    -------
    dict of str to ndarray, float64
        ``"X"``, shape (K, h): row k is the gradient through window position k
        (a repeated item has one row per position). ``"U"`` and ``"W"``,
        shape (h, h). ``"V_pos"``, shape (h,), and ``"bias_pos"``, shape ():
        dL/dV[i] and dL/dc[i]. ``"V_neg"``, shape (N, h), and ``"bias_neg"``,
        shape (N,): the term of each draw (a repeated draw has one row each).
    """
    X, U, W, V, bias = params
    states = forward_window(X, U, W, start_hidden, items)
    last = states[-1]

    grads = {
        "X": np.zeros((len(items), U.shape[0])),
        "U": np.zeros_like(U, dtype=np.float64),
        "W": np.zeros_like(W, dtype=np.float64),
        "V_pos": np.zeros(U.shape[0]),
        "bias_pos": np.zeros(()),
        "V_neg": np.zeros((len(negatives), U.shape[0])),
        "bias_neg": np.zeros(len(negatives)),
    }

    # dL/dh(t) at the last step, summed over the BPR terms, then carried back one step at a time.
    grad_hidden = np.zeros(U.shape[0])
    for n, negative in enumerate(negatives):
        _, dloss_dx = bpr_loss(last, V[positive], V[negative], bias[positive], bias[negative])
        grads["V_pos"] += dloss_dx * last
        grads["bias_pos"] += dloss_dx
        grads["V_neg"][n] = -dloss_dx * last
        grads["bias_neg"][n] = -dloss_dx
        grad_hidden += dloss_dx * (V[positive] - V[negative])

    for k in range(len(items) - 1, -1, -1):
        # Through the sigmoid: db = dh * h * (1 - h), with h = states[k + 1].
        grad_pre = grad_hidden * states[k + 1] * (1.0 - states[k + 1])
        grads["U"] += np.outer(X[items[k]], grad_pre)
        grads["W"] += np.outer(states[k], grad_pre)
        grads["X"][k] = U @ grad_pre
        grad_hidden = W @ grad_pre

    return grads


def distinct_items(items):
    """Return the distinct items in order of first occurrence.

    Parameters
    ----------
    items : sequence of int

    Returns
    -------
    ndarray, shape (m,), int64
    """
    _, first = np.unique(np.asarray(items, dtype=np.int64), return_index=True)
    return np.asarray(items, dtype=np.int64)[np.sort(first)]


def scored_rows(positive, negatives):
    """Return the distinct V rows of one event: the positive, then the negatives in order of first draw."""
    return distinct_items([positive] + [int(negative) for negative in negatives])


def input_rows(params, items, positive, negatives):
    """Return the distinct X rows of one event that are separate parameters from its V rows.

    Every distinct window item, except, with tied embeddings (``X is V``), the
    window items that are also scored, because those rows are V rows too.
    """
    rows = distinct_items(items)
    if params[0] is params[3]:
        rows = rows[~np.isin(rows, scored_rows(positive, negatives))]
    return rows


def window_loss(params, start_hidden, items, positive, negatives, l2, *, item_bias=True):
    """Return the full loss ``sum_j -ln sigmoid(x_uij) + l2 * ||theta||^2`` of one event.

    theta is the X rows of the distinct window items, U, W, the distinct V rows
    of i and the negatives, and their biases when ``item_bias`` is set. Each
    row counts once, also when X and V are one array. This is the function that
    finite differences differentiate.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V, bias), float64; X and V may be one array (tied embeddings).
    start_hidden : ndarray, shape (h,), float64
    items : sequence of int, length K >= 1
    positive : int
    negatives : sequence of int, length N >= 1
    l2 : float
    item_bias : bool

    Returns
    -------
    float
    """
    X, U, W, V, bias = params
    states = forward_window(X, U, W, start_hidden, items)
    loss = 0.0
    for negative in negatives:
        term, _ = bpr_loss(states[-1], V[positive], V[negative], bias[positive], bias[negative])
        loss += term

    v_rows = scored_rows(positive, negatives)
    penalty = np.sum(X[input_rows(params, items, positive, negatives)] ** 2) + np.sum(U**2) + np.sum(W**2)
    penalty += np.sum(V[v_rows] ** 2)
    if item_bias:
        penalty += np.sum(bias[v_rows] ** 2)
    return loss + l2 * float(penalty)


def full_gradient_with_l2(params, items, positive, negatives, bpr_grads, l2, *, item_bias=True):
    """Add the L2 term ``2 * l2 * theta`` to the BPR gradients and merge repeated rows.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V, bias), float64; X and V may be one array (tied embeddings).
    items : sequence of int, length K
    positive : int
    negatives : sequence of int, length N
    bpr_grads : dict of str to ndarray
        The output of ``bptt_gradients``.
    l2 : float
    item_bias : bool
        Without item biases their gradient is zero.

    Returns
    -------
    dict of str to ndarray, float64
        ``"x_rows"``, shape (m,), int64: the rows of ``input_rows``, and ``"X"``,
        shape (m, h): dL/dX[x_rows[r]], summed over the positions of that item.
        ``"v_rows"``, shape (p,), int64: the rows of ``scored_rows``. ``"V"``,
        shape (p, h), and ``"bias"``, shape (p,): their gradients, summed over
        repeated draws, and with tied embeddings also over window positions.
        ``"U"``, ``"W"``, shape (h, h).
    """
    X, U, W, V, bias = params
    items = np.asarray(items, dtype=np.int64)
    negatives = np.asarray(negatives, dtype=np.int64)
    tied = X is V
    x_rows = input_rows(params, items, positive, negatives)
    v_rows = scored_rows(positive, negatives)

    grad_x = np.zeros((x_rows.shape[0], U.shape[0]))
    for r, row in enumerate(x_rows):
        grad_x[r] = bpr_grads["X"][items == row].sum(axis=0) + 2.0 * l2 * X[row]

    grad_v = np.zeros((v_rows.shape[0], U.shape[0]))
    grad_bias = np.zeros(v_rows.shape[0])
    for r, row in enumerate(v_rows):
        if row == positive:
            grad_v[r] += bpr_grads["V_pos"]
            grad_bias[r] += bpr_grads["bias_pos"]
        grad_v[r] += bpr_grads["V_neg"][negatives == row].sum(axis=0)
        grad_bias[r] += bpr_grads["bias_neg"][negatives == row].sum()
        if tied:
            grad_v[r] += bpr_grads["X"][items == row].sum(axis=0)
        grad_v[r] += 2.0 * l2 * V[row]
        grad_bias[r] += 2.0 * l2 * bias[row]
    if not item_bias:
        grad_bias[:] = 0.0

    return {
        "x_rows": x_rows,
        "X": grad_x,
        "U": bpr_grads["U"] + 2.0 * l2 * U,
        "W": bpr_grads["W"] + 2.0 * l2 * W,
        "v_rows": v_rows,
        "V": grad_v,
        "bias": grad_bias,
    }


def gradient_norm(full_grads):
    """Return the global L2 norm of a gradient from ``full_gradient_with_l2``.

    Each distinct row counts once.

    Parameters
    ----------
    full_grads : dict of str to ndarray

    Returns
    -------
    float
    """
    parts = ("X", "U", "W", "V", "bias")
    return float(np.sqrt(sum(np.sum(full_grads[name] ** 2) for name in parts)))


def new_accumulators(accumulators, full_grads, scale):
    """Return the Adagrad sums after a step with the gradient ``scale * g``.

    Parameters
    ----------
    accumulators : tuple of ndarray
        (acc_x (n,), acc_u (h, h), acc_w (h, h), acc_v (n,), acc_bias (n,)),
        float64: one sum per row of X and V, and one per element of U, W and bias.
    full_grads : dict of str to ndarray
        The output of ``full_gradient_with_l2``.
    scale : float
        The clipping factor.

    Returns
    -------
    dict of str to ndarray, float64
        ``"X"`` (m,) and ``"V"`` (p,): the sums of the touched rows, each plus
        the mean of the row's squared gradient. ``"U"``, ``"W"`` (h, h) and
        ``"bias"`` (p,): the sums plus the squared gradient of each entry.
    """
    acc_x, acc_u, acc_w, acc_v, acc_bias = accumulators
    return {
        "X": acc_x[full_grads["x_rows"]] + np.mean((scale * full_grads["X"]) ** 2, axis=1),
        "U": acc_u + (scale * full_grads["U"]) ** 2,
        "W": acc_w + (scale * full_grads["W"]) ** 2,
        "V": acc_v[full_grads["v_rows"]] + np.mean((scale * full_grads["V"]) ** 2, axis=1),
        "bias": acc_bias[full_grads["v_rows"]] + (scale * full_grads["bias"]) ** 2,
    }


def sgd_update(params, accumulators, items, positive, negatives, bpr_grads, learning_rate, l2, max_grad_norm, *,
               optimizer="sgd", item_bias=True, recurrent_learning_rate_scale=1.0, storage_dtype=np.float32):
    """Apply one clipped SGD or Adagrad step in place, unless the step would make a parameter diverge.

    1. g = the BPR gradient plus ``2 * l2 * theta``, one row per distinct parameter row.
    2. g is scaled by ``min(1, max_grad_norm / ||g||)``, with ||g|| the global L2 norm.
    3. SGD: ``theta -= rate * g``. Adagrad: the accumulators of ``new_accumulators``
       are stored, and ``theta -= rate * g / (sqrt(accumulator) + ADAGRAD_EPSILON)``.
       The rate of U and W is ``learning_rate * recurrent_learning_rate_scale``.
    4. Nothing changes if ||g|| is non-finite or a new value, stored in
       ``storage_dtype``, is non-finite or above MAX_ABS_PARAMETER in absolute value.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V, bias), float64, updated in place; X and V may be one array.
    accumulators : tuple of ndarray
        See ``new_accumulators``; updated in place by Adagrad steps.
    items : sequence of int, length K >= 1
    positive : int
    negatives : sequence of int, length N >= 1
    bpr_grads : dict of str to ndarray
        The output of ``bptt_gradients``.
    learning_rate, l2, max_grad_norm : float
    optimizer : str
        "sgd" or "adagrad".
    item_bias : bool
        Whether the biases are parameters; without them they stay unchanged.
    recurrent_learning_rate_scale : float
    storage_dtype : numpy dtype
        The dtype the parameters are stored in by the model. A new value is
        non-finite when it overflows this dtype (float32 for the kernels, where
        a value above about 3.4e38 becomes inf).

    Returns
    -------
    bool
        True if the step was applied, False if nothing changed.
    """
    X, U, W, V, bias = params
    full = full_gradient_with_l2(params, items, positive, negatives, bpr_grads, l2, item_bias=item_bias)
    norm = gradient_norm(full)
    if not np.isfinite(norm):
        return False

    scale = 1.0 if norm <= max_grad_norm else max_grad_norm / norm
    sums = new_accumulators(accumulators, full, scale)
    rates = {name: learning_rate for name in ("X", "V", "bias")}
    rates["U"] = rates["W"] = learning_rate * recurrent_learning_rate_scale
    if optimizer == "adagrad":
        for name in rates:
            divisor = np.sqrt(sums[name]) + ADAGRAD_EPSILON
            rates[name] = rates[name] / (divisor[:, None] if name in ("X", "V") else divisor)

    x_rows, v_rows = full["x_rows"], full["v_rows"]
    new_values = {
        "X": X[x_rows] - rates["X"] * scale * full["X"],
        "U": U - rates["U"] * scale * full["U"],
        "W": W - rates["W"] * scale * full["W"],
        "V": V[v_rows] - rates["V"] * scale * full["V"],
        "bias": bias[v_rows] - rates["bias"] * scale * full["bias"],
    }

    with np.errstate(over="ignore", invalid="ignore"):
        stored = [value.astype(storage_dtype) for value in new_values.values()]
    if not all(np.all(np.isfinite(value)) for value in stored):
        return False
    if any(np.any(np.abs(value) > MAX_ABS_PARAMETER) for value in stored):
        return False

    X[x_rows] = new_values["X"]
    U[:, :] = new_values["U"]
    W[:, :] = new_values["W"]
    V[v_rows] = new_values["V"]
    if item_bias:
        bias[v_rows] = new_values["bias"]
    if optimizer == "adagrad":
        _store_accumulators(accumulators, full, sums, item_bias)
    return True


def _store_accumulators(accumulators, full_grads, sums, item_bias):
    acc_x, acc_u, acc_w, acc_v, acc_bias = accumulators
    acc_x[full_grads["x_rows"]] = sums["X"]
    acc_u[:, :] = sums["U"]
    acc_w[:, :] = sums["W"]
    acc_v[full_grads["v_rows"]] = sums["V"]
    if item_bias:
        acc_bias[full_grads["v_rows"]] = sums["bias"]


def score_items(hidden, V, bias, item_count, n_rows):
    """Return ``hidden . V[j] + bias[j]`` for every known item j < n_rows and -inf for the others.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float64
    V : ndarray, shape (n, h), float64
    bias : ndarray, shape (n,), float64
    item_count : ndarray, shape (n,), int64
        An item is known when its count is positive.
    n_rows : int
        Items at or above this index are not known.

    Returns
    -------
    ndarray, shape (n,), float64
    """
    known = (item_count > 0) & (np.arange(V.shape[0]) < n_rows)
    return np.where(known, V @ hidden + bias, -np.inf)


def rank_item_bounds(hidden, V, bias, item_count, n_rows, target, tolerance):
    """Return the range of ranks of ``target`` when scores may be off by ``tolerance``.

    A kernel that computes the scores in float32 can order two items either way
    when their scores differ by less than its rounding error. Its rank is then
    within these bounds.

    Parameters
    ----------
    hidden, V, bias, item_count, n_rows, target : see ``rank_item``.
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

    scores = score_items(hidden, V, bias, item_count, n_rows)
    target_score = scores[target]
    others = np.delete(scores, target)
    low = int(np.count_nonzero(others > target_score + tolerance))
    high = int(np.count_nonzero(others >= target_score - tolerance))
    return low, high


def rank_item(hidden, V, bias, item_count, n_rows, target):
    """Return the number of other known items scoring at least as high as ``target``.

    Ties count against the model. An unknown target returns RANK_UNKNOWN_ITEM.

    Parameters
    ----------
    hidden : ndarray, shape (h,), float64
    V : ndarray, shape (n, h), float64
    bias : ndarray, shape (n,), float64
    item_count : ndarray, shape (n,), int64
    n_rows : int
    target : int

    Returns
    -------
    int
        In [0, n_known - 1], or RANK_UNKNOWN_ITEM.
    """
    _, high = rank_item_bounds(hidden, V, bias, item_count, n_rows, target, 0.0)
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
        (X, U, W, V, bias), float64.
    states : UserStateBatch-like
        Any object with the attributes of ``drnn_core.state.UserStateBatch``
        (hidden and start_hidden may be float64), updated in place.
    slot : int
        The user's row.
    item : int
    """
    X, U, W = params[:3]
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


def train_batch_reference(params, accumulators, states, item_stats, events, negatives, learning_rate, l2,
                          max_grad_norm, *, optimizer="sgd", item_bias=True, recurrent_learning_rate_scale=1.0,
                          evaluate=True, rank_tolerance=0.0):
    """Replay a micro-batch of events like ``kernels.train_batch``, with the negatives given.

    For each event (user row, item i, partition, offset):

    1. Skip it as STATUS_DUPLICATE if its partition equals the user's last one and
       its offset is not greater than the last offset.
    2. Run the window forward from ``start_hidden``, and rank i if ``evaluate``.
    3. If the window is not empty, take the SGD or Adagrad step on the BPR loss
       with the given negatives, or report STATUS_NO_NEGATIVE when there are none.
    4. Append i to the window with the updated parameters, count the event and
       record i in the item statistics.

    Parameters
    ----------
    params : tuple of ndarray
        (X, U, W, V, bias), float64, updated in place; X and V may be one array.
    accumulators : tuple of ndarray
        See ``new_accumulators``; updated in place by Adagrad steps.
    states : UserStateBatch-like
        See ``advance_state``; updated in place.
    item_stats : ReferenceItemStats
        Updated in place.
    events : tuple of ndarray
        (slot (B,), item (B,), partition (B,), offset (B,)), integers.
    negatives : sequence of sequences of int, length B
        The negatives of each event's BPR terms, empty where the sampler found
        none. Ignored for duplicates and events of users with an empty window.
    learning_rate, l2, max_grad_norm, optimizer, item_bias, recurrent_learning_rate_scale :
        See ``sgd_update``.
    evaluate : bool
    rank_tolerance : float
        Score tolerance for the ``rank_low`` and ``rank_high`` outputs.

    Returns
    -------
    ReferenceBatchResult
    """
    X, U, W, V, bias = params
    slots, items, partitions, offsets = events
    size = slots.shape[0]
    result = ReferenceBatchResult(
        status=np.zeros(size, dtype=np.int8),
        loss=np.full(size, np.nan),
        rank=np.full(size, RANK_NOT_EVALUATED, dtype=np.int64),
        rank_low=np.full(size, RANK_NOT_EVALUATED, dtype=np.int64),
        rank_high=np.full(size, RANK_NOT_EVALUATED, dtype=np.int64),
    )
    options = {"optimizer": optimizer, "item_bias": item_bias,
               "recurrent_learning_rate_scale": recurrent_learning_rate_scale}

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
            result.rank[e] = rank_item(hidden, V, bias, item_stats.item_count, item_stats.n_rows, item)
            result.rank_low[e], result.rank_high[e] = rank_item_bounds(
                hidden, V, bias, item_stats.item_count, item_stats.n_rows, item, rank_tolerance
            )

        result.status[e] = STATUS_NO_HISTORY
        if length > 0:
            result.status[e], result.loss[e] = _train_step(
                params, accumulators, states.start_hidden[slot], window, item, list(negatives[e]),
                learning_rate, l2, max_grad_norm, options,
            )

        advance_state(params, states, slot, item)
        states.count[slot] += 1
        states.last_partition[slot] = partition
        states.last_offset[slot] = offset
        item_stats.record(item)

    return result


def _train_step(params, accumulators, start_hidden, window, positive, negatives, learning_rate, l2, max_grad_norm,
                options):
    """Take the step of one event and return its status and its summed loss (NaN without a step)."""
    if not negatives:
        return STATUS_NO_NEGATIVE, np.nan

    X, U, W, V, bias = params
    last = forward_window(X, U, W, start_hidden, window)[-1]
    loss = sum(bpr_loss(last, V[positive], V[negative], bias[positive], bias[negative])[0] for negative in negatives)
    grads = bptt_gradients(params, start_hidden, window, positive, negatives)
    applied = sgd_update(params, accumulators, window, positive, negatives, grads, learning_rate, l2, max_grad_norm,
                         **options)
    return (STATUS_TRAINED if applied else STATUS_NON_FINITE), loss
