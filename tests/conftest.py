"""Shared fixtures: one Tansu broker and one redis-server per test session, and unique names per test."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from streamer.embedded import ManagedProcess, create_topic, start_redis, start_tansu


def _unique(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap string "127.0.0.1:PORT" of a Tansu broker shared by the session."""
    with start_tansu(log_dir=tmp_path_factory.mktemp("tansu")) as process:
        yield process.bootstrap


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A redis-server shared by the session, without persistence."""
    with start_redis(
        data_dir=tmp_path_factory.mktemp("redis-data"),
        log_dir=tmp_path_factory.mktemp("redis-log"),
    ) as process:
        yield process


@pytest.fixture
def redis_client(redis_server: ManagedProcess) -> Iterator[redis.Redis]:
    """A client of the session's redis-server, returning bytes."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix unique to the test; its keys are deleted after the test."""
    prefix = _unique("t")
    yield prefix

    keys = list(redis_client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        redis_client.unlink(*keys)


@pytest.fixture
def topic_factory(broker: str) -> Callable[..., str]:
    """A function (partitions=4) -> name of a new topic on the session's broker."""

    def create(partitions: int = 4) -> str:
        topic = _unique("topic")
        create_topic(broker, topic, partitions)
        return topic

    return create


@pytest.fixture
def group_id() -> str:
    """A consumer group id unique to the test."""
    return _unique("group")
