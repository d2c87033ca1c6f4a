"""Test helpers shared by the worker tests: settings, producing messages, reading Redis counts."""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from streamer.datasets import Interaction, Message
from streamer.events import encode_event
from streamer.settings import Settings, to_environment

FAST_SESSION_TIMEOUT_MS = 6000


def worker_settings(*, broker: str, redis_url: str, topic: str, group_id: str, key_prefix: str,
                    checkpoint_dir: Path, **overrides) -> Settings:
    """Settings for a test worker: fast group joins, no metrics server, dead letters on TOPIC.dlq."""
    values = dict(
        bootstrap_servers=broker,
        redis_url=redis_url,
        topic=topic,
        dead_letter_topic=topic + ".dlq",
        group_id=group_id,
        key_prefix=key_prefix,
        checkpoint_dir=str(checkpoint_dir),
        session_timeout_ms=FAST_SESSION_TIMEOUT_MS,
        metrics_address="",
        hidden_size=16,
        window=3,
    )
    values.update(overrides)
    return Settings(**values)


def worker_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that configure a ``drnn-stream worker`` subprocess like ``settings``."""
    return {**os.environ, **to_environment(settings)}


def worker_command() -> list[str]:
    """The command that runs the console script of the installed package."""
    return [sys.executable, "-m", "streamer.cli", "worker"]


def to_messages(interactions: list[Interaction]) -> list[Message]:
    """Encode interactions as Kafka messages keyed by user."""
    return [Message(*encode_event(i.user_id, i.item_id, i.ts)) for i in interactions]


def produce(broker: str, topic: str, messages: list[Message]) -> None:
    """Send the messages in order and wait until the broker stored all of them."""
    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=10, acks="all")
    try:
        for message in messages:
            producer.send(topic, key=message.key, value=message.value)
        producer.flush()
    finally:
        producer.close()


def user_counts(interactions: list[Interaction]) -> dict[str, int]:
    """Count the events of each user."""
    return dict(collections.Counter(i.user_id for i in interactions))


def read_all(broker: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    """Read ``expected`` records of ``topic`` from the beginning without a group."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=broker, auto_offset_reset="earliest",
        enable_auto_commit=False, group_id=None, consumer_timeout_ms=int(timeout_s * 1000),
    )
    records = []
    try:
        for record in consumer:
            records.append(record)
            if len(records) >= expected:
                break
    finally:
        consumer.close()
    return records
