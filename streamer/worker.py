"""The worker loop: poll a micro-batch, decode, load states, train, store states, commit.

Every batch goes through these stages, each timed in ``drnn_batch_stage_seconds``:

1. poll: up to ``batch_size`` records from the assigned partitions.
2. decode: parse and validate each message; invalid ones go to the dead-letter sender.
3. dead_letter: wait until the batch's dead letters are stored.
4. state_load: allocate item indexes and MGET the states of the batch's users.
5. compute: one call of the batch kernel, which ranks, trains and advances every event.
6. state_store: one Lua script writes the new states and each partition's applied
   offset atomically, fenced by the epoch and the offsets this worker wrote last.
7. commit: commit the offsets after the last record of each partition.

Dead letters are stored before the states, and the offsets are committed after
both, so a crash at any point re-delivers the batch (an assignment resumes
after the offsets stored with the states). The per-user (partition, offset)
check in the kernel skips the events already applied, so every valid event
changes its user's state exactly once. A dead letter may be sent twice.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata, TopicPartition

from drnn_core import kernels
from drnn_core.model import BatchResult, RecurrentBPR
from drnn_core.state import UserStateBatch
from streamer.checkpoints import CheckpointStore
from streamer.errors import CheckpointError, KafkaIOError, ShutdownRequested
from streamer.events import DecodeLimits, InvalidEventError, decode_event
from streamer.kafka_io import DeadLetterSender, RebalanceListener, source_label
from streamer.metrics import WorkerMetrics
from streamer.ratelimit import RateLimitedLogger
from streamer.settings import Settings
from streamer.store import COMMIT_EPOCH_MISSING, COMMIT_OK, RedisStore, StoreError

logger = logging.getLogger(__name__)

_REJECTED = object()
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 5.0
LAG_REFRESH_S = 1.0
OUTCOME_LABELS = {
    kernels.STATUS_TRAINED: "sgd_step",
    kernels.STATUS_NO_HISTORY: "no_history",
    kernels.STATUS_NO_NEGATIVE: "no_negative",
    kernels.STATUS_NON_FINITE: "non_finite",
}


@dataclasses.dataclass
class Totals:
    """Running totals of a worker since it started."""

    consumed: int = 0
    trained: int = 0
    sgd_steps: int = 0
    non_finite: int = 0
    skipped: int = 0
    invalid: int = 0
    evaluated: int = 0
    hits_at_10: int = 0
    reciprocal_rank_at_10: float = 0.0
    loss_sum: float = 0.0
    batches: int = 0

    @property
    def hr_at_10(self) -> float:
        """HR@10 over the evaluated events (0 while none is ranked, as with the evaluation off)."""
        return self.hits_at_10 / self.evaluated if self.evaluated else 0.0

    @property
    def mrr_at_10(self) -> float:
        """MRR@10 over the evaluated events (0 while none is ranked, as with the evaluation off)."""
        return self.reciprocal_rank_at_10 / self.evaluated if self.evaluated else 0.0


@dataclasses.dataclass
class DecodedBatch:
    """The valid events of a batch as columns, and the first and last offset of each partition."""

    user_ids: list[str]
    item_ids: list[str]
    partitions: np.ndarray
    offsets: np.ndarray
    first_offsets: dict[int, int]
    last_offsets: dict[int, int]
    invalid: int


class Worker:
    """A consumer-group member that trains the model on its partitions.

    Parameters
    ----------
    settings : Settings
    consumer : kafka.KafkaConsumer
        Not yet subscribed; the worker subscribes with its rebalance listener.
    dead_letters : DeadLetterSender
    store : RedisStore
    model : RecurrentBPR
    checkpoints : CheckpointStore
    metrics : WorkerMetrics
    metrics_server : optional
        The HTTP server of ``metrics``, shut down when the worker stops.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        consumer,
        dead_letters: DeadLetterSender,
        store: RedisStore,
        model: RecurrentBPR,
        checkpoints: CheckpointStore,
        metrics: WorkerMetrics,
        metrics_server=None,
    ) -> None:
        self.settings = settings
        self.metrics_server = metrics_server
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.store = store
        self.model = model
        self.checkpoints = checkpoints
        self.metrics = metrics
        metrics.sample_every.set(settings.evaluation_sample_every if settings.evaluate else 0)
        self.totals = Totals()
        self.limits = DecodeLimits(
            max_message_bytes=settings.max_message_bytes, max_id_length=settings.max_id_length, require_key=True
        )
        self._stop = threading.Event()
        self._log = RateLimitedLogger(logger)
        self._last_checkpoint = time.monotonic()
        self._events_since_checkpoint = 0
        self._last_lag_refresh = 0.0
        self._last_records = time.monotonic()
        self._lag: dict[TopicPartition, int | None] = {}
        self._stored_offsets: dict[int, int | None] = {}
        self.checkpoint_failed = False
        self._epoch = ""
        self._ready = False
        self._not_ready_reason = "starting"
        self._last_loop = time.monotonic()
        metrics.track_checkpoint_age(lambda: self._last_checkpoint)

    def request_stop(self) -> None:
        """Ask the loop to finish the batch in hand, commit, checkpoint and return."""
        if not self._stop.is_set():
            logger.info("Stop requested: finishing the current batch")
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._stop.is_set()

    def run(
        self,
        until: Callable[[Totals], bool] | None = None,
        on_batch: Callable[[Totals], None] | None = None,
    ) -> Totals:
        """Consume until a stop is requested, ``until(totals)`` is true, or the topic stays idle.

        Parameters
        ----------
        until : callable, optional
            Checked after every poll; the loop ends when it returns True.
        on_batch : callable, optional
            Called with the totals after every processed batch (progress display).
        """
        listener = RebalanceListener(self._on_assigned, self._on_revoked)
        logger.info(
            "Worker started: topic=%s group=%s prefix=%s h=%d K=%d",
            self.settings.topic, self.settings.group_id, self.settings.key_prefix,
            self.model.config.hidden_size, self.model.config.window,
        )
        try:
            self._prepare_store()
            self.consumer.subscribe([self.settings.topic], listener=listener)
            self._set_ready(True)
            self._publish_store_sizes()
            while not self._stop.is_set():
                self._last_loop = time.monotonic()
                records = self._poll()
                if records:
                    self.process(records)
                    if on_batch is not None:
                        on_batch(self.totals)
                self._maybe_checkpoint()
                if until is not None and until(self.totals):
                    break
                if self._idle_long_enough():
                    logger.info("No new records for %.1f s and no lag: stopping", self.settings.exit_when_idle_seconds)
                    break
        except ShutdownRequested:
            logger.warning("Stopped while retrying Redis; the batch in hand, if any, was not committed and will be read again")
        finally:
            self._shutdown()
        return self.totals

    def _prepare_store(self) -> None:
        """Check the state layout, size the model for the vocabulary, and read the epoch (retrying Redis)."""
        self._retry("check the state layout", "redis", self.store.check_layout, StoreError)
        self.model.ensure_capacity(self._retry("read the item count", "redis", self.store.item_count, StoreError))
        self._epoch = self._retry("read or create the epoch", "redis", self.store.ensure_epoch, StoreError)

    def _publish_store_sizes(self) -> None:
        try:
            self.metrics.known_users.set(self.store.user_count())
            self.metrics.vocabulary_items.set(self.store.item_count())
        except StoreError as exc:
            self.metrics.errors.labels(component="redis").inc()
            logger.error("Failed to read the user and item counts at start: %s", exc)
        self.metrics.known_items.set(self.model.known_items)

    def _poll(self) -> list:
        if not self.consumer.assignment():
            self._log.log(
                logging.INFO, "unassigned",
                "Waiting for a partition assignment of topic %s in group %s",
                self.settings.topic, self.settings.group_id,
            )
        with self._stage("poll"):
            polled = self.consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.batch_size
            )
        records = [record for partition_records in polled.values() for record in partition_records]
        if records:
            self._last_records = time.monotonic()
        self._refresh_lag()
        return records

    def process(self, records: list) -> BatchResult | None:
        """Apply one polled batch and commit it; see the module docstring for the stages.

        Returns the kernel's per-event result, or None when the batch had no
        valid event or Redis rejected it (its offsets are then not committed and
        the partitions were moved back to what Redis holds).
        """
        self.metrics.events_consumed.inc(len(records))
        self.metrics.batch_events.observe(len(records))

        with self._stage("decode"):
            decoded = self._decode(records)

        with self._stage("dead_letter"):
            self._retry("send dead letters", "dead_letter", self.dead_letters.flush, KafkaIOError)

        applied = self._apply(decoded)
        if applied is _REJECTED:
            return None

        with self._stage("commit"):
            self._commit(decoded.last_offsets)
        self.totals.consumed += len(records)
        self.totals.invalid += decoded.invalid
        self.totals.batches += 1
        return applied

    def _decode(self, records: list) -> DecodedBatch:
        users, items, partitions, offsets = [], [], [], []
        first_offsets: dict[int, int] = {}
        last_offsets: dict[int, int] = {}
        invalid = 0
        for record in records:
            first_offsets.setdefault(record.partition, record.offset)
            last_offsets[record.partition] = record.offset
            try:
                event = decode_event(record.value, record.key, self.limits)
            except InvalidEventError as exc:
                invalid += 1
                self._reject(record, exc)
                continue
            users.append(event.user_id)
            items.append(event.item_id)
            partitions.append(record.partition)
            offsets.append(record.offset)

        return DecodedBatch(
            user_ids=users,
            item_ids=items,
            partitions=np.asarray(partitions, dtype=np.int32),
            offsets=np.asarray(offsets, dtype=np.int64),
            first_offsets=first_offsets,
            last_offsets=last_offsets,
            invalid=invalid,
        )

    def _reject(self, record, error: InvalidEventError) -> None:
        self.metrics.events_invalid.labels(reason=error.reason.value).inc()
        self._log.log(
            logging.WARNING, f"invalid:{error.reason.value}",
            "Dead-lettering invalid message %s: %s (%s)",
            source_label(record.topic, record.partition, record.offset), error.reason.value, error.detail,
        )
        self.dead_letters.send(record, error.reason, error.detail)

    def _apply(self, decoded: DecodedBatch):
        """Load, train and store a batch; return its BatchResult, None, or _REJECTED."""
        slot_of: dict[str, int] = {}
        slots = np.fromiter(
            (slot_of.setdefault(user, len(slot_of)) for user in decoded.user_ids),
            dtype=np.int32, count=len(decoded.user_ids),
        )
        user_ids = list(slot_of)
        result, states, corrupt, new_users, items = None, _empty_states(self.model), [], 0, None

        if user_ids:
            with self._stage("state_load"):
                items = self._retry("allocate item indexes", "redis", lambda: self.store.allocate_items(decoded.item_ids), StoreError)
                states, corrupt = self._retry("load user states", "redis", lambda: self.store.load_states(user_ids), StoreError)
            if corrupt:
                self.metrics.corrupt_states.inc(len(corrupt))
                self.metrics.errors.labels(component="state").inc(len(corrupt))

            with self._stage("compute"):
                was_new = states.count == 0
                if corrupt:
                    was_new[[slot_of[user] for user in corrupt]] = False
                result = self.model.train_batch(
                    states, slots, items, decoded.partitions, decoded.offsets, evaluate=self.settings.evaluate,
                    sample_every=self.settings.evaluation_sample_every,
                )
                new_users = int(np.count_nonzero(was_new & (states.count > 0)))

        with self._stage("state_store"):
            outcome = self._store(user_ids, states, decoded, corrupt, new_users)
        if outcome is _REJECTED:
            return _REJECTED

        if outcome.known_users is not None:
            self.metrics.known_users.set(outcome.known_users)
        if outcome.stale_states:
            self.metrics.stale_writes.inc(outcome.stale_states)
            self._log.log(
                logging.WARNING, "stale",
                "Skipped %d stale state writes: Redis already held newer states of those users",
                outcome.stale_states,
            )
        if result is not None:
            self._record(result, vocabulary=int(items.max()) + 1)
        return result

    def _store(self, user_ids, states, decoded: DecodedBatch, corrupt, new_users):
        """Commit states and offsets fenced by the epoch and the expected offsets.

        Returns the CommitResult, or _REJECTED after Redis was found to have
        lost data or another worker wrote the partition (see ``_resync``).
        """
        last_offsets = decoded.last_offsets
        for _ in range(2):
            expected = {partition: self._stored_offsets.get(partition) for partition in last_offsets}
            outcome = self._retry(
                "store user states", "redis",
                lambda: self.store.commit_batch(
                    user_ids, states, topic=self.settings.topic, epoch=self._epoch,
                    expected_offsets=expected, offsets=last_offsets, forced_users=corrupt, new_users=new_users,
                ),
                StoreError,
            )
            if outcome.status == COMMIT_OK:
                for partition, offset in last_offsets.items():
                    previous = self._stored_offsets.get(partition)
                    self._stored_offsets[partition] = offset if previous is None else max(previous, offset)
                return outcome
            if outcome.status == COMMIT_EPOCH_MISSING:
                if not self._recover_lost_redis():
                    return _REJECTED
                continue
            self._resync(outcome, decoded.first_offsets)
            return _REJECTED
        return _REJECTED

    def _recover_lost_redis(self) -> bool:
        """Handle an empty Redis by the configured policy; return whether to retry the batch's write."""
        self.metrics.state_loss.labels(kind="epoch_missing").inc()
        policy = self.settings.redis_loss_policy
        logger.error(
            "Redis lost its data: the epoch key %s:epoch is gone, so every user state and applied offset "
            "under the prefix was lost. Following redis_loss_policy=%s", self.settings.key_prefix, policy,
        )
        self._epoch = self._retry("create a new epoch", "redis", self.store.ensure_epoch, StoreError)
        self._retry("restore the item indexes", "redis", self.store.restore_items, StoreError)
        self._stored_offsets = {}
        if policy == "continue":
            return True

        assigned = list(self.consumer.assignment())
        self.consumer.seek_to_beginning(*assigned)
        logger.error("Rebuilding the states: re-reading partitions %s from their earliest offset",
                     sorted(tp.partition for tp in assigned))
        return False

    def _resync(self, outcome, batch_starts: dict[int, int]) -> None:
        """Move every assigned partition back to the offset stored in Redis after a fenced write was rejected.

        ``batch_starts`` maps each partition of the rejected batch to its first
        offset, where a partition without a stored offset goes back to.
        """
        expected = self._stored_offsets.get(outcome.partition)
        behind = outcome.stored_offset is None or (expected is not None and outcome.stored_offset < expected)
        if behind:
            self.metrics.state_loss.labels(kind="offsets_behind").inc()
            self._retry("restore the item indexes", "redis", self.store.restore_items, StoreError)
            logger.error(
                "Redis has offset %s stored for partition %d of topic %s, but this worker stored %s: "
                "Redis lost its last writes. Re-reading from the offsets stored in Redis",
                outcome.stored_offset, outcome.partition, self.settings.topic, expected,
            )
        else:
            self.metrics.errors.labels(component="redis").inc()
            logger.warning(
                "Redis has offset %s stored for partition %d, newer than %s: another worker wrote it. "
                "Moving to the offsets stored in Redis", outcome.stored_offset, outcome.partition, expected,
            )
        self._seek_to_stored(self.consumer.assignment(), batch_starts)

    def _seek_to_stored(self, partitions, batch_starts: dict[int, int]) -> None:
        """Seek each partition after its offset stored in Redis, and expect that offset from now on.

        A partition with no stored offset goes to its earliest offset under the
        rebuild policy, and otherwise back to the start of the rejected batch,
        so that no event of that batch is skipped.
        """
        applied = self._retry(
            "read the applied offsets", "redis", lambda: self.store.load_offsets(self.settings.topic), StoreError
        )
        for tp in sorted(partitions):
            stored = applied.get(tp.partition)
            self._stored_offsets[tp.partition] = stored
            if stored is not None:
                self.consumer.seek(tp, stored + 1)
                logger.info("Resuming %s after the last applied offset", source_label(tp.topic, tp.partition, stored))
            elif self.settings.redis_loss_policy == "rebuild":
                self.consumer.seek_to_beginning(tp)
            elif tp.partition in batch_starts:
                self.consumer.seek(tp, batch_starts[tp.partition])

    def _record(self, result: BatchResult, vocabulary: int) -> None:
        totals, metrics = self.totals, self.metrics
        counts = np.bincount(result.status, minlength=kernels.STATUS_DUPLICATE + 1)
        for status, label in OUTCOME_LABELS.items():
            if counts[status]:
                metrics.events_trained.labels(outcome=label).inc(int(counts[status]))
        trained = int(counts[: kernels.STATUS_DUPLICATE].sum())
        skipped = int(counts[kernels.STATUS_DUPLICATE])
        if skipped:
            metrics.events_skipped.labels(reason="duplicate").inc(skipped)
        if counts[kernels.STATUS_NON_FINITE]:
            self._log.log(
                logging.ERROR, "non_finite",
                "Skipped %d updates that would have made the model non-finite; lower learning_rate (now %g)",
                int(counts[kernels.STATUS_NON_FINITE]), self.settings.learning_rate,
            )

        steps = result.status == kernels.STATUS_TRAINED
        loss_sum = float(result.loss[steps].sum(dtype=np.float64))
        evaluated, hits, reciprocal = result.evaluated, result.hits(10), result.reciprocal_rank_sum(10)
        metrics.evaluated.inc(evaluated)
        metrics.hits.inc(hits)
        metrics.reciprocal_rank.inc(reciprocal)
        if steps.any():
            metrics.loss_sum.inc(loss_sum)
            metrics.loss_last.set(loss_sum / int(steps.sum()))
        metrics.known_items.set(self.model.known_items)
        metrics.vocabulary_items.set(max(vocabulary, self.model.known_items))

        totals.trained += trained
        totals.sgd_steps += int(counts[kernels.STATUS_TRAINED])
        totals.non_finite += int(counts[kernels.STATUS_NON_FINITE])
        totals.skipped += skipped
        totals.evaluated += evaluated
        totals.hits_at_10 += hits
        totals.reciprocal_rank_at_10 += reciprocal
        totals.loss_sum += loss_sum
        self._events_since_checkpoint += trained

    def _commit(self, last_offsets: dict[int, int]) -> None:
        if not last_offsets:
            return
        offsets = {
            TopicPartition(self.settings.topic, partition): OffsetAndMetadata(offset + 1, "", -1)
            for partition, offset in last_offsets.items()
        }
        try:
            self.consumer.commit(offsets)
        except CommitFailedError as exc:
            self.metrics.errors.labels(component="kafka").inc()
            self._log.log(
                logging.WARNING, "commit_failed",
                "Offset commit rejected after a rebalance (%s); the new owner re-reads the batch "
                "and skips the events already applied", exc,
            )
        except KafkaError as exc:
            self.metrics.errors.labels(component="kafka").inc()
            self._log.log(
                logging.WARNING, "commit_error",
                "Offset commit failed (%s); the events will be re-read and skipped as duplicates", exc,
            )

    def _retry(self, action: str, component: str, operation: Callable, errors: type[Exception]):
        delay = RETRY_INITIAL_S
        attempt = 0
        while True:
            try:
                result = operation()
            except errors as exc:
                attempt += 1
                self.metrics.errors.labels(component=component).inc()
                self._set_ready(False, f"failed to {action}: {exc}")
                self._log.log(
                    logging.WARNING, f"retry:{action}",
                    "Failed to %s (attempt %d, retrying in %.1f s): %s", action, attempt, delay, exc,
                )
                if self._stop.wait(delay):
                    raise ShutdownRequested(f"Gave up trying to {action}: the worker is stopping") from exc
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if attempt:
                logger.info("Recovered: %s succeeded after %d failed attempts", action, attempt)
                self._set_ready(True)
            return result

    def _set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready = ready
        self._not_ready_reason = reason
        self.metrics.ready.set(1 if ready else 0)

    def health(self) -> tuple[bool, bool, str]:
        """Return (alive, ready, reason) for the /healthz and /readyz endpoints.

        Alive unless the loop has not run for max_poll_interval_ms while no
        retry was under way (a stuck batch). Ready while alive, subscribed and
        not retrying a failed store operation.
        """
        waited_s = time.monotonic() - self._last_loop
        alive = waited_s < self.settings.max_poll_interval_ms / 1000.0 or not self._ready
        if not alive:
            return False, False, f"the worker loop has not run for {waited_s:.0f} s"
        if self._stop.is_set():
            return True, False, "stopping"
        return True, self._ready, self._not_ready_reason

    def _on_assigned(self, partitions) -> None:
        partitions = sorted(partitions)
        logger.info("Assigned partitions %s", [tp.partition for tp in partitions])
        self._last_records = time.monotonic()
        if not partitions:
            return
        try:
            applied = self.store.load_offsets(self.settings.topic)
        except StoreError as exc:
            self.metrics.errors.labels(component="redis").inc()
            logger.error(
                "Failed to read the applied offsets at assignment, starting from the committed offsets; "
                "the first write will resynchronise if Redis holds others: %s", exc,
            )
            return
        for tp in partitions:
            stored = applied.get(tp.partition)
            self._stored_offsets[tp.partition] = stored
            if stored is not None:
                self.consumer.seek(tp, stored + 1)
                logger.info("Resuming %s after the last applied offset", source_label(tp.topic, tp.partition, stored))

    def _on_revoked(self, partitions) -> None:
        partitions = sorted(partitions)
        if partitions:
            logger.info("Revoked partitions %s", [tp.partition for tp in partitions])
        for tp in partitions:
            self._stored_offsets.pop(tp.partition, None)
            if self._lag.pop(tp, None) is not None:
                self.metrics.lag.remove(tp.topic, str(tp.partition))

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag_refresh < LAG_REFRESH_S:
            return
        self._last_lag_refresh = now
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is None:
                self._lag[tp] = None
                continue
            lag = max(highwater - self.consumer.position(tp), 0)
            self._lag[tp] = lag
            self.metrics.lag.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)

    def _idle_long_enough(self) -> bool:
        idle_s = self.settings.exit_when_idle_seconds
        if idle_s <= 0 or time.monotonic() - self._last_records < idle_s:
            return False
        if not self.consumer.assignment():
            return False
        self._last_lag_refresh = 0.0
        self._refresh_lag()
        assigned = self.consumer.assignment()
        return all(self._lag.get(tp) == 0 for tp in assigned)

    def _maybe_checkpoint(self, force: bool = False) -> None:
        settings = self.settings
        due_by_count = settings.checkpoint_every_events and self._events_since_checkpoint >= settings.checkpoint_every_events
        due_by_time = settings.checkpoint_every_seconds and time.monotonic() - self._last_checkpoint >= settings.checkpoint_every_seconds
        if not (force or due_by_count or due_by_time):
            return
        if not force and self._events_since_checkpoint == 0:
            return
        try:
            self.checkpoints.save(self.model, self.totals.trained)
        except CheckpointError as exc:
            self.metrics.errors.labels(component="checkpoint").inc()
            self.checkpoint_failed = True
            logger.error("%s", exc)
            return
        self.checkpoint_failed = False
        self._last_checkpoint = time.monotonic()
        self._events_since_checkpoint = 0

    def _shutdown(self) -> None:
        self._maybe_checkpoint(force=self._events_since_checkpoint > 0)
        self._set_ready(False, "stopped")
        try:
            self.consumer.close(autocommit=False)
            self.dead_letters.close()
        except KafkaError as exc:
            logger.warning("Closing the Kafka clients failed: %s", exc)
        self.store.client.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        logger.info(
            "Worker stopped: consumed=%d trained=%d skipped=%d invalid=%d evaluated=%d HR@10=%.4f",
            self.totals.consumed, self.totals.trained, self.totals.skipped, self.totals.invalid,
            self.totals.evaluated, self.totals.hr_at_10,
        )

    @contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - started)


def _empty_states(model: RecurrentBPR) -> UserStateBatch:
    return UserStateBatch.empty(0, model.config.hidden_size, model.config.window)
