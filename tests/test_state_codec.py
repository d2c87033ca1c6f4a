"""Tests of the user-state blob codec: layout, round trips, corruption detection and vectorised decoding."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from drnn_core.state import NO_ITEM, NO_OFFSET, NO_PARTITION, UserStateBatch
from streamer import state_codec
from streamer.state_codec import (
    STATE_FORMAT_VERSION,
    StateFormatError,
    decode_states,
    encode_states,
    state_blob_problem,
    state_size_bytes,
)

HEADER = struct.Struct("<2sBBHHHqiq")
H = 3
K = 4

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
float16_range = st.floats(-state_codec.FLOAT16_MAX, state_codec.FLOAT16_MAX, width=32)


@st.composite
def state_batches(draw, max_size: int = 6, floats: st.SearchStrategy = finite_float32) -> UserStateBatch:
    """Draw a valid UserStateBatch with random S, h and K, hidden states drawn from ``floats``."""
    size = draw(st.integers(0, max_size))
    hidden_size = draw(st.integers(1, 12))
    window = draw(st.integers(1, 6))

    window_len = draw(hnp.arrays(np.int32, size, elements=st.integers(0, window)))
    items = draw(hnp.arrays(np.int32, (size, window), elements=st.integers(0, 2**31 - 1)))
    valid_entries = np.arange(window) < window_len[:, None]

    return UserStateBatch(
        hidden=draw(hnp.arrays(np.float32, (size, hidden_size), elements=floats)),
        start_hidden=draw(hnp.arrays(np.float32, (size, hidden_size), elements=floats)),
        window=np.where(valid_entries, items, NO_ITEM).astype(np.int32),
        window_len=window_len,
        count=draw(hnp.arrays(np.int64, size, elements=st.integers(0, 2**63 - 1))),
        last_partition=draw(hnp.arrays(np.int32, size, elements=st.integers(NO_PARTITION, 2**31 - 1))),
        last_offset=draw(hnp.arrays(np.int64, size, elements=st.integers(NO_OFFSET, 2**63 - 1))),
    )


def assert_batches_equal(actual: UserStateBatch, expected: UserStateBatch) -> None:
    for name, expected_column in zip(
        ("hidden", "start_hidden", "window", "window_len", "count", "last_partition", "last_offset"),
        expected.as_tuple(),
    ):
        actual_column = getattr(actual, name)
        assert actual_column.dtype == expected_column.dtype, name
        assert actual_column.shape == expected_column.shape, name
        assert np.array_equal(actual_column, expected_column), name


def assert_new_user_row(batch: UserStateBatch, row: int) -> None:
    new_user = UserStateBatch.empty(1, batch.hidden.shape[1], batch.window.shape[1])
    for name, column in zip(
        ("hidden", "start_hidden", "window", "window_len", "count", "last_partition", "last_offset"),
        new_user.as_tuple(),
    ):
        assert np.array_equal(getattr(batch, name)[row], column[0]), name


def sample_batch(size: int = 2) -> UserStateBatch:
    """A batch with h=3, K=4 whose rows have two valid window items."""
    batch = UserStateBatch.empty(size, H, K)
    batch.hidden[:] = np.arange(size * H, dtype=np.float32).reshape(size, H) / 7
    batch.start_hidden[:] = -batch.hidden
    batch.window[:, :2] = [5, 6]
    batch.window_len[:] = 2
    batch.count[:] = 9
    batch.last_partition[:] = 1
    batch.last_offset[:] = 41
    return batch


@given(batch=state_batches())
def test_state_codec_round_trip(batch: UserStateBatch) -> None:
    hidden_size, window = batch.hidden.shape[1], batch.window.shape[1]

    blobs = encode_states(batch)
    decoded, corrupt = decode_states(blobs, hidden_size, window)

    assert len(blobs) == batch.size
    assert all(len(blob) == state_size_bytes(hidden_size, window) for blob in blobs)
    assert not corrupt.any()
    assert_batches_equal(decoded, batch)


@given(
    batch=state_batches().filter(lambda batch: batch.size > 0),
    data=st.data(),
)
def test_state_codec_nonfinite_float_is_corrupt(batch: UserStateBatch, data: st.DataObject) -> None:
    hidden_size, window = batch.hidden.shape[1], batch.window.shape[1]
    row = data.draw(st.integers(0, batch.size - 1))
    column = data.draw(st.integers(0, hidden_size - 1))
    field = data.draw(st.sampled_from(["hidden", "start_hidden"]))
    value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    expected = UserStateBatch(*(column_array.copy() for column_array in batch.as_tuple()))
    expected.reset_rows(np.array([row]))
    getattr(batch, field)[row, column] = value

    decoded, corrupt = decode_states(encode_states(batch), hidden_size, window)

    assert np.flatnonzero(corrupt).tolist() == [row]
    assert_batches_equal(decoded, expected)


@settings(max_examples=200)
@given(
    batch=state_batches(max_size=3).filter(lambda batch: batch.size > 0),
    data=st.data(),
)
def test_state_codec_decode_agrees_with_blob_problem(batch: UserStateBatch, data: st.DataObject) -> None:
    hidden_size, window = batch.hidden.shape[1], batch.window.shape[1]
    blobs = [bytearray(blob) for blob in encode_states(batch)]
    for blob in blobs:
        for _ in range(data.draw(st.integers(0, 3))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blobs = [bytes(blob) for blob in blobs]

    _decoded, corrupt = decode_states(blobs, hidden_size, window)

    problems = [state_blob_problem(blob, hidden_size, window) is not None for blob in blobs]
    assert corrupt.tolist() == problems


def test_state_codec_header_layout() -> None:
    batch = sample_batch(1)

    blob = encode_states(batch)[0]

    assert len(blob) == 30 + 8 * H + 4 * K
    assert HEADER.unpack_from(blob) == (b"DS", STATE_FORMAT_VERSION, 0, H, K, 2, 9, 1, 41)
    assert np.array_equal(np.frombuffer(blob, "<f4", H, 30), batch.hidden[0])
    assert np.array_equal(np.frombuffer(blob, "<f4", H, 30 + 4 * H), batch.start_hidden[0])
    assert np.array_equal(np.frombuffer(blob, "<i4", K, 30 + 8 * H), batch.window[0])


def test_state_size_bytes_values() -> None:
    assert state_size_bytes(1, 1) == 42
    assert state_size_bytes(64, 4) == 30 + 512 + 16


@pytest.mark.parametrize("hidden_size, window", [(0, 4), (64, 0), (70000, 4), (64, 70000), (2.0, 4)])
def test_state_size_bytes_invalid_dimensions(hidden_size, window) -> None:
    with pytest.raises(StateFormatError):
        state_size_bytes(hidden_size, window)


def test_state_codec_missing_blob_is_new_user() -> None:
    blobs = encode_states(sample_batch(1))

    decoded, corrupt = decode_states([None, blobs[0], None], H, K)

    assert corrupt.tolist() == [False, False, False]
    assert_new_user_row(decoded, 0)
    assert_new_user_row(decoded, 2)
    assert decoded.count[1] == 9


def test_state_codec_empty_input() -> None:
    decoded, corrupt = decode_states([], H, K)

    assert decoded.size == 0
    assert decoded.hidden.shape == (0, H)
    assert corrupt.shape == (0,)
    assert encode_states(UserStateBatch.empty(0, H, K)) == []


def test_state_codec_encode_rows_subset() -> None:
    batch = sample_batch(3)
    batch.count[:] = [10, 11, 12]

    by_index = encode_states(batch, np.array([2, 0]))
    by_mask = encode_states(batch, np.array([False, True, True]))

    assert decode_states(by_index, H, K)[0].count.tolist() == [12, 10]
    assert decode_states(by_mask, H, K)[0].count.tolist() == [11, 12]


@pytest.mark.parametrize("rows", [np.array([3]), np.array([-1]), np.array([True]), np.array([0.5])])
def test_state_codec_encode_invalid_rows(rows) -> None:
    with pytest.raises(StateFormatError):
        encode_states(sample_batch(3), rows)


@pytest.mark.parametrize("window_len", [-1, K + 1])
def test_state_codec_encode_window_len_out_of_range(window_len: int) -> None:
    batch = sample_batch(2)
    batch.window_len[1] = window_len

    with pytest.raises(StateFormatError, match="window_len"):
        encode_states(batch)


def test_state_codec_encode_mismatched_columns() -> None:
    batch = sample_batch(2)
    batch.start_hidden = np.zeros((2, H + 1), dtype=np.float32)

    with pytest.raises(StateFormatError, match="start_hidden"):
        encode_states(batch)


def test_state_codec_clears_stale_window_items() -> None:
    blob = bytearray(encode_states(sample_batch(1))[0])
    struct.pack_into("<i", blob, 30 + 8 * H + 4 * 3, 77)

    decoded, corrupt = decode_states([bytes(blob)], H, K)

    assert not corrupt[0]
    assert decoded.window[0].tolist() == [5, 6, NO_ITEM, NO_ITEM]


def _patch(offset: int, fmt: str, value):
    def mutate(blob: bytearray) -> bytes:
        struct.pack_into(fmt, blob, offset, value)
        return bytes(blob)

    return mutate


CORRUPTIONS = {
    "magic": (_patch(0, "2s", b"XS"), "magic"),
    "version": (_patch(2, "B", STATE_FORMAT_VERSION + 1), "format version"),
    "float16 dtype code": (_patch(3, "B", 1), "dtype code"),
    "hidden size": (_patch(4, "<H", H + 1), "h is not"),
    "window size": (_patch(6, "<H", K - 1), "K is not"),
    "window_len above K": (_patch(8, "<H", K + 1), "window_len"),
    "negative valid item": (_patch(30 + 8 * H + 4, "<i", -5), "item is negative"),
    "negative count": (_patch(10, "<q", -1), "count"),
    "partition below -1": (_patch(18, "<i", -2), "last_partition"),
    "offset below -1": (_patch(22, "<q", -2), "last_offset"),
    "NaN hidden": (_patch(30, "<f", float("nan")), "hidden contains"),
    "infinite start_hidden": (_patch(30 + 4 * H, "<f", float("-inf")), "start_hidden contains"),
    "truncated": (lambda blob: bytes(blob[:-1]), "length"),
    "extra byte": (lambda blob: bytes(blob) + b"\0", "length"),
    "shorter than header": (lambda blob: bytes(blob[:10]), "header"),
    "empty": (lambda blob: b"", "length"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_state_codec_corruption_detected(kind: str) -> None:
    mutate, reason = CORRUPTIONS[kind]
    valid, target = encode_states(sample_batch(2))
    corrupted = mutate(bytearray(target))

    decoded, corrupt = decode_states([valid, corrupted, None], H, K)

    assert corrupt.tolist() == [False, True, False]
    assert_new_user_row(decoded, 1)
    assert decoded.count[0] == 9
    assert reason in state_blob_problem(corrupted, H, K)


def test_state_codec_other_dimensions_are_corrupt() -> None:
    other = UserStateBatch.empty(1, H + 2, K)

    _decoded, corrupt = decode_states(encode_states(other), H, K)

    assert corrupt.tolist() == [True]
    assert "h=5" in state_blob_problem(encode_states(other)[0], H, K)


def test_state_blob_problem_valid_blob() -> None:
    assert state_blob_problem(encode_states(sample_batch(1))[0], H, K) is None


def test_state_codec_decode_many_is_vectorised(monkeypatch: pytest.MonkeyPatch) -> None:
    size = 20_000
    rng = np.random.default_rng(7)
    batch = UserStateBatch.empty(size, 16, 4)
    batch.hidden[:] = rng.standard_normal((size, 16), dtype=np.float32)
    batch.window_len[:] = rng.integers(0, 5, size)
    batch.window[:] = np.where(np.arange(4) < batch.window_len[:, None], rng.integers(0, 1000, (size, 4)), NO_ITEM)
    batch.count[:] = np.arange(size)
    blobs: list[bytes | None] = encode_states(batch)
    blobs[10] = None
    blobs[11] = blobs[11][:-3]
    blobs[12] = b"XX" + blobs[12][2:]

    calls = []
    real_record_problems = state_codec._record_problems

    def counting_record_problems(records, *args):
        calls.append(records.size)
        return real_record_problems(records, *args)

    monkeypatch.setattr(state_codec, "_record_problems", counting_record_problems)
    decoded, corrupt = decode_states(blobs, 16, 4)

    assert calls == [size - 2]
    assert np.flatnonzero(corrupt).tolist() == [11, 12]
    keep = np.setdiff1d(np.arange(size), [10, 11, 12])
    assert np.array_equal(decoded.hidden[keep], batch.hidden[keep])
    assert np.array_equal(decoded.window[keep], batch.window[keep])
    assert np.array_equal(decoded.count[keep], batch.count[keep])
    assert decoded.count[[10, 11, 12]].tolist() == [0, 0, 0]


def rounded_to_float16(batch: UserStateBatch) -> UserStateBatch:
    """Return a copy of ``batch`` whose hidden states are rounded to float16 and widened back to float32."""
    rounded = UserStateBatch(*(column.copy() for column in batch.as_tuple()))
    rounded.hidden[:] = batch.hidden.astype(np.float16)
    rounded.start_hidden[:] = batch.start_hidden.astype(np.float16)
    return rounded


@given(batch=state_batches(floats=float16_range))
def test_state_codec_float16_round_trip(batch: UserStateBatch) -> None:
    hidden_size, window = batch.hidden.shape[1], batch.window.shape[1]

    blobs = encode_states(batch, state_dtype="float16")
    decoded, corrupt = decode_states(blobs, hidden_size, window)

    assert all(len(blob) == state_size_bytes(hidden_size, window, "float16") for blob in blobs)
    assert not corrupt.any()
    assert_batches_equal(decoded, rounded_to_float16(batch))


@given(batch=state_batches(floats=float16_range))
def test_state_codec_float16_within_tolerance(batch: UserStateBatch) -> None:
    hidden_size, window = batch.hidden.shape[1], batch.window.shape[1]

    decoded, _corrupt = decode_states(encode_states(batch, state_dtype="float16"), hidden_size, window)

    for name in ("hidden", "start_hidden"):
        original = getattr(batch, name).astype(np.float64)
        error = np.abs(getattr(decoded, name).astype(np.float64) - original)
        # Round to nearest float16: half a unit in the last place, 2**-11 relative
        # for normal values and 2**-25 absolute for subnormal ones.
        bound = np.maximum(np.abs(original) * 2.0**-11, 2.0**-25)
        assert (error <= bound).all(), name


def test_state_codec_float16_error_in_unit_interval() -> None:
    rng = np.random.default_rng(3)
    batch = sample_batch(1000)
    batch.hidden = rng.uniform(0.0, 1.0, (1000, H)).astype(np.float32)
    batch.start_hidden = rng.uniform(0.0, 1.0, (1000, H)).astype(np.float32)

    decoded, _corrupt = decode_states(encode_states(batch, state_dtype="float16"), H, K)

    assert np.abs(decoded.hidden - batch.hidden).max() <= 2.0**-12
    assert np.abs(decoded.start_hidden - batch.start_hidden).max() <= 2.0**-12


def test_state_size_bytes_float16_values() -> None:
    assert state_size_bytes(1, 1, "float16") == 38
    assert state_size_bytes(64, 4, "float16") == 30 + 256 + 16
    assert state_size_bytes(64, 4, "float32") == state_size_bytes(64, 4)


@pytest.mark.parametrize("state_dtype", ["float64", "f2", None])
def test_state_codec_invalid_state_dtype(state_dtype) -> None:
    with pytest.raises(StateFormatError, match="state_dtype"):
        state_size_bytes(H, K, state_dtype)
    with pytest.raises(StateFormatError, match="state_dtype"):
        encode_states(sample_batch(1), state_dtype=state_dtype)


def test_state_codec_float16_header_layout() -> None:
    batch = sample_batch(1)

    blob = encode_states(batch, state_dtype="float16")[0]

    assert len(blob) == 30 + 4 * H + 4 * K
    assert HEADER.unpack_from(blob) == (b"DS", STATE_FORMAT_VERSION, 1, H, K, 2, 9, 1, 41)
    assert np.array_equal(np.frombuffer(blob, "<f2", H, 30), batch.hidden[0].astype(np.float16))
    assert np.array_equal(np.frombuffer(blob, "<f2", H, 30 + 2 * H), batch.start_hidden[0].astype(np.float16))
    assert np.array_equal(np.frombuffer(blob, "<i4", K, 30 + 4 * H), batch.window[0])


def test_state_codec_mixed_dtypes_decode_in_one_call() -> None:
    batch = sample_batch(4)
    batch.count[:] = [10, 11, 12, 13]
    wide = encode_states(batch, state_dtype="float32")
    narrow = encode_states(batch, state_dtype="float16")

    decoded, corrupt = decode_states([narrow[0], wide[1], None, narrow[3], wide[2]], H, K)

    assert corrupt.tolist() == [False] * 5
    assert decoded.count.tolist() == [10, 11, 0, 13, 12]
    assert np.array_equal(decoded.hidden[[0, 3]], rounded_to_float16(batch).hidden[[0, 3]])
    assert np.array_equal(decoded.hidden[[1, 4]], batch.hidden[[1, 2]])
    assert decoded.hidden.dtype == np.float32
    assert_new_user_row(decoded, 2)


def test_state_codec_mixed_dtypes_vectorised_per_type(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = sample_batch(10)
    blobs = encode_states(batch, np.arange(6)) + encode_states(batch, np.arange(6, 10), state_dtype="float16")
    calls = []
    real_record_problems = state_codec._record_problems

    def counting_record_problems(records, *args):
        calls.append((records.size, records.dtype["hidden"].base))
        return real_record_problems(records, *args)

    monkeypatch.setattr(state_codec, "_record_problems", counting_record_problems)
    _decoded, corrupt = decode_states(blobs[::-1], H, K)

    assert sorted(calls, key=lambda call: call[0]) == [(4, np.dtype("<f2")), (6, np.dtype("<f4"))]
    assert not corrupt.any()


def test_state_codec_float16_overflow_raises() -> None:
    batch = sample_batch(3)
    batch.start_hidden[2, 1] = -70000.0

    with pytest.raises(StateFormatError, match=r"start_hidden of batch rows \[2\]"):
        encode_states(batch, state_dtype="float16")


def test_state_codec_float16_maximum_is_kept() -> None:
    batch = sample_batch(1)
    batch.hidden[0, 0] = state_codec.FLOAT16_MAX

    decoded, corrupt = decode_states(encode_states(batch, state_dtype="float16"), H, K)

    assert not corrupt[0]
    assert decoded.hidden[0, 0] == state_codec.FLOAT16_MAX


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_state_codec_float16_nonfinite_is_corrupt(value: float) -> None:
    batch = sample_batch(2)
    batch.hidden[1, 0] = value

    decoded, corrupt = decode_states(encode_states(batch, state_dtype="float16"), H, K)

    assert corrupt.tolist() == [False, True]
    assert_new_user_row(decoded, 1)


FLOAT16_CORRUPTIONS = {
    "float32 dtype code": (_patch(3, "B", 0), "dtype code is not 1"),
    "unknown dtype code": (_patch(3, "B", 7), "dtype code is not 1"),
    "hidden size": (_patch(4, "<H", H + 1), "h is not"),
    "NaN start_hidden": (_patch(30 + 2 * H, "<e", float("nan")), "start_hidden contains"),
    "negative valid item": (_patch(30 + 4 * H, "<i", -5), "item is negative"),
    "truncated": (lambda blob: bytes(blob[:-1]), "length"),
}


@pytest.mark.parametrize("kind", list(FLOAT16_CORRUPTIONS))
def test_state_codec_float16_corruption_detected(kind: str) -> None:
    mutate, reason = FLOAT16_CORRUPTIONS[kind]
    valid, target = encode_states(sample_batch(2), state_dtype="float16")
    corrupted = mutate(bytearray(target))

    decoded, corrupt = decode_states([valid, corrupted, None], H, K)

    assert corrupt.tolist() == [False, True, False]
    assert_new_user_row(decoded, 1)
    assert reason in state_blob_problem(corrupted, H, K)


def test_state_blob_problem_names_both_lengths() -> None:
    blob = encode_states(sample_batch(1))[0] + b"\0"

    problem = state_blob_problem(blob, H, K)

    assert f"{state_size_bytes(H, K)} (float32)" in problem
    assert f"{state_size_bytes(H, K, 'float16')} (float16)" in problem


def test_state_blob_problem_valid_float16_blob() -> None:
    assert state_blob_problem(encode_states(sample_batch(1), state_dtype="float16")[0], H, K) is None
