"""Tests of RedisStore against a real redis-server: states, offsets, item allocation and errors."""

from __future__ import annotations

import logging
import random
import threading

import numpy as np
import pytest
import redis

from drnn_core.errors import ConfigError
from drnn_core.state import UserStateBatch
from streamer.embedded import start_redis
from streamer.state_codec import StateFormatError, state_size_bytes
from streamer.store import COMMIT_OK, RedisStore, StoreArgumentError, StoreError

H = 4
K = 3


def make_store(client: redis.Redis, prefix: str) -> RedisStore:
    return RedisStore(client, prefix=prefix, hidden_size=H, window=K)


def sample_batch(size: int, seed: int = 0) -> UserStateBatch:
    rng = np.random.default_rng(seed)
    batch = UserStateBatch.empty(size, H, K)
    batch.hidden[:] = rng.standard_normal((size, H), dtype=np.float32)
    batch.start_hidden[:] = rng.standard_normal((size, H), dtype=np.float32)
    batch.window_len[:] = rng.integers(0, K + 1, size)
    batch.window[:] = np.where(np.arange(K) < batch.window_len[:, None], rng.integers(0, 100, (size, K)), -1)
    batch.count[:] = rng.integers(1, 1000, size)
    batch.last_partition[:] = rng.integers(0, 4, size)
    batch.last_offset[:] = rng.integers(0, 10**9, size)
    return batch


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Return the number of calls of each command the server has run, by lower-case name."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): fields["calls"] for name, fields in stats.items()}


def command_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: calls - before.get(name, 0) for name, calls in after.items() if calls != before.get(name, 0)}


def assert_same_states(actual: UserStateBatch, expected: UserStateBatch) -> None:
    for actual_column, expected_column in zip(actual.as_tuple(), expected.as_tuple()):
        assert np.array_equal(actual_column, expected_column)


def test_store_load_missing_users(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)

    batch, corrupt_ids = store.load_states(["u1", "u2"])

    assert corrupt_ids == []
    assert_same_states(batch, UserStateBatch.empty(2, H, K))


def test_store_load_empty_list(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)

    batch, corrupt_ids = store.load_states([])

    assert batch.size == 0
    assert corrupt_ids == []


def test_store_save_load_round_trip(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    user_ids = ["alice", "bob", "carol:with:colons", "dörte"]
    batch = sample_batch(len(user_ids))

    store.save_states(user_ids, batch, topic="events", offsets={0: 17, 3: 5})
    loaded, corrupt_ids = store.load_states(["bob", "nobody", "dörte", "alice", "carol:with:colons"])

    assert corrupt_ids == []
    expected = UserStateBatch(*(column[[1, 0, 3, 0, 2]].copy() for column in batch.as_tuple()))
    expected.reset_rows(np.array([1]))
    assert_same_states(loaded, expected)
    assert store.load_offsets("events") == {0: 17, 3: 5}


def test_store_save_is_one_transaction(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    before = command_calls(redis_client)

    store.save_states(["a", "b"], sample_batch(2), topic="events", offsets={1: 99})

    deltas = command_deltas(before, command_calls(redis_client))
    deltas.pop("info", None)
    assert deltas == {"multi": 1, "mset": 1, "hset": 1, "exec": 1}
    assert redis_client.exists(store.user_key("a"), store.user_key("b")) == 2
    assert redis_client.hgetall(store.offsets_key("events")) == {b"1": b"99"}


def test_store_load_is_one_mget(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    store.save_states(["a", "b"], sample_batch(2), topic="events", offsets={})
    before = command_calls(redis_client)

    store.load_states(["a", "b", "c"] * 100)

    deltas = command_deltas(before, command_calls(redis_client))
    deltas.pop("info", None)
    assert deltas == {"mget": 1}


def test_store_offsets_merge_by_partition(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)

    store.save_states(["a"], sample_batch(1), topic="events", offsets={0: 10, 1: 20})
    store.save_states(["a"], sample_batch(1), topic="events", offsets={1: 25, 2: 3})
    store.save_states([], UserStateBatch.empty(0, H, K), topic="other", offsets={0: 7})

    assert store.load_offsets("events") == {0: 10, 1: 25, 2: 3}
    assert store.load_offsets("other") == {0: 7}
    assert store.load_offsets("unknown") == {}


def test_store_repeated_user_last_row_wins(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    batch = sample_batch(2)

    store.save_states(["same", "same"], batch, topic="events", offsets={})
    loaded, _ = store.load_states(["same"])

    assert loaded.count[0] == batch.count[1]


def test_store_save_mismatched_ids(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)

    with pytest.raises(StoreArgumentError, match="2 user ids for 3 batch rows"):
        store.save_states(["a", "b"], sample_batch(3), topic="events", offsets={})


def test_store_corrupt_state_is_reset(redis_client, key_prefix, caplog) -> None:
    store = make_store(redis_client, key_prefix)
    store.save_states(["good", "bad"], sample_batch(2), topic="events", offsets={})
    redis_client.set(store.user_key("bad"), b"not a state")

    with caplog.at_level(logging.WARNING, logger="streamer.store"):
        loaded, corrupt_ids = store.load_states(["good", "bad"])

    assert corrupt_ids == ["bad"]
    assert loaded.count[1] == 0
    assert loaded.count[0] != 0
    assert "Reset 1 corrupt user states" in caplog.text
    assert "length is 11 bytes" in caplog.text


def test_store_other_dimensions_are_corrupt(redis_client, key_prefix) -> None:
    wide = RedisStore(redis_client, prefix=key_prefix, hidden_size=H + 1, window=K)
    wide.save_states(["a"], UserStateBatch.empty(1, H + 1, K), topic="events", offsets={})

    _loaded, corrupt_ids = make_store(redis_client, key_prefix).load_states(["a"])

    assert corrupt_ids == ["a"]


def test_store_invalid_offsets_hash(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    redis_client.hset(store.offsets_key("events"), "zero", "1")

    with pytest.raises(StoreError, match="not an integer"):
        store.load_offsets("events")


@pytest.mark.parametrize("prefix", ["", "a:b", "a*", "a b", "a[1]", None])
def test_store_invalid_prefix(redis_client, prefix) -> None:
    with pytest.raises(ConfigError):
        RedisStore(redis_client, prefix=prefix, hidden_size=H, window=K)


def test_store_prefix_isolation(redis_client, key_prefix) -> None:
    first = make_store(redis_client, key_prefix)
    second = make_store(redis_client, key_prefix + "x")
    try:
        first.save_states(["a"], sample_batch(1), topic="events", offsets={0: 1})
        first.allocate_items(["i1", "i2"])
        second.allocate_items(["i2"])

        loaded, _ = second.load_states(["a"])
        second_users = list(second.iter_user_states())
        second_offsets = second.load_offsets("events")
        second_items = (second.item_count(), second.item_ids_of([0, 1]))
        deleted = second.clear()
        first_loaded, _ = first.load_states(["a"])
    finally:
        second.clear()

    assert loaded.count[0] == 0
    assert second_users == []
    assert second_offsets == {}
    assert second_items == (1, ["i2", None])
    assert deleted == 3
    assert first_loaded.count[0] != 0
    assert first.item_count() == 2


def test_store_allocate_items_dense_and_cached(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)

    indexes = store.allocate_items(["a", "b", "a", "c"])
    before = command_calls(redis_client)
    again = store.allocate_items(["c", "a"])
    deltas = command_deltas(before, command_calls(redis_client))
    deltas.pop("info", None)

    assert indexes.dtype == np.int32
    assert indexes.tolist() == [0, 1, 0, 2]
    assert again.tolist() == [2, 0]
    assert deltas == {}
    assert store.item_count() == 3


def test_store_allocate_items_one_script_call(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    store.allocate_items(["warm"])
    before = command_calls(redis_client)

    store.allocate_items([f"item-{i % 50}" for i in range(200)])

    deltas = command_deltas(before, command_calls(redis_client))
    assert deltas.get("evalsha") == 1
    assert store.item_count() == 51


def test_store_allocate_items_empty(redis_client, key_prefix) -> None:
    indexes = make_store(redis_client, key_prefix).allocate_items([])

    assert indexes.shape == (0,)
    assert indexes.dtype == np.int32


def test_store_allocate_items_two_clients_interleaved(redis_server, key_prefix) -> None:
    client_a = redis.Redis.from_url(redis_server.url)
    client_b = redis.Redis.from_url(redis_server.url)
    store_a = make_store(client_a, key_prefix)
    store_b = make_store(client_b, key_prefix)

    first_a = store_a.allocate_items(["x", "y", "z"])
    first_b = store_b.allocate_items(["z", "w", "x"])
    second_a = store_a.allocate_items(["w", "v"])
    second_b = store_b.allocate_items(["v", "y", "u"])
    client_a.close()
    client_b.close()

    assert first_a.tolist() == [0, 1, 2]
    assert first_b.tolist() == [2, 3, 0]
    assert second_a.tolist() == [3, 4]
    assert second_b.tolist() == [4, 1, 5]


def test_store_allocate_items_concurrent_threads(redis_server, key_prefix) -> None:
    item_ids = [f"item-{i}" for i in range(400)]
    workers = 4
    barrier = threading.Barrier(workers)
    results: list[dict[str, int]] = [{} for _ in range(workers)]
    errors: list[BaseException] = []

    def allocate(worker: int) -> None:
        client = redis.Redis.from_url(redis_server.url)
        try:
            store = make_store(client, key_prefix)
            order = random.Random(worker).sample(item_ids, len(item_ids))
            barrier.wait()
            for start in range(0, len(order), 25):
                chunk = order[start : start + 25]
                results[worker].update(zip(chunk, store.allocate_items(chunk).tolist()))
        except BaseException as error:
            errors.append(error)
        finally:
            client.close()

    threads = [threading.Thread(target=allocate, args=(worker,)) for worker in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    with redis.Redis.from_url(redis_server.url) as client:
        item_count = make_store(client, key_prefix).item_count()
    assert errors == []
    assert all(result == results[0] for result in results)
    assert sorted(results[0].values()) == list(range(len(item_ids)))
    assert item_count == len(item_ids)


def test_store_item_ids_of(redis_client, key_prefix) -> None:
    make_store(redis_client, key_prefix).allocate_items(["a", "b", "c"])
    fresh = make_store(redis_client, key_prefix)

    ids = fresh.item_ids_of([2, 0, 7, -1, 2])

    assert ids == ["c", "a", None, None, "c"]
    assert fresh.allocate_items(["c"]).tolist() == [2]


def test_store_iter_user_states(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    user_ids = [f"user-{i}" for i in range(1200)]
    batch = sample_batch(len(user_ids))
    store.save_states(user_ids, batch, topic="events", offsets={})
    redis_client.set(store.user_key("broken"), b"garbage")

    summaries = list(store.iter_user_states(batch_size=100))

    expected = {
        (user_id, int(batch.count[row]), int(batch.last_partition[row]), int(batch.last_offset[row]))
        for row, user_id in enumerate(user_ids)
    }
    assert len(summaries) == len(user_ids)
    assert set(summaries) == expected


def test_store_iter_user_states_invalid_batch_size(redis_client, key_prefix) -> None:
    with pytest.raises(StoreArgumentError):
        list(make_store(redis_client, key_prefix).iter_user_states(batch_size=0))


def test_store_clear(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    user_ids = [f"user-{i}" for i in range(1500)]
    store.save_states(user_ids, sample_batch(len(user_ids)), topic="events", offsets={0: 3})
    store.allocate_items(["a", "b"])

    deleted = store.clear()

    assert deleted == 1500 + 1 + 3
    assert list(redis_client.scan_iter(match=f"{key_prefix}:*")) == []
    assert store.item_count() == 0
    assert store.allocate_items(["b"]).tolist() == [0]


def test_store_ping(redis_client, key_prefix) -> None:
    make_store(redis_client, key_prefix).ping()


def test_store_error_on_stopped_server(tmp_path) -> None:
    server = start_redis(data_dir=tmp_path / "data", log_dir=tmp_path / "log")
    client = redis.Redis.from_url(server.url, socket_connect_timeout=0.5)
    store = make_store(client, "stopped")
    store.ping()
    server.stop()

    calls = {
        "ping Redis": lambda: store.ping(),
        "load the states of 2 users": lambda: store.load_states(["a", "b"]),
        "save the states of 1 users": lambda: store.save_states(
            ["a"], sample_batch(1), topic="events", offsets={0: 1}
        ),
        "allocate indexes for 2 items": lambda: store.allocate_items(["x", "y"]),
        "load the applied offsets": lambda: store.load_offsets("events"),
    }
    for action, call in calls.items():
        with pytest.raises(StoreError) as raised:
            call()
        message = str(raised.value)
        assert action in message
        assert "'stopped'" in message
        assert server.address in message
        assert "running and reachable" in message
        assert isinstance(raised.value.__cause__, redis.exceptions.ConnectionError)
    client.close()


def test_store_error_on_wrong_type(redis_client, key_prefix) -> None:
    store = make_store(redis_client, key_prefix)
    redis_client.set(store.offsets_key("events"), b"a string")

    with pytest.raises(StoreError, match="another type") as raised:
        store.load_offsets("events")

    assert isinstance(raised.value.__cause__, redis.exceptions.ResponseError)


def test_store_float16_save_load_round_trip(redis_client, key_prefix) -> None:
    store = RedisStore(redis_client, prefix=key_prefix, hidden_size=H, window=K, state_dtype="float16")
    batch = sample_batch(3)

    store.save_states(["a", "b", "c"], batch, topic="events", offsets={0: 3})
    loaded, corrupt_ids = store.load_states(["c", "a", "b"])

    assert corrupt_ids == []
    assert len(redis_client.get(store.user_key("a"))) == state_size_bytes(H, K, "float16")
    expected = UserStateBatch(*(column[[2, 0, 1]].copy() for column in batch.as_tuple()))
    expected.hidden[:] = expected.hidden.astype(np.float16)
    expected.start_hidden[:] = expected.start_hidden.astype(np.float16)
    assert_same_states(loaded, expected)


def test_store_float16_commit_batch_round_trip(redis_client, key_prefix) -> None:
    store = RedisStore(redis_client, prefix=key_prefix, hidden_size=H, window=K, state_dtype="float16")
    epoch = store.ensure_epoch()
    batch = sample_batch(2)

    result = store.commit_batch(["a", "b"], batch, topic="t", epoch=epoch, expected_offsets={0: None}, offsets={0: 5})
    loaded, corrupt_ids = store.load_states(["a", "b"])

    assert result.status == COMMIT_OK
    assert corrupt_ids == []
    assert len(redis_client.get(store.user_key("b"))) == state_size_bytes(H, K, "float16")
    assert np.array_equal(loaded.hidden, batch.hidden.astype(np.float16).astype(np.float32))
    assert np.array_equal(loaded.count, batch.count)


@pytest.mark.parametrize("first_dtype, second_dtype", [("float32", "float16"), ("float16", "float32")])
def test_store_state_dtype_switch(redis_client, key_prefix, first_dtype, second_dtype) -> None:
    first = RedisStore(redis_client, prefix=key_prefix, hidden_size=H, window=K, state_dtype=first_dtype)
    second = RedisStore(redis_client, prefix=key_prefix, hidden_size=H, window=K, state_dtype=second_dtype)
    epoch = first.ensure_epoch()
    batch = sample_batch(1)
    batch.count[:] = 7
    first.commit_batch(["u"], batch, topic="t", epoch=epoch, expected_offsets={0: None}, offsets={0: 7})
    stored_blob = redis_client.get(first.user_key("u"))

    loaded, corrupt_ids = second.load_states(["u"])
    stale = UserStateBatch(*(column.copy() for column in loaded.as_tuple()))
    stale.count[:] = 6
    skipped = second.commit_batch(["u"], stale, topic="t", epoch=epoch, expected_offsets={0: 7}, offsets={0: 8})
    newer = UserStateBatch(*(column.copy() for column in loaded.as_tuple()))
    newer.count[:] = 8
    written = second.commit_batch(["u"], newer, topic="t", epoch=epoch, expected_offsets={0: 8}, offsets={0: 9})

    assert corrupt_ids == []
    assert loaded.count.tolist() == [7]
    assert skipped.stale_states == 1
    assert written.stale_states == 0
    assert len(stored_blob) == state_size_bytes(H, K, first_dtype)
    assert len(redis_client.get(second.user_key("u"))) == state_size_bytes(H, K, second_dtype)


def test_store_invalid_state_dtype(redis_client) -> None:
    with pytest.raises(StateFormatError, match="state_dtype"):
        RedisStore(redis_client, prefix="p", hidden_size=H, window=K, state_dtype="float64")
