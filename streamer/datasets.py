"""Dataset readers that turn interaction files into Kafka messages to replay in timestamp order."""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import datetime
import gzip
import io
import logging
import math
import operator
import os
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np

from drnn_core.errors import ConfigError, DrnnError
from streamer.events import DecodeLimits, InvalidEventError, decode_event, encode_event

__all__ = [
    "BASKET_FORMATS",
    "Basket",
    "FORMATS",
    "DatasetError",
    "Interaction",
    "Message",
    "read_baskets",
    "read_interactions",
    "read_messages",
    "synthetic_interactions",
]

logger = logging.getLogger(__name__)

FORMATS = ("movielens", "tafeng", "sessions", "jsonl")
# Formats read as basket events by ``read_baskets``; the Kafka replay does not take them.
BASKET_FORMATS = ("tafeng-baskets",)

GZIP_MAGIC = b"\x1f\x8b"
MAX_ID_LENGTH = DecodeLimits().max_id_length

RATINGS_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")
TAFENG_HEADER = (
    "TRANSACTION_DT",
    "CUSTOMER_ID",
    "AGE_GROUP",
    "PIN_CODE",
    "PRODUCT_SUBCLASS",
    "PRODUCT_ID",
    "AMOUNT",
    "ASSET",
    "SALES_PRICE",
)
SESSIONS_HEADER = ("SessionId", "ItemId", "Time")

_by_ts = operator.attrgetter("ts")


class DatasetError(DrnnError):
    """Error for a dataset file that is missing, unreadable or malformed.

    The message names the path, the line when there is one, and the fix.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Interaction:
    """One user-item interaction read from a dataset.

    Attributes
    ----------
    user_id : str
        The user id, or the session id for session data.
    item_id : str
        The item id.
    ts : float
        Unix seconds, finite and non-negative.
    """

    user_id: str
    item_id: str
    ts: float


@dataclasses.dataclass(frozen=True, slots=True)
class Basket:
    """The items one user bought together, read from a basket dataset.

    Attributes
    ----------
    user_id : str
    ts : float
        Unix seconds of the basket's day (midnight UTC for Ta-Feng).
    item_ids : tuple of str
        The distinct items, in the file order of their first row; never empty.
    """

    user_id: str
    ts: float
    item_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message to produce.

    Attributes
    ----------
    key : bytes or None
        The user id in UTF-8, or None for a jsonl line that is not a valid event.
    value : bytes
        The message value.
    """

    key: bytes | None
    value: bytes


def read_interactions(path: str | os.PathLike, fmt: str) -> list[Interaction]:
    """Read a dataset file and return its interactions sorted by timestamp.

    The sort is stable, so interactions with the same timestamp keep their file
    order. Any format may be gzip-compressed, which is detected by the magic
    bytes and not by the file name, and may start with a UTF-8 BOM. Blank lines
    are skipped.

    MovieLens ids must be integers and become ``str(int)``, the canonical form
    of ``decode_event``. Ta-Feng and session ids are kept as the file writes
    them, so "01104905" keeps its leading zero. Every id must be non-empty and
    at most DecodeLimits().max_id_length characters long. Ta-Feng columns
    other than TRANSACTION_DT, CUSTOMER_ID and PRODUCT_ID are not checked.

    Parameters
    ----------
    path : str or os.PathLike
        The dataset file.
    fmt : str
        "movielens", "tafeng" or "sessions". The "jsonl" format carries raw
        message values and has only the ``read_messages`` view.

    Raises
    ------
    DatasetError
        If ``fmt`` is unknown or "jsonl", the file is missing or unreadable, or
        a row is malformed. The message names path:line and what was expected.
    """
    parse_rows = _interaction_parser(fmt)
    started = time.perf_counter()

    with _open_binary(path) as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        try:
            interactions = parse_rows(stream, os.fspath(path))
        except UnicodeDecodeError as error:
            raise DatasetError(
                f"{os.fspath(path)}: not valid UTF-8 ({error.reason}): expected a UTF-8 text file"
            ) from None
        except (OSError, EOFError, zlib.error) as error:
            raise _read_error(path, error) from None
    interactions.sort(key=_by_ts)

    logger.info(
        "Read %d interactions from %s (format %s) in %.2f s",
        len(interactions),
        path,
        fmt,
        time.perf_counter() - started,
    )
    return interactions


def read_messages(path: str | os.PathLike, fmt: str) -> list[Message]:
    """Read a dataset file and return the Kafka messages to replay, in timestamp order.

    For "jsonl", every non-blank line becomes one message value unchanged, bad
    lines included, without its line terminator. Its key is the UTF-8 user id
    when the line decodes as a valid event (with the default DecodeLimits),
    else None. The lines are sorted stably by an effective timestamp: the
    line's ts when it is a valid event with a ts, else the effective timestamp
    of the previous line (0.0 before the first). A UTF-8 BOM at the start of
    the file is dropped.

    Other formats go through ``read_interactions`` and ``encode_event``.

    Raises
    ------
    DatasetError
        As ``read_interactions``, and for "jsonl" when the file is missing or unreadable.
    """
    if fmt == "jsonl":
        return _read_jsonl(path)

    interactions = read_interactions(path, fmt)
    messages = []
    for interaction in interactions:
        key, value = encode_event(interaction.user_id, interaction.item_id, interaction.ts)
        messages.append(Message(key, value))
    return messages


def read_baskets(path: str | os.PathLike, fmt: str = "tafeng-baskets") -> list[Basket]:
    """Read a dataset file as basket events, sorted by date.

    For "tafeng-baskets", all rows of one CUSTOMER_ID on one TRANSACTION_DT
    form one basket of the distinct PRODUCT_IDs of those rows, in file order.
    Baskets are sorted by date, and baskets of the same date keep the file
    order of their first row. The rows are read and checked as
    ``read_interactions(path, "tafeng")`` does.

    Raises
    ------
    DatasetError
        If ``fmt`` is not a basket format, or as ``read_interactions``.
    """
    if fmt not in BASKET_FORMATS:
        raise DatasetError(f"Unknown basket format {fmt!r}: expected one of {', '.join(BASKET_FORMATS)}")

    interactions = read_interactions(path, "tafeng")
    items_by_key: dict[tuple[str, float], dict[str, None]] = {}
    for interaction in interactions:
        key = (interaction.user_id, interaction.ts)
        items_by_key.setdefault(key, {})[interaction.item_id] = None

    # read_interactions sorted the rows stably by date, so the dict keeps each
    # date's baskets in the file order of their first row.
    baskets = [Basket(user_id, ts, tuple(items)) for (user_id, ts), items in items_by_key.items()]
    logger.info("Grouped %d interactions from %s into %d baskets", len(interactions), path, len(baskets))
    return baskets


def synthetic_interactions(
    *, users: int = 200, items: int = 300, events: int = 20000, seed: int = 7
) -> list[Interaction]:
    """Generate a small interaction stream with sequential structure.

    Every item has 2 or 3 successors with random transition probabilities, and
    every user has a taste set of ``max(2, items // 20)`` items. Each user walks
    this Markov chain: the next item is a successor of the current one with
    probability 0.75, a random item of the user's taste set with probability
    0.15, and a uniformly random item otherwise. The first item of a user comes
    from the taste set. A model that reads the last item can narrow most next
    items down to 2 or 3 candidates, which a popularity model cannot do.

    The events of all users are interleaved: each event goes to a uniformly
    random user, and the timestamps strictly increase from 1.6e9 by 1 to 59
    seconds. The same arguments always give the same list.

    Parameters
    ----------
    users, items, events : int
        Number of users (at least 1), items (at least 4) and events (at least 0).
    seed : int
        Seed of the numpy Generator.

    Returns
    -------
    list of Interaction
        ``events`` interactions sorted by ts, with ids "u0".."u{users-1}" and
        "i0".."i{items-1}".
    """
    _check_synthetic_args(users, items, events)
    rng = np.random.default_rng(seed)

    successors, transition_cdfs = _random_successors(rng, items)
    taste_size = max(2, items // 20)
    tastes = [rng.choice(items, size=taste_size, replace=False) for _ in range(users)]

    event_users = rng.integers(0, users, size=events)
    step_kinds = rng.random(events)
    step_draws = rng.random(events)
    uniform_items = rng.integers(0, items, size=events)
    taste_picks = rng.integers(0, taste_size, size=events)
    timestamps = 1.6e9 + np.cumsum(rng.integers(1, 60, size=events))

    current = np.full(users, -1, dtype=np.int64)
    interactions = []
    for k in range(events):
        user = int(event_users[k])
        previous = int(current[user])
        if previous >= 0 and step_kinds[k] < 0.75:
            choice = int(np.searchsorted(transition_cdfs[previous], step_draws[k], side="right"))
            item = int(successors[previous][min(choice, len(successors[previous]) - 1)])
        elif previous < 0 or step_kinds[k] < 0.9:
            item = int(tastes[user][taste_picks[k]])
        else:
            item = int(uniform_items[k])
        current[user] = item
        interactions.append(Interaction(f"u{user}", f"i{item}", float(timestamps[k])))
    return interactions


def _interaction_parser(fmt: str) -> Callable[[io.TextIOBase, str], list[Interaction]]:
    parsers = {"movielens": _parse_movielens, "tafeng": _parse_tafeng, "sessions": _parse_sessions}
    if fmt == "jsonl":
        raise DatasetError(
            "Format 'jsonl' has no interaction view because its lines are raw message values,"
            " some possibly invalid: use read_messages"
        )
    if fmt not in parsers:
        raise DatasetError(f"Unknown dataset format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return parsers[fmt]


@contextlib.contextmanager
def _open_binary(path: str | os.PathLike) -> Iterator[io.BufferedIOBase]:
    """Open a file for reading, through gzip when it starts with the gzip magic bytes."""
    try:
        raw = open(path, "rb")
    except FileNotFoundError:
        raise DatasetError(f"Dataset file {os.fspath(path)} not found. Check the path.") from None
    except OSError as error:
        raise DatasetError(
            f"Failed to open dataset file {os.fspath(path)}: {error}."
            " Check that it is a readable file."
        ) from None

    with raw:
        if raw.peek(2)[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
                yield unzipped
        else:
            yield raw


def _csv_rows(
    stream: io.TextIOBase, path: str, *, delimiter: str, quoting: int
) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, fields) for each non-blank row.

    Failures to read or decode the file become DatasetError.
    """
    reader = csv.reader(stream, delimiter=delimiter, quoting=quoting)
    try:
        for row in reader:
            if row and (len(row) > 1 or row[0].strip()):
                yield reader.line_num, row
    except csv.Error as error:
        raise DatasetError(f"{path}:{reader.line_num}: invalid CSV ({error})") from None
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{path}: not valid UTF-8 near line {reader.line_num + 1} ({error.reason}):"
            " expected a UTF-8 text file"
        ) from None
    except (OSError, EOFError, zlib.error) as error:
        raise _read_error(path, error, f" near line {reader.line_num + 1}") from None


def _parse_movielens(stream: io.TextIOBase, path: str) -> list[Interaction]:
    """Parse u.data (tab-separated, no header) or ratings.csv (with a header).

    The first line decides: a tab means u.data, a first field "userId" means ratings.csv.
    """
    first_line = stream.readline()
    stream.seek(0)

    if "\t" in first_line:
        rows = _csv_rows(stream, path, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = (0, 1, 2, 3)
        width = 4
        expected = "4 tab-separated fields (user id, item id, rating, unix timestamp)"
    elif first_line.split(",")[0].strip() == "userId":
        rows = _csv_rows(stream, path, delimiter=",", quoting=csv.QUOTE_MINIMAL)
        header = _read_header(rows, path, "MovieLens ratings.csv", RATINGS_CSV_HEADER)
        columns = _column_indexes(header, RATINGS_CSV_HEADER, path, "MovieLens ratings.csv")
        width = len(header)
        expected = f"{width} comma-separated fields matching the header"
    else:
        raise _row_error(
            path,
            1,
            f"unrecognised MovieLens file, found {first_line[:80]!r}. Expected a u.data row"
            " (user, item, rating, timestamp separated by tabs) or the ratings.csv header"
            f" {','.join(RATINGS_CSV_HEADER)}",
        )

    interactions = []
    for line, row in rows:
        if len(row) != width:
            raise _column_count_error(path, line, row, expected)
        interactions.append(_movielens_interaction(row, columns, path, line))
    return interactions


def _movielens_interaction(
    row: list[str], columns: tuple[int, ...], path: str, line: int
) -> Interaction:
    """Build the interaction of one MovieLens row. The rating must parse but is not kept."""
    user_column, item_column, rating_column, ts_column = columns
    try:
        user_id = str(int(row[user_column]))
        item_id = str(int(row[item_column]))
        float(row[rating_column])
        ts = float(row[ts_column])
    except ValueError:
        raise _number_error(row, columns, path, line) from None

    if not 0.0 <= ts < math.inf:
        raise _timestamp_error(path, line, row[ts_column])
    return Interaction(user_id, item_id, ts)


def _number_error(row: list[str], columns: tuple[int, ...], path: str, line: int) -> DatasetError:
    """Return a DatasetError that names the first field of a MovieLens row that does not parse."""
    checks = (
        ("user id", int, "an integer"),
        ("item id", int, "an integer"),
        ("rating", float, "a number"),
        ("timestamp", float, "a number of unix seconds"),
    )
    for column, (name, parse, kind) in zip(columns, checks, strict=True):
        try:
            parse(row[column])
        except ValueError:
            return _row_error(
                path,
                line,
                f"invalid {name} {row[column][:40]!r} in column {column + 1}, expected {kind}",
            )
    return _row_error(path, line, f"invalid MovieLens row {row!r:.120}")


def _parse_tafeng(stream: io.TextIOBase, path: str) -> list[Interaction]:
    """Parse the Ta-Feng CSV. The ts of a row is midnight UTC of its TRANSACTION_DT (M/D/YYYY)."""
    rows = _csv_rows(stream, path, delimiter=",", quoting=csv.QUOTE_MINIMAL)
    header = _read_header(rows, path, "Ta-Feng", TAFENG_HEADER)
    date_column, user_column, item_column = _column_indexes(
        header, ("TRANSACTION_DT", "CUSTOMER_ID", "PRODUCT_ID"), path, "Ta-Feng"
    )
    width = len(header)
    expected = f"{width} comma-separated fields matching the header"

    midnight_by_date: dict[str, float] = {}
    interactions = []
    for line, row in rows:
        if len(row) != width:
            raise _column_count_error(path, line, row, expected)

        date_text = row[date_column]
        ts = midnight_by_date.get(date_text)
        if ts is None:
            ts = _parse_tafeng_date(date_text, path, line)
            midnight_by_date[date_text] = ts

        user_id = _checked_id(row[user_column], "CUSTOMER_ID", path, line)
        item_id = _checked_id(row[item_column], "PRODUCT_ID", path, line)
        interactions.append(Interaction(user_id, item_id, ts))
    return interactions


def _parse_tafeng_date(text: str, path: str, line: int) -> float:
    """Return midnight UTC of a M/D/YYYY date, in unix seconds."""
    try:
        month, day, year = (int(part) for part in text.split("/"))
        midnight = datetime.datetime(year, month, day, tzinfo=datetime.timezone.utc)
    except ValueError:
        raise _row_error(
            path, line, f"invalid TRANSACTION_DT {text[:40]!r}, expected a date as M/D/YYYY"
        ) from None
    return midnight.timestamp()


def _parse_sessions(stream: io.TextIOBase, path: str) -> list[Interaction]:
    """Parse a session TSV with header SessionId, ItemId, Time (unix seconds)."""
    rows = _csv_rows(stream, path, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = _read_header(rows, path, "session TSV", SESSIONS_HEADER)
    session_column, item_column, ts_column = _column_indexes(
        header, SESSIONS_HEADER, path, "session TSV"
    )
    width = len(header)
    expected = f"{width} tab-separated fields matching the header"

    interactions = []
    for line, row in rows:
        if len(row) != width:
            raise _column_count_error(path, line, row, expected)

        try:
            ts = float(row[ts_column])
        except ValueError:
            raise _timestamp_error(path, line, row[ts_column]) from None
        if not 0.0 <= ts < math.inf:
            raise _timestamp_error(path, line, row[ts_column])

        session_id = _checked_id(row[session_column], "SessionId", path, line)
        item_id = _checked_id(row[item_column], "ItemId", path, line)
        interactions.append(Interaction(session_id, item_id, ts))
    return interactions


def _read_jsonl(path: str | os.PathLike) -> list[Message]:
    with _open_binary(path) as raw:
        try:
            data = raw.read()
        except (OSError, EOFError, zlib.error) as error:
            raise _read_error(path, error) from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]

    effective_ts = 0.0
    timed = []
    for line in data.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            continue

        key = None
        try:
            event = decode_event(line, None)
        except InvalidEventError:
            pass
        else:
            key = event.user_id.encode("utf-8")
            if event.ts is not None:
                effective_ts = event.ts
        timed.append((effective_ts, Message(key, line)))

    timed.sort(key=operator.itemgetter(0))
    logger.info("Read %d jsonl messages from %s", len(timed), path)
    return [message for _, message in timed]


def _read_header(
    rows: Iterator[tuple[int, list[str]]], path: str, name: str, expected: tuple[str, ...]
) -> list[str]:
    try:
        _, header = next(rows)
    except StopIteration:
        raise DatasetError(
            f"{path}: file is empty, expected a {name} file with the header {','.join(expected)}"
        ) from None
    return [field.strip() for field in header]


def _column_indexes(
    header: list[str], names: tuple[str, ...], path: str, file_kind: str
) -> tuple[int, ...]:
    """Return the position of each of ``names`` in ``header``.

    Raises
    ------
    DatasetError
        Naming the columns that the header lacks.
    """
    missing = [name for name in names if name not in header]
    if missing:
        raise DatasetError(
            f"{path}:1: header {','.join(header)[:200]!r} lacks {', '.join(missing)}."
            f" Expected a {file_kind} header with {', '.join(names)}."
            " Check the path and that --format matches the file."
        )
    return tuple(header.index(name) for name in names)


def _checked_id(text: str, column: str, path: str, line: int) -> str:
    """Return an id unchanged, or raise DatasetError if decode_event would reject it."""
    if not text or text.isspace():
        raise _row_error(path, line, f"empty {column}, expected a non-empty id")
    if len(text) > MAX_ID_LENGTH:
        raise _row_error(
            path, line, f"{column} is {len(text)} characters, expected at most {MAX_ID_LENGTH}"
        )
    return text


def _row_error(path: str, line: int, problem: str) -> DatasetError:
    return DatasetError(
        f"{path}:{line}: {problem}. Fix or delete the row, or check that --format matches the file."
    )


def _column_count_error(path: str, line: int, row: list[str], expected: str) -> DatasetError:
    return _row_error(path, line, f"expected {expected}, found {len(row)} fields")


def _timestamp_error(path: str, line: int, text: str) -> DatasetError:
    return _row_error(
        path, line, f"invalid timestamp {text[:40]!r}, expected finite non-negative unix seconds"
    )


def _read_error(path: str | os.PathLike, error: Exception, where: str = "") -> DatasetError:
    return DatasetError(
        f"{os.fspath(path)}: failed to read{where} ({error!r})."
        " The file may be a truncated or corrupt gzip: download it again."
    )


def _check_synthetic_args(users: int, items: int, events: int) -> None:
    for name, value, low in (("users", users, 1), ("items", items, 4), ("events", events, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"Invalid {name}={value!r}: expected an integer of at least {low}")


def _random_successors(
    rng: np.random.Generator, items: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Draw 2 or 3 distinct successors per item, never the item itself, and their CDFs."""
    successors = []
    transition_cdfs = []
    for item in range(items):
        count = int(rng.integers(2, 4))
        others = rng.choice(items - 1, size=count, replace=False)
        successors.append(np.where(others >= item, others + 1, others))
        transition_cdfs.append(np.cumsum(rng.dirichlet(np.full(count, 2.0))))
    return successors, transition_cdfs
