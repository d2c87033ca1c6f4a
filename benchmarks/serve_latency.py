"""Print the latency of GET /recommend (k=10, 25,000 items) against the ranking kernel called directly.

Usage: python benchmarks/serve_latency.py [--items N] [--users N] [--requests N]

The script starts a redis-server (streamer.embedded.start_redis), trains a
synthetic model on a stream that touches every item, stores the user states and
writes a checkpoint. It then runs ``drnn-stream serve``'s server in a child
process and sends sequential requests over one keep-alive connection, timing
each on the client. The direct figure times ``RecurrentBPR.top_k`` (the
``score_items`` kernel plus the top-k selection) on the same hidden states in
this process, and the in-process figure times ``Recommender.recommend`` (Redis
MGET, kernel, item ids) without HTTP. The target is an HTTP p99 within twice the
direct p99 plus 2 ms. Figures depend on the machine; the script prints what it
ran on.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from drnn_core.model import RecurrentBPR
from drnn_core.state import UserStateBatch
from streamer.checkpoints import CheckpointStore
from streamer.embedded import free_port, start_redis
from streamer.settings import Settings
from streamer.store import RedisStore

HIDDEN_SIZE = 64
WINDOW = 4
K = 10
TRAIN_BATCH = 5000
WARMUP_REQUESTS = 300
START_TIMEOUT_S = 60.0


def build_data(settings: Settings, store: RedisStore, *, items: int, users: int, seed: int) -> list[str]:
    """Train a model on a stream that touches every item, store the states and a checkpoint; return the user ids."""
    rng = np.random.default_rng(seed)
    events = 2 * items
    item_sequence = np.concatenate([rng.permutation(items), rng.integers(0, items, size=events - items)])
    user_sequence = rng.integers(0, users, size=events)
    user_ids = [f"u{user}" for user in range(users)]

    item_indexes = np.concatenate([
        store.allocate_items([f"i{item}" for item in item_sequence[start:start + TRAIN_BATCH]])
        for start in range(0, events, TRAIN_BATCH)
    ])
    model = RecurrentBPR(settings.model_config())
    states = UserStateBatch.empty(users, HIDDEN_SIZE, WINDOW)
    for start in range(0, events, TRAIN_BATCH):
        end = min(start + TRAIN_BATCH, events)
        model.train_batch(
            states,
            user_sequence[start:end].astype(np.int32),
            item_indexes[start:end],
            np.zeros(end - start, dtype=np.int32),
            np.arange(start, end, dtype=np.int64),
            evaluate=False,
        )

    store.save_states(user_ids, states, topic="bench", offsets={0: events - 1}, new_users=users)
    CheckpointStore(settings.checkpoint_dir).save(model, events)
    return user_ids


def run_server(settings: Settings, address: str) -> None:
    """Child process: serve HTTP until SIGTERM."""
    from streamer.serve import build_service, serve_http

    logging.basicConfig(level=logging.WARNING)
    service = build_service(settings)
    service.start()
    try:
        serve_http(service, address)
    finally:
        service.close()


def wait_until_serving(port: int, user_id: str) -> None:
    """Poll GET /recommend until it returns 200, or raise after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", f"/recommend?user_id={user_id}&k={K}")
            if connection.getresponse().status == 200:
                connection.close()
                return
            connection.close()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"The server on port {port} did not return 200 on /recommend within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def time_http(port: int, user_ids: list[str]) -> np.ndarray:
    """Return the wall time in seconds of one GET /recommend per user id, over one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    durations = np.empty(len(user_ids), dtype=np.float64)
    for n, user_id in enumerate(user_ids):
        started = time.perf_counter()
        connection.request("GET", f"/recommend?user_id={user_id}&k={K}")
        response = connection.getresponse()
        body = response.read()
        durations[n] = time.perf_counter() - started
        if response.status != 200 or len(json.loads(body)["items"]) != K:
            raise RuntimeError(f"Unexpected response {response.status} for user {user_id}: {body[:200]!r}")
    connection.close()
    return durations


def time_direct(model: RecurrentBPR, hidden: np.ndarray) -> np.ndarray:
    """Return the wall time in seconds of one RecurrentBPR.top_k call per row of ``hidden``."""
    durations = np.empty(hidden.shape[0], dtype=np.float64)
    for row in range(hidden.shape[0]):
        started = time.perf_counter()
        model.top_k(hidden[row], K)
        durations[row] = time.perf_counter() - started
    return durations


def time_in_process(settings: Settings, user_ids: list[str]) -> np.ndarray:
    """Return the wall time in seconds of one Recommender.recommend call per user id, without HTTP."""
    from streamer.serve import ModelWatcher, Recommender, make_serving_store

    store = make_serving_store(settings)
    watcher = ModelWatcher(CheckpointStore(settings.checkpoint_dir), settings.model_config(), 5.0)
    watcher.refresh()
    recommender = Recommender(store, watcher)
    durations = np.empty(len(user_ids), dtype=np.float64)
    for n, user_id in enumerate(user_ids):
        started = time.perf_counter()
        recommender.recommend(user_id, K)
        durations[n] = time.perf_counter() - started
    store.client.close()
    return durations


def percentiles_ms(durations: np.ndarray) -> tuple[float, float]:
    """Return the p50 and p99 of ``durations`` in milliseconds."""
    p50, p99 = np.percentile(durations, [50, 99])
    return 1000 * p50, 1000 * p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=25_000, help="Known items. Default: %(default)s")
    parser.add_argument("--users", type=int, default=2_000, help="Users with a state. Default: %(default)s")
    parser.add_argument("--requests", type=int, default=3_000, help="Timed requests. Default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the synthetic data. Default: %(default)s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="drnn-serve-bench-") as directory, \
            start_redis(data_dir=Path(directory) / "redis", log_dir=Path(directory)) as redis_server:
        settings = Settings(
            redis_url=redis_server.url, key_prefix="bench", hidden_size=HIDDEN_SIZE, window=WINDOW,
            checkpoint_dir=str(Path(directory) / "checkpoints"), log_level="WARNING",
        )
        store = RedisStore(
            redis.Redis.from_url(redis_server.url), prefix="bench", hidden_size=HIDDEN_SIZE, window=WINDOW,
        )
        user_ids = build_data(settings, store, items=args.items, users=args.users, seed=args.seed)
        rng = np.random.default_rng(args.seed + 1)
        sample = [user_ids[n] for n in rng.integers(0, len(user_ids), size=args.requests)]

        model, _ = CheckpointStore(settings.checkpoint_dir).load_newest(settings.model_config())
        hidden = store.load_states(sample)[0].hidden
        time_direct(model, hidden[:WARMUP_REQUESTS])
        direct = time_direct(model, hidden)
        time_in_process(settings, sample[:WARMUP_REQUESTS])
        in_process = time_in_process(settings, sample)

        port = free_port()
        context = multiprocessing.get_context("spawn")
        server = context.Process(target=run_server, args=(settings, f"127.0.0.1:{port}"), daemon=True)
        server.start()
        try:
            wait_until_serving(port, user_ids[0])
            time_http(port, sample[:WARMUP_REQUESTS])
            over_http = time_http(port, sample)
        finally:
            server.terminate()
            server.join(10)
        store.client.close()

    print(f"{args.items:,} known items, h={HIDDEN_SIZE}, k={K}, {args.requests:,} sequential requests after {WARMUP_REQUESTS} warm-up")
    for label, durations in (
        ("direct RecurrentBPR.top_k", direct),
        ("in-process Recommender.recommend (Redis + kernel + ids)", in_process),
        ("HTTP GET /recommend (uvicorn + Starlette, keep-alive)", over_http),
    ):
        p50, p99 = percentiles_ms(durations)
        print(f"{label}: p50 {p50:.3f} ms, p99 {p99:.3f} ms")

    budget = 2 * percentiles_ms(direct)[1] + 2.0
    http_p99 = percentiles_ms(over_http)[1]
    verdict = "met" if http_p99 <= budget else "missed"
    print(f"target: HTTP p99 {http_p99:.3f} ms <= 2 x direct p99 + 2 ms = {budget:.3f} ms: {verdict}")


if __name__ == "__main__":
    main()
