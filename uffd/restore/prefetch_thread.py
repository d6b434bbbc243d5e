"""Install a restored process's memory in the background, ahead of its faults: :class:`Prefetch`.

Three passes on one thread per session, at the fault path's niceness but
the default time slice (a nicer thread would hold the pump's lock and the
daemon's one GIL while it waits for a time slice: :mod:`uffd.restore.priority`):

0. at once, the zero pages the snapshot knows of (a file source's holes and
   unstored pages, or the page server's stored-page map) get the zero page
   in bulk (UFFDIO_ZEROPAGE): they never cross a wire nor cost a fault once
   the pass has reached them (it starts after the session's first fault;
   a zero page the process touches before that is faulted, and fetched
   from a page server);

then, after the first fault is served (at most 50 ms later, so the
process's first access does not queue behind megabytes of prefetch):

1. the recorded working set, when there is one (REAP-style: the pages a
   previous run faulted on), in bulk;
2. adaptive chunks (:class:`uffd.restore.prefetch.AdaptivePrefetcher`, planned by
   :class:`uffd.restore.progress.Progress`) that start at 64 KiB and double
   to 4 MiB while the stream runs on, restarting just after the latest fault.

From a file, each run (contiguous chunks joined, up to 4 MiB: ``joined``) is
copied from the file's read-only mapping (its page tables populated first
with MADV_POPULATE_READ): one copy, page cache to the process. From a page
server, runs are received straight into a page-aligned ring buffer
(``inflight_bytes``, several reads in flight) and installed from there in
order; from another source (a chunk store), as the bytes it hands
back. Each install is one ``FaultHandler.install`` per registered piece:
one C call that copies it in 64 KiB UFFDIO_COPY steps without the GIL
(csrc/uffd_install.c), each step waking the threads that faulted on its
pages. Installs are best effort: a page not installed is left to its fault.
ioctl_userfaultfd(2).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import mmap
import time
from collections.abc import Container, Iterable, Iterator, Sequence
from typing import Any

from uffd._constants import Ioctl
from uffd._errors import MappingChangedError, NoMappingError, PageExistsError, UffdError
from uffd._mapping import Mapping
from uffd.restore.parts import SessionParts
from uffd.restore.priority import bulk_thread_priority
from uffd.restore.sources import FileSource, FlatSource, RemoteSource, SourceError

__all__ = ["Prefetch", "joined"]

_FIRST_FAULT_WAIT = 0.05  # seconds prefetch waits for the first fault to be served
_MAX_INFLIGHT = 32  # prefetch reads in flight to a page server (it queues 64 per client)


def joined(
    runs: Iterable[tuple[int, int]], limit: int, boundaries: Container[int] = ()
) -> Iterator[tuple[int, int]]:
    """The runs ``(offset, length)``, each joined with those that follow it contiguously,
    up to ``limit`` bytes and never across one of ``boundaries`` (where a region starts:
    the next region may lie anywhere in the process); in the same order.

    A file answers at once, so the chunks that grow after a fault (64 KiB,
    128 KiB, ... 4 MiB, all from the fault on) are installed by one call: one
    Python round per 4 MiB instead of one per chunk. Each run is taken from
    ``runs`` before the one before it is handed out.
    """
    start = length = 0
    for flat, n in runs:
        if length and flat == start + length and length + n <= limit and flat not in boundaries:
            length += n
            continue
        if length:
            yield start, length
        start, length = flat, n
    if length:
        yield start, length


class _Stop(Exception):
    """Ends the prefetch thread quietly (session ending, source failed, process gone)."""


class _Reads:
    """Prefetch reads in flight, oldest first: ``inflight`` is ``(flat, future)``."""

    def __init__(self) -> None:
        self.inflight: collections.deque[tuple[int, concurrent.futures.Future[Any]]] = (
            collections.deque()
        )

    def start(self, flat: int, offset: int, n: int) -> bool:
        """Start reading ``n`` bytes at source ``offset`` for ``flat``; False when no room."""
        raise NotImplementedError

    def data(self) -> memoryview:
        """The oldest read's bytes (its future is done), or more: see ``_RingReads``."""
        raise NotImplementedError

    def done(self) -> None:
        """What ``data()`` handed out is installed: forget its reads."""
        self.inflight.popleft()

    def drain(self, timeout: float) -> None:
        """Wait for what is still in flight (each read ends by its own timeout)."""
        for _, future in self.inflight:
            with contextlib.suppress(Exception):
                future.exception(timeout)


class _RingReads(_Reads):
    """Reads received from a page server straight into a page-aligned ring buffer.

    Reads are allocated in order and installed in the same order, so the
    space in use is one stretch, or two once it wraps round: the oldest
    read's start to the newest one's end. The ring is unmapped when the last
    view of it (the page client's too) is gone.
    """

    def __init__(self, source: RemoteSource, size: int, boundaries: Container[int]) -> None:
        super().__init__()
        self.source = source
        self.size = size
        self.boundaries = boundaries
        self._view = memoryview(mmap.mmap(-1, size))
        self._used: collections.deque[tuple[int, int]] = collections.deque()
        self._taken = 1  # reads the last data() joined

    def _alloc(self, n: int) -> int | None:
        used = self._used
        if not used:
            return 0 if n <= self.size else None
        tail = used[0][0]
        end = used[-1][0] + used[-1][1]
        if used[-1][0] < tail:  # wrapped: the free space is [end, tail)
            return end if end + n <= tail else None
        if end + n <= self.size:
            return end
        return 0 if n <= tail else None

    def start(self, flat: int, offset: int, n: int) -> bool:
        at = self._alloc(n)
        if at is None:
            return False
        future = self.source.fetch_into(offset, self._view[at : at + n], urgent=False)
        self.inflight.append((flat, future))
        self._used.append((at, n))
        return True

    def data(self) -> memoryview:
        """The oldest read's bytes joined with the reads after it that are done and follow
        it both in the ring and in the flat space, within its region: one install call for
        all of them."""
        at, n = self._used[0]
        flat = self.inflight[0][0]
        count = 1
        while count < len(self.inflight):
            next_flat, future = self.inflight[count]
            next_at, next_n = self._used[count]
            if (
                next_flat != flat + n
                or next_at != at + n
                or next_flat in self.boundaries
                or not future.done()
            ):
                break
            if future.exception() is not None:
                break  # its error is raised once it is the oldest
            n += next_n
            count += 1
        self._taken = count
        return self._view[at : at + n]

    def done(self) -> None:
        for _ in range(self._taken):
            self.inflight.popleft()
            self._used.popleft()


class _BytesReads(_Reads):
    """Reads from a source that hands back bytes, up to ``budget`` bytes in flight."""

    def __init__(self, source: FlatSource, budget: int) -> None:
        super().__init__()
        self.source = source
        self.budget = budget
        self._queued = 0
        self._sizes: collections.deque[int] = collections.deque()

    def start(self, flat: int, offset: int, n: int) -> bool:
        if self.inflight and (self._queued + n > self.budget or not self.source.remote):
            return False  # a file answers at once: one read at a time
        future = self.source.fetch(offset, n, urgent=False)
        self.inflight.append((flat, future))
        self._sizes.append(n)
        self._queued += n
        return True

    def data(self) -> memoryview:
        return memoryview(self.inflight[0][1].result())

    def done(self) -> None:
        super().done()
        self._queued -= self._sizes.popleft()


@dataclasses.dataclass(frozen=True)
class Prefetch:
    """The prefetch thread of one session: ``run()`` is its body.

    ``working_set``: source ranges ``(offset, length)`` to install next;
    ``adaptive``: then run the adaptive chunks; ``inflight_bytes``: data
    requested from a page server and not yet installed (the ring's size, at
    least two of the largest runs); ``timeout``: seconds a read may take.
    ``run()`` returns soon once the session is ending.
    """

    parts: SessionParts
    working_set: Sequence[tuple[int, int]]
    adaptive: bool
    inflight_bytes: int
    timeout: float

    def run(self) -> None:
        """Install the zero pages, the working set, then the adaptive chunks; until done.

        Never raises: an unexpected error is added to the report and ends
        prefetch; a failed source is recorded by ``Progress.source_failed``.
        """
        bulk_thread_priority()  # the fault path's short slice preempts this thread
        try:
            self._zero_pages()
            self.parts.progress.first_served.wait(_FIRST_FAULT_WAIT)
            if self.working_set:
                # What the process is about to touch: as urgent as its faults.
                self._pipeline(iter(self._working_set_runs()), ws=True)
            if self.adaptive:
                self._pipeline(self._chunks(), ws=False)
        except _Stop:
            pass
        except Exception as err:
            self.parts.progress.error(f"prefetch stopped: {type(err).__name__}: {err}")
        self.parts.progress.prefetch_ended()

    def _zero_pages(self) -> None:
        """Give the zero page to every page the source knows is zero, in bulk (a file's
        holes, a page server's map, a chunk store's all-zero chunks).

        Raises:
            _Stop: the session is ending, the process is gone.
        """
        source, layout = self.parts.source, self.parts.layout
        try:
            known = source.zero_runs()
        except SourceError as err:
            self.parts.progress.source_failed(err)
            raise _Stop from None
        zeros = [run for o, n in known for run in layout.flat_of_source(o, n)]
        # One table for the pass (a zero page is right even where the process changed its
        # mappings meanwhile) and one count at the end: a snapshot may have thousands of
        # zero runs, and faults there are fetched until the pass has passed them.
        mappings = self.parts.handler.mappings
        total = 0
        try:
            for flat, n in self._claimed(zeros):
                self._check()
                total += self._zero(flat, n, mappings)
        finally:
            if total:
                self.parts.progress.served(total, zeroed=total // layout.page_size)

    def _claimed(self, flat_runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """The parts of the flat runs not present yet, all claimed before any is installed."""
        runs: list[tuple[int, int]] = []
        for flat, n in flat_runs:
            runs.extend(self.parts.progress.claim(flat, n))
        return runs

    def _working_set_runs(self) -> list[tuple[int, int]]:
        flat_of_source = self.parts.layout.flat_of_source
        return self._claimed(run for o, n in self.working_set for run in flat_of_source(o, n))

    def _chunks(self) -> Iterator[tuple[int, int]]:
        while (chunk := self.parts.progress.next_chunk()) is not None:
            yield chunk

    def _check(self) -> None:
        """Raises _Stop once the session is ending or the source has failed."""
        if self.parts.ending.is_set() or self.parts.progress.failed:
            raise _Stop

    def _pipeline(self, runs: Iterator[tuple[int, int]], *, ws: bool) -> None:
        source = self.parts.source
        if isinstance(source, FileSource):
            self._from_file(source, runs, ws=ws)
        else:
            self._from_server(source, runs, ws=ws)

    def _served(self, installed: int, *, ws: bool) -> None:
        pages = installed // self.parts.layout.page_size
        self.parts.progress.served(installed, prefetched=pages, ws=pages if ws else 0)

    # -- from a file ---------------------------------------------------------------

    def _from_file(self, source: FileSource, runs: Iterator[tuple[int, int]], *, ws: bool) -> None:
        """Copy each run from the file's mapping; zero pages in it get the zero page.

        Raises:
            _Stop: the session is ending, the source failed, the process is gone.
        """
        layout = self.parts.layout
        starts = frozenset(layout.starts)
        for flat, n in joined(runs, self.parts.progress.max_chunk, starts):
            self._check()
            offset = layout.source_offset(flat)
            try:
                spans = source.spans(offset, n)
            except SourceError as err:
                self.parts.progress.source_failed(err)
                raise _Stop from None
            installed = 0
            for at, k, where in spans:
                here = flat + at - offset
                if where is None:
                    installed += self._zero(here, k)
                else:
                    source.populate(where, k)
                    installed += self._install(here, source.view(where, k))
            self._served(installed, ws=ws)

    # -- from a page server or a store ----------------------------------------------

    def _from_server(
        self, source: FlatSource, runs: Iterator[tuple[int, int]], *, ws: bool
    ) -> None:
        """Read runs ahead, several in flight; install each in order as it arrives.

        A page server receives into the ring (``fetch_into``); another source
        (a chunk store) hands back bytes.

        Raises:
            _Stop: the session is ending, the source failed, the process is gone.
        """
        layout = self.parts.layout
        largest = max(self.parts.progress.max_chunk, layout.page_size)
        reads: _Reads = (
            _RingReads(source, max(self.inflight_bytes, 2 * largest), frozenset(layout.starts))
            if isinstance(source, RemoteSource)
            else _BytesReads(source, self.inflight_bytes)
        )
        run: tuple[int, int] | None = None
        exhausted = False
        try:
            while True:
                while not exhausted and len(reads.inflight) < _MAX_INFLIGHT:
                    self._check()
                    if run is None:
                        run = next(runs, None)
                        if run is None:
                            exhausted = True
                            break
                    if not reads.start(run[0], layout.source_offset(run[0]), run[1]):
                        break  # no room: install the oldest first
                    run = None
                if not reads.inflight:
                    return
                flat, future = reads.inflight[0]
                try:
                    self._wait(future)
                except SourceError as err:
                    self.parts.progress.source_failed(err)
                    raise _Stop from None
                self._served(self._install(flat, reads.data()), ws=ws)
                reads.done()
        finally:
            reads.drain(self.timeout + 1)

    def _wait(self, future: concurrent.futures.Future[Any]) -> None:
        """Wait for a prefetch read, at most ``timeout``.

        Raises:
            _Stop: the session is ending.
            SourceError: the read failed or timed out.
        """
        give_up = time.monotonic() + self.timeout
        while True:
            try:
                future.result(0.1)
                return
            except concurrent.futures.TimeoutError:
                if self.parts.ending.is_set():
                    raise _Stop from None
                if time.monotonic() > give_up:
                    raise SourceError(f"no reply to a prefetch read in {self.timeout} s") from None
            except SourceError:
                raise
            except Exception as err:
                source = self.parts.source
                if isinstance(source, RemoteSource):
                    raise source.error(err) from err
                raise SourceError(f"{type(err).__name__}: {err}") from err

    # -- installing ----------------------------------------------------------------

    def _pieces(
        self, flat: int, length: int, mappings: Sequence[Mapping] | None = None
    ) -> Iterator[tuple[Mapping, int, int, int]]:
        """``(mapping, offset in it, start in the run, length)`` of the run's registered parts
        (in ``mappings``, else the handler's table now)."""
        start = self.parts.layout.address(flat)
        end = start + length
        for m in self.parts.handler.mappings if mappings is None else mappings:
            lo, hi = max(start, m.start), min(end, m.end)
            if lo < hi:
                yield m, lo - m.start, lo - start, hi - lo

    def _install(self, flat: int, data: memoryview) -> int:
        """Install ``data`` at flat offset ``flat`` where it is still registered; bytes installed.

        ``FaultHandler.install`` skips pages already present and installs
        nothing while the peer's mappings are changing (an event such as a
        balloon's REMOVE read but not applied yet), so a removed page never
        gets its old contents back; a short install leaves the rest to its
        faults. Once applied, a removed or unmapped range is gone from the
        handler's table, or answers ENOENT if it went after the table was
        read, and is skipped.

        Raises:
            _Stop: the process or the handler is gone.
        """
        handler = self.parts.handler
        installed = 0
        for m, at, start, n in self._pieces(flat, len(data)):
            with self._guard():
                # One call per piece: the C loop copies it in short steps without the GIL,
                # each waking the threads that faulted on its pages meanwhile.
                try:
                    installed += handler.install(m, at, data[start : start + n], wake=True)
                except NoMappingError as err:
                    installed += err.done  # gone meanwhile: what was installed before counts
        return installed

    def _zero(self, flat: int, length: int, mappings: Sequence[Mapping] | None = None) -> int:
        """Map the zero page over the run where it is registered and missing; bytes handled.

        A zero page cannot bring back contents a balloon removed, so this
        needs no care for pending events; pages already present are skipped.
        hugetlb has no zero page: zeros are copied there.

        Raises:
            _Stop: the process or the handler is gone.
        """
        uffd = self.parts.uffd  # the process's fd: the handler may serve one of its own too
        done = 0
        for m, at, start, n in self._pieces(flat, length, mappings):
            if not m.ioctls & Ioctl.ZEROPAGE:
                done += self._install(flat + start, memoryview(bytes(n)))
                continue
            addr, end = m.start + at, m.start + at + n
            while addr < end:
                try:
                    # Waking as it goes: no UFFDIO_WAKE of its own per run.
                    got = uffd.zeropage(addr, end - addr, wake=True)
                except PageExistsError as err:
                    done += err.done
                    addr += err.done + m.page_size  # skip the page already there
                    continue
                except (MappingChangedError, NoMappingError):
                    break  # the mappings are changing, or it went: left to faults
                except UffdError as err:
                    if err.errno in (errno.ESRCH, errno.EBADF):
                        raise _Stop from None
                    raise
                except ValueError:
                    raise _Stop from None  # the handler stopped under us
                done += got
                addr += got
        return done

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Stop when the process or the handler is gone.

        Raises:
            _Stop: the process (ESRCH) or the handler (EBADF, ValueError) is gone.
        """
        try:
            yield
        except UffdError as err:
            if err.errno in (errno.ESRCH, errno.EBADF):
                raise _Stop from None
            raise
        except ValueError:
            raise _Stop from None
