"""Checks of the Numba kernels against the float64 NumPy reference and against finite differences.

Tolerances: the kernels compute in float32 (unit roundoff 2**-24, about 6e-8) and
the reference in float64, on the same float32 parameter values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core import kernels, reference, sampling
from drnn_core.sampling import POPULARITY, UNIFORM, ItemStats
from drnn_core.state import UserStateBatch

HIDDEN = 6
N_ITEMS = 16

# Central differences with step FD_STEP on a float64 loss of size ~1 have a
# truncation error ~FD_STEP**2 * |L'''| (1e-12) and a rounding error
# ~1e-16 * |L| / FD_STEP (1e-10), so the reference's analytic gradient must match
# them to about 1e-8. A sum of four BPR terms is ~4 times larger, which the
# tolerances still cover.
FD_STEP = 1e-6
FD_RTOL = 1e-6
FD_ATOL = 1e-8

# A float32 kernel gradient entry is a sum of about HIDDEN * window = 24 products,
# each rounded to 6e-8 relative, so its error is below ~24 * 6e-8 = 1.5e-6 of the
# magnitude of its terms. Entries much smaller than their terms (cancellation)
# get the absolute bound instead, which scales with the largest entry of the
# same array. Both bounds leave a margin of about 10x.
KERNEL_RTOL = 1e-4
KERNEL_ATOL_FRACTION = 1e-5

# Events of the gradient checks, as (window, positive, negatives): distinct items,
# an item at three positions, the positive inside the window, several negatives
# with one drawn twice, and negatives inside the window. With tied embeddings
# the rows of the last case are X and V rows at once.
WINDOWS = {
    "distinct": ([3, 7, 1, 12], 9, [4]),
    "repeated": ([5, 2, 5, 5], 9, [4]),
    "positive_in_window": ([3, 9, 1], 9, [0]),
    "several_negatives": ([3, 7, 1], 9, [4, 0, 4, 13]),
    "negatives_in_window": ([3, 7, 1, 7], 9, [7, 2, 3]),
}
BPTT_NAMES = ("X", "U", "W", "V_pos", "bias_pos", "V_neg", "bias_neg")
FULL_NAMES = ("X", "U", "W", "V", "bias")
OPTIMIZERS = {"sgd": kernels.OPTIMIZER_SGD, "adagrad": kernels.OPTIMIZER_ADAGRAD}


# Builders of kernel inputs.


def _random_params(seed, n_items=N_ITEMS, size=HIDDEN, scale=0.5, tied=False):
    """Return (X, U, W, V, bias) as C-ordered float32 arrays of normal values; V is X when tied."""
    rng = np.random.default_rng(seed)
    shapes = [(n_items, size), (size, size), (size, size), (n_items, size), (n_items,)]
    X, U, W, V, bias = (np.ascontiguousarray(rng.normal(0.0, scale, shape), dtype=np.float32) for shape in shapes)
    return (X, U, W, X if tied else V, bias)


def _accumulators(params, value=0.1):
    """Return Adagrad sums of ``value`` for ``params``; acc_x is acc_v when X is V, as in the model."""
    X, U, _, _, _ = params
    acc_v = np.full(X.shape[0], value, dtype=np.float32)
    acc_x = acc_v if params[0] is params[3] else np.full(X.shape[0], value, dtype=np.float32)
    return (acc_x, np.full(U.shape, value, dtype=np.float32), np.full(U.shape, value, dtype=np.float32),
            acc_v, np.full(X.shape[0], value, dtype=np.float32))


def _random_hidden(seed, size=HIDDEN):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.05, 0.95, size).astype(np.float32)


def _float64(arrays):
    """Return float64 copies of the arrays, keeping the identity of arrays passed twice (tied X and V)."""
    copies = {}
    result = []
    for array in arrays:
        if id(array) not in copies:
            copies[id(array)] = np.array(array, dtype=np.float64)
        result.append(copies[id(array)])
    return tuple(result)


def _kernel_forward(params, start_hidden, items):
    X, U, W = params[:3]
    items = np.asarray(items, dtype=np.int32)
    states = np.zeros((len(items) + 1, U.shape[0]), dtype=np.float32)
    kernels.forward_window(X, U, W, start_hidden, items, len(items), states)
    return states


def _gradient_buffers(size, length, n_negatives):
    return (np.zeros((length, size), dtype=np.float32), np.zeros((2 * size, size), dtype=np.float32),
            np.zeros((n_negatives + 1, size), dtype=np.float32), np.zeros(n_negatives + 1, dtype=np.float32))


def _kernel_bptt_buffers(params, start_hidden, items, positive, negatives):
    """Run kernels.bptt_gradients and return its raw output buffers and its loss."""
    size = params[1].shape[0]
    items = np.asarray(items, dtype=np.int32)
    negatives = np.asarray(negatives, dtype=np.int64)
    states = _kernel_forward(params, start_hidden, items)

    grads = _gradient_buffers(size, len(items), len(negatives))
    scratch_dh = np.zeros(size, dtype=np.float32)
    scratch_delta = np.zeros((len(items), size), dtype=np.float32)
    loss = kernels.bptt_gradients(params, items, len(items), positive, negatives, len(negatives), states,
                                  grads, scratch_dh, scratch_delta)
    return grads, loss


def _kernel_bptt(params, start_hidden, items, positive, negatives):
    """Return the kernel's BPR gradients in the layout of reference.bptt_gradients."""
    (grad_x, grad_u_w, grad_v, grad_bias), _ = _kernel_bptt_buffers(params, start_hidden, items, positive, negatives)
    size = params[1].shape[0]
    return {"X": grad_x, "U": grad_u_w[:size].copy(), "W": grad_u_w[size:].copy(),
            "V_pos": grad_v[0], "bias_pos": grad_bias[0], "V_neg": grad_v[1:], "bias_neg": grad_bias[1:]}


def _kernel_sgd(params, accumulators, items, positive, negatives, buffers, learning_rate, l2, max_grad_norm, *,
                optimizer="sgd", item_bias=True, recurrent_scale=1.0):
    """Run kernels.sgd_update on the gradient buffers and return whether it applied the step."""
    size = params[1].shape[0]
    items = np.asarray(items, dtype=np.int32)
    negatives = np.asarray(negatives, dtype=np.int64)
    terms = len(negatives) + 1
    scratch = (
        np.zeros((len(items), size), dtype=np.float32), np.zeros((2 * size, size), dtype=np.float32),
        np.zeros((terms, size), dtype=np.float32), np.zeros(terms, dtype=np.float32),
        np.zeros(len(items), dtype=np.float32), np.zeros((2 * size, size), dtype=np.float32),
        np.zeros(terms, dtype=np.float32), np.zeros(terms, dtype=np.float32),
        np.zeros(len(items), dtype=np.int64),
    )
    step_hyper = (float(learning_rate), float(l2), float(max_grad_norm), OPTIMIZERS[optimizer], int(item_bias),
                  float(recurrent_scale), int(params[0] is params[3]))
    return bool(kernels.sgd_update(params, accumulators, items, len(items), positive, negatives, len(negatives),
                                   buffers, step_hyper, scratch))


def _assert_kernel_close(actual, expected):
    expected = np.asarray(expected, dtype=np.float64)
    atol = KERNEL_ATOL_FRACTION * max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=KERNEL_RTOL, atol=atol)


# Finite differences on the reference loss.


def _central_difference(loss, target):
    """Return d loss / d target by central differences, perturbing ``target`` (a float64 view) in place."""
    grad = np.zeros(target.shape)
    for index in np.ndindex(target.shape):
        saved = target[index]
        target[index] = saved + FD_STEP
        up = loss()
        target[index] = saved - FD_STEP
        down = loss()
        target[index] = saved
        grad[index] = (up - down) / (2.0 * FD_STEP)
    return grad


def _finite_difference_gradients(params, start_hidden, items, positive, negatives, l2, item_bias=True):
    """Return every gradient of reference.window_loss by central differences, keyed like full_gradient_with_l2.

    With tied embeddings the X rows that are also V rows are perturbed once, as V rows.
    """
    X, U, W, V, bias = params

    def loss():
        return reference.window_loss(params, start_hidden, items, positive, negatives, l2, item_bias=item_bias)

    x_rows = reference.input_rows(params, items, positive, negatives)
    v_rows = reference.scored_rows(positive, negatives)
    size = U.shape[0]
    return {
        "x_rows": x_rows,
        "X": np.stack([_central_difference(loss, X[row]) for row in x_rows]) if len(x_rows) else np.zeros((0, size)),
        "U": _central_difference(loss, U),
        "W": _central_difference(loss, W),
        "v_rows": v_rows,
        "V": np.stack([_central_difference(loss, V[row]) for row in v_rows]),
        "bias": np.concatenate([_central_difference(loss, bias[row:row + 1]) for row in v_rows]),
    }


def _gradient_case(window_name, seed=11, tied=False):
    items, positive, negatives = WINDOWS[window_name]
    params32 = _random_params(seed, tied=tied)
    start_hidden32 = _random_hidden(seed)
    return params32, start_hidden32, items, positive, negatives


# Builders of train_batch inputs.


@dataclasses.dataclass
class KernelRun:
    """Everything kernels.train_batch reads and writes, plus the settings of the run."""

    params: tuple
    accumulators: tuple
    states: UserStateBatch
    stats: ItemStats
    rng_state: np.ndarray
    learning_rate: float = 0.1
    l2: float = 1e-4
    max_grad_norm: float = 1.0
    alpha: float = 0.75
    kind: int = UNIFORM
    negatives: int = 1
    negative_mode: int = kernels.NEGATIVES_SUM
    optimizer: str = "sgd"
    item_bias: bool = False
    recurrent_scale: float = 1.0

    @classmethod
    def create(cls, seed, *, n_users=6, n_items=24, size=8, window=3, scale=0.3, tied=False, **options):
        params = _random_params(seed, n_items=n_items, size=size, scale=scale, tied=tied)
        if not options.get("item_bias", False):
            params[4][:] = 0.0
        return cls(
            params=params,
            accumulators=_accumulators(params),
            states=UserStateBatch.empty(n_users, size, window),
            stats=ItemStats.empty(n_items, options.get("alpha", 0.75)),
            rng_state=np.array([seed], dtype=np.uint64),
            **options,
        )

    @property
    def tied(self):
        return self.params[0] is self.params[3]

    def hyper(self, evaluate=True):
        return (float(self.learning_rate), float(self.l2), float(self.max_grad_norm), float(self.alpha),
                int(self.kind), int(evaluate), int(self.negatives), int(self.negative_mode),
                OPTIMIZERS[self.optimizer], int(self.item_bias), float(self.recurrent_scale), int(self.tied))

    def train(self, events, evaluate=True):
        """Run kernels.train_batch and return (status, loss, rank)."""
        size = events[0].shape[0]
        outputs = (np.zeros(size, dtype=np.int8), np.zeros(size, dtype=np.float32), np.zeros(size, dtype=np.int64))
        kernels.train_batch(self.params, self.accumulators, self.states.as_tuple(), events, self.stats.as_tuple(),
                            self.hyper(evaluate), self.rng_state, outputs)
        return outputs

    def reference_copy(self):
        """Return float64 params, accumulators, states and item stats equal to the current kernel ones."""
        states = UserStateBatch(**{
            field.name: np.array(getattr(self.states, field.name)) for field in dataclasses.fields(UserStateBatch)
        })
        states.hidden = states.hidden.astype(np.float64)
        states.start_hidden = states.start_hidden.astype(np.float64)
        item_stats = reference.ReferenceItemStats(
            item_count=self.stats.item_count.copy(),
            known_items=[int(item) for item in self.stats.known_items[: self.stats.n_known]],
            n_rows=int(self.stats.meta[sampling.N_ROWS]),
        )
        return _float64(self.params), _float64(self.accumulators), states, item_stats

    def reference_options(self):
        return {"optimizer": self.optimizer, "item_bias": self.item_bias,
                "recurrent_learning_rate_scale": self.recurrent_scale}

    def draw_negatives(self, events):
        """Replay the sampler calls train_batch makes for ``events`` in NEGATIVES_SUM mode, on copies of its state.

        Which events draw negatives depends only on the events (duplicate rule and
        window length), so the copies see the same calls in the same order.
        """
        sampler = tuple(array.copy() for array in self.stats.as_tuple())
        rng_state = self.rng_state.copy()
        window_len = self.states.window_len.copy()
        last_partition = self.states.last_partition.copy()
        last_offset = self.states.last_offset.copy()
        capacity = self.states.window.shape[1]
        slots, items, partitions, offsets = events

        negatives = [[] for _ in range(slots.shape[0])]
        for e in range(slots.shape[0]):
            slot = slots[e]
            if last_partition[slot] == partitions[e] and offsets[e] <= last_offset[slot]:
                continue
            if window_len[slot] > 0:
                for _ in range(self.negatives):
                    negative = sampling.sample_negative(sampler, int(items[e]), self.kind, rng_state)
                    if negative >= 0:
                        negatives[e].append(int(negative))
            window_len[slot] = min(capacity, window_len[slot] + 1)
            last_partition[slot] = partitions[e]
            last_offset[slot] = offsets[e]
            sampling.record_item(sampler, int(items[e]), self.alpha)
        return negatives, rng_state


def _events(slots, items, partitions, offsets):
    return (np.asarray(slots, dtype=np.int32), np.asarray(items, dtype=np.int32),
            np.asarray(partitions, dtype=np.int32), np.asarray(offsets, dtype=np.int64))


def _random_stream(seed, n_events=300, n_users=6, n_items=24):
    """Return a stream with popular items, replayed events and one user who changes partition.

    Each user reads one partition (user % 2) and every partition numbers its
    offsets from 0. About 10% of the events are replays of an earlier event of
    the same user. From the middle of the stream on, user 0 is read from
    partition 5, whose offsets start again at 0.
    """
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1)
    popularity /= popularity.sum()
    next_offset = {}
    history = {user: [] for user in range(n_users)}
    rows = []

    for position in range(n_events):
        user = int(rng.integers(n_users))
        if history[user] and rng.random() < 0.1:
            rows.append(history[user][int(rng.integers(len(history[user])))])
            continue
        partition = 5 if user == 0 and position >= n_events // 2 else user % 2
        offset = next_offset.get(partition, 0)
        next_offset[partition] = offset + 1
        row = (user, int(rng.choice(n_items, p=popularity)), partition, offset)
        history[user].append(row)
        rows.append(row)

    return _events(*zip(*rows))


def _batches(events, size):
    for start in range(0, events[0].shape[0], size):
        yield tuple(array[start:start + size] for array in events)


# Constants.


def test_reference_constants_match_kernels():
    pairs = [
        (reference.STATUS_TRAINED, kernels.STATUS_TRAINED),
        (reference.STATUS_NO_HISTORY, kernels.STATUS_NO_HISTORY),
        (reference.STATUS_NO_NEGATIVE, kernels.STATUS_NO_NEGATIVE),
        (reference.STATUS_NON_FINITE, kernels.STATUS_NON_FINITE),
        (reference.STATUS_DUPLICATE, kernels.STATUS_DUPLICATE),
        (reference.RANK_UNKNOWN_ITEM, kernels.RANK_UNKNOWN_ITEM),
        (reference.RANK_NOT_EVALUATED, kernels.RANK_NOT_EVALUATED),
        (reference.ADAGRAD_EPSILON, kernels.ADAGRAD_EPSILON),
    ]
    for reference_value, kernel_value in pairs:
        assert reference_value == kernel_value


# Forward pass and loss.


def test_sigmoid_matches_reference():
    values = np.array([-1e30, -200.0, -88.0, -20.0, -1.5, -1e-7, 0.0, 1e-7, 1.5, 20.0, 88.0, 200.0, 1e30],
                      dtype=np.float32)
    actual = np.array([kernels.sigmoid(value) for value in values])

    np.testing.assert_allclose(actual, reference.sigmoid(values), rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("length", [0, 1, 4])
def test_forward_window_matches_reference(length):
    params = _random_params(1)
    start_hidden = _random_hidden(2)
    items = [3, 7, 3, 0][:length]

    actual = _kernel_forward(params, start_hidden, items)
    X, U, W = _float64(params[:3])
    expected = reference.forward_window(X, U, W, start_hidden.astype(np.float64), items)

    _assert_kernel_close(actual, expected)


def test_forward_window_first_row_is_start_hidden():
    params = _random_params(1)
    start_hidden = _random_hidden(2)

    states = _kernel_forward(params, start_hidden, [3, 7])

    np.testing.assert_array_equal(states[0], start_hidden)


@pytest.mark.parametrize("margin_scale", [0.1, 1.0, 40.0])
def test_bpr_loss_matches_reference(margin_scale):
    rng = np.random.default_rng(5)
    for _ in range(20):
        hidden = rng.uniform(0.0, 1.0, HIDDEN).astype(np.float32)
        v_pos = rng.normal(0.0, margin_scale, HIDDEN).astype(np.float32)
        v_neg = rng.normal(0.0, margin_scale, HIDDEN).astype(np.float32)

        loss, dloss_dx = kernels.bpr_loss(hidden, v_pos, v_neg)
        expected_loss, expected_dloss_dx = reference.bpr_loss(*_float64((hidden, v_pos, v_neg)))

        # x is a float32 sum of HIDDEN products of size ~margin_scale, so its error
        # is ~HIDDEN * 6e-8 * margin_scale. The loss and its derivative change by
        # at most 1 per unit of x.
        x_error = 1e-6 * margin_scale
        assert loss == pytest.approx(expected_loss, rel=1e-5, abs=x_error)
        assert dloss_dx == pytest.approx(expected_dloss_dx, rel=1e-5, abs=x_error)


def test_item_score_adds_bias():
    hidden = np.array([1.0, 2.0], dtype=np.float32)
    V = np.array([[0.5, 0.25], [1.0, -1.0]], dtype=np.float32)
    bias = np.array([0.125, -2.0], dtype=np.float32)

    scores = [kernels.item_score(hidden, V, bias, item) for item in range(2)]

    assert scores == [1.125, -3.0]


@pytest.mark.parametrize("window_name", sorted(WINDOWS))
def test_bptt_gradients_loss_matches_reference(window_name):
    params32, start_hidden32, items, positive, negatives = _gradient_case(window_name)

    _, loss = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    expected = reference.window_loss(_float64(params32), start_hidden32.astype(np.float64), items, positive,
                                     negatives, 0.0)

    assert loss == pytest.approx(expected, rel=1e-5)


# Gradients: kernel against reference, and both against finite differences.


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("window_name", sorted(WINDOWS))
def test_bptt_gradients_match_reference(window_name, tied):
    params32, start_hidden32, items, positive, negatives = _gradient_case(window_name, tied=tied)

    actual = _kernel_bptt(params32, start_hidden32, items, positive, negatives)
    expected = reference.bptt_gradients(_float64(params32), start_hidden32.astype(np.float64),
                                        items, positive, negatives)

    for name in BPTT_NAMES:
        _assert_kernel_close(actual[name], expected[name])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("window_name", sorted(WINDOWS))
def test_reference_gradients_match_finite_differences(window_name, tied):
    params32, start_hidden32, items, positive, negatives = _gradient_case(window_name, tied=tied)
    params = _float64(params32)
    start_hidden = start_hidden32.astype(np.float64)

    grads = reference.bptt_gradients(params, start_hidden, items, positive, negatives)
    analytic = reference.full_gradient_with_l2(params, items, positive, negatives, grads, 0.0)
    numeric = _finite_difference_gradients(params, start_hidden, items, positive, negatives, 0.0)

    for name in ("x_rows", "v_rows"):
        np.testing.assert_array_equal(analytic[name], numeric[name], err_msg=name)
    for name in FULL_NAMES:
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=FD_RTOL, atol=FD_ATOL, err_msg=name)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("window_name", sorted(WINDOWS))
def test_kernel_gradients_match_finite_differences(window_name, tied):
    # The kernel's per-position and per-draw rows are summed per parameter row by
    # the reference's merge, which the previous test checks on its own.
    params32, start_hidden32, items, positive, negatives = _gradient_case(window_name, tied=tied)
    params = _float64(params32)
    numeric = _finite_difference_gradients(params, start_hidden32.astype(np.float64), items, positive,
                                           negatives, 0.0)

    kernel_grads = {name: np.asarray(value, dtype=np.float64)
                    for name, value in _kernel_bptt(params32, start_hidden32, items, positive, negatives).items()}
    actual = reference.full_gradient_with_l2(params, items, positive, negatives, kernel_grads, 0.0)

    for name in FULL_NAMES:
        if numeric[name].size:
            _assert_kernel_close(actual[name], numeric[name])


@pytest.mark.parametrize("item_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_full_gradient_with_l2_matches_finite_differences(tied, item_bias):
    params32, start_hidden32, items, positive, negatives = _gradient_case("negatives_in_window", tied=tied)
    params = _float64(params32)
    start_hidden = start_hidden32.astype(np.float64)
    l2 = 0.05

    grads = reference.bptt_gradients(params, start_hidden, items, positive, negatives)
    analytic = reference.full_gradient_with_l2(params, items, positive, negatives, grads, l2, item_bias=item_bias)
    numeric = _finite_difference_gradients(params, start_hidden, items, positive, negatives, l2, item_bias)

    for name in ("X", "U", "W", "V"):
        np.testing.assert_allclose(analytic[name], numeric[name], rtol=FD_RTOL, atol=FD_ATOL, err_msg=name)
    if item_bias:
        np.testing.assert_allclose(analytic["bias"], numeric["bias"], rtol=FD_RTOL, atol=FD_ATOL)
    else:
        np.testing.assert_array_equal(analytic["bias"], 0.0)


def test_merge_duplicate_rows_sums_into_first_position():
    items = np.array([5, 2, 5, 5], dtype=np.int32)
    grad_x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    expected_first = grad_x[0] + grad_x[2] + grad_x[3]
    expected_second = grad_x[1].copy()

    kernels.merge_duplicate_rows(items, 4, grad_x)

    np.testing.assert_array_equal(grad_x[0], expected_first)
    np.testing.assert_array_equal(grad_x[1], expected_second)
    np.testing.assert_array_equal(grad_x[2:], 0.0)


def test_merge_duplicate_negatives_sums_into_first_draw():
    negatives = np.array([4, 0, 4, 4], dtype=np.int64)
    grad_v = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    grad_bias = np.arange(5, dtype=np.float32)
    expected_v = grad_v[1] + grad_v[3] + grad_v[4]

    kernels.merge_duplicate_negatives(negatives, 4, grad_v, grad_bias)

    np.testing.assert_array_equal(grad_v[1], expected_v)
    assert grad_bias[1] == 1.0 + 3.0 + 4.0
    np.testing.assert_array_equal(grad_v[3:], 0.0)
    np.testing.assert_array_equal(grad_bias[3:], 0.0)


def test_merge_tied_rows_moves_scored_window_rows():
    items = np.array([3, 9, 7, 1], dtype=np.int32)
    negatives = np.array([7, 2], dtype=np.int64)
    grad_x = np.arange(4 * 2, dtype=np.float32).reshape(4, 2)
    grad_v = np.ones((3, 2), dtype=np.float32)
    x_target = np.zeros(4, dtype=np.int64)

    kernels.merge_tied_rows(items, 4, 9, negatives, 2, grad_x, grad_v, x_target)

    np.testing.assert_array_equal(x_target, [-1, 0, 1, -1])
    np.testing.assert_array_equal(grad_v[0], [3.0, 4.0])
    np.testing.assert_array_equal(grad_v[1], [5.0, 6.0])
    np.testing.assert_array_equal(grad_x[1:3], 0.0)


# Negative draws.


def test_draw_negatives_sum_keeps_every_draw():
    stats = ItemStats.empty(10, 0.75)
    for item in range(10):
        sampling.record_item(stats.as_tuple(), item, 0.75)
    params = _random_params(3, n_items=10)
    out = np.zeros(5, dtype=np.int64)
    rng_state = np.array([7], dtype=np.uint64)
    expected_rng = rng_state.copy()
    expected = [sampling.sample_negative(stats.as_tuple(), 2, UNIFORM, expected_rng) for _ in range(5)]

    kept = kernels.draw_negatives(stats.as_tuple(), 2, UNIFORM, rng_state, 5, kernels.NEGATIVES_SUM,
                                  _random_hidden(4), params[3], params[4], out)

    assert kept == 5
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(rng_state, expected_rng)


def test_draw_negatives_hardest_keeps_best_scored_draw():
    stats = ItemStats.empty(10, 0.75)
    for item in range(10):
        sampling.record_item(stats.as_tuple(), item, 0.75)
    params = _random_params(3, n_items=10)
    hidden = _random_hidden(4)
    out = np.zeros(5, dtype=np.int64)
    rng_state = np.array([7], dtype=np.uint64)
    draws_rng = rng_state.copy()
    draws = [sampling.sample_negative(stats.as_tuple(), 2, UNIFORM, draws_rng) for _ in range(5)]
    scores = reference.score_items(*_float64((hidden, params[3], params[4])), stats.item_count, 10)

    kept = kernels.draw_negatives(stats.as_tuple(), 2, UNIFORM, rng_state, 5, kernels.NEGATIVES_HARDEST,
                                  hidden, params[3], params[4], out)

    assert kept == 1
    assert out[0] == draws[int(np.argmax(scores[draws]))]


def test_draw_negatives_no_other_item_keeps_none():
    stats = ItemStats.empty(4, 0.75)
    sampling.record_item(stats.as_tuple(), 2, 0.75)
    params = _random_params(3, n_items=4)
    out = np.zeros(3, dtype=np.int64)

    kept = kernels.draw_negatives(stats.as_tuple(), 2, UNIFORM, np.array([1], dtype=np.uint64), 3,
                                  kernels.NEGATIVES_SUM, _random_hidden(4), params[3], params[4], out)

    assert kept == 0


# SGD and Adagrad steps.


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("window_name", sorted(WINDOWS))
@pytest.mark.parametrize("max_grad_norm", [1e6, 1e-2])
@pytest.mark.parametrize("l2", [0.01, 0.5])
def test_sgd_update_matches_reference(window_name, max_grad_norm, l2, tied, optimizer):
    # With l2 = 0.5 the L2 term dominates the gradient, so a clipped step shows
    # whether each distinct row enters the norm once.
    params32, start_hidden32, items, positive, negatives = _gradient_case(window_name, tied=tied)
    accumulators32 = _accumulators(params32)
    params, accumulators = _float64(params32), _float64(accumulators32)
    learning_rate = 0.5

    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    applied = _kernel_sgd(params32, accumulators32, items, positive, negatives, buffers, learning_rate, l2,
                          max_grad_norm, optimizer=optimizer, recurrent_scale=0.5)
    grads = reference.bptt_gradients(params, start_hidden32.astype(np.float64), items, positive, negatives)
    expected_applied = reference.sgd_update(params, accumulators, items, positive, negatives, grads,
                                            learning_rate, l2, max_grad_norm, optimizer=optimizer,
                                            recurrent_learning_rate_scale=0.5)

    assert applied is True
    assert expected_applied is True
    for actual, expected in zip(params32 + accumulators32, params + accumulators):
        # Updated values are float32-rounded (6e-8 relative) sums of the old value
        # and a step that carries the gradient's own 1.5e-6 relative error.
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_sgd_update_clips_step_to_max_grad_norm(l2):
    params32, start_hidden32, items, positive, negatives = _gradient_case("several_negatives")
    before = _float64(params32)
    learning_rate, max_grad_norm = 1.0, 0.1

    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    applied = _kernel_sgd(params32, _accumulators(params32), items, positive, negatives, buffers,
                          learning_rate, l2, max_grad_norm)
    x_rows = reference.distinct_items(items)
    v_rows = reference.scored_rows(positive, negatives)
    after = _float64(params32)
    changes = [after[0][x_rows] - before[0][x_rows], after[1] - before[1], after[2] - before[2],
               after[3][v_rows] - before[3][v_rows], after[4][v_rows] - before[4][v_rows]]
    step_norm = np.sqrt(sum(np.sum(change**2) for change in changes))

    assert applied is True
    assert step_norm == pytest.approx(learning_rate * max_grad_norm, rel=1e-4)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_sgd_update_leaves_untouched_rows_unchanged(optimizer):
    params32, start_hidden32, items, positive, negatives = _gradient_case("several_negatives")
    accumulators32 = _accumulators(params32)
    before = tuple(array.copy() for array in params32 + accumulators32)
    untouched = np.setdiff1d(np.arange(N_ITEMS), items)
    other_v = np.setdiff1d(np.arange(N_ITEMS), [positive] + negatives)

    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    _kernel_sgd(params32, accumulators32, items, positive, negatives, buffers, 0.5, 0.01, 1e6, optimizer=optimizer)

    np.testing.assert_array_equal(params32[0][untouched], before[0][untouched])
    np.testing.assert_array_equal(params32[3][other_v], before[3][other_v])
    np.testing.assert_array_equal(params32[4][other_v], before[4][other_v])
    np.testing.assert_array_equal(accumulators32[0][untouched], before[5][untouched])
    np.testing.assert_array_equal(accumulators32[3][other_v], before[8][other_v])


def test_sgd_update_without_item_bias_keeps_bias():
    params32, start_hidden32, items, positive, negatives = _gradient_case("several_negatives")
    accumulators32 = _accumulators(params32)
    bias_before = params32[4].copy()
    acc_before = accumulators32[4].copy()

    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    applied = _kernel_sgd(params32, accumulators32, items, positive, negatives, buffers, 0.5, 0.01, 1e6,
                          optimizer="adagrad", item_bias=False)

    assert applied is True
    np.testing.assert_array_equal(params32[4], bias_before)
    np.testing.assert_array_equal(accumulators32[4], acc_before)


def test_sgd_update_sgd_keeps_accumulators():
    params32, start_hidden32, items, positive, negatives = _gradient_case("distinct")
    accumulators32 = _accumulators(params32)
    before = tuple(array.copy() for array in accumulators32)

    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    _kernel_sgd(params32, accumulators32, items, positive, negatives, buffers, 0.5, 0.01, 1e6, optimizer="sgd")

    for actual, expected in zip(accumulators32, before):
        np.testing.assert_array_equal(actual, expected)


def test_sgd_update_adagrad_first_step_is_bounded():
    # From accumulators of 0, a row's first step is lr * g / sqrt(mean(g**2)) for
    # the X and V rows and lr * g / |g| per element of U, W and the biases, so
    # the root mean square of every row's step is at most lr.
    params32, start_hidden32, items, positive, negatives = _gradient_case("several_negatives")
    accumulators32 = _accumulators(params32, value=0.0)
    before = _float64(params32)
    learning_rate = 0.25

    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    _kernel_sgd(params32, accumulators32, items, positive, negatives, buffers, learning_rate, 0.0, 1e6,
                optimizer="adagrad")

    for actual, expected in zip(_float64(params32), before):
        change = np.atleast_2d(actual - expected)
        if change.shape[0] == 1:
            change = change.T
        assert np.max(np.sqrt(np.mean(change**2, axis=1))) <= learning_rate * (1.0 + 1e-5)


def _absurd_step_case():
    """Return params and a BPR gradient whose unclipped step of 1e38 overflows float32.

    The gradient has one non-zero entry, 4.0 on X[items[0], 0], so its norm (4.0)
    is below max_grad_norm = 5 and the step 1e38 * 4.0 = 4e38 exceeds the float32
    maximum (3.4e38), although it is finite in float64.
    """
    params32 = tuple(np.zeros(shape, dtype=np.float32) for shape in [(4, 2), (2, 2), (2, 2), (4, 2), (4,)])
    items = [0]
    buffers = (np.array([[4.0, 0.0]], dtype=np.float32), np.zeros((4, 2), dtype=np.float32),
               np.zeros((2, 2), dtype=np.float32), np.zeros(2, dtype=np.float32))
    return params32, items, buffers


def test_sgd_update_rejects_float32_overflow():
    params32, items, buffers = _absurd_step_case()

    applied = _kernel_sgd(params32, _accumulators(params32), items, 1, [2], buffers,
                          learning_rate=1e38, l2=0.0, max_grad_norm=5.0)

    assert applied is False


def test_sgd_update_float32_overflow_changes_nothing():
    params32, items, buffers = _absurd_step_case()
    accumulators32 = _accumulators(params32)

    _kernel_sgd(params32, accumulators32, items, 1, [2], buffers, learning_rate=1e38, l2=0.0, max_grad_norm=5.0,
                optimizer="adagrad")

    for array in params32:
        np.testing.assert_array_equal(array, 0.0)
    for array in accumulators32:
        np.testing.assert_array_equal(array, np.float32(0.1))


def test_reference_sgd_update_rejects_float32_overflow():
    params32, items, buffers = _absurd_step_case()
    params = _float64(params32)
    grads = {"X": buffers[0].astype(np.float64), "U": np.zeros((2, 2)), "W": np.zeros((2, 2)),
             "V_pos": np.zeros(2), "bias_pos": np.zeros(()), "V_neg": np.zeros((1, 2)), "bias_neg": np.zeros(1)}

    applied = reference.sgd_update(params, _float64(_accumulators(params32)), items, 1, [2], grads, 1e38, 0.0, 5.0)

    assert applied is False
    assert np.all(params[0] == 0.0)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_sgd_update_skips_non_finite_gradient(bad_value):
    params32, start_hidden32, items, positive, negatives = _gradient_case("distinct")
    before = tuple(array.copy() for array in params32)
    buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
    buffers[1][2, 3] = bad_value

    applied = _kernel_sgd(params32, _accumulators(params32), items, positive, negatives, buffers, 0.5, 0.01, 5.0)

    assert applied is False
    for actual, expected in zip(params32, before):
        np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_sgd_update_absurd_learning_rate_keeps_params_finite(optimizer):
    params32, start_hidden32, items, positive, negatives = _gradient_case("distinct")
    accumulators32 = _accumulators(params32)
    learning_rate = 1e38

    for _ in range(5):
        buffers, _ = _kernel_bptt_buffers(params32, start_hidden32, items, positive, negatives)
        _kernel_sgd(params32, accumulators32, items, positive, negatives, buffers, learning_rate, 1e-5, 5.0,
                    optimizer=optimizer)

    for array in params32 + accumulators32:
        assert np.all(np.isfinite(array))


# Ranking and scoring.


def _ranking_case():
    """Return hidden, V, bias, counts and n_rows with hand-set scores ``V[j, 0] + bias[j]``.

    Item 1 (score 0.5) is the target. Items 0 and 6 score above it, items 3 and 5
    tie with it (item 5 through its bias), item 2 is below, item 4 scores above
    but is unknown, and item 7 scores above with a positive count but lies at or
    above n_rows.
    """
    hidden = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    V = np.zeros((8, 3), dtype=np.float32)
    V[:, 0] = [0.75, 0.5, 0.25, 0.5, 0.875, 0.25, 1.0, 2.0]
    V[:, 1] = 100.0
    bias = np.zeros(8, dtype=np.float32)
    bias[5] = 0.25
    item_count = np.array([1, 3, 2, 1, 0, 4, 1, 9], dtype=np.int64)
    return hidden, V, bias, item_count, 7


def test_rank_item_counts_ties_against_target():
    hidden, V, bias, item_count, n_rows = _ranking_case()

    rank = kernels.rank_item(hidden, V, bias, item_count, n_rows, 1)

    assert rank == 4


def test_rank_item_top_item_ranks_zero():
    hidden, V, bias, item_count, n_rows = _ranking_case()

    rank = kernels.rank_item(hidden, V, bias, item_count, n_rows, 6)

    assert rank == 0


@pytest.mark.parametrize("target", [4, 7])
def test_rank_item_unknown_target(target):
    hidden, V, bias, item_count, n_rows = _ranking_case()

    rank = kernels.rank_item(hidden, V, bias, item_count, n_rows, target)

    assert rank == kernels.RANK_UNKNOWN_ITEM


def test_rank_item_constant_scores_rank_last():
    hidden = np.zeros(3, dtype=np.float32)
    V = np.ones((5, 3), dtype=np.float32)
    bias = np.zeros(5, dtype=np.float32)
    item_count = np.ones(5, dtype=np.int64)

    rank = kernels.rank_item(hidden, V, bias, item_count, 5, 2)

    assert rank == 4


def test_rank_item_matches_reference_on_hand_set_scores():
    hidden, V, bias, item_count, n_rows = _ranking_case()

    for target in range(8):
        expected = reference.rank_item(*_float64((hidden, V, bias)), item_count, n_rows, target)
        assert kernels.rank_item(hidden, V, bias, item_count, n_rows, target) == expected


def test_rank_item_matches_reference_on_random_scores():
    rng = np.random.default_rng(8)
    for _ in range(50):
        V = rng.normal(0.0, 1.0, (30, HIDDEN)).astype(np.float32)
        bias = rng.normal(0.0, 1.0, 30).astype(np.float32)
        hidden = rng.uniform(0.0, 1.0, HIDDEN).astype(np.float32)
        item_count = rng.integers(0, 3, 30).astype(np.int64)
        n_rows = int(rng.integers(0, 31))
        target = int(rng.integers(0, 30))

        actual = kernels.rank_item(hidden, V, bias, item_count, n_rows, target)
        # Float32 scores of HIDDEN products of size ~1 are within ~1e-6 of float64.
        low, high = reference.rank_item_bounds(*_float64((hidden, V, bias)), item_count, n_rows, target, 1e-5)
        assert low <= actual <= high


def test_score_items_matches_reference():
    rng = np.random.default_rng(9)
    V = rng.normal(0.0, 1.0, (20, HIDDEN)).astype(np.float32)
    bias = rng.normal(0.0, 1.0, 20).astype(np.float32)
    hidden = rng.uniform(0.0, 1.0, HIDDEN).astype(np.float32)
    item_count = rng.integers(0, 3, 20).astype(np.int64)
    item_count[17] = 5
    scores = np.empty(20, dtype=np.float32)

    kernels.score_items(hidden, V, bias, item_count, 15, scores)
    expected = reference.score_items(*_float64((hidden, V, bias)), item_count, 15)

    np.testing.assert_array_equal(np.isneginf(scores), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(scores[finite], expected[finite], rtol=1e-5, atol=1e-6)


# Batches: train_batch against the reference.


def _assert_states_close(kernel_states, reference_states, atol):
    np.testing.assert_allclose(kernel_states.hidden, reference_states.hidden, rtol=0.0, atol=atol)
    np.testing.assert_allclose(kernel_states.start_hidden, reference_states.start_hidden, rtol=0.0, atol=atol)
    for name in ("window", "window_len", "count", "last_partition", "last_offset"):
        np.testing.assert_array_equal(getattr(kernel_states, name), getattr(reference_states, name), err_msg=name)


def test_train_batch_advance_matches_reference():
    run = KernelRun.create(3, n_users=1, n_items=8, window=2, learning_rate=0.5, max_grad_norm=5.0)
    run.stats.item_count[:] = 1
    run.stats.known_items[:] = np.arange(8)
    run.stats.meta[:] = [8, 8]
    run.stats.fenwick = sampling.build_fenwick(run.stats.item_count, run.alpha)
    params, accumulators, states, item_stats = run.reference_copy()

    for offset, item in enumerate([1, 2, 3, 4, 5]):
        events = _events([0], [item], [0], [offset])
        negatives, _ = run.draw_negatives(events)
        status, _, _ = run.train(events)
        expected = reference.train_batch_reference(params, accumulators, states, item_stats, events, negatives,
                                                   run.learning_rate, run.l2, run.max_grad_norm,
                                                   **run.reference_options())

        assert status[0] == expected.status[0]
        _assert_states_close(run.states, states, atol=1e-5)


def test_train_batch_overflow_uses_updated_params():
    run = KernelRun.create(4, n_users=1, n_items=8, window=2, learning_rate=0.5, max_grad_norm=5.0)
    for offset, item in enumerate([1, 2]):
        run.train(_events([0], [item], [0], [offset]))
    params_before = _float64(run.params)
    start_before = run.states.start_hidden[0].astype(np.float64)
    oldest = int(run.states.window[0, 0])

    status, _, _ = run.train(_events([0], [3], [0], [2]))
    params_after = _float64(run.params)
    expected = reference.recurrent_step(*params_after[:3], oldest, start_before)
    stale = reference.recurrent_step(*params_before[:3], oldest, start_before)

    assert status[0] == kernels.STATUS_TRAINED
    np.testing.assert_allclose(run.states.start_hidden[0], expected, rtol=0.0, atol=1e-6)
    assert np.max(np.abs(expected - stale)) > 1e-4


STREAM_CASES = {
    "sgd_uniform": {"kind": UNIFORM},
    "sgd_popularity": {"kind": POPULARITY},
    "adagrad_bias_tied": {"kind": UNIFORM, "optimizer": "adagrad", "item_bias": True, "tied": True, "negatives": 4,
                          "recurrent_scale": 0.5},
    "adagrad_bias_untied": {"kind": POPULARITY, "optimizer": "adagrad", "item_bias": True, "negatives": 3},
}


@pytest.mark.parametrize("case", sorted(STREAM_CASES))
def test_train_batch_stream_matches_reference(case):
    run = KernelRun.create(21, **STREAM_CASES[case])
    params, accumulators, states, item_stats = run.reference_copy()
    # Scores are sums of 8 products of parameters and states, so ranks are
    # compared within a score tolerance of 1e-4. The gradient norms of these
    # streams are near max_grad_norm = 1.0, so steps both with and without
    # clipping occur.
    state_atol, param_atol, score_tolerance = 1e-5, 1e-5, 1e-4
    statuses = []

    for events in _batches(_random_stream(22), 37):
        negatives, rng_after = run.draw_negatives(events)
        status, loss, rank = run.train(events)
        expected = reference.train_batch_reference(params, accumulators, states, item_stats, events, negatives,
                                                   run.learning_rate, run.l2, run.max_grad_norm,
                                                   rank_tolerance=score_tolerance, **run.reference_options())

        np.testing.assert_array_equal(run.rng_state, rng_after)
        np.testing.assert_array_equal(status, expected.status)
        np.testing.assert_array_equal(np.isnan(loss), np.isnan(expected.loss))
        np.testing.assert_allclose(loss, expected.loss, rtol=1e-4, atol=1e-5)
        evaluated = expected.rank >= 0
        np.testing.assert_array_equal(rank[~evaluated], expected.rank[~evaluated])
        assert np.all(rank[evaluated] >= expected.rank_low[evaluated])
        assert np.all(rank[evaluated] <= expected.rank_high[evaluated])
        statuses.append(status)

    for actual, expected in zip(run.params, params):
        np.testing.assert_allclose(actual, expected, rtol=0.0, atol=param_atol)
    for actual, expected in zip(run.accumulators, accumulators):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=param_atol)
    _assert_states_close(run.states, states, atol=state_atol)
    np.testing.assert_array_equal(run.stats.item_count, item_stats.item_count)
    np.testing.assert_array_equal(run.stats.known_items[: run.stats.n_known], item_stats.known_items)
    assert run.stats.meta[sampling.N_ROWS] == item_stats.n_rows
    all_statuses = np.concatenate(statuses)
    for code in (kernels.STATUS_TRAINED, kernels.STATUS_NO_HISTORY, kernels.STATUS_DUPLICATE):
        assert np.any(all_statuses == code), f"the stream has no event with status {code}"


def test_train_batch_fenwick_matches_rebuild():
    run = KernelRun.create(23, kind=POPULARITY)

    for events in _batches(_random_stream(24, n_events=120), 40):
        run.train(events)
    rebuilt = sampling.build_fenwick(run.stats.item_count, run.alpha)

    np.testing.assert_allclose(run.stats.fenwick, rebuilt, rtol=1e-12)


def _snapshot(run):
    arrays = list(run.params) + list(run.accumulators) + list(run.states.as_tuple()) + list(run.stats.as_tuple()) + [run.rng_state]
    return [array.copy() for array in arrays]


def test_train_batch_duplicate_changes_nothing():
    run = KernelRun.create(25)
    run.train(_events([0, 0, 1, 0], [1, 2, 3, 4], [0, 0, 1, 0], [10, 11, 7, 12]))
    before = _snapshot(run)

    status, loss, rank = run.train(_events([0, 0, 1], [5, 6, 7], [0, 0, 1], [12, 3, 7]))

    np.testing.assert_array_equal(status, kernels.STATUS_DUPLICATE)
    assert np.all(np.isnan(loss))
    np.testing.assert_array_equal(rank, kernels.RANK_NOT_EVALUATED)
    for actual, expected in zip(_snapshot(run), before):
        np.testing.assert_array_equal(actual, expected)


def test_train_batch_newer_offset_is_applied():
    run = KernelRun.create(26)
    run.train(_events([0, 0], [1, 2], [0, 0], [10, 11]))

    status, _, _ = run.train(_events([0], [3], [0], [12]))

    assert status[0] == kernels.STATUS_TRAINED


def test_train_batch_other_partition_is_applied():
    run = KernelRun.create(27)
    run.train(_events([0, 0], [1, 2], [0, 0], [10, 11]))

    status, _, _ = run.train(_events([0], [3], [1], [0]))

    assert status[0] == kernels.STATUS_TRAINED
    assert run.states.last_partition[0] == 1
    assert run.states.last_offset[0] == 0


def test_train_batch_no_negative_status():
    run = KernelRun.create(28)

    status, loss, _ = run.train(_events([0, 0], [1, 1], [0, 0], [0, 1]))

    np.testing.assert_array_equal(status, [kernels.STATUS_NO_HISTORY, kernels.STATUS_NO_NEGATIVE])
    assert np.all(np.isnan(loss))


# Invariants.

FLOAT32_FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)
UNIT_FLOAT32 = st.floats(min_value=0.0, max_value=1.0, width=32)
# |v| <= 1e30 keeps h . v (HIDDEN terms of at most 1e30) from overflowing float32.
EMBEDDING_BOUND = float(np.float32(1e30))
EMBEDDING_FLOAT32 = st.floats(min_value=-EMBEDDING_BOUND, max_value=EMBEDDING_BOUND, width=32)


def _float32_vector(elements, size=HIDDEN):
    return st.lists(elements, min_size=size, max_size=size).map(lambda values: np.array(values, dtype=np.float32))


EVENT_ROWS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 11), st.integers(0, 1), st.integers(0, 20)),
    min_size=1,
    max_size=40,
)


def _events_from_rows(rows):
    return _events(*zip(*rows))


@settings(max_examples=200, deadline=None)
@given(FLOAT32_FINITE)
def test_sigmoid_bounded_and_finite(z):
    value = kernels.sigmoid(np.float32(z))

    assert np.isfinite(value)
    assert 0.0 <= value <= 1.0


@settings(max_examples=200, deadline=None)
@given(_float32_vector(UNIT_FLOAT32), _float32_vector(EMBEDDING_FLOAT32), _float32_vector(EMBEDDING_FLOAT32))
def test_bpr_loss_non_negative_and_finite(hidden, v_pos, v_neg):
    loss, dloss_dx = kernels.bpr_loss(hidden, v_pos, v_neg)

    assert np.isfinite(loss)
    assert loss >= 0.0
    assert -1.0 <= dloss_dx <= 0.0


@settings(max_examples=200, deadline=None)
@given(
    _float32_vector(UNIT_FLOAT32, size=4),
    st.lists(_float32_vector(st.floats(-10.0, 10.0, width=32), size=4), min_size=10, max_size=10),
    st.lists(st.integers(0, 3), min_size=10, max_size=10),
    st.integers(0, 10),
    st.integers(0, 9),
)
def test_rank_item_in_range(hidden, rows, counts, n_rows, target):
    V = np.stack(rows)
    bias = np.zeros(V.shape[0], dtype=np.float32)
    item_count = np.array(counts, dtype=np.int64)
    n_known = int(np.count_nonzero(item_count[:n_rows] > 0))

    rank = kernels.rank_item(hidden, V, bias, item_count, n_rows, target)

    assert -1 <= rank <= n_known - 1
    assert (rank == kernels.RANK_UNKNOWN_ITEM) == (target >= n_rows or counts[target] == 0)


@settings(max_examples=50, deadline=None)
@given(EVENT_ROWS, st.floats(1e-4, 10.0), st.integers(0, 2**32), st.sampled_from([UNIFORM, POPULARITY]))
def test_train_batch_hidden_in_unit_interval(rows, learning_rate, seed, kind):
    run = KernelRun.create(seed, n_users=4, n_items=12, size=4, learning_rate=learning_rate,
                           max_grad_norm=5.0, kind=kind)

    run.train(_events_from_rows(rows))

    for array in (run.states.hidden, run.states.start_hidden):
        assert np.all((array >= 0.0) & (array <= 1.0))


@settings(max_examples=50, deadline=None)
@given(EVENT_ROWS, st.floats(1e30, 1e38), st.floats(1e-3, 1e3), st.integers(0, 2**32))
def test_train_batch_huge_learning_rate_keeps_params_finite(rows, learning_rate, max_grad_norm, seed):
    run = KernelRun.create(seed, n_users=4, n_items=12, size=4, learning_rate=learning_rate,
                           max_grad_norm=max_grad_norm)

    run.train(_events_from_rows(rows))

    for array in run.params:
        assert np.all(np.isfinite(array))


@settings(max_examples=50, deadline=None)
@given(EVENT_ROWS, st.integers(0, 2**32))
def test_train_batch_leaves_events_unchanged(rows, seed):
    run = KernelRun.create(seed, n_users=4, n_items=12, size=4)
    events = _events_from_rows(rows)
    before = tuple(array.copy() for array in events)

    run.train(events)

    for actual, expected in zip(events, before):
        np.testing.assert_array_equal(actual, expected)


# Element-wise steps.


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-10.0, 10.0, width=32), min_size=1, max_size=40),
    st.floats(0.015625, 100.0, width=32),
    st.floats(0.0009765625, 1.0, width=32),
)
def test_adagrad_elementwise_matches_epsilon_formula(values, accumulator, rate):
    param = np.asarray(values, dtype=np.float32)
    grad = param[::-1].copy()
    acc = np.full_like(param, accumulator)
    new_param, new_acc = np.empty_like(param), np.empty_like(param)
    reg, clip_sq = np.float32(1e-3), np.float32(0.5)

    bad = kernels.adagrad_elementwise(param, grad, acc, new_param, new_acc, np.float32(rate), reg, clip_sq)

    g = grad.astype(np.float64) + float(reg) * param
    total = acc.astype(np.float64) + float(clip_sq) * g * g
    expected = param - rate * g / (np.sqrt(total) + kernels.ADAGRAD_EPSILON)
    assert bad == 0
    np.testing.assert_allclose(new_acc, total, rtol=1e-6)
    np.testing.assert_allclose(new_param, expected, rtol=1e-5, atol=1e-6)


def test_adagrad_elementwise_empty_accumulator_steps_by_inverse_epsilon():
    param = np.zeros(3, dtype=np.float32)
    grad = np.array([0.0, 1e-12, -1e-12], dtype=np.float32)
    new_param, new_acc = np.empty_like(param), np.empty_like(param)

    bad = kernels.adagrad_elementwise(param, grad, np.zeros(3, dtype=np.float32), new_param, new_acc,
                                      np.float32(1.0), np.float32(0.0), np.float32(1.0))

    assert bad == 0
    np.testing.assert_allclose(new_param, -grad / np.float32(kernels.ADAGRAD_EPSILON), rtol=1e-5)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, 2e6])
def test_sgd_elementwise_counts_out_of_bounds(bad_value):
    param = np.array([0.0, bad_value, 1.0], dtype=np.float32)
    new_param = np.empty_like(param)

    bad = kernels.sgd_elementwise(param, np.zeros(3, dtype=np.float32), new_param, np.float32(0.1), np.float32(0.0))

    assert bad == 1
