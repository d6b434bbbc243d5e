"""LatencyHistogram: percentiles to 2-3 significant digits, exact log2 buckets, QEMU JSON."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import uffd
from uffd import FaultHandler, Mode, Resolution, UffdOps
from uffd._histogram import QEMU_LATENCY_BUCKETS, LatencyHistogram, format_us
from uffd.mem import Region

LATENCIES = st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=300)


def _exact_percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile, the definition the histogram approximates."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@settings(max_examples=300, deadline=None)
@given(LATENCIES, st.sampled_from([2, 3]), st.floats(min_value=0, max_value=100))
def test_percentiles_are_within_the_stated_precision(
    values: list[int], digits: int, q: float
) -> None:
    """Any percentile is the exact one or above it by less than 10**-digits of its value."""
    hist = LatencyHistogram(digits)
    for value in values:
        hist.record(value)
    exact = _exact_percentile(values, q)
    got = hist.percentile(q)
    assert exact <= got <= max(values)
    assert got - exact <= exact * 10**-digits


@settings(max_examples=200, deadline=None)
@given(LATENCIES)
def test_min_max_mean_count_are_exact(values: list[int]) -> None:
    """min, max, count and mean are the exact figures, not bucket bounds."""
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    assert (hist.min, hist.max, hist.count) == (min(values), max(values), len(values))
    assert hist.mean == pytest.approx(sum(values) / len(values))


@settings(max_examples=200, deadline=None)
@given(LATENCIES, st.sampled_from([1, 2, 3]))
def test_log2_buckets_match_direct_counting(values: list[int], digits: int) -> None:
    """Power-of-two buckets aggregated from sub-buckets equal counting floor(log2(µs))."""
    hist = LatencyHistogram(digits)
    for value in values:
        hist.record(value)
    direct = [0] * QEMU_LATENCY_BUCKETS
    for value in values:
        direct[min(max(value.bit_length() - 1, 0), QEMU_LATENCY_BUCKETS - 1)] += 1
    assert hist.log2_buckets() == direct


@settings(max_examples=100, deadline=None)
@given(LATENCIES, LATENCIES)
def test_merge_equals_recording_both(first: list[int], second: list[int]) -> None:
    """Merging two histograms gives the histogram of both value lists."""
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for value in first:
        a.record(value)
        both.record(value)
    for value in second:
        b.record(value)
        both.record(value)
    a.merge(b)
    assert a.buckets() == both.buckets()
    assert (a.count, a.min, a.max, a.total_us) == (both.count, both.min, both.max, both.total_us)
    assert a.as_qemu_blocktime() == both.as_qemu_blocktime()


def test_a_tail_near_a_power_of_two_is_not_reported_as_the_power() -> None:
    """p99 of latencies around 20-21 ms prints as ~21 ms, not the log2 bound 32768 µs."""
    hist = LatencyHistogram()
    for i in range(1000):
        hist.record(20_000 + i)
    assert 20_960 <= hist.percentile(99) <= 20_990 * 1.01
    summary = hist.summary()
    assert summary.startswith("p50 20.") and "p99 21 ms, max 21 ms (1,000 faults)" in summary
    assert repr(hist) == f"<LatencyHistogram {summary}>"


def test_qemu_blocktime_json_per_thread() -> None:
    """The export has QEMU 10.1's keys: the distribution, per-thread blocktime and latency."""
    hist = LatencyHistogram()
    for _ in range(10):
        hist.record(300, thread_id=7)  # 3 ms blocked in total, in [256, 512) µs
    hist.record(5_000, thread_id=3)  # 5 ms, in [4096, 8192) µs
    hist.record(1, thread_id=None)  # a fault without THREAD_ID
    out = json.loads(json.dumps(hist.as_qemu_blocktime()))
    dist = out["postcopy-latency-dist"]
    assert len(dist) == QEMU_LATENCY_BUCKETS and sum(dist) == 12
    assert (dist[8], dist[12], dist[0]) == (10, 1, 1)
    assert out["x-pyuffd-thread-ids"] == [3, 7]
    assert out["postcopy-vcpu-blocktime"] == [5, 3]
    assert out["postcopy-vcpu-latency"] == [5_000_000, 300_000]
    assert out["postcopy-non-vcpu-latency"] == 1_000
    assert out["postcopy-latency"] == round((3000 + 5000 + 1) / 12 * 1000)


def test_overflow_goes_to_the_last_qemu_bucket() -> None:
    """A latency past 2**24 µs lands in the last bucket, as QEMU counts it."""
    hist = LatencyHistogram()
    hist.record(2**30)
    assert hist.log2_buckets()[-1] == 1


def test_empty_histogram_and_bad_arguments() -> None:
    """Empty: zeros and "no faults"; bad precision, percentile or merge: ValueError."""
    hist = LatencyHistogram()
    assert (hist.percentile(99), hist.mean, hist.summary()) == (0, 0.0, "no faults")
    assert hist.as_qemu_blocktime()["postcopy-latency-dist"] == [0] * QEMU_LATENCY_BUCKETS
    with pytest.raises(ValueError, match="significant_digits"):
        LatencyHistogram(4)
    with pytest.raises(ValueError, match="between 0 and 100"):
        hist.percentile(101)
    with pytest.raises(ValueError, match="cannot merge"):
        hist.merge(LatencyHistogram(3))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0 µs"),
        (12.34, "12.3 µs"),
        (850, "850 µs"),
        (999.6, "1000 µs"),
        (1234, "1.23 ms"),
        (32_768, "32.8 ms"),
        (3.2e7, "32 s"),
    ],
)
def test_format_us_uses_three_significant_digits(value: float, text: str) -> None:
    """Latencies print with at most 3 significant digits and a unit that fits."""
    assert format_us(value) == text


class _Zero(UffdOps):
    """Every page is zero-filled (a Python resolution, counted in the handler's stats)."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.zero()


@pytest.mark.requires_uffd(features="THREAD_ID")
def test_handler_stats_keep_latencies_in_a_histogram(
    uffd_handler: FaultHandler, uffd_region_factory: Callable[..., Region]
) -> None:
    """FaultHandler.stats: every fault in the histogram, per faulting thread; sane percentiles."""
    region = uffd_region_factory("anon", pages=64)
    uffd_handler.register(region, Mode.MISSING, _Zero())
    assert region.read(0, region.length) == bytes(region.length)
    deadline = time.monotonic() + 5
    # A fault is counted just after its thread is woken: wait (bounded) for the last one.
    while uffd_handler.stats.total.latency.count < 64 and time.monotonic() < deadline:
        time.sleep(0.01)
    total = uffd_handler.stats.total
    assert total.latency.count == 64 == sum(total.latency_us_log2) == total.faults["missing"]
    assert total.latency.min <= total.percentile_us(0.5) <= total.percentile_us(0.99)
    assert total.percentile_us(0.99) <= total.latency.max
    qemu = total.latency.as_qemu_blocktime()
    assert sum(qemu["postcopy-latency-dist"]) == 64
    assert qemu["x-pyuffd-thread-ids"] == [threading.get_native_id()]
    assert qemu["postcopy-vcpu-blocktime"] == [total.latency.total_us // 1000]
