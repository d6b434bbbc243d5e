"""Bulk work yields the CPU to urgent work: :func:`lower_thread_priority`.

A restore's prefetch copies and bulk receives keep a CPU busy for the whole
restore; a fault's path (the pump, the dispatch thread, the urgent page
client) must not wait for a time slice behind them. Niceness is per thread
on Linux and inherited by the threads a thread creates, so the prefetch
thread lowers its own, and the bulk page client is connected from a thread
that did (its reader thread inherits it). setpriority(2), sched(7).
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["BULK_NICE", "lower_thread_priority"]

BULK_NICE = 10
"""Niceness of bulk threads: a time-slice weight of 110 against a fault thread's 1024."""


def lower_thread_priority() -> None:
    """Make the calling thread (and the threads it creates later) nice ``BULK_NICE``.

    Best effort: a niceness already higher is kept; a failure changes nothing.
    """
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) < BULK_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BULK_NICE)
