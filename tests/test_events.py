"""Tests of decode_event and encode_event: every rejection reason, fuzzing and round trips."""

import json
import math
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drnn_core.errors import DrnnError
from streamer.events import (
    DecodeLimits,
    Event,
    InvalidEventError,
    InvalidReason,
    decode_event,
    encode_event,
)

R = InvalidReason

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.text(st.characters(categories=["Cs", "Zs", "Lo"]), max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

valid_ids = st.one_of(
    st.text(min_size=1, max_size=40).filter(lambda text: not text.isspace()),
    st.integers(min_value=-(10**60), max_value=10**60),
)

valid_ts = st.one_of(
    st.none(),
    st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=2**53),
)


def _value(**fields) -> bytes:
    return json.dumps(fields).encode()


DEFAULT_LIMITS = DecodeLimits()


def _reason_of(value, key=None, limits=DEFAULT_LIMITS) -> InvalidReason:
    with pytest.raises(InvalidEventError) as caught:
        decode_event(value, key, limits)
    return caught.value.reason


REASON_CASES = [
    (R.TOO_LARGE, b"{" + b" " * 70000 + b"}", None),
    (R.EMPTY, None, None),
    (R.EMPTY, b"", None),
    (R.NOT_UTF8, b'{"user_id": "\xff", "item_id": "a"}', None),
    (R.NOT_JSON, b'{"user_id": 1,', None),
    (R.NOT_JSON, b"[" * 50000, None),
    (R.NOT_JSON, b'{"user_id": ' + b"9" * 5000 + b', "item_id": 1}', None),
    (R.NOT_JSON, b"\xef\xbb\xbf" + _value(user_id=1, item_id=2), None),
    (R.NOT_OBJECT, b"[1, 2]", None),
    (R.NOT_OBJECT, b'"u1"', None),
    (R.MISSING_USER_ID, _value(item_id="a"), None),
    (R.MISSING_ITEM_ID, _value(user_id="u"), None),
    (R.INVALID_USER_ID, _value(user_id=True, item_id="a"), None),
    (R.INVALID_USER_ID, _value(user_id=1.0, item_id="a"), None),
    (R.INVALID_USER_ID, _value(user_id=None, item_id="a"), None),
    (R.INVALID_USER_ID, _value(user_id=["u"], item_id="a"), None),
    (R.INVALID_USER_ID, b'{"user_id": "\\ud800", "item_id": "a"}', None),
    (R.INVALID_ITEM_ID, _value(user_id="u", item_id={"id": 1}), None),
    (R.INVALID_ITEM_ID, _value(user_id="u", item_id=False), None),
    (R.EMPTY_ID, _value(user_id="", item_id="a"), None),
    (R.EMPTY_ID, _value(user_id="u", item_id=" \t\n"), None),
    (R.ID_TOO_LONG, _value(user_id="u" * 257, item_id="a"), None),
    (R.ID_TOO_LONG, _value(user_id="u", item_id=10**300), None),
    (R.INVALID_TS, _value(user_id="u", item_id="a", ts="1600000000"), None),
    (R.INVALID_TS, _value(user_id="u", item_id="a", ts=None), None),
    (R.INVALID_TS, _value(user_id="u", item_id="a", ts=True), None),
    (R.INVALID_TS, _value(user_id="u", item_id="a", ts=[1]), None),
    (R.NON_FINITE_TS, b'{"user_id": "u", "item_id": "a", "ts": NaN}', None),
    (R.NON_FINITE_TS, b'{"user_id": "u", "item_id": "a", "ts": Infinity}', None),
    (R.NON_FINITE_TS, b'{"user_id": "u", "item_id": "a", "ts": -Infinity}', None),
    (R.NON_FINITE_TS, b'{"user_id": "u", "item_id": "a", "ts": 1e999}', None),
    (R.NON_FINITE_TS, b'{"user_id": "u", "item_id": "a", "ts": 1' + b"0" * 400 + b"}", None),
    (R.NEGATIVE_TS, _value(user_id="u", item_id="a", ts=-1), None),
    (R.NEGATIVE_TS, _value(user_id="u", item_id="a", ts=-0.5), None),
    (R.KEY_MISMATCH, _value(user_id="u1", item_id="a"), b"u2"),
    (R.KEY_MISMATCH, _value(user_id=42, item_id="a"), b"042"),
    (R.KEY_MISMATCH, _value(user_id="u1", item_id="a"), b""),
]
KEYED_REASON_CASES = [
    (R.MISSING_KEY, _value(user_id="u1", item_id="a"), None),
]


@pytest.mark.parametrize(
    ("reason", "value", "key"),
    REASON_CASES,
    ids=[f"{reason.value}-{index}" for index, (reason, _, _) in enumerate(REASON_CASES)],
)
def test_decode_event_rejects_with_reason(reason, value, key):
    assert _reason_of(value, key) == reason


@pytest.mark.parametrize(("reason", "value", "key"), KEYED_REASON_CASES)
def test_decode_event_requires_key_when_asked(reason, value, key):
    assert _reason_of(value, key, DecodeLimits(require_key=True)) == reason


def test_decode_event_accepts_keyless_by_default():
    assert decode_event(_value(user_id="u1", item_id="a"), None).user_id == "u1"


def test_decode_event_cases_cover_every_reason():
    covered = {reason for reason, _, _ in REASON_CASES + KEYED_REASON_CASES}

    assert covered == set(InvalidReason)


def test_invalid_reason_values_snake_case():
    for reason in InvalidReason:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", reason.value), reason
        assert reason.value == reason.name.lower(), reason


def test_decode_event_checks_size_before_utf8():
    limits = DecodeLimits(max_message_bytes=16)

    assert _reason_of(b"\xff" * 17, None, limits) == R.TOO_LARGE


def test_decode_event_accepts_value_at_size_limit():
    value = _value(user_id="u", item_id="a")
    limits = DecodeLimits(max_message_bytes=len(value))

    assert decode_event(value, None, limits) == Event("u", "a", None)


def test_decode_event_deep_nesting_not_json():
    limits = DecodeLimits(max_message_bytes=1 << 20)

    assert _reason_of(b"[" * 500_000, None, limits) == R.NOT_JSON


def test_decode_event_honours_max_id_length():
    limits = DecodeLimits(max_id_length=3)

    assert decode_event(_value(user_id="abc", item_id=123), None, limits) == Event(
        "abc", "123", None
    )
    assert _reason_of(_value(user_id="abcd", item_id="a"), None, limits) == R.ID_TOO_LONG
    assert _reason_of(_value(user_id="a", item_id=1234), None, limits) == R.ID_TOO_LONG


def test_decode_event_canonicalises_integer_ids():
    from_int = decode_event(_value(user_id=42, item_id=-7), b"42")
    from_text = decode_event(_value(user_id="42", item_id="-7"), b"42")

    assert from_int == from_text
    assert from_int == Event("42", "-7", None)


def test_decode_event_keeps_string_ids_unstripped():
    event = decode_event(_value(user_id=" u1 ", item_id="é\u0000x"), b" u1 ")

    assert event.user_id == " u1 "
    assert event.item_id == "é\u0000x"


def test_decode_event_ignores_extra_fields():
    value = _value(user_id="u", item_id="a", ts=5, rating=4.5, nested={"a": [1]})

    assert decode_event(value, None) == Event("u", "a", 5.0)


def test_decode_event_returns_ts_as_float():
    event = decode_event(_value(user_id="u", item_id="a", ts=1600000000), None)

    assert event.ts == 1600000000.0
    assert type(event.ts) is float


def test_decode_event_accepts_zero_ts():
    assert decode_event(_value(user_id="u", item_id="a", ts=0), None).ts == 0.0


def test_decode_event_accepts_missing_key():
    assert decode_event(_value(user_id="u", item_id="a"), None) == Event("u", "a", None)


def test_decode_event_compares_key_as_utf8():
    assert decode_event(_value(user_id="ü", item_id="a"), "ü".encode()).user_id == "ü"


def test_decode_event_accepts_surrounding_whitespace():
    assert decode_event(b' \n{"user_id":"u","item_id":"a"}\r\n', b"u") == Event("u", "a", None)


def test_invalid_event_error_detail_truncates_value():
    with pytest.raises(InvalidEventError) as caught:
        decode_event(_value(user_id="x" * 300, item_id="a"), None)

    assert len(caught.value.detail) < 200
    assert "user_id" in caught.value.detail
    assert "max_id_length=256" in caught.value.detail


def test_invalid_event_error_detail_names_value():
    with pytest.raises(InvalidEventError) as caught:
        decode_event(_value(user_id="u", item_id="a", ts="yesterday"), None)

    assert '"yesterday"' in caught.value.detail
    assert "invalid_ts" in str(caught.value)


def test_invalid_event_error_derives_from_drnn_error():
    with pytest.raises(DrnnError):
        decode_event(b"", None)


def test_invalid_event_error_survives_pickle():
    error = InvalidEventError(R.NOT_JSON, "value is not valid JSON")

    restored = pickle.loads(pickle.dumps(error))

    assert restored.reason == R.NOT_JSON
    assert restored.detail == error.detail
    assert str(restored) == str(error)


def test_encode_event_writes_compact_json():
    key, value = encode_event("u1", 7, 1.5)

    assert key == b"u1"
    assert value == b'{"user_id":"u1","item_id":7,"ts":1.5}'


def test_encode_event_omits_missing_ts():
    assert encode_event(42, "a")[1] == b'{"user_id":42,"item_id":"a"}'


def test_encode_event_keys_integer_user_by_digits():
    assert encode_event(42, "a")[0] == b"42"


def test_encode_event_writes_non_ascii_as_utf8():
    assert encode_event("ü", '"\\')[1] == '{"user_id":"ü","item_id":"\\"\\\\"}'.encode()


@pytest.mark.parametrize(
    ("user_id", "item_id", "ts", "reason"),
    [
        (True, "a", None, R.INVALID_USER_ID),
        ("u", 1.5, None, R.INVALID_ITEM_ID),
        ("", "a", None, R.EMPTY_ID),
        ("u", "a" * 257, None, R.ID_TOO_LONG),
        ("u", 10**5000, None, R.ID_TOO_LONG),
        ("\ud800", "a", None, R.INVALID_USER_ID),
        ("u", "a", math.nan, R.NON_FINITE_TS),
        ("u", "a", -1, R.NEGATIVE_TS),
        ("u", "a", "5", R.INVALID_TS),
    ],
    ids=[
        "bool-user",
        "float-item",
        "empty-user",
        "long-item",
        "huge-int-item",
        "surrogate-user",
        "nan-ts",
        "negative-ts",
        "string-ts",
    ],
)
def test_encode_event_rejects_invalid_arguments(user_id, item_id, ts, reason):
    with pytest.raises(InvalidEventError) as caught:
        encode_event(user_id, item_id, ts)

    assert caught.value.reason == reason


def test_encode_event_rejects_value_over_size_limit():
    with pytest.raises(InvalidEventError) as caught:
        encode_event("u", "a", limits=DecodeLimits(max_message_bytes=10))

    assert caught.value.reason == R.TOO_LARGE


@given(
    value=st.one_of(st.none(), st.binary(max_size=300)),
    key=st.one_of(st.none(), st.binary(max_size=8)),
)
def test_decode_event_fuzz_bytes(value, key):
    try:
        event = decode_event(value, key)
    except InvalidEventError as error:
        assert isinstance(error.reason, InvalidReason)
    else:
        assert isinstance(event, Event)


@given(document=json_values)
def test_decode_event_fuzz_json(document):
    value = json.dumps(document).encode()

    try:
        decode_event(value, None)
    except InvalidEventError as error:
        assert isinstance(error.reason, InvalidReason)


@given(
    user_id=json_values,
    item_id=json_values,
    ts=json_values,
    has_ts=st.booleans(),
    key=st.one_of(st.none(), st.binary(max_size=8), st.text(max_size=8).map(str.encode)),
)
def test_decode_event_fuzz_fields(user_id, item_id, ts, has_ts, key):
    fields = {"user_id": user_id, "item_id": item_id}
    if has_ts:
        fields["ts"] = ts
    value = json.dumps(fields).encode()

    try:
        event = decode_event(value, key)
    except InvalidEventError as error:
        assert isinstance(error.reason, InvalidReason)
    else:
        assert isinstance(event.user_id, str)
        assert isinstance(event.item_id, str)
        assert event.ts is None or (math.isfinite(event.ts) and event.ts >= 0.0)


@given(user_id=json_values, item_id=json_values, ts=json_values)
def test_encode_event_fuzz_arguments(user_id, item_id, ts):
    try:
        key, value = encode_event(user_id, item_id, ts)
    except InvalidEventError as error:
        assert isinstance(error.reason, InvalidReason)
    else:
        assert decode_event(value, key).user_id == key.decode()


@given(user_id=valid_ids, item_id=valid_ids, ts=valid_ts)
def test_encode_event_round_trips_through_decode(user_id, item_id, ts):
    key, value = encode_event(user_id, item_id, ts)

    event = decode_event(value, key)

    assert event == Event(str(user_id), str(item_id), None if ts is None else float(ts))


@settings(max_examples=50)
@given(user_id=st.integers(min_value=-(10**60), max_value=10**60))
def test_decode_event_int_string_same_user(user_id):
    from_int = decode_event(_value(user_id=user_id, item_id="a"), None)
    from_text = decode_event(_value(user_id=str(user_id), item_id="a"), None)

    assert from_int.user_id == from_text.user_id
