"""One bulk piece of a READ reply as a plan of non-blocking writes: headers and file ranges.

A page server sends a large piece from a pool thread with ``sendfile(2)``, but
a pool thread must never wait for a peer: a client that stops reading would
hold it for as long as it likes (eight such clients starved a 6-thread pool).
So the socket is non-blocking and :meth:`SendPlan.advance` sends what the
socket takes now and returns; the caller (the event loop) waits for the socket
to become writable, with a timeout, and calls it again.

Calling context: one plan per piece, advanced by one thread at a time.
"""

from __future__ import annotations

import os
import socket

from uffd.pagestore import protocol as p

__all__ = ["SendPlan"]


class SendPlan:
    """The DATA and ZERO frames of one piece: ``runs`` from ``file_extents``, sent in order.

    ``runs`` are ``(offset, length, file offset or None)``; a present run longer
    than ``frame_bytes`` goes out as several DATA frames, each its 24-byte
    header (protocol ``version``) then ``sendfile`` of its bytes from ``fd``.
    ``sent`` and ``zeros`` count page bytes and zero-range bytes once the plan
    is done.
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
        self.sent = 0
        self.zeros = 0
        # Segments: bytes to send, or (file offset, count) to sendfile.
        self._segments: list[bytes | tuple[int, int]] = []
        small: list[bytes] = []
        for offset, length, file_offset in runs:
            if file_offset is None:
                small.append(p.encode(p.Zero(offset, length, request_id), version))
                self.zeros += length
                continue
            for at in range(0, length, frame_bytes):
                n = min(frame_bytes, length - at)
                small.append(p.data_header(request_id, offset + at, n, version))
                self._segments += [b"".join(small), (file_offset + at, n)]
                small.clear()
                self.sent += n
        if small:
            self._segments.append(b"".join(small))
        self._index = 0
        self._done_in_segment = 0

    @property
    def done(self) -> bool:
        """True once every segment went out."""
        return self._index == len(self._segments)

    def advance(self, sock: socket.socket) -> bool:
        """Send as much as the non-blocking ``sock`` takes now; True when the plan is done.

        Raises:
            OSError: the socket broke (EPIPE, ECONNRESET...), or the file ended
                before a range was sent (truncated while open: EIO).
        """
        out = sock.fileno()
        while self._index < len(self._segments):
            segment = self._segments[self._index]
            try:
                if isinstance(segment, bytes):
                    more = self._index + 1 < len(self._segments)
                    view = memoryview(segment)[self._done_in_segment :]
                    n = sock.send(view, socket.MSG_MORE if more else 0)
                    left = len(view) - n
                else:
                    offset, count = segment
                    done = self._done_in_segment
                    n = os.sendfile(out, self.fd, offset + done, count - done)
                    if not n:
                        raise OSError(5, "the file ended before the range was sent")
                    left = count - done - n
            except BlockingIOError:
                return False
            if left:
                self._done_in_segment += n
                continue
            self._index += 1
            self._done_in_segment = 0
        return True
