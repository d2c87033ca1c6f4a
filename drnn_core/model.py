"""The recurrent BPR model: parameters, item statistics, RNG state, batch training and serialisation."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np

from drnn_core import kernels
from drnn_core.config import ModelConfig
from drnn_core.errors import ConfigError, ModelFormatError, ModelShapeError
from drnn_core.rng import new_rng_state
from drnn_core.sampling import POPULARITY, UNIFORM, ItemStats, build_fenwick
from drnn_core.state import UserStateBatch

MODEL_FORMAT_VERSION = 2

# Rows of new initial weights drawn at a time when X or V grows.
GROW_CHUNK_ROWS = 65536
_MAGIC = "drnn-stream-model"
PARAMETER_ARRAYS = ("X", "U", "W", "V", "bias", "acc_x", "acc_u", "acc_w", "acc_v", "acc_bias")


@dataclasses.dataclass
class BatchResult:
    """Per-event outcome of ``RecurrentBPR.train_batch``.

    Attributes
    ----------
    status : ndarray, shape (B,), int8
        One of the ``kernels.STATUS_*`` codes.
    loss : ndarray, shape (B,), float32
        BPR loss of each SGD step, NaN where no step was taken.
    rank : ndarray, shape (B,), int64
        Prequential rank of the event's item before training (0 is the top),
        ``kernels.RANK_UNKNOWN_ITEM`` for a new item, ``kernels.RANK_NOT_EVALUATED``
        when ranking was off or the event was a duplicate.
    """

    status: np.ndarray
    loss: np.ndarray
    rank: np.ndarray

    def count(self, status: int) -> int:
        """Return the number of events with the given status code."""
        return int(np.count_nonzero(self.status == status))

    @property
    def applied(self) -> np.ndarray:
        """Mask of events applied to their user's state (every status but duplicate)."""
        return self.status != kernels.STATUS_DUPLICATE

    def hits(self, cutoff: int = 10) -> int:
        """Return the number of evaluated events whose item ranked in the top ``cutoff``."""
        return int(np.count_nonzero((self.rank >= 0) & (self.rank < cutoff)))

    def reciprocal_rank_sum(self, cutoff: int = 10) -> float:
        """Return the sum of 1 / (rank + 1) over evaluated events ranked in the top ``cutoff``."""
        top = self.rank[(self.rank >= 0) & (self.rank < cutoff)]
        return float(np.sum(1.0 / (top + 1.0)))

    @property
    def evaluated(self) -> int:
        """Number of events that were ranked (unknown items included, as misses)."""
        return int(np.count_nonzero(self.rank != kernels.RANK_NOT_EVALUATED))


class RecurrentBPR:
    """DREAM-style recurrent BPR model trained online, one SGD step per event.

    Parameters
    ----------
    config : ModelConfig
        Hyperparameters; the seed fixes the initial weights and the sampler.

    Attributes
    ----------
    X, V : ndarray, shape (capacity, h), float32
        Input and output item embeddings, one array when ``tie_embeddings`` is
        set. Rows at or above the item capacity in use are initialised but
        untrained.
    U, W : ndarray, shape (h, h), float32
        Input-to-hidden and hidden-to-hidden weights.
    bias : ndarray, shape (capacity,), float32
        Item biases, added to the scores; they stay zero without ``item_bias``.
    acc_x, acc_v, acc_bias : ndarray, shape (capacity,), float32
        Adagrad accumulators of the X rows, the V rows and the biases (acc_x is
        acc_v with tied embeddings).
    acc_u, acc_w : ndarray, shape (h, h), float32
        Adagrad accumulators of the elements of U and W.
    stats : ItemStats
        Item counts and sampler structures.
    rng_state : ndarray, shape (1,), uint64
        Sampler RNG state.
    """

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        size = config.hidden_size
        capacity = config.initial_items
        self._init_rng = np.random.default_rng(config.seed)

        self.U = self._normal((size, size))
        self.W = self._normal((size, size))
        self.X = self._normal((capacity, size))
        self.V = self.X if config.tie_embeddings else self._normal((capacity, size))
        self.bias = np.zeros(capacity, dtype=np.float32)
        self.acc_u = self._accumulator((size, size))
        self.acc_w = self._accumulator((size, size))
        self.acc_v = self._accumulator((capacity,))
        self.acc_x = self.acc_v if config.tie_embeddings else self._accumulator((capacity,))
        self.acc_bias = self._accumulator((capacity,))
        self.stats = ItemStats.empty(capacity, config.popularity_alpha)
        self.rng_state = new_rng_state(config.seed)

    def _normal(self, shape: tuple[int, int]) -> np.ndarray:
        values = self._init_rng.normal(0.0, self.config.init_scale, size=shape)
        return np.ascontiguousarray(values, dtype=np.float32)

    def _grown_embedding(self, embedding: np.ndarray) -> np.ndarray:
        """Return ``embedding`` with as many new rows of initial weights appended, drawn in chunks.

        Drawing in chunks gives the same values as one draw, but holds only one
        chunk in float64 at a time, so growing to a large catalogue needs little
        more memory than the old and new arrays.
        """
        rows, size = embedding.shape
        grown = np.empty((2 * rows, size), dtype=np.float32)
        grown[:rows] = embedding
        for start in range(rows, 2 * rows, GROW_CHUNK_ROWS):
            end = min(start + GROW_CHUNK_ROWS, 2 * rows)
            grown[start:end] = self._normal((end - start, size))
        return grown

    def _accumulator(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, self.config.adagrad_initial_accumulator, dtype=np.float32)

    @property
    def capacity(self) -> int:
        """Number of item rows allocated in X and V."""
        return self.X.shape[0]

    @property
    def known_items(self) -> int:
        """Number of items seen in at least one applied event."""
        return self.stats.n_known

    def ensure_capacity(self, n_items: int) -> None:
        """Grow X, V and the item statistics by doubling until ``n_items`` rows fit.

        Trained rows are kept unchanged; new rows get fresh initial weights from
        the model's initialisation RNG, drawn one doubling at a time, so the
        weights do not depend on how the events were split into batches.
        """
        while self.capacity < n_items:
            extra = self.capacity
            self.X = self._grown_embedding(self.X)
            if self.config.tie_embeddings:
                self.V = self.X
            else:
                self.V = self._grown_embedding(self.V)
            self.bias = np.concatenate([self.bias, np.zeros(extra, dtype=np.float32)])
            self.acc_v = np.concatenate([self.acc_v, self._accumulator((extra,))])
            if self.config.tie_embeddings:
                self.acc_x = self.acc_v
            else:
                self.acc_x = np.concatenate([self.acc_x, self._accumulator((extra,))])
            self.acc_bias = np.concatenate([self.acc_bias, self._accumulator((extra,))])
            self.stats.grow(2 * extra)

    def train_batch(
        self,
        states: UserStateBatch,
        slots: np.ndarray,
        items: np.ndarray,
        partitions: np.ndarray,
        offsets: np.ndarray,
        *,
        evaluate: bool = True,
        sample_every: int = 1,
    ) -> BatchResult:
        """Apply a micro-batch of events in order; see ``kernels.train_batch``.

        Parameters
        ----------
        states : UserStateBatch
            The states of the users in the batch, updated in place.
        slots : ndarray, shape (B,), int32
            Row of each event's user in ``states``.
        items : ndarray, shape (B,), int32
            Item index of each event; the capacity grows to fit them.
        partitions : ndarray, shape (B,), int32
        offsets : ndarray, shape (B,), int64
            Kafka position of each event, used to skip replays.
        evaluate : bool
            Rank the events' items before training on them.
        sample_every : int
            With ``evaluate``, rank about one event in every ``sample_every``
            (the same events on every replay, see
            ``kernels.in_evaluation_sample``); 1 ranks every event.
        """
        if sample_every < 1:
            raise ConfigError(f"sample_every must be at least 1, got {sample_every}: use 1 to rank every event")
        if items.size:
            self.ensure_capacity(int(items.max()) + 1)
        size = slots.shape[0]
        result = BatchResult(
            status=np.zeros(size, dtype=np.int8),
            loss=np.zeros(size, dtype=np.float32),
            rank=np.zeros(size, dtype=np.int64),
        )
        events = (
            np.ascontiguousarray(slots, dtype=np.int32),
            np.ascontiguousarray(items, dtype=np.int32),
            np.ascontiguousarray(partitions, dtype=np.int32),
            np.ascontiguousarray(offsets, dtype=np.int64),
        )
        kernels.train_batch(
            (self.X, self.U, self.W, self.V, self.bias),
            (self.acc_x, self.acc_u, self.acc_w, self.acc_v, self.acc_bias),
            states.as_tuple(),
            events,
            self.stats.as_tuple(),
            self.kernel_hyper(sample_every if evaluate else 0),
            self.rng_state,
            (result.status, result.loss, result.rank),
        )
        return result

    def kernel_hyper(self, sample_every: int) -> tuple:
        """Return the ``hyper`` tuple of ``kernels.train_batch`` for this model's settings.

        ``sample_every`` is the evaluation sample interval: 0 ranks nothing, 1
        every event, M about one event in M.
        """
        config = self.config
        kind = POPULARITY if config.sampler == "popularity" else UNIFORM
        return (
            float(config.learning_rate),
            float(config.l2),
            float(config.max_grad_norm),
            float(config.popularity_alpha),
            int(kind),
            int(sample_every),
            int(config.negatives),
            kernels.NEGATIVES_HARDEST if config.negative_mode == "hardest" else kernels.NEGATIVES_SUM,
            kernels.OPTIMIZER_ADAGRAD if config.optimizer == "adagrad" else kernels.OPTIMIZER_SGD,
            int(config.item_bias),
            float(config.recurrent_learning_rate_scale),
            int(config.tie_embeddings),
        )

    def scores(self, hidden: np.ndarray) -> np.ndarray:
        """Score every item slot for a hidden state.

        Parameters
        ----------
        hidden : ndarray, shape (h,), float32

        Returns
        -------
        ndarray, shape (capacity,), float32
            ``hidden . V[j] + bias[j]`` for known items, -inf for the others.
        """
        out = np.empty(self.capacity, dtype=np.float32)
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        kernels.score_items(hidden, self.V, self.bias, self.stats.item_count, int(self.stats.meta[1]), out)
        return out

    def top_k(self, hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the indexes and scores of the k best known items, best first."""
        scores = self.scores(hidden)
        k = min(k, self.known_items)
        if k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top, scores[top]

    def to_bytes(self) -> bytes:
        """Serialise the parameters, item statistics, RNG state and metadata (npz)."""
        metadata = {
            "magic": _MAGIC,
            "format_version": MODEL_FORMAT_VERSION,
            "hidden_size": self.config.hidden_size,
            "window": self.config.window,
            "capacity": self.capacity,
            "known_items": self.known_items,
            "tie_embeddings": self.config.tie_embeddings,
            "config": dataclasses.asdict(self.config),
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            metadata=np.frombuffer(json.dumps(metadata).encode(), dtype=np.uint8),
            X=self.X, U=self.U, W=self.W, V=self.V, bias=self.bias,
            acc_x=self.acc_x, acc_u=self.acc_u, acc_w=self.acc_w, acc_v=self.acc_v, acc_bias=self.acc_bias,
            item_count=self.stats.item_count,
            known_items=self.stats.known_items,
            meta=self.stats.meta,
            rng_state=self.rng_state,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, config: ModelConfig) -> "RecurrentBPR":
        """Load a model saved by ``to_bytes``; its h, K and tie_embeddings must equal the config's.

        Learning rate, L2, sampler and the other training settings come from
        ``config``, so they can change between runs.

        Raises
        ------
        ModelFormatError
            If the data is not a model of this format version, or its h, K,
            tie_embeddings or array shapes do not match.
        """
        arrays = _read_npz(data)
        metadata = _read_metadata(arrays)
        _check_shapes(arrays, metadata, config)

        model = cls(dataclasses.replace(config, initial_items=int(metadata["capacity"])))
        for name in PARAMETER_ARRAYS:
            setattr(model, name, np.ascontiguousarray(arrays[name], dtype=np.float32))
        if config.tie_embeddings:
            model.V = model.X
            model.acc_x = model.acc_v
        model.stats = ItemStats.empty(model.capacity, config.popularity_alpha)
        model.stats.item_count[:] = arrays["item_count"]
        model.stats.known_items[:] = arrays["known_items"]
        model.stats.meta[:] = arrays["meta"]
        model.stats.fenwick = build_fenwick(model.stats.item_count, config.popularity_alpha)
        model.rng_state = np.ascontiguousarray(arrays["rng_state"], dtype=np.uint64)
        return model


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except Exception as exc:
        raise ModelFormatError(
            f"Failed to read the model: not a drnn-stream model file ({type(exc).__name__}). "
            "Point to a file written by drnn-stream, or delete it to start from scratch."
        ) from exc


def _read_metadata(arrays: dict[str, np.ndarray]) -> dict:
    if "metadata" not in arrays:
        raise ModelFormatError("Failed to read the model: its metadata is missing; the file is not a drnn-stream model")
    try:
        metadata = json.loads(arrays["metadata"].tobytes().decode())
    except ValueError as exc:
        raise ModelFormatError(f"Failed to read the model: its metadata is not valid JSON ({exc})") from exc
    if not isinstance(metadata, dict) or metadata.get("magic") != _MAGIC:
        raise ModelFormatError("Failed to read the model: the file is not a drnn-stream model")
    version = metadata.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise ModelFormatError(
            f"Failed to read the model: format version {version!r}, but this drnn-stream reads version "
            f"{MODEL_FORMAT_VERSION}. Use the drnn-stream release that wrote it, or start from scratch."
        )
    return metadata


def _check_shapes(arrays: dict[str, np.ndarray], metadata: dict, config: ModelConfig) -> None:
    size, window = metadata.get("hidden_size"), metadata.get("window")
    tied = metadata.get("tie_embeddings")
    if size != config.hidden_size or window != config.window or tied != config.tie_embeddings:
        raise ModelShapeError(
            f"Failed to load the model: it has hidden_size={size}, window={window} and tie_embeddings={tied}, "
            f"but the settings ask for hidden_size={config.hidden_size}, window={config.window} and "
            f"tie_embeddings={config.tie_embeddings}. Use the model's values, "
            "or start a new model in another checkpoint directory."
        )
    capacity = metadata.get("capacity")
    expected = {
        "X": ((capacity, size), np.float32), "V": ((capacity, size), np.float32),
        "U": ((size, size), np.float32), "W": ((size, size), np.float32),
        "bias": ((capacity,), np.float32), "acc_x": ((capacity,), np.float32),
        "acc_u": ((size, size), np.float32), "acc_w": ((size, size), np.float32),
        "acc_v": ((capacity,), np.float32), "acc_bias": ((capacity,), np.float32),
        "item_count": ((capacity,), np.int64), "known_items": ((capacity,), np.int32),
        "meta": ((2,), np.int64), "rng_state": ((1,), np.uint64),
    }
    for name, (shape, dtype) in expected.items():
        if name not in arrays or arrays[name].shape != shape or arrays[name].dtype != dtype:
            found = f"shape {arrays[name].shape} and dtype {arrays[name].dtype}" if name in arrays else "nothing"
            raise ModelFormatError(
                f"Failed to load the model: array {name} has {found}, expected shape {shape} and dtype "
                f"{np.dtype(dtype).name}; the file is damaged"
            )
    _check_values(arrays, capacity, bool(tied))


def _check_values(arrays: dict[str, np.ndarray], capacity: int, tied: bool) -> None:
    """Reject item statistics that would make the kernels index out of bounds, and broken parameters."""
    item_count, known_items, meta = arrays["item_count"], arrays["known_items"], arrays["meta"]
    n_known, n_rows = int(meta[0]), int(meta[1])
    problems = []
    if not 0 <= n_known <= capacity or not 0 <= n_rows <= capacity:
        problems.append(f"meta={meta.tolist()} is outside [0, capacity={capacity}]")
    elif np.any(item_count < 0) or int(np.count_nonzero(item_count)) != n_known:
        problems.append(f"item_count has {int(np.count_nonzero(item_count))} known items, meta says {n_known}")
    elif np.any(known_items[:n_known] < 0) or np.any(known_items[:n_known] >= n_rows):
        problems.append(f"known_items holds indexes outside [0, {n_rows})")
    for name in PARAMETER_ARRAYS:
        if not np.isfinite(arrays[name]).all():
            problems.append(f"{name} holds non-finite values")
        elif name.startswith("acc_") and np.any(arrays[name] < 0.0):
            problems.append(f"{name} holds negative Adagrad sums")
    if tied and not np.array_equal(arrays["X"], arrays["V"]):
        problems.append("X and V differ although the embeddings are tied")
    if tied and not np.array_equal(arrays["acc_x"], arrays["acc_v"]):
        problems.append("acc_x and acc_v differ although the embeddings are tied")
    if problems:
        raise ModelFormatError(f"Failed to load the model: {'; '.join(problems)}; the file is damaged")
