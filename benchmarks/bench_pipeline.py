"""End-to-end, stage-share and start-up benchmarks of the worker against an embedded Tansu broker and redis-server.

Run it through ``benchmarks/run_all.py`` (sections pipeline and startup, and --profile).

``end_to_end`` compares the worker's steady rate with a bare kafka-python
consumer that only polls and decodes, and splits the worker's wall time by
stage. ``startup`` times a ``drnn-stream worker`` subprocess from spawn to its
first trained event, with the Numba cache cold and warm. ``profile_worker``
lists where the worker loop spends its time, by pyinstrument. The first two
return dicts of plain numbers, which the caller prints. Figures depend on the
machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

from prometheus_client import CollectorRegistry

import drnn_core
from drnn_core.errors import DrnnError
from streamer.app import build_worker
from streamer.demo import DEMO_SESSION_TIMEOUT_MS, load_demo_messages
from streamer.embedded import create_topic, free_port, start_redis, start_tansu
from streamer.events import DecodeLimits, InvalidEventError, decode_event
from streamer.kafka_io import make_consumer, make_producer
from streamer.metrics import STAGES
from streamer.replay import replay_messages
from streamer.settings import Settings, to_environment

logger = logging.getLogger(__name__)

RUN_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 300.0
METRICS_POLL_INTERVAL_S = 0.02
STOP_TIMEOUT_S = 30.0
STAGE_SUM_METRIC = "drnn_batch_stage_seconds_sum"
TRAINED_METRIC = "drnn_events_trained_total"
LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")
STARTUP_MARKERS = {
    "settings_logged": "Starting with settings",
    "worker_started": "Worker started:",
    "partitions_assigned": "Assigned partitions [",
}
PROFILED_STAGE_FUNCTIONS = (
    ("_poll", "streamer/worker.py"),
    ("_decode", "streamer/worker.py"),
    ("_reject", "streamer/worker.py"),
    ("flush", "streamer/kafka_io.py"),
    ("allocate_items", "streamer/store.py"),
    ("load_states", "streamer/store.py"),
    ("train_batch", "drnn_core/model.py"),
    ("commit_batch", "streamer/store.py"),
    ("_commit", "streamer/worker.py"),
    ("_record", "streamer/worker.py"),
)


class BenchmarkError(DrnnError):
    """A benchmark run failed: a consumer or worker did not read the whole topic in time, or a subprocess exited."""


@dataclasses.dataclass
class _SteadyClock:
    """Steady rate from the end of the first non-empty batch to the end of the last one.

    The first batch is left out because it carries the group join and, for the
    worker, the first kernel call.
    """

    first_time: float | None = None
    first_count: int = 0
    last_time: float | None = None
    last_count: int = 0

    def tick(self, count: int) -> bool:
        """Record a finished batch with ``count`` events read so far, and return whether it was the first."""
        now = time.perf_counter()
        first = self.first_time is None
        if first:
            self.first_time, self.first_count = now, count
        self.last_time, self.last_count = now, count
        return first

    @property
    def seconds(self) -> float:
        """Wall time between the first and the last tick, 0 with fewer than two ticks."""
        if self.first_time is None or self.last_time is None:
            return 0.0
        return self.last_time - self.first_time

    @property
    def events(self) -> int:
        """Events read after the first batch."""
        return self.last_count - self.first_count

    def rate(self) -> float:
        """Return the events per second after the first batch, or 0 when there was only one batch."""
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class _Topic:
    """A pre-filled interactions topic on embedded servers, and the settings that point at it."""

    settings: Settings
    workdir: Path
    events: int
    dataset_name: str


@contextlib.contextmanager
def _prefilled_topic(dataset: Path, fmt: str, partitions: int, batch_size: int) -> Iterator[_Topic]:
    """Start Tansu and redis-server, produce the dataset into a new topic, stop both servers on exit.

    The messages have the demo's encoding and keys (the user id). The session
    timeout is the demo's, because Tansu takes about half of it for every
    group join.
    """
    name, messages, _ = load_demo_messages(str(dataset), fmt)
    if not messages:
        raise BenchmarkError(f"Dataset {dataset} in format {fmt!r} has no events: check the file and the format")

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="drnn-bench-")))
        broker = stack.enter_context(start_tansu(log_dir=workdir))
        redis_server = stack.enter_context(start_redis(log_dir=workdir, data_dir=workdir / "redis"))
        settings = Settings(
            bootstrap_servers=broker.bootstrap,
            redis_url=redis_server.url,
            session_timeout_ms=DEMO_SESSION_TIMEOUT_MS,
            batch_size=batch_size,
            checkpoint_dir=str(workdir / "checkpoints"),
            metrics_address="",
            log_level="WARNING",
        )
        create_topic(broker.bootstrap, settings.topic, partitions)
        create_topic(broker.bootstrap, settings.dead_letter_topic, 1)

        producer = make_producer(settings, linger_ms=20, batch_size=256 * 1024)
        try:
            replay_messages(producer, settings.topic, messages, progress=False)
        finally:
            producer.close()
        yield _Topic(settings=settings, workdir=workdir, events=len(messages), dataset_name=name)


def _fresh_run(settings: Settings, workdir: Path, label: str, **overrides) -> Settings:
    """Return settings with a new consumer group, Redis key prefix and checkpoint directory, so no run resumes another."""
    run_id = f"{label}-{uuid.uuid4().hex[:8]}"
    checkpoint_dir = workdir / "checkpoints" / run_id
    return dataclasses.replace(
        settings, group_id=f"bench-{run_id}", key_prefix=f"bench-{run_id}", checkpoint_dir=str(checkpoint_dir), **overrides
    )


def bare_consumer_rate(settings: Settings, events: int) -> dict:
    """Poll and decode every message of the topic with the worker's consumer settings and decoder.

    Parameters
    ----------
    settings : Settings
        Used by ``make_consumer`` as the worker uses them; the group should be new.
    events : int
        Messages in the topic; the run ends when it has read this many.

    Returns
    -------
    dict
        events_per_second (steady, see ``_SteadyClock``), steady_events,
        steady_seconds, read, invalid.

    Raises
    ------
    BenchmarkError
        If fewer than ``events`` messages arrive within RUN_TIMEOUT_S seconds.
    """
    limits = DecodeLimits(
        max_message_bytes=settings.max_message_bytes, max_id_length=settings.max_id_length, require_key=True
    )
    consumer = make_consumer(settings)
    clock = _SteadyClock()
    read = invalid = 0
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        consumer.subscribe([settings.topic])
        while read < events:
            if time.monotonic() > deadline:
                raise BenchmarkError(
                    f"The bare consumer read {read} of {events} messages of topic {settings.topic!r} in "
                    f"{RUN_TIMEOUT_S:.0f} s: check the broker log"
                )
            polled = consumer.poll(timeout_ms=settings.poll_timeout_ms, max_records=settings.batch_size)
            if not polled:
                continue

            for records in polled.values():
                for record in records:
                    try:
                        decode_event(record.value, record.key, limits)
                    except InvalidEventError:
                        invalid += 1
                read += len(records)
            clock.tick(read)
    finally:
        consumer.close(autocommit=False)

    return {
        "events_per_second": clock.rate(),
        "steady_events": clock.events,
        "steady_seconds": clock.seconds,
        "read": read,
        "invalid": invalid,
    }


def _stage_sums(registry: CollectorRegistry) -> dict[str, float]:
    """Return the sum of drnn_batch_stage_seconds per stage, in seconds."""
    return {stage: registry.get_sample_value(STAGE_SUM_METRIC, {"stage": stage}) or 0.0 for stage in STAGES}


def worker_rate(settings: Settings, events: int) -> dict:
    """Run the real worker in this process until it has read ``events`` messages.

    The stage sums are read at the end of the first batch and at the end of
    the run. The shares therefore leave out the group join and the first
    kernel call, as the rate does.

    Returns
    -------
    dict
        events_per_second, steady_events, steady_seconds, read, trained,
        hr_at_10, stage_seconds (stage -> seconds), stage_share (stage ->
        fraction of the sum over stages) and stage_share_of_wall (stage ->
        fraction of the steady wall time, plus "unaccounted": the time outside
        every stage, such as metric updates and the loop itself).

    Raises
    ------
    BenchmarkError
        If the worker reads fewer than ``events`` messages within RUN_TIMEOUT_S seconds.
    """
    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    clock = _SteadyClock()
    first_sums: dict[str, float] = {}
    deadline = time.monotonic() + RUN_TIMEOUT_S

    def on_batch(totals) -> None:
        if clock.tick(totals.consumed):
            first_sums.update(_stage_sums(registry))

    totals = worker.run(until=lambda t: t.consumed >= events or time.monotonic() > deadline, on_batch=on_batch)
    if totals.consumed < events:
        raise BenchmarkError(
            f"The worker read {totals.consumed} of {events} messages of topic {settings.topic!r} in "
            f"{RUN_TIMEOUT_S:.0f} s (group {settings.group_id}): check the worker and broker logs"
        )

    last_sums = _stage_sums(registry)
    stage_seconds = {stage: last_sums[stage] - first_sums.get(stage, 0.0) for stage in STAGES}
    total = sum(stage_seconds.values())
    wall = clock.seconds
    share = {stage: seconds / total if total > 0 else 0.0 for stage, seconds in stage_seconds.items()}
    share_of_wall = {stage: seconds / wall if wall > 0 else 0.0 for stage, seconds in stage_seconds.items()}
    share_of_wall["unaccounted"] = 1.0 - total / wall if wall > 0 else 0.0
    return {
        "events_per_second": clock.rate(),
        "steady_events": clock.events,
        "steady_seconds": wall,
        "read": totals.consumed,
        "trained": totals.trained,
        "hr_at_10": totals.hr_at_10,
        "stage_seconds": stage_seconds,
        "stage_share": share,
        "stage_share_of_wall": share_of_wall,
    }


def end_to_end(dataset: Path, fmt: str = "movielens", partitions: int = 4, batch_size: int = 500) -> dict:
    """Measure the worker's steady rate against a bare poll-and-decode consumer on one pre-filled topic.

    The runs go one after the other on one Tansu and one redis-server: bare
    consumer, worker with prequential evaluation, worker without it, bare
    consumer again. Each run has its own consumer group, and each worker run
    its own Redis key prefix, so every run reads the whole topic from the
    start. The ratios use the mean of the two bare runs, so that one run
    slowed by other load on the machine weighs less.

    Returns
    -------
    dict
        bare_events_per_second (mean), bare_events_per_second_first and
        _second, worker_events_per_second (evaluation on),
        worker_events_per_second_no_eval, end_to_end_ratio,
        end_to_end_ratio_no_eval, stage_share, stage_share_no_eval,
        stage_share_of_wall, stage_share_of_wall_no_eval, hr_at_10, events,
        partitions, batch_size, dataset, and the 1-minute load average before
        and after the runs, which shows whether other processes competed.
    """
    load_before = os.getloadavg()[0]
    with _prefilled_topic(dataset, fmt, partitions, batch_size) as topic:
        base, workdir, events = topic.settings, topic.workdir, topic.events
        bare_first = bare_consumer_rate(_fresh_run(base, workdir, "bare1"), events)
        with_eval = worker_rate(_fresh_run(base, workdir, "eval", evaluate=True), events)
        no_eval = worker_rate(_fresh_run(base, workdir, "noeval", evaluate=False), events)
        bare_second = bare_consumer_rate(_fresh_run(base, workdir, "bare2"), events)

    bare = (bare_first["events_per_second"] + bare_second["events_per_second"]) / 2
    return {
        "dataset": topic.dataset_name,
        "events": events,
        "partitions": partitions,
        "batch_size": batch_size,
        "bare_events_per_second": bare,
        "bare_events_per_second_first": bare_first["events_per_second"],
        "bare_events_per_second_second": bare_second["events_per_second"],
        "worker_events_per_second": with_eval["events_per_second"],
        "worker_events_per_second_no_eval": no_eval["events_per_second"],
        "end_to_end_ratio": with_eval["events_per_second"] / bare if bare > 0 else 0.0,
        "end_to_end_ratio_no_eval": no_eval["events_per_second"] / bare if bare > 0 else 0.0,
        "stage_share": with_eval["stage_share"],
        "stage_share_no_eval": no_eval["stage_share"],
        "stage_share_of_wall": with_eval["stage_share_of_wall"],
        "stage_share_of_wall_no_eval": no_eval["stage_share_of_wall"],
        "hr_at_10": with_eval["hr_at_10"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }


def _events_trained(metrics_url: str) -> float | None:
    """Return the sum of drnn_events_trained_total over its outcomes, or None while the endpoint is not reachable."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=1.0) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None

    total = 0.0
    for line in text.splitlines():
        if line.startswith(TRAINED_METRIC + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _log_times(log_path: Path) -> dict[str, float]:
    """Return the unix time of the first log line that contains each of STARTUP_MARKERS.

    The worker logs in local time with millisecond resolution, in the format
    that ``streamer.cli.configure_logging`` sets.
    """
    times: dict[str, float] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match is None:
            continue
        for name, marker in STARTUP_MARKERS.items():
            if name not in times and marker in match.group(2):
                times[name] = datetime.datetime.strptime(match.group(1), LOG_TIME_FORMAT).timestamp()
    return times


def _time_to_first_training(settings: Settings, numba_cache_dir: Path, log_path: Path) -> dict:
    """Spawn ``python -m streamer.cli worker`` and poll its /metrics until an event is trained.

    Returns
    -------
    dict
        seconds (spawn to the first poll that saw a trained event), and where
        the log has the markers: import_seconds (spawn to the settings log
        line: interpreter, imports and the kernels' compilation or cache
        load), build_seconds (to "Worker started": Redis, model, Kafka
        clients), group_join_seconds (to "Assigned partitions"),
        first_batch_seconds (to the first trained event).

    Raises
    ------
    BenchmarkError
        If the worker exits or trains nothing within STARTUP_TIMEOUT_S seconds.
    """
    environment = {**os.environ, **to_environment(settings), "NUMBA_CACHE_DIR": str(numba_cache_dir)}
    metrics_url = f"http://{settings.metrics_address}/metrics"
    command = [sys.executable, "-m", "streamer.cli", "worker"]

    with open(log_path, "wb") as log:
        spawned_unix = time.time()
        spawned = time.monotonic()
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        try:
            trained_unix = _wait_for_training(process, metrics_url, spawned, log_path)
            seconds = time.monotonic() - spawned
        finally:
            _stop_worker(process)

    result = {"seconds": seconds}
    marks = _log_times(log_path)
    points = [("import_seconds", spawned_unix, marks.get("settings_logged")),
              ("build_seconds", marks.get("settings_logged"), marks.get("worker_started")),
              ("group_join_seconds", marks.get("worker_started"), marks.get("partitions_assigned")),
              ("first_batch_seconds", marks.get("partitions_assigned"), trained_unix)]
    for name, start, end in points:
        if start is not None and end is not None:
            result[name] = end - start
    return result


def _wait_for_training(process: subprocess.Popen, metrics_url: str, spawned: float, log_path: Path) -> float:
    """Poll the metrics endpoint every METRICS_POLL_INTERVAL_S until an event is trained, and return that unix time."""
    while True:
        trained = _events_trained(metrics_url)
        if trained:
            return time.time()
        if process.poll() is not None:
            raise BenchmarkError(
                f"The worker subprocess exited with status {process.returncode} before training an event: "
                f"see its log {log_path}"
            )
        if time.monotonic() - spawned > STARTUP_TIMEOUT_S:
            raise BenchmarkError(
                f"The worker subprocess trained no event within {STARTUP_TIMEOUT_S:.0f} s "
                f"(metrics at {metrics_url}): see its log {log_path}"
            )
        time.sleep(METRICS_POLL_INTERVAL_S)


def _stop_worker(process: subprocess.Popen) -> None:
    """Stop a worker subprocess with SIGTERM, then SIGKILL after STOP_TIMEOUT_S seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("Worker pid=%d did not stop %.0f s after SIGTERM, so it gets SIGKILL", process.pid, STOP_TIMEOUT_S)
        process.kill()
        process.wait()


def startup(dataset: Path, fmt: str = "movielens") -> dict:
    """Time a worker subprocess from spawn to its first trained event, Numba cache cold and then warm.

    Both runs share a new, empty NUMBA_CACHE_DIR: the first compiles the
    kernels and fills it, the second loads them from it. Each run has its own
    consumer group, key prefix and checkpoint directory, and reads a topic
    that was filled before it started.

    Returns
    -------
    dict
        cold_seconds, warm_seconds, and cold_/warm_ import_seconds,
        build_seconds, group_join_seconds and first_batch_seconds where the
        worker log has the lines they need (see ``_time_to_first_training``).
        core_sources_changed is True when a drnn_core source file changed
        during the runs, which makes the warm figure a second cold one.
    """
    result: dict = {}
    sources_before = _core_source_times()
    with _prefilled_topic(dataset, fmt, partitions=4, batch_size=500) as topic:
        cache_dir = topic.workdir / "numba-cache"
        cache_dir.mkdir()
        for label in ("cold", "warm"):
            settings = _fresh_run(
                topic.settings, topic.workdir, label, metrics_address=f"127.0.0.1:{free_port()}", log_level="INFO"
            )
            run = _time_to_first_training(settings, cache_dir, topic.workdir / f"worker-{label}.log")
            result.update({f"{label}_{name}": value for name, value in run.items()})

    # Numba invalidates a cached function when its source file changes, so an edit during the runs
    # makes the warm run compile again.
    result["core_sources_changed"] = _core_source_times() != sources_before
    return result


def _core_source_times() -> dict[str, int]:
    """Return the modification time in nanoseconds of each drnn_core source file."""
    package = Path(drnn_core.__file__).parent
    return {path.name: path.stat().st_mtime_ns for path in package.glob("*.py")}


def _walk_frames(root) -> Iterator:
    """Yield every real (not synthetic) frame of a pyinstrument frame tree."""
    stack = [root]
    while stack:
        frame = stack.pop()
        if frame.is_synthetic:
            continue
        yield frame
        stack.extend(frame.children)


def _stage_function(frame) -> str | None:
    """Return "function (path)" when ``frame`` runs one of PROFILED_STAGE_FUNCTIONS, else None."""
    path = (frame.file_path or "").replace(os.sep, "/")
    for function, suffix in PROFILED_STAGE_FUNCTIONS:
        if frame.function == function and path.endswith(suffix):
            return f"{function} ({suffix})"
    return None


def _inclusive_stage_times(root) -> dict[str, float]:
    """Return the inclusive seconds of each of PROFILED_STAGE_FUNCTIONS, counting only its outermost calls."""
    times: dict[str, float] = {}
    stack = [(root, frozenset())]
    while stack:
        frame, enclosing = stack.pop()
        if frame.is_synthetic:
            continue
        name = _stage_function(frame)
        if name is not None and name not in enclosing:
            times[name] = times.get(name, 0.0) + frame.time
            enclosing = enclosing | {name}
        stack.extend((child, enclosing) for child in frame.children)
    return times


def profile_worker(dataset: Path, fmt: str = "movielens", top: int = 20, evaluate: bool = True) -> str:
    """Profile the worker's main thread with pyinstrument over one run of ``worker_rate``; return a text summary.

    The summary lists the ``top`` functions by self time and the inclusive
    time of the worker's stage functions, each as a share of the profiled wall
    time. The profile covers the whole run, group join and first batch
    included, and only the thread that runs the loop, so kafka-python's
    network thread is not sampled. pyinstrument 5.1 puts a Numba kernel at
    the top of the thread's tree, not under its Python caller, so the
    kernel's time is in the self-time list but not in the inclusive time of
    ``RecurrentBPR.train_batch``. The profiler slows the loop, so compare
    shares, not rates: on MovieLens 100K on a 2-core x86_64 machine, the
    steady rate with evaluation fell from about 15,800 to 6,700-8,400 events/s.

    Raises
    ------
    BenchmarkError
        If pyinstrument is not installed.
    """
    try:
        from pyinstrument import Profiler
    except ImportError as error:
        raise BenchmarkError("profile_worker needs pyinstrument: pip install pyinstrument") from error

    with _prefilled_topic(dataset, fmt, partitions=4, batch_size=500) as topic:
        settings = _fresh_run(topic.settings, topic.workdir, "profile", evaluate=evaluate)
        profiler = Profiler(interval=0.001)
        profiler.start()
        try:
            run = worker_rate(settings, topic.events)
        finally:
            profiler.stop()

    root = profiler.last_session.root_frame()
    if root is None:
        return "pyinstrument recorded no samples"
    wall = root.time

    self_times: dict[str, float] = {}
    for frame in _walk_frames(root):
        name = f"{frame.function} ({frame.file_path_short}:{frame.line_no})"
        self_times[name] = self_times.get(name, 0.0) + frame.total_self_time
    inclusive = _inclusive_stage_times(root)

    lines = [
        f"worker on {topic.dataset_name}, evaluation {'on' if evaluate else 'off'}: "
        f"{run['events_per_second']:,.0f} events/s steady under the profiler; {wall:.1f} s profiled",
        f"top {top} functions by self time (share of the profiled wall time):",
    ]
    for name, seconds in sorted(self_times.items(), key=lambda item: item[1], reverse=True)[:top]:
        lines.append(f"  {seconds / wall:6.1%}  {seconds:7.2f} s  {name}")
    lines.append("inclusive time of the stage functions:")
    for function, suffix in PROFILED_STAGE_FUNCTIONS:
        name = f"{function} ({suffix})"
        seconds = inclusive.get(name, 0.0)
        lines.append(f"  {seconds / wall:6.1%}  {seconds:7.2f} s  {name}")
    return "\n".join(lines)


def _format_shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{stage} {share:.1%}" for stage, share in shares.items())
