"""Rate-limited logging, so that a stream of bad input or a long outage does not flood the log."""

from __future__ import annotations

import logging
import time


class RateLimitedLogger:
    """Logs at most one message per key every ``interval_s`` seconds, with the count of those suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, clock=time.monotonic) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless a message with ``key`` was logged less than interval_s ago."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return

        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if suppressed:
            self._logger.log(level, message + " (%d similar messages suppressed)", *args, suppressed)
        else:
            self._logger.log(level, message, *args)
