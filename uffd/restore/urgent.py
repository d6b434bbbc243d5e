"""A page server connection for faults only, read on the faulting path: :class:`UrgentLink`.

A fault on a page server's image is served on the handler's dispatch thread:
the READ frame is sent and its reply received into the page buffer right
there, with blocking calls that release the GIL while they wait. No future,
no reader thread, no GIL handed between two threads per fault (that deferred
path cost ~200 µs a fault while prefetch ran). The connection carries these
reads only, one at a time, so a fault's READ never queues behind prefetch
bytes on its stream, and the server answers URGENT READs first. Against a version-3 server the link
asks for a fault channel (LIST flagged FAULTS): the server then serves its
READs in C on a thread of their own, off its event loop and its GIL.

Any failure of the connection (a timeout, EOF, garbage) breaks the link for
good: the caller then takes its deferred path (``RemoteSource.fetch_into``),
which reports the error and is bounded by the handler's deadline. A refusal
of one read (an ERROR frame for its request) leaves the link usable.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time

from uffd.pagestore import protocol as p
from uffd.pagestore.client import _MAX_CONTROL, _HandshakeFrames, parse_address

__all__ = ["UrgentLink"]

_OFFSET = struct.Struct(">Q")
_ZERO = struct.Struct(">QQ")
# One recv takes a page's DATA frame and its END together; an ERROR frame fits whole
# (_MAX_CONTROL: the clients' one limit on a frame that is not DATA).
_READ_AHEAD = _MAX_CONTROL + p.HEADER.size
_CLOSE_WAIT = 1.0  # seconds close() waits for a read in progress (shut down: it ends at once)


class _Broken(Exception):
    """The server broke the protocol or closed the connection: the link is unusable."""


class UrgentLink:
    """One plain-TCP connection to a page server on which a caller reads synchronously.

    Calling context: ``read_into`` from any thread; a call never waits for
    another one (it returns False while the link is busy), and waits for the
    server at most ``timeout``. ``close()`` from any thread.

    Raises (constructor):
        PeerGoneError, RemoteError: the server refused us or broke the handshake.
        OSError: no connection (TimeoutError: none in ``timeout`` s).
    """

    def __init__(self, url: str, *, token: bytes | None = None, timeout: float = 10.0) -> None:
        address = parse_address(url)
        label = f"{address[0]}:{address[1]}"
        sock = socket.create_connection(address, timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._max_frame, regions, self._version = _handshake(sock, label, token)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._ids = {entry.name: index for index, entry in enumerate(regions.regions)}
        self._lock = threading.Lock()
        self._broken = False
        self._next_id = 0
        self._rx = memoryview(bytearray(_READ_AHEAD))
        self._start = self._end = 0
        self._deadline = 0.0

    @property
    def broken(self) -> bool:
        """True once the connection failed or was closed: ``read_into`` then returns False."""
        return self._broken

    @property
    def stale(self) -> bool:
        """True when the link is broken, or the server closed it or sent something unasked
        while no read is in progress (a restart): an idle link receives nothing."""
        if self._broken:
            return True
        if not self._lock.acquire(blocking=False):
            return False  # a read is in progress: it finds out itself
        try:
            return bool(select.select([self._sock], [], [], 0)[0])
        except (OSError, ValueError):
            return True
        finally:
            self._lock.release()

    def read_into(self, region: str, offset: int, view: memoryview, timeout: float) -> bool:
        """Receive the bytes [offset, +len(view)) of ``region`` into ``view``; True when done.

        False: not read here, and ``view`` may hold part of the bytes. The
        link is busy (another thread reads), broken (now or earlier: no
        reply in ``timeout`` s, a closed or garbled connection), or the
        server refused this read. The caller asks its other path, which
        says why.
        """
        if self._broken or not self._lock.acquire(blocking=False):
            return False
        try:
            if self._broken:
                return False
            self._deadline = time.monotonic() + timeout
            return self._read(self._ids[region], offset, view)
        except (OSError, p.ProtocolError, _Broken):  # TimeoutError is an OSError
            self._break()
            return False
        finally:
            self._lock.release()

    def _read(self, region: int, offset: int, view: memoryview) -> bool:
        """One READ (and one more per short reply) and its reply; False if refused."""
        placed = 0
        while placed < len(view):
            self._next_id = self._next_id % 0xFFFFFFFF + 1
            rid = self._next_id
            at = offset + placed
            frame = p.Read(region, at, len(view) - placed, True, rid)
            self._sock.sendall(p.encode(frame, self._version))
            served = self._reply(rid, at, view[placed:])
            if not served:
                return False
            placed += served
        return True

    def _reply(self, rid: int, offset: int, view: memoryview) -> int:
        """Receive the reply to READ ``rid`` of [offset, +len(view)); bytes served, 0: refused."""
        placed = 0
        while True:
            kind, _, got, length = p.parse_header(
                self._take(p.HEADER.size), self._max_frame, max_control=_MAX_CONTROL
            )
            if got != rid:
                raise _Broken(f"a {kind.name} frame for request {got}, not {rid}")
            if kind is p.FrameType.DATA:
                (at,) = _OFFSET.unpack(self._take(_OFFSET.size))
                size = length - _OFFSET.size
                if at != offset + placed or placed + size > len(view):
                    raise _Broken(f"DATA [{at}, +{size}) out of order")
                self._take_into(view[placed : placed + size])
                placed += size
            elif kind is p.FrameType.ZERO:
                at, size = _ZERO.unpack(self._take(_ZERO.size))
                if at != offset + placed or placed + size > len(view):
                    raise _Broken(f"ZERO [{at}, +{size}) out of order")
                view[placed : placed + size] = bytes(size)
                placed += size
            elif kind is p.FrameType.END:
                (served,) = _OFFSET.unpack(self._take(_OFFSET.size))
                if served != placed or self._end > self._start:
                    raise _Broken(f"END says {served} bytes, {placed} came")
                return placed
            elif kind is p.FrameType.ERROR:
                self._take(length)
                if self._end > self._start:
                    raise _Broken("bytes after an ERROR")
                return 0
            else:
                raise _Broken(f"unexpected {kind.name} frame")

    def _recv(self, into: memoryview) -> int:
        """One recv into ``into``, bounded by the read's deadline; the byte count."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply in time")
        self._sock.settimeout(left)
        n = self._sock.recv_into(into)
        if not n:
            raise _Broken("the server closed the connection")
        return n

    def _take(self, size: int) -> memoryview:
        """The next ``size`` bytes (at most the read-ahead buffer), receiving what is missing."""
        rx = self._rx
        if self._end - self._start < size:
            if self._start:
                rx[: self._end - self._start] = rx[self._start : self._end]
                self._end -= self._start
                self._start = 0
            while self._end < size:
                self._end += self._recv(rx[self._end :])
        out = rx[self._start : self._start + size]
        self._start += size
        return out

    def _take_into(self, dest: memoryview) -> None:
        """Fill ``dest`` from the read-ahead bytes, then straight from the socket."""
        n = min(len(dest), self._end - self._start)
        dest[:n] = self._rx[self._start : self._start + n]
        self._start += n
        if self._start == self._end:
            self._start = self._end = 0
        while n < len(dest):
            n += self._recv(dest[n:])

    def hand_over(self) -> tuple[int, int, int, dict[str, int]] | None:
        """Give the connection away, for the fault pump to read (``uffd._pump.RemoteLink``).

        Returns ``(fd, version, max_frame, region ids by name)``: the caller
        owns the socket's fd from then on, and ``read_into`` returns False
        for good. None when the link is broken or busy.
        """
        if self._broken or not self._lock.acquire(blocking=False):
            return None
        try:
            if self._broken:
                return None
            self._broken = True
            return self._sock.detach(), self._version, self._max_frame, dict(self._ids)
        finally:
            self._lock.release()

    def _break(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection (idempotent); a read in progress ends and returns False."""
        self._break()
        if self._lock.acquire(timeout=_CLOSE_WAIT):
            try:
                self._sock.close()
            finally:
                self._lock.release()


def _handshake(sock: socket.socket, label: str, token: bytes | None) -> tuple[int, p.Regions, int]:
    """HELLO, AUTH if wanted, LIST on a new connection: (max_frame, regions, version)."""
    frames = _HandshakeFrames(label)

    def next_frame() -> p.Frame:
        while not frames.pending:
            frames.feed(sock.recv(1 << 16))
        return frames.pop()

    hello, reply = frames.answer_hello(next_frame(), token, faults=True)
    sock.sendall(reply)
    regions = frames.check_regions(next_frame())
    if frames.pending or frames.decoder.buffered:
        raise frames.violation("frames nobody asked for after REGIONS")
    return hello.max_frame, regions, frames.version
