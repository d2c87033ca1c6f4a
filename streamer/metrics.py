"""Prometheus metrics of the worker, registered on an injected registry."""

from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streamer.events import InvalidReason

logger = logging.getLogger(__name__)

STAGES = ("poll", "decode", "state_load", "compute", "state_store", "dead_letter", "commit")
TRAIN_OUTCOMES = ("sgd_step", "no_history", "no_negative", "non_finite")
SKIP_REASONS = ("duplicate",)
COMPONENTS = ("kafka", "redis", "state", "checkpoint", "dead_letter")
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WorkerMetrics:
    """Every metric the worker exports; label values are created at start, so zeros are data.

    Parameters
    ----------
    registry : CollectorRegistry
        Where the metrics are registered; tests pass a fresh one.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events_consumed = Counter(
            "drnn_events_consumed_total", "Messages polled from the interactions topic.", registry=registry
        )
        self.events_trained = Counter(
            "drnn_events_trained_total",
            "Events applied to a user's state, by outcome: sgd_step, no_history (the user's first event), "
            "no_negative (no other known item to sample), non_finite (the update was skipped).",
            ["outcome"], registry=registry,
        )
        self.events_skipped = Counter(
            "drnn_events_skipped_total",
            "Valid events not applied, by reason: duplicate (offset already applied to the user).",
            ["reason"], registry=registry,
        )
        self.events_invalid = Counter(
            "drnn_events_invalid_total", "Invalid messages sent to the dead-letter topic, by reason.",
            ["reason"], registry=registry,
        )
        self.stage_seconds = Histogram(
            "drnn_batch_stage_seconds", "Wall time of each stage of a micro-batch.",
            ["stage"], buckets=STAGE_BUCKETS, registry=registry,
        )
        self.batch_events = Histogram(
            "drnn_batch_events", "Messages per polled micro-batch.",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000), registry=registry,
        )
        self.loss_sum = Counter(
            "drnn_bpr_loss_total",
            "Sum of the BPR loss -ln sigmoid(x_uij) over SGD steps; divide its rate by the sgd_step rate for the mean.",
            registry=registry,
        )
        self.loss_last = Gauge(
            "drnn_bpr_loss_batch_mean", "Mean BPR loss of the last micro-batch with SGD steps.", registry=registry
        )
        self.evaluated = Counter(
            "drnn_prequential_evaluated_total",
            "Events ranked before training (full ranking over known items).", registry=registry,
        )
        self.hits = Counter(
            "drnn_prequential_hits_at_10_total", "Evaluated events whose item ranked in the top 10.", registry=registry
        )
        self.reciprocal_rank = Counter(
            "drnn_prequential_reciprocal_rank_at_10_total",
            "Sum of 1/(rank+1) over evaluated events ranked in the top 10 (MRR@10 numerator).", registry=registry,
        )
        self.lag = Gauge(
            "drnn_consumer_lag_messages", "Fetch high-water mark minus position, per assigned partition.",
            ["topic", "partition"], registry=registry,
        )
        self.known_users = Gauge(
            "drnn_known_users", "Users with a state in Redis under the key prefix, from its user counter.", registry=registry
        )
        self.known_items = Gauge("drnn_known_items", "Items seen by this worker's model.", registry=registry)
        self.vocabulary_items = Gauge("drnn_vocabulary_items", "Item ids allocated in the shared vocabulary.", registry=registry)
        self.checkpoint_age = Gauge(
            "drnn_checkpoint_age_seconds", "Seconds since the last checkpoint was written or loaded.", registry=registry
        )
        self.errors = Counter("drnn_errors_total", "Errors caught and handled, by component.", ["component"], registry=registry)
        self.corrupt_states = Counter(
            "drnn_corrupt_states_total", "User states in Redis that failed to decode and were reset.", registry=registry
        )
        self.ready = Gauge("drnn_worker_ready", "1 while the worker can read and write its stores.", registry=registry)
        self._initialise_labels()

    def _initialise_labels(self) -> None:
        for outcome in TRAIN_OUTCOMES:
            self.events_trained.labels(outcome=outcome)
        for reason in SKIP_REASONS:
            self.events_skipped.labels(reason=reason)
        for reason in InvalidReason:
            self.events_invalid.labels(reason=reason.value)
        for stage in STAGES:
            self.stage_seconds.labels(stage=stage)
        for component in COMPONENTS:
            self.errors.labels(component=component)

    def track_checkpoint_age(self, last_checkpoint: Callable[[], float]) -> None:
        """Make the checkpoint age gauge read ``time.monotonic() - last_checkpoint()``."""
        self.checkpoint_age.set_function(lambda: time.monotonic() - last_checkpoint())


def serve_metrics(address: str, registry: CollectorRegistry):
    """Start the metrics HTTP server on ``host:port`` in a daemon thread; return the server."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host, registry=registry)
    logger.info("Serving Prometheus metrics on http://%s:%s/metrics", host, server.server_port)
    return server
