"""Fault latency distributions with bounded relative error (HdrHistogram-style).

A log2 histogram can only say "p99 is somewhere in [16384, 32768) µs", and
printing the bucket bound reads as an exact figure. :class:`LatencyHistogram`
splits every power-of-two range into ``2**k`` equal sub-buckets, as
HdrHistogram does, so each recorded value is known to ``significant_digits``
decimal digits (2: within 1 %; 3: within 0.1 %) whatever its magnitude, with
a few hundred counters for any range of latencies. Values are whole
microseconds; below ``2 * 10**significant_digits`` µs they are exact.

:meth:`LatencyHistogram.as_qemu_blocktime` exports the distribution in the
shape of QEMU's ``query-migrate`` postcopy statistics (QEMU 10.1:
``postcopy-latency-dist``, power-of-two µs buckets; per-vCPU blocktime and
latency, here per faulting thread), for tools that already read it.

Not thread-safe: the owner serialises ``record`` (``FaultHandler``'s
``Counters`` record under their fold lock); read a :meth:`copy` from other
threads.
"""

from __future__ import annotations

import math

__all__ = ["QEMU_LATENCY_BUCKETS", "LatencyHistogram", "format_us"]

_NO_MIN = 1 << 63  # above any latency: the first record always lowers it

QEMU_LATENCY_BUCKETS = 24
"""Buckets of ``postcopy-latency-dist``: bucket N counts [2**N, 2**(N+1)) µs; the last
takes everything longer (QEMU 10.1's BLOCKTIME_LATENCY_BUCKET_N)."""


class LatencyHistogram:
    """Counts of latencies in µs, each known to ``significant_digits`` (1-3) digits.

    ``record(us, thread_id)`` adds one fault; ``percentile(q)`` answers with
    the highest value equivalent to the q-th one (never above the maximum
    recorded); ``min``, ``max`` and ``mean`` are exact.

    Raises (constructor): ValueError for ``significant_digits`` outside 1..3.
    """

    __slots__ = (
        "_counts",
        "_half",
        "_half_magnitude",
        "_mask",
        "_min",
        "_shift",
        "_threads",
        "count",
        "max",
        "significant_digits",
        "total_us",
    )

    def __init__(self, significant_digits: int = 2) -> None:
        if significant_digits not in (1, 2, 3):
            raise ValueError(f"significant_digits must be 1, 2 or 3, got {significant_digits}")
        self.significant_digits = significant_digits
        # Enough sub-buckets per power of two that one step is below 10**-digits
        # of any value in it: 2 digits -> 256 (steps of 1/128), 3 -> 2048.
        magnitude = math.ceil(math.log2(2 * 10**significant_digits))
        self._half_magnitude = magnitude - 1
        self._half = 1 << self._half_magnitude
        self._mask = (1 << magnitude) - 1
        self._shift = magnitude
        self._counts: dict[int, int] = {}
        # thread id -> [faults, total µs]; None: faults without a thread id.
        self._threads: dict[int | None, list[int]] = {}
        self.count = 0
        self.total_us = 0
        self._min = _NO_MIN
        self.max = 0

    def _range(self, index: int) -> tuple[int, int]:
        """The lowest and highest value that share sub-bucket ``index``."""
        bucket = (index >> self._half_magnitude) - 1
        sub = (index & (self._half - 1)) + self._half
        if bucket < 0:
            sub -= self._half
            bucket = 0
        low = sub << bucket
        return low, low + (1 << bucket) - 1

    def record(self, latency_us: float, thread_id: int | None = None, count: int = 1) -> None:
        """Count ``count`` faults of ``latency_us`` (floored to whole µs), blocking ``thread_id``.

        Called once per distinct value by ``Counters``' folds, once per value by
        other owners: the index arithmetic is inlined and the per-thread tally
        is a two-item list.
        """
        value = int(latency_us)
        if value < 0:
            value = 0
        # HdrHistogram's index: which power of two (beyond the first sub-bucket
        # range), then which sub-bucket of it.
        bucket = (value | self._mask).bit_length() - self._shift
        index = ((bucket + 1) << self._half_magnitude) + (value >> bucket) - self._half
        counts = self._counts
        counts[index] = counts.get(index, 0) + count
        if value > self.max:
            self.max = value
        if value < self._min:
            self._min = value
        self.count += count
        self.total_us += value * count
        tally = self._threads.get(thread_id)
        if tally is None:
            tally = self._threads[thread_id] = [0, 0]
        tally[0] += count
        tally[1] += value * count

    def __repr__(self) -> str:
        return f"<LatencyHistogram {self.summary()}>"

    @property
    def min(self) -> int:
        """The smallest latency recorded, exact; 0 when empty."""
        return self._min if self.count else 0

    @property
    def mean(self) -> float:
        """The exact mean in µs; 0.0 when empty."""
        return self.total_us / self.count if self.count else 0.0

    def percentile(self, q: float) -> int:
        """The ``q``-th percentile (0-100) in µs, to the histogram's precision; 0 when empty.

        Raises:
            ValueError: ``q`` outside 0..100.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile must be between 0 and 100, got {q}")
        if not self.count:
            return 0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index in sorted(self._counts):
            seen += self._counts[index]
            if seen >= rank:
                return min(self._range(index)[1], self.max)
        return self.max

    def buckets(self) -> list[tuple[int, int, int]]:
        """``(low_us, high_us, count)`` of every non-empty sub-bucket, in order."""
        return [(*self._range(i), self._counts[i]) for i in sorted(self._counts)]

    def log2_buckets(self, n: int = QEMU_LATENCY_BUCKETS) -> list[int]:
        """Counts per power of two: bucket N holds [2**N, 2**(N+1)) µs (0 µs in bucket 0).

        Exact: no sub-bucket straddles a power of two. The last of ``n``
        buckets also takes every longer latency.
        """
        out = [0] * n
        for low, _, count in self.buckets():
            out[min(max(low.bit_length() - 1, 0), n - 1)] += count
        return out

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram (the same ``significant_digits``).

        Raises:
            ValueError: the precisions differ.
        """
        if other.significant_digits != self.significant_digits:
            raise ValueError(
                f"cannot merge a {other.significant_digits}-digit histogram into a "
                f"{self.significant_digits}-digit one"
            )
        if not other.count:
            return
        for index, count in other._counts.items():
            self._counts[index] = self._counts.get(index, 0) + count
        self._min = min(self._min, other._min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total_us += other.total_us
        for tid, (faults, total_us) in other._threads.items():
            mine = self._threads.setdefault(tid, [0, 0])
            mine[0] += faults
            mine[1] += total_us

    def copy(self) -> LatencyHistogram:
        """An independent copy (what a reader on another thread should hold)."""
        twin = LatencyHistogram(self.significant_digits)
        twin.merge(self)
        return twin

    def summary(self) -> str:
        """``"p50 12 µs, p90 31 µs, p99 252 µs, max 1.02 ms (1,000 faults)"``."""
        if not self.count:
            return "no faults"
        points = ", ".join(f"p{q:g} {format_us(self.percentile(q))}" for q in (50, 90, 99))
        plural = "" if self.count == 1 else "s"
        return f"{points}, max {format_us(self.max)} ({self.count:,} fault{plural})"

    def as_qemu_blocktime(self) -> dict[str, object]:
        """The distribution in the shape of QEMU 10.1's postcopy ``query-migrate`` fields.

        ``postcopy-latency`` (mean, ns), ``postcopy-latency-dist``
        (:data:`QEMU_LATENCY_BUCKETS` power-of-two µs buckets),
        ``postcopy-vcpu-blocktime`` (ms a thread spent blocked in faults) and
        ``postcopy-vcpu-latency`` (mean ns) per faulting thread, in the order
        of ``x-pyuffd-thread-ids`` (faults without a thread id, i.e. without
        UFFD_FEATURE_THREAD_ID, are ``postcopy-non-vcpu-latency``).
        QEMU's ``postcopy-blocktime``, the time every vCPU was blocked at
        once, has no counterpart for a process's threads and is left out.
        """
        threads = sorted(t for t in self._threads if t is not None)
        other = self._threads.get(None)
        return {
            "postcopy-latency": round(self.mean * 1000),
            "postcopy-latency-dist": self.log2_buckets(),
            "postcopy-vcpu-blocktime": [self._threads[t][1] // 1000 for t in threads],
            "postcopy-vcpu-latency": [
                round(self._threads[t][1] * 1000 / self._threads[t][0]) for t in threads
            ],
            "postcopy-non-vcpu-latency": round(other[1] * 1000 / other[0]) if other else 0,
            "x-pyuffd-thread-ids": threads,
        }


def format_us(value_us: float) -> str:
    """A latency to 3 significant digits in a fitting unit: ``850 µs``, ``1.25 ms``, ``32.8 s``."""
    for scale, unit in ((1e6, "s"), (1e3, "ms")):
        if value_us >= scale:
            return f"{_three_digits(value_us / scale)} {unit}"
    return f"{_three_digits(value_us)} µs"


def _three_digits(x: float) -> str:
    # Not "%.3g": it turns 999.6 into "1e+03".
    decimals = 0 if x >= 100 else 1 if x >= 10 else 2
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
