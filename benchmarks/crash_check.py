"""Kill the worker with SIGKILL at random points of a replay, restart it, and check every user's count.

Usage: python benchmarks/crash_check.py --dataset PATH --format F [--kills N] [--seed S]

It starts Tansu and redis-server on loopback, produces the whole dataset, then
runs ``drnn-stream worker`` as a subprocess. Each time the events applied (the
sum of the users' counts in Redis) pass the next random kill point, the worker
is killed with SIGKILL and started again. A last run ends by itself when the
topic is idle. The script then prints how many users' event counts and last
applied offsets differ from the dataset's: both must be 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from streamer.datasets import FORMATS, synthetic_interactions, read_interactions
from streamer.embedded import create_topic, start_redis, start_tansu
from streamer.events import encode_event
from streamer.kafka_io import make_producer
from streamer.datasets import Message
from streamer.replay import replay_messages
from streamer.settings import Settings, to_environment
from streamer.store import RedisStore


def applied_events(store: RedisStore) -> int:
    """Return the sum of the event counts of every user in Redis."""
    return sum(count for _, count, _, _ in store.iter_user_states())


def worker_environment(settings: Settings) -> dict[str, str]:
    """Environment variables that configure a worker subprocess like ``settings``."""
    return {**os.environ, **to_environment(settings)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", help="Dataset file. Default: a generated stream of 20,000 events.")
    parser.add_argument("--format", dest="fmt", choices=FORMATS)
    parser.add_argument("--kills", type=int, default=5, help="Number of SIGKILLs. Default: %(default)s")
    parser.add_argument("--seed", type=int, default=1, help="Seed of the kill points. Default: %(default)s")
    parser.add_argument("--partitions", type=int, default=4, help="Partitions of the topic. Default: %(default)s")
    args = parser.parse_args()

    interactions = read_interactions(args.dataset, args.fmt) if args.dataset else synthetic_interactions()
    expected = collections.Counter(i.user_id for i in interactions)
    messages = [Message(*encode_event(i.user_id, i.item_id, i.ts)) for i in interactions]
    kill_points = sorted(np.random.default_rng(args.seed).integers(1, len(messages), size=args.kills).tolist())

    with tempfile.TemporaryDirectory(prefix="drnn-crash-") as workdir, \
            start_tansu(log_dir=Path(workdir)) as broker, \
            start_redis(log_dir=Path(workdir), data_dir=Path(workdir) / "redis") as redis_server:
        settings = Settings(
            bootstrap_servers=broker.bootstrap, redis_url=redis_server.url, session_timeout_ms=6000,
            checkpoint_dir=str(Path(workdir) / "checkpoints"), metrics_address="", exit_when_idle_seconds=5.0,
            log_level="WARNING",
        )
        create_topic(broker.bootstrap, settings.topic, args.partitions)
        create_topic(broker.bootstrap, settings.dead_letter_topic, 1)
        producer = make_producer(settings, linger_ms=20, batch_size=256 * 1024)
        replay_messages(producer, settings.topic, messages, progress=False)
        producer.close()

        client = redis.Redis.from_url(redis_server.url)
        store = RedisStore(client, prefix=settings.key_prefix, hidden_size=settings.hidden_size, window=settings.window)
        env = worker_environment(settings)
        command = [sys.executable, "-m", "streamer.cli", "worker"]
        log = open(Path(workdir) / "worker.log", "ab")
        started = time.monotonic()

        for point in kill_points:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
            while applied_events(store) < point and process.poll() is None:
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
            process.wait()
            print(f"killed the worker after {applied_events(store):,} applied events (kill point {point:,})")

        final = subprocess.run(command, env=env, stdout=log, stderr=log)
        elapsed = time.monotonic() - started

        counts = {user: (count, partition, offset) for user, count, partition, offset in store.iter_user_states()}
        count_mismatches = sum(1 for user in expected.keys() | counts.keys() if expected.get(user, 0) != counts.get(user, (0,))[0])
        applied = store.load_offsets(settings.topic)

    print(f"events: {len(messages):,}, users: {len(expected):,}, kills: {len(kill_points)}, final exit status: {final.returncode}")
    print(f"users whose event count differs from the dataset's: {count_mismatches}")
    print(f"applied offsets per partition: {dict(sorted(applied.items()))}; sum of (offset + 1): {sum(o + 1 for o in applied.values()):,}")
    print(f"wall time including restarts and group joins: {elapsed:.1f} s")
    return 0 if count_mismatches == 0 and final.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
