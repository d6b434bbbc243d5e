"""Page-server clients: :class:`PageClient` (asyncio) and :class:`ThreadedPageClient`.

Both speak the protocol of :mod:`uffd.protocol` to a :class:`uffd.server.PageServer`:
HELLO, AUTH when the server wants a token, LIST, then pipelined READs (as
many in flight as the server's HELLO allows). A read whose reply is split or
short is completed by asking for the rest; ZERO ranges become zero bytes.

Failures are of three kinds: the server refused a request (``RemoteError``
with its code and message, the connection stays usable), the connection
broke under you (every pending and later read fails with ``PeerGoneError``,
a ConnectionError naming the server), or you closed the client (ValueError).
No call waits forever: each request is bounded by ``request_timeout``.

This module is pure Python: no userfaultfd and no compiled extension needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import threading
from typing import Any
from urllib.parse import urlsplit

from uffd import protocol as p

__all__ = ["PageClient", "PeerGoneError", "RemoteError", "ThreadedPageClient", "parse_address"]

_READ_CHUNK = 1 << 18


class PeerGoneError(ConnectionError):
    """The connection to the page server broke; the message names the server."""


class RemoteError(Exception):
    """The server answered with an ERROR frame: ``code`` (an ErrorCode) and ``message``."""

    def __init__(self, code: int, message: str, address: str = "") -> None:
        name = p.ErrorCode(code).name if code in p.ErrorCode._value2member_map_ else str(code)
        origin = f"page server {address}: " if address else ""
        super().__init__(f"{origin}{name}: {message}")
        self.code = code
        self.message = message


def parse_address(url_or_host: str, port: int | None = None) -> tuple[str, int]:
    """(host, port) from ``"tcp://HOST:PORT"`` (IPv6 in brackets) or ``HOST`` and ``port``.

    Raises:
        ValueError: no port, or a scheme other than tcp.
    """
    if "://" in url_or_host:
        parts = urlsplit(url_or_host)
        if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
            raise ValueError(f"{url_or_host!r} is not a tcp://HOST:PORT address")
        if port is not None and port != parts.port:
            raise ValueError(f"port {port} contradicts the URL {url_or_host!r}")
        return parts.hostname, parts.port
    if port is None:
        raise ValueError(f"no port for host {url_or_host!r}; pass port= or a tcp:// URL")
    return url_or_host, port


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
        self._slots = asyncio.Semaphore(max(1, hello.max_pending))
        self._gone: PeerGoneError | None = None
        self._closed = False
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        url_or_host: str,
        port: int | None = None,
        *,
        token: bytes | None = None,
        request_timeout: float = 10.0,
    ) -> PageClient:
        """Connect, authenticate and fetch the region list.

        ``url_or_host``: ``"tcp://HOST:PORT"`` or a host with ``port``.
        ``token``: the server's shared secret, if it requires one.

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
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(*address), request_timeout
            )
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"page server {label}: no connection in {request_timeout} s"
            ) from None
        try:
            decoder = p.FrameDecoder()
            frames: list[p.Frame] = []

            async def next_frame() -> p.Frame:
                while not frames:
                    data = await reader.read(_READ_CHUNK)
                    if not data:
                        raise PeerGoneError(f"page server {label} closed the connection")
                    try:
                        frames.extend(decoder.feed(data))
                    except p.ProtocolError as err:
                        raise PeerGoneError(f"page server {label} sent garbage: {err}") from None
                frame = frames.pop(0)
                if isinstance(frame, p.Error):
                    raise RemoteError(frame.code, frame.message, label)
                return frame

            async def handshake() -> tuple[p.Hello, p.Regions]:
                hello = await next_frame()
                if not isinstance(hello, p.Hello):
                    raise PeerGoneError(f"page server {label} did not start with HELLO")
                if not hello.min_version <= p.VERSION <= hello.max_version:
                    raise RemoteError(
                        p.ErrorCode.VERSION,
                        f"the server speaks versions {hello.min_version}..{hello.max_version}, "
                        f"this client {p.VERSION}",
                        label,
                    )
                decoder.max_payload = hello.max_frame
                if hello.auth_required:
                    if token is None:
                        raise RemoteError(
                            p.ErrorCode.AUTH_FAILED, "the server requires a token", label
                        )
                    writer.write(p.encode(p.Auth(p.auth_mac(token, hello.nonce))))
                writer.write(p.encode(p.List()))
                regions = await next_frame()
                if not isinstance(regions, p.Regions):
                    raise PeerGoneError(f"page server {label} answered LIST with {regions}")
                return hello, regions

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
        client = cls(reader, writer, decoder, hello, regions, address, request_timeout)
        client._feed(frames)
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
                del self._pending[frame.request_id]
                if frame.served > pending.length:
                    raise _Violation(f"END says {frame.served} bytes of {pending.length}")
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

    def _region_id(self, region: str | int) -> int:
        if isinstance(region, int):
            return region
        try:
            return self._ids[region]
        except KeyError:
            known = ", ".join(map(repr, self._ids)) or "none"
            raise KeyError(
                f"page server {self._label} has no region {region!r} ({known})"
            ) from None

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
                self._writer.write(p.encode(frame))
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
        region_id = self._region_id(region)
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
    """A PageClient on its own event-loop thread, for callers that are threads.

    ``fetch()`` may be called from any thread and returns at once with a
    concurrent.futures.Future; any number may be in flight. When the
    connection breaks, every pending and later future fails with
    PeerGoneError. :meth:`close` (idempotent) fails pending futures with
    ValueError, stops the loop and joins the thread.

    Raises (on construction): as :meth:`PageClient.connect`.
    """

    def __init__(
        self, url: str, *, token: bytes | None = None, request_timeout: float = 10.0
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="uffd-page-client", daemon=True)
        self._thread.start()
        self._closed = False
        connect = PageClient.connect(url, token=token, request_timeout=request_timeout)
        try:
            self._client = asyncio.run_coroutine_threadsafe(connect, self._loop).result()
        except BaseException:
            self._stop()
            raise
        self.address = self._client.address
        self.page_size = self._client.page_size
        self.regions = self._client.regions

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        # Let every task see its cancellation so no future is left hanging.
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def fetch(
        self, region: str | int, offset: int, length: int, *, urgent: bool = True
    ) -> concurrent.futures.Future[bytes]:
        """Start a read (see :meth:`PageClient.read`); the future gets the bytes or the error."""
        if self._closed:
            future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
            future.set_exception(ValueError(f"the client of {self._client._label} is closed"))
            return future
        read = self._client.read(region, offset, length, urgent=urgent)
        return asyncio.run_coroutine_threadsafe(read, self._loop)

    def read(self, region: str | int, offset: int, length: int, *, urgent: bool = True) -> bytes:
        """``fetch(...).result()``: the bytes, or the read's exception."""
        return self.fetch(region, offset, length, urgent=urgent).result()

    def close(self) -> None:
        """Close the connection, fail pending fetches with ValueError, join the thread."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(5.0)
        self._stop()

    def __enter__(self) -> ThreadedPageClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
