"""A hostile page server and both clients against it, in one child process.

``python hostile_page_server.py CASE`` starts a fake server (a thread speaking
raw bytes) that misbehaves as CASE says, connects a ThreadedPageClient and a
PageClient to it in turn, fetches one page with each and prints one JSON line:
``{"threaded": OUTCOME, "asyncio": OUTCOME, "maxrss": BYTES}`` (VmHWM) where OUTCOME
is ``{"type": exception class name or "ok", "message": ..., "seconds": ...}``.
Run by tests/test_hostile_server.py, which also samples this process's RSS.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable

from uffd.pagestore import protocol as p
from uffd.pagestore.client import PageClient, ThreadedPageClient

PS = 4096
TIMEOUT = 1.0
PAGE = bytes(range(256)) * (PS // 256)


def header(kind: int, rid: int, length: int, flags: int = 0) -> bytes:
    return p.HEADER.pack(p.MAGIC, p.VERSION, kind, flags, 0, rid, length)


def hello(max_frame: int = p.MAX_FRAME, max_pending: int = 64) -> bytes:
    payload = struct.pack(">BBBBII32s", 1, 1, 0, 0, max_frame, max_pending, bytes(32))
    return header(p.FrameType.HELLO, 0, len(payload)) + payload


def regions(page_size: int = PS, length: int = 16 * PS) -> bytes:
    payload = struct.pack(">IH", page_size, 1) + bytes([3]) + b"mem" + struct.pack(">Q", length)
    return header(p.FrameType.REGIONS, 0, len(payload)) + payload


def read_frame(conn: socket.socket) -> tuple[int, int, bytes]:
    """(type, request id, payload) of the next frame the client sends."""
    head = recv_exact(conn, p.HEADER.size)
    _, _, kind, _, _, rid, length = p.HEADER.unpack(head)
    return kind, rid, recv_exact(conn, length)


def recv_exact(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        more = conn.recv(n - len(out))
        if not more:
            raise EOFError
        out += more
    return out


def handshake(conn: socket.socket) -> int:
    """HELLO, LIST -> REGIONS, then the request id of the client's first READ."""
    conn.sendall(hello())
    read_frame(conn)
    conn.sendall(regions())
    kind, rid, _ = read_frame(conn)
    assert kind == p.FrameType.READ
    return rid


def reply(conn: socket.socket, rid: int) -> None:
    conn.sendall(p.encode(p.Data(0, PAGE, rid)) + p.encode(p.End(PS, rid)))


def linger(conn: socket.socket) -> None:
    """Keep the connection open (silent) until the client gives up."""
    conn.settimeout(TIMEOUT * 3)
    try:
        while conn.recv(1 << 16):
            pass
    except OSError:
        pass


def after_read(send: Callable[[int], Iterable[bytes]]) -> Callable[[socket.socket], None]:
    """A case that answers the client's first READ with the pieces ``send(rid)`` makes."""

    def case(conn: socket.socket) -> None:
        rid = handshake(conn)
        for piece in send(rid):
            conn.sendall(piece)
        linger(conn)

    return case


class _Late:
    """A 1 MiB DATA frame for a request nobody made, built once and sent many times."""

    def __init__(self) -> None:
        self.body = bytes(p.MAX_FRAME - 8)

    def __mod__(self, rid: int) -> memoryview:
        return memoryview(p.data_header(rid, 0, len(self.body)) + self.body)


LATE = _Late()

CASES: dict[str, Callable[[socket.socket], None]] = {
    "hello_4g_frames": lambda c: (c.sendall(hello(0xFFFFFFFF)), linger(c)),
    "hello_zero_pending": lambda c: (c.sendall(hello(max_pending=0)), linger(c)),
    "silent_handshake": linger,
    "garbage": lambda c: (c.sendall(os.urandom(4096)), linger(c)),
    "regions_page_size_0": lambda c: (c.sendall(hello()), read_frame(c),
                                      c.sendall(regions(page_size=0)), linger(c)),
    "regions_misaligned": lambda c: (c.sendall(hello()), read_frame(c),
                                     c.sendall(regions(length=PS + 1)), linger(c)),
    "data_header_4g": after_read(lambda rid: [header(p.FrameType.DATA, rid, 0xFFFFFFFF)]),
    "error_1mib": after_read(lambda rid: [header(p.FrameType.ERROR, rid, p.MAX_FRAME),
                                          b"\0\1" + bytes(p.MAX_FRAME - 2)]),
    "data_outside": after_read(lambda rid: [p.encode(p.Data(0, bytes(4 * PS), rid))]),
    "zero_huge": after_read(lambda rid: [p.encode(p.Zero(0, 1 << 62, rid))]),
    "end_too_much": after_read(lambda rid: [p.encode(p.End(1 << 40, rid))]),
    "silent_after_read": after_read(lambda rid: []),
    "late_flood_then_reply": after_read(
        lambda rid: [*(LATE % (rid + 1000) for _ in range(32)),
                     p.encode(p.Data(0, PAGE, rid)) + p.encode(p.End(PS, rid))]
    ),
}  # fmt: skip


def serve(listener: socket.socket, case: Callable[[socket.socket], None]) -> None:
    for _ in range(2):
        conn, _ = listener.accept()
        try:
            case(conn)
        except (OSError, EOFError, AssertionError):
            pass
        finally:
            conn.close()


def outcome(start: float, data: bytes | None, err: BaseException | None) -> dict[str, object]:
    seconds = round(time.monotonic() - start, 3)
    if err is not None:
        return {"type": type(err).__name__, "message": str(err)[:300], "seconds": seconds}
    return {"type": "ok", "correct": data == PAGE, "seconds": seconds}


def run_threaded(url: str) -> dict[str, object]:
    start = time.monotonic()
    try:
        with ThreadedPageClient(url, request_timeout=TIMEOUT) as client:
            data = client.read("mem", 0, PS)
    except Exception as err:
        return outcome(start, None, err)
    return outcome(start, data, None)


async def run_asyncio(url: str) -> dict[str, object]:
    start = time.monotonic()
    try:
        async with await PageClient.connect(url, request_timeout=TIMEOUT) as client:
            data = await client.read("mem", 0, PS)
    except Exception as err:
        return outcome(start, None, err)
    return outcome(start, data, None)


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM: ru_maxrss would include the forking parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    server = threading.Thread(target=serve, args=(listener, CASES[sys.argv[1]]), daemon=True)
    server.start()
    result = {"threaded": run_threaded(url), "asyncio": asyncio.run(run_asyncio(url))}
    result["maxrss"] = peak_rss()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
