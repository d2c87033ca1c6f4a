"""Contract checks of RecurrentBPR and ModelConfig: reproducibility, growth, serialisation, top-k, validation."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import numpy as np
import pytest

from drnn_core import kernels
from drnn_core.config import ModelConfig
from drnn_core.errors import ConfigError, DrnnError, ModelFormatError
from drnn_core.model import MODEL_FORMAT_VERSION, RecurrentBPR
from drnn_core.state import UserStateBatch

SMALL = ModelConfig(hidden_size=4, window=3, initial_items=16, seed=5, negatives=3)
UNTIED = dataclasses.replace(SMALL, tie_embeddings=False)
N_USERS = 5
PARAM_NAMES = ("X", "U", "W", "V", "bias", "acc_x", "acc_u", "acc_w", "acc_v", "acc_bias")


# Builders.


def _events(seed, n_events=120, n_items=12, n_users=N_USERS):
    """Return (slots, items, partitions, offsets) of a random stream, one partition per user."""
    generator = np.random.default_rng(seed)
    slots = generator.integers(0, n_users, n_events).astype(np.int32)
    items = generator.integers(0, n_items, n_events).astype(np.int32)
    partitions = (slots % 2).astype(np.int32)
    offsets = np.arange(n_events, dtype=np.int64)
    return slots, items, partitions, offsets


def _trained_model(config=SMALL, seed=1, **event_options):
    model = RecurrentBPR(config)
    states = UserStateBatch.empty(N_USERS, config.hidden_size, config.window)
    model.train_batch(states, *_events(seed, **event_options))
    return model, states


def _copy_states(states):
    return UserStateBatch(**{
        field.name: getattr(states, field.name).copy() for field in dataclasses.fields(UserStateBatch)
    })


def _assert_same_params(first, second):
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)


def _assert_same_result(first, second):
    np.testing.assert_array_equal(first.status, second.status)
    np.testing.assert_array_equal(first.loss, second.loss)
    np.testing.assert_array_equal(first.rank, second.rank)


def _read_arrays(data):
    with np.load(io.BytesIO(data)) as archive:
        return {name: archive[name] for name in archive.files}


def _write_arrays(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _replace_arrays(data, **replacements):
    """Return the saved model with some arrays replaced, or removed where the value is None."""
    arrays = _read_arrays(data)
    for name, value in replacements.items():
        if value is None:
            del arrays[name]
        else:
            arrays[name] = value
    return _write_arrays(arrays)


def _replace_metadata(data, **changes):
    metadata = json.loads(_read_arrays(data)["metadata"].tobytes().decode())
    metadata.update(changes)
    return _replace_arrays(data, metadata=np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8))


def _flip_middle_byte(data):
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


# Reproducibility.


def test_model_same_seed_same_weights():
    first, second = RecurrentBPR(SMALL), RecurrentBPR(SMALL)

    _assert_same_params(first, second)
    np.testing.assert_array_equal(first.rng_state, second.rng_state)


def test_model_other_seed_other_weights():
    first = RecurrentBPR(SMALL)
    second = RecurrentBPR(dataclasses.replace(SMALL, seed=6))

    assert not np.array_equal(first.X, second.X)


def test_model_same_seed_same_results():
    first_model, second_model = RecurrentBPR(SMALL), RecurrentBPR(SMALL)
    first_states = UserStateBatch.empty(N_USERS, SMALL.hidden_size, SMALL.window)
    second_states = UserStateBatch.empty(N_USERS, SMALL.hidden_size, SMALL.window)

    for seed in (1, 2):
        events = _events(seed)
        events = (events[0], events[1], events[2], events[3] + 1000 * seed)
        _assert_same_result(first_model.train_batch(first_states, *events),
                            second_model.train_batch(second_states, *events))

    _assert_same_params(first_model, second_model)
    np.testing.assert_array_equal(first_states.hidden, second_states.hidden)
    np.testing.assert_array_equal(first_model.rng_state, second_model.rng_state)


@pytest.mark.parametrize("sampler", ["uniform", "popularity"])
def test_model_train_batch_trains(sampler):
    config = dataclasses.replace(SMALL, sampler=sampler)

    model, _ = _trained_model(config)
    result = model.train_batch(UserStateBatch.empty(N_USERS, 4, 3), *_events(9, n_events=30))

    assert result.count(kernels.STATUS_TRAINED) > 0
    assert result.count(kernels.STATUS_NON_FINITE) == 0


# Capacity.


def test_ensure_capacity_doubles():
    model = RecurrentBPR(SMALL)

    model.ensure_capacity(17)
    after_one = model.capacity
    model.ensure_capacity(100)

    assert after_one == 32
    assert model.capacity == 128


def test_ensure_capacity_within_capacity_is_noop():
    model = RecurrentBPR(SMALL)
    X = model.X

    model.ensure_capacity(16)

    assert model.capacity == 16
    assert model.X is X


def test_ensure_capacity_keeps_trained_rows():
    model, _ = _trained_model()
    before = {name: getattr(model, name).copy() for name in PARAM_NAMES}
    counts = model.stats.item_count.copy()

    model.ensure_capacity(40)

    for name in ("X", "V"):
        np.testing.assert_array_equal(getattr(model, name)[:16], before[name][:16], err_msg=name)
    for name in ("U", "W"):
        np.testing.assert_array_equal(getattr(model, name), before[name], err_msg=name)
    np.testing.assert_array_equal(model.stats.item_count[:16], counts)


def test_ensure_capacity_grows_every_array():
    model, _ = _trained_model()

    model.ensure_capacity(40)

    assert model.X.shape == (64, SMALL.hidden_size)
    assert model.V.shape == (64, SMALL.hidden_size)
    assert model.stats.capacity == 64
    assert model.stats.fenwick.shape == (65,)
    assert model.X.flags.c_contiguous
    assert model.V.flags.c_contiguous


@pytest.mark.parametrize("config", [SMALL, UNTIED], ids=["tied", "untied"])
def test_ensure_capacity_keeps_tied_arrays_shared(config):
    model, _ = _trained_model(config)

    model.ensure_capacity(40)

    assert (model.V is model.X) == config.tie_embeddings
    assert (model.acc_x is model.acc_v) == config.tie_embeddings
    for name in ("bias", "acc_x", "acc_v", "acc_bias"):
        assert getattr(model, name).shape == (64,), name


def test_ensure_capacity_new_rows_start_untrained():
    model, _ = _trained_model()

    model.ensure_capacity(40)

    np.testing.assert_array_equal(model.bias[16:], 0.0)
    np.testing.assert_array_equal(model.acc_v[16:], np.float32(SMALL.adagrad_initial_accumulator))
    np.testing.assert_array_equal(model.acc_bias[16:], np.float32(SMALL.adagrad_initial_accumulator))


def test_model_train_batch_learns_item_bias():
    model, _ = _trained_model()

    assert np.count_nonzero(model.bias) > 0


def test_model_without_item_bias_keeps_zero_bias():
    model, _ = _trained_model(dataclasses.replace(SMALL, item_bias=False))

    np.testing.assert_array_equal(model.bias, 0.0)


def test_model_sgd_keeps_initial_accumulators():
    model, _ = _trained_model(dataclasses.replace(SMALL, optimizer="sgd"))

    for name in ("acc_u", "acc_w", "acc_v", "acc_bias"):
        np.testing.assert_array_equal(getattr(model, name), np.float32(SMALL.adagrad_initial_accumulator))


@pytest.mark.parametrize("negative_mode", ["sum", "hardest"])
def test_model_negative_modes_train(negative_mode):
    model, _ = _trained_model(dataclasses.replace(SMALL, negative_mode=negative_mode))

    result = model.train_batch(UserStateBatch.empty(N_USERS, 4, 3), *_events(9, n_events=30))

    assert result.count(kernels.STATUS_TRAINED) > 0
    assert result.count(kernels.STATUS_NON_FINITE) == 0


def test_model_new_user_gets_bias_ranking():
    # A new user's hidden state is zero, so the scores are the item biases and a
    # trained model ranks without ties.
    model, _ = _trained_model(n_items=8)

    scores = model.scores(np.zeros(SMALL.hidden_size, np.float32))

    known = scores[np.isfinite(scores)]
    assert np.unique(known).shape == known.shape


def test_ensure_capacity_new_rows_are_fresh_weights():
    model = RecurrentBPR(SMALL)

    model.ensure_capacity(17)

    assert np.all(np.isfinite(model.X[16:]))
    assert np.std(model.X[16:]) > 0.0
    assert np.count_nonzero(model.stats.item_count[16:]) == 0


def test_train_batch_grows_capacity_for_new_items():
    model = RecurrentBPR(SMALL)
    states = UserStateBatch.empty(1, 4, 3)

    result = model.train_batch(states, np.array([0, 0], np.int32), np.array([3, 40], np.int32),
                               np.zeros(2, np.int32), np.array([0, 1], np.int64))

    assert model.capacity == 64
    assert model.stats.item_count[40] == 1
    assert result.status[1] == kernels.STATUS_TRAINED


# Serialisation.


def test_round_trip_keeps_params():
    model, _ = _trained_model()

    loaded = RecurrentBPR.from_bytes(model.to_bytes(), SMALL)

    _assert_same_params(model, loaded)


@pytest.mark.parametrize("config", [SMALL, UNTIED], ids=["tied", "untied"])
def test_round_trip_keeps_tied_arrays_shared(config):
    model, _ = _trained_model(config)

    loaded = RecurrentBPR.from_bytes(model.to_bytes(), config)

    assert (loaded.V is loaded.X) == config.tie_embeddings
    assert (loaded.acc_x is loaded.acc_v) == config.tie_embeddings


def test_round_trip_untied_continues_identically():
    model, states = _trained_model(UNTIED)
    loaded = RecurrentBPR.from_bytes(model.to_bytes(), UNTIED)
    loaded_states = _copy_states(states)
    events = _events(3)
    events = (events[0], events[1], events[2], events[3] + 1000)

    _assert_same_result(model.train_batch(states, *events), loaded.train_batch(loaded_states, *events))
    _assert_same_params(model, loaded)


def test_round_trip_keeps_item_stats_and_rng():
    model, _ = _trained_model()

    loaded = RecurrentBPR.from_bytes(model.to_bytes(), SMALL)

    np.testing.assert_array_equal(loaded.stats.item_count, model.stats.item_count)
    np.testing.assert_array_equal(loaded.stats.known_items, model.stats.known_items)
    np.testing.assert_array_equal(loaded.stats.meta, model.stats.meta)
    np.testing.assert_allclose(loaded.stats.fenwick, model.stats.fenwick, rtol=1e-12)
    np.testing.assert_array_equal(loaded.rng_state, model.rng_state)


def test_round_trip_continues_identically():
    model, states = _trained_model(dataclasses.replace(SMALL, sampler="popularity"))
    loaded = RecurrentBPR.from_bytes(model.to_bytes(), model.config)
    loaded_states = _copy_states(states)
    events = _events(3)
    events = (events[0], events[1], events[2], events[3] + 1000)

    _assert_same_result(model.train_batch(states, *events), loaded.train_batch(loaded_states, *events))
    _assert_same_params(model, loaded)


def test_round_trip_then_growth_continues_identically():
    model, states = _trained_model()
    loaded = RecurrentBPR.from_bytes(model.to_bytes(), SMALL)
    loaded_states = _copy_states(states)
    events = _events(4, n_items=40)
    events = (events[0], events[1], events[2], events[3] + 1000)

    _assert_same_result(model.train_batch(states, *events), loaded.train_batch(loaded_states, *events))
    _assert_same_params(model, loaded)


def test_round_trip_after_growth_continues_identically():
    model, states = _trained_model(n_items=20)
    loaded = RecurrentBPR.from_bytes(model.to_bytes(), SMALL)
    loaded_states = _copy_states(states)
    events = _events(5, n_items=70)
    events = (events[0], events[1], events[2], events[3] + 1000)

    _assert_same_result(model.train_batch(states, *events), loaded.train_batch(loaded_states, *events))
    _assert_same_params(model, loaded)


def test_from_bytes_takes_training_settings_from_config():
    model, _ = _trained_model()
    config = dataclasses.replace(SMALL, learning_rate=0.2, sampler="popularity", l2=0.0)

    loaded = RecurrentBPR.from_bytes(model.to_bytes(), config)

    assert loaded.config.learning_rate == 0.2
    assert loaded.config.sampler == "popularity"
    assert loaded.config.initial_items == model.capacity


def _format_error_cases():
    data = _trained_model()[0].to_bytes()
    other_version = MODEL_FORMAT_VERSION + 1
    return [
        ("format_version", _replace_metadata(data, format_version=other_version), SMALL,
         f"format version {other_version}"),
        ("hidden_size", data, dataclasses.replace(SMALL, hidden_size=8), "hidden_size=4"),
        ("window", data, dataclasses.replace(SMALL, window=4), "window=3"),
        ("tie_embeddings", data, UNTIED, "tie_embeddings=True"),
        ("bias_missing", _replace_arrays(data, bias=None), SMALL, "array bias"),
        ("accumulator_shape", _replace_arrays(data, acc_u=np.zeros((4, 5), np.float32)), SMALL, "array acc_u"),
        ("array_shape", _replace_arrays(data, X=np.zeros((16, 5), np.float32)), SMALL, "array X"),
        ("array_missing", _replace_arrays(data, V=None), SMALL, "array V"),
        ("array_bytes", _flip_middle_byte(data), SMALL, "not a drnn-stream model"),
        ("truncated", data[: len(data) // 2], SMALL, "not a drnn-stream model"),
        ("random_bytes", np.random.default_rng(0).bytes(600), SMALL, "not a drnn-stream model"),
        ("empty", b"", SMALL, "not a drnn-stream model"),
        ("metadata_missing", _replace_arrays(data, metadata=None), SMALL, "metadata is missing"),
        ("metadata_not_json", _replace_arrays(data, metadata=np.frombuffer(b"{oops", np.uint8)), SMALL,
         "not valid JSON"),
        ("magic", _replace_metadata(data, magic="other-model"), SMALL, "not a drnn-stream model"),
    ]


FORMAT_ERROR_CASES = _format_error_cases()


@pytest.mark.parametrize(("data", "config", "fragment"), [case[1:] for case in FORMAT_ERROR_CASES],
                         ids=[case[0] for case in FORMAT_ERROR_CASES])
def test_from_bytes_rejects_bad_model(data, config, fragment):
    with pytest.raises(ModelFormatError) as error:
        RecurrentBPR.from_bytes(data, config)

    assert fragment in str(error.value)


def test_from_bytes_rejects_metadata_not_object():
    data = _trained_model()[0].to_bytes()
    damaged = _replace_arrays(data, metadata=np.frombuffer(b"[1, 2]", np.uint8))

    with pytest.raises(ModelFormatError):
        RecurrentBPR.from_bytes(damaged, SMALL)


def test_from_bytes_rejects_array_dtype():
    data = _trained_model()[0].to_bytes()
    damaged = _replace_arrays(data, item_count=np.full(16, 0.5))

    with pytest.raises(ModelFormatError, match="item_count"):
        RecurrentBPR.from_bytes(damaged, SMALL)


def test_from_bytes_rejects_meta_beyond_capacity():
    # kernels.rank_item loops over the items below meta[1] without bounds checks,
    # so a value above the capacity would make it read past the end of item_count.
    data = _trained_model()[0].to_bytes()
    damaged = _replace_arrays(data, meta=np.array([5, 100], dtype=np.int64))

    with pytest.raises(ModelFormatError, match="meta"):
        RecurrentBPR.from_bytes(damaged, SMALL)


@pytest.mark.parametrize("name", ["acc_u", "acc_v", "acc_bias"])
def test_from_bytes_rejects_negative_accumulator(name):
    data = _trained_model()[0].to_bytes()
    damaged_values = _read_arrays(data)[name].copy()
    damaged_values.flat[0] = -1.0
    damaged = _replace_arrays(data, **{name: damaged_values})

    with pytest.raises(ModelFormatError, match=name):
        RecurrentBPR.from_bytes(damaged, SMALL)


def test_from_bytes_rejects_non_finite_bias():
    data = _trained_model()[0].to_bytes()
    bias = _read_arrays(data)["bias"].copy()
    bias[3] = np.nan

    with pytest.raises(ModelFormatError, match="bias"):
        RecurrentBPR.from_bytes(_replace_arrays(data, bias=bias), SMALL)


def test_from_bytes_rejects_tied_model_with_different_x_and_v():
    data = _trained_model()[0].to_bytes()
    V = _read_arrays(data)["V"].copy()
    V[0, 0] += 1.0

    with pytest.raises(ModelFormatError, match="tied"):
        RecurrentBPR.from_bytes(_replace_arrays(data, V=V), SMALL)


def test_model_format_error_is_drnn_error():
    assert issubclass(ModelFormatError, DrnnError)
    assert issubclass(ModelFormatError, ValueError)


# Scoring.


def test_top_k_best_first():
    model, states = _trained_model()
    hidden = states.hidden[0]

    items, scores = model.top_k(hidden, 5)
    all_scores = model.scores(hidden)
    best = np.argsort(-all_scores, kind="stable")[:5]

    np.testing.assert_array_equal(items, best)
    np.testing.assert_array_equal(scores, all_scores[best])
    assert np.all(np.diff(scores) <= 0.0)


def test_top_k_only_known_items():
    model, states = _trained_model(n_items=8)

    items, _ = model.top_k(states.hidden[1], 100)

    assert items.shape == (model.known_items,)
    assert np.all(model.stats.item_count[items] > 0)


def test_top_k_zero_is_empty():
    model, states = _trained_model()

    items, scores = model.top_k(states.hidden[0], 0)

    assert items.shape == (0,)
    assert scores.shape == (0,)


def test_top_k_untrained_model_is_empty():
    model = RecurrentBPR(SMALL)

    items, _ = model.top_k(np.zeros(SMALL.hidden_size, np.float32), 3)

    assert items.shape == (0,)


def test_scores_unknown_items_are_negative_infinity():
    model, states = _trained_model(n_items=8)

    scores = model.scores(states.hidden[0])

    unknown = model.stats.item_count == 0
    assert np.all(np.isneginf(scores[unknown]))
    assert np.all(np.isfinite(scores[~unknown]))


# Configuration.

CONFIG_ERROR_CASES = [
    ("hidden_size", 0, "from 1 to 4096"),
    ("hidden_size", 4097, "from 1 to 4096"),
    ("hidden_size", 8.0, "from 1 to 4096"),
    ("hidden_size", True, "from 1 to 4096"),
    ("window", 0, "from 1 to 64"),
    ("window", 65, "from 1 to 64"),
    ("learning_rate", 0.0, "> 0"),
    ("learning_rate", -0.1, "> 0"),
    ("learning_rate", math.nan, "> 0"),
    ("learning_rate", math.inf, "> 0"),
    ("learning_rate", "0.1", "> 0"),
    ("l2", -1e-9, ">= 0"),
    ("max_grad_norm", 0.0, "> 0"),
    ("sampler", "pop", "uniform, popularity"),
    ("popularity_alpha", -0.1, "[0, 2]"),
    ("popularity_alpha", 2.5, "[0, 2]"),
    ("init_scale", 0.0, "(0, 10]"),
    ("init_scale", 11.0, "(0, 10]"),
    ("initial_items", 0, f"from 1 to {1 << 30}"),
    ("seed", -1, f"from 0 to {(1 << 63) - 1}"),
    ("negatives", 0, "from 1 to 256"),
    ("negatives", 257, "from 1 to 256"),
    ("negative_mode", "max", "sum, hardest"),
    ("optimizer", "adam", "sgd, adagrad"),
    ("item_bias", 1, "true or false"),
    ("tie_embeddings", "yes", "true or false"),
    ("recurrent_learning_rate_scale", -0.5, "[0, 100]"),
    ("recurrent_learning_rate_scale", math.inf, "[0, 100]"),
    ("adagrad_initial_accumulator", -1e-3, "[0, 1e+06]"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), CONFIG_ERROR_CASES,
                         ids=[f"{field}={value!r}" for field, value, _ in CONFIG_ERROR_CASES])
def test_model_config_rejects_bad_value(field, value, allowed):
    with pytest.raises(ConfigError) as error:
        ModelConfig(**{field: value})

    assert f"{field}=" in str(error.value)
    assert allowed in str(error.value)


CONFIG_BOUNDARY_CASES = [
    ("hidden_size", 1), ("hidden_size", 4096), ("window", 1), ("window", 64),
    ("l2", 0.0), ("popularity_alpha", 0.0), ("popularity_alpha", 2.0), ("init_scale", 10.0),
    ("initial_items", 1), ("seed", 0), ("seed", (1 << 63) - 1), ("sampler", "popularity"),
    ("negatives", 1), ("negatives", 256), ("negative_mode", "hardest"), ("optimizer", "sgd"),
    ("item_bias", False), ("tie_embeddings", False), ("recurrent_learning_rate_scale", 0.0),
    ("adagrad_initial_accumulator", 0.0),
]


@pytest.mark.parametrize(("field", "value"), CONFIG_BOUNDARY_CASES,
                         ids=[f"{field}={value!r}" for field, value in CONFIG_BOUNDARY_CASES])
def test_model_config_accepts_boundary(field, value):
    config = ModelConfig(**{field: value})

    assert getattr(config, field) == value


def test_model_config_is_frozen():
    config = ModelConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.window = 5


def test_config_error_is_drnn_error():
    assert issubclass(ConfigError, DrnnError)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("learning_rate", [1e3, 1e15, 1e38])
def test_model_absurd_learning_rate_keeps_states_finite(learning_rate):
    rng = np.random.default_rng(11)
    model = RecurrentBPR(ModelConfig(hidden_size=8, window=3, learning_rate=learning_rate, initial_items=16))
    states = UserStateBatch.empty(20, 8, 3)
    slots = rng.integers(0, 20, size=2000).astype(np.int32)
    items = rng.integers(0, 40, size=2000).astype(np.int32)

    result = model.train_batch(states, slots, items, np.zeros(2000, np.int32), np.arange(2000, dtype=np.int64))

    for name in PARAM_NAMES:
        assert np.isfinite(getattr(model, name)).all(), name
    assert np.isfinite(states.hidden).all()
    assert np.isfinite(states.start_hidden).all()
    if learning_rate >= 1e15:
        assert result.count(kernels.STATUS_NON_FINITE) > 0


# Sampled evaluation.


def _ranked(result):
    return result.rank != kernels.RANK_NOT_EVALUATED


def test_in_evaluation_sample_every_one_ranks_all():
    assert all(kernels.in_evaluation_sample(0, offset, 1) for offset in range(100))


def test_in_evaluation_sample_zero_ranks_none():
    assert not any(kernels.in_evaluation_sample(0, offset, 0) for offset in range(100))


@pytest.mark.parametrize("every", [2, 10, 100])
def test_in_evaluation_sample_rate(every):
    events = 200_000
    chosen = sum(kernels.in_evaluation_sample(offset % 4, offset, every) for offset in range(events))
    expected = events / every

    # Binomial standard deviation is below sqrt(expected); allow 5 of them.
    assert abs(chosen - expected) < 5 * math.sqrt(expected)


def test_model_train_batch_sampled_ranks_only_sampled_events():
    model = RecurrentBPR(SMALL)
    slots, items, partitions, offsets = _events(3, n_events=400)
    expected = np.array([kernels.in_evaluation_sample(int(p), int(o), 7) for p, o in zip(partitions, offsets)])

    result = model.train_batch(UserStateBatch.empty(N_USERS, 4, 3), slots, items, partitions, offsets, sample_every=7)

    np.testing.assert_array_equal(_ranked(result), expected)


def test_model_train_batch_sampled_trains_every_event():
    slots, items, partitions, offsets = _events(3, n_events=400)
    full, sampled = RecurrentBPR(SMALL), RecurrentBPR(SMALL)

    full.train_batch(UserStateBatch.empty(N_USERS, 4, 3), slots, items, partitions, offsets)
    sampled.train_batch(UserStateBatch.empty(N_USERS, 4, 3), slots, items, partitions, offsets, sample_every=7)

    _assert_same_params(full, sampled)


def test_model_train_batch_rejects_sample_every_zero():
    model = RecurrentBPR(SMALL)

    with pytest.raises(ConfigError, match="sample_every"):
        model.train_batch(UserStateBatch.empty(N_USERS, 4, 3), *_events(3, n_events=4), sample_every=0)
