"""Counters and a latency histogram for ``FaultHandler.stats``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from uffd._histogram import LatencyHistogram

__all__ = ["Counters", "HandlerStats"]

BUCKETS = 32  # log2 microseconds: bucket b holds latencies in [2**(b-1), 2**b) µs


@dataclass
class Counters:
    """Faults by kind, resolutions by kind, errors, and latency (``latency``, 2 digits)."""

    faults: Counter[str] = field(default_factory=Counter)
    resolutions: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def record(
        self, fault_kind: str, resolution: str, latency_ns: int, thread_id: int | None = None
    ) -> None:
        """Count one resolved fault (caller holds the handler's lock: this is on the fault path)."""
        self.faults[fault_kind] += 1
        self.resolutions[resolution] += 1
        self.latency.record(latency_ns // 1000, thread_id)

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


@dataclass
class HandlerStats:
    """A snapshot of ``FaultHandler.stats``: ``total``, ``per_mapping`` ((start, end) -> Counters),
    ``native_faults`` (served by the C pump without Python) and ``expired`` (deadline fallbacks)."""

    total: Counters
    per_mapping: dict[tuple[int, int], Counters]
    native_faults: int = 0
    expired: int = 0
