"""Decoding and encoding of the Kafka messages that carry one user-item interaction each."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from typing import NamedTuple

from drnn_core.errors import DrnnError

__all__ = [
    "DecodeLimits",
    "Event",
    "InvalidEventError",
    "InvalidReason",
    "decode_event",
    "encode_event",
]

PREVIEW_CHARS = 80

_ABSENT = object()
# The C function behind json.dumps(text, ensure_ascii=False). Formatting the two
# ids and ts with it takes about 0.3 us against 2.2 us for a reused JSONEncoder
# (timeit, Python 3.11), which matters when a million-row dataset is encoded.
_encode_json_string = json.encoder.encode_basestring
_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


class InvalidReason(str, enum.Enum):
    """Rejection reason of an invalid message, whose value is its Prometheus label value."""

    TOO_LARGE = "too_large"
    EMPTY = "empty"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    MISSING_USER_ID = "missing_user_id"
    MISSING_ITEM_ID = "missing_item_id"
    INVALID_USER_ID = "invalid_user_id"
    INVALID_ITEM_ID = "invalid_item_id"
    EMPTY_ID = "empty_id"
    ID_TOO_LONG = "id_too_long"
    INVALID_TS = "invalid_ts"
    NON_FINITE_TS = "non_finite_ts"
    NEGATIVE_TS = "negative_ts"
    KEY_MISMATCH = "key_mismatch"
    MISSING_KEY = "missing_key"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeLimits:
    """Size limits that a message must meet before it is decoded.

    Attributes
    ----------
    max_message_bytes : int
        Maximum length of a message value in bytes (default 65536).
    max_id_length : int
        Maximum length of a user or item id in characters, counted after an
        integer id is converted with ``str`` (default 256).
    require_key : bool
        Reject a message without a key as MISSING_KEY (default False). The
        worker sets it, because a keyless message may land in another
        partition than its user's other events, and the per-user
        (partition, offset) replay check only holds within one partition.
    """

    max_message_bytes: int = 65536
    max_id_length: int = 256
    require_key: bool = False


_DEFAULT_LIMITS = DecodeLimits()


class _IdField(NamedTuple):
    """The name of an id field and the reasons for its errors, looked up once at import."""

    name: str
    missing: InvalidReason
    invalid: InvalidReason


_USER_FIELD = _IdField("user_id", InvalidReason.MISSING_USER_ID, InvalidReason.INVALID_USER_ID)
_ITEM_FIELD = _IdField("item_id", InvalidReason.MISSING_ITEM_ID, InvalidReason.INVALID_ITEM_ID)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One valid interaction.

    Attributes
    ----------
    user_id : str
        Canonical user id: the integer 42 and the string "42" are the same user.
    item_id : str
        Canonical item id, by the same rule.
    ts : float or None
        Unix seconds, finite and non-negative, or None when the message has no "ts".
    """

    user_id: str
    item_id: str
    ts: float | None


class InvalidEventError(DrnnError):
    """A message that is not a valid event.

    Attributes
    ----------
    reason : InvalidReason
        The rule that the message broke, usable as a metric label.
    detail : str
        One sentence that names the bad value, shown at most PREVIEW_CHARS long.
    """

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        super().__init__(f"Invalid event ({reason.value}): {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return (type(self), (self.reason, self.detail))


def decode_event(
    value: bytes | None, key: bytes | None, limits: DecodeLimits = _DEFAULT_LIMITS
) -> Event:
    """Decode one message value into an Event, or raise InvalidEventError.

    The checks run in this order, and the first that fails gives the reason:

    1. EMPTY if the value is None (a tombstone), TOO_LARGE if it is longer than
       ``limits.max_message_bytes``, EMPTY if it is ``b""``. No byte is parsed
       before the size check.
    2. NOT_UTF8, then NOT_JSON (which includes nesting too deep for the parser
       and integers longer than Python's digit limit), then NOT_OBJECT.
    3. user_id: MISSING_USER_ID, INVALID_USER_ID (not a string or an integer,
       bool included), ID_TOO_LONG, EMPTY_ID (empty or whitespace-only), and
       INVALID_USER_ID again for a string with a lone surrogate, which UTF-8
       cannot encode.
    4. item_id: the same checks with MISSING_ITEM_ID and INVALID_ITEM_ID.
    5. ts, if the field is present: INVALID_TS (not an int or a float, null
       included), NON_FINITE_TS (NaN, infinities, and integers too large for a
       float), NEGATIVE_TS.
    6. KEY_MISMATCH if ``key`` is not None and differs from the UTF-8 bytes of
       the canonical user id. A key of ``b""`` counts as present.
       MISSING_KEY if ``key`` is None and ``limits.require_key`` is set.

    Integer ids become ``str(int)``. String ids are kept exactly, without
    stripping. Fields other than user_id, item_id and ts are ignored.

    Parameters
    ----------
    value : bytes or None
        The Kafka message value.
    key : bytes or None
        The Kafka message key, or None when the message has none.
    limits : DecodeLimits
        The size limits.

    Returns
    -------
    Event
        The decoded event, with ``ts`` as a float or None.

    Raises
    ------
    InvalidEventError
        With the reason of the first failed check and a detail naming the value.
    """
    document = _parse_object(value, limits)

    user_id = _canonical_id(document.get("user_id", _ABSENT), _USER_FIELD, limits)
    item_id = _canonical_id(document.get("item_id", _ABSENT), _ITEM_FIELD, limits)

    raw_ts = document.get("ts", _ABSENT)
    ts = None if raw_ts is _ABSENT else _checked_ts(raw_ts)

    if key is not None and key != user_id.encode("utf-8"):
        raise InvalidEventError(
            InvalidReason.KEY_MISMATCH,
            f"key {_preview_bytes(key)} differs from user_id {_preview(user_id)}",
        )
    if key is None and limits.require_key:
        raise InvalidEventError(
            InvalidReason.MISSING_KEY,
            f"message has no key; produce it with the user id {_preview(user_id)} as the key",
        )
    return Event(user_id, item_id, ts)


def encode_event(
    user_id: str | int,
    item_id: str | int,
    ts: float | int | None = None,
    *,
    limits: DecodeLimits = _DEFAULT_LIMITS,
) -> tuple[bytes, bytes]:
    """Encode one interaction as the (key, value) of a Kafka message.

    The value is compact JSON in UTF-8 with the ids as given (an integer id
    stays a JSON integer) and without "ts" when ``ts`` is None. The key is the
    UTF-8 bytes of the canonical user id. The arguments go through the checks
    of ``decode_event``, so every message this returns decodes to
    ``Event(canonical user_id, canonical item_id, float(ts) or None)``.

    Raises
    ------
    InvalidEventError
        If an id or ``ts`` breaks a rule of ``decode_event``, or the value is
        longer than ``limits.max_message_bytes``.
    """
    user_text = _canonical_id(user_id, _USER_FIELD, limits)
    item_text = _canonical_id(item_id, _ITEM_FIELD, limits)

    ids_json = (
        f'{{"user_id":{_id_json(user_id, user_text)},"item_id":{_id_json(item_id, item_text)}'
    )
    if ts is None:
        text = ids_json + "}"
    else:
        _checked_ts(ts)
        text = f'{ids_json},"ts":{_number_json(ts)}}}'
    value = text.encode("utf-8")

    if len(value) > limits.max_message_bytes:
        raise InvalidEventError(
            InvalidReason.TOO_LARGE,
            f"encoded value is {len(value)} bytes,"
            f" over max_message_bytes={limits.max_message_bytes}",
        )
    return user_text.encode("utf-8"), value


def _id_json(raw: str | int, text: str) -> str:
    """Return the JSON of a checked id, whose canonical string is ``text``."""
    if isinstance(raw, str):
        return _encode_json_string(raw)
    return text


def _number_json(ts: float | int) -> str:
    """Return the JSON of a checked ts, written as ``json.dumps`` writes it."""
    if isinstance(ts, int):
        return int.__repr__(ts)
    return float.__repr__(ts)


def _parse_object(value: bytes | None, limits: DecodeLimits) -> dict:
    """Run checks 1 and 2 of ``decode_event`` and return the JSON object."""
    if value is None:
        raise InvalidEventError(
            InvalidReason.EMPTY, "value is None (a tombstone), expected a JSON object"
        )
    if len(value) > limits.max_message_bytes:
        raise InvalidEventError(
            InvalidReason.TOO_LARGE,
            f"value is {len(value)} bytes, over max_message_bytes={limits.max_message_bytes}",
        )
    if not value:
        raise InvalidEventError(InvalidReason.EMPTY, "value is empty, expected a JSON object")

    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidEventError(
            InvalidReason.NOT_UTF8,
            f"value is not valid UTF-8 at byte {error.start}: {_preview_bytes(value)}",
        ) from None

    try:
        document = json.loads(text)
    except RecursionError:
        raise InvalidEventError(
            InvalidReason.NOT_JSON, "value nests JSON arrays or objects too deeply to parse"
        ) from None
    except ValueError as error:
        reason = _truncate(str(error))
        raise InvalidEventError(
            InvalidReason.NOT_JSON, f"value is not valid JSON ({reason}): {_preview(text)}"
        ) from None

    if not isinstance(document, dict):
        raise InvalidEventError(
            InvalidReason.NOT_OBJECT,
            f"value is {_kind(document)} in JSON, expected an object with user_id and item_id",
        )
    return document


def _canonical_id(raw: object, field: _IdField, limits: DecodeLimits) -> str:
    """Check one id and return it as a string. ``_ABSENT`` means that the field is missing."""
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, int) and not isinstance(raw, bool):
        text = _int_text(raw, field.name, limits)
    elif raw is _ABSENT:
        raise InvalidEventError(field.missing, f"object has no {field.name} field")
    else:
        raise InvalidEventError(
            field.invalid,
            f"{field.name} {_preview(raw)} is {_kind(raw)}, expected a string or an integer",
        )

    if len(text) > limits.max_id_length:
        raise InvalidEventError(
            InvalidReason.ID_TOO_LONG,
            f"{field.name} {_preview(text)} is {len(text)} characters,"
            f" over max_id_length={limits.max_id_length}",
        )
    if not text or text.isspace():
        raise InvalidEventError(
            InvalidReason.EMPTY_ID, f"{field.name} {_preview(text)} is empty or whitespace"
        )

    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEventError(
                field.invalid,
                f"{field.name} {_preview(text)} contains a lone surrogate that UTF-8 cannot encode",
            ) from None
    return text


def _int_text(raw: int, field: str, limits: DecodeLimits) -> str:
    """Return the decimal digits of ``raw``.

    int.__repr__ raises ValueError past sys.get_int_max_str_digits() digits
    (4300 by default since Python 3.11), which becomes ID_TOO_LONG.
    """
    try:
        return int.__repr__(raw)
    except ValueError:
        raise InvalidEventError(
            InvalidReason.ID_TOO_LONG,
            f"{field} is an integer of {raw.bit_length()} bits,"
            f" over max_id_length={limits.max_id_length}",
        ) from None


def _checked_ts(raw: object) -> float:
    """Check one "ts" value and return it as a float."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise InvalidEventError(
            InvalidReason.INVALID_TS, f"ts {_preview(raw)} is {_kind(raw)}, expected unix seconds"
        )

    try:
        ts = float(raw)
    except OverflowError:
        raise InvalidEventError(
            InvalidReason.NON_FINITE_TS, f"ts {_preview(raw)} is too large for a float"
        ) from None
    if not math.isfinite(ts):
        raise InvalidEventError(InvalidReason.NON_FINITE_TS, f"ts {_preview(raw)} is not finite")
    if ts < 0.0:
        raise InvalidEventError(InvalidReason.NEGATIVE_TS, f"ts {_preview(raw)} is negative")
    return ts


def _kind(value: object) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _preview(value: object) -> str:
    """Show a decoded JSON value in ASCII, at most PREVIEW_CHARS long.

    Arrays and objects are shown by their size only, because repr of a deeply
    nested value could itself exceed the recursion limit.
    """
    if isinstance(value, str):
        return _truncate(json.dumps(value[:PREVIEW_CHARS]))
    if isinstance(value, list):
        return f"(array of {len(value)} elements)"
    if isinstance(value, dict):
        return f"(object of {len(value)} fields)"
    if isinstance(value, (bool, float, type(None))):
        return json.dumps(value)
    if isinstance(value, int):
        try:
            return _truncate(str(value))
        except ValueError:
            return f"(integer of {value.bit_length()} bits)"
    return _truncate(repr(value))


def _preview_bytes(value: bytes) -> str:
    return _truncate(repr(bytes(value[:PREVIEW_CHARS])))


def _truncate(text: str) -> str:
    if len(text) <= PREVIEW_CHARS:
        return text
    return text[: PREVIEW_CHARS - 3] + "..."
