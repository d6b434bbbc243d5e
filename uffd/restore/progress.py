"""One session's tally: its report, prefetch plan, faulted pages and failure.

The fault path (the FaultHandler's dispatch thread, and the page clients'
threads for deferred faults) and the prefetch thread both update it;
:class:`Progress` is the only place their shared state lives. The fault
path takes no lock: it appends the fault to a queue and bumps counters
(atomic under the GIL), and the prefetch thread, which could be
preempted holding a lock, applies the queue to the
plan under its lock before it plans. Errors are logged on the
``uffd.restore.daemon`` logger.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
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
        self._layout = layout
        # Made by the first caller that needs it (lock held), after the first fault:
        # a page table of the whole image costs that fault ~70 us on a cold cache.
        self._plan_made: AdaptivePrefetcher | None = None
        self._page_size = layout.page_size
        self._faulted_pages: set[int] = set()
        # The fault path's side, lock-free: faults not applied to the plan yet, and
        # counters whose next() is atomic (the value is the number of calls before).
        self._fault_queue: collections.deque[int] = collections.deque()
        self._faults_served = itertools.count()
        self._faults_refused = itertools.count()
        self._prefetching = True
        self._failed: str | None = None
        self._bar: Any = None

    @property
    def _plan(self) -> AdaptivePrefetcher:
        """The prefetch plan: what is present, what comes next (lock held)."""
        if self._plan_made is None:
            layout = self._layout
            self._plan_made = AdaptivePrefetcher(
                layout.length,
                page_size=layout.page_size,
                min_chunk=max(MIN_CHUNK, layout.page_size),
                max_chunk=self.max_chunk,
                boundaries=layout.starts,
            )
        return self._plan_made

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
        """Record a fault at flat offset ``flat``; prefetch steers there when it next plans.

        Returns why the source failed (the fault must be refused), or None.
        Takes no lock.
        """
        if self.report.first_fault is None:
            self.report.first_fault = time.monotonic() - self.t0
        self._fault_queue.append(flat)
        return self._failed

    def fault_served(self) -> None:
        """Count a fault served with a page.

        Takes no lock while the prefetch thread runs; once it has ended
        (prefetch off, or done) nobody else holds the lock, and the fault
        notes completion itself: every page present.
        """
        next(self._faults_served)
        if not self.first_served.is_set():
            self.first_served.set()
        if not self._prefetching:
            with self._lock:
                self._apply_faults()
                self._note_complete()

    def refused(self) -> None:
        """Count a fault refused because it is in no region of the handshake (no lock)."""
        next(self._faults_refused)

    def _apply_faults(self) -> None:
        """Apply the queued faults to the plan and the faulted pages (lock held)."""
        queue = self._fault_queue
        while queue:
            flat = queue.popleft()
            self._faulted_pages.add(flat // self._page_size)
            self._plan.on_fault(flat)
            if self._bar is not None and self._bar.n < self._bar.total:
                self._bar.update(min(self._page_size, self._bar.total - self._bar.n))

    def faulted_pages(self) -> list[int]:
        """Flat offsets of the pages faulted on, sorted."""
        with self._lock:
            self._apply_faults()
            pages = sorted(self._faulted_pages)
        return [p * self._page_size for p in pages]

    # -- prefetch ------------------------------------------------------------------

    def claim(self, flat: int, length: int) -> list[tuple[int, int]]:
        """The runs ``(flat, length)`` of the range not yet present, now marked present."""
        with self._lock:
            self._apply_faults()
            runs = self._plan.missing_runs(flat, length)
            for start, n in runs:
                self._plan.mark_present(start, n)
        return runs

    def next_chunk(self) -> tuple[int, int] | None:
        """The next adaptive chunk ``(flat, length)`` to install, or None when all are out."""
        with self._lock:
            self._apply_faults()
            return self._plan.next_chunk()

    def prefetch_ended(self) -> None:
        """Called by the prefetch thread as it ends: note completion if every page is out."""
        with self._lock:
            self._prefetching = False
            self._apply_faults()
            self._note_complete()

    # -- accounting ----------------------------------------------------------------

    def served(self, nbytes: int, *, prefetched: int = 0, ws: int = 0, zeroed: int = 0) -> None:
        """Count ``nbytes`` installed by prefetch: ``prefetched`` pages (``ws`` of them from
        the working set), ``zeroed`` zero pages mapped in bulk."""
        with self._lock:
            self._apply_faults()
            r = self.report
            r.bytes += nbytes
            r.prefetched += prefetched
            r.working_set += ws
            r.zeroed += zeroed
            self._note_complete()
            if self._bar is not None:
                # The bar shows memory present: it stops at the total.
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

    def finish(self) -> None:
        """Record the session's length, the pages faults installed, close the bar (ended).

        Prefetch and the zero pass count exactly what they installed; a fault
        whose page prefetch installed first is a fault served but not a page
        installed, so the pages faults installed are what is left, at most.
        """
        r = self.report
        with self._lock:
            self._apply_faults()
            r.faults = next(self._faults_served)
            r.refused = next(self._faults_refused)
            r.faulted = max(0, min(r.faults, r.pages - r.prefetched - r.zeroed))
            r.bytes = (r.faulted + r.prefetched + r.zeroed) * r.page_size
        self.report.elapsed = time.monotonic() - self.t0
        if self._bar is not None:
            self._bar.close()
            self._bar = None
