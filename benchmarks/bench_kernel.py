"""Kernel benchmarks: the training kernel's floating-point rate against NumPy, and the cost of prequential ranking.

Each function returns a dict of figures, which ``run_all.py`` prints. Rates are
measured in process CPU time (``time.process_time``), so that other jobs on a
shared machine slow a run less than they would in wall time. The kernel and
NumPy (limited to one BLAS thread with threadpoolctl) each use one core.
"""

from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

from drnn_core.config import ModelConfig
from drnn_core.model import RecurrentBPR
from drnn_core.state import UserStateBatch

BATCH = 500
USERS = 1000
ITEMS = 1700


def flop_per_event(config: ModelConfig) -> int:
    """Return the floating-point operations of one training step of a user with a full window.

    A multiply-add counts as 2. With h the hidden size, K the window, N the
    negatives per event and R = N + 1 scored rows:

    - forward over the window: K steps of two (1, h) x (h, h) products, 4 K h^2;
    - the scores h . V[j] of the positive and the negatives: 2 h R;
    - the BPR terms: per negative, dL/dV of the positive and of the negative
      (2 h each) and its term of dL/dh (3 h): 7 h N;
    - truncated BPTT: per step, dL/db (3 h), dL/dX[i] = U dL/db and dL/dh(t-1)
      = W dL/db (two (h, h) x (h, 1) products, 4 h^2) and the outer products
      into dL/dU and dL/dW (4 h^2): K (8 h^2 + 3 h);
    - the global gradient norm, (g + 2 l2 theta)^2 summed over U, W, the R V rows
      and the K X rows: 4 (2 h^2 + (R + K) h);
    - the U and W step: SGD 4 per element; Adagrad 10 per element (gradient,
      accumulator, square root, epsilon, division, step): 2 h^2 times that;
    - the row steps of the R V rows and the K X rows: 4 h each (the row's mean
      square comes from the norm pass);
    - advancing the state: the window is run again with the new weights, so
      that the stored hidden state matches them: 4 K h^2.

    Comparisons, sampling, bounds checks, sigmoids and logarithms are not
    counted, so the figure is a lower bound of the work done.
    """
    h, k, n = config.hidden_size, config.window, config.negatives
    rows = n + 1
    per_element = 10 if config.optimizer == "adagrad" else 4
    forward = 4 * k * h * h
    scores = 2 * h * rows
    terms = 7 * h * n
    backward = k * (8 * h * h + 3 * h)
    norm = 4 * (2 * h * h + (rows + k) * h)
    recurrent_step = per_element * 2 * h * h
    row_steps = 4 * h * (rows + k)
    advance = 4 * k * h * h
    return forward + scores + terms + backward + norm + recurrent_step + row_steps + advance


def _synthetic_stream(events: int, users: int, items: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Return (slots, items, partitions, offsets) of a uniform random stream."""
    generator = np.random.default_rng(seed)
    slots = generator.integers(0, users, size=events).astype(np.int32)
    item_ids = generator.integers(0, items, size=events).astype(np.int32)
    partitions = np.zeros(events, dtype=np.int32)
    offsets = np.arange(events, dtype=np.int64)
    return slots, item_ids, partitions, offsets


def kernel_events_per_second(
    config: ModelConfig,
    events: int,
    *,
    items: int = ITEMS,
    users: int = USERS,
    evaluate: bool = False,
    sample_every: int = 1,
) -> float:
    """Return events per CPU second of ``RecurrentBPR.train_batch`` on a synthetic stream.

    The first ``2 * items`` events (every item seen, every user with a full
    window, and the kernel compiled) are applied before the clock starts.
    """
    model = RecurrentBPR(config)
    states = UserStateBatch.empty(users, config.hidden_size, config.window)
    warm = 2 * items
    slots, item_ids, partitions, offsets = _synthetic_stream(warm + events, users, items)
    warm_items = np.arange(warm, dtype=np.int32) % items
    item_ids[:warm] = warm_items

    stream = (slots, item_ids, partitions, offsets)
    _apply(model, states, stream, 0, warm, evaluate=evaluate, sample_every=sample_every)
    started = time.process_time()
    _apply(model, states, stream, warm, warm + events, evaluate=evaluate, sample_every=sample_every)
    return events / (time.process_time() - started)


def numpy_reference_gflops(hidden_size: int, *, batch: int = BATCH, repeats: int = 200) -> dict:
    """Return NumPy's float32 GFLOP/s on batched products of the kernel's shapes.

    ``stacked`` is ``np.matmul`` of ``batch`` independent (1, h) x (h, h)
    products, each with its own matrix: the kernel's product shape, batched.
    ``broadcast`` multiplies ``batch`` rows by one shared (h, h) matrix. BLAS
    runs it as one (batch, h) x (h, h) product, which is printed for comparison.
    """
    generator = np.random.default_rng(1)
    h = hidden_size
    vectors = generator.standard_normal((batch, 1, h)).astype(np.float32)
    matrices = generator.standard_normal((batch, h, h)).astype(np.float32)
    shared = generator.standard_normal((h, h)).astype(np.float32)
    flop = 2 * batch * h * h

    def rate(product) -> float:
        with threadpool_limits(limits=1, user_api="blas"):
            product()
            started = time.process_time()
            for _ in range(repeats):
                product()
            return flop * repeats / (time.process_time() - started) / 1e9

    return {
        "stacked": rate(lambda: np.matmul(vectors, matrices)),
        "broadcast": rate(lambda: np.matmul(vectors, shared)),
    }


def kernel_efficiency(events: int = 50_000, rounds: int = 3) -> dict:
    """Return the training kernel's GFLOP/s at the default settings and its ratio to NumPy's batched products.

    The kernel and NumPy are measured in turn, ``rounds`` times each, and the
    best round of each counts, as ``timeit`` does: on a shared machine the
    fastest round is the one least slowed by other processes.
    """
    config = ModelConfig()
    flop = flop_per_event(config)
    rates, stacked, broadcast = [], [], []
    for _ in range(rounds):
        rates.append(kernel_events_per_second(config, events))
        numpy_round = numpy_reference_gflops(config.hidden_size)
        stacked.append(numpy_round["stacked"])
        broadcast.append(numpy_round["broadcast"])
    rate = max(rates)
    kernel_gflops = flop * rate / 1e9
    numpy_rates = {"stacked": max(stacked), "broadcast": max(broadcast)}
    return {
        "hidden_size": config.hidden_size,
        "window": config.window,
        "negatives": config.negatives,
        "optimizer": config.optimizer,
        "flop_per_event": flop,
        "kernel_events_per_second": rate,
        "kernel_events_per_second_rounds": rates,
        "numpy_stacked_gflops_rounds": stacked,
        "kernel_gflops": kernel_gflops,
        "numpy_stacked_gflops": numpy_rates["stacked"],
        "numpy_broadcast_gflops": numpy_rates["broadcast"],
        "kernel_efficiency_ratio": kernel_gflops / numpy_rates["stacked"],
        "kernel_to_broadcast_ratio": kernel_gflops / numpy_rates["broadcast"],
    }


def ranking_cost(
    item_counts: tuple[int, ...] = (1_700, 25_000, 250_000),
    sample_every: tuple[int, ...] = (1, 10, 100),
    ranked_item_budget: float = 5e7,
) -> list[dict]:
    """Return the kernel's events per CPU second with prequential ranking, for each catalogue size and sample.

    For each size n, one model first trains on every item once (so that ranking
    covers n known items, and the kernel is compiled), then runs the same
    number of events in each mode: training alone (``sample_every`` 0), full
    ranking of every event (1), and about one event in M ranked (M). The
    number of events per mode is ``ranked_item_budget / n``, between 2,000 and
    20,000, so that every size takes about as long.
    """
    config = ModelConfig()
    rows = []
    for items in item_counts:
        users = max(USERS, items // 10)
        events = int(min(20_000, max(2_000, ranked_item_budget / items)))
        model = RecurrentBPR(config)
        states = UserStateBatch.empty(users, config.hidden_size, config.window)
        slots, item_ids, partitions, offsets = _synthetic_stream(items + events * (len(sample_every) + 1), users, items)
        item_ids[:items] = np.arange(items, dtype=np.int32)
        position = items
        _apply(model, states, (slots, item_ids, partitions, offsets), 0, items, evaluate=False, sample_every=1)
        for every in (0, *sample_every):
            started = time.process_time()
            _apply(model, states, (slots, item_ids, partitions, offsets), position, position + events,
                   evaluate=every > 0, sample_every=max(every, 1))
            rate = events / (time.process_time() - started)
            rows.append({"items": items, "sample_every": every, "events": events, "events_per_second": rate})
            position += events
    return rows


def _apply(model, states, stream, start, end, *, evaluate, sample_every) -> None:
    """Feed events [start, end) of ``stream`` to ``model.train_batch`` in batches of BATCH."""
    slots, item_ids, partitions, offsets = stream
    for first in range(start, end, BATCH):
        last = min(first + BATCH, end)
        model.train_batch(
            states, slots[first:last], item_ids[first:last], partitions[first:last], offsets[first:last],
            evaluate=evaluate, sample_every=sample_every,
        )
