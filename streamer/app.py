"""Composition root: builds the worker, its clients, stores and metrics from Settings."""

from __future__ import annotations

import logging

import redis
from prometheus_client import CollectorRegistry

from drnn_core.model import RecurrentBPR
from streamer.checkpoints import CheckpointStore
from streamer.kafka_io import DeadLetterSender, make_consumer, make_producer
from streamer.metrics import WorkerMetrics, serve_metrics
from streamer.settings import Settings
from streamer.store import RedisStore
from streamer.worker import Worker

logger = logging.getLogger(__name__)


def make_redis_client(settings: Settings) -> redis.Redis:
    """Create a Redis client from the settings' URL, with timeouts so that an outage is noticed."""
    options = dict(socket_timeout=5.0, socket_connect_timeout=5.0, health_check_interval=30)
    if settings.redis_ssl_ca_certs:
        options["ssl_ca_certs"] = settings.redis_ssl_ca_certs
    return redis.Redis.from_url(settings.redis_url, **options)


def make_store(settings: Settings, client: redis.Redis | None = None) -> RedisStore:
    """Create the Redis store of user states, offsets and item indexes."""
    return RedisStore(
        client or make_redis_client(settings),
        prefix=settings.key_prefix,
        hidden_size=settings.hidden_size,
        window=settings.window,
        state_dtype=settings.state_dtype,
    )


def load_model(settings: Settings, checkpoints: CheckpointStore) -> RecurrentBPR:
    """Load the newest checkpoint, or create a new model from the seed."""
    loaded = checkpoints.load_newest(settings.model_config())
    if loaded is not None:
        return loaded[0]
    logger.info("No checkpoint in %s: starting a new model", checkpoints.directory)
    return RecurrentBPR(settings.model_config())


def build_worker(settings: Settings, registry: CollectorRegistry | None = None) -> Worker:
    """Wire a Worker: Kafka consumer and dead-letter producer, Redis store, model, metrics.

    The metrics HTTP server starts here when ``settings.metrics_address`` is
    set, and stops when the worker stops.
    """
    logger.info("Starting with settings %s", settings.redacted())
    registry = registry if registry is not None else CollectorRegistry()
    metrics = WorkerMetrics(registry)

    store = make_store(settings)
    checkpoints = CheckpointStore(settings.checkpoint_dir, settings.checkpoints_kept)
    checkpoints.check_writable()
    model = load_model(settings, checkpoints)

    consumer = make_consumer(settings)
    producer = make_producer(settings, max_request_size=max(1 << 20, settings.max_message_bytes + (64 << 10)))
    worker = Worker(
        settings=settings,
        consumer=consumer,
        dead_letters=DeadLetterSender(producer, settings.dead_letter_topic, settings.max_message_bytes),
        store=store,
        model=model,
        checkpoints=checkpoints,
        metrics=metrics,
    )
    if settings.metrics_address:
        worker.metrics_server = serve_metrics(settings.metrics_address, registry, worker.health)
    return worker
