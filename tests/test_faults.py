"""Fault-injection tests against a real Tansu broker and redis-server.

Each test breaks one thing while a worker runs: the worker process, Redis, the
network to the broker, a group member, the input, a stored state, the learning
rate or a checkpoint file. It then checks that every valid event changed its
user's state exactly once, so that each user's event count and last applied
(partition, offset) in Redis equal those of the produced stream.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import redis
from hypothesis import given, settings as hypothesis_settings
from hypothesis import strategies as st
from kafka import KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition
from prometheus_client import CollectorRegistry

from drnn_core.model import RecurrentBPR
from drnn_core.state import UserStateBatch
from streamer.app import build_worker
from streamer.checkpoints import CheckpointStore
from streamer.datasets import Interaction, Message, synthetic_interactions
from streamer.embedded import ManagedProcess, create_topic, free_port, start_redis, tansu_binary
from streamer.events import DecodeLimits, Event, InvalidEventError, InvalidReason, decode_event, encode_event
from streamer.settings import Settings
from streamer.state_codec import encode_states
from streamer.store import COMMIT_EPOCH_MISSING, COMMIT_OFFSETS_MISMATCH, COMMIT_OK, RedisStore
from tests.helpers import to_messages, worker_command, worker_environment, worker_settings
from tests.tcp_proxy import TcpProxy

logger = logging.getLogger(__name__)

PREFIX = "fault"
H = 16
K = 3
POLL_S = 0.05
SHORT_SESSION_MS = 3000
BROKER_CUT_S = 20.0
CRASH_KILLS = 20


# ---------------------------------------------------------------------------
# Streams: what was produced, where the broker stored it, what Redis must hold
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Produced:
    """Messages sent to a topic, in send order, and the (partition, offset) the broker gave each.

    ``users[i]`` is the user of message i when it is a valid event, None when it is invalid.
    """

    users: list[str | None]
    positions: list[tuple[int, int]]

    def __add__(self, other: "Produced") -> "Produced":
        return Produced(self.users + other.users, self.positions + other.positions)

    def expected_states(self) -> dict[str, tuple[int, int, int]]:
        """Return user -> (event count, partition, offset of the user's last event)."""
        states: dict[str, tuple[int, int, int]] = {}
        for user, (partition, offset) in zip(self.users, self.positions):
            if user is None:
                continue
            count = states[user][0] + 1 if user in states else 1
            states[user] = (count, partition, offset)
        return states

    def last_offsets(self) -> dict[int, int]:
        """Return partition -> offset of its last message, valid or not."""
        last: dict[int, int] = {}
        for partition, offset in self.positions:
            last[partition] = max(offset, last.get(partition, -1))
        return last


def produce(bootstrap: str, topic: str, messages: list[Message], users: list[str | None], **config) -> Produced:
    """Send ``messages`` in order, wait until the broker stored all, and return their positions."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=10, batch_size=256 * 1024, **config
    )
    try:
        futures = [producer.send(topic, key=message.key, value=message.value) for message in messages]
        producer.flush(timeout=120)
        stored = [future.get(timeout=60) for future in futures]
    finally:
        producer.close()
    return Produced(list(users), [(metadata.partition, metadata.offset) for metadata in stored])


def produce_interactions(bootstrap: str, topic: str, interactions: list[Interaction]) -> Produced:
    """Send interactions as valid events keyed by user."""
    return produce(bootstrap, topic, to_messages(interactions), [i.user_id for i in interactions])


def renamed_items(interactions: list[Interaction], prefix: str) -> list[Interaction]:
    """Return the interactions with every item id given a new prefix, so that they are new items."""
    return [dataclasses.replace(i, item_id=prefix + i.item_id) for i in interactions]


def new_topic(bootstrap: str, partitions: int) -> str:
    """Create a topic and its dead-letter topic ``TOPIC.dlq`` (1 partition); return the topic."""
    topic = f"fault-{uuid.uuid4().hex[:8]}"
    create_topic(bootstrap, topic, partitions)
    create_topic(bootstrap, topic + ".dlq", 1)
    return topic


def fault_settings(bootstrap: str, redis_url: str, topic: str, group_id: str, tmp_path: Path, **overrides) -> Settings:
    """Settings of a fault-test worker; the key prefix defaults to PREFIX."""
    values = dict(key_prefix=PREFIX, batch_size=200, hidden_size=H, window=K)
    values.update(overrides)
    return worker_settings(
        broker=bootstrap, redis_url=redis_url, topic=topic, group_id=group_id,
        checkpoint_dir=tmp_path / "checkpoints", **values,
    )


def store_of(client: redis.Redis, settings: Settings) -> RedisStore:
    return RedisStore(client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)


def stored_states(store: RedisStore) -> dict[str, tuple[int, int, int]]:
    """Return user -> (event count, last partition, last offset) of every state in Redis."""
    return {user: (count, partition, offset) for user, count, partition, offset in store.iter_user_states()}


def applied_events(store: RedisStore) -> int:
    """Return the sum of the users' event counts in Redis; 0 while Redis is unreachable."""
    try:
        return sum(count for _, count, _, _ in store.iter_user_states())
    except Exception:
        return 0


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, detail: Callable[[], str] | None = None) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` (and ``detail()``) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            extra = f": {detail()}" if detail is not None else ""
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting until {what}{extra}")
        time.sleep(POLL_S)


def states_match(store: RedisStore, expected: dict) -> Callable[[], bool]:
    return lambda: stored_states(store) == expected


def describe_mismatch(store: RedisStore, expected: dict) -> Callable[[], str]:
    """Return a function that summarises how the states in Redis differ from ``expected``."""

    def describe() -> str:
        try:
            actual = stored_states(store)
        except redis.exceptions.RedisError as error:
            return f"Redis unreachable ({error})"
        wrong = [user for user in expected.keys() | actual.keys() if expected.get(user) != actual.get(user)]
        sample = {user: (actual.get(user), expected.get(user)) for user in sorted(wrong)[:5]}
        return (
            f"{len(wrong)} users differ; applied {sum(c for c, _, _ in actual.values())} of "
            f"{sum(c for c, _, _ in expected.values())} events; (stored, expected) of the first: {sample}"
        )

    return describe


def committed_offsets(bootstrap: str, group_id: str, topic: str, partitions: int) -> dict[int, int | None]:
    """Return partition -> offset committed by the group, read without joining it."""
    checker = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    try:
        return {p: checker.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        checker.close()


def item_index_problems(worker_store: RedisStore, client: redis.Redis, prefix: str, item_ids: list[str]) -> dict[str, list[str]]:
    """Compare the item indexes a worker uses with the item hash in Redis.

    The worker reads indexes from its cache, so an item cached there resolves
    without touching Redis. Redis must give every id the index the worker uses,
    or another worker (or this one after a restart) trains the item on another
    row of the model, and no Redis index may belong to another id in the worker.

    Returns
    -------
    dict
        "missing in Redis", "other index in Redis" and "index of another item
        in the worker": the item ids with each problem.
    """
    in_worker = dict(zip(item_ids, worker_store.allocate_items(item_ids).tolist()))
    in_redis = {key.decode(): int(value) for key, value in client.hgetall(f"{prefix}:item:index".encode()).items()}
    owners_in_worker = collections.defaultdict(set)
    for item_id, index in in_worker.items():
        owners_in_worker[index].add(item_id)
    return {
        "missing in Redis": [i for i in item_ids if i not in in_redis],
        "other index in Redis": [i for i in item_ids if i in in_redis and in_redis[i] != in_worker[i]],
        "index of another item in the worker": sorted(
            i for i, index in in_redis.items() if owners_in_worker.get(index, {i}) - {i}
        ),
    }


def log_messages(caplog, name: str = "streamer", level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(name) and r.levelno >= level]


def http_get(url: str) -> tuple[int, str]:
    """GET ``url``; return (status, body) for success and error statuses alike."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class WorkerThread:
    """A worker from ``build_worker`` running in a background thread while the test injects faults."""

    def __init__(self, settings: Settings, until: Callable | None = None) -> None:
        self.registry = CollectorRegistry()
        self.worker = build_worker(settings, registry=self.registry)
        self.until = until
        self.error: BaseException | None = None
        self.totals = None
        self._thread = threading.Thread(target=self._run, name="fault-worker", daemon=True)

    def start(self) -> "WorkerThread":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.totals = self.worker.run(until=self.until)
        except BaseException as error:
            logger.exception("The worker raised")
            self.error = error

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = 60.0) -> None:
        """Wait for the run to end; after ``timeout_s``, stop the worker and fail."""
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            return
        self.worker.request_stop()
        self._thread.join(30.0)
        raise AssertionError(f"the worker was still running after {timeout_s:.0f} s and was stopped")

    def stop(self, timeout_s: float = 60.0) -> None:
        self.worker.request_stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"the worker did not stop within {timeout_s:.0f} s"

    def metric(self, name: str, labels: dict | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.worker.metrics_server.server_port}{path}"


class RestartableRedis:
    """A redis-server with an append-only file on a fixed port and data directory, stopped and started by the test."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.data_dir = root / "redis-data"
        self.log_dir = root / "redis-log"
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, data_dir: Path | None = None) -> "RestartableRedis":
        """Start on the same port, on ``data_dir`` (default: the same directory), and wait until it loaded its data."""
        self.process = start_redis(
            port=self.port, data_dir=data_dir or self.data_dir, appendonly=True, log_dir=self.log_dir
        )
        client = redis.Redis.from_url(self.url)
        try:
            wait_until(lambda: client.ping(), 30, "redis-server loaded its append-only file")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        self.process.stop()

    def kill(self) -> None:
        self.process.kill()

    def snapshot(self, target: Path) -> None:
        """Copy the data directory (the append-only file) as it is now."""
        shutil.copytree(self.data_dir, target)

    def roll_back(self, snapshot: Path) -> None:
        """Replace the data directory with a snapshot; call only while the server is down."""
        shutil.rmtree(self.data_dir)
        shutil.copytree(snapshot, self.data_dir)


@pytest.fixture
def own_redis(tmp_path: Path):
    """A redis-server of this test alone, with an append-only file, that the test may stop, kill and restart."""
    server = RestartableRedis(tmp_path).start()
    yield server
    if server.process is not None:
        server.process.stop()


# ---------------------------------------------------------------------------
# The TCP proxy itself
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def echo_server():
    """Yield the port of a TCP echo server on 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve(connection: socket.socket) -> None:
        with connection:
            while data := connection.recv(4096):
                connection.sendall(data)

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def echo_round_trip(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2.0) as connection:
        connection.sendall(payload)
        return connection.recv(4096)


def test_tcp_proxy_forwards_cuts_and_restores():
    with echo_server() as target, TcpProxy(target) as proxy:
        assert echo_round_trip(proxy.port) == b"ping"

        open_connection = socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0)
        open_connection.sendall(b"a")
        assert open_connection.recv(16) == b"a"
        proxy.cut("refuse")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2.0)
        try:
            open_connection.sendall(b"b")
            reply = open_connection.recv(16)
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
        open_connection.close()
        assert reply == b""

        proxy.restore()
        assert echo_round_trip(proxy.port) == b"ping"


def test_tcp_proxy_blackhole_swallows_requests():
    with echo_server() as target, TcpProxy(target) as proxy:
        proxy.cut("blackhole")
        held = socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5)
        held.sendall(b"lost")
        with pytest.raises(socket.timeout):
            held.recv(16)
        wait_until(lambda: proxy.accepted_while_cut == 1, 5, "the proxy holds the connection")

        proxy.restore()
        assert held.recv(16) == b""
        held.close()
        assert echo_round_trip(proxy.port) == b"ping"


# ---------------------------------------------------------------------------
# 1. Worker crash, and the stale-write fence of the store
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_sigkill_at_random_points_exact(broker, redis_server, redis_client, key_prefix, group_id, tmp_path):
    topic = new_topic(broker, 4)
    settings = fault_settings(
        broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix,
        batch_size=50, session_timeout_ms=2000, exit_when_idle_seconds=4.0,
    )
    interactions = synthetic_interactions(users=200, items=300, events=20000, seed=11)
    produced = produce_interactions(broker, topic, interactions)
    store = store_of(redis_client, settings)
    rng = random.Random(20)
    kill_points = sorted(rng.sample(range(200, 14000), CRASH_KILLS))
    env = worker_environment(settings)
    killed_at = []

    with open(tmp_path / "worker.log", "ab") as log:
        for point in kill_points:
            target = max(point, applied_events(store) + 1)
            process = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=log)
            try:
                wait_until(
                    lambda: applied_events(store) >= target or process.poll() is not None, 120,
                    f"the worker applied {target} events",
                )
                time.sleep(rng.uniform(0.0, 0.05))
                assert process.poll() is None, f"the worker exited with status {process.returncode} before the kill"
            finally:
                process.kill()
                process.wait()
            killed_at.append(applied_events(store))

        final = subprocess.run(worker_command(), env=env, stdout=log, stderr=log, timeout=240)

    assert len(killed_at) == CRASH_KILLS
    assert len(set(killed_at)) == CRASH_KILLS, f"some runs were killed before they applied an event: {killed_at}"
    assert max(killed_at) < len(interactions), f"a run finished the stream before its kill: {killed_at}"
    assert final.returncode == 0
    assert stored_states(store) == produced.expected_states(), describe_mismatch(store, produced.expected_states())()
    assert store.load_offsets(topic) == produced.last_offsets()


def one_state(count: int, *, hidden: float, offset: int, partition: int = 0) -> UserStateBatch:
    batch = UserStateBatch.empty(1, 4, 3)
    batch.hidden[:] = hidden
    batch.window[0, 0] = 7
    batch.window_len[:] = 1
    batch.count[:] = count
    batch.last_partition[:] = partition
    batch.last_offset[:] = offset
    return batch


def direct_store(redis_client, key_prefix) -> tuple[RedisStore, str]:
    store = RedisStore(redis_client, prefix=key_prefix, hidden_size=4, window=3)
    return store, store.ensure_epoch()


def test_store_commit_batch_skips_stale_state(redis_client, key_prefix):
    store, epoch = direct_store(redis_client, key_prefix)
    newer = one_state(5, hidden=0.5, offset=10)
    first = store.commit_batch(["u1"], newer, topic="t", epoch=epoch, expected_offsets={0: None}, offsets={0: 10})
    stored_blob = redis_client.get(store.user_key("u1"))

    older = one_state(3, hidden=-0.25, offset=6)
    second = store.commit_batch(["u1"], older, topic="t", epoch=epoch, expected_offsets={0: 10}, offsets={0: 11})

    assert first.status == COMMIT_OK
    assert second.status == COMMIT_OK
    assert second.stale_states == 1
    assert redis_client.get(store.user_key("u1")) == stored_blob
    assert stored_blob == encode_states(newer)[0]
    assert store.load_offsets("t") == {0: 11}


def test_store_commit_batch_skips_equal_count_state(redis_client, key_prefix):
    store, epoch = direct_store(redis_client, key_prefix)
    store.commit_batch(["u1"], one_state(4, hidden=0.5, offset=3), topic="t", epoch=epoch,
                       expected_offsets={0: None}, offsets={0: 3})
    stored_blob = redis_client.get(store.user_key("u1"))

    again = store.commit_batch(["u1"], one_state(4, hidden=0.9, offset=3), topic="t", epoch=epoch,
                               expected_offsets={0: 3}, offsets={0: 3})

    assert again.stale_states == 1
    assert redis_client.get(store.user_key("u1")) == stored_blob


def test_store_commit_batch_writes_newer_state(redis_client, key_prefix):
    store, epoch = direct_store(redis_client, key_prefix)
    store.commit_batch(["u1"], one_state(2, hidden=0.5, offset=3), topic="t", epoch=epoch,
                       expected_offsets={0: None}, offsets={0: 3})

    newer = one_state(3, hidden=0.75, offset=4)
    result = store.commit_batch(["u1"], newer, topic="t", epoch=epoch, expected_offsets={0: 3}, offsets={0: 4})

    assert result.stale_states == 0
    assert redis_client.get(store.user_key("u1")) == encode_states(newer)[0]


def test_store_commit_batch_wrong_epoch_writes_nothing(redis_client, key_prefix):
    store, epoch = direct_store(redis_client, key_prefix)

    result = store.commit_batch(["u1"], one_state(1, hidden=0.5, offset=0), topic="t", epoch="not-" + epoch,
                                expected_offsets={0: None}, offsets={0: 0}, new_users=1)

    assert result.status == COMMIT_EPOCH_MISSING
    assert redis_client.get(store.user_key("u1")) is None
    assert store.load_offsets("t") == {}
    assert store.user_count() == 0


def test_store_commit_batch_offsets_mismatch_writes_nothing(redis_client, key_prefix):
    store, epoch = direct_store(redis_client, key_prefix)
    store.commit_batch(["u1"], one_state(1, hidden=0.5, offset=0), topic="t", epoch=epoch,
                       expected_offsets={0: None}, offsets={0: 0})
    stored_blob = redis_client.get(store.user_key("u1"))

    result = store.commit_batch(["u1", "u2"], _two_states(), topic="t", epoch=epoch,
                                expected_offsets={0: 5, 1: None}, offsets={0: 9, 1: 2})

    assert result.status == COMMIT_OFFSETS_MISMATCH
    assert result.partition == 0
    assert result.stored_offset == 0
    assert redis_client.get(store.user_key("u1")) == stored_blob
    assert redis_client.get(store.user_key("u2")) is None
    assert store.load_offsets("t") == {0: 0}


def _two_states() -> UserStateBatch:
    batch = UserStateBatch.empty(2, 4, 3)
    batch.count[:] = [9, 1]
    batch.last_partition[:] = [0, 1]
    batch.last_offset[:] = [9, 2]
    return batch


def test_store_commit_batch_forced_overwrites_corrupt_state(redis_client, key_prefix):
    store, epoch = direct_store(redis_client, key_prefix)
    corrupt = bytearray(encode_states(one_state(2**40, hidden=0.5, offset=99))[0])
    corrupt[30:34] = np.float32(np.nan).tobytes()
    redis_client.set(store.user_key("u1"), bytes(corrupt))
    _, corrupt_ids = store.load_states(["u1"])

    fresh = one_state(1, hidden=0.25, offset=0)
    result = store.commit_batch(["u1"], fresh, topic="t", epoch=epoch, expected_offsets={0: None},
                                offsets={0: 0}, forced_users=corrupt_ids)

    assert corrupt_ids == ["u1"]
    assert result.stale_states == 0
    assert redis_client.get(store.user_key("u1")) == encode_states(fresh)[0]


# ---------------------------------------------------------------------------
# 2. Redis outage, and Redis restarted empty
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outage_s", [pytest.param(6.0, id="6s"), pytest.param(30.0, id="30s", marks=pytest.mark.slow)]
)
def test_redis_outage_pauses_commits_and_resumes(broker, group_id, tmp_path, caplog, own_redis, outage_s):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 4)
    settings = fault_settings(broker, own_redis.url, topic, group_id, tmp_path, batch_size=100,
                              metrics_address="127.0.0.1:0")
    interactions = synthetic_interactions(users=100, items=150, events=8000, seed=21)
    first, second = interactions[:4000], interactions[4000:]
    client = redis.Redis.from_url(own_redis.url)
    store = store_of(client, settings)
    produced = produce_interactions(broker, topic, first)
    runner = WorkerThread(settings).start()

    try:
        wait_until(lambda: applied_events(store) >= 1000, 60, "the worker applied 1000 events")
        assert http_get(runner.url("/readyz"))[0] == 200
        own_redis.stop()
        stopped_at = time.monotonic()
        produced += produce_interactions(broker, topic, second)
        wait_until(lambda: http_get(runner.url("/readyz"))[0] == 503, 15, "/readyz reports not ready")
        time.sleep(1.0)
        committed_early = committed_offsets(broker, group_id, topic, 4)
        time.sleep(max(0.0, outage_s - (time.monotonic() - stopped_at)))
        committed_late = committed_offsets(broker, group_id, topic, 4)
        ready_late = http_get(runner.url("/readyz"))
        health_late = http_get(runner.url("/healthz"))[0]
        attempts = runner.metric("drnn_errors_total", {"component": "redis"})

        own_redis.start()
        wait_until(lambda: http_get(runner.url("/readyz"))[0] == 200, 30, "/readyz reports ready again")
        expected = produced.expected_states()
        wait_until(states_match(store, expected), 90, "every event is applied", describe_mismatch(store, expected))
    finally:
        runner.stop()

    committed_final = committed_offsets(broker, group_id, topic, 4)
    retry_warnings = [r for r in caplog.records if r.name == "streamer.worker" and "retrying in" in r.getMessage()]
    assert runner.error is None
    assert stored_states(store) == produced.expected_states()
    assert committed_late == committed_early
    assert committed_final == {p: offset + 1 for p, offset in produced.last_offsets().items()}
    assert ready_late[0] == 503
    assert json.loads(ready_late[1])["ready"] is False
    assert health_late == 200
    assert retry_warnings, "no retry was logged during the outage"
    assert all(r.levelno == logging.WARNING for r in retry_warnings)
    assert len(retry_warnings) < attempts, "every failed attempt was logged: the retry log is not rate-limited"
    assert len(retry_warnings) <= 3 * (math.ceil(outage_s / 10.0) + 1)
    client.close()


def test_worker_stop_during_redis_outage_at_start(broker, group_id, tmp_path, own_redis):
    topic = new_topic(broker, 1)
    settings = fault_settings(broker, own_redis.url, topic, group_id, tmp_path, metrics_address="127.0.0.1:0")
    own_redis.stop()
    runner = WorkerThread(settings).start()
    port = runner.worker.metrics_server.server_port

    wait_until(lambda: "Redis" in http_get(runner.url("/readyz"))[1], 15, "/readyz names the Redis failure")
    status, body = http_get(runner.url("/readyz"))
    runner.stop()

    assert status == 503
    assert json.loads(body)["ready"] is False
    assert runner.error is None, f"run() raised {runner.error!r} when stopped while Redis was down at start"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()


@pytest.mark.parametrize("policy", ["continue", "rebuild"])
def test_redis_restarted_empty_follows_policy(broker, group_id, tmp_path, caplog, own_redis, policy):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 4)
    settings = fault_settings(broker, own_redis.url, topic, group_id, tmp_path, redis_loss_policy=policy)
    interactions = synthetic_interactions(users=60, items=80, events=6000, seed=22)
    first, second = interactions[:3000], interactions[3000:]
    client = redis.Redis.from_url(own_redis.url)
    store = store_of(client, settings)
    before = produce_interactions(broker, topic, first)
    runner = WorkerThread(settings).start()

    try:
        wait_until(states_match(store, before.expected_states()), 60, "the first half is applied",
                   describe_mismatch(store, before.expected_states()))
        own_redis.stop()
        own_redis.start(data_dir=tmp_path / "empty-redis-data")
        after = produce_interactions(broker, topic, second)
        expected = (before + after).expected_states() if policy == "rebuild" else after.expected_states()
        wait_until(states_match(store, expected), 90, f"the states follow policy {policy}",
                   describe_mismatch(store, expected))
    finally:
        runner.stop()

    items = sorted({i.item_id for i in interactions})
    assert runner.error is None
    assert stored_states(store) == expected
    assert store.load_offsets(topic) == (before + after).last_offsets()
    assert runner.metric("drnn_redis_state_loss_total", {"kind": "epoch_missing"}) == 1
    assert any("lost its data" in m for m in log_messages(caplog, level=logging.ERROR))
    assert client.get(f"{PREFIX}:epoch".encode()) is not None
    problems = item_index_problems(runner.worker.store, client, PREFIX, items)
    client.close()
    assert problems["missing in Redis"] == []
    assert problems["other index in Redis"] == []
    assert problems["index of another item in the worker"] == []


# ---------------------------------------------------------------------------
# 3. Redis killed, and Redis losing its last writes
# ---------------------------------------------------------------------------


def test_redis_sigkill_everysec_exact(broker, group_id, tmp_path, caplog, own_redis):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 4)
    settings = fault_settings(broker, own_redis.url, topic, group_id, tmp_path, batch_size=100)
    interactions = synthetic_interactions(users=100, items=150, events=10000, seed=31)
    client = redis.Redis.from_url(own_redis.url)
    store = store_of(client, settings)
    produced = produce_interactions(broker, topic, interactions)
    runner = WorkerThread(settings).start()

    try:
        wait_until(lambda: applied_events(store) >= 2500, 60, "the worker applied 2500 events")
        own_redis.kill()
        killed_at = time.monotonic()
        time.sleep(1.0)
        own_redis.start()
        expected = produced.expected_states()
        wait_until(states_match(store, expected), 90, "every event is applied", describe_mismatch(store, expected))
    finally:
        runner.stop()

    assert runner.error is None
    assert stored_states(store) == expected
    assert store.load_offsets(topic) == produced.last_offsets()
    assert time.monotonic() - killed_at > 1.0
    client.close()


def test_redis_rollback_reapplies_lost_writes(broker, group_id, tmp_path, caplog, own_redis):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 4)
    settings = fault_settings(broker, own_redis.url, topic, group_id, tmp_path)
    base = synthetic_interactions(users=60, items=80, events=6000, seed=32)
    first = base[:2000]
    lost = renamed_items(base[2000:4000], "j")
    last = renamed_items(base[4000:], "k")
    client = redis.Redis.from_url(own_redis.url)
    store = store_of(client, settings)
    produced = produce_interactions(broker, topic, first)
    runner = WorkerThread(settings).start()

    try:
        wait_until(states_match(store, produced.expected_states()), 60, "the first part is applied")
        own_redis.snapshot(tmp_path / "aof-snapshot")
        produced += produce_interactions(broker, topic, lost)
        wait_until(states_match(store, produced.expected_states()), 60, "the second part is applied")
        own_redis.kill()
        own_redis.roll_back(tmp_path / "aof-snapshot")
        own_redis.start()
        assert sum(c for c, _, _ in stored_states(store).values()) == len(first), "the rollback did not take"
        produced += produce_interactions(broker, topic, last)
        expected = produced.expected_states()
        wait_until(states_match(store, expected), 90, "every event is applied again",
                   describe_mismatch(store, expected))
    finally:
        runner.stop()

    items = sorted({i.item_id for i in first + lost + last})
    assert runner.error is None
    assert stored_states(store) == expected
    assert store.load_offsets(topic) == produced.last_offsets()
    assert runner.metric("drnn_redis_state_loss_total", {"kind": "offsets_behind"}) >= 1
    assert any("lost its last writes" in m for m in log_messages(caplog, level=logging.ERROR))
    problems = item_index_problems(runner.worker.store, client, PREFIX, items)
    client.close()
    assert problems["missing in Redis"] == []
    assert problems["other index in Redis"] == []
    assert problems["index of another item in the worker"] == []


# ---------------------------------------------------------------------------
# 4. Broker unreachable, through a proxy that Tansu advertises
# ---------------------------------------------------------------------------


def _kill_with_parent():
    """Return a preexec_fn that makes the child receive SIGKILL when the spawning thread exits."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_death_signal


def start_tansu_behind(advertised_port: int, log_dir: Path) -> ManagedProcess:
    """Start Tansu on a free port, advertising 127.0.0.1:``advertised_port`` so that clients reconnect there."""
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    command = [
        tansu_binary(), "broker", "--listener-url", listener,
        "--advertised-listener-url", f"tcp://127.0.0.1:{advertised_port}",
        "--storage-engine", "memory://tansu/",
    ]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"tansu-{port}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"}, start_new_session=True, preexec_fn=_kill_with_parent(),
        )
    process = ManagedProcess(name="tansu", popen=popen, port=port, url=listener, log_path=log_path,
                             stop_signal=signal.SIGINT)

    def accepts() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True

    wait_until(accepts, 10, f"Tansu accepts connections on port {port}")
    return process


@pytest.mark.parametrize("mode", ["refuse", pytest.param("blackhole", marks=pytest.mark.slow)])
def test_broker_cut_reconnects_exact(redis_server, redis_client, key_prefix, group_id, tmp_path, caplog, mode):
    caplog.set_level(logging.INFO, logger="streamer")
    proxy_port = free_port()
    tansu = start_tansu_behind(proxy_port, tmp_path / "tansu")
    proxy = TcpProxy(tansu.port, listen_port=proxy_port).start()

    try:
        topic = new_topic(proxy.address, 4)
        settings = fault_settings(proxy.address, redis_server.url, topic, group_id, tmp_path,
                                  key_prefix=key_prefix, batch_size=100)
        interactions = synthetic_interactions(users=80, items=120, events=8000, seed=41)
        store = store_of(redis_client, settings)
        produced = produce_interactions(proxy.address, topic, interactions[:4000])
        runner = WorkerThread(settings).start()
        try:
            wait_until(lambda: applied_events(store) >= 1000, 60, "the worker applied 1000 events")
            reset_connections = proxy.cut(mode)
            cut_at = time.monotonic()
            applied_at_cut = applied_events(store)
            time.sleep(BROKER_CUT_S)
            alive_during_cut = runner.running
            proxy.restore()
            restored_after = time.monotonic() - cut_at
            produced += produce_interactions(proxy.address, topic, interactions[4000:])
            expected = produced.expected_states()
            wait_until(states_match(store, expected), 120, "every event is applied after the cut",
                       describe_mismatch(store, expected))
        finally:
            runner.stop()
    finally:
        proxy.close()
        tansu.stop()

    assert runner.error is None
    assert reset_connections >= 2, "the worker's consumer and producer were not connected through the proxy"
    assert alive_during_cut
    assert restored_after >= BROKER_CUT_S
    assert applied_at_cut < len(interactions)
    assert stored_states(store) == expected
    assert store.load_offsets(topic) == produced.last_offsets()


# ---------------------------------------------------------------------------
# 5. Rebalance: a second member joins, then one of the two is killed
# ---------------------------------------------------------------------------


ASSIGNED = re.compile(r"Assigned partitions \[([0-9, ]*)\]")


def assignments(log_path: Path) -> list[list[int]]:
    """Return the partition lists of every "Assigned partitions" line of a worker log."""
    text = log_path.read_text(errors="replace")
    return [[int(p) for p in match.group(1).split(",") if p.strip()] for match in ASSIGNED.finditer(text)]


def test_rebalance_survivor_takes_over_exact(broker, redis_server, redis_client, key_prefix, group_id, tmp_path):
    topic = new_topic(broker, 4)
    settings = fault_settings(broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix,
                              batch_size=100, session_timeout_ms=SHORT_SESSION_MS)
    interactions = synthetic_interactions(users=120, items=150, events=12000, seed=51)
    parts = [interactions[:4000], interactions[4000:8000], interactions[8000:]]
    store = store_of(redis_client, settings)
    env = worker_environment(settings)
    logs = {name: tmp_path / f"worker-{name}.log" for name in ("a", "b")}
    processes: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        with open(logs[name], "ab") as log:
            processes[name] = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT)

    def last_assignments() -> tuple[list[int], list[int]]:
        return tuple((assignments(logs[name]) or [[]])[-1] for name in ("a", "b"))

    try:
        produced = produce_interactions(broker, topic, parts[0])
        start("a")
        wait_until(lambda: applied_events(store) >= 1000, 60, "worker a applied 1000 events")

        start("b")
        wait_until(lambda: all(last_assignments()) and sorted(sum(last_assignments(), [])) == [0, 1, 2, 3],
                   60, "workers a and b share the partitions")
        produced += produce_interactions(broker, topic, parts[1])
        wait_until(lambda: applied_events(store) >= len(parts[0]) + 1000, 60, "both workers applied events")
        shared_a, shared_b = last_assignments()

        processes["a"].kill()
        processes["a"].wait()
        assigned_before_kill = len(assignments(logs["b"]))
        produced += produce_interactions(broker, topic, parts[2])
        expected = produced.expected_states()
        wait_until(states_match(store, expected), 120, "the survivor applied every event",
                   describe_mismatch(store, expected))

        processes["b"].send_signal(signal.SIGTERM)
        survivor_status = processes["b"].wait(timeout=60)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()

    taken_over = assignments(logs["b"])[assigned_before_kill:]
    assert sorted(shared_a + shared_b) == [0, 1, 2, 3]
    assert shared_a and shared_b
    assert [0, 1, 2, 3] in taken_over
    assert survivor_status == 0
    assert stored_states(store) == expected
    assert store.load_offsets(topic) == produced.last_offsets()


# ---------------------------------------------------------------------------
# 6. A batch that takes longer than the session timeout
# ---------------------------------------------------------------------------


SLOW_HIDDEN = 512
SLOW_SESSION_MS = 6000


def seconds_per_event(settings: Settings) -> float:
    """Time the batch kernel of a fresh model with these settings, per event, after a warm-up call."""
    model = RecurrentBPR(settings.model_config())
    states = UserStateBatch.empty(20, settings.hidden_size, settings.window)
    rng = np.random.default_rng(0)

    def call(events: int, start: int) -> float:
        slots = rng.integers(0, 20, events).astype(np.int32)
        items = rng.integers(0, 200, events).astype(np.int32)
        started = time.perf_counter()
        model.train_batch(states, slots, items, np.zeros(events, np.int32), np.arange(start, start + events, dtype=np.int64))
        return time.perf_counter() - started

    call(10, 0)
    return call(100, 10) / 100


@pytest.mark.slow
def test_slow_batch_keeps_group_membership(broker, redis_server, redis_client, key_prefix, group_id, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 1)
    settings = fault_settings(broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix,
                              hidden_size=SLOW_HIDDEN, window=4, session_timeout_ms=SLOW_SESSION_MS,
                              batch_size=20000)
    events = int(min(20000, max(300, 2.0 * SLOW_SESSION_MS / 1000 / seconds_per_event(settings))))
    interactions = synthetic_interactions(users=50, items=200, events=events, seed=61)
    produced = produce_interactions(broker, topic, interactions)
    store = store_of(redis_client, settings)
    durations: list[float] = []
    records_at_stop: list[int] = []

    def until(totals) -> bool:
        if totals.consumed >= len(interactions):
            records_at_stop.append(len(caplog.records))
            return True
        return False

    runner = WorkerThread(settings, until=until)
    train_batch = runner.worker.model.train_batch

    def timed_train_batch(*args, **kwargs):
        started = time.perf_counter()
        try:
            return train_batch(*args, **kwargs)
        finally:
            durations.append(time.perf_counter() - started)

    runner.worker.model.train_batch = timed_train_batch
    runner.start().join(timeout_s=180)

    during_run = [r.getMessage() for r in caplog.records[: records_at_stop[0]]] if records_at_stop else []
    assert runner.error is None
    assert records_at_stop, "the worker stopped before it consumed the stream"
    assert max(durations) > SLOW_SESSION_MS / 1000, f"no kernel call outlasted the session timeout: {durations}"
    assert sum(1 for m in during_run if m.startswith("Assigned partitions")) == 1
    assert not [m for m in during_run if m.startswith(("Lost partitions", "Revoked partitions"))]
    assert stored_states(store) == produced.expected_states()


# ---------------------------------------------------------------------------
# 7. Poison input: fuzzing decode_event, and 100,000 malformed messages
# ---------------------------------------------------------------------------


FUZZ_LIMITS = DecodeLimits(max_message_bytes=4096, max_id_length=32)
MAX_DETAIL_CHARS = 300


def check_decode_outcome(value: bytes | None, key: bytes | None, limits: DecodeLimits) -> Event | InvalidEventError:
    """Decode and check the contract of either outcome; return the event or the error."""
    try:
        event = decode_event(value, key, limits)
    except InvalidEventError as error:
        assert isinstance(error.reason, InvalidReason)
        assert len(error.detail) <= MAX_DETAIL_CHARS
        if value is not None and len(value) > limits.max_message_bytes:
            assert error.reason == InvalidReason.TOO_LARGE
        return error

    assert value is not None and len(value) <= limits.max_message_bytes
    for identifier in (event.user_id, event.item_id):
        assert 0 < len(identifier) <= limits.max_id_length
        assert not identifier.isspace()
        identifier.encode("utf-8")
    assert event.ts is None or (math.isfinite(event.ts) and event.ts >= 0.0)
    assert key is None or key == event.user_id.encode("utf-8")
    assert key is not None or not limits.require_key
    return event


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]), st.integers(0, 10**6), st.integers(0, 255)),
    min_size=1, max_size=6,
)


def mutate(value: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(value)
    for kind, where, byte in edits:
        position = where % (len(data) + 1)
        if kind == "flip" and data:
            data[position % len(data)] ^= byte or 1
        elif kind == "insert":
            data.insert(position, byte)
        elif kind == "delete" and data:
            del data[position % len(data)]
        elif kind == "truncate":
            del data[position:]
    return bytes(data)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    user_id=st.one_of(st.text(min_size=1, max_size=12), st.integers(-(10**12), 10**12)),
    item_id=st.one_of(st.text(min_size=1, max_size=12), st.integers(-(10**12), 10**12)),
    ts=st.one_of(st.none(), st.floats(0, 1e10, allow_nan=False)),
    edits=mutations,
    keep_key=st.booleans(),
)
def test_decode_event_fuzz_mutated_valid_messages(user_id, item_id, ts, edits, keep_key):
    try:
        key, value = encode_event(user_id, item_id, ts)
    except InvalidEventError:
        return

    check_decode_outcome(mutate(value, edits), key if keep_key else None, FUZZ_LIMITS)


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    value=st.one_of(st.binary(max_size=600), st.builds(lambda u, i: json.dumps({"user_id": u, "item_id": i}).encode(),
                                                        st.text(max_size=50), st.text(max_size=50))),
    key=st.one_of(st.none(), st.binary(max_size=8)),
    max_message_bytes=st.integers(64, 512),
    max_id_length=st.integers(1, 40),
    require_key=st.booleans(),
)
def test_decode_event_fuzz_limits_hold(value, key, max_message_bytes, max_id_length, require_key):
    limits = DecodeLimits(max_message_bytes=max_message_bytes, max_id_length=max_id_length, require_key=require_key)

    check_decode_outcome(value, key, limits)


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    depth=st.integers(500, 200_000),
    opener=st.sampled_from([b"[", b'{"a":', b'[{"b":']),
    closed=st.booleans(),
)
def test_decode_event_fuzz_deep_nesting(depth, opener, closed):
    closer = {b"[": b"]", b'{"a":': b"}", b'[{"b":': b"}]"}[opener]
    value = opener * depth + (b"1" + closer * depth if closed else b"")
    limits = DecodeLimits(max_message_bytes=len(value) + 1)

    outcome = check_decode_outcome(value, None, limits)

    assert isinstance(outcome, InvalidEventError)
    assert outcome.reason in (InvalidReason.NOT_JSON, InvalidReason.NOT_OBJECT, InvalidReason.MISSING_USER_ID)


NON_FINITE = [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]


@hypothesis_settings(max_examples=100, deadline=None)
@given(field=st.sampled_from(["user_id", "item_id", "ts"]), constant=st.sampled_from(NON_FINITE))
def test_decode_event_fuzz_non_finite_constants(field, constant):
    fields = {"user_id": b'"u1"', "item_id": b'"i1"', "ts": b"1.5"}
    fields[field] = constant
    value = b"{" + b",".join(b'"%s":%s' % (name.encode(), text) for name, text in fields.items()) + b"}"

    outcome = check_decode_outcome(value, b"u1", DecodeLimits())

    expected = {"user_id": InvalidReason.INVALID_USER_ID, "item_id": InvalidReason.INVALID_ITEM_ID,
                "ts": InvalidReason.NON_FINITE_TS}[field]
    assert isinstance(outcome, InvalidEventError)
    assert outcome.reason == expected


@hypothesis_settings(max_examples=200, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=12)), user_id=st.text(min_size=1, max_size=8))
def test_decode_event_fuzz_keys(key, user_id):
    try:
        _, value = encode_event(user_id, "i1")
    except InvalidEventError:
        return

    outcome = check_decode_outcome(value, key, DecodeLimits())

    accepted = key is None or key == user_id.encode("utf-8")
    assert isinstance(outcome, Event) == accepted


MALFORMED_TOTAL = 100_000
HUGE_VALUE_BYTES = 1024 * 1024
MALFORMED_SHARES = {
    "random_bytes": 0.18,
    "deep_json": 0.03,
    "huge_ids": 0.1,
    "nan_infinity": 0.15,
    "wrong_types": 0.15,
    "not_object": 0.1,
    "wrong_key": 0.15,
    "empty": 0.02,
    "keyless": 0.02,
}


def malformed_message(kind: str, rng: random.Random, index: int) -> Message:
    """Return one invalid message of ``kind``."""
    key = f"u{index % 50}".encode()
    user = key.decode()

    if kind == "random_bytes":
        return Message(key, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 120))))

    if kind == "deep_json":
        depth = rng.randint(1100, 2500)
        return Message(key, rng.choice([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth]))

    if kind == "huge_ids":
        choice = rng.randrange(3)
        if choice == 0:
            return Message(key, json.dumps({"user_id": user, "item_id": "x" * rng.randint(257, 3000)}).encode())
        if choice == 1:
            return Message(key, b'{"user_id":"%s","item_id":%s}' % (key, b"9" * rng.randint(300, 4000)))
        long_user = "u" * rng.randint(257, 3000)
        return Message(long_user.encode(), json.dumps({"user_id": long_user, "item_id": "i1"}).encode())

    if kind == "nan_infinity":
        field, constant = rng.choice([("ts", b"NaN"), ("ts", b"Infinity"), ("ts", b"-Infinity"), ("ts", b"1e400"),
                                      ("item_id", b"NaN"), ("user_id", b"Infinity")])
        fields = {"user_id": b'"%s"' % key, "item_id": b'"i1"', "ts": b"1"}
        fields[field] = constant
        return Message(key, b"{" + b",".join(b'"%s":%s' % (n.encode(), t) for n, t in fields.items()) + b"}")

    if kind == "wrong_types":
        wrong = rng.choice([True, None, [1], {"id": 1}, 1.5, False])
        field = rng.choice(["user_id", "item_id", "ts"])
        document = {"user_id": user, "item_id": "i1", "ts": 1.0}
        document[field] = wrong if field != "ts" else rng.choice(["1600000000", None, [1], True])
        return Message(key, json.dumps(document).encode())

    if kind == "not_object":
        return Message(key, rng.choice([b"[1,2,3]", b'"u1"', b"42", b"null", b"true", b"[]", b'[{"user_id":"u1"}]']))

    if kind == "wrong_key":
        return Message(rng.choice([b"someone-else", b"", key + b"x"]), json.dumps({"user_id": user, "item_id": "i1"}).encode())

    if kind == "empty":
        return Message(key, b"")

    if kind == "keyless":
        return Message(None, json.dumps({"user_id": user, "item_id": "i1"}).encode())

    raise ValueError(f"unknown malformed kind {kind!r}")


def malformed_messages(total: int, seed: int, limits: DecodeLimits) -> tuple[list[Message], list[str]]:
    """Return ``total`` invalid messages of every kind, shuffled, and the reason decode_event gives each."""
    rng = random.Random(seed)
    messages = [Message(f"u{i}".encode(), b'{"user_id":"u%d","pad":"%s"}' % (i, b"p" * HUGE_VALUE_BYTES)) for i in range(5)]
    for kind, share in MALFORMED_SHARES.items():
        messages += [malformed_message(kind, rng, index) for index in range(int(share * total))]
    while len(messages) < total:
        messages.append(malformed_message("random_bytes", rng, len(messages)))
    rng.shuffle(messages)

    reasons = []
    for message in messages:
        outcome = check_decode_outcome(message.value, message.key, limits)
        assert isinstance(outcome, InvalidEventError), f"a generated malformed message decoded: {message!r:.200}"
        reasons.append(outcome.reason.value)
    return messages, reasons


def test_worker_dead_letters_100k_malformed_exact(broker, redis_server, redis_client, key_prefix, group_id, tmp_path):
    topic = new_topic(broker, 4)
    settings = fault_settings(broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix, batch_size=500)
    limits = DecodeLimits(
        max_message_bytes=settings.max_message_bytes, max_id_length=settings.max_id_length, require_key=True
    )
    bad, reasons = malformed_messages(MALFORMED_TOTAL, seed=71, limits=limits)
    valid = synthetic_interactions(users=50, items=100, events=5000, seed=72)
    messages, users = [], []
    per_valid = len(bad) // len(valid)
    for index, (interaction, message) in enumerate(zip(valid, to_messages(valid))):
        chunk = bad[index * per_valid: (index + 1) * per_valid]
        messages += chunk + [message]
        users += [None] * len(chunk) + [interaction.user_id]
    messages += bad[len(valid) * per_valid:]
    users += [None] * (len(bad) - len(valid) * per_valid)
    produced = produce(broker, topic, messages, users, max_request_size=4 * HUGE_VALUE_BYTES)
    store = store_of(redis_client, settings)
    deadline = time.monotonic() + 300

    runner = WorkerThread(settings, until=lambda t: t.consumed >= len(messages) or time.monotonic() > deadline)
    runner.start().join(timeout_s=330)
    dead = read_dead_letters(broker, settings.dead_letter_topic, len(bad))

    expected_reasons = collections.Counter(reasons)
    assert runner.error is None
    assert runner.totals.consumed == len(messages), f"the worker consumed {runner.totals.consumed} of {len(messages)}"
    assert runner.totals.invalid == len(bad)
    assert stored_states(store) == produced.expected_states()
    assert store.load_offsets(topic) == produced.last_offsets()
    for reason, count in expected_reasons.items():
        assert runner.metric("drnn_events_invalid_total", {"reason": reason}) == count, reason
    assert collections.Counter(letter.reason for letter in dead) == expected_reasons
    invalid_positions = {f"{topic}[{p}]@{o}" for user, (p, o) in zip(users, produced.positions) if user is None}
    assert {letter.source for letter in dead} == invalid_positions
    huge = [letter for letter in dead if letter.original_size > settings.max_message_bytes]
    assert len(huge) == 5
    assert all(letter.value_bytes <= settings.max_message_bytes for letter in huge)


class DeadLetter(NamedTuple):
    """The headers and value length of one dead-letter record."""

    reason: str
    source: str
    original_size: int
    value_bytes: int


def read_dead_letters(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list[DeadLetter]:
    """Read the dead-letter topic from the start, up to ``expected`` records."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        group_id=None, consumer_timeout_ms=int(timeout_s * 1000), max_partition_fetch_bytes=8 * HUGE_VALUE_BYTES,
        fetch_max_bytes=64 * HUGE_VALUE_BYTES,
    )
    found = []
    try:
        for record in consumer:
            headers = dict(record.headers)
            found.append(DeadLetter(
                headers["drnn.reason"].decode(), headers["drnn.source"].decode(),
                int(headers.get("drnn.original_size", b"0")), len(record.value or b""),
            ))
            if len(found) >= expected:
                break
    finally:
        consumer.close()
    return found


# ---------------------------------------------------------------------------
# 8. Corrupt states in Redis
# ---------------------------------------------------------------------------


def corrupt_blobs() -> dict[str, bytes]:
    """Return user -> an invalid state blob for h=H, K=K, one per kind of damage."""
    good = UserStateBatch.empty(1, H, K)
    good.count[:] = 2**40
    good.last_partition[:] = 0
    good.last_offset[:] = 10**9
    blob = encode_states(good)[0]
    wrong_version = bytearray(blob)
    wrong_version[2] = 9
    nan_hidden = bytearray(blob)
    nan_hidden[30:34] = np.float32(np.nan).tobytes()
    negative_count = bytearray(blob)
    negative_count[10:18] = np.int64(-5).tobytes()
    other_h = UserStateBatch.empty(1, H // 2, K)
    return {
        "u0": bytes(wrong_version),
        "u1": blob[:20],
        "u2": blob + b"\x00" * 8,
        "u3": bytes(nan_hidden),
        "u4": encode_states(other_h)[0],
        "u5": bytes(random.Random(8).getrandbits(8) for _ in range(len(blob))),
        "u6": bytes(negative_count),
    }


def test_worker_resets_corrupt_states(broker, redis_server, redis_client, key_prefix, group_id, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 2)
    settings = fault_settings(broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix)
    store = store_of(redis_client, settings)
    blobs = corrupt_blobs()
    for user, blob in blobs.items():
        redis_client.set(store.user_key(user), blob)
    interactions = synthetic_interactions(users=20, items=40, events=1500, seed=81)
    produced = produce_interactions(broker, topic, interactions)

    runner = WorkerThread(settings, until=lambda t: t.consumed >= len(interactions))
    runner.start().join(timeout_s=120)

    errors = log_messages(caplog, level=logging.ERROR)
    assert runner.error is None
    assert runner.metric("drnn_corrupt_states_total") == len(blobs)
    assert stored_states(store) == produced.expected_states()
    assert any("corrupt" in message for message in errors), "no corrupt state was logged at ERROR"


# ---------------------------------------------------------------------------
# 9. Numerical blow-up
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_worker_absurd_learning_rate_stays_finite(broker, redis_server, redis_client, key_prefix, group_id, tmp_path, optimizer):
    topic = new_topic(broker, 2)
    settings = fault_settings(broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix,
                              learning_rate=1e30, optimizer=optimizer, checkpoint_every_events=700)
    interactions = synthetic_interactions(users=30, items=50, events=3000, seed=91)
    produced = produce_interactions(broker, topic, interactions)
    store = store_of(redis_client, settings)

    runner = WorkerThread(settings, until=lambda t: t.consumed >= len(interactions))
    runner.start().join(timeout_s=120)

    users = sorted(produced.expected_states())
    states, corrupt = store.load_states(users)
    checkpoints = CheckpointStore(settings.checkpoint_dir).paths()
    assert runner.error is None
    assert runner.metric("drnn_events_trained_total", {"outcome": "non_finite"}) > 0
    assert corrupt == []
    assert np.isfinite(states.hidden).all()
    assert np.isfinite(states.start_hidden).all()
    assert stored_states(store) == produced.expected_states()
    assert len(checkpoints) >= 2
    for path in checkpoints:
        model = RecurrentBPR.from_bytes(path.read_bytes(), settings.model_config())
        for name in ("X", "U", "W", "V", "bias", "acc_x", "acc_u", "acc_w", "acc_v", "acc_bias"):
            assert np.isfinite(getattr(model, name)).all(), f"{path.name}: {name} is not finite"


# ---------------------------------------------------------------------------
# 10. Checkpoints: atomic writes and fallback
# ---------------------------------------------------------------------------


CHECKPOINT_CONFIG = Settings(hidden_size=64, window=3, metrics_address="").model_config()


def big_model(capacity: int, seed: int = 42) -> RecurrentBPR:
    model = RecurrentBPR(dataclasses.replace(CHECKPOINT_CONFIG, seed=seed))
    model.ensure_capacity(capacity)
    return model


def test_checkpoint_listing_never_shows_partial_file(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", kept=2)
    model = big_model(32768)
    size = len(model.to_bytes())
    stop = threading.Event()
    seen_sizes: list[int] = []
    temporary_seen = []

    def observe() -> None:
        while not stop.is_set():
            if not store.directory.is_dir():
                continue
            for entry in os.scandir(store.directory):
                if entry.name.startswith(".tmp-"):
                    temporary_seen.append(entry.name)
                elif entry.name.startswith("model-"):
                    with contextlib.suppress(FileNotFoundError):
                        seen_sizes.append(entry.stat().st_size)

    observer = threading.Thread(target=observe, daemon=True)
    observer.start()
    try:
        for events in range(6):
            store.save(model, events)
    finally:
        stop.set()
        observer.join()

    assert seen_sizes
    assert set(seen_sizes) == {size}
    assert len(store.paths()) == 2
    assert not [p for p in store.directory.iterdir() if p.name.startswith(".tmp-")]


CHECKPOINT_WRITER = """
import dataclasses, sys
from drnn_core.model import RecurrentBPR
from streamer.checkpoints import CheckpointStore
from streamer.settings import Settings
model = RecurrentBPR(dataclasses.replace(Settings(hidden_size=64, window=3, metrics_address="").model_config(), seed=7))
model.ensure_capacity(int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.readline()
CheckpointStore(sys.argv[1]).save(model, 2)
print("saved", flush=True)
"""


def crash_during_checkpoint(directory: Path, capacity: int) -> bool:
    """Run a process that writes a checkpoint, SIGKILL it while its temporary file grows; return whether it was caught."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHECKPOINT_WRITER, str(directory), str(capacity)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert process.stdout.readline().strip() == b"ready"
        before = {p.name for p in directory.iterdir()}
        process.stdin.write(b"go\n")
        process.stdin.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.poll() is None:
            for entry in os.scandir(directory):
                if entry.name.startswith(".tmp-") and entry.stat().st_size > 0:
                    process.kill()
                    process.wait()
                    new_models = [p for p in directory.iterdir() if p.name.startswith("model-") and p.name not in before]
                    return not new_models
        return False
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_checkpoint_crash_during_write_leaves_ignored_temp(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    store = CheckpointStore(directory)
    good = big_model(64, seed=3)
    good_path = store.save(good, 1)

    caught = any(crash_during_checkpoint(directory, 65536) for _ in range(5))
    loaded = store.load_newest(CHECKPOINT_CONFIG)

    temporary = [p for p in directory.iterdir() if p.name.startswith(".tmp-")]
    assert caught, "the writer finished every time before it could be killed mid-write"
    assert temporary
    assert store.paths() == [good_path]
    assert loaded is not None
    assert loaded[1] == good_path
    assert np.array_equal(loaded[0].U, good.U)


def damage_file(path: Path, damage: str) -> None:
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(bytes(random.Random(1).getrandbits(8) for _ in range(len(data))))
    elif damage == "flipped":
        middle = bytearray(data)
        for offset in range(len(data) // 3, len(data) // 3 + 64):
            middle[offset] ^= 0xFF
        path.write_bytes(bytes(middle))
    else:
        raise ValueError(damage)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped"])
def test_checkpoint_damaged_newest_falls_back(broker, redis_server, key_prefix, group_id, tmp_path, caplog, damage):
    caplog.set_level(logging.INFO, logger="streamer")
    topic = new_topic(broker, 1)
    settings = fault_settings(broker, redis_server.url, topic, group_id, tmp_path, key_prefix=key_prefix)
    store = CheckpointStore(settings.checkpoint_dir)
    older = RecurrentBPR(settings.model_config())
    older.U[:] = 0.5
    store.save(older, 10)
    newer = RecurrentBPR(settings.model_config())
    newer.U[:] = -0.5
    newest_path = store.save(newer, 20)
    damage_file(newest_path, damage)

    worker = build_worker(settings, registry=CollectorRegistry())
    try:
        loaded_u = worker.model.U.copy()
    finally:
        worker.consumer.close()
        worker.dead_letters.close()
        worker.store.client.close()

    errors = log_messages(caplog, level=logging.ERROR)
    assert np.array_equal(loaded_u, older.U)
    assert any(newest_path.name in message and "damaged" in message for message in errors), errors
