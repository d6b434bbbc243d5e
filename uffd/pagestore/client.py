"""Page-server clients: :class:`PageClient` (asyncio) and :class:`ThreadedPageClient`.

Both speak the protocol of :mod:`uffd.pagestore.protocol` to a
:class:`uffd.pagestore.server.PageServer`:
HELLO, AUTH when the server wants a token, LIST, then pipelined READs (as
many in flight as the server's HELLO allows). A read whose reply is split or
short is completed by asking for the rest; ZERO ranges become zero bytes.
ThreadedPageClient does not run asyncio: a blocking socket and one reader
thread that receives page bytes straight into the destination buffer
(``fetch_into`` saves the last copy too), which is what a restore's
prefetcher needs to keep up with loopback speeds.

Failures are of three kinds: the server refused a request (``RemoteError``
with its code and message, the connection stays usable), the connection
broke under you (every pending and later read fails with ``PeerGoneError``,
a ConnectionError naming the server), or you closed the client (ValueError).
No call waits forever: each request is bounded by ``request_timeout``.

This module is pure Python: no userfaultfd and no compiled extension needed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import socket
import ssl as _ssl
import struct
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from uffd.pagestore import protocol as p
from uffd.pagestore._tls import TLSStream, describe_tls_error
from uffd.restore.priority import bulk_thread_priority

__all__ = [
    "MAX_ACCEPTED_FRAME",
    "PageClient",
    "PeerGoneError",
    "RemoteError",
    "ThreadedPageClient",
    "parse_address",
    "tls_context",
]

_READ_CHUNK = 1 << 18
# The largest max_frame a server may announce: what one frame may make a client
# buffer. 16x the server's default; a server announcing more is refused.
MAX_ACCEPTED_FRAME = 16 << 20
# After the handshake only DATA frames are large (and they go straight into the
# caller's buffer); a ZERO, END or ERROR frame longer than this is a violation.
_MAX_CONTROL = 64 << 10
# READs in flight per connection, whatever the server's HELLO offers.
_MAX_WINDOW = 1024


class PeerGoneError(ConnectionError):
    """The connection to the page server broke; the message names the server."""


class RemoteError(Exception):
    """The server answered with an ERROR frame: ``code`` (an ErrorCode) and ``message``."""

    def __init__(self, code: int, message: str, address: str = "") -> None:
        origin = f"page server {address}: " if address else ""
        super().__init__(f"{origin}{p.error_name(code)}: {message}")
        self.code = code
        self.message = message


def parse_address(url_or_host: str, port: int | None = None) -> tuple[str, int]:
    """(host, port) from ``"tcp://HOST:PORT"`` or ``"tls://HOST:PORT"`` (IPv6 in
    brackets), or ``HOST`` and ``port``.

    Raises:
        ValueError: no port, or a scheme other than tcp and tls.
    """
    if "://" in url_or_host:
        parts = urlsplit(url_or_host)
        if parts.scheme not in ("tcp", "tls") or parts.hostname is None or parts.port is None:
            raise ValueError(f"{url_or_host!r} is not a tcp://HOST:PORT or tls://HOST:PORT address")
        if port is not None and port != parts.port:
            raise ValueError(f"port {port} contradicts the URL {url_or_host!r}")
        return parts.hostname, parts.port
    if port is None:
        raise ValueError(f"no port for host {url_or_host!r}; pass port= or a tcp:// URL")
    return url_or_host, port


def tls_context(url_or_host: str, context: _ssl.SSLContext | None) -> _ssl.SSLContext | None:
    """The TLS context a client uses: ``context``, else a default one for a ``tls://`` URL.

    The default verifies the server against the system's trusted CAs; pass
    ``ssl.create_default_context(cafile=CA)`` (plus ``load_cert_chain`` for a
    client certificate) for a private CA or mutual TLS.
    """
    if context is None and url_or_host.startswith("tls://"):
        return _ssl.create_default_context()
    return context


def _region_id(ids: dict[str, int], label: str, region: str | int) -> int:
    """The id of ``region`` (a name in ``ids``, or already an id) on the server ``label``."""
    if isinstance(region, int):
        return region
    try:
        return ids[region]
    except KeyError:
        known = ", ".join(map(repr, ids)) or "none"
        raise KeyError(f"page server {label} has no region {region!r} ({known})") from None


class _HandshakeFrames:
    """The frames one connection has sent so far, for either client's handshake.

    Pure bookkeeping: the caller receives the bytes (asyncio or a blocking
    socket) and hands them to :meth:`feed`.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.decoder = p.FrameDecoder()
        self.pending: list[p.Frame] = []
        self.hello_seen = False
        self.version = p.VERSION

    def feed(self, data: bytes) -> None:
        """Decode ``data``; raises PeerGoneError on EOF (empty ``data``) or garbage."""
        if not data:
            hint = (
                ""
                if self.hello_seen
                else " before its HELLO (does it require TLS? use tls://HOST:PORT or ssl=)"
            )
            raise PeerGoneError(f"page server {self.label} closed the connection{hint}")
        try:
            self.pending.extend(self.decoder.feed(data))
        except p.ProtocolError as err:
            raise PeerGoneError(f"page server {self.label} sent garbage: {err}") from None

    def violation(self, problem: str) -> PeerGoneError:
        """The error for a server that broke the protocol (the connection is then dropped)."""
        return PeerGoneError(f"page server {self.label} broke the protocol: {problem}")

    def pop(self) -> p.Frame:
        """The oldest pending frame; an ERROR frame raises RemoteError instead."""
        frame = self.pending.pop(0)
        if isinstance(frame, p.Error):
            raise RemoteError(frame.code, frame.message, self.label)
        return frame

    def answer_hello(
        self, hello: p.Frame, token: bytes | None, *, faults: bool = False
    ) -> tuple[p.Hello, bytes]:
        """Check the server's first frame: it and the AUTH (if wanted) and LIST to send back.

        ``faults``: flag the LIST FAULTS (a fault channel) if the version agreed allows it.
        """
        label = self.label
        if not isinstance(hello, p.Hello):
            raise PeerGoneError(f"page server {label} did not start with HELLO")
        self.hello_seen = True
        common = [v for v in p.VERSIONS if hello.min_version <= v <= hello.max_version]
        if not common:
            raise RemoteError(
                p.ErrorCode.VERSION,
                f"the server speaks versions {hello.min_version}..{hello.max_version}, "
                f"this client {', '.join(map(str, p.VERSIONS))}",
                label,
            )
        # The newest both speak; every frame this client sends carries it.
        self.version = max(common)
        if hello.max_frame > MAX_ACCEPTED_FRAME:
            raise self.violation(
                f"HELLO announces frames of up to {hello.max_frame} bytes, over this client's "
                f"limit of {MAX_ACCEPTED_FRAME} (start the server with a smaller max_frame)"
            )
        self.decoder.max_payload = hello.max_frame
        out = b""
        if hello.auth_required:
            if token is None:
                raise RemoteError(
                    p.ErrorCode.AUTH_FAILED,
                    "the server requires a token (pass token=, or --token-file / UFFD_TOKEN "
                    "on the command line)",
                    label,
                )
            out += p.encode(p.Auth(p.auth_mac(token, hello.nonce)), self.version)
        return hello, out + p.encode(p.List(faults=faults and self.version >= 3), self.version)

    def check_regions(self, regions: p.Frame) -> p.Regions:
        """The answer to LIST, which must be a REGIONS frame."""
        if not isinstance(regions, p.Regions):
            raise PeerGoneError(f"page server {self.label} answered LIST with {regions}")
        return regions


@dataclasses.dataclass(eq=False)
class _Pending:
    offset: int
    length: int
    buffer: memoryview
    future: asyncio.Future[int]


class PageClient:
    """One connection to a page server, used from one asyncio event loop.

    Create it with ``await PageClient.connect(...)``. ``regions`` (list of
    RegionEntry: name, length; the index is the region id) and ``page_size``
    come from the server. Reads may be issued concurrently from many tasks;
    they are pipelined on the one connection.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        decoder: p.FrameDecoder,
        hello: p.Hello,
        regions: p.Regions,
        address: tuple[str, int],
        request_timeout: float,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder
        self.hello = hello
        self.page_size = regions.page_size
        self.regions = list(regions.regions)
        self._ids = {entry.name: index for index, entry in enumerate(regions.regions)}
        self.address = address
        self.request_timeout = request_timeout
        self._label = f"{address[0]}:{address[1]}"
        self._pending: dict[int, _Pending] = {}
        self._ids_counter = itertools.count(1)
        self._slots = asyncio.Semaphore(max(1, min(hello.max_pending, _MAX_WINDOW)))
        self._gone: PeerGoneError | None = None
        self._closed = False
        self._reader_task = asyncio.create_task(self._read_loop())
        # The protocol version agreed in the handshake (set by connect()).
        self.version = p.VERSION

    @classmethod
    async def connect(
        cls,
        url_or_host: str,
        port: int | None = None,
        *,
        token: bytes | None = None,
        request_timeout: float = 10.0,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> PageClient:
        """Connect, authenticate and fetch the region list.

        ``url_or_host``: ``"tcp://HOST:PORT"``, ``"tls://HOST:PORT"`` or a host
        with ``port``. ``token``: the server's shared secret, if it requires
        one. ``ssl``: a client SSLContext (see :func:`tls_context`; a tls://
        URL without one verifies against the system CAs); ``server_hostname``:
        the name the server's certificate must carry (default: the host).

        Raises:
            ValueError: a malformed address.
            RemoteError: the server refused (AUTH_FAILED: no or wrong token;
                VERSION: no common protocol version).
            PeerGoneError: the server closed the connection or sent garbage.
            TimeoutError: no answer within ``request_timeout``.
            OSError: the connection could not be made.
        """
        address = parse_address(url_or_host, port)
        label = f"{address[0]}:{address[1]}"
        context = tls_context(url_or_host, ssl)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    *address,
                    ssl=context,
                    server_hostname=(server_hostname or address[0]) if context else None,
                ),
                request_timeout,
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"page server {label}: no connection in {request_timeout} s"
            ) from None
        except _ssl.SSLError as err:
            raise PeerGoneError(f"page server {label}: {describe_tls_error(err)}") from err
        try:
            frames = _HandshakeFrames(label)

            async def next_frame() -> p.Frame:
                while not frames.pending:
                    frames.feed(await reader.read(_READ_CHUNK))
                return frames.pop()

            async def handshake() -> tuple[p.Hello, p.Regions]:
                hello, reply = frames.answer_hello(await next_frame(), token)
                writer.write(reply)
                return hello, frames.check_regions(await next_frame())

            try:
                hello, regions = await asyncio.wait_for(handshake(), request_timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"page server {label}: no handshake in {request_timeout} s"
                ) from None
            except (ConnectionError, OSError) as err:
                if isinstance(err, PeerGoneError):
                    raise
                raise PeerGoneError(f"page server {label}: {err}") from err
        except BaseException:
            writer.close()
            raise
        # After the handshake only DATA frames may be large.
        frames.decoder.max_control = _MAX_CONTROL
        client = cls(reader, writer, frames.decoder, hello, regions, address, request_timeout)
        client.version = frames.version
        client._feed(frames.pending)
        return client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    def _fail_all(self, message: str, cause: BaseException | None = None) -> None:
        if self._gone is None:
            self._gone = PeerGoneError(message)
        for pending in self._pending.values():
            if not pending.future.done():
                error = PeerGoneError(message) if not self._closed else ValueError(message)
                error.__cause__ = cause
                pending.future.set_exception(error)
        self._pending.clear()
        self._writer.close()

    async def _read_loop(self) -> None:
        label = self._label
        try:
            while True:
                data = await self._reader.read(_READ_CHUNK)
                if not data:
                    self._fail_all(f"page server {label} closed the connection")
                    return
                self._feed(self._decoder.feed(data))
        except p.ProtocolError as err:
            self._fail_all(f"page server {label} sent garbage: {err}", err)
        except _Violation as err:
            self._fail_all(f"page server {label} broke the protocol: {err}", err)
        except RemoteError as err:
            self._fail_all(f"page server {label} closed the connection: {err}", err)
        except (ConnectionError, OSError) as err:
            self._fail_all(f"lost the connection to page server {label}: {err}", err)

    def _feed(self, frames: list[p.Frame]) -> None:
        for frame in frames:
            if isinstance(frame, p.Error) and frame.request_id == 0:
                raise RemoteError(frame.code, frame.message)
            pending = self._pending.get(frame.request_id)
            if pending is None:
                # A reply to a request that timed out: drop it.
                if isinstance(frame, (p.Data, p.Zero, p.End, p.Error)):
                    continue
                raise _Violation(f"unexpected {frame.TYPE.name} frame")
            if isinstance(frame, (p.Data, p.Zero)):
                size = len(frame.data) if isinstance(frame, p.Data) else frame.length
                start = frame.offset - pending.offset
                if start < 0 or start + size > pending.length:
                    raise _Violation(
                        f"reply [{frame.offset}, +{size}) outside request "
                        f"[{pending.offset}, +{pending.length})"
                    )
                # The buffer starts as zeros and each byte is served once: ZERO is a no-op.
                if isinstance(frame, p.Data):
                    pending.buffer[start : start + size] = frame.data
            elif isinstance(frame, p.End):
                if frame.served > pending.length:
                    raise _Violation(f"END says {frame.served} bytes of {pending.length}")
                del self._pending[frame.request_id]
                if not pending.future.done():
                    pending.future.set_result(frame.served)
            elif isinstance(frame, p.Error):
                del self._pending[frame.request_id]
                if not pending.future.done():
                    pending.future.set_exception(
                        RemoteError(frame.code, frame.message, self._label)
                    )
            else:
                raise _Violation(f"unexpected {frame.TYPE.name} frame")

    async def _request(self, region: int, offset: int, buffer: memoryview, urgent: bool) -> int:
        async with self._slots:
            if self._closed:
                raise ValueError(f"the client of {self._label} is closed")
            if self._gone is not None:
                raise PeerGoneError(str(self._gone))
            request_id = next(self._ids_counter) & 0xFFFFFFFF or next(self._ids_counter)
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = _Pending(offset, len(buffer), buffer, future)
            frame = p.Read(region, offset, len(buffer), urgent, request_id)
            try:
                self._writer.write(p.encode(frame, self.version))
                return await asyncio.wait_for(future, self.request_timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"page server {self._label}: no reply to READ of region {region} "
                    f"[{offset}, +{len(buffer)}) in {self.request_timeout} s"
                ) from None
            finally:
                self._pending.pop(request_id, None)

    async def read(
        self, region: str | int, offset: int, length: int, *, urgent: bool = True
    ) -> bytes:
        """``length`` bytes of ``region`` (name or id) at ``offset``; zero ranges as zeros.

        ``urgent``: served before queued non-urgent (prefetch) reads. A split
        or short reply is completed with more requests.

        Raises:
            KeyError: no region of that name.
            RemoteError: the server refused (OUT_OF_RANGE, UNKNOWN_REGION, BUSY...).
            PeerGoneError: the connection broke (before or during the read).
            TimeoutError: one request got no reply within ``request_timeout``.
            ValueError: the client is closed.
        """
        region_id = _region_id(self._ids, self._label, region)
        if length < 0:
            raise ValueError(f"negative length {length}")
        out = bytearray(length)
        done = 0
        with memoryview(out) as view:
            while done < length:
                served = await self._request(region_id, offset + done, view[done:], urgent)
                if served == 0:
                    raise RemoteError(
                        p.ErrorCode.INTERNAL, "the server served nothing", self._label
                    )
                done += served
        return bytes(out)

    async def close(self) -> None:
        """Close the connection; pending reads fail with ValueError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        self._fail_all(f"the client of {self._label} was closed")
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()

    async def __aenter__(self) -> PageClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Violation(Exception):
    """The server sent a frame that makes no sense here."""


class ThreadedPageClient:
    """A page-server client for callers that are threads: a blocking socket and a reader thread.

    ``fetch()`` and ``fetch_into()`` may be called from any thread and return
    at once with a concurrent.futures.Future; any number may be in flight
    (beyond the server's ``max_pending`` they wait in this client and are
    sent as replies come back). The connection, handshake included, is made
    in the constructor. A reader thread ("uffd-page-client") owns the
    receiving side: it parses each frame header in place and receives DATA
    payloads straight into the request's buffer with ``recv_into`` (no
    per-frame bytes objects), asks again for the rest of a short reply, and
    completes the futures; their done-callbacks run in that thread. ``bulk``:
    the connection streams a restore, so the reader takes the default time
    slice back (:func:`uffd.restore.priority.bulk_thread_priority`).

    When the connection breaks, every pending and later future fails with
    PeerGoneError. A request without a reply for ``request_timeout`` seconds
    fails with TimeoutError (a late reply is discarded). :meth:`close`
    (idempotent) fails pending futures with ValueError, in this order: mark
    closed, shut the socket down (which wakes the reader), join the reader,
    fail what is left, close the socket.

    Raises (on construction): as :meth:`PageClient.connect`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: bytes | None = None,
        request_timeout: float = 10.0,
        ssl: _ssl.SSLContext | None = None,
        bulk: bool = False,
        server_hostname: str | None = None,
    ) -> None:
        address = parse_address(url)
        context = tls_context(url, ssl)
        self.address = address
        self.request_timeout = request_timeout
        self._label = label = f"{address[0]}:{address[1]}"
        try:
            sock = socket.create_connection(address, timeout=request_timeout)
        except TimeoutError:
            raise TimeoutError(
                f"page server {label}: no connection in {request_timeout} s"
            ) from None
        stream: socket.socket | TLSStream = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                try:
                    stream = TLSStream(
                        sock, context, server_hostname or address[0], request_timeout
                    )
                except _ssl.SSLError as err:
                    raise PeerGoneError(f"page server {label}: {describe_tls_error(err)}") from err
                except TimeoutError:
                    raise TimeoutError(
                        f"page server {label}: no TLS handshake in {request_timeout} s"
                    ) from None
            self.hello, regions = self._handshake(stream, token)
        except BaseException:
            sock.close()
            raise
        self.page_size = regions.page_size
        self.regions = list(regions.regions)
        self._ids = {entry.name: index for index, entry in enumerate(regions.regions)}
        self._sock = stream
        self._max_payload = self.hello.max_frame
        self._window = max(1, min(self.hello.max_pending, _MAX_WINDOW))
        ps = self.page_size
        # max_frame bytes per READ: the server's default max_read, served whole.
        self._part_bytes = max(ps, self.hello.max_frame // ps * ps)
        # The reader wakes this often to expire requests (the socket timeout).
        self._tick = max(0.005, min(0.25, request_timeout / 4))
        sock.settimeout(self._tick)
        self._lock = threading.Lock()
        self._inflight: dict[int, _Part] = {}
        self._waiting: collections.deque[_Part] = collections.deque()
        self._abandoned: set[int] = set()
        self._next_id = 0
        self._closed = False
        self._gone: BaseException | None = None
        # Bytes received past what the current step needed (at most a header's worth).
        self._small = bytearray(256)
        self._small_view = memoryview(self._small)
        self._have = 0
        self._bulk = bulk
        self._thread = threading.Thread(target=self._run, name="uffd-page-client", daemon=True)
        self._thread.start()

    # -- handshake (constructor only) --

    def _handshake(
        self, sock: socket.socket | TLSStream, token: bytes | None
    ) -> tuple[p.Hello, p.Regions]:
        label = self._label
        frames = _HandshakeFrames(label)
        deadline = time.monotonic() + self.request_timeout

        def next_frame() -> p.Frame:
            while not frames.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"page server {label}: no handshake in {self.request_timeout} s"
                    )
                sock.settimeout(left)
                try:
                    data = sock.recv(_READ_CHUNK)
                except TimeoutError:
                    continue
                except OSError as err:
                    raise PeerGoneError(f"page server {label}: {err}") from err
                frames.feed(data)
            return frames.pop()

        hello, reply = frames.answer_hello(next_frame(), token)
        try:
            sock.sendall(reply)
        except OSError as err:
            raise PeerGoneError(f"page server {label}: {err}") from err
        regions = frames.check_regions(next_frame())
        if frames.pending or frames.decoder.buffered:
            raise PeerGoneError(f"page server {label} sent frames nobody asked for")
        self.version = frames.version
        return hello, regions

    # -- callers' side --

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._closed

    @property
    def broken(self) -> bool:
        """True once the connection is gone (closed here, or by the server): reads fail."""
        return self._closed or self._gone is not None

    def fetch(
        self, region: str | int, offset: int, length: int, *, urgent: bool = True
    ) -> concurrent.futures.Future[bytes]:
        """Start a read (see :meth:`PageClient.read`); the future gets the bytes or the error.

        A bad region name (KeyError) or a negative length (ValueError) fails
        the future too. ``fetch_into`` saves the copy into a new bytes object.
        """
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        if length < 0:
            future.set_exception(ValueError(f"negative length {length}"))
            return future
        out = bytearray(length)
        inner = self._start(region, offset, memoryview(out), urgent, zeroed=True)

        def done(f: concurrent.futures.Future[int]) -> None:
            err = f.exception()
            if err is not None:
                future.set_exception(err)
            else:
                future.set_result(bytes(out))

        inner.add_done_callback(done)
        return future

    def fetch_into(
        self, region: str | int, offset: int, buffer: Any, *, urgent: bool = True
    ) -> concurrent.futures.Future[int]:
        """Read ``len(buffer)`` bytes of ``region`` at ``offset`` into ``buffer``; no copy.

        ``buffer`` is any writable contiguous buffer (a bytearray, an mmap, a
        memoryview); the page bytes are received into it directly. Zero
        ranges are written as zeros. The future gets the byte count, or the
        error of :meth:`PageClient.read` (KeyError for a bad region name
        included). Until the future is done the buffer belongs to the client;
        once it is done (even failed) the client never writes to it again.

        Raises:
            TypeError: ``buffer`` is not a writable contiguous buffer.
        """
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError("fetch_into needs a writable buffer")
        return self._start(region, offset, view, urgent, zeroed=False)

    def read(self, region: str | int, offset: int, length: int, *, urgent: bool = True) -> bytes:
        """``fetch(...).result()``: the bytes, or the read's exception."""
        return self.fetch(region, offset, length, urgent=urgent).result()

    def extents(
        self, region: str | int, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, bool]]:
        """Runs of ``(offset, length, present)`` covering the range (default: the region).

        ``present`` False means the server knows those pages are all zeros (a
        snapshot does not store them): a restore can install them in bulk
        (UFFDIO_ZEROPAGE) at session start and never fetch them. One MAP
        request, answered with a bitmap (no page bytes: 32 KiB per GiB of 4
        KiB pages). A server of protocol version 1 cannot say: the whole range
        is then one present run (fetch it all, which is always correct).

        Raises:
            KeyError: no region of that name.
            ValueError: a range outside the region or not page-aligned.
            RemoteError, PeerGoneError, TimeoutError: as :meth:`fetch`.
        """
        region_id = _region_id(self._ids, self._label, region)
        ps, size = self.page_size, self.regions[region_id].length
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size or offset % ps or length % ps:
            raise ValueError(
                f"extents of [{offset}, +{length}) of a {size}-byte region: page-aligned and "
                "inside it, please"
            )
        if not length:
            return []
        if self.version < 2:
            return [(offset, length, True)]
        pages = length // ps
        bitmap = bytearray((pages + 7) // 8)
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        fetch = _Fetch(region_id, offset, memoryview(bitmap), False, True, future, length)
        fetch.map = True
        with self._lock:
            if self._closed:
                raise ValueError(f"the client of {self._label} is closed")
            if self._gone is not None:
                raise PeerGoneError(str(self._gone))
            self._issue(_Part(fetch, 0, length))
        future.result()
        return _runs(int.from_bytes(bitmap, "little") & ((1 << pages) - 1), pages, offset, ps)

    def _start(
        self, region: str | int, offset: int, view: memoryview, urgent: bool, zeroed: bool
    ) -> concurrent.futures.Future[int]:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        try:
            region_id = _region_id(self._ids, self._label, region)
        except KeyError as err:
            future.set_exception(err)
            return future
        fetch = _Fetch(region_id, offset, view, urgent, zeroed, future, len(view))
        if not len(view):
            future.set_result(0)
            return future
        with self._lock:
            if self._closed:
                error: BaseException = ValueError(f"the client of {self._label} is closed")
            elif self._gone is not None:
                error = PeerGoneError(str(self._gone))
            else:
                # One READ per frame's worth, all pipelined: a long fetch does not
                # wait a round trip per short reply.
                step = self._part_bytes
                for start in range(0, len(view), step):
                    self._issue(_Part(fetch, start, min(step, len(view) - start)))
                return future
        future.set_exception(error)
        return future

    def _issue(self, part: _Part) -> None:
        """Send ``part``'s READ now or queue it for a free slot (holding ``_lock``)."""
        if len(self._inflight) >= self._window:
            self._waiting.append(part)
            return
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        rid = self._next_id
        fetch = part.fetch
        part.deadline = time.monotonic() + self.request_timeout
        self._inflight[rid] = part
        kind = p.Map if fetch.map else p.Read
        frame = kind(fetch.region, fetch.offset + part.start, part.length, fetch.urgent, rid)
        try:
            self._sock.sendall(p.encode(frame, self.version))
        except OSError:
            # The reader sees the broken connection and fails everything, this part too.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the connection, fail pending fetches with ValueError, join the reader."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not threading.current_thread():
            self._thread.join()
        self._fail_all(ValueError(f"the client of {self._label} was closed"))
        self._sock.close()

    def __enter__(self) -> ThreadedPageClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the reader thread --

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            if self._gone is None:
                self._gone = error
            parts = [*self._inflight.values(), *self._waiting]
            self._inflight.clear()
            self._waiting.clear()
        for part in parts:
            part.fetch.fail(_copy_error(error))

    def _run(self) -> None:
        if self._bulk:
            bulk_thread_priority()
        label = self._label
        try:
            self._receive()
        except p.ProtocolError as err:
            error: BaseException = PeerGoneError(f"page server {label} sent garbage: {err}")
        except _Violation as err:
            error = PeerGoneError(f"page server {label} broke the protocol: {err}")
        except RemoteError as err:
            error = PeerGoneError(f"page server {label} closed the connection: {err}")
        except _Eof:
            error = PeerGoneError(f"page server {label} closed the connection")
        except OSError as err:
            error = PeerGoneError(f"lost the connection to page server {label}: {err}")
        except Exception as err:  # a bug here must not leave futures hanging
            error = PeerGoneError(f"page server {label}: the client's reader failed: {err!r}")
            error.__cause__ = err
        if self._closed:
            error = ValueError(f"the client of {label} was closed")
        self._fail_all(error)

    def _expire(self) -> None:
        """Fail the requests past their deadline; their late replies will be discarded."""
        now = time.monotonic()
        expired = []
        with self._lock:
            for rid, part in list(self._inflight.items()):
                if part.deadline > now:
                    break  # issued in deadline order
                del self._inflight[rid]
                self._abandoned.add(rid)
                expired.append(part)
            self._refill()
        for part in expired:
            fetch = part.fetch
            part.fetch.fail(
                TimeoutError(
                    f"page server {self._label}: no reply to READ of region {fetch.region} "
                    f"[{fetch.offset + part.start}, +{part.length}) in {self.request_timeout} s"
                )
            )

    def _refill(self) -> None:
        while self._waiting and len(self._inflight) < self._window:
            part = self._waiting.popleft()
            if not part.fetch.failed:
                self._issue(part)

    def _recv_into(self, view: memoryview, fetch: _Fetch | None = None) -> None:
        """Fill ``view`` from the bytes already received, then from the socket.

        ``view`` belongs to ``fetch``: if that times out meanwhile, the rest
        is received and dropped instead (its buffer is no longer ours).
        """
        have = self._have
        if have:
            n = min(have, len(view))
            view[:n] = self._small_view[:n]
            self._small[: have - n] = self._small[n:have]
            self._have = have - n
            view = view[n:]
        sock = self._sock
        while view:
            try:
                n = sock.recv_into(view)
            except TimeoutError:
                self._expire()
                if fetch is not None and fetch.failed:
                    self._discard(len(view))
                    return
                continue
            if not n:
                raise _Eof
            view = view[n:]

    def _recv_head(self, size: int) -> memoryview:
        """The next ``size`` bytes (a header or a fixed payload), reading a little ahead."""
        small = self._small_view
        sock = self._sock
        while self._have < size:
            try:
                # Up to 8 bytes more: a DATA header comes with its offset in one recv.
                n = sock.recv_into(small[self._have : size + 8])
            except TimeoutError:
                self._expire()
                continue
            if not n:
                raise _Eof
            self._have += n
        head = bytes(small[:size])
        self._small[: self._have - size] = self._small[size : self._have]
        self._have -= size
        return memoryview(head)

    def _discard(self, count: int) -> None:
        scratch = memoryview(bytearray(min(count, 1 << 16)))
        while count:
            n = min(count, len(scratch))
            self._recv_into(scratch[:n])
            count -= n

    def _receive(self) -> None:
        data_prefix = p.DATA_PREFIX - p.HEADER.size
        next_check = 0.0
        while True:
            # Socket timeouts expire requests when nothing arrives; this when frames
            # keep arriving for other requests.
            now = time.monotonic()
            if now >= next_check:
                self._expire()
                next_check = now + self._tick
            kind, flags, rid, length = p.parse_header(
                self._recv_head(p.HEADER.size), self._max_payload, max_control=_MAX_CONTROL
            )
            if kind is p.FrameType.DATA:
                (offset,) = _OFFSET.unpack(self._recv_head(data_prefix))
                size = length - data_prefix
                part = self._inflight.get(rid)
                if part is None:
                    self._late(rid, kind)  # its request timed out
                    self._discard(size)
                    continue
                # Placed (range-checked) even when its fetch failed and it is not written.
                start = self._place(part, offset, size)
                if part.fetch.failed:
                    self._discard(size)
                else:
                    self._recv_into(part.fetch.view[start : start + size], part.fetch)
                continue
            payload = self._recv_head(length) if length <= 64 else self._recv_payload(length)
            frame = p.decode_payload(kind, flags, rid, payload)
            if isinstance(frame, p.Error) and rid == 0:
                raise RemoteError(frame.code, frame.message)
            part = self._inflight.get(rid)
            if part is None:
                self._late(rid, kind)
                continue
            if isinstance(frame, p.Presence):
                self._place_bits(part, frame.offset, frame.bitmap)
            elif isinstance(frame, p.Zero):
                start = self._place(part, frame.offset, frame.length)
                if not part.fetch.zeroed and not part.fetch.failed:
                    _zero(part.fetch.view[start : start + frame.length])
            elif isinstance(frame, p.End):
                self._ended(rid, part, frame.served)
            elif isinstance(frame, p.Error):
                with self._lock:
                    del self._inflight[rid]
                    self._refill()
                part.fetch.fail(RemoteError(frame.code, frame.message, self._label))
            else:
                raise _Violation(f"unexpected {frame.TYPE.name} frame")

    def _recv_payload(self, length: int) -> memoryview:
        payload = memoryview(bytearray(length))
        self._recv_into(payload)
        return payload

    def _late(self, rid: int, kind: p.FrameType) -> None:
        """A frame for no pending request: a late reply to a timed-out one is dropped."""
        if kind not in (
            p.FrameType.DATA,
            p.FrameType.ZERO,
            p.FrameType.END,
            p.FrameType.ERROR,
            p.FrameType.PRESENCE,
        ):
            raise _Violation(f"unexpected {kind.name} frame")
        if kind in (p.FrameType.END, p.FrameType.ERROR):
            self._abandoned.discard(rid)

    def _place_bits(self, part: _Part, offset: int, bitmap: bytes) -> None:
        """Copy a PRESENCE bitmap for ``offset`` into the MAP fetch's bitmap."""
        fetch = part.fetch
        ps = self.page_size
        start = offset - fetch.offset
        if not fetch.map or start % (8 * ps) or start < part.start:
            raise _Violation(f"a PRESENCE frame at {offset} for no MAP at that place")
        first = start // (8 * ps)
        if first + len(bitmap) > len(fetch.view) or (start + 8 * ps * len(bitmap)) <= start:
            raise _Violation(f"a PRESENCE bitmap of {len(bitmap)} bytes past the MAP's range")
        if not fetch.failed:
            fetch.view[first : first + len(bitmap)] = bitmap

    @staticmethod
    def _place(part: _Part, offset: int, size: int) -> int:
        """Where a reply of ``size`` bytes at ``offset`` goes in the fetch's buffer."""
        fetch = part.fetch
        if fetch.map:
            raise _Violation("page data in answer to a MAP")
        start = offset - fetch.offset
        if start < part.start or start + size > part.start + part.length:
            raise _Violation(
                f"reply [{offset}, +{size}) outside request "
                f"[{fetch.offset + part.start}, +{part.length})"
            )
        return start

    def _ended(self, rid: int, part: _Part, served: int) -> None:
        fetch = part.fetch
        if served > part.length:
            raise _Violation(f"END says {served} bytes of {part.length}")
        with self._lock:
            del self._inflight[rid]
            if served == 0:
                error: BaseException | None = RemoteError(
                    p.ErrorCode.INTERNAL, "the server served nothing", self._label
                )
            else:
                error = None
                if served < part.length:
                    # A short reply: ask for the rest (a new request, a fresh deadline).
                    self._issue(_Part(fetch, part.start + served, part.length - served))
            self._refill()
            fetch.remaining -= served
        if error is not None:
            fetch.fail(error)
        elif fetch.remaining == 0 and not fetch.failed:
            fetch.future.set_result(len(fetch.view))


_OFFSET = struct.Struct(">Q")


def _runs(bits: int, pages: int, offset: int, page_size: int) -> list[tuple[int, int, bool]]:
    """(offset, length, present) runs of a page bitmap held in an int (bit i = page i)."""
    runs: list[tuple[int, int, bool]] = []
    page = 0
    while page < pages:
        rest = bits >> page
        present = bool(rest & 1)
        edge = ~rest if present else rest  # the run ends at the lowest set bit of this
        count = (edge & -edge).bit_length() - 1 if edge else pages - page
        count = min(count, pages - page)
        runs.append((offset + page * page_size, count * page_size, present))
        page += count
    return runs


_ZEROS = bytes(1 << 16)


def _zero(view: memoryview) -> None:
    while view:
        n = min(len(view), len(_ZEROS))
        view[:n] = _ZEROS[:n]
        view = view[n:]


def _copy_error(error: BaseException) -> BaseException:
    """A fresh exception like ``error`` (one exception object per future)."""
    copy = type(error)(*error.args)
    copy.__cause__ = error.__cause__
    return copy


class _Eof(Exception):
    """The server closed the connection."""


@dataclasses.dataclass(eq=False)
class _Fetch:
    """One fetch: its destination, its future and the bytes not yet served.

    It takes one READ per frame's worth, and more for short replies; once it
    failed, replies still arriving for its other READs are dropped.
    """

    region: int
    offset: int
    view: memoryview
    urgent: bool
    zeroed: bool
    future: concurrent.futures.Future[int]
    remaining: int
    failed: bool = False
    # A MAP: ``view`` is the stored-page bitmap of the range, filled by PRESENCE frames.
    map: bool = False

    def fail(self, error: BaseException) -> None:
        if not self.failed and not self.future.done():
            self.failed = True
            self.future.set_exception(error)


@dataclasses.dataclass(eq=False)
class _Part:
    """One READ of a fetch: ``length`` bytes from ``start`` in its buffer."""

    fetch: _Fetch
    start: int
    length: int
    deadline: float = 0.0
