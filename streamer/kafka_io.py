"""Thin kafka-python adapters: consumer and producer factories, rebalance listener, dead-letter sender."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.structs import TopicPartition

from streamer.errors import KafkaIOError
from streamer.events import InvalidReason
from streamer.settings import Settings

logger = logging.getLogger(__name__)

DEAD_LETTER_HEADERS = ("drnn.reason", "drnn.detail", "drnn.source")


def security_config(settings: Settings) -> dict:
    """Return the kafka-python security options that the settings set (empty values are left out)."""
    config = {"security_protocol": settings.security_protocol}
    optional = {
        "sasl_mechanism": settings.sasl_mechanism,
        "sasl_plain_username": settings.sasl_username,
        "sasl_plain_password": settings.sasl_password,
        "ssl_cafile": settings.ssl_cafile,
        "ssl_certfile": settings.ssl_certfile,
        "ssl_keyfile": settings.ssl_keyfile,
    }
    config.update({name: value for name, value in optional.items() if value})
    return config


def make_consumer(settings: Settings) -> KafkaConsumer:
    """Create a group consumer with manual commits; subscription happens in the worker."""
    return KafkaConsumer(
        **security_config(settings),
        bootstrap_servers=settings.bootstrap_servers.split(","),
        client_id=settings.client_id,
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset=settings.auto_offset_reset,
        max_poll_records=settings.batch_size,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=max(settings.session_timeout_ms // 3, 100),
        max_poll_interval_ms=settings.max_poll_interval_ms,
        allow_auto_create_topics=False,
    )


def make_producer(settings: Settings, **overrides) -> KafkaProducer:
    """Create a producer that waits for all in-sync replicas and retries."""
    config = dict(
        **security_config(settings),
        bootstrap_servers=settings.bootstrap_servers.split(","),
        client_id=settings.client_id,
        acks="all",
        linger_ms=5,
        retries=5,
    )
    config.update(overrides)
    return KafkaProducer(**config)


def source_label(topic: str, partition: int, offset: int) -> str:
    """Format a message position as topic[partition]@offset."""
    return f"{topic}[{partition}]@{offset}"


class DeadLetterSender:
    """Copies invalid messages to the dead-letter topic with the reason and source in headers.

    A value longer than ``max_value_bytes`` is cut to that length, with its
    original length in the ``drnn.original_size`` header, so that one huge
    message cannot make the producer reject the copy. Sends are asynchronous.
    ``flush`` waits for every one, keeps the failed ones for the next call and
    raises, so the worker retries and commits offsets only after its dead
    letters are stored.
    """

    def __init__(self, producer: KafkaProducer, topic: str, max_value_bytes: int = 65536) -> None:
        self._producer = producer
        self._topic = topic
        self._max_value_bytes = max_value_bytes
        self._pending: list = []

    def send(self, record, reason: InvalidReason, detail: str) -> None:
        """Queue one invalid consumer record for the dead-letter topic."""
        headers = [
            ("drnn.reason", reason.value.encode()),
            ("drnn.detail", detail.encode("utf-8", "replace")),
            ("drnn.source", source_label(record.topic, record.partition, record.offset).encode()),
        ]
        value = record.value
        if value is not None and len(value) > self._max_value_bytes:
            headers.append(("drnn.original_size", str(len(value)).encode()))
            value = value[: self._max_value_bytes]
        self._send(record, value, headers)

    def _send(self, record, value, headers) -> None:
        try:
            future = self._producer.send(self._topic, key=record.key, value=value, headers=headers)
        except KafkaError as exc:
            future = exc
        self._pending.append((future, record, value, headers))

    def flush(self, timeout_s: float = 30.0) -> int:
        """Wait for the queued dead letters; return how many were stored.

        Raises
        ------
        KafkaIOError
            If any of them failed, naming the source position of the first
            failure. The failed ones are sent again by the next call.
        """
        if not self._pending:
            return 0
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise KafkaIOError(
                f"Failed to flush {len(self._pending)} dead letters to topic {self._topic!r}: {exc!r}. "
                "Check that the broker is reachable."
            ) from exc

        pending, self._pending = self._pending, []
        failed = []
        for future, record, value, headers in pending:
            try:
                if isinstance(future, Exception):
                    raise future
                future.get(timeout=timeout_s)
            except Exception as exc:
                failed.append((record, value, headers, exc))
        for record, value, headers, _ in failed:
            self._send(record, value, headers)
        if failed:
            record, _, _, exc = failed[0]
            raise KafkaIOError(
                f"Failed to send {len(failed)} dead letters to topic {self._topic!r}, the first for "
                f"{source_label(record.topic, record.partition, record.offset)}: {exc!r}. "
                "Check that the dead-letter topic exists and the broker is reachable."
            ) from exc
        return len(pending)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush what is queued and close the producer."""
        self._producer.close(timeout=timeout_s)


class RebalanceListener(ConsumerRebalanceListener):
    """Forwards rebalance callbacks to the worker.

    kafka-python 3 runs these callbacks on its network thread, where a blocking
    commit raises RuntimeError, so the worker commits each batch before it polls
    again and the callbacks themselves never block on the broker.
    """

    def __init__(
        self,
        on_assigned: Callable[[Iterable[TopicPartition]], None],
        on_revoked: Callable[[Iterable[TopicPartition]], None],
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    def on_partitions_assigned(self, assigned) -> None:
        self._on_assigned(assigned)

    def on_partitions_revoked(self, revoked) -> None:
        self._on_revoked(revoked)

    def on_partitions_lost(self, lost) -> None:
        logger.warning("Lost partitions %s without a clean revoke; their uncommitted batch will be re-read", sorted(lost))
        self._on_revoked(lost)
