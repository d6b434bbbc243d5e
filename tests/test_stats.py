"""Counters: faults logged without a lock on the fault path, folded exactly when read."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from uffd._histogram import LatencyHistogram
from uffd._stats import _FOLD_AT, Counters

FAULTS = st.lists(
    st.tuples(
        st.sampled_from(["missing", "minor", "wp"]),
        st.sampled_from(["copy", "zero", "wake", "fallback-zero"]),
        st.integers(min_value=0, max_value=10**10),
        st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
    ),
    max_size=300,
)


@settings(max_examples=100, deadline=None)
@given(FAULTS)
def test_folded_counts_equal_counting_each_fault(
    faults: list[tuple[str, str, int, int | None]],
) -> None:
    """Faults, resolutions and the histogram (per-thread tallies too) are those of each fault."""
    counters, hist = Counters(), LatencyHistogram()
    for kind, how, latency_ns, tid in faults:
        counters.record(kind, how, latency_ns, tid)
        hist.record(latency_ns // 1000, tid)
    assert counters.faults == {k: sum(f[0] == k for f in faults) for k in {f[0] for f in faults}}
    assert counters.resolutions == {
        h: sum(f[1] == h for f in faults) for h in {f[1] for f in faults}
    }
    assert counters.latency.buckets() == hist.buckets()
    assert counters.latency.as_qemu_blocktime() == hist.as_qemu_blocktime()
    assert (counters.latency.count, counters.latency.min, counters.latency.max) == (
        hist.count,
        hist.min,
        hist.max,
    )


def test_records_from_threads_while_read_are_never_lost() -> None:
    """Threads recording past several folds while another thread reads: every fault counted."""
    counters, per_thread, threads = Counters(), 3 * _FOLD_AT + 17, 4
    start, done = threading.Barrier(threads + 1), threading.Event()

    def record(tid: int) -> None:
        start.wait(timeout=10)
        for i in range(per_thread):
            counters.record("missing", "copy", (i % 50) * 1000, tid)

    def read() -> None:
        start.wait(timeout=10)
        while not done.is_set():
            sum(counters.faults.values())  # folds concurrently with the records

    workers = [threading.Thread(target=record, args=(t,)) for t in range(threads)]
    reader = threading.Thread(target=read)
    for t in [*workers, reader]:
        t.start()
    for t in workers:
        t.join(timeout=60)
    done.set()
    reader.join(timeout=60)
    assert not any(t.is_alive() for t in [*workers, reader])
    assert counters.faults == {"missing": threads * per_thread}
    assert counters.resolutions == {"copy": threads * per_thread}
    assert counters.latency.count == threads * per_thread
    blocktime = counters.latency.as_qemu_blocktime()
    assert blocktime["x-pyuffd-thread-ids"] == list(range(threads))
    expected_ms = sum(i % 50 for i in range(per_thread)) // 1000
    assert blocktime["postcopy-vcpu-blocktime"] == [expected_ms] * threads


def test_merged_holds_both_and_reads_what_was_logged() -> None:
    """merged() counts the faults both sides logged, errors summed, latency merged."""
    a, b = Counters(), Counters()
    a.record("missing", "copy", 5_000)
    b.record("wp", "unprotect", 7_000, 3)
    b.errors = 2
    both = a.merged(b)
    assert both.faults == {"missing": 1, "wp": 1}
    assert both.resolutions == {"copy": 1, "unprotect": 1}
    assert both.errors == 2
    assert (both.latency.count, both.latency.min, both.latency.max) == (2, 5, 7)
    assert "faults={'missing': 1, 'wp': 1}" in repr(both)
