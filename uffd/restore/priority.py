"""Urgent work first, bulk work last: :func:`raise_thread_priority`, :func:`lower_thread_priority`.

A restore's prefetch copies and bulk receives keep a CPU busy for the whole
restore, and a busy host has other work too; a fault's path (the dispatch
thread that reads faults, the urgent page client) must not wait for a time
slice behind either. Niceness is per thread on Linux and inherited by the
threads a thread creates: the daemon's serving thread raises its own
(``URGENT_NICE``, where the process may: root or CAP_SYS_NICE), so the
handshake threads, sessions, fault handlers and urgent page clients it
starts inherit it; the prefetch thread lowers its own for its adaptive pass,
and the bulk page client is connected from a thread that did (its reader
inherits it). setpriority(2), sched(7).
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["BULK_NICE", "URGENT_NICE", "lower_thread_priority", "raise_thread_priority"]

BULK_NICE = 10
"""Niceness of bulk threads: a time-slice weight of 110 against a normal thread's 1024."""

URGENT_NICE = -10
"""Niceness of the daemon's serving threads: a weight of 9548, so a woken fault thread
preempts normal work at once."""


def lower_thread_priority() -> None:
    """Make the calling thread (and the threads it creates later) nice ``BULK_NICE``.

    Best effort: a niceness already higher is kept; a failure changes nothing.
    """
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) < BULK_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, BULK_NICE)


def raise_thread_priority() -> None:
    """Make the calling thread (and the threads it creates later) nice ``URGENT_NICE``.

    Best effort: without the privilege (EPERM, EACCES) nothing changes.
    """
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) > URGENT_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, URGENT_NICE)
