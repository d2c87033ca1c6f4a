"""Replay of a dataset into the interactions topic, in timestamp order, with a progress bar."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from kafka import KafkaProducer
from tqdm import tqdm

from streamer.datasets import Message
from streamer.errors import KafkaIOError

logger = logging.getLogger(__name__)

FLUSH_EVERY = 5000


def replay_messages(
    producer: KafkaProducer,
    topic: str,
    messages: Sequence[Message],
    *,
    timestamps: Sequence[float] | None = None,
    speed: float = 0.0,
    progress: bool = True,
    stop: threading.Event | None = None,
) -> int:
    """Send ``messages`` to ``topic`` in order, keyed by user, and wait until all are stored.

    Parameters
    ----------
    producer : KafkaProducer
    topic : str
    messages : sequence of Message
    timestamps : sequence of float, optional
        Event time of each message in seconds; needed when ``speed`` > 0.
    speed : float
        0 sends as fast as possible. S > 0 sends with the gaps between event
        times divided by S (3600 replays one hour of events per second).
    progress : bool
        Show a progress bar on stderr.
    stop : threading.Event, optional
        Set to stop early; the messages sent so far are flushed.

    Returns
    -------
    int
        Number of messages sent.

    Raises
    ------
    KafkaIOError
        If the broker did not store a message, naming its position in the dataset.
    """
    if speed > 0 and timestamps is None:
        raise ValueError("replay_messages: speed > 0 needs the timestamps of the messages")

    futures = []
    started = time.monotonic()
    sent = 0
    with tqdm(total=len(messages), desc="replay", unit="msg", disable=not progress, mininterval=0.5) as bar:
        for index, message in enumerate(messages):
            if stop is not None and stop.is_set():
                break
            if speed > 0:
                _wait_for_event_time(timestamps, index, speed, started)
            futures.append((index, producer.send(topic, key=message.key, value=message.value)))
            sent += 1
            if sent % FLUSH_EVERY == 0:
                _wait(producer, futures, topic)
                futures.clear()
                bar.update(FLUSH_EVERY)
        _wait(producer, futures, topic)
        bar.update(sent - bar.n)

    elapsed = time.monotonic() - started
    logger.info("Replayed %d messages into %s in %.1f s (%.0f msg/s)", sent, topic, elapsed, sent / max(elapsed, 1e-9))
    return sent


def _wait_for_event_time(timestamps: Sequence[float], index: int, speed: float, started: float) -> None:
    due = started + (timestamps[index] - timestamps[0]) / speed
    delay = due - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _wait(producer: KafkaProducer, futures: list, topic: str) -> None:
    producer.flush()
    for index, future in futures:
        try:
            future.get(timeout=30)
        except Exception as exc:
            raise KafkaIOError(
                f"Failed to send message {index} of the dataset to topic {topic!r}: {exc}. "
                "Check that the topic exists and the broker is reachable."
            ) from exc
