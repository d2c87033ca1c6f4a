"""Benchmarks of the optional accelerators crc32c, hiredis and orjson against the code paths of the worker.

Run it through ``benchmarks/run_all.py`` (section deps).

``dependency_effects`` measures each package with and without it and returns
plain numbers, which run_all.py prints. kafka-python and redis-py look for
crc32c and hiredis once, at import, so those two are measured in runner
subprocesses. A runner that blocks the import (``sys.modules[name] = None``)
before anything else loads gives the "without" figure. An identical runner
without the block gives the "with" figure. orjson is measured in this process
on the dataset's message values. Figures depend on the machine and its load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bench_pipeline
from bench_pipeline import BenchmarkError
from drnn_core.state import UserStateBatch
from streamer.app import make_redis_client
from streamer.cli import configure_logging
from streamer.demo import load_demo_messages
from streamer.embedded import start_redis
from streamer.events import DecodeLimits, decode_event
from streamer.settings import Settings
from streamer.store import COMMIT_OK, RedisStore

logger = logging.getLogger(__name__)

BENCHMARK_DIR = Path(__file__).resolve().parent
CHILD_TIMEOUT_S = 900.0
RESULT_MARKER = "BENCH_DEPS_RESULT "
# Share of the worker's steady wall time spent in its decode stage, measured by bench_pipeline.end_to_end
# on MovieLens 100K on a 2-core x86_64 machine. Pass --decode-share to use another measurement.
DEFAULT_DECODE_SHARE = 0.07

STORE_HIDDEN_SIZE = 64
STORE_WINDOW = 4
STORE_BATCH_USERS = 500
STORE_POOL_BATCHES = 10
STORE_TIMED_BATCHES = 200
STORE_TOPIC = "bench-deps"
STORE_ITEMS = 1682
STORE_SEED = 0
DECODE_REPEATS = 5

# Runs in a fresh interpreter: argv[1] is the module to block ("" for none), argv[2] the task, argv[3] its
# JSON arguments. The block comes first, so kafka-python and redis-py see the package as missing.
_CHILD_CODE = """
import sys
if sys.argv[1]:
    sys.modules[sys.argv[1]] = None
sys.path.insert(0, {benchmark_dir!r})
import bench_deps
bench_deps.run_child(sys.argv[2], sys.argv[3])
"""


def run_child(task: str, arguments_json: str) -> None:
    """Run one measurement task in a runner subprocess and print its result as one JSON line on stdout."""
    configure_logging("WARNING")
    arguments = json.loads(arguments_json)
    if task == "consumer":
        result = _consumer_child(Settings(**arguments["settings"]), arguments["events"])
    elif task == "store":
        result = _store_child(Settings(**arguments["settings"]))
    else:
        raise BenchmarkError(f"Unknown runner task {task!r}: expected 'consumer' or 'store'")
    print(RESULT_MARKER + json.dumps(result), flush=True)


def _consumer_child(settings: Settings, events: int) -> dict:
    """Return ``bare_consumer_rate`` and whether kafka-python found the crc32c package."""
    from kafka.record import util

    result = _bare_consumer_rate_checked(settings, events)
    result["crc32c_loaded"] = util.crc32c_c is not None
    return result


def _bare_consumer_rate_checked(settings: Settings, events: int) -> dict:
    """Run ``bench_pipeline.bare_consumer_rate`` and raise if a message failed to decode."""
    result = bench_pipeline.bare_consumer_rate(settings, events)
    if result["invalid"]:
        raise BenchmarkError(
            f"The bare consumer found {result['invalid']} invalid messages in topic {settings.topic!r}, "
            "which holds only the demo's valid events: check the dataset encoding"
        )
    return result


def _random_states(rng: np.random.Generator, size: int) -> UserStateBatch:
    """Create ``size`` states with random hidden vectors, a full window and one applied event each."""
    batch = UserStateBatch.empty(size, STORE_HIDDEN_SIZE, STORE_WINDOW)
    batch.hidden[:] = rng.random(batch.hidden.shape, dtype=np.float32)
    batch.start_hidden[:] = rng.random(batch.start_hidden.shape, dtype=np.float32)
    batch.window[:] = rng.integers(0, STORE_ITEMS, size=batch.window.shape, dtype=np.int32)
    batch.window_len[:] = STORE_WINDOW
    batch.count[:] = 1
    batch.last_partition[:] = 0
    return batch


class _OffsetFence:
    """The applied offset of partition 0 that the store holds, advanced by one per committed batch."""

    def __init__(self) -> None:
        self.stored: int | None = None

    def commit(self, store: RedisStore, user_ids: list[str], batch: UserStateBatch, epoch: str) -> float:
        """Commit ``batch`` as the next offset, return the seconds ``commit_batch`` took, raise if it was rejected."""
        offset = 0 if self.stored is None else self.stored + 1
        batch.last_offset[:] = offset

        started = time.perf_counter()
        outcome = store.commit_batch(
            user_ids, batch, topic=STORE_TOPIC, epoch=epoch, expected_offsets={0: self.stored}, offsets={0: offset}
        )
        seconds = time.perf_counter() - started

        if outcome.status != COMMIT_OK or outcome.stale_states:
            raise BenchmarkError(
                f"commit_batch under prefix {store.prefix!r} returned {outcome}, expected status {COMMIT_OK!r} "
                "with no stale states: another process may be writing the prefix"
            )
        self.stored = offset
        return seconds


def _store_child(settings: Settings) -> dict:
    """Time ``load_states`` plus ``commit_batch`` on batches of real states, as the worker calls them.

    A pool of STORE_POOL_BATCHES * STORE_BATCH_USERS users is written once,
    untimed. Each timed batch then loads the next STORE_BATCH_USERS users of
    the pool, adds one event to their counts and commits them, so every MGET
    returns stored blobs and no write is skipped as stale.
    """
    import redis.utils

    rng = np.random.default_rng(STORE_SEED)
    store = RedisStore(
        make_redis_client(settings), prefix=settings.key_prefix, hidden_size=STORE_HIDDEN_SIZE, window=STORE_WINDOW
    )
    epoch = store.ensure_epoch()
    fence = _OffsetFence()
    chunks = [
        [f"user-{batch}-{row}" for row in range(STORE_BATCH_USERS)] for batch in range(STORE_POOL_BATCHES)
    ]

    load_seconds = store_seconds = 0.0
    try:
        for user_ids in chunks:
            fence.commit(store, user_ids, _random_states(rng, STORE_BATCH_USERS), epoch)

        for number in range(STORE_TIMED_BATCHES):
            user_ids = chunks[number % len(chunks)]
            started = time.perf_counter()
            states, corrupt = store.load_states(user_ids)
            load_seconds += time.perf_counter() - started
            if corrupt or not np.all(states.count > 0):
                raise BenchmarkError(
                    f"load_states under prefix {store.prefix!r} returned {len(corrupt)} corrupt and "
                    f"{int(np.count_nonzero(states.count == 0))} missing states of {len(user_ids)} stored ones"
                )

            states.count += 1
            store_seconds += fence.commit(store, user_ids, states, epoch)
    finally:
        store.client.close()

    users = STORE_TIMED_BATCHES * STORE_BATCH_USERS
    return {
        "hiredis_available": redis.utils.HIREDIS_AVAILABLE,
        "users": users,
        "load_seconds": load_seconds,
        "store_seconds": store_seconds,
        "users_per_second": users / (load_seconds + store_seconds),
        "load_users_per_second": users / load_seconds,
        "store_users_per_second": users / store_seconds,
    }


def _run_in_subprocess(blocked: str, task: str, arguments: dict) -> dict:
    """Run ``run_child(task, arguments)`` in a new interpreter with ``blocked`` made unimportable, return its result."""
    command = [
        sys.executable, "-c", _CHILD_CODE.format(benchmark_dir=str(BENCHMARK_DIR)),
        blocked, task, json.dumps(arguments),
    ]
    label = f"runner {task!r} with {blocked or 'nothing'} blocked"
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise BenchmarkError(f"The {label} did not finish within {CHILD_TIMEOUT_S:.0f} s") from error

    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if completed.returncode != 0 or not lines:
        raise BenchmarkError(
            f"The {label} exited with status {completed.returncode} and no result. Its stderr ends with:\n"
            f"{completed.stderr[-2000:]}"
        )
    return json.loads(lines[-1][len(RESULT_MARKER):])


def _alternate(blocked: str, task: str, make_arguments, runs: int, proof: str) -> tuple[list[dict], list[dict]]:
    """Run the task ``runs`` times with the package and ``runs`` times without, alternating, starting with it.

    ``proof`` names the boolean result field that is True when the package
    was loaded. A run where it disagrees with the block raises, because the
    figure would then measure the wrong parser.
    """
    results: dict[bool, list[dict]] = {True: [], False: []}
    for number in range(runs):
        for with_package in (True, False):
            label = f"{'with' if with_package else 'without'}-{number}"
            result = _run_in_subprocess("" if with_package else blocked, task, make_arguments(label))
            if result[proof] != with_package:
                raise BenchmarkError(
                    f"The {task!r} runner {label} reported {proof}={result[proof]}, expected {with_package}: "
                    f"check how {blocked} is installed"
                )
            logger.info("%s %s: %s", task, label, result)
            results[with_package].append(result)
    return results[True], results[False]


def _compare(label: str, with_results: list[dict], without_results: list[dict], unit: str) -> dict:
    """Return the ``unit`` figure of each run, the means and the ratio of the means, keyed by ``label``."""
    with_rates = [result[unit] for result in with_results]
    without_rates = [result[unit] for result in without_results]
    with_mean = statistics.fmean(with_rates)
    without_mean = statistics.fmean(without_rates)
    return {
        f"{label}_with_{unit}": with_mean,
        f"{label}_without_{unit}": without_mean,
        f"{label}_with_runs": with_rates,
        f"{label}_without_runs": without_rates,
        f"{label}_ratio": with_mean / without_mean if without_mean > 0 else 0.0,
    }


def crc32c_effect(dataset: Path, fmt: str = "movielens", runs: int = 2) -> dict:
    """Measure the bare consumer's poll-and-decode rate with and without the crc32c package.

    One Tansu broker serves one topic, filled once with the dataset's demo messages.
    Every run reads all of it in its own subprocess with a new consumer group,
    with the worker's consumer settings (4 partitions, batch 500).

    Returns
    -------
    dict
        crc32c_with_events_per_second and crc32c_without_events_per_second
        (means), the runs of each, crc32c_ratio (with / without) and events.
    """
    with bench_pipeline._prefilled_topic(dataset, fmt, partitions=4, batch_size=500) as topic:

        def arguments(label: str) -> dict:
            settings = bench_pipeline._fresh_run(topic.settings, topic.workdir, f"crc32c-{label}")
            return {"settings": dataclasses.asdict(settings), "events": topic.events}

        with_results, without_results = _alternate("crc32c", "consumer", arguments, runs, "crc32c_loaded")

    return {"events": topic.events, **_compare("crc32c", with_results, without_results, "events_per_second")}


def hiredis_effect(runs: int = 2) -> dict:
    """Measure ``RedisStore.load_states`` plus ``commit_batch`` throughput with and without hiredis.

    One redis-server serves every run, and each run writes under its own key
    prefix. See ``_store_child`` for what a run does.

    Returns
    -------
    dict
        hiredis_with_users_per_second and hiredis_without_users_per_second
        (means of load plus store), the runs of each, hiredis_ratio (with /
        without), and the means of each call alone:
        hiredis_load_with_users_per_second, hiredis_load_without_...,
        hiredis_store_with_... and hiredis_store_without_users_per_second.
    """
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="drnn-bench-deps-")))
        server = stack.enter_context(start_redis(log_dir=workdir, data_dir=workdir / "redis"))
        base = Settings(redis_url=server.url, metrics_address="", log_level="WARNING")

        def arguments(label: str) -> dict:
            settings = dataclasses.replace(base, key_prefix=f"bench-deps-{label}")
            return {"settings": dataclasses.asdict(settings)}

        with_results, without_results = _alternate("hiredis", "store", arguments, runs, "hiredis_available")

    figures = _compare("hiredis", with_results, without_results, "users_per_second")
    for stage in ("load", "store"):
        unit = f"{stage}_users_per_second"
        with_mean = statistics.fmean(result[unit] for result in with_results)
        without_mean = statistics.fmean(result[unit] for result in without_results)
        figures[f"hiredis_{stage}_with_users_per_second"] = with_mean
        figures[f"hiredis_{stage}_without_users_per_second"] = without_mean
    return figures


def _best_rate(function, values: list[bytes]) -> float:
    """Call ``function`` on every value and return the calls per second of the fastest of DECODE_REPEATS passes."""
    best = float("inf")
    for _ in range(DECODE_REPEATS):
        started = time.perf_counter()
        for value in values:
            function(value)
        best = min(best, time.perf_counter() - started)
    return len(values) / best


def orjson_effect(dataset: Path, fmt: str = "movielens", decode_share: float = DEFAULT_DECODE_SHARE) -> dict:
    """Measure json.loads against orjson.loads on the dataset's message values, in this process.

    The json figure decodes the bytes to str first, as ``decode_event`` does,
    and orjson parses the bytes directly. ``decode_share`` is the decode
    stage's share of the worker's steady wall time.

    Returns
    -------
    dict
        json_events_per_second, orjson_events_per_second, orjson_ratio,
        decode_event_events_per_second (the whole of ``decode_event`` with
        json), decode_share, and the estimates
        estimated_decode_stage_speedup and estimated_worker_speedup.

    Raises
    ------
    BenchmarkError
        If orjson is not installed, or parses a value differently from json.
    """
    try:
        import orjson
    except ImportError as error:
        raise BenchmarkError("The orjson benchmark needs orjson: pip install orjson") from error

    _, messages, _ = load_demo_messages(str(dataset), fmt)
    values = [message.value for message in messages]
    keys = [message.key for message in messages]
    mismatched = sum(1 for value in values if orjson.loads(value) != json.loads(value.decode("utf-8")))
    if mismatched:
        raise BenchmarkError(f"orjson and json parse {mismatched} of {len(values)} messages of {dataset} differently")

    json_rate = _best_rate(lambda value: json.loads(value.decode("utf-8")), values)
    orjson_rate = _best_rate(orjson.loads, values)
    limits = DecodeLimits(require_key=True)
    pairs = list(zip(values, keys))
    decode_rate = _best_rate(lambda pair: decode_event(pair[0], pair[1], limits), pairs)

    # NOTE: an estimate. It assumes that the decode stage costs what decode_event costs per event,
    # and that orjson would save exactly the parse-time difference measured here.
    saved_fraction = (1 / json_rate - 1 / orjson_rate) * decode_rate
    worker_speedup = 1 / (1 - decode_share * saved_fraction)
    return {
        "events": len(values),
        "mean_value_bytes": statistics.fmean(len(value) for value in values),
        "json_events_per_second": json_rate,
        "orjson_events_per_second": orjson_rate,
        "orjson_ratio": orjson_rate / json_rate,
        "decode_event_events_per_second": decode_rate,
        "decode_share": decode_share,
        "estimated_decode_stage_speedup": 1 / (1 - saved_fraction),
        "estimated_worker_speedup": worker_speedup,
        "worker_speedup_if_decode_were_free": 1 / (1 - decode_share),
    }


def dependency_effects(
    dataset: Path, fmt: str = "movielens", runs: int = 2, decode_share: float = DEFAULT_DECODE_SHARE
) -> dict:
    """Measure crc32c, hiredis and orjson one after the other; return their figures in one dict.

    Each of crc32c and hiredis runs ``runs`` times with and ``runs`` times
    without, alternating. See ``crc32c_effect``, ``hiredis_effect`` and
    ``orjson_effect`` for the keys. load_average_before and _after are the
    1-minute load averages, which show whether other processes competed.
    """
    figures = {"dataset": str(dataset), "load_average_before": os.getloadavg()[0]}
    figures.update(orjson_effect(dataset, fmt, decode_share))
    figures.update(crc32c_effect(dataset, fmt, runs))
    figures.update(hiredis_effect(runs))
    figures["load_average_after"] = os.getloadavg()[0]
    return figures


def _format_runs(rates: list[float]) -> str:
    return ", ".join(f"{rate:,.0f}" for rate in rates)
