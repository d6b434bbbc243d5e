"""Counters and a latency histogram for ``FaultHandler.stats``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["Counters", "HandlerStats"]

BUCKETS = 32  # log2 microseconds: bucket b holds latencies in [2**(b-1), 2**b) µs


@dataclass
class Counters:
    """Faults by kind, resolutions by kind, errors, and latency (log2 µs buckets)."""

    faults: Counter[str] = field(default_factory=Counter)
    resolutions: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    latency_us_log2: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def record(self, fault_kind: str, resolution: str, latency_ns: int) -> None:
        """Count one resolved fault (caller holds the handler's lock: this is on the fault path)."""
        self.faults[fault_kind] += 1
        self.resolutions[resolution] += 1
        bucket = (latency_ns // 1000).bit_length()
        self.latency_us_log2[bucket if bucket < BUCKETS else BUCKETS - 1] += 1

    def merged(self, other: Counters) -> Counters:
        """A new Counters holding both."""
        return Counters(
            self.faults + other.faults,
            self.resolutions + other.resolutions,
            self.errors + other.errors,
            [a + b for a, b in zip(self.latency_us_log2, other.latency_us_log2, strict=True)],
        )

    def percentile_us(self, q: float) -> float:
        """Upper bound (µs) of the bucket holding the ``q`` quantile (0..1); 0 when empty."""
        total = sum(self.latency_us_log2)
        if not total:
            return 0.0
        seen = 0
        for bucket, count in enumerate(self.latency_us_log2):
            seen += count
            if seen >= q * total:
                return float(2**bucket)
        return float(2 ** (BUCKETS - 1))


@dataclass
class HandlerStats:
    """A snapshot of ``FaultHandler.stats``: ``total``, ``per_mapping`` ((start, end) -> Counters),
    ``native_faults`` (served by the C pump without Python) and ``expired`` (deadline fallbacks)."""

    total: Counters
    per_mapping: dict[tuple[int, int], Counters]
    native_faults: int = 0
    expired: int = 0
