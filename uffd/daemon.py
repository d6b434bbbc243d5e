"""The UFFD handler daemon: lazy restore of other processes' memory, Firecracker style.

A process (Firecracker, or anything that speaks its handshake: see
:mod:`uffd.firecracker`) maps its memory, opens a userfaultfd, registers the
memory MISSING, connects to the daemon's Unix socket and sends one message:
a JSON list of regions and, as SCM_RIGHTS, the userfaultfd. The daemon checks
the peer (SO_PEERCRED: the daemon's own uid or root by default, or the
``allow_uids`` given), adopts the fd into a :class:`uffd.FaultHandler` and
serves the process's faults from the source, while a background thread
installs the rest of its memory:

1. the recorded working set, when there is one (REAP-style: the pages a
   previous run faulted on, from ``SNAPSHOT.ws.json``), in bulk;
2. then adaptive chunks (:class:`uffd.prefetch.AdaptivePrefetcher`) that
   start at 64 KiB and double to 4 MiB while the stream runs on, restarting
   just after the latest fault. Each chunk is one UFFDIO_COPY with DONTWAKE
   and one UFFDIO_WAKE.

Prefetch starts once the first fault is served (at most 50 ms later), so
the process's first access does not queue behind megabytes of prefetch.

The source is a snapshot or raw memory file (:func:`uffd.snapshot.open_source`,
read on the fault-handler thread) or a page server (``tcp://HOST:PORT``,
:class:`uffd.client.ThreadedPageClient`, one connection per session; faults
return ``Resolution.defer()`` and are resolved when the reply arrives, so
faults from several threads are fetched at once). The source is seen as one
flat image, its regions laid end to end in order; a handshake ``offset`` is
a position in that image (for Firecracker's raw memory file, the file
offset). The regions are expected to stay where the handshake put them
(Firecracker never mremaps guest memory); a fault outside them is refused
and resolved by the fallback.

Balloon: the peer's MADV_DONTNEED raises a REMOVE event; the FaultHandler
unregisters the range, so later accesses there get zero pages from the
kernel, and the prefetcher skips it (it installs only inside ranges still
registered). One window remains: a prefetch copy issued between the moment
the FaultHandler's pump reads the REMOVE and the moment its table drops the
range can land old contents in the removed range; closing it needs the
FaultHandler to serialise ``install()`` with event processing.

Failures never hang the peer: when the source fails (the page server dies,
a read times out), the error is logged once, prefetch stops, and every fault
from then on is resolved by the fallback policy ("sigbus": a poison marker
where the peer negotiated UFFD_FEATURE_POISON, else a zero page; or "zero").
A session ends when its process exits (a pidfd from SO_PEERCRED); the daemon
then writes the working set (the union of the pages faulted on and the one it
loaded) and prints a summary line, or closes its progress bar (tqdm, when
installed and stderr is a terminal).

``python -m uffd handler --socket PATH --source SRC`` runs it (see
``--help``); exit codes: 0 after SIGINT/SIGTERM (or, with ``--once``, after a
clean session), 1 a runtime error (the source cannot be opened, the socket
cannot be bound, a ``--once`` session with errors), 2 a usage error.

References: userfaultfd(2), ioctl_userfaultfd(2), unix(7) (SCM_RIGHTS,
SO_PEERCRED), pidfd_open(2).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import json
import logging
import os
import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from uffd._constants import Mode
from uffd._errors import NoMappingError, UffdError
from uffd._handler import Fault, FaultHandler, Mapping
from uffd._ops import UffdOps
from uffd._resolution import Resolution
from uffd.firecracker import (
    GuestRegionUffdMapping,
    HandshakeError,
    PeerCred,
    recv_handshake,
    userfaultfd_from_fd,
)
from uffd.prefetch import (
    MAX_CHUNK,
    MIN_CHUNK,
    AdaptivePrefetcher,
    WorkingSet,
    WorkingSetError,
    working_set_path,
)

__all__ = [
    "FileSource",
    "HandlerDaemon",
    "RemoteSource",
    "SessionReport",
    "SourceError",
    "add_cli",
    "main",
    "open_flat_source",
]

log = logging.getLogger("uffd.daemon")

_PAGE = os.sysconf("SC_PAGE_SIZE")
_INSTALL_RETRIES = 8
_KEEPALIVE = 10.0  # seconds: well inside the page server's default 30 s idle timeout
_FIRST_FAULT_WAIT = 0.05  # seconds prefetch waits for the first fault to be served
_MAX_INFLIGHT = 32  # prefetch reads in flight to a page server (it queues 64 per client)


class SourceError(ConnectionError):
    """The page source failed (a dead page server, a timed-out or refused read)."""


# -- sources: one flat image over the regions of a snapshot or a page server ---


class _FlatLayout:
    """Regions laid end to end: flat offset <-> (region name, offset in it)."""

    def __init__(self, regions: Sequence[tuple[str, int]]) -> None:
        self.names = [name for name, _ in regions]
        self.starts: list[int] = []
        total = 0
        for _, length in regions:
            self.starts.append(total)
            total += length
        self.lengths = [length for _, length in regions]
        self.length = total

    def pieces(self, offset: int, length: int) -> list[tuple[str, int, int]]:
        """``(name, offset in region, length)`` pieces covering the flat range."""
        if offset < 0 or offset + length > self.length:
            raise ValueError(
                f"[{offset}, +{length}) is outside the source image of {self.length} bytes"
            )
        out = []
        i = bisect.bisect_right(self.starts, offset) - 1
        while length > 0:
            inside = offset - self.starts[i]
            n = min(length, self.lengths[i] - inside)
            if n > 0:
                out.append((self.names[i], inside, n))
                offset += n
                length -= n
            i += 1
        return out


class FileSource:
    """A snapshot or raw memory file as a flat image; reads are synchronous (pread)."""

    remote = False

    def __init__(self, path: str) -> None:
        from uffd.snapshot import open_source

        self.path = path
        self.label = path
        self._reader = open_source(path)
        self.page_size = self._reader.page_size
        self._layout = _FlatLayout([(r.name, r.length) for r in self._reader.regions])
        self.length = self._layout.length

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of the flat range (absent pages are zeros).

        Raises:
            SourceError: the file could not be read (I/O error, checksum).
        """
        try:
            parts = [self._reader.read(n, o, k) for n, o, k in self._layout.pieces(offset, length)]
        except (OSError, ValueError) as err:
            raise SourceError(f"{self.path}: {err}") from err
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def fetch(
        self, offset: int, length: int, *, urgent: bool = True
    ) -> concurrent.futures.Future[bytes]:
        """``read`` as an already completed future (the interface RemoteSource has)."""
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        try:
            future.set_result(self.read(offset, length))
        except SourceError as err:
            future.set_exception(err)
        return future

    def session(self) -> FileSource:
        """The object one session reads through (the file is shared: pread is thread-safe)."""
        return self

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._reader.close()


class RemoteSource:
    """A page server as a flat image.

    Faults and prefetch use two connections (``session()`` opens both), so a
    faulting thread's one-page read never queues behind megabytes of prefetch
    data already in flight on the same TCP stream. ``fetch`` returns a
    future; ``read`` waits for it (at most ``timeout``).
    """

    remote = True

    def __init__(
        self, url: str, *, token: bytes | None = None, timeout: float = 10.0, bulk: bool = False
    ) -> None:
        self.url = url
        self.label = url
        self.token = token
        self.timeout = timeout
        self._clients = [self._connect()]
        if bulk:
            try:
                self._clients.append(self._connect())
            except BaseException:
                self.close()
                raise
        self.created = time.monotonic()
        self.last_used = self.created
        first = self._clients[0]
        self.page_size = first.page_size
        self._layout = _FlatLayout([(r.name, r.length) for r in first.regions])
        self.length = self._layout.length

    def _connect(self) -> Any:
        from uffd.client import ThreadedPageClient

        try:
            return ThreadedPageClient(self.url, token=self.token, request_timeout=self.timeout)
        except Exception as err:
            raise SourceError(f"page server {self.url}: {err}") from err

    def session(self) -> RemoteSource:
        """New connections to the same server for one session: faults and prefetch apart."""
        return RemoteSource(self.url, token=self.token, timeout=self.timeout, bulk=True)

    def fetch(
        self, offset: int, length: int, *, urgent: bool = True
    ) -> concurrent.futures.Future[bytes]:
        """Start reading the flat range; the future gets the bytes or a SourceError."""
        client = self._clients[0 if urgent else -1]
        self.last_used = time.monotonic()
        pieces = self._layout.pieces(offset, length)
        futures = [client.fetch(n, o, k, urgent=urgent) for n, o, k in pieces]
        out: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        left = [len(futures)]
        lock = threading.Lock()

        def done(_: concurrent.futures.Future[bytes]) -> None:
            with lock:
                left[0] -= 1
                if left[0] or out.done():
                    return
            try:
                data = b"".join(f.result() for f in futures)
            except BaseException as err:
                out.set_exception(
                    SourceError(f"page server {self.url}: {type(err).__name__}: {err}")
                )
            else:
                out.set_result(data)

        for f in futures:
            f.add_done_callback(done)
        return out

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of the flat range, waiting at most ``timeout``.

        Raises:
            SourceError: the server failed, refused or did not answer in time.
        """
        try:
            return self.fetch(offset, length).result(self.timeout)
        except concurrent.futures.TimeoutError:
            raise SourceError(f"page server {self.url}: no reply in {self.timeout} s") from None

    def keepalive(self) -> None:
        """Read one page on each connection, so the server does not drop an idle client."""
        self.last_used = time.monotonic()
        for client in self._clients:
            region = client.regions[0]
            if region.length:
                client.fetch(region.name, 0, self.page_size, urgent=False)

    def close(self) -> None:
        """Close the connections (idempotent)."""
        for client in self._clients:
            client.close()


def open_flat_source(
    spec: str, *, token: bytes | None = None, timeout: float = 10.0
) -> FileSource | RemoteSource:
    """A source from ``SNAPSHOT`` (a file path) or ``tcp://HOST:PORT`` (a page server).

    Raises:
        SourceError: the page server cannot be reached or refused us.
        OSError, ValueError: the file cannot be opened or is malformed.
    """
    if spec.startswith("tcp://"):
        return RemoteSource(spec, token=token, timeout=timeout)
    return FileSource(spec)


# -- one restored process ------------------------------------------------------


@dataclasses.dataclass
class SessionReport:
    """What one session did; ``errors`` are the messages of what went wrong."""

    pid: int
    uid: int
    regions: int
    length: int
    page_size: int
    faulted: int = 0
    prefetched: int = 0
    working_set: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    first_fault: float | None = None
    complete: float | None = None
    fault_p50_us: float = 0.0
    fault_p99_us: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing went wrong."""
        return not self.errors

    @property
    def throughput(self) -> float:
        """Bytes per second installed, up to the moment every page was present (or the end)."""
        span = self.complete if self.complete is not None else self.elapsed
        return self.bytes / span if span > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (with ``throughput`` in bytes per second)."""
        doc = dataclasses.asdict(self)
        doc["throughput"] = self.throughput
        return doc

    def summary(self) -> str:
        """One line: pages faulted and prefetched, bytes, MB/s, time to first fault, errors."""
        first = (
            "no faults"
            if self.first_fault is None
            else f"first fault {self.first_fault * 1e3:.1f} ms after handshake"
        )
        done = "" if self.complete is None else f", all present after {self.complete:.2f} s"
        errors = f"; {len(self.errors)} errors: {self.errors[0]}" if self.errors else ""
        return (
            f"pid {self.pid}: {_size(self.length)} in {self.regions} regions: "
            f"{self.faulted} pages faulted, {self.prefetched} prefetched"
            f"{f' ({self.working_set} from the working set)' if self.working_set else ''}; "
            f"{self.bytes / 1e6:.1f} MB at {self.throughput / 1e6:.1f} MB/s{done}; {first}, "
            f"fault latency p50 {self.fault_p50_us:.0f} us p99 {self.fault_p99_us:.0f} us; "
            f"session {self.elapsed:.2f} s{errors}"
        )


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


class _SourceOps(UffdOps):
    """Serves MISSING faults of one session from its source (see _Session.on_fault)."""

    def __init__(self, session: _Session) -> None:
        self.session = session

    def handle_missing(self, fault: Fault) -> Resolution:
        """Fetch the faulting page: at once from a file, deferred from a page server."""
        return self.session.on_fault(fault)


@dataclasses.dataclass
class _Guest:
    """One handshake region with its place in the session's flat space."""

    mapping: GuestRegionUffdMapping
    start: int  # offset in the session's flat space (regions end to end, in handshake order)


class _Session:
    """One process being restored: its FaultHandler, prefetch thread and counters."""

    def __init__(
        self,
        daemon: HandlerDaemon,
        fd: int,
        mappings: list[GuestRegionUffdMapping],
        cred: PeerCred,
    ) -> None:
        self.daemon = daemon
        self.cred = cred
        self.t0 = time.monotonic()
        page_sizes = {m.page_size for m in mappings}
        if len(page_sizes) != 1:
            os.close(fd)
            raise HandshakeError(
                "mappings", f"mixed page sizes {sorted(page_sizes)}; one is expected"
            )
        self.page_size = page_sizes.pop()
        self.guests: list[_Guest] = []
        flat = 0
        for m in mappings:
            self.guests.append(_Guest(m, flat))
            flat += m.size
        self.length = flat
        self._flat_starts = [g.start for g in self.guests]
        self._by_addr = sorted(self.guests, key=lambda g: g.mapping.base_host_virt_addr)
        self._addr_starts = [g.mapping.base_host_virt_addr for g in self._by_addr]
        self.report = SessionReport(cred.pid, cred.uid, len(mappings), flat, self.page_size)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ended = threading.Event()
        self._finished = threading.Event()
        self._first_served = threading.Event()
        self._resolver_queue: queue.SimpleQueue[tuple[Fault, Resolution, float, bool] | None] = (
            queue.SimpleQueue()
        )
        self._failed: str | None = None
        self._faulted_pages: set[int] = set()
        self._bar: Any = None
        self.ufd: Any = None
        self.handler: FaultHandler | None = None
        self.source: Any = None
        self._pidfd = -1
        self._threads: list[threading.Thread] = []
        self.prefetcher = AdaptivePrefetcher(
            flat,
            page_size=self.page_size,
            min_chunk=max(MIN_CHUNK, self.page_size),
            max_chunk=max(MAX_CHUNK, self.page_size),
            boundaries=[g.start for g in self.guests],
        )
        try:
            self.ufd = userfaultfd_from_fd(fd)
        except BaseException:
            os.close(fd)
            raise

    # -- address arithmetic ---------------------------------------------------

    def _guest_at(self, addr: int) -> _Guest | None:
        i = bisect.bisect_right(self._addr_starts, addr) - 1
        if i >= 0:
            g = self._by_addr[i]
            if addr < g.mapping.end:
                return g
        return None

    def _guest_of_flat(self, flat: int) -> _Guest:
        return self.guests[bisect.bisect_right(self._flat_starts, flat) - 1]

    def _source_offset(self, flat: int) -> int:
        g = self._guest_of_flat(flat)
        return g.mapping.offset + flat - g.start

    def _address(self, flat: int) -> int:
        g = self._guest_of_flat(flat)
        return g.mapping.base_host_virt_addr + flat - g.start

    def _flat_of_source(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Session flat ranges holding the source range [offset, offset+length)."""
        out = []
        for g in self.guests:
            lo = max(offset, g.mapping.offset)
            hi = min(offset + length, g.mapping.offset + g.mapping.size)
            if lo < hi:
                out.append((g.start + lo - g.mapping.offset, hi - lo))
        return out

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Open the session's source, adopt the fd, register the regions, start the threads.

        Raises:
            HandshakeError: a region lies outside the source or its page size
                is smaller than the source's.
            SourceError, UffdError, OSError: the source or the handler failed.
        """
        daemon = self.daemon
        try:
            self.source = daemon._take_source()
            for i, g in enumerate(self.guests):
                m = g.mapping
                if m.offset + m.size > self.source.length:
                    raise HandshakeError(
                        f"mappings[{i}].offset",
                        f"[{m.offset:#x}, +{m.size:#x}) lies outside the source "
                        f"{daemon.source.label} ({self.source.length} bytes)",
                    )
                if m.page_size % self.source.page_size:
                    raise HandshakeError(
                        f"mappings[{i}].page_size",
                        f"{m.page_size} is not a multiple of the source's page size "
                        f"{self.source.page_size}",
                    )
            self.handler = FaultHandler(fallback=daemon.fallback, deadline=daemon.deadline)
            self.handler.adopt(self.ufd)
            ufd, self.ufd = self.ufd, None  # the handler owns and closes it now
            ops = _SourceOps(self)
            kind = "hugetlb" if self.page_size > _PAGE else "anon"
            for g in self.guests:
                self.handler.register(
                    (g.mapping.base_host_virt_addr, g.mapping.size),
                    Mode.MISSING,
                    ops,
                    uffd=ufd,
                    registered=True,
                    kind=kind,
                )
            if daemon.progress:
                self._bar = _progress_bar(self.length, f"restore pid {self.cred.pid}")
            self.handler.start()
            self._pidfd = _pidfd_open(self.cred.pid)
        except BaseException:
            if self.handler is not None:
                with contextlib.suppress(Exception):
                    self.handler.stop()
            if self._bar is not None:
                self._bar.close()
            self._close_resources()
            raise
        self._spawn(self._watch, "uffd-session-watch")
        if self.source.remote:
            self._spawn(self._resolver, "uffd-resolver")
        if daemon.prefetch or daemon.working_set_pages:
            self._spawn(self._prefetch, "uffd-prefetch")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"{name}-{self.cred.pid}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _watch(self) -> None:
        """Wait for the process to exit (its pidfd), or for the daemon to stop; then end."""
        poller = select.poll()
        if self._pidfd >= 0:
            poller.register(self._pidfd, select.POLLIN)
        while not self._stop.is_set():
            if self.source.remote and time.monotonic() - self.source.last_used > _KEEPALIVE:
                with contextlib.suppress(Exception):
                    self.source.keepalive()
            if self._pidfd >= 0:
                if poller.poll(100):
                    break
            elif not _pid_alive(self.cred.pid):
                break
            else:
                self._stop.wait(0.1)
        self.end()

    def end(self) -> None:
        """Stop serving (idempotent): join prefetch, stop the handler, write the working set."""
        with self._lock:
            ending = self._ended.is_set()
            self._ended.set()
        if ending:
            # Another thread is ending the session: wait for it unless it is us.
            if threading.current_thread() not in self._threads:
                self._finished.wait(30.0)
            return
        self._stop.set()
        self._resolver_queue.put(None)
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join(10.0)
        if self.handler is not None:
            total = self.handler.stats.total
            self.report.fault_p50_us = total.percentile_us(0.5)
            self.report.fault_p99_us = total.percentile_us(0.99)
            try:
                self.handler.stop()
            except Exception as err:
                self._error(
                    f"fault handler: {type(err).__name__}: {err}", log_it=self._failed is None
                )
        self._close_resources()
        report = self.report
        report.elapsed = time.monotonic() - self.t0
        if self._bar is not None:
            self._bar.close()
        self.daemon._session_ended(self)
        self._finished.set()

    def _close_resources(self) -> None:
        if self.ufd is not None:
            self.ufd.close()
            self.ufd = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self.source is not None and self.source is not self.daemon.source:
            self.source.close()

    def faulted_source_offsets(self) -> list[int]:
        """Source offsets (bytes) of the pages this session faulted on."""
        with self._lock:
            pages = sorted(self._faulted_pages)
        return [self._source_offset(p * self.page_size) for p in pages]

    # -- errors and accounting --------------------------------------------------

    def _error(self, message: str, *, log_it: bool = True) -> None:
        with self._lock:
            self.report.errors.append(message)
        if log_it:
            log.error("pid %d: %s", self.cred.pid, message)

    def _source_failed(self, err: BaseException) -> None:
        with self._lock:
            first = self._failed is None
            if first:
                self._failed = f"source {self.daemon.source.label} failed: {err}"
        if first:
            self._error(
                f"{self._failed}; prefetch stopped, faults now fail by the "
                f"{self.daemon.fallback!r} fallback"
            )

    def _account(self, nbytes: int, *, faulted: int = 0, prefetched: int = 0, ws: int = 0) -> None:
        if faulted:
            self._first_served.set()
        with self._lock:
            r = self.report
            r.bytes += nbytes
            r.faulted += faulted
            r.prefetched += prefetched
            r.working_set += ws
            if self.prefetcher.done and r.complete is None and not self._failed:
                r.complete = time.monotonic() - self.t0
            if self._bar is not None:
                # A fault that lost the race to a prefetch install still counts as a
                # fault; the bar shows memory present, so it stops at the total.
                step = min(nbytes, self._bar.total - self._bar.n)
                if step > 0:
                    self._bar.update(step)

    # -- faults (the FaultHandler's dispatch thread) ------------------------------

    def on_fault(self, fault: Fault) -> Resolution:
        """Resolve a MISSING fault from the source (deferred when the source is remote)."""
        g = self._guest_at(fault.address)
        if g is None:
            return Resolution.refuse(f"{fault.address:#x} is in no region of the handshake")
        ps = self.page_size
        flat = g.start + (fault.address - g.mapping.base_host_virt_addr) // ps * ps
        with self._lock:
            if self.report.first_fault is None:
                self.report.first_fault = time.monotonic() - self.t0
            self._faulted_pages.add(flat // ps)
            self.prefetcher.on_fault(flat)
            failed = self._failed
        if failed:
            return Resolution.refuse(failed)
        offset = g.mapping.offset + flat - g.start
        if not self.source.remote:
            try:
                data = self.source.read(offset, ps)
            except SourceError as err:
                self._source_failed(err)
                return Resolution.refuse(str(err))
            self._account(ps, faulted=1)
            return Resolution.copy(data)
        future = self.source.fetch(offset, ps, urgent=True)
        arrived = time.monotonic()
        future.add_done_callback(lambda f: self._resolve_later(fault, f, arrived))
        return Resolution.defer()

    def _resolve_later(
        self, fault: Fault, future: concurrent.futures.Future[bytes], arrived: float
    ) -> None:
        """Answer a deferred fault (on the page client's thread, or inline if already done)."""
        if self._stop.is_set():
            return  # the session is ending: stop() resolves what is left by the fallback
        err = future.exception()
        if err is not None:
            self._source_failed(err)
            resolution = Resolution.refuse(f"{err}")
        else:
            resolution = Resolution.copy(future.result())
        handler = self.handler
        assert handler is not None
        if handler.resolve(fault, resolution):
            if err is None:
                self._account(self.page_size, faulted=1)
            return
        # The reply beat the dispatch thread's bookkeeping of the defer (or the
        # callback ran inline on it): let the resolver thread retry, so neither
        # the dispatch thread nor the client's loop waits here.
        # Never past the fault's own deadline: by then the fallback answered it.
        give_up = arrived + handler.deadline * 0.9
        self._resolver_queue.put((fault, resolution, give_up, err is None))

    def _resolver(self) -> None:
        """Retry early answers until the dispatch thread has recorded the defer, or the deadline."""
        handler = self.handler
        assert handler is not None
        while True:
            item = self._resolver_queue.get()
            if item is None:
                return
            fault, resolution, give_up, ok = item
            while not handler.resolve(fault, resolution):
                if time.monotonic() > give_up or self._stop.is_set():
                    break
                time.sleep(0.0002)
            else:
                if ok:
                    self._account(self.page_size, faulted=1)

    # -- prefetch (its own thread) --------------------------------------------------

    def _prefetch(self) -> None:
        # The first fault is the restored process waiting to run: let it reach
        # the source before megabytes of prefetch do (bounded by _FIRST_FAULT_WAIT).
        self._first_served.wait(_FIRST_FAULT_WAIT)
        try:
            if self.daemon.working_set_pages:
                self._install_working_set()
            if self.daemon.prefetch:
                self._adaptive()
        except _Stop:
            pass
        except Exception as err:
            self._error(f"prefetch stopped: {type(err).__name__}: {err}")
        with self._lock:
            if self.prefetcher.done and self.report.complete is None and not self._failed:
                self.report.complete = time.monotonic() - self.t0

    def _install_working_set(self) -> None:
        runs: list[tuple[int, int]] = []
        for offset, length in self.daemon.working_set_pages:
            for flat, n in self._flat_of_source(offset, length):
                with self._lock:
                    missing = self.prefetcher.missing_runs(flat, n)
                    for start, k in missing:
                        self.prefetcher.mark_present(start, k)
                runs.extend(missing)
        self._pipeline(iter(runs), ws=True)

    def _adaptive(self) -> None:
        def chunks() -> Iterable[tuple[int, int]]:
            while True:
                with self._lock:
                    chunk = self.prefetcher.next_chunk()
                if chunk is None:
                    return
                yield chunk

        self._pipeline(iter(chunks()), ws=False)

    def _pipeline(self, runs: Any, *, ws: bool) -> None:
        """Fetch runs (session flat ranges), several in flight; install each in order."""
        remote = self.source.remote
        budget = self.daemon.inflight_bytes
        inflight: collections.deque[tuple[int, int, concurrent.futures.Future[bytes]]] = (
            collections.deque()
        )
        queued = 0
        exhausted = False
        while True:
            # Keep the page server busy: up to ``budget`` bytes (and _MAX_INFLIGHT
            # reads) in flight, so small chunks after a fault do not idle the link.
            while (
                not exhausted
                and (not inflight or remote)
                and queued < budget
                and len(inflight) < _MAX_INFLIGHT
            ):
                if self._stop.is_set() or self._failed:
                    raise _Stop
                try:
                    flat, n = next(runs)
                except StopIteration:
                    exhausted = True
                    break
                inflight.append(
                    (flat, n, self.source.fetch(self._source_offset(flat), n, urgent=False))
                )
                queued += n
            if not inflight:
                return
            flat, n, future = inflight.popleft()
            queued -= n
            try:
                data = _wait(future, self._stop, self.daemon.source_timeout)
            except SourceError as err:
                self._source_failed(err)
                raise _Stop from None
            installed = self._install(flat, data)
            pages = installed // self.page_size
            self._account(installed, prefetched=pages, ws=pages if ws else 0)

    def _install(self, flat: int, data: bytes) -> int:
        """Install ``data`` at the session flat offset, within ranges still registered.

        Best effort: a page this pass does not install is simply left to its
        fault. Pages already present are skipped. A copy that stops short
        (the kernel's EAGAIN: a partial copy that met a present page, or a
        REMOVE being delivered) resumes one page further on. Ranges the peer
        removed (balloon) or unmapped are no longer in the handler's table
        and are skipped; a range that disappears mid-pass (ENOENT) is looked
        up again. One UFFDIO_WAKE per registered piece. Returns the bytes
        installed.
        """
        handler = self.handler
        assert handler is not None
        ps = self.page_size
        addr = self._address(flat)
        view = memoryview(data)
        installed = 0
        todo = [(addr, addr + len(data))]
        for attempt in range(_INSTALL_RETRIES):
            lost: list[tuple[int, int]] = []
            maps = handler.mappings
            for start, end in todo:
                for m in _overlapping(maps, start, end):
                    lo, hi = max(start, m.start), min(end, m.end)
                    pos = lo
                    try:
                        while pos < hi:
                            done = handler.install(m, pos - m.start, view[pos - addr : hi - addr])
                            installed += done
                            pos += done if done >= hi - pos else done + ps
                    except NoMappingError:
                        lost.append((pos, hi))
                    except UffdError as err:
                        if err.errno in (errno.ESRCH, errno.EBADF):
                            raise _Stop from None  # the process (or the handler) is gone
                        raise
                    except ValueError:
                        raise _Stop from None  # the handler stopped under us
                    with contextlib.suppress(UffdError, ValueError):
                        handler.wake(m, lo - m.start, hi - lo)
            if not lost:
                break
            todo = lost
            time.sleep(0.001 * (attempt + 1))
        return installed


class _Stop(Exception):
    """Ends the prefetch thread quietly (session ending, source failed, process gone)."""


def _overlapping(mappings: Sequence[Mapping], start: int, end: int) -> list[Mapping]:
    return [m for m in mappings if m.start < end and start < m.end]


def _wait(future: concurrent.futures.Future[bytes], stop: threading.Event, timeout: float) -> bytes:
    give_up = time.monotonic() + timeout
    while True:
        try:
            return future.result(0.1)
        except concurrent.futures.TimeoutError:
            if stop.is_set():
                raise _Stop from None
            if time.monotonic() > give_up:
                raise SourceError(f"no reply to a prefetch read in {timeout} s") from None
        except SourceError:
            raise
        except Exception as err:
            raise SourceError(f"{type(err).__name__}: {err}") from err


def _pidfd_open(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _progress_bar(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=True)


# -- the daemon ------------------------------------------------------------------


class HandlerDaemon:
    """Listens on a Unix socket and restores every process that hands it a userfaultfd.

    ``source``: a path (snapshot or raw memory file) or ``tcp://HOST:PORT``,
    or an already open FileSource/RemoteSource (then not closed here).
    ``allow_uids``: peers accepted by SO_PEERCRED uid (default: this
    process's effective uid and root); when given, only those. ``fallback``,
    ``deadline``: as FaultHandler's. ``prefetch``: run the adaptive
    prefetcher. ``working_set``: "auto" (``SNAPSHOT.ws.json`` for a file
    source, none for a page server), a path, or None (neither load nor
    record). ``progress``: a tqdm bar per session (default: when tqdm is
    installed and stderr is a terminal). ``inflight_bytes``: prefetch data
    requested from a page server and not yet received. Each ended session
    prints one line on stdout: its summary, or with ``json_reports`` a JSON
    object ``{"session": {...}}``.

    Calling context: ``serve_forever()`` blocks the calling thread until
    ``shutdown()`` (from any thread or a signal handler); ``start()`` runs it
    on a background thread and returns once the socket listens. Sessions run
    on their own threads. ``close()`` stops everything (idempotent).

    Raises (constructor):
        SourceError: the page server cannot be reached.
        OSError, ValueError: the source file cannot be opened, the socket
            cannot be bound, a working set file is malformed.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        source: str | FileSource | RemoteSource,
        *,
        token: bytes | None = None,
        allow_uids: Iterable[int] | None = None,
        fallback: str = "sigbus",
        deadline: float = 2.0,
        prefetch: bool = True,
        working_set: str | None = "auto",
        progress: bool | None = None,
        inflight_bytes: int = 4 << 20,
        source_timeout: float = 10.0,
        handshake_timeout: float = 5.0,
        json_reports: bool = False,
    ) -> None:
        if fallback not in ("sigbus", "zero"):
            raise ValueError(f"fallback must be 'sigbus' or 'zero', not {fallback!r}")
        self.socket_path = os.fspath(socket_path)
        self.fallback = fallback
        self.deadline = deadline
        self.prefetch = prefetch
        self.inflight_bytes = max(1, inflight_bytes)
        self.source_timeout = source_timeout
        self.handshake_timeout = handshake_timeout
        self.json_reports = json_reports
        self.allow_uids = (
            frozenset(allow_uids) if allow_uids is not None else frozenset({os.geteuid(), 0})
        )
        if progress is None:
            progress = _tqdm_available() and sys.stderr.isatty()
        self.progress = progress
        self._owns_source = isinstance(source, str)
        self.source = (
            open_flat_source(source, token=token, timeout=source_timeout)
            if isinstance(source, str)
            else source
        )
        try:
            self.working_set_file = self._working_set_file(working_set)
            self.working_set_pages = self._load_working_set()
            self._sock = self._listen()
        except BaseException:
            if self._owns_source:
                self.source.close()
            raise
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sessions: list[_Session] = []
        self.reports: list[SessionReport] = []
        self.refused: list[str] = []
        self._recorded = WorkingSet(self.source.page_size, self.source.length)
        for offset, length in self.working_set_pages:
            self._recorded.update(range(offset, offset + length, self.source.page_size))
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._spare: RemoteSource | None = None
        self._stopping = False
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- setup ------------------------------------------------------------------

    def _working_set_file(self, working_set: str | None) -> str | None:
        if working_set == "auto":
            return None if self.source.remote else working_set_path(self.source.label)
        return working_set

    def _load_working_set(self) -> list[tuple[int, int]]:
        if self.working_set_file is None:
            return []
        try:
            ws = WorkingSet.load(
                self.working_set_file, page_size=self.source.page_size, length=self.source.length
            )
        except FileNotFoundError:
            log.info("no working set at %s yet: this run records one", self.working_set_file)
            return []
        except WorkingSetError as err:
            log.warning("ignoring the working set: %s", err)
            return []
        log.info("working set: %d pages from %s", len(ws), self.working_set_file)
        return ws.ranges(MAX_CHUNK)

    def _listen(self) -> socket.socket:
        """Bind and listen; a stale socket file is replaced, a live one is not.

        The socket is owner-only (0600) unless ``allow_uids`` names other
        users, who must be able to connect; SO_PEERCRED then decides.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if _is_socket(self.socket_path):
                if _listening(self.socket_path):
                    raise OSError(
                        errno.EADDRINUSE,
                        f"another process is serving {self.socket_path}; stop it or pick "
                        "another --socket",
                    )
                os.unlink(self.socket_path)
            others = self.allow_uids - {os.geteuid(), 0}
            old = os.umask(0o111 if others else 0o177)
            try:
                sock.bind(self.socket_path)
            finally:
                os.umask(old)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- serving -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until ``shutdown()``; each handshake runs on its own thread."""
        self._refill_spare()
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stopping:
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                        continue
                    try:
                        conn, _ = self._sock.accept()
                    except OSError as err:
                        if err.errno in (errno.EINTR, errno.ECONNABORTED, errno.EAGAIN):
                            continue
                        raise
                    threading.Thread(
                        target=self._handshake, args=(conn,), name="uffd-handshake", daemon=True
                    ).start()
        finally:
            self._end_sessions()

    def _take_source(self) -> Any:
        """The source a new session reads through: a warm spare connection when there is one.

        Connecting to a page server (TCP, HELLO, LIST, on two connections)
        takes milliseconds the first fault would otherwise wait for, so one
        spare is kept ready and replaced in the background once taken.
        """
        if not self.source.remote:
            return self.source
        with self._lock:
            spare, self._spare = self._spare, None
        self._refill_spare()
        if spare is not None and time.monotonic() - spare.last_used < _KEEPALIVE:
            return spare
        if spare is not None:
            spare.close()
        return self.source.session()

    def _refill_spare(self) -> None:
        if not self.source.remote or self._stopping:
            return

        source = self.source
        assert isinstance(source, RemoteSource)

        def fill() -> None:
            try:
                spare: RemoteSource | None = source.session()
            except Exception as err:
                log.debug("no spare connection to the page server: %s", err)
                return
            with self._lock:
                if self._spare is None and not self._closed:
                    self._spare, spare = spare, None
            if spare is not None:
                spare.close()

        threading.Thread(target=fill, name="uffd-spare-connect", daemon=True).start()

    def start(self) -> HandlerDaemon:
        """Run ``serve_forever`` on a background thread (the socket already listens)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.serve_forever, name="uffd-daemon", daemon=True
            )
            self._thread.start()
        return self

    def shutdown(self) -> None:
        """Make ``serve_forever`` return (safe from signal handlers and other threads)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Shut down, end every session, close the socket and the source (idempotent)."""
        if self._closed:
            return
        self.shutdown()
        if self._thread is not None:
            self._thread.join(30.0)
        else:
            self._end_sessions()
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._owns_source:
            self.source.close()

    def __enter__(self) -> HandlerDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end_sessions(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.end()

    def wait_reports(self, count: int = 1, timeout: float = 30.0) -> list[SessionReport]:
        """Block until ``count`` sessions have ended (at most ``timeout`` s); their reports.

        Raises:
            TimeoutError: fewer sessions ended in time.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.reports) >= count, timeout):
                raise TimeoutError(f"{len(self.reports)} of {count} sessions ended in {timeout} s")
            return list(self.reports[:count])

    def wait_refused(self, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Block until ``count`` connections were refused; their messages.

        Raises:
            TimeoutError: fewer refusals in time.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.refused) >= count, timeout):
                raise TimeoutError(f"{len(self.refused)} of {count} refusals in {timeout} s")
            return list(self.refused[:count])

    @property
    def active(self) -> int:
        """Sessions being served now."""
        with self._lock:
            return len(self._sessions)

    # -- one connection --------------------------------------------------------------

    def _refuse(self, who: str, err: BaseException) -> None:
        message = f"refused {who}: {err}"
        log.error("%s", message)
        with self._cond:
            self.refused.append(message)
            self._cond.notify_all()

    def _handshake(self, conn: socket.socket) -> None:
        who = "a connection"
        with conn:
            try:
                fd, mappings, cred = recv_handshake(conn, timeout=self.handshake_timeout)
            except (HandshakeError, OSError) as err:
                with contextlib.suppress(OSError):
                    cred = _peer(conn)
                    who = f"pid {cred.pid} (uid {cred.uid})"
                self._refuse(who, err)
                return
        who = f"pid {cred.pid} (uid {cred.uid})"
        if cred.uid not in self.allow_uids:
            os.close(fd)
            allowed = ", ".join(str(u) for u in sorted(self.allow_uids))
            self._refuse(
                who,
                HandshakeError(
                    "peer",
                    f"uid {cred.uid} is not allowed (allowed uids: {allowed}; see --allow-uid)",
                ),
            )
            return
        if self._stopping:
            os.close(fd)
            self._refuse(who, RuntimeError("the daemon is shutting down"))
            return
        try:
            session = _Session(self, fd, mappings, cred)
        except Exception as err:
            self._refuse(who, err)
            return
        with self._lock:
            self._sessions.append(session)
        try:
            session.start()
        except Exception as err:
            with self._lock:
                self._sessions.remove(session)
            self._refuse(who, err)
            return
        total = sum(m.size for m in mappings)
        log.info(
            "serving %s: %d regions, %d MiB, page size %d",
            who,
            len(mappings),
            total >> 20,
            session.page_size,
        )

    def _session_ended(self, session: _Session) -> None:
        """Called by a session once it has stopped: record, write the working set, report."""
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)
            self._recorded.update(session.faulted_source_offsets())
            recorded = self._recorded
        if self.working_set_file is not None and len(recorded):
            try:
                recorded.save(self.working_set_file)
            except OSError as err:
                session.report.errors.append(f"writing the working set: {err}")
                log.error(
                    "pid %d: writing the working set %s: %s",
                    session.cred.pid,
                    self.working_set_file,
                    err,
                )
        report = session.report
        if self.json_reports:
            print(json.dumps({"session": report.to_json()}), flush=True)
        else:
            print(f"uffd handler: {report.summary()}", flush=True)
        with self._cond:
            self.reports.append(report)
            self._cond.notify_all()


def _peer(conn: socket.socket) -> PeerCred:
    from uffd.firecracker import peer_credentials

    return peer_credentials(conn)


def _is_socket(path: str) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _listening(path: str) -> bool:
    """True if something accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


# -- command line -----------------------------------------------------------------------


def _read_token(path: str | None) -> bytes | None:
    if path is None:
        env = os.environ.get("UFFD_TOKEN")
        return env.encode() if env else None
    with open(path, "rb") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def _cmd_handler(args: argparse.Namespace) -> int:
    import signal

    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="uffd handler: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    log.setLevel(logging.INFO)
    try:
        token = _read_token(args.token_file)
    except (OSError, ValueError) as err:
        print(f"uffd handler: cannot read the token: {err}", file=sys.stderr)
        return 2
    working_set: str | None = "auto"
    if args.no_working_set:
        working_set = None
    elif args.working_set:
        working_set = args.working_set
    try:
        daemon = HandlerDaemon(
            args.socket,
            args.source,
            token=token,
            allow_uids=args.allow_uid,
            fallback=args.fallback,
            deadline=args.deadline,
            prefetch=not args.no_prefetch,
            working_set=working_set,
            progress=args.progress,
            json_reports=args.json,
        )
    except (SourceError, OSError, ValueError) as err:
        print(f"uffd handler: {err}", file=sys.stderr)
        return 1
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: daemon.shutdown())
    # A fault's Python step waits for the GIL behind prefetch and the page
    # clients' loops; a shorter switch interval bounds that wait (default 5 ms).
    sys.setswitchinterval(0.0005)
    print(f"listening on {daemon.socket_path}", flush=True)
    try:
        if args.once:
            daemon.start()
            while not daemon.reports and not daemon._stopping:
                with contextlib.suppress(TimeoutError):
                    daemon.wait_reports(1, timeout=0.2)
            reports = list(daemon.reports)
            daemon.close()
            return 0 if reports and all(r.ok for r in reports) else 1
        daemon.serve_forever()
    finally:
        daemon.close()
    return 0


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``handler`` to the ``python -m uffd`` parser (``args.func(args)`` -> exit code)."""
    p = subparsers.add_parser(
        "handler",
        help="serve other processes' userfaultfds (Firecracker's UFFD handshake) from a snapshot",
        description="Listen on a Unix socket for processes that send their userfaultfd and "
        "a JSON list of regions (Firecracker's handshake: [{base_host_virt_addr, size, offset, "
        "page_size}], page_size_kib accepted too), then restore their memory lazily from "
        "SOURCE: faults are served on demand and the rest is prefetched in the background "
        "(the recorded working set first). Prints 'listening on PATH' once ready and one "
        "summary line per process. The page-server token comes from --token-file or the "
        "UFFD_TOKEN environment variable.",
        epilog="exit codes: 0 stopped by SIGINT/SIGTERM (or --once: a clean session), 1 a "
        "runtime error (source, socket, or a --once session with errors), 2 usage",
    )
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    p.add_argument(
        "--source",
        required=True,
        metavar="SNAPSHOT|tcp://HOST:PORT",
        help="a snapshot or raw memory file, or a page server",
    )
    p.add_argument("--token-file", metavar="F", help="file holding the page server's token")
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        metavar="UID",
        help="accept peers with this uid (repeatable); default: this user and root",
    )
    p.add_argument(
        "--fallback",
        choices=("sigbus", "zero"),
        default="sigbus",
        help="how a fault that cannot be served ends (default sigbus: a poison page where the "
        "peer negotiated UFFD_FEATURE_POISON, else a zero page)",
    )
    p.add_argument(
        "--deadline", type=float, default=2.0, metavar="S", help="seconds per fault (default 2)"
    )
    p.add_argument("--no-prefetch", action="store_true", help="serve faults only")
    ws = p.add_mutually_exclusive_group()
    ws.add_argument(
        "--working-set",
        metavar="FILE",
        help="working-set file to load and record (default: SNAPSHOT.ws.json for a file source)",
    )
    ws.add_argument("--no-working-set", action="store_true", help="neither load nor record one")
    p.add_argument("--once", action="store_true", help="exit after the first process ends")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal and tqdm is installed)",
    )
    p.add_argument("--json", action="store_true", help="print session reports as JSON lines")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeatable)")
    p.set_defaults(func=_cmd_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run just this module's subcommand (``python -m uffd.daemon handler ...``)."""
    parser = argparse.ArgumentParser(prog="uffd")
    add_cli(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
