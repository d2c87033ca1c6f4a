"""Print the batch kernel's throughput and the worker's steady-state throughput on MovieLens 100K.

Usage: python benchmarks/throughput.py [--dataset PATH] [--events N] [--skip-worker]

The kernel figure feeds a synthetic stream (1,000 users, 1,700 items, the size
of MovieLens 100K) straight to RecurrentBPR.train_batch in batches of 500,
after a warm-up batch, with prequential ranking on and off. The worker figure
runs the embedded demo (Tansu, redis-server, the real worker) on the dataset
and reports its steady rate. Figures depend on the machine; the script prints
what it ran on.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from drnn_core.config import ModelConfig
from drnn_core.model import RecurrentBPR
from drnn_core.state import UserStateBatch

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "u.data"
BATCH = 500


def kernel_throughput(events: int, *, evaluate: bool, hidden_size: int = 64, window: int = 4) -> float:
    """Return events per second of train_batch on a synthetic stream, compile time excluded."""
    rng = np.random.default_rng(0)
    users, items = 1000, 1700
    model = RecurrentBPR(ModelConfig(hidden_size=hidden_size, window=window))
    states = UserStateBatch.empty(users, hidden_size, window)
    slots = rng.integers(0, users, size=events + BATCH).astype(np.int32)
    item_ids = rng.integers(0, items, size=events + BATCH).astype(np.int32)
    partitions = np.zeros(events + BATCH, dtype=np.int32)
    offsets = np.arange(events + BATCH, dtype=np.int64)

    model.train_batch(states, slots[:BATCH], item_ids[:BATCH], partitions[:BATCH], offsets[:BATCH], evaluate=evaluate)
    started = time.perf_counter()
    for start in range(BATCH, events + BATCH, BATCH):
        end = start + BATCH
        model.train_batch(states, slots[start:end], item_ids[start:end], partitions[start:end], offsets[start:end], evaluate=evaluate)
    return events / (time.perf_counter() - started)


def worker_throughput(dataset: Path) -> dict:
    """Run the embedded demo on MovieLens 100K and return its summary as a dict."""
    from streamer.demo import run_demo
    from streamer.settings import load_settings

    summary = run_demo(load_settings(log_level="WARNING"), dataset=str(dataset), fmt="movielens", progress=False)
    return summary.__dict__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help="MovieLens u.data. Default: %(default)s")
    parser.add_argument("--events", type=int, default=100_000, help="Events of the kernel benchmark. Default: %(default)s")
    parser.add_argument("--skip-worker", action="store_true", help="Run only the kernel benchmark.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}, Python {platform.python_version()}")
    for evaluate in (False, True):
        rate = kernel_throughput(args.events, evaluate=evaluate)
        label = "with full ranking over 1,700 items" if evaluate else "training only"
        print(f"kernel (h=64, K=4, batch {BATCH}, {label}): {rate:,.0f} events/s")

    if args.skip_worker:
        return
    if not args.dataset.exists():
        print(f"worker: skipped, dataset {args.dataset} not found (pass --dataset PATH to u.data)")
        return
    summary = worker_throughput(args.dataset)
    print(
        f"worker on {args.dataset.name} (embedded Tansu and Redis, 4 partitions, batch 500, h=64, K=4, prequential on): "
        f"{summary['events_per_second']:,.0f} events/s steady state; trained {summary['trained']:,}, "
        f"HR@10 {summary['hr_at_10']:.4f}, user count mismatches {summary['user_count_mismatches']}"
    )


if __name__ == "__main__":
    main()
