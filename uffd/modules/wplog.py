"""WP-fault ops that log every first write to a protected page, then un-protect it."""

from __future__ import annotations

import threading

from uffd._mapping import Fault
from uffd._ops import UffdOps
from uffd._resolution import Resolution

__all__ = ["WriteLogOps"]


class WriteLogOps(UffdOps):
    """Log write-protect faults as ``(offset, thread_id)`` and let the write through.

    Register with ``Mode.WP`` on memory that is populated and protected
    (``handler.uffd.writeprotect``); each protected page reports its first
    write once. ``writes`` is appended on the dispatch thread; read it
    through ``take()``, which is safe from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.writes: list[tuple[int, int | None]] = []

    def handle_wp(self, fault: Fault) -> Resolution:
        """Record the write and un-protect the page."""
        with self._lock:
            self.writes.append((fault.offset, fault.thread_id))
        return Resolution.unprotect()

    def take(self) -> list[tuple[int, int | None]]:
        """Return and clear the log."""
        with self._lock:
            taken, self.writes = self.writes, []
        return taken
