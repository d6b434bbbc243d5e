"""Faults first: :func:`raise_thread_priority` for the threads that serve faults,
:func:`bulk_thread_priority` for the ones that stream a restore.

A fault's path (the dispatch thread that reads faults and, in C, fetches
and installs the page; a page server's fault channel) must not wait for a
time slice behind a busy host's other work. Niceness and the time slice are
per thread on Linux and inherited by the threads a thread creates: the
daemon's serving thread raises its own, so the handshake threads, sessions,
fault handlers, page clients and prefetch threads it starts inherit them:

- niceness ``URGENT_NICE`` (where the process may: root or CAP_SYS_NICE);
- a short time slice, ``URGENT_SLICE_NS`` (EEVDF, Linux 6.12+): a woken
  thread with a shorter slice than the running one preempts it at once,
  where an equal one waits for the running thread's slice to run out
  (~1.4 ms on 2 CPUs). Measured, a 1 GiB restore with the daemon's threads
  all at -10 and the default slice: the late faults (> 1 ms in the faulting
  process) mostly waited *before* the dispatch thread read them, the
  dispatch thread queued on a CPU behind the daemon's own prefetch threads
  for as long as the fault took (its schedstat run delay). With the short
  slice, 6 interleaved pairs against a shared 2-CPU host: urgent fault p99
  2.57 -> 2.04 ms pooled, faults over 1 ms 5.4 -> 3.7 %, restore rate
  1.73 -> 1.67 GB/s (medians; within the runs' spread).

The threads that stream the restore (the prefetch thread and the bulk page
client's reader) go back to the default slice (:func:`bulk_thread_priority`)
so the fault path's short slice wins over them, but keep the fault path's
niceness: they hold locks the fault path waits for, and a nicer thread holds
them while it waits for a time slice. The prefetch thread holds the fault
pump's lock for each install step (UFFDIO_COPY) and the GIL between steps,
which faults from a file and every other source but a page server's C link
need: bulk threads at nice 0 made urgent faults slower, not faster (p50
~110 us against ~40, interleaved runs), and prefetch at nice 10 ran 16
sessions restoring at once at 0.16 GB/s against 0.36 GB/s with ~2x the
daemon CPU. setpriority(2), sched_setattr(2), sched(7).
"""

from __future__ import annotations

import contextlib
import os
import threading

from uffd._native import lib

__all__ = ["URGENT_NICE", "URGENT_SLICE_NS", "bulk_thread_priority", "raise_thread_priority"]

URGENT_NICE = -10
"""Niceness of the daemon's threads: a weight of 9548, so a woken fault thread
preempts normal work at once."""

URGENT_SLICE_NS = 100_000
"""Time slice of the fault path's threads: the shortest the kernel takes (0.1 ms)."""


def raise_thread_priority() -> None:
    """Make the calling thread (and the threads it creates later) nice ``URGENT_NICE``
    with a ``URGENT_SLICE_NS`` time slice.

    Best effort: without the privilege (EPERM, EACCES), on a kernel without
    custom slices (EINVAL) or for a real-time thread, that part is left as it is.
    """
    tid = threading.get_native_id()
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, tid) > URGENT_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, URGENT_NICE)
    lib.pyuffd_set_slice(URGENT_SLICE_NS)


def bulk_thread_priority() -> None:
    """Give the calling thread (one that streams a restore) the default time slice back.

    Its niceness stays (see the module's docstring). Best effort, as
    :func:`raise_thread_priority`.
    """
    lib.pyuffd_set_slice(0)
