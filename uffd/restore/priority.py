"""Faults first: :func:`raise_thread_priority` for the daemon's serving threads.

A fault's path (the dispatch thread that reads faults, the urgent page
client) must not wait for a time slice behind a busy host's other work.
Niceness is per thread on Linux and inherited by the threads a thread
creates: the daemon's serving thread raises its own (``URGENT_NICE``, where
the process may: root or CAP_SYS_NICE), so the handshake threads, sessions,
fault handlers, page clients and prefetch threads it starts inherit it.
No thread of the daemon is made nicer than that: they all take turns on one
GIL, and a nice thread holds it while it waits for a time slice, stalling
every other thread (prefetch at nice 10 ran 16 sessions restoring at once at
0.16 GB/s against 0.36 GB/s at the serving threads' niceness, with ~2x the
daemon CPU). setpriority(2), sched(7).
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["URGENT_NICE", "raise_thread_priority"]

URGENT_NICE = -10
"""Niceness of the daemon's threads: a weight of 9548, so a woken fault thread
preempts normal work at once."""


def raise_thread_priority() -> None:
    """Make the calling thread (and the threads it creates later) nice ``URGENT_NICE``.

    Best effort: without the privilege (EPERM, EACCES) nothing changes.
    """
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) > URGENT_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, URGENT_NICE)
