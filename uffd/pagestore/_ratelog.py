"""Rate-limited logging: a flood of connections must not become a flood of log lines.

``RateLimitedLog(logger).log(key, level, msg, *args)`` emits at most ``burst``
records per ``key`` in each ``interval`` seconds; the rest are counted, and
the next record of that key that gets through says how many were dropped.
So a server under attack logs a bounded amount (about ``burst / interval``
lines per second per key) and the operator still learns the scale.

Calling context: one event loop (or any single thread); not thread-safe.
"""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """A logger wrapper that drops records of a key beyond ``burst`` per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval: float = 10.0) -> None:
        self.logger = logger
        self.burst = burst
        self.interval = interval
        # key -> [window start, records emitted in the window, records dropped since the last]
        self._windows: dict[str, list[float]] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        """Log ``msg % args`` at ``level`` unless ``key`` is over its budget (then count it)."""
        if not self.logger.isEnabledFor(level):
            return
        now = time.monotonic()
        window = self._windows.setdefault(key, [now, 0.0, 0.0])
        if now - window[0] >= self.interval:
            window[0], window[1] = now, 0.0
        if window[1] >= self.burst:
            window[2] += 1
            return
        window[1] += 1
        dropped, window[2] = int(window[2]), 0.0
        if dropped:
            msg += " (%d similar messages suppressed)"
            args = (*args, dropped)
        self.logger.log(level, msg, *args)

    @property
    def suppressed(self) -> int:
        """Records dropped and not yet reported."""
        return int(sum(w[2] for w in self._windows.values()))
