"""Counters and a latency histogram for ``FaultHandler.stats``.

Recording is on the fault path (the dispatch thread, and ``resolve`` callers
on any thread): ``Counters.record`` only appends the fault to a log, without
a lock, and the log is folded into the counters and the histogram when it
grows long or when anything reads them. Faults repeat the same few
(kind, resolution, µs, thread) tuples, so a fold counts them in C
(``collections.Counter``) and touches the histogram once per distinct tuple:
about a tenth of the Python work of counting each fault as it comes.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from uffd._histogram import LatencyHistogram

__all__ = ["Counters", "HandlerStats"]

BUCKETS = 32  # log2 microseconds: bucket b holds latencies in [2**(b-1), 2**b) µs
# Faults logged before a fold: bounds the log's memory (~80 bytes a fault)
# while keeping the fold's fixed cost small beside the faults it counts.
_FOLD_AT = 4096


class Counters:
    """Faults by kind, resolutions by kind, errors, and latency (``latency``, 2 digits).

    ``faults``, ``resolutions`` and ``latency`` are live: each read first
    counts what was recorded since. ``errors`` is counted by the caller
    under the handler's lock.
    """

    __slots__ = ("_faults", "_fold_lock", "_latency", "_log", "_resolutions", "errors")

    def __init__(
        self,
        faults: Counter[str] | None = None,
        resolutions: Counter[str] | None = None,
        errors: int = 0,
        latency: LatencyHistogram | None = None,
    ) -> None:
        self._faults: Counter[str] = faults if faults is not None else Counter()
        self._resolutions: Counter[str] = resolutions if resolutions is not None else Counter()
        self.errors = errors
        self._latency = latency if latency is not None else LatencyHistogram()
        # (fault kind, resolution, latency µs, thread id) of faults not yet counted.
        self._log: list[tuple[str, str, int, int | None]] = []
        self._fold_lock = threading.Lock()

    def record(
        self, fault_kind: str, resolution: str, latency_ns: int, thread_id: int | None = None
    ) -> None:
        """Count one resolved fault, from any thread, no lock needed (on the fault path)."""
        log = self._log
        # list.append is atomic under the GIL; _fold takes only what it has seen.
        log.append((fault_kind, resolution, latency_ns // 1000, thread_id))
        if len(log) >= _FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Count the logged faults into the counters and the histogram."""
        log = self._log
        if not log:
            return
        with self._fold_lock:  # one folder at a time; records go on meanwhile
            n = len(log)
            seen = Counter(log[:n])
            del log[:n]  # appends made since stay, after n
            latency = self._latency
            for (fault_kind, resolution, us, thread_id), count in seen.items():
                self._faults[fault_kind] += count
                self._resolutions[resolution] += count
                latency.record(us, thread_id, count)

    @property
    def faults(self) -> Counter[str]:
        """Faults by kind ("missing", "minor", "wp")."""
        self._fold()
        return self._faults

    @property
    def resolutions(self) -> Counter[str]:
        """Resolutions by kind ("copy", "zero", ..., "fallback-zero", "gone", "wake")."""
        self._fold()
        return self._resolutions

    @property
    def latency(self) -> LatencyHistogram:
        """Fault latency, read to resolved, in µs (2 significant digits)."""
        self._fold()
        return self._latency

    @property
    def latency_us_log2(self) -> list[int]:
        """Faults per log2 bucket: b holds [2**(b-1), 2**b) µs (exact, from ``latency``)."""
        out = [0] * BUCKETS
        for low, _, count in self.latency.buckets():
            out[min(low.bit_length(), BUCKETS - 1)] += count
        return out

    def merged(self, other: Counters) -> Counters:
        """A new Counters holding both."""
        latency = self.latency.copy()
        latency.merge(other.latency)
        return Counters(
            self.faults + other.faults,
            self.resolutions + other.resolutions,
            self.errors + other.errors,
            latency,
        )

    def percentile_us(self, q: float) -> float:
        """The ``q`` quantile (0..1) of fault latency in µs, to 2 significant digits; 0 if empty."""
        return float(self.latency.percentile(q * 100))

    def __repr__(self) -> str:
        return (
            f"Counters(faults={dict(self.faults)}, resolutions={dict(self.resolutions)}, "
            f"errors={self.errors}, latency={self.latency!r})"
        )


@dataclass
class HandlerStats:
    """A snapshot of ``FaultHandler.stats``: ``total``, ``per_mapping`` ((start, end) -> Counters),
    ``native_faults`` (served by the C pump without Python) and ``expired`` (deadline fallbacks)."""

    total: Counters
    per_mapping: dict[tuple[int, int], Counters]
    native_faults: int = 0
    expired: int = 0
