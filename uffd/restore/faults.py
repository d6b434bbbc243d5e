"""Serve a restored process's MISSING faults from its source: :class:`SourceOps`.

A fault's page is fetched from the source. A file answers at once and the
page is copied in (``Resolution.copy``); a page server answers later, so the
fault is deferred (``Resolution.defer()``) and resolved by
``FaultHandler.resolve`` when the reply arrives, which lets faults from
several threads be fetched at once. A fault outside the handshake's regions,
or any fault after the source failed, is refused: the FaultHandler resolves
it by its fallback policy and reports it.
"""

from __future__ import annotations

import concurrent.futures

from uffd._mapping import Fault
from uffd._ops import UffdOps
from uffd._resolution import Resolution
from uffd.restore.parts import SessionParts

__all__ = ["SourceOps"]


class SourceOps(UffdOps):
    """Serves the MISSING faults of one session's regions from its source.

    Calling context: ``handle_missing`` runs on the session handler's
    dispatch thread; replies from a page server are handled on its client's
    thread. Once the session is ending, late replies are dropped:
    ``FaultHandler.stop()`` resolves what is still deferred by the fallback.
    """

    def __init__(self, parts: SessionParts) -> None:
        self.parts = parts

    def handle_missing(self, fault: Fault) -> Resolution:
        """Fetch the faulting page: copied at once from a file, deferred from a page server."""
        layout = self.parts.layout
        flat = layout.flat(fault.address)
        if flat is None:
            return Resolution.refuse(f"{fault.address:#x} is in no region of the handshake")
        failed = self.parts.progress.fault(flat)
        if failed:
            return Resolution.refuse(failed)
        future = self.parts.source.fetch(layout.source_offset(flat), layout.page_size)
        if future.done():
            return self._count(self._answer(future))
        future.add_done_callback(lambda f: self._reply(fault, f))
        return Resolution.defer()

    def _reply(self, fault: Fault, future: concurrent.futures.Future[bytes]) -> None:
        """Resolve a deferred fault (on the page client's thread, or inline if it just finished).

        ``resolve`` also takes an answer given before the dispatch thread has
        seen the ``defer()``, so this never waits.
        """
        if self.parts.ending.is_set():
            return
        resolution = self._answer(future)
        if self.parts.handler.resolve(fault, resolution):
            self._count(resolution)

    def _answer(self, future: concurrent.futures.Future[bytes]) -> Resolution:
        """The page a completed read brought, or a refusal after recording the source's failure."""
        err = future.exception()
        if err is None:
            return Resolution.copy(future.result())
        self.parts.progress.source_failed(err)
        return Resolution.refuse(str(err))

    def _count(self, resolution: Resolution) -> Resolution:
        """Count ``resolution`` as a served fault when it installs a page; return it."""
        if resolution.kind == Resolution.COPY:
            self.parts.progress.served(self.parts.layout.page_size, faulted=1)
        return resolution
