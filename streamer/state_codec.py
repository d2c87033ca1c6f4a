"""Binary, versioned encoding of per-user recurrent states, one blob per user.

Every blob is a packed little-endian record with no padding:

======  ==============  ======  ==============================================
offset  field           type    meaning
======  ==============  ======  ==============================================
0       magic           2 B     ``b"DS"``
2       version         u8      ``STATE_FORMAT_VERSION`` (1)
3       dtype code      u8      0 = float32; 1 = float16 is reserved and
                                rejected by this version
4       h               u16     hidden size
6       K               u16     window size
8       window_len      u16     valid entries of ``window``, 0 to K
10      count           i64     events applied to the user
18      last_partition  i32     Kafka partition of the last event, or -1
22      last_offset     i64     Kafka offset of the last event, or -1
30      hidden          f32[h]  hidden state after the last applied item
30+4h   start_hidden    f32[h]  hidden state before the oldest window item
30+8h   window          i32[K]  item indexes, oldest first
======  ==============  ======  ==============================================

A blob is therefore ``state_size_bytes(h, K) = 30 + 8*h + 4*K`` bytes long.
Decoding S blobs of that length is one ``np.frombuffer`` over their
concatenation followed by column-wise checks, with no Python work per user.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from drnn_core.errors import DrnnError
from drnn_core.state import NO_ITEM, NO_OFFSET, NO_PARTITION, UserStateBatch

__all__ = [
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


def state_size_bytes(hidden_size: int, window: int) -> int:
    """Return the length in bytes of one encoded state with h = ``hidden_size`` and K = ``window``."""
    _check_dimensions(hidden_size, window)
    return HEADER_SIZE + 8 * hidden_size + 4 * window


@functools.lru_cache(maxsize=32)
def _record_dtype(hidden_size: int, window: int) -> np.dtype:
    fields = _HEADER_FIELDS + [
        ("hidden", "<f4", (hidden_size,)),
        ("start_hidden", "<f4", (hidden_size,)),
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


def encode_states(batch: UserStateBatch, rows: np.ndarray | None = None) -> list[bytes]:
    """Encode rows of a state batch into one blob per row.

    Parameters
    ----------
    batch : UserStateBatch
        States of S users with hidden size h and window K.
    rows : ndarray of int, shape (R,), or of bool, shape (S,), optional
        Rows to encode, in the order of the output. All S rows when omitted.

    Returns
    -------
    list of bytes
        R blobs of ``state_size_bytes(h, K)`` bytes each.

    Raises
    ------
    StateFormatError
        If the columns disagree in shape, h or K is above 65535, or a selected
        ``window_len`` is outside [0, K].
    """
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

    records = np.empty(selected.size, dtype=_record_dtype(hidden_size, window))
    records["magic"] = MAGIC
    records["version"] = STATE_FORMAT_VERSION
    records["dtype_code"] = DTYPE_FLOAT32
    records["hidden_size"] = hidden_size
    records["window"] = window
    records["window_len"] = window_len
    records["count"] = batch.count[selected]
    records["last_partition"] = batch.last_partition[selected]
    records["last_offset"] = batch.last_offset[selected]
    records["hidden"] = batch.hidden[selected]
    records["start_hidden"] = batch.start_hidden[selected]
    records["items"] = batch.window[selected]

    buffer = records.tobytes()
    size = records.dtype.itemsize
    return [buffer[start : start + size] for start in range(0, len(buffer), size)]


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
        Encoded states. None stands for a missing key and decodes to a new-user row.
    hidden_size, window : int
        The h and K every blob must have.

    Returns
    -------
    batch : UserStateBatch
        S rows in the order of ``blobs``. Missing and corrupt blobs give new-user
        rows, and window entries past ``window_len`` are set to ``NO_ITEM``.
    corrupt : ndarray, shape (S,), bool
        True where a blob was present but invalid. A blob is invalid if its
        length, magic, version, dtype code, h or K is wrong, or ``window_len`` is
        above K. It is also invalid if a valid window item or the count is
        negative, the partition or offset is below -1, or a float is NaN or
        infinite. ``state_blob_problem`` returns the reason for one blob.
    """
    _check_dimensions(hidden_size, window)
    size = len(blobs)
    batch = UserStateBatch.empty(size, hidden_size, window)
    corrupt = np.zeros(size, dtype=bool)

    record_size = state_size_bytes(hidden_size, window)
    fitting_rows = []
    fitting_blobs = []
    for row, blob in enumerate(blobs):
        if blob is None:
            continue
        if len(blob) == record_size:
            fitting_rows.append(row)
            fitting_blobs.append(blob)
        else:
            corrupt[row] = True

    if not fitting_blobs:
        return batch, corrupt

    records = np.frombuffer(b"".join(fitting_blobs), dtype=_record_dtype(hidden_size, window))
    invalid = np.zeros(records.size, dtype=bool)
    for failed, _reason in _record_problems(records, hidden_size, window):
        invalid |= failed

    fitting_rows = np.asarray(fitting_rows, dtype=np.intp)
    corrupt[fitting_rows[invalid]] = True
    _copy_records(batch, fitting_rows[~invalid], records[~invalid], window)
    return batch, corrupt


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


def _record_problems(records: np.ndarray, hidden_size: int, window: int) -> list[tuple[np.ndarray, str]]:
    """Return one (failed mask of shape (R,), reason) pair per check, in the order they are reported."""
    window_len = records["window_len"].astype(np.int64)
    valid_entries = np.arange(window) < np.minimum(window_len, window)[:, None]

    return [
        (records["magic"] != MAGIC, f"magic is not {MAGIC!r}"),
        (records["version"] != STATE_FORMAT_VERSION, f"format version is not {STATE_FORMAT_VERSION}"),
        (records["dtype_code"] != DTYPE_FLOAT32, f"dtype code is not {DTYPE_FLOAT32} (float32)"),
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
    """
    record_size = state_size_bytes(hidden_size, window)
    if len(blob) == record_size:
        records = np.frombuffer(blob, dtype=_record_dtype(hidden_size, window))
        for failed, reason in _record_problems(records, hidden_size, window):
            if failed[0]:
                return f"{reason} (header {_describe_header(records[0])})"
        return None

    if len(blob) < HEADER_SIZE:
        return f"length is {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte header"

    header = np.frombuffer(blob[:HEADER_SIZE], dtype=_HEADER_DTYPE)[0]
    return (
        f"length is {len(blob)} bytes, expected {record_size} for h={hidden_size} and "
        f"K={window} (header {_describe_header(header)})"
    )


def _describe_header(header: np.void) -> str:
    return (
        f"magic={bytes(header['magic'])!r} version={int(header['version'])} "
        f"dtype_code={int(header['dtype_code'])} h={int(header['hidden_size'])} "
        f"K={int(header['window'])} window_len={int(header['window_len'])}"
    )
