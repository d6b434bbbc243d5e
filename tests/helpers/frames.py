"""Reading protocol frames in a test's hand-written peer, with every read bounded."""

from __future__ import annotations

import socket

import pytest

from uffd.pagestore import protocol as p


def frames_until(
    sock: socket.socket, decoder: p.FrameDecoder, frames: list[p.Frame], kind: type
) -> p.Frame:
    """Take the first ``kind`` frame from ``frames``, reading ``sock`` until one comes.

    Frames read past it stay in ``frames`` for the next call. Each read is bounded
    by the socket's timeout (set one); EOF raises EOFError at once instead of spinning.
    """
    while not any(isinstance(f, kind) for f in frames):
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError(f"the peer closed the connection before a {kind.__name__} frame")
        frames.extend(decoder.feed(data))
    found = next(f for f in frames if isinstance(f, kind))
    frames.remove(found)
    return found


class FramePeer:
    """A blocking socket speaking frames by hand (to misbehave on purpose).

    ``sock`` is connected and has its timeout set: every read of the test is
    bounded by it (a test may shorten it; waiting for EOF uses it again).
    ``version`` is the header version frames are sent in.
    """

    def __init__(self, sock: socket.socket, version: int = p.VERSION) -> None:
        self.sock = sock
        self.wait = sock.gettimeout()
        self.version = version
        self.decoder = p.FrameDecoder(max_payload=16 << 20)
        self.frames: list[p.Frame] = []

    def send(self, *frames: p.Frame | bytes) -> None:
        self.sock.sendall(
            b"".join(f if isinstance(f, bytes) else p.encode(f, self.version) for f in frames)
        )

    def recv(self) -> p.Frame:
        """The next frame (fails the test at the socket's timeout or at EOF)."""
        while not self.frames:
            data = self.sock.recv(1 << 16)
            assert data, "the server closed the connection"
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def reply(self, read: p.Read) -> list[p.Frame]:
        """Send ``read`` and return its frames up to END or ERROR."""
        self.send(read)
        out = [self.recv()]
        while not isinstance(out[-1], (p.End, p.Error)):
            out.append(self.recv())
        return out

    def closed_after_error(self, code: p.ErrorCode) -> p.Error:
        """The next frame is ERROR(code) for the connection, then EOF."""
        frame = self.recv()
        assert isinstance(frame, p.Error) and frame.code == code and frame.request_id == 0, frame
        self.sock.settimeout(self.wait)
        with pytest.raises((ConnectionResetError, AssertionError)):
            while True:
                assert self.sock.recv(1 << 16)
        return frame

    def close(self) -> None:
        self.sock.close()
