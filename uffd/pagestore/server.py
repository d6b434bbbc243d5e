"""An asyncio page server: serves a snapshot's pages over TCP (see docs/protocol.md).

Each client gets a HELLO, authenticates with AUTH when the server has a
token, then sends LIST and pipelined READ requests. Requests wait in a
per-client priority queue, URGENT ones (a faulting thread is blocked) ahead
of prefetch; a long request is served one piece at a time (a frame, or up
to 1 MiB of frames when sent from the file) and put back in the queue
between pieces, so an urgent request never waits for more than one piece.
Small pieces (an urgent page) are read from the page cache and written on
the event loop; large pieces (prefetch) are sent by a pool thread straight
from the file with ``sendfile(2)`` once their chunks are verified, so page
bytes are never copied through Python. The event loop keeps
accepting and answering meanwhile. Zero runs go out as ZERO frames (no bytes).
The transport's write buffer is bounded to nothing queued (high-water mark 0),
so an urgent reply never waits behind buffered prefetch bytes.

A broken client (a malformed or oversized frame, a wrong token, a handshake
that does not finish within ``handshake_timeout``: slow loris) gets an ERROR
frame and is disconnected; the others are not affected. A bad request (an
unknown region, a range outside it) gets an ERROR for that request id only.

:class:`ServerThread` runs a server on its own event-loop thread for tests
and synchronous programs; :func:`add_cli` adds ``serve`` and
``snapshot info`` to ``python -m uffd``.

This module is pure Python: no userfaultfd and no compiled extension needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import itertools
import os
import select
import socket
import threading
from typing import Any

from uffd.pagestore import protocol as p
from uffd.pagestore.snapshot import PageSource

__all__ = ["PageServer", "ServerStats", "ServerThread", "format_url"]

_READ_CHUNK = 1 << 16
_LINGER = 0.5
# Pieces up to this size are copied through the event loop (a thread hop would
# cost more than the copy: this is the urgent single-page case); larger ones
# are sent from the file with sendfile(2) by a pool thread.
_INLINE_MAX = 64 << 10
# A pool thread sends up to this much per turn (several DATA frames when a
# frame holds less): one thread hop per 1 MiB READ rather than one per frame.
# An urgent READ waits for at most one turn.
_BULK_PIECE = 1 << 20


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_url(host: str, port: int) -> str:
    """``tcp://HOST:PORT`` (an IPv6 host in brackets)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclasses.dataclass
class ServerStats:
    """Counters of a PageServer; updated on its event loop, readable from any thread.

    ``clients``: connections accepted; ``active``: connected now; ``requests``:
    READ frames received; ``bytes``: page bytes sent in DATA frames;
    ``zero_bytes``: bytes sent as ZERO ranges; ``errors``: ERROR frames sent.
    """

    clients: int = 0
    active: int = 0
    requests: int = 0
    bytes: int = 0
    zero_bytes: int = 0
    errors: int = 0


class _SendFailed(Exception):
    """Writing to the client's socket failed or stalled: the connection is finished."""


def _send_bytes(sock: socket.socket, data: bytes, flags: int, stall: float) -> None:
    """Send all of ``data`` on the non-blocking ``sock``, waiting at most ``stall`` per wait."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view, flags) :]
        except BlockingIOError:
            _wait_writable(sock, stall)


def _wait_writable(sock: socket.socket, stall: float) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    if not poller.poll(stall * 1000):
        raise _SendFailed(f"the client read nothing for {stall} s")


def _send_file(sock: socket.socket, fd: int, offset: int, count: int, stall: float) -> None:
    """sendfile(2) ``count`` bytes of ``fd`` at ``offset`` to the non-blocking ``sock``."""
    out = sock.fileno()
    while count:
        try:
            sent = os.sendfile(out, fd, offset, count)
        except BlockingIOError:
            _wait_writable(sock, stall)
            continue
        if not sent:
            raise _SendFailed("the file ended before the range sent (truncated while open?)")
        offset += sent
        count -= sent


class _Disconnect(Exception):
    """End this client's connection, after sending ERROR(code, message) if code is set."""

    def __init__(self, code: p.ErrorCode | int | None = None, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(eq=False)
class _Request:
    request_id: int
    region: str
    offset: int
    end: int
    served: int = 0


class _Client:
    """One connection: handshake, a frame reader and a worker serving its queue.

    Runs on the server's event loop; the worker hands file reads to the
    server's thread pool.
    """

    def __init__(
        self, server: PageServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.decoder = p.FrameDecoder(max_payload=server.max_frame)
        self.queue: asyncio.PriorityQueue[tuple[int, int, _Request]] = asyncio.PriorityQueue()
        self.pending = 0
        self.seq = itertools.count()
        self.frames: list[p.Frame] = []
        self.loop = asyncio.get_running_loop()
        self.last_activity = self.loop.time()
        self.partial_since: float | None = None
        self.write_lock = asyncio.Lock()
        # Nothing waits in the transport's buffer: drain() returns only once it
        # is empty, so an urgent reply is never queued behind prefetch bytes,
        # and a pool thread may write to the socket directly.
        writer.transport.set_write_buffer_limits(high=0)
        # The pool thread's own handle on the socket: a dup, so that a
        # connection closed under it never leaves it writing to a reused fd.
        self.raw: socket.socket | None = None
        self.sending: asyncio.Future[tuple[int, int]] | None = None
        if server.sendfile_ok:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                self.raw = socket.socket(fileno=os.dup(sock.fileno()))

    async def send(self, *frames: p.Frame) -> None:
        """Write ``frames`` in one go and wait for the buffer to drain (backpressure)."""
        stats = self.server.stats
        for frame in frames:
            if isinstance(frame, p.Error):
                stats.errors += 1
            elif isinstance(frame, p.Data):
                stats.bytes += len(frame.data)
            elif isinstance(frame, p.Zero):
                stats.zero_bytes += frame.length
        async with self.write_lock:
            self.writer.write(b"".join(p.encode(f) for f in frames))
            await self.writer.drain()
        self.last_activity = self.loop.time()

    async def next_frame(self, deadline: float | None) -> p.Frame:
        """The next frame; ``deadline`` (loop time) bounds the wait, else the idle timeout."""
        server = self.server
        while not self.frames:
            now = self.loop.time()
            if self.partial_since is not None:
                # A started frame must finish quickly whatever the idle timeout (slow loris).
                limit = self.partial_since + server.handshake_timeout
                deadline = limit if deadline is None else min(deadline, limit)
            if deadline is None:
                timeout = max(0.05, self.last_activity + server.idle_timeout - now)
            else:
                timeout = max(0.0, deadline - now)
            try:
                data = await asyncio.wait_for(self.reader.read(_READ_CHUNK), timeout)
            except asyncio.TimeoutError:
                if deadline is None and (self.pending or self._recently_active()):
                    continue
                raise _Disconnect(
                    p.ErrorCode.TIMEOUT,
                    "handshake not completed in time"
                    if self.decoder.buffered == 0 and deadline is not None
                    else "timed out waiting for a complete frame",
                ) from None
            if not data:
                raise _Disconnect()
            try:
                self.frames += self.decoder.feed(data)
            except p.ProtocolError as err:
                raise _Disconnect(err.code, err.message) from None
            self.partial_since = (
                (self.partial_since or self.loop.time()) if self.decoder.buffered else None
            )
            self.last_activity = self.loop.time()
        return self.frames.pop(0)

    def _recently_active(self) -> bool:
        return self.loop.time() - self.last_activity < self.server.idle_timeout

    async def run(self) -> None:
        """The whole connection: HELLO, handshake, then frames until EOF or an error."""
        server = self.server
        nonce = os.urandom(p.NONCE_SIZE)
        worker = None
        try:
            try:
                await self.send(
                    p.Hello(
                        nonce,
                        server.token is not None,
                        server.max_frame,
                        server.max_pending,
                    )
                )
                deadline = self.loop.time() + server.handshake_timeout
                first = await self.next_frame(deadline)
                if server.token is not None:
                    if not isinstance(first, p.Auth):
                        raise _Disconnect(
                            p.ErrorCode.AUTH_FAILED, "this server requires AUTH first"
                        )
                    if not p.check_auth(server.token, nonce, first.mac):
                        raise _Disconnect(p.ErrorCode.AUTH_FAILED, "wrong token")
                worker = asyncio.create_task(self.work())
                worker.add_done_callback(self._worker_done)
                if not isinstance(first, p.Auth):
                    await self.handle(first)
                while True:
                    await self.handle(await self.next_frame(None))
            except _Disconnect as stop:
                if stop.code is not None:
                    await self.send(p.Error(stop.code, stop.message))
                    await self.linger()
        except (ConnectionError, OSError):
            pass
        finally:
            if worker is not None:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker
            self.writer.close()
            if self.raw is not None:
                # Order: stop a pool thread still sending (shutdown makes its
                # sendfile fail at once), wait for it, then close the dup.
                with contextlib.suppress(OSError):
                    self.raw.shutdown(socket.SHUT_RDWR)
                if self.sending is not None:
                    await asyncio.wait([self.sending])
                self.raw.close()

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        # A worker that died (the peer vanished mid-write) must not leave the
        # reader queueing requests nobody serves: drop the connection.
        if not worker.cancelled() and worker.exception() is not None:
            self.writer.transport.abort()

    async def linger(self) -> None:
        """Half-close and drain what the peer still sends, so our ERROR is not lost to a RST."""
        if self.writer.can_write_eof():
            self.writer.write_eof()
        end = self.loop.time() + _LINGER
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
            while self.loop.time() < end:
                data = await asyncio.wait_for(self.reader.read(_READ_CHUNK), end - self.loop.time())
                if not data:
                    break

    async def handle(self, frame: p.Frame) -> None:
        """Answer or queue one frame received after the handshake."""
        server = self.server
        if isinstance(frame, p.Read):
            server.stats.requests += 1
            error = server.check_read(frame)
            if error is not None:
                await self.send(p.Error(error[0], error[1], frame.request_id))
            elif frame.length == 0:
                await self.send(p.End(0, frame.request_id))
            elif self.pending >= server.max_pending:
                await self.send(
                    p.Error(
                        p.ErrorCode.BUSY,
                        f"{self.pending} requests pending, the limit is {server.max_pending}",
                        frame.request_id,
                    )
                )
            else:
                name = server.names[frame.region]
                end = frame.offset + min(frame.length, server.max_read)
                request = _Request(frame.request_id, name, frame.offset, end)
                self.pending += 1
                self.queue.put_nowait((0 if frame.urgent else 1, next(self.seq), request))
        elif isinstance(frame, p.List):
            await self.send(server.regions_frame(frame.request_id))
        elif isinstance(frame, p.Error):
            raise _Disconnect()
        else:
            raise _Disconnect(
                p.ErrorCode.BAD_FRAME, f"a client may not send {frame.TYPE.name} here"
            )

    async def work(self) -> None:
        """Serve queued READs one piece at a time, most urgent first."""
        server = self.server
        while True:
            priority, seq, request = await self.queue.get()
            start = request.offset + request.served
            length = min(request.end - start, server.frame_bytes)
            rid = request.request_id
            if self.raw is not None and length > _INLINE_MAX:
                bulk = min(request.end - start, max(server.frame_bytes, _BULK_PIECE))
                await self.send_piece(priority, seq, request, start, bulk)
                continue
            try:
                # Page-cache hits are answered here; only reads that would block use a thread.
                frames = server.read_piece_cached(rid, request.region, start, length)
                if frames is None:
                    frames = await self.loop.run_in_executor(
                        server.executor, server.read_piece, rid, request.region, start, length
                    )
            except Exception as err:
                self.pending -= 1
                await self.send(p.Error(p.ErrorCode.INTERNAL, str(err), rid))
                continue
            request.served += length
            if request.offset + request.served < request.end:
                # Back in the queue behind any urgent request that arrived meanwhile.
                self.queue.put_nowait((priority, seq, request))
            else:
                self.pending -= 1
                frames.append(p.End(request.served, rid))
            await self.send(*frames)
            # drain() does not yield when the write went out at once and cached reads
            # do not either: yield so that other clients and this client's reader get a turn.
            await asyncio.sleep(0)

    async def send_piece(
        self, priority: int, seq: int, request: _Request, start: int, length: int
    ) -> None:
        """Send one large piece from a pool thread: verify, then sendfile (see send_file)."""
        server = self.server
        rid = request.request_id
        last = start + length >= request.end
        served = request.served + length
        async with self.write_lock:
            await self.writer.drain()
            # Kept until run() ends: a cancelled worker must not let the dup be
            # closed under a pool thread still sending.
            self.sending = self.loop.run_in_executor(
                server.executor,
                self.send_file,
                rid,
                request.region,
                start,
                length,
            )
            try:
                sent, zeros = await asyncio.shield(self.sending)
            except _SendFailed:
                raise
            except Exception as err:
                # Nothing was sent: the chunks are verified before the first byte goes out.
                self.pending -= 1
                self.writer.write(p.encode(p.Error(p.ErrorCode.INTERNAL, str(err), rid)))
                server.stats.errors += 1
                return
            server.stats.bytes += sent
            server.stats.zero_bytes += zeros
            request.served = served
            if last:
                # Counted before END goes out: a client that saw END sees the stats.
                self.pending -= 1
                self.writer.write(p.encode(p.End(served, rid)))
            else:
                self.queue.put_nowait((priority, seq, request))
        self.last_activity = self.loop.time()

    def send_file(self, rid: int, name: str, offset: int, length: int) -> tuple[int, int]:
        """The DATA and ZERO frames of one piece; returns (page bytes, zero bytes) sent.

        A present run longer than a frame holds goes out as several DATA frames.

        Runs in the thread pool while the event loop holds this client's
        write lock with the transport's buffer empty, so nothing else writes
        to the socket. Every chunk is verified (``file_extents``) before the
        first byte is sent, so an error then is a request-level ERROR.

        Raises:
            _SendFailed: the socket broke or the client stopped reading.
            Exception: from ``file_extents`` (nothing sent).
        """
        server = self.server
        source: Any = server.source
        runs = source.file_extents(name, offset, length)
        fd = source.fileno()
        sock = self.raw
        assert sock is not None
        stall = server.idle_timeout
        sent = zeros = 0
        small: list[bytes] = []
        try:
            for run_offset, run_length, file_offset in runs:
                if file_offset is None:
                    small.append(p.encode(p.Zero(run_offset, run_length, rid)))
                    zeros += run_length
                    continue
                for at in range(0, run_length, server.frame_bytes):
                    n = min(server.frame_bytes, run_length - at)
                    small.append(p.data_header(rid, run_offset + at, n))
                    _send_bytes(sock, b"".join(small), socket.MSG_MORE, stall)
                    small.clear()
                    _send_file(sock, fd, file_offset + at, n, stall)
                    sent += n
            if small:
                _send_bytes(sock, b"".join(small), 0, stall)
        except OSError as err:
            raise _SendFailed(f"sending to the client failed: {err}") from err
        return sent, zeros


class PageServer:
    """Serves the pages of ``source`` (a Snapshot or RawMemoryFile) over TCP.

    ``token``: when set, clients must prove they know it (HMAC of a nonce);
    binding to anything but a loopback address requires one. ``max_frame``:
    the largest payload accepted or sent; ``max_read``: the most served for one
    READ (more is served short: END says how much); ``max_pending``: queued
    requests per client (more get ERROR BUSY); ``idle_timeout``: seconds
    without frames or pending work before a client is dropped;
    ``handshake_timeout``: seconds for a client's first frame (its AUTH), and
    for any frame once started.

    Calling context: ``start``/``close``/``serve_forever`` on one event loop;
    ``source`` is read from a thread pool, so it must be thread-safe (Snapshot
    and RawMemoryFile are). The server does not close ``source``.

    Raises:
        ValueError: a non-loopback ``host`` without a token, an empty token,
            or a ``max_frame`` too small for one page.
    """

    def __init__(
        self,
        source: PageSource,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: bytes | None = None,
        max_frame: int = p.MAX_FRAME,
        max_read: int = p.MAX_FRAME,
        max_pending: int = 64,
        idle_timeout: float = 30.0,
        handshake_timeout: float = 5.0,
        workers: int | None = None,
    ) -> None:
        if token is not None and not token:
            raise ValueError("token is empty; pass None for no authentication or a real secret")
        if token is None and not _is_loopback(host):
            raise ValueError(
                f"binding to {host!r} without a token would serve memory contents to anyone "
                "who can reach it; pass token=... (or bind to 127.0.0.1)"
            )
        page_size = source.page_size
        if max_frame < page_size + 8:
            raise ValueError(f"max_frame {max_frame} cannot carry one {page_size}-byte page")
        if not 1 <= max_pending <= 0xFFFFFFFF:
            raise ValueError(f"max_pending {max_pending} must be at least 1")
        self.source = source
        self.host = host
        self.port = port
        self.token = token
        self.max_frame = max_frame
        self.max_read = max(page_size, max_read // page_size * page_size)
        self.frame_bytes = (max_frame - 8) // page_size * page_size
        self.max_pending = max_pending
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.names = [r.name for r in source.regions]
        # Sources that can say where their (verified) bytes are in a file are
        # sent with sendfile(2); others go through read().
        self.sendfile_ok = hasattr(source, "file_extents") and hasattr(source, "fileno")
        self._lengths = [r.length for r in source.regions]
        self._regions_frame = p.Regions(
            page_size, tuple(p.RegionEntry(r.name, r.length) for r in source.regions)
        )
        if len(p.encode(self._regions_frame)) - p.HEADER.size > max_frame:
            raise ValueError(f"the region list does not fit in max_frame {max_frame}")
        self.stats = ServerStats()
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="uffd-page-read"
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on; only after :meth:`start`."""
        if self._server is None or not self._server.sockets:
            raise ValueError("the server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        """``tcp://HOST:PORT`` of :attr:`address`."""
        return format_url(*self.address)

    def regions_frame(self, request_id: int) -> p.Regions:
        """The REGIONS answer to a LIST."""
        return dataclasses.replace(self._regions_frame, request_id=request_id)

    def check_read(self, frame: p.Read) -> tuple[p.ErrorCode, str] | None:
        """The ERROR (code, message) for a READ that cannot be served, else None."""
        if frame.region >= len(self.names):
            return p.ErrorCode.UNKNOWN_REGION, (
                f"no region {frame.region}; there are {len(self.names)} (see LIST)"
            )
        ps, length = self.source.page_size, self._lengths[frame.region]
        if frame.offset % ps or frame.length % ps:
            return p.ErrorCode.OUT_OF_RANGE, (
                f"offset {frame.offset} and length {frame.length} must be multiples of the "
                f"page size {ps}"
            )
        if frame.offset + frame.length > length:
            return p.ErrorCode.OUT_OF_RANGE, (
                f"[{frame.offset}, +{frame.length}) is outside region "
                f"{self.names[frame.region]!r} of {length} bytes"
            )
        return None

    def read_piece(self, request_id: int, name: str, offset: int, length: int) -> list[p.Frame]:
        """DATA and ZERO frames for one piece of a request (runs in the thread pool)."""
        frames: list[p.Frame] = []
        for run_offset, run_length, present in self.source.extents(name, offset, length):
            if present:
                data = self.source.read(name, run_offset, run_length)
                frames.append(p.Data(run_offset, data, request_id))
            else:
                frames.append(p.Zero(run_offset, run_length, request_id))
        return frames

    def read_piece_cached(
        self, request_id: int, name: str, offset: int, length: int
    ) -> list[p.Frame] | None:
        """Like :meth:`read_piece` from the page cache only, on the event loop.

        None as soon as a read would wait for the disk, or when the source
        has no ``read_cached`` (the caller then uses the thread pool).
        """
        read_cached = getattr(self.source, "read_cached", None)
        if read_cached is None:
            return None
        frames: list[p.Frame] = []
        for run_offset, run_length, present in self.source.extents(name, offset, length):
            if present:
                data = read_cached(name, run_offset, run_length)
                if data is None:
                    return None
                frames.append(p.Data(run_offset, data, request_id))
            else:
                frames.append(p.Zero(run_offset, run_length, request_id))
        return frames

    async def start(self) -> None:
        """Bind and start accepting clients.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._accept, self.host, self.port)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback that spawns our own task: asyncio would log the
        # cancellation of a handler task it created itself when close() drops clients.
        task = asyncio.get_running_loop().create_task(self._serve_client(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        self.stats.clients += 1
        self.stats.active += 1
        try:
            await _Client(self, reader, writer).run()
        finally:
            self.stats.active -= 1
            self._writers.discard(writer)

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled, then close."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            await self._server.serve_forever()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop accepting, drop every client at once and wait for them. Idempotent."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self.executor.shutdown(wait=False)


class ServerThread:
    """A PageServer on its own event-loop thread, for tests and synchronous programs.

    ``ServerThread(source, **kw)`` takes PageServer's keywords, starts the
    server and returns once it listens; ``address``/``url`` say where.
    :meth:`close` (or leaving the ``with`` block) drops every client, stops
    the loop and joins the thread; it is idempotent. ``source`` stays open.

    Raises:
        ValueError: as PageServer (checked in the calling thread).
        OSError: the address cannot be bound.
    """

    def __init__(self, source: PageSource, **kwargs: Any) -> None:
        self.server = PageServer(source, **kwargs)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="uffd-page-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as err:
            self._error = err
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.server.close())
            loop.close()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on."""
        return self.server.address

    @property
    def url(self) -> str:
        """``tcp://HOST:PORT``."""
        return self.server.url

    @property
    def stats(self) -> ServerStats:
        """The server's counters."""
        return self.server.stats

    def close(self) -> None:
        """Stop the server and join its thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
