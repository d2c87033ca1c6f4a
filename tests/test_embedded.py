"""Tests of the local Tansu and Redis servers: start, stop, Kafka round trip and parent-death cleanup."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamer.embedded import (
    EmbeddedServerError,
    create_topic,
    free_port,
    redis_binary,
    start_redis,
    start_tansu,
    tansu_binary,
)


def accepts_tcp(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def process_gone(pid: int) -> bool:
    """Return whether ``pid`` has exited; a zombie waiting for its reaper counts as exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("Z", "X")


def wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.05)
    return process_gone(pid)


def test_free_port_is_bindable() -> None:
    port = free_port()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))

    assert 0 < port < 65536


def test_tansu_binary_is_executable() -> None:
    path = tansu_binary()

    assert os.access(path, os.X_OK)


def test_tansu_binary_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tansu_binary()
    monkeypatch.setenv("CALF_TANSU_BIN", real)

    assert tansu_binary() == real


def test_tansu_binary_invalid_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "missing-tansu"))

    with pytest.raises(EmbeddedServerError, match="CALF_TANSU_BIN"):
        tansu_binary()


def test_redis_binary_is_executable() -> None:
    path = redis_binary()

    assert os.access(path, os.X_OK)
    assert Path(path).name == "redis-server"


def test_start_tansu_and_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="streamer.embedded"):
        tansu = start_tansu(log_dir=tmp_path)
        running = tansu.is_running()
        accepting = accepts_tcp(tansu.port)
        tansu.stop()
        tansu.stop()

    assert running
    assert accepting
    assert tansu.bootstrap == f"127.0.0.1:{tansu.port}"
    assert tansu.returncode is not None
    assert not accepts_tcp(tansu.port)
    assert tansu.log_path.parent == tmp_path
    assert "listening on" in tansu.log_tail()
    assert f"Started tansu pid={tansu.pid}" in caplog.text
    assert f"Stopped tansu pid={tansu.pid}" in caplog.text


def test_start_redis_and_stop(tmp_path: Path) -> None:
    with start_redis(data_dir=tmp_path / "data", log_dir=tmp_path / "log") as server:
        client = redis.Redis.from_url(server.url)
        pong = client.ping()
        client.close()

    assert pong
    assert server.url == f"redis://127.0.0.1:{server.port}/0"
    assert server.returncode == 0
    assert not accepts_tcp(server.port)


def test_start_redis_with_password(tmp_path: Path) -> None:
    password = "p@ss:word/1"
    with start_redis(password=password, data_dir=tmp_path, log_dir=tmp_path) as server:
        with redis.Redis.from_url(server.url) as client:
            pong = client.ping()
        with redis.Redis(host="127.0.0.1", port=server.port, retry=Retry(NoBackoff(), 0)) as anonymous:
            with pytest.raises(redis.exceptions.AuthenticationError):
                anonymous.ping()

    assert pong
    assert server.url.startswith("redis://:p%40ss%3Aword%2F1@127.0.0.1:")


def test_start_redis_appendonly_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with start_redis(data_dir=data_dir, appendonly=True, log_dir=tmp_path) as first:
        with redis.Redis.from_url(first.url) as client:
            client.set("kept", b"value")

    with start_redis(data_dir=data_dir, appendonly=True, log_dir=tmp_path) as second:
        with redis.Redis.from_url(second.url) as client:
            value = client.get("kept")

    assert value == b"value"


def test_start_redis_without_appendonly_loses_data(tmp_path: Path) -> None:
    with start_redis(data_dir=tmp_path, log_dir=tmp_path) as first:
        with redis.Redis.from_url(first.url) as client:
            client.set("lost", b"value")

    with start_redis(data_dir=tmp_path, log_dir=tmp_path) as second:
        with redis.Redis.from_url(second.url) as client:
            value = client.get("lost")

    assert value is None


@pytest.mark.parametrize("start", [start_tansu, start_redis], ids=["tansu", "redis"])
def test_start_on_busy_port_fails(start, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]

        with pytest.raises(EmbeddedServerError, match="Address already in use|Address in use"):
            start(port=port, log_dir=tmp_path, timeout_s=5.0)


def test_managed_process_kill(tmp_path: Path) -> None:
    server = start_redis(data_dir=tmp_path, log_dir=tmp_path)

    server.kill()
    server.kill()
    server.stop()

    assert server.returncode == -signal.SIGKILL


def test_create_topic_existing_is_fine(broker: str, topic_factory) -> None:
    topic = topic_factory(partitions=3)

    create_topic(broker, topic, 3)

    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        described = admin.describe_topics([topic])
    finally:
        admin.close()
    assert len(described[0]["partitions"]) == 3


def test_create_topic_without_broker() -> None:
    port = free_port()

    with pytest.raises(EmbeddedServerError, match=f"127.0.0.1:{port}"):
        create_topic(f"127.0.0.1:{port}", "nowhere", 1, timeout_s=1.0)


def test_tansu_produce_consume_round_trip(broker: str, topic_factory, group_id: str) -> None:
    topic = topic_factory(partitions=2)
    sent = {f"key-{i}".encode(): f"value-{i}".encode() for i in range(20)}
    producer = KafkaProducer(bootstrap_servers=broker)
    for key, value in sent.items():
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=10)
    producer.close()

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=broker,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
    )
    received = {}
    partitions = set()
    deadline = time.monotonic() + 20
    try:
        while len(received) < len(sent) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    received[record.key] = record.value
                    partitions.add(record.partition)
    finally:
        consumer.close()

    assert received == sent
    assert partitions == {0, 1}


CHILD_SCRIPT = """
import sys, time
from pathlib import Path
from streamer.embedded import start_redis, start_tansu

kind, directory = sys.argv[1], Path(sys.argv[2])
if kind == "redis":
    server = start_redis(data_dir=directory, log_dir=directory)
else:
    server = start_tansu(log_dir=directory)
print(server.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["redis", "tansu"])
def test_server_dies_with_parent(kind: str, tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD_SCRIPT, kind, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    server_pid = None
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), f"the parent printed {line!r} instead of a pid"
        server_pid = int(line)
        alive_before = not process_gone(server_pid)

        parent.kill()
        parent.wait(timeout=5)
        server_exited = wait_until_gone(server_pid, timeout_s=5)
    finally:
        parent.kill()
        parent.wait(timeout=5)
        parent.stdout.close()
        if server_pid is not None and not process_gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)

    assert alive_before
    assert server_exited
