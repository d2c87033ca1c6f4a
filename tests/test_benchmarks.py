"""Smoke tests of the benchmark helpers: they run on tiny inputs and return well-formed figures (no timing checks)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from drnn_core.config import ModelConfig

BENCH_KERNEL_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_kernel.py"


def _load_bench_kernel():
    spec = importlib.util.spec_from_file_location("bench_kernel", BENCH_KERNEL_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_kernel = _load_bench_kernel()


def test_flop_per_event_counts_sgd_terms():
    config = ModelConfig(hidden_size=2, window=1, negatives=1, optimizer="sgd")

    flop = bench_kernel.flop_per_event(config)

    # forward 16, scores 8, terms 14, backward 38, norm 56, step 32, rows 24, advance 16
    assert flop == 204


def test_flop_per_event_adagrad_costs_more():
    sgd = ModelConfig(optimizer="sgd")
    adagrad = ModelConfig(optimizer="adagrad")

    assert bench_kernel.flop_per_event(adagrad) - bench_kernel.flop_per_event(sgd) == 6 * 2 * 64 * 64


def test_ranking_cost_returns_a_row_per_mode():
    rows = bench_kernel.ranking_cost(item_counts=(50,), sample_every=(1, 10), ranked_item_budget=1.0)

    assert [row["sample_every"] for row in rows] == [0, 1, 10]
    assert all(row["events_per_second"] > 0 for row in rows)
