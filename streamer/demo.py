"""The embedded demo: local Tansu and Redis, a dataset replay, the worker until the stream is consumed, a summary."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from drnn_core.errors import DrnnError
from streamer.app import build_worker
from streamer.datasets import Message, read_interactions, read_messages, synthetic_interactions
from streamer.embedded import create_topic, start_redis, start_tansu
from streamer.events import DecodeLimits, InvalidEventError, decode_event, encode_event
from streamer.kafka_io import make_producer
from streamer.replay import replay_messages
from streamer.settings import Settings
from streamer.worker import Totals, Worker

logger = logging.getLogger(__name__)

DEMO_PARTITIONS = 4
DEMO_SESSION_TIMEOUT_MS = 6000
NO_EVENT_RANKED = "n/a (no event ranked)"


@dataclasses.dataclass
class DemoSummary:
    """Summary of a demo run, printed and written by --summary-json.

    ``evaluated`` counts the events ranked for HR@10 and MRR@10. The worker
    ranks every event, or about one in ``evaluation_sample_every`` (M of
    --evaluation-sample-every), and ranks none when the evaluation is off, where
    ``evaluation_sample_every`` is 0. With ``evaluated`` 0, ``hr_at_10`` and
    ``mrr_at_10`` are 0 in the JSON and "n/a (no event ranked)" in the text.
    """

    dataset: str
    events_read: int
    trained: int
    skipped: int
    invalid: int
    users: int
    items: int
    evaluated: int
    evaluation_sample_every: int
    hr_at_10: float
    mrr_at_10: float
    events_per_second: float
    user_count_mismatches: int

    def as_text(self) -> str:
        """Format the summary as aligned lines for the terminal."""
        rows = {name: _format(value) for name, value in dataclasses.asdict(self).items()}
        if self.evaluated == 0:
            rows["hr_at_10"] = rows["mrr_at_10"] = NO_EVENT_RANKED
        width = max(len(name) for name in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows.items())

    def as_json(self) -> str:
        """Format the summary as one indented JSON object, every field numeric except ``dataset``."""
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


def _demo_metrics_address(address: str) -> str:
    """Keep an address the user chose; move the default one to a free port, so a running worker does not clash."""
    default = Settings.__dataclass_fields__["metrics_address"].default
    if address != default:
        return address
    host, _, _ = address.rpartition(":")
    return f"{host}:0"


def _format(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def load_demo_messages(dataset: str | None, fmt: str | None) -> tuple[str, list[Message], list[float] | None]:
    """Return the dataset's name, its messages in replay order, and their timestamps when known."""
    if dataset is None:
        interactions = synthetic_interactions()
        name = "synthetic (200 users, 300 items, 20000 events)"
    elif fmt == "jsonl":
        return dataset, read_messages(dataset, fmt), None
    else:
        interactions = read_interactions(dataset, fmt)
        name = dataset
    messages = [Message(*encode_event(i.user_id, i.item_id, i.ts)) for i in interactions]
    return name, messages, [i.ts for i in interactions]


def expected_user_counts(messages: list[Message], limits: DecodeLimits) -> collections.Counter:
    """Count the valid events of each user, as the worker will apply them."""
    counts: collections.Counter = collections.Counter()
    for message in messages:
        try:
            counts[decode_event(message.value, message.key, limits).user_id] += 1
        except InvalidEventError:
            continue
    return counts


def run_demo(
    settings: Settings,
    *,
    dataset: str | None = None,
    fmt: str | None = None,
    speed: float = 0.0,
    partitions: int = DEMO_PARTITIONS,
    summary_json: str | None = None,
    progress: bool = True,
    on_worker: Callable[[Worker], None] | None = None,
) -> DemoSummary:
    """Start the local servers, replay the dataset, run the worker until it has read every message.

    ``settings`` supplies the model and worker options; the broker, Redis URL,
    checkpoint directory and a default metrics address are replaced by the
    demo's own, and the session timeout is capped at 6 s for fast group joins.
    ``on_worker`` is called with the worker before it starts (the CLI installs
    its signal handlers there).

    Raises
    ------
    DrnnError
        If the dataset has no events.
    """
    name, messages, timestamps = load_demo_messages(dataset, fmt)
    if not messages:
        raise DrnnError(f"Dataset {name} has no events: check the file and --format")
    limits = DecodeLimits(
        max_message_bytes=settings.max_message_bytes, max_id_length=settings.max_id_length, require_key=True
    )
    expected = expected_user_counts(messages, limits)

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="drnn-demo-")))
        broker = stack.enter_context(start_tansu(log_dir=workdir))
        redis_server = stack.enter_context(start_redis(log_dir=workdir, data_dir=workdir / "redis"))
        create_topic(broker.bootstrap, settings.topic, partitions)
        create_topic(broker.bootstrap, settings.dead_letter_topic, 1)

        settings = dataclasses.replace(
            settings,
            bootstrap_servers=broker.bootstrap,
            redis_url=redis_server.url,
            session_timeout_ms=min(settings.session_timeout_ms, DEMO_SESSION_TIMEOUT_MS),
            checkpoint_dir=str(workdir / "checkpoints"),
            metrics_address=_demo_metrics_address(settings.metrics_address),
        )
        worker = build_worker(settings)
        if on_worker is not None:
            on_worker(worker)
        totals, rate = _replay_and_consume(settings, worker, messages, timestamps, speed, progress)

        counts = {user: count for user, count, _, _ in worker.store.iter_user_states()}
        mismatches = sum(1 for user in expected.keys() | counts.keys() if expected.get(user, 0) != counts.get(user, 0))
        summary = DemoSummary(
            dataset=name,
            events_read=totals.consumed,
            trained=totals.trained,
            skipped=totals.skipped,
            invalid=totals.invalid,
            users=len(counts),
            items=worker.store.item_count(),
            evaluated=totals.evaluated,
            evaluation_sample_every=settings.evaluation_sample_every if settings.evaluate else 0,
            hr_at_10=totals.hr_at_10,
            mrr_at_10=totals.mrr_at_10,
            events_per_second=rate,
            user_count_mismatches=mismatches,
        )

    if summary_json:
        Path(summary_json).write_text(summary.as_json())
        logger.info("Wrote the summary to %s", summary_json)
    return summary


def _replay_and_consume(settings, worker, messages, timestamps, speed, progress) -> tuple[Totals, float]:
    """Replay in a thread while the worker consumes; return the totals and the messages per second."""
    producer = make_producer(settings, linger_ms=20, batch_size=256 * 1024)
    replay_error: list[BaseException] = []
    replay_done = threading.Event()
    stop_replay = threading.Event()

    def replay() -> None:
        try:
            replay_messages(producer, settings.topic, messages, timestamps=timestamps, speed=speed,
                            progress=False, stop=stop_replay)
        except BaseException as exc:
            replay_error.append(exc)
            worker.request_stop()
        finally:
            replay_done.set()

    thread = threading.Thread(target=replay, name="drnn-demo-replay", daemon=True)
    thread.start()
    clock = _Clock()
    bar = tqdm(total=len(messages), desc="worker", unit="msg", disable=not progress, mininterval=0.5)

    def on_batch(totals: Totals) -> None:
        clock.tick(totals.consumed)
        bar.update(totals.consumed - bar.n)
        bar.set_postfix(trained=totals.trained, invalid=totals.invalid, hr10=f"{totals.hr_at_10:.3f}", refresh=False)

    try:
        totals = worker.run(until=lambda t: replay_done.is_set() and t.consumed >= len(messages), on_batch=on_batch)
    finally:
        stop_replay.set()
        thread.join()
        bar.close()
        producer.close()
    if replay_error:
        raise replay_error[0]
    return totals, clock.rate()


class _Clock:
    """Measures the steady consuming rate from the end of the first batch to the end of the last.

    The group join and the first batch (which may wait for Numba to load) are left out.
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.first_count = 0
        self.last: float | None = None
        self.last_count = 0

    def tick(self, consumed: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first, self.first_count = now, consumed
        self.last, self.last_count = now, consumed

    def rate(self) -> float:
        """Messages per second between the first and the last tick; 0 with fewer than two ticks."""
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return (self.last_count - self.first_count) / (self.last - self.first)
