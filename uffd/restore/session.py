"""One restored process: :class:`Session` ties its userfaultfd, source, threads and report.

A session serves the userfaultfd a process handed over (Firecracker's
handshake, :mod:`uffd.restore.firecracker`) with a :class:`uffd.FaultHandler` that
owns it, registers the handshake's regions (the process registered them
MISSING already), and runs two threads: prefetch
(:mod:`uffd.restore.prefetch_thread`) and a watch that ends the session when
the process exits (a pidfd, pidfd_open(2)). Balloon: the process's
MADV_DONTNEED raises a REMOVE event; the FaultHandler unregisters the range,
so later accesses there get zero pages from the kernel, and prefetch never
installs there again. userfaultfd(2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence

from uffd import mem
from uffd._constants import Mode
from uffd._errors import UffdError
from uffd._handler import FaultHandler
from uffd._userfaultfd import Userfaultfd
from uffd.restore.faults import SourceOps
from uffd.restore.firecracker import (
    GuestRegionUffdMapping,
    PeerCred,
    userfaultfd_from_fd,
)
from uffd.restore.layout import GuestLayout
from uffd.restore.parts import SessionParts
from uffd.restore.peer_maps import registered_ranges, uncovered
from uffd.restore.prefetch_thread import Prefetch
from uffd.restore.progress import Progress
from uffd.restore.report import SessionReport
from uffd.restore.sources import FlatSource, RemoteSource

__all__ = ["RestoreOptions", "Session"]

log = logging.getLogger("uffd.restore.daemon")

_FIRST_FAULT_FIRST = 0.05  # seconds start() waits for the first fault before its slower steps
_CHECK_INTERVAL = 0.1  # seconds between looks for unknown ranges and idle connections
_NATIVE_BATCH = 0.002  # seconds the watch gathers natively served faults before it wakes


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """How sessions restore: the daemon's settings (see ``HandlerDaemon``).

    ``working_set``: source ranges ``(offset, length)`` to install first.
    """

    fallback: str = "sigbus"
    deadline: float = 2.0
    prefetch: bool = True
    working_set: tuple[tuple[int, int], ...] = ()
    inflight_bytes: int = 16 << 20
    source_timeout: float = 10.0
    progress: bool = False


def _kind(page_size: int) -> str:
    """The memory kind of guest regions of ``page_size`` pages: anon, or hugetlb for huge pages."""
    return "anon" if page_size <= mem.PAGE_SIZE else "hugetlb"


class Session:
    """One process being restored: its FaultHandler, prefetch and watch threads, its report.

    Owns ``fd`` (the process's userfaultfd) and ``pidfd`` (the process's
    pidfd from SO_PEERPIDFD, or -1: then one from pidfd_open of its pid) from
    the constructor on, even when that raises. ``after_first`` runs on the
    session's watch thread once its first fault is served (or 50 ms passed):
    work the first fault should not wait for. ``source`` is the daemon's; the session reads through
    ``source.session()``. ``on_end(session)`` runs once the session has
    ended, on the thread that ended it. ``spare`` gives a FaultHandler made
    ahead and started (the daemon's, see
    :class:`uffd.restore.warm.SpareHandler`) or None; the session adopts
    ``fd`` on it paused until its regions are registered, stops it at its
    end, and asks only once its own checks passed, so a session refused
    before then loses no spare; without one it constructs its own.

    Calling context: constructed and started on a handshake thread (``start()``
    returns once the first fault is served, or after 50 ms); ``end()``
    from any thread (the watch thread when the process exits, the daemon when
    it stops); it returns once the session has ended.

    Raises (constructor):
        HandshakeError: mixed page sizes, or ``fd`` is not an initialised
            userfaultfd.
    """

    def __init__(
        self,
        fd: int,
        mappings: Sequence[GuestRegionUffdMapping],
        cred: PeerCred,
        source: FlatSource,
        options: RestoreOptions,
        on_end: Callable[[Session], None],
        *,
        pidfd: int = -1,
        after_first: Callable[[], None] | None = None,
        spare: Callable[[], FaultHandler | None] | None = None,
    ) -> None:
        self._pidfd = pidfd
        self._after_first = after_first
        self._spare = spare
        self._prefetch: Prefetch | None = None
        try:
            self.layout = GuestLayout(mappings)
            self._ufd: Userfaultfd | None = userfaultfd_from_fd(fd)
        except BaseException:
            os.close(fd)
            if pidfd >= 0:
                os.close(pidfd)
            raise
        self.cred = cred
        self.options = options
        self._shared_source = source
        self._on_end = on_end
        report = SessionReport(
            cred.pid, cred.uid, len(mappings), self.layout.length, self.layout.page_size
        )
        self.progress = Progress(report, self.layout, label=source.label, fallback=options.fallback)
        self.source: FlatSource | None = None
        self._ops: SourceOps | None = None
        self.handler: FaultHandler | None = None
        self._lock = threading.Lock()
        self._ending = threading.Event()
        self._ended = False
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Open the session's source, serve the fd, register the regions, start the threads.

        The fault handler serves before anything else is set up: the pidfd,
        the prefetch plan and the watch thread come once the first fault is
        served (or 50 ms passed).

        Raises:
            HandshakeError: a region lies outside the source, its page size is
                not a multiple of the source's, or huge pages of a size other
                than the default.
            SourceError, UffdError, OSError: the source or the handler failed.
            ValueError: the session has ended (the daemon is stopping).
        """
        options = self.options
        ufd = self._ufd
        if ufd is None:
            raise ValueError(f"the session of pid {self.cred.pid} has ended already")
        try:
            self.source = source = self._shared_source.session()
            self.layout.check_source(source.length, source.page_size, source.label)
            kind = _kind(self.layout.page_size)
            spare = self._spare() if self._spare is not None else None
            if spare is None:
                self.handler = handler = FaultHandler(
                    uffd=ufd, fallback=options.fallback, deadline=options.deadline
                )
            else:
                # Started already: paused until the regions are published (warm.SpareHandler).
                self.handler = handler = spare
                handler._adopt_paused(ufd)
            self._ufd = None  # the handler owns and closes it now
            parts = SessionParts(handler, ufd, self.layout, source, self.progress, self._ending)
            self._ops = ops = SourceOps(parts)
            for m in self.layout.mappings:
                handler.register(
                    (m.base_host_virt_addr, m.size),
                    Mode.MISSING,
                    ops,
                    uffd=ufd,
                    registered=True,
                    kind=kind,
                    page_size=self.layout.page_size,
                )
            if options.progress:
                self.progress.show_bar(f"restore pid {self.cred.pid}")
            if spare is None:
                handler.start()
            else:
                handler._resume(ufd)
        except BaseException:
            if self.handler is not None:
                with contextlib.suppress(Exception):
                    self.handler.stop()
            self.progress.finish()
            self._close_resources()
            raise
        # Nothing more until the first fault is served (or 50 ms passed): the process
        # faults at once, and every step here (a pidfd, objects, a thread start) would
        # hold the GIL the dispatch thread needs to serve it, on a cold cache.
        self._await_first()
        if self._pidfd < 0:
            self._pidfd = _pidfd_open(self.cred.pid)
        # Always: the zero pages a source knows of are mapped even without prefetch.
        self._prefetch = Prefetch(
            parts,
            working_set=options.working_set,
            adaptive=options.prefetch,
            inflight_bytes=options.inflight_bytes,
            timeout=options.source_timeout,
        )
        self._spawn(self._watch, "uffd-session-watch")

    @property
    def report(self) -> SessionReport:
        """What the session did (complete once it has ended)."""
        return self.progress.report

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        """Start a thread of the session, unless it is ending (``end()`` joins them all)."""
        thread = threading.Thread(target=target, name=f"{name}-{self.cred.pid}", daemon=True)
        with self._lock:
            if self._ended:
                return
            self._threads.append(thread)
        thread.start()

    def _watch(self) -> None:
        """Wait for the process to exit (its pidfd), or for the session to end; then end it.

        Keeps an idle page server connection alive meanwhile, and takes in
        the ranges the process registered but left out of its handshake
        (at once, and again when faults the handler does not know of show
        up), so faults there are refused instead of woken forever.
        """
        if self._prefetch is not None:
            self._spawn(self._prefetch.run, "uffd-prefetch")
        if self._after_first is not None:
            self._after_first()
        poller = select.poll()
        if self._pidfd >= 0:
            poller.register(self._pidfd, select.POLLIN)
        link = self._ops.link if self._ops is not None else None
        if link is not None:
            poller.register(link.notify_fd, select.POLLIN)
        orphans = self._take_unknown_ranges(-1)
        checked = 0.0
        while not self._ending.is_set():
            if time.monotonic() - checked >= _CHECK_INTERVAL:
                checked = time.monotonic()
                orphans = self._take_unknown_ranges(orphans)
                source = self.source
                if isinstance(source, RemoteSource) and source.idle:
                    with contextlib.suppress(Exception):
                        source.keepalive()
                if self._ops is not None:
                    self._ops.keepalive()
            if self._pidfd >= 0:
                if any(fd == self._pidfd for fd, _ in poller.poll(100)):
                    break
            elif not _pid_alive(self.cred.pid):
                break
            else:
                self._ending.wait(0.1)
            if link is not None and self._take_native():
                poller.unregister(link.notify_fd)
                link = None
            if link is not None:
                self._ending.wait(_NATIVE_BATCH)  # wake at most this often for native faults
        self.end()

    def _await_first(self) -> None:
        """Wait up to 50 ms for the first fault to be served (by Python or the pump)."""
        until = time.monotonic() + _FIRST_FAULT_FIRST
        served = self.progress.first_served
        while not served.is_set() and (left := until - time.monotonic()) > 0:
            link = self._ops.link if self._ops is not None else None
            if link is None:
                served.wait(left)
            elif select.select([link.notify_fd], [], [], min(left, _NATIVE_BATCH))[0]:
                self._take_native()

    def _take_native(self) -> bool:
        """Hand the faults the pump served to progress; True once its fault link died."""
        why = self._ops.take_native() if self._ops is not None else None
        if why is None:
            return False
        if not self._ending.is_set():
            log.warning(
                "pid %d: the pump stopped serving faults from %s (%s); they take the Python path",
                self.cred.pid,
                self.source.label if self.source is not None else "the source",
                why,
            )
        return True

    def _take_unknown_ranges(self, seen: int) -> int:
        """Register the process's MISSING ranges that no handshake region covers, with the
        session's ops (which refuse faults outside the regions). Looks when the handler's
        count of faults on unknown addresses (woken) has moved past ``seen``, or when
        ``seen`` is -1; returns that count."""
        handler, ops = self.handler, self._ops
        if handler is None or ops is None:
            return seen
        woken = handler.stats.total.resolutions["wake"]
        if seen >= 0 and woken <= seen:
            return woken
        try:
            found = registered_ranges(self.cred.pid)
        except OSError:
            return woken
        covered = [(m.start, m.end) for m in handler.mappings]
        for peer in found:
            for start, end in uncovered(peer, covered):
                try:
                    handler.register(
                        (start, end - start),
                        Mode.MISSING,
                        ops,
                        uffd=ops.parts.uffd,
                        registered=True,
                        kind=peer.kind,
                        page_size=peer.page_size,
                    )
                except (ValueError, UffdError) as err:
                    log.debug("pid %d: not serving %#x-%#x: %s", self.cred.pid, start, end, err)
                else:
                    log.warning(
                        "pid %d registered %#x-%#x but left it out of its handshake: faults "
                        "there are refused and take the fallback",
                        self.cred.pid,
                        start,
                        end,
                    )
        return woken

    def end(self) -> None:
        """Stop serving (idempotent): join the threads, stop the handler, report to ``on_end``."""
        with self._lock:
            ending, self._ended = self._ended, True
            threads = list(self._threads)
        if ending:
            # Another thread is ending the session: wait for it unless it is ours.
            if threading.current_thread() not in threads:
                self._finished.wait(30.0)
            return
        self._ending.set()
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(10.0)
        if self.handler is not None:
            try:
                self.handler.stop()
            except Exception as err:
                self.progress.error(
                    f"fault handler: {type(err).__name__}: {err}",
                    log_it=self.progress.failed is None,
                )
            latency = self.handler.stats.total.latency.copy()
            if self._ops is not None:
                self._ops.take_native()  # the last faults the pump served
                latency.merge(self._ops.native_latency)
            self.report.fault_p50_us = float(latency.percentile(50))
            self.report.fault_p99_us = float(latency.percentile(99))
        self._close_resources()
        self.progress.finish()
        self._on_end(self)
        self._finished.set()

    def _close_resources(self) -> None:
        if self._ops is not None:
            self._ops.close()  # the handler has stopped: the pump reads the link no more
        if self._ufd is not None:
            self._ufd.close()
            self._ufd = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self.source is not None and self.source is not self._shared_source:
            self.source.close()

    def faulted_source_offsets(self) -> list[int]:
        """Source offsets (bytes) of the pages this session faulted on."""
        return [self.layout.source_offset(flat) for flat in self.progress.faulted_pages()]


def _pidfd_open(pid: int) -> int:
    """A pidfd for ``pid``, or -1 where pidfd_open(2) is missing (Linux < 5.3) or fails."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists (kill(2) with signal 0; EPERM means it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
