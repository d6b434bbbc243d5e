"""One session's tally: its report, prefetch plan, faulted pages and failure, under one lock.

The fault path (the FaultHandler's dispatch thread, and the page clients'
threads for deferred faults) and the prefetch thread both update it;
:class:`Progress` is the only place their shared state lives. Errors are
logged on the ``uffd.restore.daemon`` logger.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from typing import Any

from uffd.restore.layout import GuestLayout
from uffd.restore.prefetch import MAX_CHUNK, MIN_CHUNK, AdaptivePrefetcher
from uffd.restore.report import SessionReport

__all__ = ["Progress", "progress_bars_available"]

log = logging.getLogger("uffd.restore.daemon")


def progress_bars_available() -> bool:
    """True when tqdm is installed (``Progress.show_bar`` then draws one)."""
    try:
        return importlib.util.find_spec("tqdm") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["tqdm"] = None) or broken
        return False


class Progress:
    """What one session has installed, what is left, and whether its source failed.

    ``report`` is filled in as the session runs; ``max_chunk`` is the largest
    run prefetch is handed (bytes); ``first_served`` is set once
    a fault has been served (prefetch waits for it, briefly). ``label`` and
    ``fallback`` name the source and the fallback policy in the failure
    message. Every method may be called from any thread.
    """

    def __init__(
        self, report: SessionReport, layout: GuestLayout, *, label: str, fallback: str
    ) -> None:
        self.report = report
        self.t0 = time.monotonic()
        self.first_served = threading.Event()
        self._label = label
        self._fallback = fallback
        self._lock = threading.Lock()
        self.max_chunk = max(MAX_CHUNK, layout.page_size)
        self._plan = AdaptivePrefetcher(
            layout.length,
            page_size=layout.page_size,
            min_chunk=max(MIN_CHUNK, layout.page_size),
            max_chunk=self.max_chunk,
            boundaries=layout.starts,
        )
        self._page_size = layout.page_size
        self._faulted_pages: set[int] = set()
        self._failed: str | None = None
        self._bar: Any = None

    @property
    def failed(self) -> str | None:
        """Why the source failed (the first failure), or None while it works."""
        return self._failed

    def show_bar(self, desc: str) -> None:
        """Draw a tqdm bar of the bytes present, if tqdm is installed."""
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]
        except ImportError:
            return
        total = self.report.length
        self._bar = tqdm(
            total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True
        )

    # -- the fault path ------------------------------------------------------------

    def fault(self, flat: int) -> str | None:
        """Record a fault at flat offset ``flat`` and steer prefetch there.

        Returns why the source failed (the fault must be refused), or None.
        """
        with self._lock:
            if self.report.first_fault is None:
                self.report.first_fault = time.monotonic() - self.t0
            self._faulted_pages.add(flat // self._page_size)
            self._plan.on_fault(flat)
            return self._failed

    def faulted_pages(self) -> list[int]:
        """Flat offsets of the pages faulted on, sorted."""
        with self._lock:
            pages = sorted(self._faulted_pages)
        return [p * self._page_size for p in pages]

    # -- prefetch ------------------------------------------------------------------

    def claim(self, flat: int, length: int) -> list[tuple[int, int]]:
        """The runs ``(flat, length)`` of the range not yet present, now marked present."""
        with self._lock:
            runs = self._plan.missing_runs(flat, length)
            for start, n in runs:
                self._plan.mark_present(start, n)
        return runs

    def next_chunk(self) -> tuple[int, int] | None:
        """The next adaptive chunk ``(flat, length)`` to install, or None when all are out."""
        with self._lock:
            return self._plan.next_chunk()

    def prefetch_ended(self) -> None:
        """Called by the prefetch thread as it ends: note completion if every page is out."""
        with self._lock:
            self._note_complete()

    # -- accounting ----------------------------------------------------------------

    def served(
        self, nbytes: int, *, faulted: int = 0, prefetched: int = 0, ws: int = 0, zeroed: int = 0
    ) -> None:
        """Count ``nbytes`` installed: ``faulted`` faults served, ``prefetched`` pages by
        prefetch (``ws`` of them from the working set), ``zeroed`` zero pages mapped in bulk."""
        if faulted:
            self.first_served.set()
        with self._lock:
            r = self.report
            r.bytes += nbytes
            r.faults += faulted
            r.prefetched += prefetched
            r.working_set += ws
            r.zeroed += zeroed
            self._note_complete()
            if self._bar is not None:
                # A fault that lost the race to a prefetch install still counts as a
                # fault; the bar shows memory present, so it stops at the total.
                step = min(nbytes, self._bar.total - self._bar.n)
                if step > 0:
                    self._bar.update(step)

    def _note_complete(self) -> None:
        """Record when every page was out, once, unless the source failed (lock held)."""
        if self._plan.done and self.report.complete is None and not self._failed:
            self.report.complete = time.monotonic() - self.t0

    def source_failed(self, err: BaseException) -> None:
        """Record the source's failure; the first one is logged and reported, later ones not."""
        with self._lock:
            first = self._failed is None
            if first:
                self._failed = f"source {self._label} failed: {err}"
        if first:
            self.error(
                f"{self._failed}; prefetch stopped, faults now fail by the "
                f"{self._fallback!r} fallback"
            )

    def error(self, message: str, *, log_it: bool = True) -> None:
        """Add ``message`` to the report's errors (and log it, by default)."""
        with self._lock:
            self.report.errors.append(message)
        if log_it:
            log.error("pid %d: %s", self.report.pid, message)

    def refused(self) -> None:
        """Count a fault refused because it is in no region of the handshake."""
        with self._lock:
            self.report.refused += 1

    def finish(self) -> None:
        """Record the session's length, the pages faults installed, close the bar (ended).

        Prefetch and the zero pass count exactly what they installed; a fault
        whose page prefetch installed first is a fault served but not a page
        installed, so the pages faults installed are what is left, at most.
        """
        r = self.report
        with self._lock:
            r.faulted = max(0, min(r.faults, r.pages - r.prefetched - r.zeroed))
            r.bytes = (r.faulted + r.prefetched + r.zeroed) * r.page_size
        self.report.elapsed = time.monotonic() - self.t0
        if self._bar is not None:
            self._bar.close()
            self._bar = None
