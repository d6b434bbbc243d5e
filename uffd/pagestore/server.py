"""An asyncio page server: serves a snapshot's pages over TCP or TLS (see docs/protocol.md).

Each client gets a HELLO, authenticates with AUTH when the server has a
token, then sends LIST and pipelined READ requests. Requests wait in a
per-client priority queue, URGENT ones (a faulting thread is blocked) ahead
of prefetch; a long request is served one piece at a time (a frame, or up
to 1 MiB of frames when sent from the file) and put back in the queue
between pieces; a piece sent from the file stops at its next 256 KiB frame
when an urgent request arrives, so that one waits for at most one frame.
Small pieces (an urgent page) are read from the page cache and written on
the event loop; a cold urgent read goes to a pool of its own, never behind
prefetch. Large pieces are sent from the file with ``sendfile(2)`` by a pool
thread on a non-blocking socket: the thread sends what the socket takes and
returns, and the event loop waits (bounded by ``send_timeout``) for the
socket to drain, so a client that stops reading holds no thread. Zero runs
go out as ZERO frames (no bytes). The transport's write buffer is bounded to
nothing queued (high-water mark 0), so an urgent reply never waits behind
buffered prefetch bytes. Every chunk of a snapshot is verified once before
the server listens, so no read pays for checksumming a whole chunk.

A connection whose LIST is flagged FAULTS (protocol version 3: it carries
only READs, one at a time) is handed, after REGIONS, to a thread of its own
that serves its READs in C with the GIL released (uffd/pagestore/_faults.py),
so a fault never waits for this event loop, its pools or the GIL. Not under
TLS, nor for a source whose bytes are not plain ranges of one file (a
snapshot not verified at start): those connections stay here.

What one peer can hold is bounded: ``max_clients`` connections (when full,
the oldest connection still in its handshake makes room; when the process is
out of fds, accept backs off, evicts the same way and recovers), one pool job
per client at a time, ``max_pending`` queued requests, the handshake, frame,
send and idle timeouts (every wait on a peer has one), and the log: records
of a kind beyond 10 per 10 s are counted, not written.

A broken client (a malformed or oversized frame, a wrong token, a handshake
that does not finish within ``handshake_timeout``: slow loris) gets an ERROR
frame and is disconnected; the others are not affected. A bad request (an
unknown region, a range outside it) gets an ERROR for that request id only.

:class:`ServerThread` runs a server on its own event-loop thread for tests
and synchronous programs.

This module is pure Python and needs no userfaultfd; fault channels use the
compiled extension when it is there (without it they stay on the asyncio path).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import logging
import os
import resource
import socket
import ssl
import threading
from typing import Any

from uffd.pagestore import protocol as p
from uffd.pagestore._faults import FaultChannel, FaultTable
from uffd.pagestore._ratelog import RateLimitedLog
from uffd.pagestore._sendplan import Progress, SendPlan
from uffd.pagestore.snapshot import PageSource, SnapshotError

__all__ = ["PageServer", "ServerStats", "ServerThread", "default_max_clients", "format_url"]

log = logging.getLogger("uffd.pagestore.server")

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
# DATA frames of a bulk piece hold at most this much: an urgent READ arriving
# on the same connection waits for at most one such frame (plus what the
# kernel's socket buffers already hold), not for the whole piece.
_BULK_FRAME = 256 << 10
# A connection in its handshake is safe from eviction (to make room for a new
# one) for this long: an honest client's handshake is one round trip.
_HANDSHAKE_GRACE = 0.1
# accept() out of fds or memory: wait this long first, doubling up to the max.
_ACCEPT_BACKOFF = (0.005, 0.1)
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# fds kept for everything but clients (the snapshot, the loop, logging, a dup per
# bulk sender) when the default max_clients is derived from RLIMIT_NOFILE.
_FD_RESERVE = 32


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


def default_max_clients() -> int:
    """The default cap on connections: half the fds left under RLIMIT_NOFILE, 8 to 1024.

    A client costs one fd, and a second (a dup) while a bulk piece is sent.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - _FD_RESERVE) // 2))


@dataclasses.dataclass
class ServerStats:
    """Counters of a PageServer; updated on its event loop, readable from any thread.

    ``clients``: connections accepted; ``active``: connected now; ``requests``:
    READ frames received; ``bytes``: page bytes sent in DATA frames;
    ``zero_bytes``: bytes sent as ZERO ranges; ``errors``: ERROR frames sent;
    ``auth_failures``: clients refused for a wrong or missing token;
    ``evicted``: connections dropped in their handshake to make room (the
    ``max_clients`` cap or fds running out); ``accept_errors``: accept()
    failures for want of fds or memory (each one backed off and retried);
    ``stalled``: clients dropped because they stopped reading (send timeout);
    ``tls_failures``: TLS handshakes that failed. A fault channel's READs and
    bytes are added when its C loop returns (a READ it leaves to Python, or
    the end of the connection), not one by one.
    """

    clients: int = 0
    active: int = 0
    requests: int = 0
    bytes: int = 0
    zero_bytes: int = 0
    errors: int = 0
    auth_failures: int = 0
    evicted: int = 0
    accept_errors: int = 0
    stalled: int = 0
    tls_failures: int = 0


class _SendFailed(Exception):
    """Writing to the client's socket failed or stalled: the connection is finished."""


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

    Runs on the server's event loop; the worker hands file reads and
    non-blocking sendfile turns to the server's thread pools, one at a time.
    """

    def __init__(
        self,
        server: PageServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.decoder = p.FrameDecoder(max_payload=server.max_frame)
        self.queue: asyncio.PriorityQueue[tuple[int, int, _Request]] = asyncio.PriorityQueue()
        self.pending = 0
        self.seq = itertools.count()
        self.frames: list[p.Frame] = []
        self.loop = asyncio.get_running_loop()
        self.started = self.last_activity = self.loop.time()
        self.partial_since: float | None = None
        self.handshake_deadline: float | None = None
        self.expired: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.write_lock = asyncio.Lock()
        self.authenticated = False
        self.requests = self.bytes = self.zero_bytes = self.errors = 0
        self.reason = "closed by the client"
        # Nothing waits in the transport's buffer: drain() returns only once it
        # is empty, so an urgent reply is never queued behind prefetch bytes,
        # and a pool thread may write to the socket directly. Not under TLS:
        # asyncio's TLS transport resumes a writer paused at high=0 only on the
        # next write, so drain() would never return; its default bound (64 KiB) stays.
        if server.ssl is None:
            writer.transport.set_write_buffer_limits(high=0)
        # The pool thread's own handle on the socket, made at the first bulk
        # piece: a dup, so that a connection closed under it never leaves it
        # writing to a reused fd. None until then, or when fds ran out.
        self.raw: socket.socket | None = None
        self.sending: asyncio.Future[Progress] | None = None
        self.plan: SendPlan | None = None

    def count(self, frames: tuple[p.Frame, ...] | list[p.Frame]) -> None:
        """Add ``frames`` to the server's and this connection's counters."""
        stats = self.server.stats
        for frame in frames:
            if isinstance(frame, p.Error):
                stats.errors += 1
                self.errors += 1
            elif isinstance(frame, p.Data):
                stats.bytes += len(frame.data)
                self.bytes += len(frame.data)
            elif isinstance(frame, p.Zero):
                stats.zero_bytes += frame.length
                self.zero_bytes += frame.length

    async def send(self, *frames: p.Frame) -> None:
        """Write ``frames`` in one go and wait (at most ``send_timeout``) for them to drain."""
        self.count(frames)
        async with self.write_lock:
            # HELLO goes out in a version-1 header, which every client reads.
            version = self.decoder.version if self.authenticated else 1
            self.writer.write(b"".join(p.encode(f, version) for f in frames))
            await self.drain()
        self.last_activity = self.loop.time()

    async def drain(self) -> None:
        """``writer.drain()`` bounded by the send timeout: a peer that stops reading is dropped.

        Raises:
            _SendFailed: nothing drained for ``send_timeout`` seconds.
        """
        if not self.writer.transport.get_write_buffer_size():
            return  # all written at once: nothing to wait for (and no task to make)
        timeout = self.server.send_timeout
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except asyncio.TimeoutError:
            self.server.stats.stalled += 1
            raise _SendFailed(f"the client read nothing for {timeout} s") from None

    async def next_frame(self) -> p.Frame:
        """The next frame, or _Disconnect when the connection ends or a deadline passes.

        The deadlines (see :meth:`_deadline`) are kept by one timer per
        connection, not by a timeout per read: wrapping every read in
        ``wait_for`` cost a task per frame on the urgent path.
        """
        while not self.frames:
            data = await self.reader.read(_READ_CHUNK)
            if not data:
                if self.expired is not None:
                    raise _Disconnect(p.ErrorCode.TIMEOUT, self.expired)
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

    def _deadline(self) -> tuple[float, str]:
        """(loop time, reason) of the earliest deadline now in force.

        The handshake must finish within ``handshake_timeout``; a started
        frame must finish within the same time whatever the idle timeout
        (slow loris); otherwise nothing received and nothing sent for
        ``idle_timeout`` ends the connection. Pending requests do not count
        as activity: a client that stopped reading is caught by the send
        timeout, one whose replies flow is active.
        """
        server = self.server
        options = [(self.last_activity + server.idle_timeout, f"idle for {server.idle_timeout} s")]
        if self.handshake_deadline is not None:
            options.append((self.handshake_deadline, "handshake not completed in time"))
        if self.partial_since is not None:
            options.append(
                (
                    self.partial_since + server.handshake_timeout,
                    "timed out waiting for a complete frame",
                )
            )
        return min(options)

    def _watch(self) -> None:
        """The connection's timer: end the read side once a deadline passed, else re-arm."""
        when, reason = self._deadline()
        if self.loop.time() >= when:
            self.expired = reason
            self.reader.feed_eof()
            return
        self.timer = self.loop.call_at(when, self._watch)

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
                self.handshake_deadline = self.loop.time() + server.handshake_timeout
                self._watch()
                first = await self.next_frame()
                self.handshake_deadline = None
                if server.token is not None:
                    if not isinstance(first, p.Auth):
                        self.auth_failed("sent no AUTH")
                        raise _Disconnect(
                            p.ErrorCode.AUTH_FAILED, "this server requires AUTH first"
                        )
                    if not p.check_auth(server.token, nonce, first.mac):
                        self.auth_failed("wrong token")
                        raise _Disconnect(p.ErrorCode.AUTH_FAILED, "wrong token")
                self.authenticated = True
                worker = asyncio.create_task(self.work())
                worker.add_done_callback(self._worker_done)
                if not isinstance(first, p.Auth):
                    await self.handle(first)
                while True:
                    await self.handle(await self.next_frame())
            except _Disconnect as stop:
                if stop.code is not None:
                    self.reason = f"{p.error_name(stop.code)}: {stop.message}"
                    await self.send(p.Error(stop.code, stop.message))
                    await self.linger()
        except _SendFailed as err:
            self.reason = str(err)
        except (ConnectionError, OSError) as err:
            self.reason = f"connection error: {err}"
        finally:
            if self.timer is not None:
                self.timer.cancel()
            if worker is not None:
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await worker
            if self.sending is not None:
                # Non-blocking turns end quickly; the dup outlives the pool thread's use.
                await asyncio.wait([self.sending])
            self.writer.transport.abort()
            if self.raw is not None:
                self.raw.close()

    def auth_failed(self, why: str) -> None:
        """Count and log (rate-limited) a refused authentication."""
        self.server.stats.auth_failures += 1
        self.server.ratelog.log(
            "auth", logging.WARNING, "client %s: authentication failed (%s)", self.peer, why
        )

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        # A worker that died (the peer vanished mid-write, or stopped reading)
        # must not leave the reader queueing requests nobody serves: drop the connection.
        if not worker.cancelled() and worker.exception() is not None:
            self.reason = str(worker.exception()) or type(worker.exception()).__name__
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
        if isinstance(frame, p.Map):
            error = server.check_read(frame)
            if error is not None:
                await self.send(p.Error(error[0], error[1], frame.request_id))
            else:
                await self.send(*server.presence(frame), p.End(frame.length, frame.request_id))
        elif isinstance(frame, p.Read):
            await self.handle_read(frame)
        elif isinstance(frame, p.List):
            if frame.faults:
                await self.hand_off(frame)
            await self.send(server.regions_frame(frame.request_id))
        elif isinstance(frame, p.Error):
            raise _Disconnect()
        else:
            raise _Disconnect(p.ErrorCode.BAD_FRAME, server.not_from_client(frame.TYPE))

    async def hand_off(self, frame: p.List) -> None:
        """Answer a LIST flagged FAULTS and serve the connection on a fault channel until it ends.

        Returns (the caller answers the LIST here) when the channel cannot be
        used: TLS, a source the C loop cannot serve, no fd for the dup, or
        frames already sent behind the LIST (which the flag's rules forbid).
        Reading stops before REGIONS goes out, so every byte the client sends
        after it is left in the socket for the channel.

        Raises:
            _Disconnect: the channel ended (``reason`` says why); never
                with a code, the channel sent any ERROR itself.
        """
        server = self.server
        sock = self.writer.get_extra_info("socket")
        transport = self.writer.transport
        if (
            server.faults is None
            or sock is None
            or not isinstance(transport, asyncio.Transport)
            or self.frames
            or self.decoder.buffered
        ):
            return
        transport.pause_reading()
        try:
            raw = socket.socket(fileno=os.dup(sock.fileno()))
        except OSError:
            transport.resume_reading()
            return
        try:
            await self.send(server.regions_frame(frame.request_id))
        except BaseException:
            raw.close()
            raise
        if self.timer is not None:
            self.timer.cancel()
        channel = FaultChannel(server, raw, self.decoder.version, self.count_channel)
        # The dup carries the connection from here: the transport lets go of its fd.
        self.writer.transport.abort()
        channel.start()
        try:
            self.reason = await asyncio.shield(channel.finished)
        finally:
            await channel.wait()
        raise _Disconnect()

    def count_channel(self, requests: int, frames: list[p.Frame], data: int, zeros: int) -> None:
        """Add what a fault channel served to the counters (on the event loop)."""
        stats = self.server.stats
        stats.requests += requests
        self.requests += requests
        stats.bytes += data
        self.bytes += data
        stats.zero_bytes += zeros
        self.zero_bytes += zeros
        self.count(frames)

    async def handle_read(self, frame: p.Read) -> None:
        """Refuse a READ, answer it here (empty, or small and urgent), or queue it for work()."""
        server = self.server
        server.stats.requests += 1
        self.requests += 1
        error = server.check_read(frame)
        if error is not None:
            await self.send(p.Error(error[0], error[1], frame.request_id))
            return
        if frame.length == 0:
            await self.send(p.End(0, frame.request_id))
            return
        if self.pending >= server.max_pending:
            await self.send(
                p.Error(
                    p.ErrorCode.BUSY,
                    f"{self.pending} requests pending, the limit is {server.max_pending}",
                    frame.request_id,
                )
            )
            return
        name = server.names[frame.region]
        end = frame.offset + min(frame.length, server.max_read)
        if frame.urgent and await self.answer_now(frame.request_id, name, frame.offset, end):
            return
        request = _Request(frame.request_id, name, frame.offset, end)
        self.pending += 1
        self.queue.put_nowait((0 if frame.urgent else 1, next(self.seq), request))
        if frame.urgent and self.plan is not None:
            self.plan.stop = True  # the bulk piece yields at its next frame

    async def answer_now(self, rid: int, name: str, offset: int, end: int) -> bool:
        """Answer a small urgent READ here if nothing else is being served and its pages are
        in the page cache (one task switch less on the faulting page's path); else False."""
        if self.busy or not self.queue.empty() or self.write_lock.locked():
            return False
        if end - offset > min(_INLINE_MAX, self.server.frame_bytes):
            return False
        frames = self.server.read_piece_cached(rid, name, offset, end - offset)
        if frames is None:
            return False
        frames.append(p.End(end - offset, rid))
        await self.send(*frames)
        return True

    async def work(self) -> None:
        """Serve queued READs one piece at a time, most urgent first."""
        server = self.server
        while True:
            self.busy = False
            priority, seq, request = await self.queue.get()
            self.busy = True
            start = request.offset + request.served
            length = min(request.end - start, server.frame_bytes)
            rid = request.request_id
            if length > _INLINE_MAX and self.bulk_socket() is not None:
                bulk = min(request.end - start, max(server.frame_bytes, _BULK_PIECE))
                await self.send_piece(priority, seq, request, start, bulk)
                continue
            try:
                # Page-cache hits are answered here; only reads that would block use a
                # thread, from the urgent pool for a faulting page, so never behind prefetch.
                frames = server.read_piece_cached(rid, request.region, start, length)
                if frames is None:
                    pool = server.urgent_executor if priority == 0 else server.executor
                    frames = await self.loop.run_in_executor(
                        pool, server.read_piece, rid, request.region, start, length
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

    def bulk_socket(self) -> socket.socket | None:
        """The dup of the socket for sendfile, made once; None without sendfile or fds."""
        if self.raw is None and self.server.sendfile_ok:
            sock = self.writer.get_extra_info("socket")
            if sock is None:
                return None
            try:
                fd = os.dup(sock.fileno())
            except OSError as err:
                # Out of fds: this piece goes through the event loop instead.
                self.server.ratelog.log(
                    "dup", logging.WARNING, "no fd for sendfile to %s: %s", self.peer, err
                )
                return None
            self.raw = socket.socket(fileno=fd)
            self.raw.setblocking(False)
        return self.raw

    async def send_piece(
        self, priority: int, seq: int, request: _Request, start: int, length: int
    ) -> None:
        """Send one large piece with sendfile from pool threads, never blocking on the peer.

        The chunks the piece covers are verified before the first byte goes
        out, so a bad chunk is a request-level ERROR. Then each pool turn sends
        what the socket takes and returns; between turns the event loop waits
        for the socket to drain, at most ``send_timeout``.

        Raises:
            _SendFailed: the socket broke or the client stopped reading.
        """
        server = self.server
        rid = request.request_id
        source: Any = server.source
        last = start + length >= request.end
        async with self.write_lock:
            await self.drain()
            try:
                runs = await self.loop.run_in_executor(
                    server.executor, source.file_extents, request.region, start, length
                )
            except Exception as err:
                # Nothing was sent: the chunks are verified before the first byte goes out.
                self.pending -= 1
                self.count([p.Error(p.ErrorCode.INTERNAL, str(err), rid)])
                self.writer.write(
                    p.encode(p.Error(p.ErrorCode.INTERNAL, str(err), rid), self.decoder.version)
                )
                return
            sock = self.raw
            assert sock is not None
            frame = min(server.frame_bytes, _BULK_FRAME)
            plan = SendPlan(rid, runs, frame, source.fileno(), self.decoder.version)
            # An urgent READ arriving meanwhile stops the plan at the next frame.
            self.plan = plan
            try:
                while True:
                    # Kept until run() ends: a cancelled worker must not let the dup be
                    # closed under a pool thread still sending.
                    self.sending = self.loop.run_in_executor(server.executor, plan.advance, sock)
                    try:
                        progress = await asyncio.shield(self.sending)
                    except OSError as err:
                        raise _SendFailed(f"sending to the client failed: {err}") from err
                    if progress is not Progress.BLOCKED:
                        break
                    await self.writable(sock)
            finally:
                self.plan = None
            server.stats.bytes += plan.sent
            server.stats.zero_bytes += plan.zeros
            self.bytes += plan.sent
            self.zero_bytes += plan.zeros
            request.served += plan.covered
            if last and progress is Progress.DONE:
                # Counted before END goes out: a client that saw END sees the stats.
                self.pending -= 1
                self.writer.write(p.encode(p.End(request.served, rid), self.decoder.version))
            else:
                self.queue.put_nowait((priority, seq, request))
        self.last_activity = self.loop.time()

    async def writable(self, sock: socket.socket) -> None:
        """Wait until ``sock`` can take more, at most ``send_timeout`` seconds.

        Raises:
            _SendFailed: it did not drain in time (the client stopped reading).
        """
        ready: asyncio.Future[None] = self.loop.create_future()
        fd = sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_writer(fd, wake)
        try:
            await asyncio.wait_for(ready, self.server.send_timeout)
        except asyncio.TimeoutError:
            self.server.stats.stalled += 1
            raise _SendFailed(f"the client read nothing for {self.server.send_timeout} s") from None
        finally:
            self.loop.remove_writer(fd)

    def summary(self) -> str:
        """One line for the log: who, how long, what was served, why it ended."""
        return (
            f"client {self.peer}: {self.loop.time() - self.started:.1f} s, "
            f"{self.requests} requests, {self.bytes} bytes of data, {self.zero_bytes} bytes "
            f"as zero ranges, {self.errors} errors; {self.reason}"
        )


class PageServer:
    """Serves the pages of ``source`` (a Snapshot or RawMemoryFile) over TCP or TLS.

    ``token``: when set, clients must prove they know it (HMAC of a nonce).
    ``ssl``: a server-side ``ssl.SSLContext`` (certificate and key loaded;
    ``verify_mode = CERT_REQUIRED`` with a CA for mutual TLS): every
    connection is TLS and page data is encrypted and authenticated on the
    wire; sendfile is then not used (the bytes must pass through the TLS
    library). Binding to anything but a loopback address requires TLS, or
    ``insecure_plaintext=True`` (logged as a warning: page data then travels
    in clear and can be altered on the path), and a token or client
    certificates.

    ``max_frame``: the largest payload accepted or sent; ``max_read``: the
    most served for one READ (more is served short: END says how much);
    ``max_pending``: queued requests per client (more get ERROR BUSY);
    ``max_clients``: connections at once (default :func:`default_max_clients`;
    when full, the oldest connection still in its handshake is dropped for the
    new one, and if none is, new ones wait in the listen backlog);
    ``idle_timeout``: seconds without a frame received or sent before a client
    is dropped; ``handshake_timeout``: seconds for a client's first frame (its
    AUTH) and TLS handshake, and for any frame once started; ``send_timeout``:
    seconds a reply may wait for the client to read before it is dropped;
    ``verify``: checksum every chunk of the snapshot in :meth:`start`, before
    listening (failing chunks are logged and answered with ERROR INTERNAL).

    Calling context: ``start``/``close``/``serve_forever`` on one event loop;
    ``source`` is read from thread pools, so it must be thread-safe (Snapshot
    and RawMemoryFile are). The server does not close ``source``.

    Raises:
        ValueError: a non-loopback ``host`` without TLS (and without
            ``insecure_plaintext``) or without a token or client certificates,
            an empty token, a ``max_frame`` too small for one page, or a limit
            below 1.
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
        max_clients: int | None = None,
        idle_timeout: float = 30.0,
        handshake_timeout: float = 5.0,
        send_timeout: float = 10.0,
        workers: int | None = None,
        ssl: ssl.SSLContext | None = None,
        insecure_plaintext: bool = False,
        verify: bool = True,
    ) -> None:
        if token is not None and not token:
            raise ValueError(
                "token is empty; pass None for no authentication or a real secret "
                "(uffd serve: a non-empty --token-file or UFFD_TOKEN)"
            )
        if not _is_loopback(host):
            _check_exposure(host, token, ssl, insecure_plaintext)
        page_size = source.page_size
        if max_frame < page_size + 8:
            raise ValueError(f"max_frame {max_frame} cannot carry one {page_size}-byte page")
        if not 1 <= max_pending <= 0xFFFFFFFF:
            raise ValueError(f"max_pending {max_pending} must be at least 1")
        if max_clients is not None and max_clients < 1:
            raise ValueError(f"max_clients {max_clients} must be at least 1")
        self.source = source
        self.host = host
        self.port = port
        self.token = token
        self.ssl = ssl
        self.insecure_plaintext = insecure_plaintext
        self.verify = verify
        self.max_frame = max_frame
        self.max_read = max(page_size, max_read // page_size * page_size)
        self.frame_bytes = (max_frame - 8) // page_size * page_size
        self.max_pending = max_pending
        self.max_clients = default_max_clients() if max_clients is None else max_clients
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.names = [r.name for r in source.regions]
        # Sources that can say where their (verified) bytes are in a file are
        # sent with sendfile(2); others go through read(). TLS must see the bytes.
        self.sendfile_ok = (
            ssl is None and hasattr(source, "file_extents") and hasattr(source, "fileno")
        )
        self._lengths = [r.length for r in source.regions]
        self._regions_frame = p.Regions(
            page_size, tuple(p.RegionEntry(r.name, r.length) for r in source.regions)
        )
        if len(p.encode(self._regions_frame)) - p.HEADER.size > max_frame:
            raise ValueError(f"the region list does not fit in max_frame {max_frame}")
        self.stats = ServerStats()
        self.ratelog = RateLimitedLog(log)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="uffd-page-read"
        )
        # Cold reads of faulting pages: never queued behind prefetch in the pool above.
        self.urgent_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="uffd-page-urgent"
        )
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Every connection's task -> its _Client once the transport is up (None
        # before), and -> the loop time it was accepted.
        self._clients: dict[asyncio.Task[None], _Client | None] = {}
        self._accepted: dict[asyncio.Task[None], float] = {}
        self._room = asyncio.Event()
        # What fault channels read (built by start()); None: they stay on the asyncio path.
        self.faults: FaultTable | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on.

        Raises:
            ValueError: :meth:`start` has not run yet.
        """
        if self._listener is None:
            raise ValueError("the server is not started")
        host, port = self._listener.getsockname()[:2]
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

    def answer_read(self, frame: p.Read) -> list[p.Frame]:
        """The whole answer to ``frame``, read here (blocking): for a fault channel's thread.

        What the asyncio path sends for it: ERROR for a bad READ (the same
        code and message), else DATA and ZERO frames and END, or an ERROR
        INTERNAL after the pieces read before a read failed.
        """
        error = self.check_read(frame)
        rid = frame.request_id
        if error is not None:
            return [p.Error(error[0], error[1], rid)]
        name = self.names[frame.region]
        end = frame.offset + min(frame.length, self.max_read)
        frames: list[p.Frame] = []
        for start in range(frame.offset, end, self.frame_bytes):
            try:
                frames += self.read_piece(rid, name, start, min(self.frame_bytes, end - start))
            except Exception as err:
                return [*frames, p.Error(p.ErrorCode.INTERNAL, str(err), rid)]
        return [*frames, p.End(end - frame.offset, rid)]

    @staticmethod
    def not_from_client(kind: p.FrameType) -> str:
        """The ERROR message for a frame type a client may not send (here or on a fault channel)."""
        return f"a client may not send {kind.name} here"

    def count_stalled(self) -> None:
        """Count a client dropped because it stopped reading (on the event loop)."""
        self.stats.stalled += 1

    def presence(self, frame: p.Map) -> list[p.Frame]:
        """The PRESENCE frames answering ``frame`` (already checked): the stored-page bitmap.

        A snapshot knows its zero pages, so this costs no page I/O (a raw file
        asks the file system for its holes). One frame per 1 GiB of 4 KiB pages.
        """
        ps = self.source.page_size
        name = self.names[frame.region]
        step = p.MAX_PRESENCE_BYTES * 8 * ps
        frames: list[p.Frame] = []
        for start in range(frame.offset, frame.offset + frame.length, step):
            length = min(step, frame.offset + frame.length - start)
            bits = 0
            for run_offset, run_length, present in self.source.extents(name, start, length):
                if present:
                    first = (run_offset - start) // ps
                    bits |= ((1 << (run_length // ps)) - 1) << first
            pages = length // ps
            frames.append(
                p.Presence(start, bits.to_bytes((pages + 7) // 8, "little"), frame.request_id)
            )
        return frames

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
        """Verify the snapshot (if ``verify``), bind and start accepting clients.

        Raises:
            socket.gaierror: the host name cannot be resolved.
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        if self.verify and hasattr(self.source, "verify"):
            await loop.run_in_executor(self.executor, self._verify)
        if self.ssl is None and (self.verify or not hasattr(self.source, "verify")):
            # Fault channels need verified bytes in one file; a TLS client keeps the asyncio path.
            self.faults = await loop.run_in_executor(
                self.executor,
                lambda: FaultTable.build(
                    self.source,
                    max_read=self.max_read,
                    frame_bytes=self.frame_bytes,
                    versions=p.VERSIONS,
                    idle_timeout=self.idle_timeout,
                    frame_timeout=self.handshake_timeout,
                    send_timeout=self.send_timeout,
                ),
            )
        if self.ssl is None and not _is_loopback(self.host):
            log.warning(
                "serving %s on %s WITHOUT TLS (insecure plaintext): anyone on the path can "
                "read the memory and change what the restored processes get",
                self.source.path,
                self.host,
            )
        self._listener = _bind(self.host, self.port)
        self._acceptor = loop.create_task(self._accept_loop(self._listener))

    def _verify(self) -> None:
        failures: list[SnapshotError] = []
        source: Any = self.source
        pages = source.verify(failures)
        log.info("verified %d stored pages of %s", pages, self.source.path)
        for err in failures:
            log.error("%s (reads of it get ERROR INTERNAL)", err)

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept clients up to ``max_clients``, surviving fd exhaustion (see the class)."""
        loop = asyncio.get_running_loop()
        backoff = _ACCEPT_BACKOFF[0]
        while True:
            while self.stats.active >= self.max_clients and not self._evict_one("full"):
                # Wait for a client to leave, or for the oldest handshake to outlive its grace.
                self._room.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), self._grace_left())
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as err:
                if err.errno not in _OUT_OF_RESOURCES:
                    if err.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                        continue
                    raise
                self.stats.accept_errors += 1
                self.ratelog.log(
                    "accept",
                    logging.WARNING,
                    "accept failed (%s); %d clients connected, backing off %.3f s",
                    os.strerror(err.errno or 0),
                    self.stats.active,
                    backoff,
                )
                # Room now rather than when some handshake times out.
                self._evict_one("out of fds")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _ACCEPT_BACKOFF[1])
                continue
            backoff = _ACCEPT_BACKOFF[0]
            # Counted from accept, not from when the task first runs: the cap must
            # hold even when accept() keeps succeeding without yielding.
            self.stats.clients += 1
            self.stats.active += 1
            task = loop.create_task(self._serve_client(sock, addr))
            self._tasks.add(task)
            self._clients[task] = None
            self._accepted[task] = loop.time()
            task.add_done_callback(self._client_done)
            await asyncio.sleep(0)

    def _oldest_handshake(self) -> tuple[float, asyncio.Task[None]] | None:
        """(start time, task) of the oldest connection still in its handshake, if any."""
        oldest: tuple[float, asyncio.Task[None]] | None = None
        for task, client in self._clients.items():
            started = self._accepted[task]
            if (client is None or not client.authenticated) and (
                oldest is None or started < oldest[0]
            ):
                oldest = (started, task)
        return oldest

    def _grace_left(self) -> float:
        """Seconds until the oldest handshake may be evicted (the handshake timeout if none)."""
        oldest = self._oldest_handshake()
        if oldest is None:
            return self.handshake_timeout
        grace = min(_HANDSHAKE_GRACE, self.handshake_timeout)
        return max(0.001, oldest[0] + grace - asyncio.get_running_loop().time())

    def _evict_one(self, why: str) -> bool:
        """Drop the oldest connection in its handshake if it had its grace; False if none did.

        The grace (0.1 s) lets an honest client finish its handshake (one round
        trip) however fast a flood connects behind it.
        """
        oldest = self._oldest_handshake()
        now = asyncio.get_running_loop().time()
        if oldest is None or now - oldest[0] < min(_HANDSHAKE_GRACE, self.handshake_timeout):
            return False
        task = oldest[1]
        client = self._clients.pop(task)
        del self._accepted[task]
        self.stats.evicted += 1
        peer = "a connecting client" if client is None else client.peer
        self.ratelog.log("evict", logging.WARNING, "dropped %s in its handshake (%s)", peer, why)
        if client is not None:
            client.reason = f"dropped in its handshake ({why})"
            client.writer.transport.abort()
        task.cancel()
        return True

    def _client_done(self, task: asyncio.Task[None]) -> None:
        self.stats.active -= 1
        self._tasks.discard(task)
        self._clients.pop(task, None)
        self._accepted.pop(task, None)
        self._room.set()

    async def _serve_client(self, sock: socket.socket, addr: Any) -> None:
        """One connection from accept to close; every path closes what it opened."""
        peer = format_url(str(addr[0]), int(addr[1]))[6:] if addr else "?"
        writer: asyncio.StreamWriter | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.ratelog.log("connect", logging.INFO, "client %s connected", peer)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader(limit=_READ_CHUNK)
            protocol = asyncio.StreamReaderProtocol(reader)
            try:
                transport, _ = await asyncio.wait_for(
                    loop.connect_accepted_socket(
                        lambda: protocol,
                        sock,
                        ssl=self.ssl,
                        ssl_handshake_timeout=self.handshake_timeout if self.ssl else None,
                    ),
                    self.handshake_timeout,
                )
            except (ssl.SSLError, asyncio.TimeoutError, ConnectionError, OSError) as err:
                if self.ssl is not None:
                    self.stats.tls_failures += 1
                    self.ratelog.log(
                        "tls",
                        logging.WARNING,
                        "client %s: TLS handshake failed: %s",
                        peer,
                        getattr(err, "reason", None) or repr(err),
                    )
                return
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            client = _Client(self, reader, writer, peer)
            task = asyncio.current_task()
            if task in self._clients:
                self._clients[task] = client
            try:
                await client.run()
            finally:
                self.ratelog.log("summary", logging.INFO, "%s", client.summary())
        except asyncio.CancelledError:
            pass
        except Exception as err:  # one client's bug must not become a traceback per connection
            self.ratelog.log("client-error", logging.ERROR, "client %s failed: %r", peer, err)
        finally:
            if writer is not None:
                writer.transport.abort()
            else:
                sock.close()

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled, then close."""
        if self._listener is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop accepting, drop every client at once and wait for them. Idempotent."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._acceptor
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
        for client in list(self._clients.values()):
            if client is not None:
                client.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.faults is not None:
            self.faults.close()
            self.faults = None
        self.executor.shutdown(wait=False)
        self.urgent_executor.shutdown(wait=False)


def _check_exposure(
    host: str, token: bytes | None, context: ssl.SSLContext | None, insecure_plaintext: bool
) -> None:
    """Refuse a non-loopback bind that would serve memory unencrypted or to anyone."""
    mutual = context is not None and context.verify_mode == ssl.CERT_REQUIRED
    if token is None and not mutual:
        raise ValueError(
            f"binding to {host!r} without a token or client certificates would serve memory "
            "contents to anyone who can reach it; set a token (token=...; uffd serve: "
            "--token-file F or UFFD_TOKEN) or require client certificates, or bind to 127.0.0.1"
        )
    if context is None and not insecure_plaintext:
        raise ValueError(
            f"binding to {host!r} without TLS would send memory contents in clear, open to "
            "change on the path; pass ssl=<server SSLContext> (uffd serve: --tls-cert and "
            "--tls-key), or insecure_plaintext=True (--insecure-plaintext) to accept that"
        )


def _bind(host: str, port: int) -> socket.socket:
    """A non-blocking listening socket on the first address ``host`` resolves to.

    Raises:
        socket.gaierror: ``host`` cannot be resolved.
        OSError: binding or listening failed.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


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
