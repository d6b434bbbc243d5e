"""The page server's fault channels: connections of READs only, served in C off the GIL.

A client that answers page faults opens a connection of its own for them and
says so in its LIST (protocol version 3, flag FAULTS): from then on it sends
only READs, one at a time. The asyncio server answers that LIST with REGIONS
and hands the socket to a :class:`FaultChannel`: a thread of its own (at the
daemon's fault priority) that calls ``pyuffd_serve_faults`` (csrc/uffd_serve.c),
which receives each READ, preads its pages from the snapshot's file and sends
the reply, all with the GIL released. So a fault's READ never waits for the
event loop, the pools, or the GIL that prefetch on the client's other
connections keeps busy.

The C loop serves only what it can serve exactly as the Python server would
(a well-formed READ inside a region, whose runs are plain file ranges or
zeros); anything else comes back here, is answered by the same code as on
the asyncio path (the same ERROR codes and messages, or the READ served from
Python), and the loop goes on or the connection closes as docs/protocol.md
says.

:class:`FaultTable` is what the C loop reads: per region, its runs of file
bytes and zeros, built once per server. A source qualifies when it says where
its verified bytes are in one file (``file_extents`` and ``fileno``: a raw
memory file, or a snapshot verified at start); TLS connections and other
sources keep the asyncio path.

Calling context: the table is built in a pool thread at server start;
channels are started and stopped on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from uffd.pagestore import protocol as p
from uffd.restore.priority import raise_thread_priority

__all__ = ["FaultChannel", "FaultTable", "native_faults"]

# file_extents is asked for this much of a region at a time while the table is
# built, so a chunk that failed its checksum costs Python only that piece.
_TABLE_PIECE = 1 << 20
_LINGER = 0.5
# How long stop() lets a channel thread finish (it sees EOF at once).
_STOP_WAIT = 5.0


def native_faults() -> Any | None:
    """``uffd._native`` (ffi, lib) if the extension is there, else None (Python path only)."""
    try:
        from uffd._native import ffi, lib
    except ImportError:
        return None
    return ffi, lib


class FaultTable:
    """The C loop's view of a source: config, regions and their runs (see the module).

    Owns a dup of the source's fd (closed by :meth:`close`), so a channel
    never reads a reused fd. Built by :meth:`build`; ``config`` is the
    ``struct pyuffd_serve_config *`` every channel of the server shares.
    """

    def __init__(self, ffi: Any, lib: Any, fd: int) -> None:
        self.ffi, self.lib, self.fd = ffi, lib, fd
        self.config: Any = None
        self._keep: list[Any] = []

    @classmethod
    def build(
        cls,
        source: Any,
        *,
        max_read: int,
        frame_bytes: int,
        versions: tuple[int, ...],
        idle_timeout: float,
        frame_timeout: float,
        send_timeout: float,
    ) -> FaultTable | None:
        """The table of ``source``, or None when the C loop cannot serve it.

        May read the disk (a raw file's holes): for a pool thread.
        """
        native = native_faults()
        if native is None or not (hasattr(source, "file_extents") and hasattr(source, "fileno")):
            return None
        ffi, lib = native
        table = cls(ffi, lib, os.dup(source.fileno()))
        try:
            regions = ffi.new("struct pyuffd_serve_region[]", max(1, len(source.regions)))
            for index, region in enumerate(source.regions):
                runs = _runs(lib, source, region.name, region.length)
                array = ffi.new("struct pyuffd_serve_run[]", max(1, len(runs)))
                for at, (start, length, file_offset, kind) in enumerate(runs):
                    array[at] = (start, length, file_offset, kind, 0)
                regions[index] = (region.length, array, len(runs))
                table._keep.append(array)
            table._keep.append(regions)
            table.config = ffi.new(
                "struct pyuffd_serve_config *",
                {
                    "file_fd": table.fd,
                    "page_size": source.page_size,
                    "max_read": max_read,
                    "frame_bytes": frame_bytes,
                    "versions": sum(1 << v for v in versions),
                    "idle_ms": _ms(idle_timeout),
                    "frame_ms": _ms(frame_timeout),
                    "send_ms": _ms(send_timeout),
                    "regions": regions,
                    "nregions": len(source.regions),
                },
            )
        except BaseException:
            table.close()
            raise
        return table

    def close(self) -> None:
        """Close the fd (idempotent); only once no channel runs."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _ms(seconds: float) -> int:
    return max(1, min(int(seconds * 1000), 2**31 - 1))


def _runs(lib: Any, source: Any, name: str, length: int) -> list[tuple[int, int, int, int]]:
    """(start, length, file offset, kind) runs of region ``name``, adjacent ones merged.

    ``kind`` is one of csrc/uffd_serve.h's PYUFFD_RUN_* (read from ``lib``, not restated).
    """
    data, zero = lib.PYUFFD_RUN_DATA, lib.PYUFFD_RUN_ZERO
    out: list[tuple[int, int, int, int]] = []
    for piece in range(0, length, _TABLE_PIECE):
        size = min(_TABLE_PIECE, length - piece)
        try:
            extents = [
                (start, n, 0, zero) if at is None else (start, n, at, data)
                for start, n, at in source.file_extents(name, piece, size)
            ]
        except Exception:  # a chunk that failed its checksum, a truncated file: Python says
            extents = [(piece, size, 0, lib.PYUFFD_RUN_PYTHON)]
        for start, n, at, kind in extents:
            if out:
                last = out[-1]
                if last[3] == kind and (kind != data or last[2] + last[1] == at):
                    out[-1] = (last[0], last[1] + n, last[2], kind)
                    continue
            out.append((start, n, at, kind))
    return out


class FaultChannel:
    """One fault channel: ``sock`` (a dup of the connection) served by a thread of its own.

    ``server`` is the PageServer (check_read, read_piece, the limits);
    ``count`` adds (requests, frames sent, data bytes, zero bytes) to the
    server's and the client's counters and is called on the event loop; ``version`` answers
    connection-level ERRORs. :attr:`finished` resolves when the thread is
    done, with the reason the connection ended. :meth:`stop` (any thread)
    shuts the socket down: the C loop sees EOF at once.
    """

    def __init__(
        self,
        server: Any,
        sock: socket.socket,
        version: int,
        count: Callable[[int, list[p.Frame], int, int], None],
    ) -> None:
        self.server = server
        self.table: FaultTable = server.faults
        self.sock = sock
        self.version = version
        self.count = count
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[str] = self.loop.create_future()
        self._lock = threading.Lock()
        self._closed = self._stopping = False
        self._thread = threading.Thread(target=self._run, name="uffd-page-faults", daemon=True)

    def start(self) -> None:
        """Start serving on the channel's thread."""
        self._thread.start()

    def stop(self) -> None:
        """End the channel soon (idempotent, any thread): shut its socket down."""
        with self._lock:
            self._stopping = True
            if not self._closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)

    async def wait(self) -> None:
        """Stop and wait (bounded) for the thread: for a client task that is ending."""
        self.stop()
        await asyncio.wait([self.finished], timeout=_STOP_WAIT)

    def _run(self) -> None:
        raise_thread_priority()
        reason = "closed by the client"
        try:
            reason = self._serve()
        except (OSError, p.ProtocolError) as err:
            reason = f"connection error: {err}"
        finally:
            with self._lock:
                self._closed = True
                self.sock.close()
            self._post(self._finish, reason)

    def _finish(self, reason: str) -> None:
        if not self.finished.done():
            self.finished.set_result(reason)

    def _post(self, call: Callable[..., None], *args: Any) -> None:
        """Run ``call(*args)`` on the event loop (unless it is gone: the server closed)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(call, *args)

    def _serve(self) -> str:
        """Run the C loop, answer what it hands back; the reason the connection ended."""
        ffi, lib = self.table.ffi, self.table.lib
        server = self.server
        state = ffi.new("struct pyuffd_serve_state *")
        fd = self.sock.fileno()
        self.sock.settimeout(server.send_timeout)
        while True:
            why = lib.pyuffd_serve_faults(self.table.config, fd, state)
            if state.requests:
                self._post(self.count, state.requests, [], state.bytes, state.zero_bytes)
            if why == lib.PYUFFD_SERVE_READ:
                frame = p.Read(
                    state.region, state.offset, state.length, bool(state.urgent), state.request_id
                )
                frames = server.answer_read(frame)
                self._post(self.count, 1, frames, 0, 0)
                self._send(frames, state.version)
                continue
            if why == lib.PYUFFD_SERVE_HEADER:
                return self._refuse_header(bytes(ffi.buffer(state.header)))
            if why == lib.PYUFFD_SERVE_IDLE:
                return self._refuse(p.ErrorCode.TIMEOUT, f"idle for {server.idle_timeout} s")
            if why == lib.PYUFFD_SERVE_PARTIAL:
                return self._refuse(p.ErrorCode.TIMEOUT, "timed out waiting for a complete frame")
            if why == lib.PYUFFD_SERVE_STALLED:
                self._post(server.count_stalled)
                return f"the client read nothing for {server.send_timeout} s"
            if why == lib.PYUFFD_SERVE_EOF:
                return "server closing" if self._stopping else "closed by the client"
            return f"connection error: {os.strerror(state.err)}"

    def _send(self, frames: list[p.Frame], version: int) -> None:
        """Send ``frames`` whole, each wait bounded by the send timeout.

        Raises:
            OSError: the socket broke or stalled (TimeoutError).
        """
        self.sock.sendall(b"".join(p.encode(f, version) for f in frames))

    def _refuse_header(self, header: bytes) -> str:
        """Answer a header the C loop did not take: what the asyncio path answers."""
        try:
            kind = p.parse_header(header, self.server.max_frame)[0]
        except p.ProtocolError as err:
            return self._refuse(err.code, err.message)
        if kind is p.FrameType.ERROR:
            return "the client sent ERROR"
        if kind in (p.FrameType.LIST, p.FrameType.MAP):
            return self._refuse(
                p.ErrorCode.BAD_FRAME, f"a fault channel carries only READ frames, not {kind.name}"
            )
        return self._refuse(p.ErrorCode.BAD_FRAME, self.server.not_from_client(kind))

    def _refuse(self, code: p.ErrorCode | int, message: str) -> str:
        """Send ERROR(code, message) for the connection, linger, and say why it ended."""
        frame = p.Error(code, message)
        self._post(self.count, 0, [frame], 0, 0)
        self._send([frame], self.version)
        self.sock.shutdown(socket.SHUT_WR)
        # Drain what the peer still sends for a moment, so the ERROR is not lost to a RST.
        end = time.monotonic() + _LINGER
        with contextlib.suppress(OSError):
            while (left := end - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv(1 << 16):
                    break
        return f"{p.error_name(code)}: {message}"
