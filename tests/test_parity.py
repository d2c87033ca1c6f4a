"""Parity of the worker's prequential counters with the offline evaluate replay, on a real broker and Redis.

On a one-partition topic the worker consumes the events in timestamp order, and
the Redis vocabulary numbers the items in order of first appearance. The batch
kernel processes events strictly in order, and the model grows its item capacity
one doubling at a time. So the worker and the replay must rank every event
identically, whatever their micro-batch boundaries.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from drnn_core import kernels, prequential
from drnn_core.config import ModelConfig
from drnn_core.model import BatchResult
from streamer.app import build_worker
from streamer.datasets import synthetic_interactions
from streamer.embedded import create_topic
from streamer.evaluate import encode_stream, replay_model
from tests.helpers import produce, to_messages, worker_settings

EVENTS = 5000
# More distinct items than the model's initial capacity (1,024), so that the
# capacity doubles during the stream, at other events in the worker than in the replay.
ITEMS = 3000
WORKER_BATCH_SIZE = 200
# Not a divisor or multiple of the worker's batch size, so the replay's
# micro-batches end at other events than the worker's polls.
REPLAY_BATCH_SIZE = 333
CONSUME_TIMEOUT_S = 90.0
# Relative rounding error of one float64 addition.
UNIT_ROUNDOFF = 2.0**-53


@pytest.fixture
def parity_settings(broker, redis_server, topic_factory, group_id, key_prefix, tmp_path):
    topic = topic_factory(1)
    settings = worker_settings(
        broker=broker, redis_url=redis_server.url, topic=topic, group_id=group_id,
        key_prefix=key_prefix, checkpoint_dir=tmp_path / "checkpoints", batch_size=WORKER_BATCH_SIZE,
    )
    create_topic(broker, settings.dead_letter_topic, 1)
    return settings


def _run_worker(settings, expected: int):
    """Run the real worker until it consumed ``expected`` messages; return it, its registry and batch ends."""
    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    batch_ends: list[int] = []
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    worker.run(
        until=lambda totals: totals.consumed >= expected or time.monotonic() > deadline,
        on_batch=lambda totals: batch_ends.append(totals.consumed),
    )
    return worker, registry, batch_ends


def _reciprocal_rank_sum_by_batch(ranks: np.ndarray, batch_ends: list[int]) -> float:
    """Sum 1 / (rank + 1) over the top 10 as the worker does: per polled batch, then across batches."""
    total = 0.0
    start = 0
    for end in batch_ends:
        part = ranks[start:end]
        batch = BatchResult(status=np.zeros(part.shape[0], np.int8), loss=np.zeros(part.shape[0], np.float32), rank=part)
        total += batch.reciprocal_rank_sum(10)
        start = end
    return total


def test_parity_worker_counters_equal_replay(broker, parity_settings):
    interactions = synthetic_interactions(users=60, items=ITEMS, events=EVENTS, seed=12)
    produce(broker, parity_settings.topic, to_messages(interactions))

    worker, registry, batch_ends = _run_worker(parity_settings, EVENTS)
    replay_settings = dataclasses.replace(parity_settings, batch_size=REPLAY_BATCH_SIZE)
    run = replay_model(encode_stream(interactions), replay_settings)
    summary = prequential.summarize(run.ranks)

    evaluated = registry.get_sample_value("drnn_prequential_evaluated_total")
    hits = registry.get_sample_value("drnn_prequential_hits_at_10_total")
    reciprocal = registry.get_sample_value("drnn_prequential_reciprocal_rank_at_10_total")
    assert worker.totals.consumed == EVENTS
    assert batch_ends[-1] == EVENTS
    assert run.model.capacity > ModelConfig().initial_items
    assert evaluated == summary["events"]
    assert hits == summary["hits_at_10"]
    assert np.count_nonzero(run.ranks == kernels.RANK_UNKNOWN_ITEM) == len({i.item_id for i in interactions})

    # The same ranks summed in the worker's order give the worker's float exactly.
    assert reciprocal == _reciprocal_rank_sum_by_batch(run.ranks, batch_ends)
    # The replay sums the same N non-negative terms in one pass, in another
    # order. Each of the N - 1 additions of either order rounds a partial sum no
    # larger than the exact sum S by at most u relative. So each order is within
    # (N - 1) * u * S of S, plus terms of order u**2 that the slack from N - 1 to
    # N covers. The two orders therefore differ by at most 2 * N * u * S.
    bound = 2 * EVENTS * UNIT_ROUNDOFF * summary["reciprocal_rank_at_10_sum"]
    assert abs(reciprocal - summary["reciprocal_rank_at_10_sum"]) <= bound


def test_parity_worker_weights_equal_replay(broker, parity_settings):
    interactions = synthetic_interactions(users=40, items=ITEMS, events=3000, seed=13)
    produce(broker, parity_settings.topic, to_messages(interactions))

    worker, _, _ = _run_worker(parity_settings, len(interactions))
    replay_settings = dataclasses.replace(parity_settings, batch_size=REPLAY_BATCH_SIZE)
    replayed = replay_model(encode_stream(interactions), replay_settings).model

    arrays = sorted(name for name, value in vars(replayed).items() if isinstance(value, np.ndarray))
    assert worker.model.known_items == replayed.known_items
    assert replayed.capacity > ModelConfig().initial_items
    assert {"X", "U", "W", "V", "rng_state"} <= set(arrays)
    for name in arrays:
        assert np.array_equal(getattr(worker.model, name), getattr(replayed, name)), name
    # The Fenwick tree of sampler weights is left out: the model rebuilds it when
    # the capacity doubles, at other events in the worker than in the replay, so
    # its float sums differ in the last bits. The uniform sampler never reads it.
    for name in ("item_count", "known_items", "meta"):
        assert np.array_equal(getattr(worker.model.stats, name), getattr(replayed.stats, name)), name
