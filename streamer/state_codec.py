"""Binary, versioned encoding of per-user recurrent states, one blob per user.

Every blob is a packed little-endian record with no padding:

======  ==============  ======  ==============================================
offset  field           type    meaning
======  ==============  ======  ==============================================
0       magic           2 B     ``b"DS"``
2       version         u8      ``STATE_FORMAT_VERSION`` (1)
3       dtype code      u8      0 = float32, 1 = float16: the type F of
                                ``hidden`` and ``start_hidden``
4       h               u16     hidden size
6       K               u16     window size
8       window_len      u16     valid entries of ``window``, 0 to K
10      count           i64     events applied to the user
18      last_partition  i32     Kafka partition of the last event, or -1
22      last_offset     i64     Kafka offset of the last event, or -1
30      hidden          F[h]    hidden state after the last applied item
30+Bh   start_hidden    F[h]    hidden state before the oldest window item
30+2Bh  window          i32[K]  item indexes, oldest first
======  ==============  ======  ==============================================

B is the size of F in bytes, 4 for float32 and 2 for float16, so a blob is
``state_size_bytes(h, K, state_dtype) = 30 + 2*B*h + 4*K`` bytes long:
``30 + 8*h + 4*K`` for float32 and ``30 + 4*h + 4*K`` for float16.

float16 blobs round each float to the nearest float16, which keeps 11
significant bits (a relative error of at most 2**-11 for magnitudes from
6.1e-5 to 65504; smaller magnitudes lose precision and those below 3e-8
become 0). Hidden states are sigmoid outputs in (0, 1), so the range suffices.
Encoding a finite float above 65504 in magnitude, the float16 maximum, raises
``StateFormatError`` instead of saturating, because such a value means the
model diverged. NaN and infinity are encoded as they are in both types, and
decoding rejects them.

Decoding accepts both types in one call whatever type the writer uses, so the
type can change on a running deployment. The blob length selects the type,
because the two lengths differ for every h >= 1, and the dtype code must
agree with it. Decoding S blobs is one ``np.frombuffer`` per type over the
concatenation of its blobs, followed by column-wise checks, with no Python
work per user. Decoded floats are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from drnn_core.errors import DrnnError
from drnn_core.state import NO_ITEM, NO_OFFSET, NO_PARTITION, UserStateBatch

__all__ = [
    "STATE_DTYPES",
    "STATE_FORMAT_VERSION",
    "StateFormatError",
    "decode_states",
    "encode_states",
    "state_blob_problem",
    "state_size_bytes",
]

STATE_FORMAT_VERSION = 1
MAGIC = b"DS"
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
MAX_DIMENSION = 0xFFFF

STATE_DTYPES = {"float32": DTYPE_FLOAT32, "float16": DTYPE_FLOAT16}
_DTYPE_NAMES = {code: name for name, code in STATE_DTYPES.items()}
_FLOAT_FORMATS = {DTYPE_FLOAT32: "<f4", DTYPE_FLOAT16: "<f2"}
FLOAT16_MAX = float(np.finfo(np.float16).max)

_HEADER_FIELDS = [
    ("magic", "S2"),
    ("version", "u1"),
    ("dtype_code", "u1"),
    ("hidden_size", "<u2"),
    ("window", "<u2"),
    ("window_len", "<u2"),
    ("count", "<i8"),
    ("last_partition", "<i4"),
    ("last_offset", "<i8"),
]
_HEADER_DTYPE = np.dtype(_HEADER_FIELDS)
HEADER_SIZE = _HEADER_DTYPE.itemsize


class StateFormatError(DrnnError, ValueError):
    """A state batch or a codec argument cannot be represented in the blob format."""


def state_size_bytes(hidden_size: int, window: int, state_dtype: str = "float32") -> int:
    """Return the length in bytes of one encoded state with h = ``hidden_size``, K = ``window`` and the given float type.

    Raises
    ------
    StateFormatError
        If h or K is outside [1, 65535] or ``state_dtype`` is not a key of ``STATE_DTYPES``.
    """
    _check_dimensions(hidden_size, window)
    return _record_dtype(hidden_size, window, _dtype_code(state_dtype)).itemsize


def _dtype_code(state_dtype: str) -> int:
    try:
        return STATE_DTYPES[state_dtype]
    except (KeyError, TypeError):
        raise StateFormatError(
            f"Invalid state_dtype={state_dtype!r}: expected one of {', '.join(STATE_DTYPES)}"
        ) from None


@functools.lru_cache(maxsize=32)
def _record_dtype(hidden_size: int, window: int, dtype_code: int = DTYPE_FLOAT32) -> np.dtype:
    float_format = _FLOAT_FORMATS[dtype_code]
    fields = _HEADER_FIELDS + [
        ("hidden", float_format, (hidden_size,)),
        ("start_hidden", float_format, (hidden_size,)),
        ("items", "<i4", (window,)),
    ]
    return np.dtype(fields)


def _check_dimensions(hidden_size: int, window: int) -> None:
    for name, value in (("hidden_size", hidden_size), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise StateFormatError(
                f"Invalid {name}={value!r}: expected an integer from 1 to {MAX_DIMENSION}"
            )
        if not 1 <= value <= MAX_DIMENSION:
            raise StateFormatError(
                f"Invalid {name}={value}: expected an integer from 1 to {MAX_DIMENSION}"
            )


def _batch_dimensions(batch: UserStateBatch) -> tuple[int, int]:
    """Return (h, K) of ``batch`` after checking that its columns agree on S, h and K."""
    if batch.hidden.ndim != 2 or batch.window.ndim != 2:
        raise StateFormatError(
            f"Invalid state batch: hidden and window must be 2-D, got shapes "
            f"{batch.hidden.shape} and {batch.window.shape}"
        )

    size, hidden_size = batch.hidden.shape
    window = batch.window.shape[1]
    expected = {
        "start_hidden": (size, hidden_size),
        "window": (size, window),
        "window_len": (size,),
        "count": (size,),
        "last_partition": (size,),
        "last_offset": (size,),
    }
    for name, shape in expected.items():
        actual = getattr(batch, name).shape
        if actual != shape:
            raise StateFormatError(
                f"Invalid state batch: {name} has shape {actual}, expected {shape} "
                f"to match hidden {batch.hidden.shape}"
            )

    _check_dimensions(hidden_size, window)
    return hidden_size, window


def encode_states(
    batch: UserStateBatch, rows: np.ndarray | None = None, *, state_dtype: str = "float32"
) -> list[bytes]:
    """Encode rows of a state batch into one blob per row.

    Parameters
    ----------
    batch : UserStateBatch
        States of S users with hidden size h and window K.
    rows : ndarray of int, shape (R,), or of bool, shape (S,), optional
        Rows to encode, in the order of the output. All S rows when omitted.
    state_dtype : {"float32", "float16"}
        Type of ``hidden`` and ``start_hidden`` in the blobs. float16 rounds
        each value to the nearest float16.

    Returns
    -------
    list of bytes
        R blobs of ``state_size_bytes(h, K, state_dtype)`` bytes each.

    Raises
    ------
    StateFormatError
        If the columns disagree in shape, h or K is above 65535, a selected
        ``window_len`` is outside [0, K], ``state_dtype`` is unknown, or with
        float16 a selected finite float is above 65504 in magnitude.
    """
    dtype_code = _dtype_code(state_dtype)
    hidden_size, window = _batch_dimensions(batch)
    selected = _selected_rows(batch.size, rows)

    window_len = batch.window_len[selected]
    out_of_range = np.flatnonzero((window_len < 0) | (window_len > window))
    if out_of_range.size:
        raise StateFormatError(
            f"Cannot encode states: window_len {window_len[out_of_range[:5]].tolist()} at "
            f"selected rows {out_of_range[:5].tolist()} is outside [0, {window}]; "
            "the state update that wrote them is faulty"
        )

    hidden = batch.hidden[selected]
    start_hidden = batch.start_hidden[selected]
    if dtype_code == DTYPE_FLOAT16:
        _check_float16_range(hidden, "hidden", selected)
        _check_float16_range(start_hidden, "start_hidden", selected)

    records = np.empty(selected.size, dtype=_record_dtype(hidden_size, window, dtype_code))
    records["magic"] = MAGIC
    records["version"] = STATE_FORMAT_VERSION
    records["dtype_code"] = dtype_code
    records["hidden_size"] = hidden_size
    records["window"] = window
    records["window_len"] = window_len
    records["count"] = batch.count[selected]
    records["last_partition"] = batch.last_partition[selected]
    records["last_offset"] = batch.last_offset[selected]
    records["hidden"] = hidden
    records["start_hidden"] = start_hidden
    records["items"] = batch.window[selected]

    buffer = records.tobytes()
    size = records.dtype.itemsize
    return [buffer[start : start + size] for start in range(0, len(buffer), size)]


def _check_float16_range(values: np.ndarray, name: str, selected: np.ndarray) -> None:
    """Raise StateFormatError if a finite value of ``values`` (shape (R, h)) would overflow float16."""
    with np.errstate(invalid="ignore"):
        overflow = np.isfinite(values) & (np.abs(values) > FLOAT16_MAX)
    bad_rows = np.flatnonzero(overflow.any(axis=1))
    if bad_rows.size:
        raise StateFormatError(
            f"Cannot encode states as float16: {name} of batch rows {selected[bad_rows[:5]].tolist()} "
            f"contains values such as {float(values[overflow][0])!r} above the float16 maximum "
            f"{FLOAT16_MAX:g} in magnitude; the model diverged, or use state_dtype float32"
        )


def _selected_rows(size: int, rows: np.ndarray | None) -> np.ndarray:
    if rows is None:
        return np.arange(size)

    rows = np.asarray(rows)
    if rows.dtype == np.bool_:
        if rows.shape != (size,):
            raise StateFormatError(
                f"Invalid rows: a boolean mask must have shape ({size},), got {rows.shape}"
            )
        return np.flatnonzero(rows)

    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise StateFormatError(
            f"Invalid rows: expected a 1-D integer or boolean array, got dtype {rows.dtype} "
            f"and shape {rows.shape}"
        )
    if rows.size and (rows.min() < 0 or rows.max() >= size):
        raise StateFormatError(
            f"Invalid rows: indexes must be in [0, {size}), got {rows[:10].tolist()}"
        )
    return rows


def decode_states(
    blobs: Sequence[bytes | None], hidden_size: int, window: int
) -> tuple[UserStateBatch, np.ndarray]:
    """Decode one blob per user into a state batch.

    Parameters
    ----------
    blobs : sequence of bytes or None, length S
        Encoded states, float32 and float16 blobs in any mix. None stands for
        a missing key and decodes to a new-user row.
    hidden_size, window : int
        The h and K every blob must have.

    Returns
    -------
    batch : UserStateBatch
        S rows in the order of ``blobs``, with float32 hidden states whatever
        the stored type. Missing and corrupt blobs give new-user rows, and
        window entries past ``window_len`` are set to ``NO_ITEM``.
    corrupt : ndarray, shape (S,), bool
        True where a blob was present but invalid. A blob is invalid if its
        length fits neither type, or its magic, version, h or K is wrong, or its
        dtype code differs from the type its length implies, or ``window_len`` is
        above K. It is also invalid if a valid window item or the count is
        negative, the partition or offset is below -1, or a float is NaN or
        infinite. ``state_blob_problem`` returns the reason for one blob.
    """
    _check_dimensions(hidden_size, window)
    size = len(blobs)
    batch = UserStateBatch.empty(size, hidden_size, window)
    corrupt = np.zeros(size, dtype=bool)

    code_of_length = _dtype_codes_by_length(hidden_size, window)
    fitting_rows: dict[int, list[int]] = {code: [] for code in _FLOAT_FORMATS}
    fitting_blobs: dict[int, list[bytes]] = {code: [] for code in _FLOAT_FORMATS}
    for row, blob in enumerate(blobs):
        if blob is None:
            continue
        code = code_of_length.get(len(blob))
        if code is None:
            corrupt[row] = True
        else:
            fitting_rows[code].append(row)
            fitting_blobs[code].append(blob)

    for code, rows in fitting_rows.items():
        if rows:
            _decode_group(batch, corrupt, np.asarray(rows, dtype=np.intp), fitting_blobs[code], code)
    return batch, corrupt


def _dtype_codes_by_length(hidden_size: int, window: int) -> dict[int, int]:
    """Return blob length -> dtype code for h = ``hidden_size`` and K = ``window``."""
    return {_record_dtype(hidden_size, window, code).itemsize: code for code in _FLOAT_FORMATS}


def _decode_group(
    batch: UserStateBatch, corrupt: np.ndarray, rows: np.ndarray, blobs: list[bytes], dtype_code: int
) -> None:
    """Decode blobs of one float type into ``batch`` at ``rows``, marking invalid ones in ``corrupt``."""
    hidden_size, window = batch.hidden.shape[1], batch.window.shape[1]
    records = np.frombuffer(b"".join(blobs), dtype=_record_dtype(hidden_size, window, dtype_code))

    invalid = np.zeros(records.size, dtype=bool)
    for failed, _reason in _record_problems(records, hidden_size, window, dtype_code):
        invalid |= failed

    corrupt[rows[invalid]] = True
    _copy_records(batch, rows[~invalid], records[~invalid], window)


def _copy_records(batch: UserStateBatch, rows: np.ndarray, records: np.ndarray, window: int) -> None:
    """Copy valid records into ``batch`` at ``rows``, blanking window entries past window_len."""
    window_len = records["window_len"].astype(np.int32)
    valid_entries = np.arange(window) < window_len[:, None]

    batch.hidden[rows] = records["hidden"]
    batch.start_hidden[rows] = records["start_hidden"]
    batch.window[rows] = np.where(valid_entries, records["items"], NO_ITEM)
    batch.window_len[rows] = window_len
    batch.count[rows] = records["count"]
    batch.last_partition[rows] = records["last_partition"]
    batch.last_offset[rows] = records["last_offset"]


def _record_problems(
    records: np.ndarray, hidden_size: int, window: int, dtype_code: int = DTYPE_FLOAT32
) -> list[tuple[np.ndarray, str]]:
    """Return one (failed mask of shape (R,), reason) pair per check, in the order they are reported.

    ``dtype_code`` is the type that the length of the records implies.
    """
    window_len = records["window_len"].astype(np.int64)
    valid_entries = np.arange(window) < np.minimum(window_len, window)[:, None]

    return [
        (records["magic"] != MAGIC, f"magic is not {MAGIC!r}"),
        (records["version"] != STATE_FORMAT_VERSION, f"format version is not {STATE_FORMAT_VERSION}"),
        (
            records["dtype_code"] != dtype_code,
            f"dtype code is not {dtype_code}, the code of {_DTYPE_NAMES[dtype_code]} that the blob length implies",
        ),
        (records["hidden_size"] != hidden_size, f"h is not {hidden_size}"),
        (records["window"] != window, f"K is not {window}"),
        (window_len > window, f"window_len is above K={window}"),
        (((records["items"] < 0) & valid_entries).any(axis=1), "a valid window item is negative"),
        (records["count"] < 0, "count is negative"),
        (records["last_partition"] < NO_PARTITION, f"last_partition is below {NO_PARTITION}"),
        (records["last_offset"] < NO_OFFSET, f"last_offset is below {NO_OFFSET}"),
        (~np.isfinite(records["hidden"]).all(axis=1), "hidden contains NaN or infinity"),
        (~np.isfinite(records["start_hidden"]).all(axis=1), "start_hidden contains NaN or infinity"),
    ]


def state_blob_problem(blob: bytes, hidden_size: int, window: int) -> str | None:
    """Return why ``blob`` is not a valid state with h = ``hidden_size`` and K = ``window``, or None if it is.

    The reason names the first failed check, with the values found, in the
    order: length and header, then the checks ``decode_states`` applies.
    Blobs of both float types are accepted.
    """
    code_of_length = _dtype_codes_by_length(hidden_size, window)
    dtype_code = code_of_length.get(len(blob))
    if dtype_code is not None:
        records = np.frombuffer(blob, dtype=_record_dtype(hidden_size, window, dtype_code))
        for failed, reason in _record_problems(records, hidden_size, window, dtype_code):
            if failed[0]:
                return f"{reason} (header {_describe_header(records[0])})"
        return None

    if len(blob) < HEADER_SIZE:
        return f"length is {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte header"

    header = np.frombuffer(blob[:HEADER_SIZE], dtype=_HEADER_DTYPE)[0]
    expected = " or ".join(f"{length} ({_DTYPE_NAMES[code]})" for length, code in code_of_length.items())
    return (
        f"length is {len(blob)} bytes, expected {expected} for h={hidden_size} and "
        f"K={window} (header {_describe_header(header)})"
    )


def _describe_header(header: np.void) -> str:
    return (
        f"magic={bytes(header['magic'])!r} version={int(header['version'])} "
        f"dtype_code={int(header['dtype_code'])} h={int(header['hidden_size'])} "
        f"K={int(header['window'])} window_len={int(header['window_len'])}"
    )
