"""Serve a restored process's MISSING faults from its source: :class:`SourceOps`.

A fault's page comes from the source. A file answers at once: the page is
copied in from the file's read-only mapping (``Resolution.copy`` of a view:
one UFFDIO_COPY from the page cache), and a page the snapshot stores as zero
gets the zero page. A page server's page is received into a page
buffer on the dispatch thread itself, over the session's fault-only
connection (:mod:`uffd.restore.urgent`: no thread hop per fault). When that
connection is busy or broken, the fault is deferred (``Resolution.defer()``)
and resolved by ``FaultHandler.resolve`` when the first connection's reply
arrives. Any other source (a chunk
store) hands back a future of bytes, used the same way. A fault outside the
handshake's regions, or any fault after the source failed, is refused: the
FaultHandler resolves it by its fallback policy and reports it.

Over plain TCP the fault-only connection is handed to the C pump instead
(``native_source``: ``uffd._pump.RemoteLink``), which sends the READ and
installs the reply without Python or the GIL. A raw memory file is served by
the pump too, copying from the file's mapping (a "memory" source noted on a
socketless ``RemoteLink.notes()``); a snapshot file stays here, where its
chunks are checksummed. The faults the pump serves reach the session's
progress afterwards (``take_native``, off the latency path); when the link
dies, or is killed because the source failed, the pump stops serving and the
faults come here as above.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time

from uffd._histogram import LatencyHistogram
from uffd._mapping import Fault, Mapping
from uffd._ops import UffdOps
from uffd._pump import NativeSource, RemoteLink
from uffd._resolution import Resolution
from uffd.restore.parts import SessionParts
from uffd.restore.sources import FileSource, FlatSource, RemoteSource, SourceError

__all__ = ["SourceOps"]

log = logging.getLogger("uffd.restore.daemon")

_KEEPALIVE = 10.0  # seconds without a fault before the fault link reads a page to stay open


class SourceOps(UffdOps):
    """Serves the MISSING faults of one session's regions from its source.

    Calling context: ``handle_missing`` runs on the session handler's
    dispatch thread; replies from a page server are handled on its client's
    thread. Once the session is ending, late replies are dropped:
    ``FaultHandler.stop()`` resolves what is still deferred by the fallback.
    """

    def __init__(self, parts: SessionParts) -> None:
        self.parts = parts
        # Half the deadline: a server that stopped answering leaves the other half to the
        # deferred path, and the dispatch thread is back to serve the next fault.
        self._sync_timeout = parts.handler.deadline / 2
        self._region_ids: dict[str, int] = {}
        self.link = self._hand_to_pump(parts.source)
        self._link_used = time.monotonic()  # the last fault or keepalive seen on the link
        # The pump's faults: the handler's stats have only those Python served.
        self.native_latency = LatencyHistogram()

    def _hand_to_pump(self, source: object) -> RemoteLink | None:
        """The page server's fault-only connection, handed to the pump, or a file's ring of
        served faults; None without one."""
        if isinstance(source, FileSource):
            try:
                return RemoteLink.notes()
            except OSError as err:
                log.debug("file faults take the Python path: %s", err)
                return None
        urgent = source.urgent_link if isinstance(source, RemoteSource) else None
        handed = urgent.hand_over() if urgent is not None else None
        if handed is None:
            return None
        fd, version, max_frame, self._region_ids = handed
        try:
            return RemoteLink(fd, version, max_frame)
        except OSError as err:
            os.close(fd)
            log.debug("faults take the Python path: %s", err)
            return None

    def native_source(self, mapping: Mapping) -> NativeSource | None:
        """The pump serves ``mapping``'s faults over the fault link, or from a raw file's
        mapping, when one region of the source holds it whole; None otherwise (no link, a
        snapshot file, moved, or across two regions)."""
        link, source, layout = self.link, self.parts.source, self.parts.layout
        if link is None:
            return None
        first = layout.flat(mapping.start)
        last = layout.flat(mapping.end - layout.page_size)
        if first is None or last is None or last - first != mapping.length - layout.page_size:
            return None  # not within one handshake region
        if isinstance(source, FileSource):
            address = source.native_address(layout.source_offset(first), mapping.length)
            if address is None:
                return None
            return NativeSource("memory", address=address - mapping.origin, link=link)
        if not isinstance(source, RemoteSource):
            return None
        where = source.region_at(layout.source_offset(first), mapping.length)
        if where is None or where[1] < mapping.origin:
            return None
        name, inside = where
        return NativeSource(
            "remote",
            link=link,
            region=self._region_ids[name],
            offset=inside - mapping.origin,
            timeout=self._sync_timeout,
        )

    def take_native(self) -> str | None:
        """Give the session's progress the faults the pump served since the last call (the
        prefetch steers by them). Kills the link once the source failed (faults are then
        refused here). Returns why the link died, once (the link is closed then), or None."""
        link = self.link
        if link is None:
            return None
        progress, layout = self.parts.progress, self.parts.layout
        served, lost = link.take()
        if served or lost:
            self._link_used = time.monotonic()
        for i in range(0, len(served), 2):
            flat = layout.flat(served[i])
            if flat is not None:
                progress.fault(flat)
            progress.fault_served()
            self.native_latency.record(served[i + 1] // 1000)
        for _ in range(lost):
            progress.fault_served()
        if progress.failed:
            link.kill()
        why = link.dead
        if why is not None:
            self.link = None
            link.close()
        return why

    def keepalive(self) -> None:
        """Read one page over the fault link when it has been idle for 10 s (the server drops a
        client idle for 30 s); a fault meanwhile finds the link busy and takes the Python path."""
        link, source = self.link, self.parts.source
        if link is None or not isinstance(source, RemoteSource):
            return
        if time.monotonic() - self._link_used < _KEEPALIVE:
            return
        self._link_used = time.monotonic()
        where = source.region_at(0, source.page_size)
        if where is not None:
            name, inside = where
            page = bytearray(source.page_size)
            link.read(self._region_ids[name], inside, page, self._sync_timeout)

    def close(self) -> None:
        """Close the fault link (after the handler stopped: the pump may read it until then)."""
        link, self.link = self.link, None
        if link is not None:
            link.close()

    def handle_missing(self, fault: Fault) -> Resolution:
        """The faulting page: from the file at once, or deferred to a page server's reply."""
        layout = self.parts.layout
        flat = layout.flat(fault.address)
        if flat is None:
            # Registered by the peer but not in its handshake: refused (the fallback
            # answers it), counted; never woken to fault again and again.
            self.parts.progress.refused()
            return Resolution.refuse(f"{fault.address:#x} is in no region of the handshake")
        failed = self.parts.progress.fault(flat)
        if failed:
            return Resolution.refuse(failed)
        source = self.parts.source
        offset = layout.source_offset(flat)
        if isinstance(source, FileSource):
            return self._count(self._from_file(source, offset, layout.page_size))
        if isinstance(source, RemoteSource):
            return self._from_server(source, fault, offset, layout.page_size)
        return self._from_future(source, fault, offset, layout.page_size)

    def _from_file(self, source: FileSource, offset: int, size: int) -> Resolution:
        """The page at ``offset`` of a file: a view of its mapping, or the zero page."""
        try:
            spans = source.spans(offset, size)
        except SourceError as err:
            return self._failed(err)
        if all(where is None for _, _, where in spans):
            return Resolution.zero()
        if len(spans) == 1 and spans[0][2] is not None:
            return Resolution.copy(source.view(spans[0][2], size))
        # A huge page partly stored, partly zero: assembled.
        try:
            return Resolution.copy(source.read(offset, size))
        except SourceError as err:
            return self._failed(err)

    def _from_server(
        self, source: RemoteSource, fault: Fault, offset: int, size: int
    ) -> Resolution:
        """Receive the page into a buffer of its own: on this thread over the faults' own
        connection, else (it is busy or broken) deferred to the first connection's reply."""
        # A buffer per fault: an install retried later (EAGAIN) still holds its page.
        page = memoryview(bytearray(size))
        if source.read_now(offset, page, self._sync_timeout):
            return self._count(Resolution.copy(page))
        future = source.fetch_into(offset, page, urgent=True)
        future.add_done_callback(lambda f: self._reply(source, fault, f, page))
        return Resolution.defer()

    def _reply(
        self,
        source: RemoteSource,
        fault: Fault,
        future: concurrent.futures.Future[int],
        page: memoryview,
    ) -> None:
        """Resolve a deferred fault (on the page client's thread, or inline if it just finished)."""
        if not self.parts.ending.is_set():
            err = future.exception()
            self._resolve(
                fault, Resolution.copy(page) if err is None else self._failed(source.error(err))
            )

    def _from_future(self, source: FlatSource, fault: Fault, offset: int, size: int) -> Resolution:
        """A source that hands back a future of bytes: answered now if done, else deferred."""
        future = source.fetch(offset, size)
        if future.done():
            return self._count(self._bytes(future))
        future.add_done_callback(
            lambda f: None if self.parts.ending.is_set() else self._resolve(fault, self._bytes(f))
        )
        return Resolution.defer()

    def _bytes(self, future: concurrent.futures.Future[bytes]) -> Resolution:
        """The page a completed read brought, or a refusal after recording the source's failure."""
        err = future.exception()
        return Resolution.copy(future.result()) if err is None else self._failed(err)

    def _resolve(self, fault: Fault, resolution: Resolution) -> None:
        """Answer a deferred fault; ``resolve`` also takes an answer given before the
        dispatch thread has seen the ``defer()``, so this never waits. Late replies (the
        session is ending) are dropped by the callers: ``stop()`` resolves those faults."""
        if self.parts.handler.resolve(fault, resolution):
            self._count(resolution)

    def _failed(self, err: BaseException) -> Resolution:
        """Record the source's failure; the refusal that sends the fault to the fallback."""
        self.parts.progress.source_failed(err)
        link = self.link
        if link is not None:
            link.kill()  # the pump serves nothing more: later faults are refused here too
        return Resolution.refuse(str(err))

    def _count(self, resolution: Resolution) -> Resolution:
        """Count ``resolution`` as a served fault when it installs a page; return it."""
        if resolution.kind in (Resolution.COPY, Resolution.ZERO):
            self.parts.progress.fault_served()
        return resolution
