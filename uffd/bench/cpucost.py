"""The CPU time a handler's own threads spend, for the bench's CPU µs per fault.

A FaultHandler runs in the benchmark's process beside the faulting toucher,
so the process's CPU time (psutil's ``cpu_times()``, getrusage) would count
the toucher's page faults too. Instead the threads that appear while the
handler starts (its dispatch thread, where the C pump polls and waits, and
the pump's watchdog) are listed with psutil, and each one's CPU clock is
read with ``clock_gettime`` (nanoseconds; psutil's per-thread times are in
clock ticks of 10 ms, too coarse for a 256-fault quick run). The C
reference and the naive handler read their single handler thread's clock
themselves (CLOCK_THREAD_CPUTIME_ID, ``time.thread_time_ns``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import psutil

__all__ = ["thread_ids", "threads_cpu_ns"]

# include/linux/posix-timers.h: a thread's CPU clock id is MAKE_THREAD_CPUCLOCK(tid,
# CPUCLOCK_SCHED) = ~tid << 3 | CPUCLOCK_PERTHREAD_MASK (4) | CPUCLOCK_SCHED (2).
_PERTHREAD_SCHED = 4 | 2


def thread_ids() -> set[int]:
    """The kernel thread ids of this process's threads now."""
    return {t.id for t in psutil.Process().threads()}


def threads_cpu_ns(tids: Iterable[int]) -> int:
    """The CPU time so far (user + system, ns) of this process's threads ``tids``.

    A thread that has exited counts 0 (its clock is gone): read the clocks
    while the threads run. Only threads of the calling process can be read.
    """
    total = 0
    for tid in tids:
        try:
            total += time.clock_gettime_ns((~tid << 3) | _PERTHREAD_SCHED)
        except OSError:
            continue
    return total
