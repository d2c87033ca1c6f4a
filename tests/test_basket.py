"""Tests of the basket-mode kernels against the float64 reference, finite differences and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core import basket, basket_reference, kernels
from drnn_core.config import ModelConfig
from drnn_core.model import RecurrentBPR
from drnn_core.sampling import ItemStats

N_ITEMS = 9
HIDDEN = 5
START_HIDDEN = np.linspace(0.2, 0.7, HIDDEN)

# Item 2 is in every window basket and in the target; item 4 is in two baskets.
WINDOWS = {
    "one-basket": [[0, 2, 4]],
    "repeated-items": [[1, 2], [2, 4, 5], [4, 2, 3]],
    "singletons": [[3], [2], [3]],
}
TARGET = [2, 6, 7]
NEGATIVES = [8, 1, 8, 5]
PARAM_NAMES = ("X", "U", "W", "V", "bias")


def _params(seed: int, tied: bool, dtype=np.float64):
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 0.5, (N_ITEMS, HIDDEN))
    U = rng.normal(0.0, 0.5, (HIDDEN, HIDDEN))
    W = rng.normal(0.0, 0.5, (HIDDEN, HIDDEN))
    V = X if tied else rng.normal(0.0, 0.5, (N_ITEMS, HIDDEN))
    bias = rng.normal(0.0, 0.3, N_ITEMS)
    cast = [np.ascontiguousarray(a, dtype=dtype) for a in (X, U, W, V, bias)]
    if tied:
        cast[3] = cast[0]
    return tuple(cast)


def _baskets_csr(baskets_list):
    offsets = np.zeros(len(baskets_list) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in baskets_list])
    items = np.array([item for b in baskets_list for item in b], dtype=np.int32)
    users = np.zeros(len(baskets_list), dtype=np.int32)
    return users, offsets, items


def _row_buffers(max_rows: int, size: int):
    rows = (
        np.zeros(max_rows, dtype=np.int64), np.zeros(1, dtype=np.int64), np.zeros(max_rows, dtype=np.int8),
        np.zeros(max_rows, dtype=np.int8), np.zeros(max_rows, dtype=np.int8),
    )
    grads = (
        np.zeros((max_rows, size), dtype=np.float32), np.zeros((max_rows, size), dtype=np.float32),
        np.zeros(max_rows, dtype=np.float32), np.zeros((2 * size, size), dtype=np.float32),
    )
    return rows, grads


def _kernel_gradients(params32, window, target, negatives, pooling):
    """Run forward_baskets and basket_gradients; return the loss, the dense gradients, rows and buffers."""
    X, U, W, V, bias = params32
    baskets = _baskets_csr(list(window) + [target])
    length = len(window)
    code = basket.pooling_code(pooling)
    hs = np.zeros((length + 1, HIDDEN), dtype=np.float32)
    pooled = np.zeros((length, HIDDEN), dtype=np.float32)
    argmax = np.zeros((length, HIDDEN), dtype=np.int64)
    window_index = np.arange(length, dtype=np.int64)
    basket.forward_baskets(X, U, W, START_HIDDEN.astype(np.float32), baskets, window_index, length, code, hs, pooled,
                           argmax)

    max_rows = sum(len(b) for b in window) + len(target) + len(negatives)
    rows, grads = _row_buffers(max_rows, HIDDEN)
    row_slot = np.full(N_ITEMS, basket.NO_ROW, dtype=np.int64)
    loss = basket.basket_gradients(
        params32, baskets, window_index, length, length, np.array(negatives, dtype=np.int64), len(negatives), code,
        hs, pooled, argmax, row_slot, rows, grads, np.zeros(HIDDEN, dtype=np.float32),
        np.zeros((length, HIDDEN), dtype=np.float32),
    )
    dense = {"X": np.zeros((N_ITEMS, HIDDEN)), "V": np.zeros((N_ITEMS, HIDDEN)), "bias": np.zeros(N_ITEMS)}
    for r in range(rows[1][0]):
        item = rows[0][r]
        dense["X"][item] = grads[0][r]
        dense["V"][item] = grads[1][r]
        dense["bias"][item] = grads[2][r]
    dense["U"] = grads[3][:HIDDEN].astype(np.float64)
    dense["W"] = grads[3][HIDDEN:].astype(np.float64)
    return float(loss), dense, rows, grads, row_slot


def _numeric_gradient(loss_of, params, name):
    """Return the central finite-difference gradient of ``loss_of()`` for one parameter array."""
    array = params[PARAM_NAMES.index(name)]
    grad = np.zeros(array.shape)
    step = 1e-6
    for index in np.ndindex(array.shape):
        saved = array[index]
        array[index] = saved + step
        upper = loss_of()
        array[index] = saved - step
        lower = loss_of()
        array[index] = saved
        grad[index] = (upper - lower) / (2 * step)
    return grad


@pytest.mark.parametrize("window_name", list(WINDOWS))
@pytest.mark.parametrize("pooling", basket.POOLINGS)
@pytest.mark.parametrize("tied", [False, True])
def test_reference_gradient_matches_finite_differences(window_name, pooling, tied):
    params = _params(3, tied)
    window = WINDOWS[window_name]
    l2 = 0.01

    def loss_of():
        return basket_reference.basket_loss(params, START_HIDDEN, window, TARGET, NEGATIVES, pooling, l2)

    analytic = basket_reference.full_basket_gradient(params, START_HIDDEN, window, TARGET, NEGATIVES, pooling, l2)
    for name in PARAM_NAMES:
        if tied and name == "X":
            continue
        expected = analytic[name]
        numeric = _numeric_gradient(loss_of, params, name)
        np.testing.assert_allclose(expected, numeric, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("pooling", basket.POOLINGS)
def test_reference_gradient_without_item_bias_zero_bias(pooling):
    params = _params(4, False)
    grads = basket_reference.full_basket_gradient(
        params, START_HIDDEN, WINDOWS["repeated-items"], TARGET, NEGATIVES, pooling, 0.01, item_bias=False
    )

    assert not grads["bias"].any()


@pytest.mark.parametrize("window_name", list(WINDOWS))
@pytest.mark.parametrize("pooling", basket.POOLINGS)
def test_basket_gradients_match_reference(window_name, pooling):
    params64 = _params(5, False)
    params32 = tuple(np.ascontiguousarray(a, dtype=np.float32) for a in params64)
    window = WINDOWS[window_name]

    loss, dense, _, _, _ = _kernel_gradients(params32, window, TARGET, NEGATIVES, pooling)
    expected = basket_reference.basket_gradients(params64, START_HIDDEN, window, TARGET, NEGATIVES, pooling)
    expected_loss = basket_reference.basket_bpr_loss(params64, START_HIDDEN, window, TARGET, NEGATIVES, pooling)

    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(dense[name], expected[name], rtol=2e-4, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("window_name", list(WINDOWS))
def test_basket_gradients_mark_row_roles(window_name):
    params32 = _params(6, False, np.float32)
    window = WINDOWS[window_name]

    _, _, rows, _, row_slot = _kernel_gradients(params32, window, TARGET, NEGATIVES, "mean")
    count = rows[1][0]
    row_of = rows[0][:count]
    inputs = set(row_of[rows[2][:count] == 1].tolist())
    scored = set(row_of[rows[3][:count] == 1].tolist())

    assert inputs == {item for b in window for item in b}
    assert scored == set(TARGET) | set(NEGATIVES)
    assert len(set(row_of.tolist())) == count
    assert sorted(np.flatnonzero(row_slot != basket.NO_ROW).tolist()) == sorted(row_of.tolist())


def _step(params32, accumulators, rows, grads, *, optimizer, tied, l2, max_grad_norm=1e9, learning_rate=0.05):
    max_rows = rows[0].shape[0]
    scratch = (
        np.zeros((max_rows, HIDDEN), dtype=np.float32), np.zeros((max_rows, HIDDEN), dtype=np.float32),
        np.zeros(max_rows, dtype=np.float32), np.zeros(max_rows, dtype=np.float32),
        np.zeros(max_rows, dtype=np.float32), np.zeros(max_rows, dtype=np.float32),
        np.zeros((2 * HIDDEN, HIDDEN), dtype=np.float32), np.zeros((2 * HIDDEN, HIDDEN), dtype=np.float32),
    )
    code = kernels.OPTIMIZER_ADAGRAD if optimizer == "adagrad" else kernels.OPTIMIZER_SGD
    step_hyper = (learning_rate, l2, max_grad_norm, code, 1, 1.0, int(tied))
    return basket.basket_update(params32, accumulators, rows, grads, step_hyper, scratch)


def _accumulators(tied: bool, value: float = 0.1):
    acc_v = np.full(N_ITEMS, value, dtype=np.float32)
    acc_x = acc_v if tied else np.full(N_ITEMS, value, dtype=np.float32)
    return (acc_x, np.full((HIDDEN, HIDDEN), value, dtype=np.float32), np.full((HIDDEN, HIDDEN), value, dtype=np.float32),
            acc_v, np.full(N_ITEMS, value, dtype=np.float32))


def _expected_step(params64, full, accumulators, optimizer, learning_rate):
    """Return the parameters after one unclipped step of the full gradient, computed with NumPy."""
    acc_x, acc_u, acc_w, acc_v, acc_bias = (a.astype(np.float64) for a in accumulators)
    expected = {}
    for name, param in zip(PARAM_NAMES, params64):
        grad = full[name]
        if optimizer == "sgd":
            expected[name] = param - learning_rate * grad
        elif name in ("U", "W"):
            total = (acc_u if name == "U" else acc_w) + grad**2
            expected[name] = param - learning_rate * grad / np.sqrt(total)
        elif name == "bias":
            expected[name] = param - learning_rate * grad / (np.sqrt(acc_bias + grad**2) + kernels.ADAGRAD_EPSILON)
        else:
            acc = (acc_x if name == "X" else acc_v) + np.mean(grad**2, axis=1)
            expected[name] = param - (learning_rate / (np.sqrt(acc) + kernels.ADAGRAD_EPSILON))[:, None] * grad
    return expected


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("pooling", basket.POOLINGS)
def test_basket_update_matches_reference_step(optimizer, tied, pooling):
    params64 = _params(7, tied)
    params32 = _params(7, tied, np.float32)
    window = WINDOWS["repeated-items"]
    accumulators = _accumulators(tied)
    l2, learning_rate = 0.01, 0.05

    _, _, rows, grads, _ = _kernel_gradients(params32, window, TARGET, NEGATIVES, pooling)
    applied = _step(params32, accumulators, rows, grads, optimizer=optimizer, tied=tied, l2=l2,
                    learning_rate=learning_rate)
    full = basket_reference.full_basket_gradient(params64, START_HIDDEN, window, TARGET, NEGATIVES, pooling, l2)
    expected = _expected_step(params64, full, _accumulators(tied), optimizer, learning_rate)

    assert applied
    for name, param in zip(PARAM_NAMES, params32):
        if tied and name == "X":
            continue
        np.testing.assert_allclose(param, expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_basket_update_clips_to_max_grad_norm():
    params64 = _params(8, False)
    params32 = _params(8, False, np.float32)
    window = WINDOWS["repeated-items"]
    before = tuple(a.copy() for a in params32)

    _, _, rows, grads, _ = _kernel_gradients(params32, window, TARGET, NEGATIVES, "mean")
    _step(params32, _accumulators(False), rows, grads, optimizer="sgd", tied=False, l2=0.0, max_grad_norm=0.01,
          learning_rate=1.0)
    moved = np.sqrt(sum(np.sum((after.astype(np.float64) - old) ** 2) for after, old in zip(params32, before)))
    full_norm = np.sqrt(sum(np.sum(g**2) for g in basket_reference.full_basket_gradient(
        params64, START_HIDDEN, window, TARGET, NEGATIVES, "mean", 0.0).values()))

    assert full_norm > 0.01
    assert moved == pytest.approx(0.01, rel=1e-3)


def test_basket_update_non_finite_changes_nothing():
    params32 = _params(9, False, np.float32)
    _, _, rows, grads, _ = _kernel_gradients(params32, WINDOWS["one-basket"], TARGET, NEGATIVES, "mean")
    grads[1][0, 0] = np.nan
    before = tuple(a.copy() for a in params32)

    applied = _step(params32, _accumulators(False), rows, grads, optimizer="adagrad", tied=False, l2=0.0)

    assert not applied
    for after, old in zip(params32, before):
        np.testing.assert_array_equal(after, old)


def _train_stream(baskets_list, users, *, pooling="mean", seed=1, window=3, **overrides):
    config = ModelConfig(hidden_size=HIDDEN, window=window, initial_items=4, negatives=4, seed=seed, **overrides)
    model = RecurrentBPR(config)
    stream = _baskets_csr(baskets_list)
    stream = (np.asarray(users, dtype=np.int32), stream[1], stream[2])
    n = len(baskets_list)
    states = basket.BasketStates.empty(max(users) + 1, HIDDEN, window)
    outputs = (np.zeros(n, dtype=np.int8), np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.int64))
    basket.train_basket_range(model, states, stream, 0, n, outputs, pooling=pooling)
    return model, states, outputs


def test_train_baskets_first_basket_not_ranked():
    baskets_list = [[0, 1], [2], [1, 3], [0, 2, 4], [3]]
    users = [0, 1, 0, 1, 0]

    _, states, (status, losses, ranks) = _train_stream(baskets_list, users)

    assert ranks[0] == kernels.RANK_NOT_EVALUATED
    assert ranks[1] == kernels.RANK_NOT_EVALUATED
    assert status[0] == kernels.STATUS_NO_HISTORY
    assert np.all(status[2:] == kernels.STATUS_TRAINED)
    assert np.all(np.isfinite(losses[2:]))
    assert states.count.tolist() == [3, 2]


def test_train_baskets_window_overflow_keeps_last_baskets():
    baskets_list = [[0], [1, 2], [3], [4, 0], [2]]
    users = [0] * 5

    _, states, _ = _train_stream(baskets_list, users, window=2)

    assert states.window[0].tolist() == [3, 4]
    assert states.window_len[0] == 2
    assert np.any(states.start_hidden[0] != 0.0)


def test_train_baskets_batch_split_same_result():
    rng = np.random.default_rng(11)
    baskets_list = [sorted(set(rng.integers(0, 12, rng.integers(1, 5)).tolist())) for _ in range(40)]
    users = rng.integers(0, 5, 40).tolist()
    model_whole, _, whole = _train_stream(baskets_list, users)

    config = ModelConfig(hidden_size=HIDDEN, window=3, initial_items=4, negatives=4, seed=1)
    model_split = RecurrentBPR(config)
    stream = _baskets_csr(baskets_list)
    stream = (np.asarray(users, dtype=np.int32), stream[1], stream[2])
    states = basket.BasketStates.empty(5, HIDDEN, 3)
    split = (np.zeros(40, dtype=np.int8), np.zeros(40, dtype=np.float32), np.zeros(40, dtype=np.int64))
    for begin in range(0, 40, 7):
        basket.train_basket_range(model_split, states, stream, begin, min(begin + 7, 40), split)

    np.testing.assert_array_equal(whole[2], split[2])
    np.testing.assert_array_equal(model_whole.V[:12], model_split.V[:12])


def test_pooling_code_rejects_unknown_name():
    with pytest.raises(basket.ConfigError, match="mean, max"):
        basket.pooling_code("sum")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(0, N_ITEMS - 1), min_size=1, max_size=3),
    st.integers(0, N_ITEMS - 1),
    st.sampled_from(basket.POOLINGS),
    st.integers(0, 1000),
)
def test_singleton_baskets_equal_item_model(window_items, positive, pooling, seed):
    params32 = _params(seed, False, np.float32)
    negatives = [n for n in NEGATIVES if n != positive]
    window = [[item] for item in window_items]

    loss, dense, _, _, _ = _kernel_gradients(params32, window, [positive], negatives, pooling)

    length = len(window_items)
    items = np.array(window_items, dtype=np.int32)
    hs = np.zeros((length + 1, HIDDEN), dtype=np.float32)
    kernels.forward_window(params32[0], params32[1], params32[2], START_HIDDEN.astype(np.float32), items, length, hs)
    terms = len(negatives) + 1
    grads = (np.zeros((length, HIDDEN), dtype=np.float32), np.zeros((2 * HIDDEN, HIDDEN), dtype=np.float32),
             np.zeros((terms, HIDDEN), dtype=np.float32), np.zeros(terms, dtype=np.float32))
    item_loss = kernels.bptt_gradients(params32, items, length, positive, np.array(negatives, dtype=np.int64),
                                       len(negatives), hs, grads, np.zeros(HIDDEN, dtype=np.float32),
                                       np.zeros((length, HIDDEN), dtype=np.float32))

    assert loss == pytest.approx(float(item_loss), rel=1e-5)
    np.testing.assert_allclose(dense["U"], grads[1][:HIDDEN], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dense["W"], grads[1][HIDDEN:], rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.permutations([0, 2, 4, 5]), st.permutations([2, 6, 7]), st.sampled_from(basket.POOLINGS),
       st.integers(0, 1000))
def test_basket_loss_ignores_item_order(window_basket, target, pooling, seed):
    params = _params(seed, False)
    window = [[1, 3], list(window_basket)]

    shuffled = basket_reference.basket_bpr_loss(params, START_HIDDEN, window, list(target), NEGATIVES, pooling)
    ordered = basket_reference.basket_bpr_loss(params, START_HIDDEN, [[1, 3], [0, 2, 4, 5]], [2, 6, 7], NEGATIVES,
                                               pooling)

    assert shuffled == pytest.approx(ordered, rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, N_ITEMS - 1), min_size=1, max_size=4, unique=True), st.integers(0, 1000))
def test_max_pool_bounds_mean_pool(basket_items, seed):
    X = _params(seed, False)[0]

    mean = basket_reference.pool(X, basket_items, "mean")
    maximum = basket_reference.pool(X, basket_items, "max")

    assert np.all(maximum >= mean - 1e-12)
    assert np.all(maximum <= X.max(axis=0) + 1e-12)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=N_ITEMS, max_size=N_ITEMS),
    st.lists(st.integers(0, N_ITEMS + 2), min_size=1, max_size=4),
    st.integers(0, 1000),
)
def test_best_basket_rank_is_min_item_rank(counts, basket_items, seed):
    X, _, _, V, bias = _params(seed, False, np.float32)
    hidden = np.random.default_rng(seed).uniform(0.0, 1.0, HIDDEN).astype(np.float32)
    item_count = np.array(counts, dtype=np.int64)
    n_rows = int(np.flatnonzero(item_count).max() + 1) if item_count.any() else 0
    items = np.array(basket_items, dtype=np.int32)
    scores = np.zeros(N_ITEMS, dtype=np.float32)

    best = basket.best_basket_rank(hidden, V, bias, item_count, n_rows, items, 0, items.shape[0], scores)
    item_ranks = [kernels.rank_item(hidden, V, bias, item_count, n_rows, int(item)) for item in basket_items]
    known_ranks = [rank for rank in item_ranks if rank >= 0]

    assert best == (min(known_ranks) if known_ranks else kernels.RANK_UNKNOWN_ITEM)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.sampled_from(basket.POOLINGS), st.floats(0.01, 50.0))
def test_train_baskets_states_stay_finite(seed, pooling, learning_rate):
    rng = np.random.default_rng(seed)
    baskets_list = [sorted(set(rng.integers(0, 10, rng.integers(1, 4)).tolist())) for _ in range(25)]
    users = rng.integers(0, 4, 25).tolist()

    model, states, (status, _, ranks) = _train_stream(baskets_list, users, pooling=pooling, seed=seed,
                                                     learning_rate=learning_rate)

    for name in ("X", "U", "W", "V", "bias"):
        assert np.isfinite(getattr(model, name)).all(), name
    assert np.isfinite(states.start_hidden).all()
    assert np.all(ranks >= kernels.RANK_NOT_EVALUATED)
    assert int(states.count.sum()) == 25


def test_item_stats_count_every_basket_item():
    baskets_list = [[0, 1], [2], [1, 3]]
    model, _, _ = _train_stream(baskets_list, [0, 1, 0])

    assert model.stats.item_count[:4].tolist() == [1, 2, 1, 1]
    assert isinstance(model.stats, ItemStats)
