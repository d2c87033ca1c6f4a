"""Worker tests against a real Tansu broker and a real redis-server."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import time

import pytest
from prometheus_client import CollectorRegistry

from streamer.app import build_worker
from streamer.datasets import Message, synthetic_interactions
from streamer.events import InvalidReason, encode_event
from streamer.state_codec import state_size_bytes
from streamer.store import RedisStore
from tests.helpers import (
    produce, read_all, to_messages, user_counts, worker_command, worker_environment, worker_settings,
)


@pytest.fixture
def settings_factory(broker, redis_server, topic_factory, group_id, key_prefix, tmp_path):
    def make(partitions: int = 4, **overrides):
        topic = topic_factory(partitions)
        topic_factory_dlq = overrides.pop("create_dlq", True)
        settings = worker_settings(
            broker=broker, redis_url=redis_server.url, topic=topic, group_id=group_id,
            key_prefix=key_prefix, checkpoint_dir=tmp_path / "checkpoints", **overrides,
        )
        if topic_factory_dlq:
            from streamer.embedded import create_topic

            create_topic(broker, settings.dead_letter_topic, 1)
        return settings

    return make


def run_until_consumed(settings, expected: int, registry=None, timeout_s: float = 60.0):
    worker = build_worker(settings, registry=registry or CollectorRegistry())
    deadline = time.monotonic() + timeout_s
    totals = worker.run(until=lambda t: t.consumed >= expected or time.monotonic() > deadline)
    return worker, totals


def stored_counts(redis_client, settings) -> dict[str, int]:
    store = RedisStore(redis_client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)
    return {user: count for user, count, _, _ in store.iter_user_states()}


def test_worker_applies_every_event_once(broker, redis_client, settings_factory):
    settings = settings_factory()
    interactions = synthetic_interactions(users=40, items=60, events=3000, seed=3)
    produce(broker, settings.topic, to_messages(interactions))
    registry = CollectorRegistry()

    _, totals = run_until_consumed(settings, len(interactions), registry)

    assert totals.consumed == len(interactions)
    assert totals.trained == len(interactions)
    assert totals.skipped == 0
    assert stored_counts(redis_client, settings) == user_counts(interactions)
    trained_metric = sum(
        registry.get_sample_value("drnn_events_trained_total", {"outcome": outcome}) or 0.0
        for outcome in ("sgd_step", "no_history", "no_negative", "non_finite")
    )
    assert trained_metric == len(interactions)
    assert registry.get_sample_value("drnn_prequential_evaluated_total") == len(interactions)


def test_worker_commits_offsets_with_states(broker, redis_client, settings_factory):
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    settings = settings_factory(partitions=2)
    interactions = synthetic_interactions(users=10, items=20, events=400, seed=4)
    produce(broker, settings.topic, to_messages(interactions))

    run_until_consumed(settings, len(interactions))

    store = RedisStore(redis_client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)
    applied = store.load_offsets(settings.topic)
    checker = KafkaConsumer(bootstrap_servers=broker, group_id=settings.group_id, enable_auto_commit=False)
    try:
        committed = {p: checker.committed(TopicPartition(settings.topic, p)) for p in applied}
    finally:
        checker.close()
    assert sum(offset + 1 for offset in applied.values()) == len(interactions)
    assert committed == {p: offset + 1 for p, offset in applied.items()}


def test_worker_replay_changes_nothing(broker, redis_client, settings_factory):
    settings = settings_factory(partitions=2)
    interactions = synthetic_interactions(users=15, items=30, events=600, seed=5)
    produce(broker, settings.topic, to_messages(interactions))
    run_until_consumed(settings, len(interactions))
    store = RedisStore(redis_client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)
    before = {user: redis_client.get(store.user_key(user)) for user in user_counts(interactions)}

    redis_client.delete(store.offsets_key(settings.topic))
    replay_settings = type(settings)(**{**settings.__dict__, "group_id": settings.group_id + "-replay"})
    _, totals = run_until_consumed(replay_settings, len(interactions))

    after = {user: redis_client.get(store.user_key(user)) for user in before}
    assert totals.skipped == len(interactions)
    assert totals.trained == 0
    assert after == before


BAD_MESSAGES = [
    (b"u1", b"\xff\xfe not utf-8", InvalidReason.NOT_UTF8),
    (b"u1", b"{not json", InvalidReason.NOT_JSON),
    (b"u1", b"[1, 2, 3]", InvalidReason.NOT_OBJECT),
    (b"u1", b'{"item_id": "i1"}', InvalidReason.MISSING_USER_ID),
    (b"u1", b'{"user_id": "u1"}', InvalidReason.MISSING_ITEM_ID),
    (b"u1", b'{"user_id": true, "item_id": "i1"}', InvalidReason.INVALID_USER_ID),
    (b"u1", b'{"user_id": "u1", "item_id": [1]}', InvalidReason.INVALID_ITEM_ID),
    (b"", b'{"user_id": "", "item_id": "i1"}', InvalidReason.EMPTY_ID),
    (b"u1", b'{"user_id": "u1", "item_id": "' + b"x" * 300 + b'"}', InvalidReason.ID_TOO_LONG),
    (b"u1", b'{"user_id": "u1", "item_id": "i1", "ts": "yesterday"}', InvalidReason.INVALID_TS),
    (b"u1", b'{"user_id": "u1", "item_id": "i1", "ts": NaN}', InvalidReason.NON_FINITE_TS),
    (b"u1", b'{"user_id": "u1", "item_id": "i1", "ts": -5}', InvalidReason.NEGATIVE_TS),
    (b"u2", b'{"user_id": "u1", "item_id": "i1"}', InvalidReason.KEY_MISMATCH),
    (b"u1", b'{"user_id": "u1", "item_id": "i1", "pad": "' + b"p" * 70000 + b'"}', InvalidReason.TOO_LARGE),
    (b"u1", b"", InvalidReason.EMPTY),
    (b"u1", b"[" * 60000, InvalidReason.NOT_JSON),
]


def test_worker_dead_letters_invalid_messages(broker, redis_client, settings_factory):
    settings = settings_factory(partitions=2)
    valid = synthetic_interactions(users=8, items=15, events=200, seed=6)
    messages: list[Message] = []
    for index, interaction in enumerate(valid):
        messages.append(Message(*encode_event(interaction.user_id, interaction.item_id, interaction.ts)))
        if index % 12 == 0 and index // 12 < len(BAD_MESSAGES):
            key, value, _ = BAD_MESSAGES[index // 12]
            messages.append(Message(key, value))
    produce(broker, settings.topic, messages)
    registry = CollectorRegistry()

    _, totals = run_until_consumed(settings, len(messages), registry)

    assert totals.invalid == len(BAD_MESSAGES)
    assert totals.trained == len(valid)
    assert stored_counts(redis_client, settings) == user_counts(valid)
    for _, _, reason in BAD_MESSAGES:
        expected = sum(1 for _, _, r in BAD_MESSAGES if r == reason)
        assert registry.get_sample_value("drnn_events_invalid_total", {"reason": reason.value}) == expected, reason
    dead = read_all(broker, settings.dead_letter_topic, len(BAD_MESSAGES))
    reasons = sorted(dict(record.headers)["drnn.reason"].decode() for record in dead)
    assert reasons == sorted(reason.value for _, _, reason in BAD_MESSAGES)
    sources = [dict(record.headers)["drnn.source"].decode() for record in dead]
    assert all(source.startswith(settings.topic + "[") for source in sources)


def test_worker_resumes_from_checkpoint(broker, settings_factory):
    settings = settings_factory(partitions=1)
    first = synthetic_interactions(users=10, items=20, events=300, seed=8)
    produce(broker, settings.topic, to_messages(first))
    worker, _ = run_until_consumed(settings, len(first))
    trained_v = worker.model.V.copy()

    resumed = build_worker(settings, registry=CollectorRegistry())
    try:
        assert resumed.model.known_items == worker.model.known_items
        assert (resumed.model.V == trained_v).all()
    finally:
        resumed.consumer.close()
        resumed.dead_letters.close()


def _wait_for_progress(redis_client, settings, minimum: int, process, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = sum(stored_counts(redis_client, settings).values())
        if total >= minimum:
            return total
        assert process.poll() is None, "the worker exited before it made progress"
        time.sleep(0.05)
    raise AssertionError(f"the worker applied fewer than {minimum} events in {timeout_s} s")


def test_worker_crash_loses_and_doubles_nothing(broker, redis_client, settings_factory, tmp_path):
    settings = settings_factory(partitions=3, batch_size=50, exit_when_idle_seconds=4.0)
    interactions = synthetic_interactions(users=60, items=80, events=6000, seed=9)
    produce(broker, settings.topic, to_messages(interactions))
    env = worker_environment(settings)
    log = open(tmp_path / "worker.log", "ab")

    for minimum in (1000, 3000):
        process = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=log)
        try:
            _wait_for_progress(redis_client, settings, minimum, process)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert sum(stored_counts(redis_client, settings).values()) < len(interactions)

    final = subprocess.run(worker_command(), env=env, stdout=log, stderr=log, timeout=120)

    assert final.returncode == 0
    assert stored_counts(redis_client, settings) == user_counts(interactions)


def test_worker_sigterm_finishes_and_checkpoints(broker, redis_client, settings_factory, tmp_path):
    settings = settings_factory(partitions=1, batch_size=20)
    interactions = synthetic_interactions(users=20, items=30, events=2000, seed=10)
    produce(broker, settings.topic, to_messages(interactions))
    with open(tmp_path / "worker.log", "ab") as log:
        process = subprocess.Popen(worker_command(), env=worker_environment(settings), stdout=log, stderr=log)
        _wait_for_progress(redis_client, settings, 200, process)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=60)

    assert returncode == 0
    assert list((tmp_path / "checkpoints").glob("model-*.npz"))


def test_worker_state_dtype_switch(broker, redis_client, settings_factory):
    settings = settings_factory(partitions=2, state_dtype="float16")
    interactions = synthetic_interactions(users=30, items=40, events=1200, seed=11)
    first, second = interactions[:600], interactions[600:]
    produce(broker, settings.topic, to_messages(first))
    run_until_consumed(settings, len(first))
    store = RedisStore(redis_client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)
    first_keys = [store.user_key(user) for user in user_counts(first)]
    first_lengths = {len(blob) for blob in redis_client.mget(first_keys)}

    produce(broker, settings.topic, to_messages(second))
    registry = CollectorRegistry()
    run_until_consumed(dataclasses.replace(settings, state_dtype="float32"), len(second), registry)
    second_keys = [store.user_key(user) for user in user_counts(second)]
    second_lengths = {len(blob) for blob in redis_client.mget(second_keys)}

    assert first_lengths == {state_size_bytes(settings.hidden_size, settings.window, "float16")}
    assert second_lengths == {state_size_bytes(settings.hidden_size, settings.window, "float32")}
    assert stored_counts(redis_client, settings) == user_counts(interactions)
    assert (registry.get_sample_value("drnn_corrupt_states_total") or 0.0) == 0.0
