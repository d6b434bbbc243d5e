"""One bulk piece of a READ reply as a plan of non-blocking writes: headers and file ranges.

A page server sends a large piece from a pool thread with ``sendfile(2)``, but
a pool thread must never wait for a peer: a client that stops reading would
hold it for as long as it likes (eight such clients starved a 6-thread pool).
So the socket is non-blocking and :meth:`SendPlan.advance` sends what the
socket takes now and returns; the caller (the event loop) waits for the socket
to become writable, with a timeout, and calls it again.

The plan is a sequence of units, each ending on a frame boundary (a DATA
frame, with the ZERO frames before it). Setting :attr:`SendPlan.stop` (an
urgent request arrived on the same connection) makes :meth:`advance` stop at
the next boundary: the reply so far is well-formed and covers
:attr:`SendPlan.covered` bytes, and the rest can be served later.

Calling context: one plan per piece, advanced by one thread at a time;
``stop`` may be set from another thread.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import socket

from uffd.pagestore import protocol as p

__all__ = ["Progress", "SendPlan"]


class Progress(enum.Enum):
    """What :meth:`SendPlan.advance` did."""

    DONE = "done"  # every unit went out
    BLOCKED = "blocked"  # the socket is full: wait until it is writable, then call again
    STOPPED = "stopped"  # stop was set: ended on a frame boundary, ``covered`` bytes sent


@dataclasses.dataclass
class _Unit:
    head: bytes  # ZERO frames, then a DATA header (or only ZERO frames, at the end)
    file_range: tuple[int, int] | None  # (file offset, count) to sendfile after head
    covers: int  # bytes of the request this unit answers
    data: int  # of which page bytes
    zeros: int  # of which zero ranges


class SendPlan:
    """The DATA and ZERO frames of one piece: ``runs`` from ``file_extents``, sent in order.

    ``runs`` are ``(offset, length, file offset or None)``; a present run longer
    than ``frame_bytes`` goes out as several DATA frames, each its 24-byte
    header (protocol ``version``) then ``sendfile`` of its bytes from ``fd``.
    ``sent``, ``zeros`` and ``covered`` count page bytes, zero-range bytes and
    request bytes of the units fully sent so far.
    """

    def __init__(
        self,
        request_id: int,
        runs: list[tuple[int, int, int | None]],
        frame_bytes: int,
        fd: int,
        version: int = p.VERSION,
    ) -> None:
        self.fd = fd
        self.sent = self.zeros = self.covered = 0
        self.stop = False
        self._units: list[_Unit] = []
        head: list[bytes] = []
        zeros = 0
        for offset, length, file_offset in runs:
            if file_offset is None:
                head.append(p.encode(p.Zero(offset, length, request_id), version))
                zeros += length
                continue
            for at in range(0, length, frame_bytes):
                n = min(frame_bytes, length - at)
                head.append(p.data_header(request_id, offset + at, n, version))
                self._units.append(
                    _Unit(b"".join(head), (file_offset + at, n), zeros + n, n, zeros)
                )
                head.clear()
                zeros = 0
        if head:
            self._units.append(_Unit(b"".join(head), None, zeros, 0, zeros))
        self._index = 0
        self._done_in_head = 0
        self._done_in_file = 0

    def advance(self, sock: socket.socket) -> Progress:
        """Send as much as the non-blocking ``sock`` takes now (see :class:`Progress`).

        Raises:
            OSError: the socket broke (EPIPE, ECONNRESET...), or the file ended
                before a range was sent (truncated while open: EIO).
        """
        out = sock.fileno()
        while self._index < len(self._units):
            unit = self._units[self._index]
            try:
                while self._done_in_head < len(unit.head):
                    view = memoryview(unit.head)[self._done_in_head :]
                    self._done_in_head += sock.send(
                        view, socket.MSG_MORE if unit.file_range is not None else 0
                    )
                if unit.file_range is not None:
                    offset, count = unit.file_range
                    while self._done_in_file < count:
                        n = os.sendfile(
                            out, self.fd, offset + self._done_in_file, count - self._done_in_file
                        )
                        if not n:
                            raise OSError(5, "the file ended before the range was sent")
                        self._done_in_file += n
            except BlockingIOError:
                return Progress.BLOCKED
            self._index += 1
            self._done_in_head = self._done_in_file = 0
            self.sent += unit.data
            self.zeros += unit.zeros
            self.covered += unit.covers
            if self.stop and self._index < len(self._units):
                return Progress.STOPPED
        return Progress.DONE
