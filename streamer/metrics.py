"""Prometheus metrics of the worker, registered on an injected registry."""

from __future__ import annotations

import json
import logging
import threading
import time
from socketserver import ThreadingMixIn
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from drnn_core.errors import ConfigError
from streamer.events import InvalidReason

logger = logging.getLogger(__name__)

STAGES = ("poll", "decode", "state_load", "compute", "state_store", "dead_letter", "commit")
TRAIN_OUTCOMES = ("sgd_step", "no_history", "no_negative", "non_finite")
SKIP_REASONS = ("duplicate",)
COMPONENTS = ("kafka", "redis", "state", "checkpoint", "dead_letter")
STATE_LOSS_KINDS = ("epoch_missing", "offsets_behind")
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
        self.sample_every = Gauge(
            "drnn_prequential_sample_every",
            "The worker ranks about one event in this many (1: every event, 0: evaluation off); "
            "the prequential counters cover only the ranked events.", registry=registry,
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
        self.state_loss = Counter(
            "drnn_redis_state_loss_total",
            "Times Redis was found to have lost data, by kind: epoch_missing (an empty Redis) or "
            "offsets_behind (its applied offsets went back, e.g. after a crash that lost its last writes).",
            ["kind"], registry=registry,
        )
        self.stale_writes = Counter(
            "drnn_stale_state_writes_total",
            "User states not written because Redis already held one with as many events or more.",
            registry=registry,
        )
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
        for kind in STATE_LOSS_KINDS:
            self.state_loss.labels(kind=kind)

    def track_checkpoint_age(self, last_checkpoint: Callable[[], float]) -> None:
        """Make the checkpoint age gauge read ``time.monotonic() - last_checkpoint()``."""
        self.checkpoint_age.set_function(lambda: time.monotonic() - last_checkpoint())


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:
        logger.debug("metrics server: " + format, *args)


def serve_metrics(
    address: str,
    registry: CollectorRegistry,
    health: Callable[[], tuple[bool, bool, str]] | None = None,
):
    """Serve /metrics, /healthz and /readyz on ``host:port`` in a daemon thread; return the server.

    ``health()`` returns (alive, ready, reason). /healthz returns 200 while
    alive and 503 otherwise; /readyz returns 200 while ready and 503 with the
    reason otherwise, with JSON bodies. Without ``health`` both return 200.
    """
    host, _, port = address.rpartition(":")
    metrics_app = make_wsgi_app(registry)

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path not in ("/healthz", "/readyz"):
            return metrics_app(environ, start_response)
        alive, ready, reason = health() if health is not None else (True, True, "")
        ok = alive if path == "/healthz" else ready
        body = {"status": "ok"} if path == "/healthz" and ok else {"ready": ok, "reason": reason}
        if path == "/healthz" and not ok:
            body = {"status": "stalled", "reason": reason}
        payload = json.dumps(body).encode()
        start_response(
            "200 OK" if ok else "503 Service Unavailable",
            [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
        )
        return [payload]

    try:
        server = make_server(host, int(port), application, _ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise ConfigError(
            f"Invalid metrics_address={address!r}: cannot listen there ({exc}). Choose a free local address with "
            "--metrics-address / DRNN_METRICS_ADDRESS, or set it empty to disable the endpoint."
        ) from exc
    threading.Thread(target=server.serve_forever, name="drnn-metrics-http", daemon=True).start()
    logger.info("Serving Prometheus metrics on http://%s:%s/metrics (and /healthz, /readyz)", host, server.server_port)
    return server
