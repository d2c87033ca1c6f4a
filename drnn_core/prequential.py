"""Prequential ranking metrics from rank arrays: HR, MRR and NDCG at a cut-off, and sliding-window curves.

A rank array contains one entry per event in stream order: the rank of the event's
item before the system learned from the event (0 is the top), or a negative
value for a miss (an item the system had never seen). Every entry is one event.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from drnn_core.errors import ConfigError

CUTOFFS = (10, 20)
MAX_CURVE_POINTS = 500
CURVE_METRICS = ("hr", "mrr", "ndcg")


@dataclasses.dataclass(frozen=True)
class CutoffMetrics:
    """Sums and means of the ranking metrics at one cut-off K over a run of events.

    Attributes
    ----------
    cutoff : int
        K.
    events : int
        Number of events, misses included.
    hits : int
        Events ranked below K.
    reciprocal_rank_sum : float
        Sum of 1 / (rank + 1) over the hits.
    ndcg_sum : float
        Sum of 1 / log2(rank + 2) over the hits.
    """

    cutoff: int
    events: int
    hits: int
    reciprocal_rank_sum: float
    ndcg_sum: float

    @property
    def hr(self) -> float:
        """HR@K, the fraction of events ranked below K (0 for no events)."""
        return self.hits / self.events if self.events else 0.0

    @property
    def mrr(self) -> float:
        """MRR@K, the mean of 1 / (rank + 1) with 0 outside the top K (0 for no events)."""
        return self.reciprocal_rank_sum / self.events if self.events else 0.0

    @property
    def ndcg(self) -> float:
        """NDCG@K with one relevant item, the mean of 1 / log2(rank + 2) with 0 outside the top K."""
        return self.ndcg_sum / self.events if self.events else 0.0


def _as_ranks(ranks: np.ndarray) -> np.ndarray:
    array = np.asarray(ranks)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"ranks must be a one-dimensional integer array, got shape {array.shape} and dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def hit_mask(ranks: np.ndarray, cutoff: int) -> np.ndarray:
    """Return whether each event's item ranked in the top ``cutoff``.

    Parameters
    ----------
    ranks : ndarray, shape (N,), integer
    cutoff : int

    Returns
    -------
    ndarray, shape (N,), bool
    """
    ranks = _as_ranks(ranks)
    return (ranks >= 0) & (ranks < cutoff)


def reciprocal_ranks(ranks: np.ndarray, cutoff: int) -> np.ndarray:
    """Return 1 / (rank + 1) for each event in the top ``cutoff`` and 0 for the others.

    Returns
    -------
    ndarray, shape (N,), float64
    """
    ranks = _as_ranks(ranks)
    hits = hit_mask(ranks, cutoff)
    gains = np.zeros(ranks.shape[0], dtype=np.float64)
    gains[hits] = 1.0 / (ranks[hits] + 1.0)
    return gains


def ndcg_gains(ranks: np.ndarray, cutoff: int) -> np.ndarray:
    """Return 1 / log2(rank + 2) for each event in the top ``cutoff`` and 0 for the others.

    Returns
    -------
    ndarray, shape (N,), float64
    """
    ranks = _as_ranks(ranks)
    hits = hit_mask(ranks, cutoff)
    gains = np.zeros(ranks.shape[0], dtype=np.float64)
    gains[hits] = 1.0 / np.log2(ranks[hits] + 2.0)
    return gains


def cutoff_metrics(ranks: np.ndarray, cutoff: int) -> CutoffMetrics:
    """Compute HR, MRR and NDCG at ``cutoff`` over every event of ``ranks``.

    Parameters
    ----------
    ranks : ndarray, shape (N,), integer
    cutoff : int
        K, at least 1.
    """
    if cutoff < 1:
        raise ConfigError(f"cutoff must be at least 1, got {cutoff}")
    ranks = _as_ranks(ranks)
    return CutoffMetrics(
        cutoff=cutoff,
        events=int(ranks.shape[0]),
        hits=int(np.count_nonzero(hit_mask(ranks, cutoff))),
        reciprocal_rank_sum=float(reciprocal_ranks(ranks, cutoff).sum()),
        ndcg_sum=float(ndcg_gains(ranks, cutoff).sum()),
    )


def second_half(ranks: np.ndarray) -> np.ndarray:
    """Return the ranks of the second half of the stream: events N // 2 to N - 1.

    With an odd N the second half contains the middle event.
    """
    ranks = _as_ranks(ranks)
    return ranks[ranks.shape[0] // 2 :]


def summarize(ranks: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float | int]:
    """Return the metrics of a rank array as a flat dict, over all events and over the second half.

    Keys, for each K in ``cutoffs``: ``hr_at_K``, ``mrr_at_K``, ``ndcg_at_K``,
    ``hits_at_K``, ``reciprocal_rank_at_K_sum``, and the same with the suffix
    ``_second_half``; plus ``events`` and ``second_half_events``.
    """
    ranks = _as_ranks(ranks)
    later = second_half(ranks)
    summary: dict[str, float | int] = {"events": int(ranks.shape[0]), "second_half_events": int(later.shape[0])}
    for suffix, part in (("", ranks), ("_second_half", later)):
        for cutoff in cutoffs:
            metrics = cutoff_metrics(part, cutoff)
            summary[f"hr_at_{cutoff}{suffix}"] = metrics.hr
            summary[f"mrr_at_{cutoff}{suffix}"] = metrics.mrr
            summary[f"ndcg_at_{cutoff}{suffix}"] = metrics.ndcg
            summary[f"hits_at_{cutoff}{suffix}"] = metrics.hits
            summary[f"reciprocal_rank_at_{cutoff}_sum{suffix}"] = metrics.reciprocal_rank_sum
    return summary


def default_window(events: int) -> int:
    """Return the sliding-window length of the learning curves: a tenth of the stream, from 100 to 5,000 events.

    A stream shorter than 100 events gets one window over all of it.
    """
    return max(1, min(events, max(100, min(5000, events // 10))))


def sliding_mean(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean of each full window of ``window`` consecutive values.

    Parameters
    ----------
    values : ndarray, shape (N,), float or bool
    window : int
        At least 1 and at most N.

    Returns
    -------
    ends : ndarray, shape (N - window + 1,), int64
        Index of the last event of each window.
    means : ndarray, shape (N - window + 1,), float64
    """
    values = np.asarray(values, dtype=np.float64)
    if not 1 <= window <= values.shape[0]:
        raise ConfigError(f"window must be from 1 to the number of values {values.shape[0]}, got {window}")
    totals = np.concatenate([[0.0], np.cumsum(values)])
    means = (totals[window:] - totals[:-window]) / window
    ends = np.arange(window - 1, values.shape[0], dtype=np.int64)
    return ends, means


def downsample(ends: np.ndarray, means: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_points`` evenly spaced points of a curve, always with its last point."""
    if max_points < 2:
        raise ConfigError(f"max_points must be at least 2, got {max_points}")
    if ends.shape[0] <= max_points:
        return ends, means
    keep = np.unique(np.linspace(0, ends.shape[0] - 1, max_points).round().astype(np.int64))
    return ends[keep], means[keep]


def learning_curve(
    ranks: np.ndarray, metric: str, cutoff: int, window: int, max_points: int = MAX_CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """Return a sliding-window curve of one metric over the stream, downsampled.

    Parameters
    ----------
    ranks : ndarray, shape (N,), integer
        N at least ``window``.
    metric : str
        "hr", "mrr" or "ndcg".
    cutoff : int
    window : int
    max_points : int

    Returns
    -------
    ends : ndarray, shape (<= max_points,), int64
        Index of the last event of each window.
    values : ndarray, shape (<= max_points,), float64
        The metric over the window that ends there.
    """
    gains_of = {"hr": hit_mask, "mrr": reciprocal_ranks, "ndcg": ndcg_gains}
    if metric not in gains_of:
        raise ConfigError(f"Unknown metric {metric!r}: expected one of {', '.join(CURVE_METRICS)}")
    ends, means = sliding_mean(gains_of[metric](ranks, cutoff), window)
    return downsample(ends, means, max_points)
