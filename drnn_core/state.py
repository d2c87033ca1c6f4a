"""Per-user recurrent state as column arrays, the layout the kernels read and write."""

from __future__ import annotations

import dataclasses

import numpy as np

NO_PARTITION = -1
NO_OFFSET = -1
NO_ITEM = -1


@dataclasses.dataclass
class UserStateBatch:
    """The states of S users, one row per user.

    Attributes
    ----------
    hidden : ndarray, shape (S, h), float32
        h(t), the hidden state after the user's last applied item (zeros for a new user).
    start_hidden : ndarray, shape (S, h), float32
        The hidden state before the oldest item of the window (zeros while the
        window has never overflowed).
    window : ndarray, shape (S, K), int32
        The last K item indexes, oldest first; the first ``window_len`` entries
        are valid and the rest are ``NO_ITEM``.
    window_len : ndarray, shape (S,), int32
        Number of valid entries of ``window``, from 0 to K.
    count : ndarray, shape (S,), int64
        Number of events applied to the user.
    last_partition : ndarray, shape (S,), int32
        Kafka partition of the last applied event, or ``NO_PARTITION``.
    last_offset : ndarray, shape (S,), int64
        Kafka offset of the last applied event, or ``NO_OFFSET``.
    """

    hidden: np.ndarray
    start_hidden: np.ndarray
    window: np.ndarray
    window_len: np.ndarray
    count: np.ndarray
    last_partition: np.ndarray
    last_offset: np.ndarray

    @classmethod
    def empty(cls, size: int, hidden_size: int, window: int) -> "UserStateBatch":
        """Create the states of ``size`` new users."""
        return cls(
            hidden=np.zeros((size, hidden_size), dtype=np.float32),
            start_hidden=np.zeros((size, hidden_size), dtype=np.float32),
            window=np.full((size, window), NO_ITEM, dtype=np.int32),
            window_len=np.zeros(size, dtype=np.int32),
            count=np.zeros(size, dtype=np.int64),
            last_partition=np.full(size, NO_PARTITION, dtype=np.int32),
            last_offset=np.full(size, NO_OFFSET, dtype=np.int64),
        )

    @property
    def size(self) -> int:
        """Number of users S."""
        return self.hidden.shape[0]

    def reset_rows(self, rows: np.ndarray) -> None:
        """Reset the given rows to the state of a new user."""
        self.hidden[rows] = 0.0
        self.start_hidden[rows] = 0.0
        self.window[rows] = NO_ITEM
        self.window_len[rows] = 0
        self.count[rows] = 0
        self.last_partition[rows] = NO_PARTITION
        self.last_offset[rows] = NO_OFFSET

    def as_tuple(self) -> tuple:
        """Return the arrays in the order the kernels take them."""
        return (
            self.hidden,
            self.start_hidden,
            self.window,
            self.window_len,
            self.count,
            self.last_partition,
            self.last_offset,
        )
