"""Reading protocol frames in a test's hand-written peer, with every read bounded."""

from __future__ import annotations

import socket

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
