"""Install a restored process's memory in the background, ahead of its faults: :class:`Prefetch`.

Two passes on one thread per session, after the first fault is served (at
most 50 ms later, so the process's first access does not queue behind
megabytes of prefetch):

1. the recorded working set, when there is one (REAP-style: the pages a
   previous run faulted on), in bulk;
2. adaptive chunks (:class:`uffd.restore.prefetch.AdaptivePrefetcher`, planned by
   :class:`uffd.restore.progress.Progress`) that start at 64 KiB and double
   to 4 MiB while the stream runs on, restarting just after the latest fault.

Reads are pipelined (several in flight to a page server); each run is one
``FaultHandler.install`` (UFFDIO_COPY with DONTWAKE) per registered piece and
one UFFDIO_WAKE. Installs are best effort: a page not installed is left to
its fault. ioctl_userfaultfd(2).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import time
from collections.abc import Iterator, Sequence

from uffd._errors import NoMappingError, UffdError
from uffd.restore.parts import SessionParts
from uffd.restore.sources import SourceError

__all__ = ["Prefetch"]

_FIRST_FAULT_WAIT = 0.05  # seconds prefetch waits for the first fault to be served
_MAX_INFLIGHT = 32  # prefetch reads in flight to a page server (it queues 64 per client)


class _Stop(Exception):
    """Ends the prefetch thread quietly (session ending, source failed, process gone)."""


@dataclasses.dataclass(frozen=True)
class Prefetch:
    """The prefetch thread of one session: ``run()`` is its body.

    ``working_set``: source ranges ``(offset, length)`` to install first;
    ``adaptive``: then run the adaptive chunks; ``inflight_bytes``: data
    requested from a page server and not yet received; ``timeout``: seconds
    a read may take. ``run()`` returns soon once the session is ending.
    """

    parts: SessionParts
    working_set: Sequence[tuple[int, int]]
    adaptive: bool
    inflight_bytes: int
    timeout: float

    def run(self) -> None:
        """Install the working set, then the adaptive chunks, until done or the session ends.

        Never raises: an unexpected error is added to the report and ends
        prefetch; a failed source is recorded by ``Progress.source_failed``.
        """
        self.parts.progress.first_served.wait(_FIRST_FAULT_WAIT)
        try:
            if self.working_set:
                self._pipeline(iter(self._working_set_runs()), ws=True)
            if self.adaptive:
                self._pipeline(self._chunks(), ws=False)
        except _Stop:
            pass
        except Exception as err:
            self.parts.progress.error(f"prefetch stopped: {type(err).__name__}: {err}")
        self.parts.progress.prefetch_ended()

    def _working_set_runs(self) -> list[tuple[int, int]]:
        """The flat runs of the working set not present yet, all claimed before any is read."""
        runs: list[tuple[int, int]] = []
        for offset, length in self.working_set:
            for flat, n in self.parts.layout.flat_of_source(offset, length):
                runs.extend(self.parts.progress.claim(flat, n))
        return runs

    def _chunks(self) -> Iterator[tuple[int, int]]:
        while (chunk := self.parts.progress.next_chunk()) is not None:
            yield chunk

    def _pipeline(self, runs: Iterator[tuple[int, int]], *, ws: bool) -> None:
        """Fetch runs (session flat ranges), several in flight; install each in order.

        Raises:
            _Stop: the session is ending, the source failed, the process is gone.
        """
        source = self.parts.source
        remote = source.remote
        inflight: collections.deque[tuple[int, int, concurrent.futures.Future[bytes]]] = (
            collections.deque()
        )
        queued = 0
        exhausted = False
        while True:
            # Keep the page server busy: up to ``inflight_bytes`` (and _MAX_INFLIGHT
            # reads) in flight, so small chunks after a fault do not idle the link.
            while (
                not exhausted
                and (not inflight or remote)
                and queued < self.inflight_bytes
                and len(inflight) < _MAX_INFLIGHT
            ):
                if self.parts.ending.is_set() or self.parts.progress.failed:
                    raise _Stop
                try:
                    flat, n = next(runs)
                except StopIteration:
                    exhausted = True
                    break
                offset = self.parts.layout.source_offset(flat)
                inflight.append((flat, n, source.fetch(offset, n, urgent=False)))
                queued += n
            if not inflight:
                return
            flat, n, future = inflight.popleft()
            queued -= n
            try:
                data = self._wait(future)
            except SourceError as err:
                self.parts.progress.source_failed(err)
                raise _Stop from None
            installed = self._install(flat, data)
            pages = installed // self.parts.layout.page_size
            self.parts.progress.served(installed, prefetched=pages, ws=pages if ws else 0)

    def _wait(self, future: concurrent.futures.Future[bytes]) -> bytes:
        """The bytes of a prefetch read, waiting at most ``timeout``.

        Raises:
            _Stop: the session is ending.
            SourceError: the read failed or timed out.
        """
        give_up = time.monotonic() + self.timeout
        while True:
            try:
                return future.result(0.1)
            except concurrent.futures.TimeoutError:
                if self.parts.ending.is_set():
                    raise _Stop from None
                if time.monotonic() > give_up:
                    raise SourceError(f"no reply to a prefetch read in {self.timeout} s") from None
            except SourceError:
                raise
            except Exception as err:
                raise SourceError(f"{type(err).__name__}: {err}") from err

    def _install(self, flat: int, data: bytes) -> int:
        """Install ``data`` at flat offset ``flat`` where it is still registered; bytes installed.

        ``FaultHandler.install`` skips pages already present and installs
        nothing while the peer's mappings are changing (an event such as a
        balloon's REMOVE read but not applied yet), so a removed page never
        gets its old contents back; a short install leaves the rest to its
        faults. Once applied, a removed or unmapped range is gone from the
        handler's table, or answers ENOENT if it went after the table was
        read, and is skipped. One UFFDIO_WAKE per piece installed.

        Raises:
            _Stop: the process or the handler is gone.
        """
        handler = self.parts.handler
        start = self.parts.layout.address(flat)
        end = start + len(data)
        view = memoryview(data)
        installed = 0
        for m in handler.mappings:
            lo, hi = max(start, m.start), min(end, m.end)
            if lo >= hi:
                continue
            try:
                done = handler.install(m, lo - m.start, view[lo - start : hi - start])
            except NoMappingError:
                continue
            except UffdError as err:
                if err.errno in (errno.ESRCH, errno.EBADF):
                    raise _Stop from None  # the process (or the handler) is gone
                raise
            except ValueError:
                raise _Stop from None  # the handler stopped under us
            if done:
                with contextlib.suppress(UffdError, ValueError):
                    handler.wake(m, lo - m.start, hi - lo)
            installed += done
        return installed
