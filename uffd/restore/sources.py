"""Page sources for lazy restore: a snapshot file or a page server, seen as one flat image.

A source's regions are laid end to end in order (``_FlatLayout``), so a
restore addresses the image by one offset (for Firecracker's raw memory
file, the file offset). :class:`FileSource` maps the file read-only
(:func:`uffd.pagestore.snapshot.open_source` checks it and says where each
page is) and hands out views of the mapping, so a page goes from the page
cache into the restored process with one UFFDIO_COPY and no Python bytes
object; it knows the snapshot's zero pages (``spans``). :class:`RemoteSource`
fetches from a page server (:class:`uffd.pagestore.client.ThreadedPageClient`)
and hands back futures, so reads for faults of several threads are in
flight at once; ``fetch_into`` receives straight into the caller's buffer.
Both have ``fetch`` (a future of bytes), ``read`` (the bytes), ``session``
(what one restored process reads through), ``remote``, ``label``,
``page_size``, ``length`` and ``close``.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import socket
import ssl as _ssl
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from uffd._native import ffi, lib
from uffd.restore.urgent import UrgentLink
from uffd.restore.warm import WarmSpare

if TYPE_CHECKING:
    from uffd.restore.redis_source import RedisSource

__all__ = ["FileSource", "FlatSource", "RemoteSource", "SourceError", "open_flat_source"]

log = logging.getLogger("uffd.restore.daemon")

_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.13 names it
_KEEPALIVE = 10.0  # seconds idle: well inside the page server's default 30 s timeout


class SourceError(ConnectionError):
    """The page source failed (a dead page server, a timed-out or refused read)."""


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
        """``(name, offset in region, length)`` pieces covering the flat range.

        Raises:
            ValueError: the range passes the end of the image.
        """
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
    """A snapshot or raw memory file as a flat image, mapped read-only.

    ``spans`` says where each page of a range is: a run of the file (checked
    against its checksums first, for a snapshot) or a zero page the snapshot
    does not store. ``view`` is that run of the file as a memoryview of the
    mapping: install it with UFFDIO_COPY (the kernel copies from the page
    cache; a file truncated under us makes the copy fail with EFAULT, never
    a SIGBUS here). Never read a view from Python. ``read``/``fetch`` give
    bytes, for callers that want them.

    Thread-safe: one open file serves every session and thread.

    Raises (constructor):
        OSError, ValueError: the file cannot be opened or is malformed.
    """

    remote = False

    def __init__(self, path: str) -> None:
        from uffd.pagestore.snapshot import open_source

        self.path = path
        self.label = path
        self._reader = open_source(path)
        try:
            self.page_size = self._reader.page_size
            self._layout = _FlatLayout([(r.name, r.length) for r in self._reader.regions])
            self.length = self._layout.length
            size = os.fstat(self._reader.fileno()).st_size
            self._map = (
                mmap.mmap(self._reader.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
                if size
                else None
            )
        except BaseException:
            self._reader.close()
            raise
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")
        with ffi.from_buffer(self._view) as buf:
            self._addr = int(ffi.cast("uintptr_t", buf))
        self._zeros_lock = threading.Lock()
        self._zeros: list[tuple[int, int]] | None = None

    def spans(self, offset: int, length: int) -> list[tuple[int, int, int | None]]:
        """``(offset, length, file offset)`` runs covering the flat range; None: zero pages.

        Raises:
            SourceError: a chunk failed its checksum or the file was truncated.
            ValueError: the range passes the end of the image.
        """
        out: list[tuple[int, int, int | None]] = []
        at = offset
        try:
            for name, inside, n in self._layout.pieces(offset, length):
                for off, k, where in self._reader.file_extents(name, inside, n):
                    out.append((at + off - inside, k, where))
                at += n
        except OSError as err:
            raise SourceError(f"{self.path}: {err}") from err
        except ValueError as err:
            if type(err) is ValueError:
                raise
            raise SourceError(f"{self.path}: {err}") from err  # a SnapshotError
        return out

    def zero_runs(self) -> list[tuple[int, int]]:
        """The flat runs ``(offset, length)`` the snapshot stores as zero pages (holes).

        Found once (a walk of the snapshot's bitmaps, or SEEK_HOLE over a raw
        file) and kept: every session of the daemon asks.
        """
        with self._zeros_lock:
            if self._zeros is None:
                out: list[tuple[int, int]] = []
                at = 0
                for region in self._reader.regions:
                    for off, n, present in self._reader.extents(region.name):
                        if not present:
                            out.append((at + off, n))
                    at += region.length
                self._zeros = out
            return self._zeros

    def populate(self, file_offset: int, length: int) -> None:
        """Map the page-cache pages of the file range into the mapping in one call.

        MADV_POPULATE_READ (Linux 5.14): a copy from the mapping then takes
        no page fault per page. Called without the GIL (it may read the disk),
        so the fault path's Python runs meanwhile. Best effort: an older
        kernel, or a failed read (the copy reports it), is no error here.
        """
        if self._map is None or self._map.closed:
            return
        start = file_offset - file_offset % mmap.PAGESIZE
        end = min(file_offset + length, len(self._map))
        if end > start:
            lib.madvise(ffi.cast("void *", self._addr + start), end - start, _MADV_POPULATE_READ)

    def native_address(self, offset: int, length: int) -> int | None:
        """Where the flat range [offset, +length) lies in the file's mapping, when the file
        stores it as it is: a raw memory file, one region (its holes read as zeros there).

        None for a snapshot (its pages are packed, and checksummed on first read: they
        must go through ``spans``), a range across regions or wholly in a hole, or a file
        now shorter than the range. The address is valid until ``close()``.
        """
        from uffd.pagestore.snapshot import RawMemoryFile

        if self._map is None or not isinstance(self._reader, RawMemoryFile):
            return None
        pieces = self._layout.pieces(offset, length)
        if len(pieces) != 1:
            return None
        name, inside, n = pieces[0]
        try:
            extents = self._reader.file_extents(name, inside, n)
        except (OSError, ValueError):
            return None
        for at, _, where in extents:
            if where is not None:
                start = where - at + inside
                return self._addr + start if start + n <= len(self._map) else None
        return None

    def view(self, file_offset: int, length: int) -> memoryview:
        """The file's bytes [file_offset, +length) as a view of the read-only mapping."""
        return self._view[file_offset : file_offset + length]

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
        """Close the file and its mapping (idempotent; views must be released first)."""
        self._view.release()
        if self._map is not None:
            # A view still held somewhere (a late Resolution) keeps the mapping until
            # it goes; the file itself closes now.
            with contextlib.suppress(BufferError):
                self._map.close()
        self._reader.close()


class RemoteSource:
    """A page server as a flat image.

    Faults and prefetch use connections of their own (``session()`` opens
    them), so a faulting thread's one-page read never queues behind megabytes
    of prefetch data already in flight on the same TCP stream. A session's faults are read on the
    dispatch thread itself (``read_now``, :mod:`uffd.restore.urgent`), the
    first connection serving them when that one is busy or broken. ``fetch`` returns a
    future; ``read`` waits for it (at most ``timeout``). ``session()`` hands
    out a spare set of connections kept ready in the background (``warm()``,
    :mod:`uffd.restore.warm`), so a new session's first fault does not wait
    for TCP, HELLO and LIST; a spare the server closed (it restarted) is
    never handed out.

    ``offline_ok``: a server that is down (refused, reset, timed out,
    unreachable) is no error: the source starts offline (``online`` False,
    ``length`` 0, no reads) and only hands out ``session()`` connections,
    opened once the server is back.

    Calling context: any thread. The futures complete on the page clients'
    event-loop threads.

    Raises (constructor):
        SourceError: the page server cannot be reached (unless ``offline_ok``)
            or refused us.
    """

    remote = True

    def __init__(
        self,
        url: str,
        *,
        token: bytes | None = None,
        timeout: float = 10.0,
        bulk: bool = False,
        ssl: _ssl.SSLContext | None = None,
        offline_ok: bool = False,
    ) -> None:
        self.url = url
        self.label = url
        self.token = token
        self.ssl = ssl
        self.timeout = timeout
        self._lock = threading.Lock()
        self._warm: WarmSpare[RemoteSource] | None = None
        self._closed = False
        self._link: UrgentLink | None = None
        self.last_used = time.monotonic()
        try:
            self._clients = [self._connect()]
        except SourceError as err:
            if not (offline_ok and _server_down(err.__cause__)):
                raise
            # Sessions open their own connections (session()): none is needed now.
            log.warning("%s; starting without it: sessions connect once it is back", err)
            self._clients = []
            self.page_size = self.length = 0
            self._layout = _FlatLayout([])
            return
        if bulk:
            try:
                self._clients.append(self._connect(bulk=True))
            except BaseException:
                self.close()
                raise
            self._link = self._connect_link()
        first = self._clients[0]
        self.page_size = first.page_size
        self._layout = _FlatLayout([(r.name, r.length) for r in first.regions])
        self.length = self._layout.length

    def _connect(self, *, bulk: bool = False) -> Any:
        from uffd.pagestore.client import ThreadedPageClient

        try:
            return ThreadedPageClient(
                self.url, token=self.token, request_timeout=self.timeout, ssl=self.ssl, bulk=bulk
            )
        except Exception as err:
            raise SourceError(f"page server {self.url}: {err}") from err

    def _connect_link(self) -> UrgentLink | None:
        """The faults' synchronous connection (``read_now``); None over TLS or when it fails
        (faults then take the deferred path on the first connection)."""
        if not self.url.startswith("tcp://"):
            return None
        try:
            return UrgentLink(self.url, token=self.token, timeout=self.timeout)
        except Exception as err:
            log.debug("no urgent connection to %s, faults are deferred: %s", self.url, err)
            return None

    @property
    def online(self) -> bool:
        """False for a source started while its server was down (``offline_ok``)."""
        return bool(self._clients)

    @property
    def idle(self) -> bool:
        """True after 10 s without a read (well before the server drops an idle client)."""
        return time.monotonic() - self.last_used > _KEEPALIVE

    @property
    def stale(self) -> bool:
        """True once a connection is known to be closed or broken (the server restarted)."""
        link = self._link
        return any(client.broken for client in self._clients) or (link is not None and link.stale)

    @property
    def spare_ready(self) -> bool:
        """True while a spare ``session()`` is connected and waiting (``warm()`` keeps one)."""
        warm = self._warm
        return warm is not None and warm.ready

    def session(self) -> RemoteSource:
        """Connections for one session, faults and prefetch apart: the spare when it is fresh.

        The caller owns and closes the result, and calls ``warm()`` once the
        session is served (opening the next spare costs CPU and the GIL the
        first fault should not wait for).

        Raises:
            SourceError: no spare was ready and the server cannot be reached.
        """
        warm = self._warm
        spare = warm.take() if warm is not None else None
        if spare is not None and not spare.idle:
            return spare
        if spare is not None:
            spare.close()
        return self._open_session()

    def _open_session(self) -> RemoteSource:
        return RemoteSource(
            self.url, token=self.token, timeout=self.timeout, bulk=True, ssl=self.ssl
        )

    def warm(self) -> None:
        """Keep a spare ``session()`` ready: the first call starts its keeper thread, later
        ones have it open the next spare now (after a session took one)."""
        with self._lock:
            if self._closed:
                return
            warm, started = self._warm, self._warm is not None
            if warm is None:
                warm = self._warm = WarmSpare(
                    self._open_session, label=f"connections to {self.url}", interval=_KEEPALIVE / 2
                )
        if started:
            warm.refill()
        else:
            warm.start()

    def fetch_into(
        self, offset: int, view: memoryview, *, urgent: bool = True
    ) -> concurrent.futures.Future[int]:
        """Start receiving the flat range [offset, +len(view)) straight into ``view``.

        The future gets the byte count, or the client's error (see
        :meth:`fetch` for SourceError). ``urgent`` reads (faults) go on the
        first connection, the others (prefetch) on the second. ``view``
        belongs to the client until the future is done.
        """
        client = self._clients[0 if urgent else -1]
        self.last_used = time.monotonic()
        pieces = self._layout.pieces(offset, len(view))
        if len(pieces) == 1:
            name, inside, _ = pieces[0]
            future: concurrent.futures.Future[int] = client.fetch_into(
                name, inside, view, urgent=urgent
            )
            return future
        futures = []
        at = 0
        for name, inside, n in pieces:
            futures.append(client.fetch_into(name, inside, view[at : at + n], urgent=urgent))
            at += n
        out: concurrent.futures.Future[int] = concurrent.futures.Future()
        left = [len(futures)]
        lock = threading.Lock()

        def done(f: concurrent.futures.Future[int]) -> None:
            with lock:
                left[0] -= 1
                last = not left[0]
            err = f.exception()
            if err is not None and not out.done():
                with contextlib.suppress(concurrent.futures.InvalidStateError):
                    out.set_exception(err)
            elif last and not out.done():
                out.set_result(len(view))

        for f in futures:
            f.add_done_callback(done)
        return out

    @property
    def urgent_link(self) -> UrgentLink | None:
        """The faults' synchronous connection, or None (over TLS, or it could not be opened)."""
        return self._link

    def region_at(self, offset: int, length: int) -> tuple[str, int] | None:
        """``(region name, offset in it)`` of the flat range when one region holds it whole."""
        pieces = self._layout.pieces(offset, length)
        return (pieces[0][0], pieces[0][1]) if len(pieces) == 1 else None

    def read_now(self, offset: int, view: memoryview, timeout: float) -> bool:
        """Receive the flat range [offset, +len(view)) into ``view`` on this thread; True if done.

        On the faults' own connection (a session's, over plain TCP), waiting
        at most ``timeout`` s. False: not read here (no such connection, it
        is busy or broken, the range spans two regions, the server refused
        the read): use :meth:`fetch_into`, which reports the failure.
        """
        link = self._link
        if link is None:
            return False
        pieces = self._layout.pieces(offset, len(view))
        if len(pieces) != 1:
            return False
        self.last_used = time.monotonic()
        name, inside, _ = pieces[0]
        return link.read_into(name, inside, view, timeout)

    def zero_runs(self) -> list[tuple[int, int]]:
        """The flat runs ``(offset, length)`` the page server says are zero pages.

        One MAP request per region on the prefetch connection (protocol
        version 2: a bitmap, no page bytes); a version-1 server says nothing,
        and every page is then fetched.

        Raises:
            SourceError: the server failed or did not answer in time.
        """
        client = self._clients[-1]
        out: list[tuple[int, int]] = []
        at = 0
        try:
            for region in client.regions:
                for off, n, present in client.extents(region.name):
                    if not present:
                        out.append((at + off, n))
                at += region.length
        except Exception as err:
            raise self.error(err) from err
        return out

    def error(self, err: BaseException) -> SourceError:
        """``err`` (a failed read) as the SourceError naming this page server."""
        return SourceError(f"page server {self.url}: {type(err).__name__}: {err}")

    def fetch(
        self, offset: int, length: int, *, urgent: bool = True
    ) -> concurrent.futures.Future[bytes]:
        """Start reading the flat range; the future gets the bytes or a SourceError."""
        buf = bytearray(length)
        inner = self.fetch_into(offset, memoryview(buf), urgent=urgent)
        out: concurrent.futures.Future[bytes] = concurrent.futures.Future()

        def done(f: concurrent.futures.Future[int]) -> None:
            err = f.exception()
            if err is not None:
                out.set_exception(self.error(err))
            else:
                out.set_result(bytes(buf))

        inner.add_done_callback(done)
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
        if self._link is not None and self._layout.lengths[0]:
            self._link.read_into(
                self._layout.names[0], 0, memoryview(bytearray(self.page_size)), self.timeout
            )

    def close(self) -> None:
        """Close the connections and the spare session (idempotent)."""
        with self._lock:
            self._closed = True
            warm, self._warm = self._warm, None
        if warm is not None:
            warm.close()
        if self._link is not None:
            self._link.close()
        for client in self._clients:
            client.close()


def _server_down(err: BaseException | None) -> bool:
    """True when ``err`` (a failed connect) says the server is not there now, not that it
    is misconfigured: refused, reset, timed out, unreachable; not a TLS or name error."""
    if isinstance(err, _ssl.SSLError | socket.gaierror):
        return False
    return isinstance(err, ConnectionError | TimeoutError) or (
        isinstance(err, OSError) and err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
    )


FlatSource: TypeAlias = "FileSource | RemoteSource | RedisSource"


def open_flat_source(
    spec: str,
    *,
    token: bytes | None = None,
    timeout: float = 10.0,
    ssl: _ssl.SSLContext | None = None,
    offline_ok: bool = False,
) -> FlatSource:
    """A source from ``SNAPSHOT`` (a file path), ``tcp://HOST:PORT`` or ``tls://HOST:PORT``
    (a page server; ``ssl`` verifies it, default: the system's CAs) or
    ``redis[s]://HOST:PORT/NAME`` (a chunk store: :mod:`uffd.restore.redis_source`).

    ``offline_ok``: a page server that is down is no error (see RemoteSource).

    Raises:
        SourceError: the page server or store cannot be reached or refused us.
        OSError, ValueError: the file cannot be opened or is malformed.
    """
    if spec.startswith(("tcp://", "tls://")):
        return RemoteSource(spec, token=token, timeout=timeout, ssl=ssl, offline_ok=offline_ok)
    if spec.startswith(("redis://", "rediss://")):
        from uffd.restore.redis_source import RedisSource

        return RedisSource(spec, timeout=timeout)
    return FileSource(spec)
