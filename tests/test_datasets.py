"""Tests of the dataset readers on small files written by the tests, and of the synthetic stream."""

import collections
import gzip
import json

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from drnn_core.errors import ConfigError
from streamer.datasets import (
    FORMATS,
    Basket,
    DatasetError,
    Interaction,
    Message,
    read_baskets,
    read_interactions,
    read_messages,
    synthetic_interactions,
)
from streamer.events import Event, decode_event

TAFENG_HEADER = (
    '"TRANSACTION_DT","CUSTOMER_ID","AGE_GROUP","PIN_CODE","PRODUCT_SUBCLASS",'
    '"PRODUCT_ID","AMOUNT","ASSET","SALES_PRICE"'
)


def _tafeng_row(date: str, customer: str, product: str) -> str:
    return f'"{date}","{customer}","45-49","115","110411","{product}","2","24","30"'


def _write(path, text: str, *, compress: bool = False, newline: str = "\n"):
    data = text.replace("\n", newline).encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _triples(interactions):
    return [(i.user_id, i.item_id, i.ts) for i in interactions]


def test_read_interactions_movielens_udata_sorts_by_ts(tmp_path):
    path = _write(
        tmp_path / "u.data",
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n22\t377\t1\t878887116\n",
    )

    interactions = read_interactions(path, "movielens")

    assert _triples(interactions) == [
        ("22", "377", 878887116.0),
        ("196", "242", 881250949.0),
        ("186", "302", 891717742.0),
    ]


def test_read_interactions_movielens_ratings_csv_header(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,0.5,1260759100\n"
    path = _write(tmp_path / "ratings.csv", text, newline="\r\n")

    interactions = read_interactions(path, "movielens")

    assert _triples(interactions) == [("1", "1029", 1260759100.0), ("1", "31", 1260759144.0)]


def test_read_interactions_movielens_keeps_every_rating(tmp_path):
    path = _write(tmp_path / "u.data", "1\t1\t1\t10\n1\t2\t5\t20\n1\t3\t0\t30\n")

    assert len(read_interactions(path, "movielens")) == 3


def test_read_interactions_movielens_canonicalises_integer_ids(tmp_path):
    path = _write(tmp_path / "u.data", "007\t0042\t3\t10\n")

    assert _triples(read_interactions(path, "movielens")) == [("7", "42", 10.0)]


def test_read_interactions_movielens_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "u.data", "1\t1\t1\t10\n\n1\t2\t5\t20\n\n")

    assert len(read_interactions(path, "movielens")) == 2


def test_read_interactions_ties_keep_file_order(tmp_path):
    rows = "".join(
        f"{user}\t{item}\t3\t{ts}\n"
        for user, item, ts in [(1, 1, 50), (2, 2, 10), (3, 3, 50), (4, 4, 10), (5, 5, 50)]
    )
    path = _write(tmp_path / "u.data", rows)

    interactions = read_interactions(path, "movielens")

    assert [i.user_id for i in interactions] == ["2", "4", "1", "3", "5"]


def test_read_interactions_tafeng_gzip_with_bom(tmp_path):
    text = (
        "\ufeff"
        + "\n".join(
            [
                TAFENG_HEADER,
                _tafeng_row("11/2/2000", "01104905", "4710199010372"),
                _tafeng_row("11/1/2000", "00418683", "4710857472535"),
                _tafeng_row("11/2/2000", "01057331", "4710043654103"),
                _tafeng_row("11/1/2000", "01104905", "4710857472535"),
            ]
        )
        + "\n"
    )
    path = _write(tmp_path / "tafeng.csv", text, compress=True, newline="\r\n")

    interactions = read_interactions(path, "tafeng")

    assert _triples(interactions) == [
        ("00418683", "4710857472535", 973036800.0),
        ("01104905", "4710857472535", 973036800.0),
        ("01104905", "4710199010372", 973123200.0),
        ("01057331", "4710043654103", 973123200.0),
    ]


def test_read_interactions_tafeng_plain_file(tmp_path):
    text = TAFENG_HEADER + "\n" + _tafeng_row("2/28/2001", "00000001", "9") + "\n"
    path = _write(tmp_path / "tafeng.csv.gz", text)

    assert _triples(read_interactions(path, "tafeng")) == [("00000001", "9", 983318400.0)]


def test_read_interactions_sessions_fractional_time(tmp_path):
    text = (
        "SessionId\tItemId\tTime\n"
        "3\t214716935\t1396437466.94\n"
        "3\t214832672\t1396438212.318\n"
        "1\t5\t1396430000\n"
    )
    path = _write(tmp_path / "clicks.txt", text)

    interactions = read_interactions(path, "sessions")

    assert _triples(interactions) == [
        ("1", "5", 1396430000.0),
        ("3", "214716935", 1396437466.94),
        ("3", "214832672", 1396438212.318),
    ]


def test_read_interactions_sessions_columns_by_header(tmp_path):
    text = "Time\tItemId\tSessionId\n20\tb\ts1\n10\ta\ts2\n"
    path = _write(tmp_path / "clicks.txt", text)

    assert _triples(read_interactions(path, "sessions")) == [("s2", "a", 10.0), ("s1", "b", 20.0)]


def test_read_interactions_rejects_jsonl(tmp_path):
    path = _write(tmp_path / "events.jsonl", '{"user_id":"u","item_id":"a"}\n')

    with pytest.raises(DatasetError, match="read_messages"):
        read_interactions(path, "jsonl")


def test_read_interactions_unknown_format_lists_formats(tmp_path):
    path = _write(tmp_path / "u.data", "1\t1\t1\t1\n")

    with pytest.raises(DatasetError) as caught:
        read_interactions(path, "netflix")

    assert "'netflix'" in str(caught.value)
    for fmt in FORMATS:
        assert fmt in str(caught.value), fmt


def test_read_messages_unknown_format_lists_formats(tmp_path):
    with pytest.raises(DatasetError, match="movielens, tafeng, sessions, jsonl"):
        read_messages(tmp_path / "x", "csv")


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_messages_missing_file_names_path(tmp_path, fmt):
    path = tmp_path / "absent.txt"

    with pytest.raises(DatasetError, match="not found") as caught:
        read_messages(path, fmt)

    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("fmt", "text", "line", "expected"),
    [
        ("movielens", "1\t1\t3\t10\n1\t2\t3\n", 2, "4 tab-separated fields"),
        ("movielens", "1\t1\t3\t10\n1\tx\t3\t20\n", 2, "invalid item id 'x'"),
        ("movielens", "1\t1\t3\t10\n\n1\t2\tgood\t20\n", 3, "invalid rating 'good'"),
        ("movielens", "1\t1\t3\tsoon\n", 1, "invalid timestamp 'soon'"),
        ("movielens", "1\t1\t3\tnan\n", 1, "invalid timestamp 'nan'"),
        ("movielens", "userId,movieId,rating,timestamp\n1,2,3\n", 2, "4 comma-separated fields"),
        ("movielens", "user item rating ts\n", 1, "unrecognised MovieLens file"),
        (
            "tafeng",
            TAFENG_HEADER + "\n" + _tafeng_row("13/1/2000", "1", "2") + "\n",
            2,
            "invalid TRANSACTION_DT",
        ),
        ("tafeng", TAFENG_HEADER + "\n" + _tafeng_row("2/30/2001", "1", "2") + "\n", 2, "M/D/YYYY"),
        (
            "tafeng",
            TAFENG_HEADER + "\n" + _tafeng_row("2001-02-01", "1", "2") + "\n",
            2,
            "M/D/YYYY",
        ),
        ("tafeng", TAFENG_HEADER + '\n"11/1/2000","1"\n', 2, "9 comma-separated fields"),
        (
            "tafeng",
            TAFENG_HEADER + "\n" + _tafeng_row("11/1/2000", "", "2") + "\n",
            2,
            "empty CUSTOMER_ID",
        ),
        ("tafeng", '"DATE","CUSTOMER_ID"\n', 1, "lacks TRANSACTION_DT, PRODUCT_ID"),
        ("sessions", "SessionId\tItemId\tTime\n1\t2\t-5\n", 2, "invalid timestamp '-5'"),
        ("sessions", "SessionId\tItemId\tTime\n1\t2\n", 2, "3 tab-separated fields"),
        ("sessions", "SessionId\tItemId\n", 1, "lacks Time"),
    ],
    ids=[
        "movielens-columns",
        "movielens-item",
        "movielens-rating",
        "movielens-timestamp",
        "movielens-nan-timestamp",
        "ratings-csv-columns",
        "movielens-unknown-first-line",
        "tafeng-month",
        "tafeng-day",
        "tafeng-iso-date",
        "tafeng-columns",
        "tafeng-empty-id",
        "tafeng-header",
        "sessions-negative-time",
        "sessions-columns",
        "sessions-header",
    ],
)
def test_read_interactions_malformed_row_names_path_line(tmp_path, fmt, text, line, expected):
    path = _write(tmp_path / "data.txt", text)

    with pytest.raises(DatasetError) as caught:
        read_interactions(path, fmt)

    assert f"{path}:{line}:" in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize("fmt", ["movielens", "tafeng", "sessions"])
def test_read_interactions_empty_file_raises(tmp_path, fmt):
    path = _write(tmp_path / "empty.txt", "")

    with pytest.raises(DatasetError, match=str(path)):
        read_interactions(path, fmt)


def test_read_interactions_truncated_gzip_raises(tmp_path):
    rows = "".join(f"{n}\t{n}\t3\t{n}\n" for n in range(2000))
    path = tmp_path / "u.data"
    path.write_bytes(gzip.compress(rows.encode())[:-200])

    with pytest.raises(DatasetError, match="truncated or corrupt gzip"):
        read_interactions(path, "movielens")


def test_read_interactions_non_utf8_raises(tmp_path):
    path = tmp_path / "clicks.txt"
    path.write_bytes(b"SessionId\tItemId\tTime\n1\t\xff\t5\n")

    with pytest.raises(DatasetError, match="not valid UTF-8"):
        read_interactions(path, "sessions")


def test_read_messages_encodes_interactions(tmp_path):
    path = _write(tmp_path / "u.data", "196\t242\t3\t881250949\n22\t377\t1\t878887116\n")

    messages = read_messages(path, "movielens")

    assert messages[0] == Message(b"22", b'{"user_id":"22","item_id":"377","ts":878887116.0}')
    assert decode_event(messages[1].value, messages[1].key) == Event("196", "242", 881250949.0)


def test_read_messages_jsonl_keeps_bad_lines(tmp_path):
    lines = [
        b'{"user_id":"u1","item_id":"a","ts":10}',
        b"not json",
        b"\xff\xfe",
        b'{"user_id":7,"item_id":"b"}',
        b'{"user_id":"u2","item_id":"c","ts":5}',
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n   \n")

    messages = read_messages(path, "jsonl")

    assert messages == [
        Message(b"u2", lines[4]),
        Message(b"u1", lines[0]),
        Message(None, lines[1]),
        Message(None, lines[2]),
        Message(b"7", lines[3]),
    ]


def test_read_messages_jsonl_effective_ts_starts_at_zero(tmp_path):
    lines = [
        b'{"user_id":"u1","item_id":"a","ts":3}',
        b"bad",
        b'{"user_id":"u1","item_id":"b","ts":0.5}',
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"bad-first\n" + b"\n".join(lines))

    values = [message.value for message in read_messages(path, "jsonl")]

    assert values == [b"bad-first", lines[2], lines[0], lines[1]]


def test_read_messages_jsonl_strips_crlf_and_bom(tmp_path):
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(
        gzip.compress(b'\xef\xbb\xbf{"user_id":"u","item_id":"a"}\r\n{"user_id":"v","item_id":"b"}')
    )

    messages = read_messages(path, "jsonl")

    assert messages == [
        Message(b"u", b'{"user_id":"u","item_id":"a"}'),
        Message(b"v", b'{"user_id":"v","item_id":"b"}'),
    ]


def test_read_messages_jsonl_empty_file(tmp_path):
    path = _write(tmp_path / "events.jsonl", "")

    assert read_messages(path, "jsonl") == []


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.integers(0, 10**6),
            st.sampled_from(["0.5", "3", "5.0"]),
            st.integers(0, 20),
        ),
        max_size=30,
    )
)
def test_read_interactions_movielens_matches_stable_sort(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("movielens") / "u.data"
    path.write_text("".join(f"{user}\t{item}\t{rating}\t{ts}\n" for user, item, rating, ts in rows))

    if not rows:
        with pytest.raises(DatasetError):
            read_interactions(path, "movielens")
        return
    interactions = read_interactions(path, "movielens")

    expected = sorted(
        ((str(user), str(item), float(ts)) for user, item, _, ts in rows), key=lambda row: row[2]
    )
    assert _triples(interactions) == expected


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(
        st.binary(max_size=40).map(lambda line: line.replace(b"\n", b"").replace(b"\r", b"")),
        max_size=20,
    )
)
def test_read_messages_jsonl_sends_every_nonblank_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("jsonl") / "events.jsonl"
    data = b"\n".join(lines)
    assume(not data.startswith(b"\x1f\x8b"))
    assume(not data.startswith(b"\xef\xbb\xbf"))
    path.write_bytes(data)

    messages = read_messages(path, "jsonl")

    expected = collections.Counter(line for line in lines if line.strip())
    assert collections.Counter(message.value for message in messages) == expected


@settings(max_examples=40, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["u1", "u2", 3]),
            st.sampled_from(["a", "b"]),
            st.one_of(st.none(), st.integers(0, 5)),
        ),
        max_size=20,
    )
)
def test_read_messages_jsonl_orders_by_effective_ts(tmp_path_factory, events):
    lines = []
    for user_id, item_id, ts in events:
        fields = {"user_id": user_id, "item_id": item_id}
        if ts is not None:
            fields["ts"] = ts
        lines.append(json.dumps(fields).encode())
    path = tmp_path_factory.mktemp("jsonl") / "events.jsonl"
    path.write_bytes(b"\n".join(lines))

    decoded = [decode_event(message.value, message.key) for message in read_messages(path, "jsonl")]

    effective = []
    current = 0.0
    for user_id, item_id, ts in events:
        current = current if ts is None else float(ts)
        effective.append((current, Event(str(user_id), item_id, None if ts is None else float(ts))))
    assert decoded == [event for _, event in sorted(effective, key=lambda pair: pair[0])]


def test_synthetic_interactions_same_seed_same_stream():
    first = synthetic_interactions(users=20, items=30, events=500, seed=3)
    second = synthetic_interactions(users=20, items=30, events=500, seed=3)

    assert first == second


def test_synthetic_interactions_other_seed_other_stream():
    first = synthetic_interactions(users=20, items=30, events=500, seed=3)
    second = synthetic_interactions(users=20, items=30, events=500, seed=4)

    assert first != second


def test_synthetic_interactions_shape():
    interactions = synthetic_interactions(users=20, items=30, events=500)

    assert len(interactions) == 500
    assert all(isinstance(i, Interaction) for i in interactions)
    assert {i.user_id for i in interactions} <= {f"u{n}" for n in range(20)}
    assert {i.item_id for i in interactions} <= {f"i{n}" for n in range(30)}
    assert all(a.ts < b.ts for a, b in zip(interactions[:-1], interactions[1:], strict=True))


def test_synthetic_interactions_default_size():
    interactions = synthetic_interactions()

    assert len(interactions) == 20000
    assert len({i.user_id for i in interactions}) == 200


def test_synthetic_interactions_last_item_beats_popularity():
    interactions = synthetic_interactions()
    last_item = {}
    successor_counts = collections.defaultdict(collections.Counter)
    popularity = collections.Counter()
    for interaction in interactions:
        previous = last_item.get(interaction.user_id)
        if previous is not None:
            successor_counts[previous][interaction.item_id] += 1
        popularity[interaction.item_id] += 1
        last_item[interaction.user_id] = interaction.item_id

    transitions = sum(sum(counts.values()) for counts in successor_counts.values())
    top_successor_share = (
        sum(counts.most_common(1)[0][1] for counts in successor_counts.values()) / transitions
    )
    top_item_share = popularity.most_common(1)[0][1] / len(interactions)

    assert top_successor_share > 0.3
    assert top_item_share < 0.05


@pytest.mark.parametrize(
    ("argument", "value"), [("users", 0), ("items", 3), ("events", -1), ("users", 2.5)]
)
def test_synthetic_interactions_rejects_invalid_sizes(argument, value):
    with pytest.raises(ConfigError, match=argument):
        synthetic_interactions(**{argument: value})


def _basket_tuples(baskets):
    return [(b.user_id, b.ts, b.item_ids) for b in baskets]


def test_read_baskets_groups_customer_day(tmp_path):
    rows = [
        _tafeng_row("11/2/2000", "A", "p1"),
        _tafeng_row("11/1/2000", "B", "p2"),
        _tafeng_row("11/2/2000", "C", "p3"),
        _tafeng_row("11/1/2000", "A", "p4"),
        _tafeng_row("11/2/2000", "A", "p5"),
        _tafeng_row("11/1/2000", "B", "p2"),
        _tafeng_row("11/1/2000", "A", "p1"),
    ]
    path = _write(tmp_path / "tafeng.csv", TAFENG_HEADER + "\n" + "\n".join(rows) + "\n", compress=True)
    nov1, nov2 = 973036800.0, 973123200.0

    baskets = read_baskets(path, "tafeng-baskets")

    assert _basket_tuples(baskets) == [
        ("B", nov1, ("p2",)),
        ("A", nov1, ("p4", "p1")),
        ("A", nov2, ("p1", "p5")),
        ("C", nov2, ("p3",)),
    ]


def test_read_baskets_drops_repeated_product(tmp_path):
    rows = [_tafeng_row("1/5/2001", "A", "p1")] * 3
    path = _write(tmp_path / "tafeng.csv", TAFENG_HEADER + "\n" + "\n".join(rows) + "\n")

    assert read_baskets(path) == [Basket("A", 978652800.0, ("p1",))]


def test_read_baskets_empty_file_has_no_baskets(tmp_path):
    path = _write(tmp_path / "tafeng.csv", TAFENG_HEADER + "\n")

    assert read_baskets(path) == []


def test_read_baskets_rejects_item_format(tmp_path):
    path = _write(tmp_path / "tafeng.csv", TAFENG_HEADER + "\n")

    with pytest.raises(DatasetError, match="tafeng-baskets"):
        read_baskets(path, "tafeng")


def test_read_baskets_malformed_row_names_line(tmp_path):
    text = TAFENG_HEADER + "\n" + _tafeng_row("11/1/2000", "A", "p1") + "\n" + _tafeng_row("13/1/2000", "A", "p2")
    path = _write(tmp_path / "tafeng.csv", text + "\n")

    with pytest.raises(DatasetError, match=":3:"):
        read_baskets(path)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 3), st.sampled_from("ABC"), st.sampled_from(["p1", "p2", "p3", "p4"])),
        max_size=30,
    )
)
def test_read_baskets_partitions_rows(tmp_path_factory, rows):
    lines = [_tafeng_row(f"11/{day}/2000", customer, product) for day, customer, product in rows]
    path = tmp_path_factory.mktemp("baskets") / "tafeng.csv"
    _write(path, TAFENG_HEADER + "\n" + "".join(line + "\n" for line in lines))

    baskets = read_baskets(path)
    expected_pairs = {(customer, day, product) for day, customer, product in rows}
    found_pairs = {(b.user_id, round((b.ts - 972950400.0) / 86400), item) for b in baskets for item in b.item_ids}
    keys = [(b.user_id, b.ts) for b in baskets]

    assert found_pairs == expected_pairs
    assert len(keys) == len(set(keys))
    assert [b.ts for b in baskets] == sorted(b.ts for b in baskets)
    assert all(len(b.item_ids) == len(set(b.item_ids)) > 0 for b in baskets)
