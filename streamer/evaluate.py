"""The ``evaluate`` command: an offline test-then-train replay of a dataset through the model, Pop and Markov-1.

The replay needs no Kafka or Redis. It feeds the events in timestamp order to
the worker's batch kernel (``RecurrentBPR.train_batch``) with the worker's state
layout, so its figures equal the worker's prequential counters on the same
stream. The two baselines of ``drnn_core.baselines`` rank the same events.
Basket formats replay basket events through ``drnn_core.basket`` and the
baselines of ``drnn_core.basket_baselines`` instead (basket mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drnn_core import kernels, prequential
from drnn_core.baselines import Markov1Ranker, PopRanker
from drnn_core.config import BASKET_POOLINGS, ModelConfig
from drnn_core.errors import DrnnError
from drnn_core.model import RecurrentBPR
from drnn_core.state import UserStateBatch
from streamer.datasets import BASKET_FORMATS, FORMATS, Basket, Interaction, read_baskets, read_interactions
from streamer.settings import Settings, add_arguments

logger = logging.getLogger(__name__)


def _model_setting_names() -> tuple[str, ...]:
    """Return the settings that build the ModelConfig, in the order of Settings, then batch_size."""
    config_fields = {field.name for field in dataclasses.fields(ModelConfig)}
    names = [field.name for field in dataclasses.fields(Settings) if field.name in config_fields]
    return (*names, "batch_size")


MODEL_SETTINGS = _model_setting_names()
COMMAND_SETTINGS = MODEL_SETTINGS + ("log_level",)
INTERACTION_FORMATS = tuple(fmt for fmt in FORMATS if fmt != "jsonl")
EVALUATE_FORMATS = INTERACTION_FORMATS + BASKET_FORMATS
CURVE_CUTOFF = 10
BASELINE_CHUNK_EVENTS = 1 << 16
REPLAY_PARTITION = 0


class EvaluationError(DrnnError):
    """The evaluation cannot run or cannot write its output."""


@dataclasses.dataclass(frozen=True)
class EncodedStream:
    """A stream of events as dense user and item indexes, in replay order.

    Attributes
    ----------
    users : ndarray, shape (N,), int32
        Index of each event's user, numbered in order of first appearance.
    items : ndarray, shape (N,), int32
        Index of each event's item, numbered in order of first appearance, as
        the worker's item vocabulary in Redis numbers them.
    user_count, item_count : int
        Number of distinct users and items.
    """

    users: np.ndarray
    items: np.ndarray
    user_count: int
    item_count: int

    @property
    def events(self) -> int:
        """Number of events N."""
        return int(self.items.shape[0])


@dataclasses.dataclass(frozen=True)
class EncodedBaskets:
    """A stream of basket events as dense indexes, in replay order (basket mode).

    Attributes
    ----------
    users : ndarray, shape (N,), int32
        Index of each basket's user, numbered in order of first appearance.
    offsets : ndarray, shape (N + 1,), int64
        The items of basket e are ``items[offsets[e]:offsets[e + 1]]``.
    items : ndarray, shape (total,), int32
        Item indexes, numbered in order of first appearance.
    user_count, item_count : int
        Number of distinct users and items.
    """

    users: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    user_count: int
    item_count: int

    @property
    def events(self) -> int:
        """Number of basket events N."""
        return int(self.users.shape[0])

    def as_tuple(self) -> tuple:
        """Return (users, offsets, items), the layout the basket kernels take."""
        return (self.users, self.offsets, self.items)


def encode_baskets(baskets: Sequence[Basket]) -> EncodedBaskets:
    """Number the users and items of ``baskets`` in order of first appearance."""
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    users = np.fromiter(
        (user_index.setdefault(b.user_id, len(user_index)) for b in baskets), dtype=np.int32, count=len(baskets)
    )
    offsets = np.zeros(len(baskets) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b.item_ids) for b in baskets])
    items = np.fromiter(
        (item_index.setdefault(item, len(item_index)) for b in baskets for item in b.item_ids),
        dtype=np.int32,
        count=int(offsets[-1]),
    )
    return EncodedBaskets(users, offsets, items, len(user_index), len(item_index))


def encode_stream(interactions: Sequence[Interaction]) -> EncodedStream:
    """Number the users and items of ``interactions`` in order of first appearance."""
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    count = len(interactions)
    users = np.fromiter(
        (user_index.setdefault(event.user_id, len(user_index)) for event in interactions), dtype=np.int32, count=count
    )
    items = np.fromiter(
        (item_index.setdefault(event.item_id, len(item_index)) for event in interactions), dtype=np.int32, count=count
    )
    return EncodedStream(users=users, items=items, user_count=len(user_index), item_count=len(item_index))


@dataclasses.dataclass
class SystemRun:
    """The ranks one system gave a stream, and the wall time of its replay.

    Attributes
    ----------
    name : str
        "model", "pop" or "markov1".
    settings : dict
        The settings the system ran with (empty for the baselines).
    ranks : ndarray, shape (N,), int64
        Rank of each event's item before the system learned from the event
        (0 is the top), ``kernels.RANK_UNKNOWN_ITEM`` for a new item. In basket
        mode the smallest rank of the basket's items, and
        ``kernels.RANK_NOT_EVALUATED`` for a user's first basket.
    seconds : float
        Wall time of the whole replay, ranking and learning together.
    model : RecurrentBPR or None
        The trained model after the replay, for the model's run.
    """

    name: str
    settings: dict
    ranks: np.ndarray
    seconds: float
    model: RecurrentBPR | None = None

    @property
    def events_per_second(self) -> float:
        """Events replayed per second of wall time (0 when the replay took no measurable time)."""
        return self.ranks.shape[0] / self.seconds if self.seconds > 0 else 0.0

    @property
    def evaluated_ranks(self) -> np.ndarray:
        """The ranks of the evaluated events, in stream order: every event in item mode."""
        return self.ranks[self.ranks != kernels.RANK_NOT_EVALUATED]

    def summary(self) -> dict:
        """Return the system's entry of the JSON summary: name, settings, metrics and throughput."""
        return {
            "name": self.name,
            "settings": dict(self.settings),
            **prequential.summarize(self.evaluated_ranks),
            "events_per_second": self.events_per_second,
            "seconds": self.seconds,
        }


@dataclasses.dataclass
class EvaluationResult:
    """Everything ``evaluate`` measured on one dataset.

    ``mode`` is "item", or "basket" when ``stream`` is an ``EncodedBaskets``.
    """

    dataset: str
    stream: EncodedStream | EncodedBaskets
    systems: list[SystemRun]
    mode: str = "item"

    @property
    def evaluated_events(self) -> int:
        """Number of events every system ranked: all in item mode, those of users with history in basket mode."""
        return int(self.systems[0].evaluated_ranks.shape[0])

    def system(self, name: str) -> SystemRun:
        """Return the run of the system called ``name``."""
        for run in self.systems:
            if run.name == name:
                return run
        raise KeyError(f"No system named {name!r}: the result has {', '.join(run.name for run in self.systems)}")

    def curves(self, max_points: int = prequential.MAX_CURVE_POINTS) -> dict:
        """Return sliding-window HR@10 and MRR@10 of every system, at most ``max_points`` points each.

        ``event`` is the 1-based position of the last event of each window
        among the evaluated events (in basket mode, the baskets of users with
        history). Every system shares it.
        """
        window = prequential.default_window(self.evaluated_events)
        curves: dict = {"window": window, "cutoff": CURVE_CUTOFF, "event": []}
        for metric in ("hr", "mrr"):
            key = f"{metric}_at_{CURVE_CUTOFF}"
            curves[key] = {}
            for run in self.systems:
                ranks = run.evaluated_ranks
                ends, values = prequential.learning_curve(ranks, metric, CURVE_CUTOFF, window, max_points)
                curves["event"] = (ends + 1).tolist()
                curves[key][run.name] = values.tolist()
        return curves

    def to_dict(self) -> dict:
        """Return the JSON summary: dataset, mode, sizes, one entry per system, and the learning curves."""
        return {
            "dataset": self.dataset,
            "mode": self.mode,
            "events": self.stream.events,
            "evaluated_events": self.evaluated_events,
            "users": self.stream.user_count,
            "items": self.stream.item_count,
            "systems": [run.summary() for run in self.systems],
            "curves": self.curves(),
        }


def model_settings(settings: Settings) -> dict:
    """Return the settings that shape the model's replay, by name."""
    return {name: getattr(settings, name) for name in MODEL_SETTINGS}


def _progress_bar(total: int, name: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=name, unit="ev", disable=not progress, mininterval=0.5, leave=True)


def replay_model(stream: EncodedStream, settings: Settings, *, progress: bool = False) -> SystemRun:
    """Replay the stream through a new model in micro-batches of ``settings.batch_size`` events.

    Every event is ranked from its user's state and then trained on, exactly as
    the worker does. The events carry partition 0 and their stream position as
    the offset.
    """
    model = RecurrentBPR(settings.model_config())
    states = UserStateBatch.empty(stream.user_count, settings.hidden_size, settings.window)
    partitions = np.full(stream.events, REPLAY_PARTITION, dtype=np.int32)
    offsets = np.arange(stream.events, dtype=np.int64)
    ranks = np.empty(stream.events, dtype=np.int64)
    hits = 0

    with _progress_bar(stream.events, "model", progress) as bar:
        started = time.perf_counter()
        for start in range(0, stream.events, settings.batch_size):
            end = min(start + settings.batch_size, stream.events)
            result = model.train_batch(
                states, stream.users[start:end], stream.items[start:end],
                partitions[start:end], offsets[start:end], evaluate=True,
            )
            ranks[start:end] = result.rank
            hits += result.hits(CURVE_CUTOFF)
            bar.update(end - start)
            bar.set_postfix(hr10=f"{hits / end:.4f}", refresh=False)
        seconds = time.perf_counter() - started

    not_ranked = int(np.count_nonzero(ranks == kernels.RANK_NOT_EVALUATED))
    if not_ranked:
        raise EvaluationError(
            f"The model left {not_ranked} of {stream.events} events unranked, but an offline replay ranks "
            "every event. This is a bug: report it with the dataset and settings."
        )
    return SystemRun("model", model_settings(settings), ranks, seconds, model=model)


def replay_pop(stream: EncodedStream, *, progress: bool = False) -> SystemRun:
    """Replay the stream through the Pop baseline."""
    ranker = PopRanker()
    return _replay_baseline("pop", stream, lambda start, end: ranker.rank(stream.items[start:end]), progress)


def replay_markov1(stream: EncodedStream, *, progress: bool = False) -> SystemRun:
    """Replay the stream through the Markov-1 baseline."""
    ranker = Markov1Ranker()
    return _replay_baseline(
        "markov1", stream, lambda start, end: ranker.rank(stream.users[start:end], stream.items[start:end]), progress
    )


def _replay_baseline(name: str, stream: EncodedStream, rank_chunk, progress: bool) -> SystemRun:
    ranks = np.empty(stream.events, dtype=np.int64)
    with _progress_bar(stream.events, name, progress) as bar:
        started = time.perf_counter()
        for start in range(0, stream.events, BASELINE_CHUNK_EVENTS):
            end = min(start + BASELINE_CHUNK_EVENTS, stream.events)
            ranks[start:end] = rank_chunk(start, end)
            bar.update(end - start)
        seconds = time.perf_counter() - started
    return SystemRun(name, {}, ranks, seconds)


def _basket_kernels():
    """Import and return ``drnn_core.basket``.

    Its Numba kernels compile or load from the cache when the module is
    imported, which takes seconds. Importing it here, on first use, keeps that
    cost out of every other command (the worker among them), which imports this
    module for its parser.
    """
    from drnn_core import basket

    return basket


def replay_basket_model(
    stream: EncodedBaskets, settings: Settings, pooling: str, *, progress: bool = False
) -> SystemRun:
    """Replay a basket stream through a new model in micro-batches of ``settings.batch_size`` baskets.

    Each basket of a user with an earlier basket is ranked from the user's
    state and then trained on. A user's first basket only starts the state
    (see ``basket.train_baskets``).
    """
    basket = _basket_kernels()
    model = RecurrentBPR(settings.model_config())
    states = basket.BasketStates.empty(stream.user_count, settings.hidden_size, settings.window)
    outputs = (
        np.zeros(stream.events, dtype=np.int8),
        np.zeros(stream.events, dtype=np.float32),
        np.zeros(stream.events, dtype=np.int64),
    )
    ranks = outputs[2]
    baskets = stream.as_tuple()

    with _progress_bar(stream.events, "model", progress) as bar:
        started = time.perf_counter()
        for start in range(0, stream.events, settings.batch_size):
            end = min(start + settings.batch_size, stream.events)
            basket.train_basket_range(model, states, baskets, start, end, outputs, pooling=pooling)
            bar.update(end - start)
        seconds = time.perf_counter() - started

    run_settings = {**model_settings(settings), "basket_pooling": pooling}
    return SystemRun("model", run_settings, ranks.copy(), seconds, model=model)


def replay_basket_baseline(name: str, stream: EncodedBaskets, *, progress: bool = False) -> SystemRun:
    """Replay a basket stream through the basket Pop ("pop") or Markov-1 ("markov1") baseline."""
    from drnn_core.basket_baselines import BasketMarkov1Ranker, BasketPopRanker

    ranker_class = {"pop": BasketPopRanker, "markov1": BasketMarkov1Ranker}[name]
    ranks = np.empty(stream.events, dtype=np.int64)
    with _progress_bar(stream.events, name, progress) as bar:
        started = time.perf_counter()
        ranker = ranker_class(stream.as_tuple())
        for start in range(0, stream.events, BASELINE_CHUNK_EVENTS):
            end = min(start + BASELINE_CHUNK_EVENTS, stream.events)
            ranker.rank(start, end, ranks)
            bar.update(end - start)
        seconds = time.perf_counter() - started
    return SystemRun(name, {}, ranks, seconds)


def warm_up_basket_kernels(settings: Settings, pooling: str) -> None:
    """Compile or load every basket-mode kernel on a three-basket stream, so no timed replay pays for it."""
    tiny = EncodedBaskets(
        users=np.zeros(3, dtype=np.int32),
        offsets=np.array([0, 2, 3, 5], dtype=np.int64),
        items=np.array([0, 1, 2, 0, 2], dtype=np.int32),
        user_count=1,
        item_count=3,
    )
    replay_basket_model(tiny, dataclasses.replace(settings, hidden_size=2, window=1, batch_size=3), pooling)
    replay_basket_baseline("pop", tiny)
    replay_basket_baseline("markov1", tiny)


def run_basket_evaluation(
    stream: EncodedBaskets,
    settings: Settings,
    *,
    dataset: str,
    pooling: str = "mean",
    limit: int | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Replay a basket stream through the model, basket Pop and basket Markov-1, one after the other.

    ``limit`` is the --limit that cut the stream short, or None. The error names it.

    Raises
    ------
    EvaluationError
        If no basket belongs to a user with an earlier basket, so nothing can be ranked.
    """
    _basket_kernels().pooling_code(pooling)
    first_baskets = len(np.unique(stream.users))
    if stream.events - first_baskets == 0:
        raise EvaluationError(_no_history_message(dataset, stream.events, limit))
    logger.info(
        "Evaluating %s in basket mode: %d baskets (%d of users with history), %d users, %d items",
        dataset, stream.events, stream.events - first_baskets, stream.user_count, stream.item_count,
    )
    warm_up_basket_kernels(settings, pooling)

    systems = [
        replay_basket_model(stream, settings, pooling, progress=progress),
        replay_basket_baseline("pop", stream, progress=progress),
        replay_basket_baseline("markov1", stream, progress=progress),
    ]
    for run in systems:
        logger.info("Replayed %s in %.1f s (%.0f baskets/s)", run.name, run.seconds, run.events_per_second)
    return EvaluationResult(dataset=dataset, stream=stream, systems=systems, mode="basket")


def warm_up_kernels(settings: Settings) -> None:
    """Compile or load every kernel of the replay on a three-event stream, so no timed replay pays for it."""
    tiny = EncodedStream(
        users=np.zeros(3, dtype=np.int32), items=np.array([0, 1, 0], dtype=np.int32), user_count=1, item_count=2
    )
    replay_model(tiny, dataclasses.replace(settings, hidden_size=2, window=1, batch_size=3))
    replay_pop(tiny)
    replay_markov1(tiny)


def _no_history_message(dataset: str, baskets: int, limit: int | None) -> str:
    """Explain that no user has two baskets, naming the --limit when it cut the stream."""
    counted = "1 basket" if baskets == 1 else f"{baskets} baskets"
    if limit is not None:
        return (
            f"The first {counted} of {dataset} (--limit {limit}) include no user with two baskets, "
            "so basket mode ranks nothing. Raise --limit or drop it."
        )
    return f"{dataset} has {counted} and no user has two, so basket mode ranks nothing. Check the file."


def run_evaluation(
    stream: EncodedStream, settings: Settings, *, dataset: str, progress: bool = False
) -> EvaluationResult:
    """Replay ``stream`` through the model, Pop and Markov-1, one system after the other.

    Raises
    ------
    EvaluationError
        If the stream has no events.
    """
    if stream.events == 0:
        raise EvaluationError(f"{dataset} has no interactions, so there is nothing to evaluate. Check the file.")
    logger.info(
        "Evaluating %s: %d events, %d users, %d items", dataset, stream.events, stream.user_count, stream.item_count
    )
    warm_up_kernels(settings)

    systems = [
        replay_model(stream, settings, progress=progress),
        replay_pop(stream, progress=progress),
        replay_markov1(stream, progress=progress),
    ]
    for run in systems:
        logger.info("Replayed %s in %.1f s (%.0f events/s)", run.name, run.seconds, run.events_per_second)
    return EvaluationResult(dataset=dataset, stream=stream, systems=systems)


TABLE_COLUMNS = (
    ("HR@10", "hr_at_10"), ("MRR@10", "mrr_at_10"), ("NDCG@10", "ndcg_at_10"), ("HR@20", "hr_at_20"),
    ("HR@10 2nd", "hr_at_10_second_half"), ("MRR@10 2nd", "mrr_at_10_second_half"),
    ("NDCG@10 2nd", "ndcg_at_10_second_half"), ("HR@20 2nd", "hr_at_20_second_half"),
)


def format_table(result: EvaluationResult) -> str:
    """Format the result as text: the dataset, its size, the model settings, and one row per system.

    Columns marked "2nd" are over the second half of the evaluated events.
    In basket mode a hit is a basket with any item in the top K, and events/s
    counts basket events.
    """
    stream = result.stream
    settings = result.system("model").settings
    evaluated = result.evaluated_events
    lines = [f"dataset: {result.dataset}"]
    if result.mode == "basket":
        lines += [
            "mode: basket (HR@K: any basket item in the top K; MRR@K: of the best-ranked basket item)",
            f"baskets: {stream.events:,} (users {stream.user_count:,}, items {stream.item_count:,});"
            f" evaluated (user has an earlier basket): {evaluated:,};"
            f" second half: the last {evaluated - evaluated // 2:,} evaluated baskets",
        ]
    else:
        lines.append(
            f"events: {stream.events:,} (users {stream.user_count:,}, items {stream.item_count:,});"
            f" second half: the last {stream.events - stream.events // 2:,} events"
        )
    lines += ["model settings: " + " ".join(f"{name}={value}" for name, value in settings.items()), ""]
    header = ["system"] + [label for label, _ in TABLE_COLUMNS] + ["events/s"]
    rows = [header]
    for run in result.systems:
        summary = prequential.summarize(run.evaluated_ranks)
        rows.append(
            [run.name]
            + [f"{summary[key]:.4f}" for _, key in TABLE_COLUMNS]
            + [f"{run.events_per_second:,.0f}"]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def write_json(result: EvaluationResult, path: str | Path) -> Path:
    """Write the JSON summary of ``result`` to ``path``.

    Raises
    ------
    EvaluationError
        If the file cannot be written.
    """
    path = Path(path)
    text = json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"
    try:
        path.write_text(text)
    except OSError as exc:
        raise EvaluationError(f"Failed to write the JSON summary to {path}: {exc}. Check that its directory exists.") from None
    return path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected a positive integer")
    return value


def add_evaluate_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to the sub-parsers of the drnn-stream parser and return it."""
    parser = commands.add_parser(
        "evaluate",
        help="Replay a dataset offline, test then train, through the model, Pop and Markov-1; print HR, MRR, NDCG.",
        description=(
            "Replay a dataset in timestamp order without Kafka or Redis. Each event's item is ranked against "
            "every known item before each system learns from the event."
        ),
    )
    parser.add_argument("--dataset", metavar="PATH", required=True, help="Dataset file.")
    parser.add_argument(
        "--format", dest="fmt", required=True, choices=EVALUATE_FORMATS,
        help="Format of the dataset file; tafeng-baskets replays day baskets (basket mode).",
    )
    parser.add_argument(
        "--limit", type=_positive_int, metavar="N",
        help="Replay only the first N events (baskets in basket mode) in timestamp order.",
    )
    parser.add_argument(
        "--basket-pooling", dest="basket_pooling", choices=BASKET_POOLINGS, default=None,
        help=(
            f"Basket mode only (--format {' or '.join(BASKET_FORMATS)}): pool a basket's item embeddings "
            "by their mean or per-dimension maximum (default mean)."
        ),
    )
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="Also write the results and curves as JSON to FILE.")
    parser.add_argument(
        "--plot", dest="plot_path", metavar="FILE.png",
        help="Also draw sliding-window HR@10 over the stream for every system (needs matplotlib).",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="Hide the progress bars.")
    add_arguments(parser, COMMAND_SETTINGS)
    parser.set_defaults(run=run_evaluate)
    return parser


def run_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    """Run ``drnn-stream evaluate``: replay, print the table, write the JSON and plot when asked."""
    from streamer import report

    if args.plot_path:
        report.require_matplotlib()
    if args.basket_pooling is not None and args.fmt not in BASKET_FORMATS:
        raise EvaluationError(
            f"--basket-pooling applies only to basket mode (--format {' or '.join(BASKET_FORMATS)}), "
            f"not to --format {args.fmt}. Drop --basket-pooling or use a basket format."
        )
    if args.fmt in BASKET_FORMATS:
        result = _evaluate_baskets(settings, args)
    else:
        interactions = read_interactions(args.dataset, args.fmt)
        if args.limit is not None:
            interactions = interactions[: args.limit]
        stream = encode_stream(interactions)
        del interactions
        result = run_evaluation(stream, settings, dataset=args.dataset, progress=args.progress)
    print(format_table(result))

    if args.json_path:
        print(f"wrote {write_json(result, args.json_path)}")
    if args.plot_path:
        unit = "evaluated baskets" if result.mode == "basket" else "events"
        title = f"{Path(result.dataset).name}: prequential HR@10, {result.evaluated_events:,} {unit}"
        print(f"wrote {report.plot_curve(result.curves(), 'hr_at_10', args.plot_path, title=title)}")
    return 0



def _evaluate_baskets(settings: Settings, args: argparse.Namespace) -> EvaluationResult:
    baskets = read_baskets(args.dataset, args.fmt)
    limit = None
    if args.limit is not None and len(baskets) > args.limit:
        baskets = baskets[: args.limit]
        limit = args.limit
    if not baskets:
        raise EvaluationError(f"{args.dataset} has no baskets, so there is nothing to evaluate. Check the file.")
    stream = encode_baskets(baskets)
    del baskets

    pooling = args.basket_pooling or "mean"
    return run_basket_evaluation(
        stream, settings, dataset=args.dataset, pooling=pooling, limit=limit, progress=args.progress
    )
