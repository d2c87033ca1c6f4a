"""Measure the Redis memory per user state, the HR@10 cost of float16 states, and the worker's resident memory.

Run it through ``benchmarks/run_all.py`` (section memory).

The Redis and HR@10 figures run the embedded demo (Tansu, redis-server and the
real worker, h=64, K=4, seed 42) on the dataset. The resident-memory figures
run in child processes of this script, so that each one starts from a fresh
interpreter. The functions return dicts, which run_all.py prints.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
from pathlib import Path

from drnn_core.errors import DrnnError

MIB = 1024 * 1024
SCAN_COUNT = 1000
TRAIN_EVENTS = 64
# The worker's composition root: importing it loads the modules that build and run a worker.
WORKER_MODULE = "streamer.app"


def redis_bytes_per_user(
    dataset: Path, fmt: str = "movielens", state_dtype: str = "float32", *, partitions: int = 4
) -> dict:
    """Run the embedded demo and measure ``MEMORY USAGE`` of every user-state key before its Redis stops.

    Parameters
    ----------
    dataset : Path
        Interaction file read by ``streamer.datasets.read_interactions``.
    fmt : str
        Its format, such as "movielens".
    state_dtype : {"float32", "float16"}
        The ``state_dtype`` setting of the worker.
    partitions : int
        Partitions of the demo topic.

    Returns
    -------
    dict
        ``users`` (user-state keys found), ``mean_bytes_per_user`` (mean
        ``MEMORY USAGE``), ``raw_state_bytes`` (the blob length),
        ``mean_key_bytes`` (mean key name length), ``ratio`` (mean usage over
        the blob length), ``redis_used_memory_mib`` (``INFO memory``
        used_memory), ``redis_allocator`` and ``redis_version`` (the
        overhead depends on both) and the demo's ``hr_at_10`` and ``mrr_at_10``.
    """
    from streamer.demo import run_demo
    from streamer.settings import load_settings

    measured: dict = {}

    # run_demo calls on_worker before the worker runs and stops Redis soon after
    # worker.run returns, so the keys are measured inside a wrapper of worker.run.
    def measure_after_run(worker) -> None:
        run = worker.run

        def run_then_measure(*args, **kwargs):
            totals = run(*args, **kwargs)
            measured.update(_measure_user_keys(worker.store))
            return totals

        worker.run = run_then_measure

    settings = load_settings(environ={}, log_level="WARNING", state_dtype=state_dtype)
    summary = run_demo(
        settings, dataset=str(dataset), fmt=fmt, partitions=partitions, progress=False, on_worker=measure_after_run
    )

    raw = _raw_state_bytes(settings.hidden_size, settings.window, state_dtype)
    return {
        "state_dtype": state_dtype,
        "users": measured["users"],
        "mean_bytes_per_user": measured["mean_bytes"],
        "raw_state_bytes": raw,
        "mean_key_bytes": measured["mean_key_bytes"],
        "ratio": measured["mean_bytes"] / raw,
        "redis_used_memory_mib": measured["used_memory"] / MIB,
        "redis_allocator": measured["allocator"],
        "redis_version": measured["redis_version"],
        "hr_at_10": summary.hr_at_10,
        "mrr_at_10": summary.mrr_at_10,
    }


def _raw_state_bytes(hidden_size: int, window: int, state_dtype: str) -> int:
    from streamer.state_codec import state_size_bytes

    return state_size_bytes(hidden_size, window, state_dtype)


def _measure_user_keys(store) -> dict:
    """Return the number, mean ``MEMORY USAGE`` and mean name length of the user-state keys of ``store``.

    Keys are listed with SCAN over the store's user-key pattern and measured
    with one pipelined MEMORY USAGE per SCAN page.
    """
    client = store.client
    pattern = store.user_key("") + b"*"
    users = 0
    total_bytes = 0
    total_key_bytes = 0

    cursor = 0
    while True:
        cursor, keys = client.scan(cursor=cursor, match=pattern, count=SCAN_COUNT)
        if keys:
            pipeline = client.pipeline(transaction=False)
            for key in keys:
                pipeline.memory_usage(key)
            usages = pipeline.execute()
            users += len(keys)
            total_bytes += sum(usages)
            total_key_bytes += sum(len(key) for key in keys)
        if cursor == 0:
            break

    if users == 0:
        raise DrnnError(
            f"No user-state keys match {pattern!r}: the demo stored no users, so check the dataset and its format"
        )
    memory = client.info("memory")
    return {
        "users": users,
        "mean_bytes": total_bytes / users,
        "mean_key_bytes": total_key_bytes / users,
        "used_memory": int(memory["used_memory"]),
        "allocator": memory["mem_allocator"],
        "redis_version": client.info("server")["redis_version"],
    }


def float16_hr_cost(dataset: Path, fmt: str = "movielens") -> dict:
    """Return the demo's HR@10 and MRR@10 with float32 and with float16 user states, and float16 minus float32.

    Both runs use the default settings (seed 42) and one partition, so the
    worker applies the events in the same order and the stored type is the
    only difference between the runs. With more partitions the order of the
    events across partitions changes from run to run, and so does HR@10.
    """
    runs = {
        state_dtype: redis_bytes_per_user(dataset, fmt, state_dtype, partitions=1)
        for state_dtype in ("float32", "float16")
    }
    return {
        "hr_at_10_float32": runs["float32"]["hr_at_10"],
        "hr_at_10_float16": runs["float16"]["hr_at_10"],
        "difference": runs["float16"]["hr_at_10"] - runs["float32"]["hr_at_10"],
        "mrr_at_10_float32": runs["float32"]["mrr_at_10"],
        "mrr_at_10_float16": runs["float16"]["mrr_at_10"],
        "mrr_difference": runs["float16"]["mrr_at_10"] - runs["float32"]["mrr_at_10"],
    }


def worker_rss(items: int = 1_000_000, hidden_size: int = 64) -> dict:
    """Measure the peak resident memory of a worker-sized model with capacity for ``items`` items.

    One child process imports the worker's modules and builds
    ``RecurrentBPR(ModelConfig(hidden_size=hidden_size))`` (the other
    hyperparameters at their defaults), grows it with ``ensure_capacity`` and
    runs ``train_batch`` with prequential ranking on events whose items are
    near the top index. A second child only imports the worker's modules, for
    reference.

    Returns
    -------
    dict
        ``items``, ``hidden_size`` and ``capacity`` (item rows after growth),
        then figures in MiB:

        - ``import_rss_mib``: resident memory after the imports
        - ``peak_after_growth_mib``: peak resident memory after ``ensure_capacity``
        - ``peak_rss_mib``: peak resident memory after ``train_batch``
        - ``rss_after_train_mib``: resident memory after ``train_batch``
        - ``model_array_mib``: bytes of the model's distinct arrays
        - ``idle_worker_rss_mib``: peak resident memory of the import-only child
    """
    model = _run_child(["model", str(items), str(hidden_size)])
    idle = _run_child(["idle"])
    return {**model, "idle_worker_rss_mib": idle["peak_rss_mib"]}


def _run_child(arguments: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *arguments]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise DrnnError(
            f"Memory child {' '.join(arguments)} failed with exit code {completed.returncode}: "
            f"{completed.stderr.strip()[-2000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _memory_status() -> dict:
    """Return VmRSS and VmHWM (peak resident set) of this process in MiB, from /proc/self/status.

    Where /proc is missing, both are ``ru_maxrss``, which Linux reports in KiB.
    """
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"rss": peak, "peak": peak}

    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {
        "rss": int(fields["VmRSS"].split()[0]) / 1024,
        "peak": int(fields["VmHWM"].split()[0]) / 1024,
    }


def _child_idle() -> dict:
    importlib.import_module(WORKER_MODULE)
    return {"peak_rss_mib": _memory_status()["peak"]}


def _child_model(items: int, hidden_size: int) -> dict:
    import numpy as np

    importlib.import_module(WORKER_MODULE)
    from drnn_core.config import ModelConfig
    from drnn_core.model import RecurrentBPR
    from drnn_core.state import UserStateBatch

    after_import = _memory_status()
    model = RecurrentBPR(ModelConfig(hidden_size=hidden_size))
    model.ensure_capacity(items)
    after_growth = _memory_status()

    config = model.config
    states = UserStateBatch.empty(TRAIN_EVENTS, config.hidden_size, config.window)
    slots = np.arange(TRAIN_EVENTS, dtype=np.int32) % 8
    item_ids = (items - 1 - np.arange(TRAIN_EVENTS) % 32).astype(np.int32)
    partitions = np.zeros(TRAIN_EVENTS, dtype=np.int32)
    offsets = np.arange(TRAIN_EVENTS, dtype=np.int64)
    model.train_batch(states, slots, item_ids, partitions, offsets, evaluate=True)
    after_train = _memory_status()

    return {
        "items": items,
        "hidden_size": hidden_size,
        "capacity": model.capacity,
        "model_array_mib": _model_array_bytes(model) / MIB,
        "import_rss_mib": after_import["rss"],
        "peak_after_growth_mib": after_growth["peak"],
        "peak_rss_mib": after_train["peak"],
        "rss_after_train_mib": after_train["rss"],
    }


def _model_array_bytes(model) -> int:
    """Return the bytes of the model's parameter, accumulator and item-statistics arrays, each counted once."""
    from drnn_core.model import PARAMETER_ARRAYS

    arrays = [getattr(model, name) for name in PARAMETER_ARRAYS] + list(model.stats.as_tuple())
    distinct = {id(array): array for array in arrays}
    return sum(array.nbytes for array in distinct.values())


def main() -> None:
    """Run one resident-memory measurement as a child process of ``worker_rss`` and print it as JSON."""
    parser = argparse.ArgumentParser(description="Child process of worker_rss; run the benchmarks with run_all.py.")
    parser.add_argument("--child", nargs="+", required=True, help="idle, or model ITEMS HIDDEN_SIZE.")
    args = parser.parse_args()
    kind, *values = args.child
    result = _child_idle() if kind == "idle" else _child_model(int(values[0]), int(values[1]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
