"""The faults' synchronous page-server connection (UrgentLink): real server processes, real sockets.

A fault reads its page on the dispatch thread over this link; whatever the
server does (refuses, falls silent, dies), a read returns within its timeout
and says False, so the fault takes the deferred path and the handler's fallback.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffd.pagestore import protocol as p
from uffd.pagestore.snapshot import write_snapshot
from uffd.restore.sources import RemoteSource
from uffd.restore.urgent import UrgentLink

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from _helpers import PAGE, ServerProcess, pattern
from frames import frames_until

SIZE = 3 << 20  # over the server's 1 MiB max_read: a whole read takes several READs
WAIT = 10.0


@pytest.fixture(scope="module")
def image() -> bytes:
    """The snapshot's bytes: a known pattern, every 16th page zero (not stored)."""
    return pattern(SIZE, seed=5)


@pytest.fixture(scope="module")
def server(image: bytes) -> Iterator[ServerProcess]:
    """``uffd serve`` of a two-region snapshot of ``image``."""
    with tempfile.TemporaryDirectory(prefix="uffd-link-") as tmp:
        path = os.path.join(tmp, "s.snap")
        write_snapshot(path, {"low": image[: 1 << 20], "high": image[1 << 20 :]})
        with ServerProcess(path) as srv:
            yield srv


class SilentServer:
    """A hand-written page server on loopback: HELLO and REGIONS, then no answer to any READ."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.reads = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self._conns.append(conn)
        conn.settimeout(WAIT)
        conn.sendall(p.encode(p.Hello(nonce=bytes(32), auth_required=False)))
        decoder, frames = p.FrameDecoder(), []
        frames_until(conn, decoder, frames, p.List)
        conn.sendall(p.encode(p.Regions(PAGE, (p.RegionEntry("mem", 64 * PAGE),))))
        frames_until(conn, decoder, frames, p.Read)
        self.reads += 1

    def close(self) -> None:
        self._thread.join(WAIT)
        for conn in self._conns:
            conn.close()
        self.listener.close()


def test_reads_pages_zero_pages_and_reads_longer_than_one_reply(
    server: ServerProcess, image: bytes
) -> None:
    """Stored pages, a zero page and a 2 MiB read (several short replies) arrive byte for byte."""
    link = UrgentLink(server.url, timeout=WAIT)
    try:
        for region, offset, base in (("low", 3 * PAGE, 0), ("high", 0, 1 << 20)):
            page = memoryview(bytearray(PAGE))
            assert link.read_into(region, offset, page, WAIT)
            assert page == image[base + offset : base + offset + PAGE]
        zero = memoryview(bytearray(b"\xff" * PAGE))  # page 15 of "high" (271) is a zero page
        assert link.read_into("high", 15 * PAGE, zero, WAIT)
        assert zero == bytes(PAGE)
        big = memoryview(bytearray(2 << 20))
        assert link.read_into("high", 0, big, WAIT)
        assert big == image[1 << 20 :]
        assert not link.broken
    finally:
        link.close()


def test_a_refused_read_returns_false_and_the_link_stays_usable(
    server: ServerProcess, image: bytes
) -> None:
    """A READ outside its region is refused (False); the next read on the link succeeds."""
    link = UrgentLink(server.url, timeout=WAIT)
    try:
        assert not link.read_into("low", 1 << 20, memoryview(bytearray(PAGE)), WAIT)
        assert not link.broken
        page = memoryview(bytearray(PAGE))
        assert link.read_into("low", PAGE, page, WAIT)
        assert page == image[PAGE : 2 * PAGE]
    finally:
        link.close()


def test_a_silent_server_breaks_the_link_within_the_timeout_and_a_busy_link_says_no() -> None:
    """No reply: the read returns False after its timeout, not later, and the link is broken
    for good; while that read waits, a second caller gets False at once instead of waiting."""
    silent = SilentServer()
    link = UrgentLink(silent.url, timeout=WAIT)
    try:
        outcome: list[bool] = []
        took: list[float] = []

        def read() -> None:
            start = time.monotonic()
            outcome.append(link.read_into("mem", 0, memoryview(bytearray(PAGE)), 0.5))
            took.append(time.monotonic() - start)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + WAIT
        while not silent.reads and time.monotonic() < deadline:
            time.sleep(0.005)
        assert silent.reads == 1
        start = time.monotonic()
        assert not link.read_into("mem", PAGE, memoryview(bytearray(PAGE)), WAIT)
        assert time.monotonic() - start < 0.1  # busy: no wait for the first read
        reader.join(WAIT)
        assert outcome == [False] and 0.4 < took[0] < 5.0
        assert link.broken
        assert not link.read_into("mem", 0, memoryview(bytearray(PAGE)), WAIT)
    finally:
        link.close()
        silent.close()


def test_a_dead_server_breaks_the_link_at_once(image: bytes) -> None:
    """The server is killed: the next read returns False without waiting for its timeout."""
    with tempfile.TemporaryDirectory(prefix="uffd-link-") as tmp:
        path = os.path.join(tmp, "s.snap")
        write_snapshot(path, {"low": image[: 1 << 20]})
        with ServerProcess(path) as srv:
            link = UrgentLink(srv.url, timeout=WAIT)
            srv.kill()
            try:
                start = time.monotonic()
                assert not link.read_into("low", 0, memoryview(bytearray(PAGE)), WAIT)
                assert time.monotonic() - start < WAIT / 2 and link.broken
            finally:
                link.close()


def test_a_session_source_reads_faults_on_its_link_the_shared_source_has_none(
    server: ServerProcess, image: bytes
) -> None:
    """``session()`` connections read a page synchronously (``read_now``), across the flat
    image; the daemon's shared source has no fault link and says False, as a closed session."""
    shared = RemoteSource(server.url, timeout=WAIT)
    try:
        page = memoryview(bytearray(PAGE))
        assert not shared.read_now(0, page, WAIT)
        session = shared.session()
        try:
            for offset in (0, (1 << 20) + 5 * PAGE):
                assert session.read_now(offset, page, WAIT)
                assert page == image[offset : offset + PAGE]
        finally:
            session.close()
        assert not session.read_now(0, page, WAIT)
    finally:
        shared.close()
