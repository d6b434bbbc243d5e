"""The pump serves a page server's faults itself (``NativeSource("remote")``, csrc/uffd_link.c).

Real page servers (``uffd serve`` processes, or hand-written ones on loopback
for the misbehaving cases), real userfaultfd, threads faulting on registered
memory. The pump sends the READ and installs the reply with no Python; when
the link fails (the server dies, sends garbage, falls silent) the fault and
every later one reach the ops' ``handle_missing``, within the deadline.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _dispatch_helpers import assert_pages, read_concurrently, wait_for
from conftest import PAGE, run_in_thread

from uffd import FaultHandler, Mode, mem
from uffd._mapping import Fault, Mapping
from uffd._ops import UffdOps
from uffd._pump import NativeSource, RemoteLink
from uffd._resolution import Resolution
from uffd.pagestore import protocol as p
from uffd.pagestore.snapshot import write_snapshot
from uffd.restore import faults
from uffd.restore.urgent import UrgentLink

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from _helpers import (
    DaemonThread,
    ServerProcess,
    bad_pages,
    digests_of_source,
    finish_worker,
    pattern,
    read_digests,
    spawn_restore,
)
from frames import frames_until

Regions = Callable[..., mem.Region]
PAGES = 64
SIZE = PAGES * PAGE
WAIT = 10.0


@pytest.fixture(scope="module")
def image() -> bytes:
    """The snapshot's bytes: a known pattern, every 16th page zero (sent as ZERO frames)."""
    return bytes(pattern(SIZE, seed=11))


@pytest.fixture
def server(image: bytes) -> Iterator[ServerProcess]:
    """``uffd serve`` of a one-region snapshot of ``image`` (per test: some tests kill it)."""
    with tempfile.TemporaryDirectory(prefix="uffd-nr-") as tmp:
        path = os.path.join(tmp, "s.snap")
        write_snapshot(path, {"mem": image})
        with ServerProcess(path) as srv:
            yield srv


def hand_over(url: str) -> RemoteLink:
    """A handshaken fault-only connection to ``url``, handed to a RemoteLink."""
    urgent = UrgentLink(url, timeout=WAIT)
    handed = urgent.hand_over()
    assert handed is not None
    fd, version, max_frame, ids = handed
    assert ids == {"mem": 0}
    urgent.close()  # the socket is the link's now: this closes nothing of it
    return RemoteLink(fd, version, max_frame)


class RemoteOps(UffdOps):
    """MISSING faults over ``link`` in the pump; in Python (counted) from ``image``."""

    def __init__(self, link: RemoteLink, image: bytes, timeout: float) -> None:
        self.link, self.image, self.timeout = link, image, timeout
        self.python_faults = 0

    def native_source(self, mapping: Mapping) -> NativeSource | None:
        """Region 0 of the server from the mapping's start."""
        return NativeSource("remote", link=self.link, region=0, timeout=self.timeout)

    def handle_missing(self, fault: Fault) -> Resolution:
        """The Python path: the page from the known image."""
        self.python_faults += 1
        return Resolution.copy(self.image[fault.offset : fault.offset + PAGE])


@contextlib.contextmanager
def pump_link(
    url: str, image: bytes, timeout: float = 1.0
) -> Iterator[tuple[RemoteLink, RemoteOps]]:
    """A RemoteLink to ``url`` and RemoteOps over it; the link is closed after the block."""
    link = hand_over(url)
    try:
        yield link, RemoteOps(link, image, timeout)
    finally:
        link.close()


@contextlib.contextmanager
def served(region: mem.Region, ops: RemoteOps, deadline: float = 2.0) -> Iterator[FaultHandler]:
    """A FaultHandler serving ``region`` MISSING with ``ops``, stopped after the block."""
    with FaultHandler(deadline=deadline) as handler:
        handler.register(region, Mode.MISSING, ops)
        yield handler


def assert_image(data: bytes, image: bytes, what: str) -> None:
    """``data`` is the first pages of ``image``, page by page."""
    assert_pages(data, PAGE, lambda i: image[i * PAGE : (i + 1) * PAGE], what)


def served_addresses(link: RemoteLink) -> list[int]:
    """The addresses the pump reports served since the last call."""
    pairs, lost = link.take()
    assert lost == 0
    return pairs[0::2]


def test_pages_come_over_the_link_without_python(
    server: ServerProcess, image: bytes, region_factory: Regions
) -> None:
    """Every page (zero pages too) is installed by the pump from the server; Python sees none."""
    region = region_factory("anon", pages=PAGES)
    with pump_link(server.url, image) as (link, ops), served(region, ops) as handler:
        data = read_concurrently(region)
        assert handler.stats.native_faults == PAGES
        assert ops.python_faults == 0
        assert link.dead is None
        assert sorted(served_addresses(link)) == [region.addr + i * PAGE for i in range(PAGES)]
    assert_image(data, image, "native remote")


def test_server_killed_mid_restore_faults_take_the_python_path(
    server: ServerProcess, image: bytes, region_factory: Regions
) -> None:
    """After the server dies the link is dropped and the remaining faults are answered by Python."""
    region = region_factory("anon", pages=PAGES)
    half = PAGES // 2
    with pump_link(server.url, image) as (link, ops), served(region, ops) as handler:
        first = region.read(0, half * PAGE)
        assert handler.stats.native_faults == half
        server.kill()
        started = time.monotonic()
        rest = region.read(half * PAGE, (PAGES - half) * PAGE)
        assert time.monotonic() - started < WAIT
        assert handler.stats.native_faults == half
        assert ops.python_faults == PAGES - half
        assert link.dead in ("EPIPE", "ECONNRESET")
    assert_image(first + rest, image, "after the kill")


class ScriptedServer:
    """A hand-written page server on loopback: HELLO and REGIONS, then ``answer`` per READ.

    ``answer(read, sock)`` writes whatever it likes; it runs for every READ
    until the client closes the connection.
    """

    def __init__(self, answer: Callable[[p.Read, socket.socket], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.answer = answer
        self.reads = 0
        self.conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.conn = conn
        conn.settimeout(WAIT)
        conn.sendall(p.encode(p.Hello(nonce=bytes(32), auth_required=False)))
        decoder, frames = p.FrameDecoder(), []
        frames_until(conn, decoder, frames, p.List)
        conn.sendall(p.encode(p.Regions(PAGE, (p.RegionEntry("mem", SIZE),))))
        while True:
            try:
                read = frames_until(conn, decoder, frames, p.Read)
            except (OSError, EOFError, p.ProtocolError):
                return
            self.reads += 1
            self.answer(read, conn)

    def close(self) -> None:
        """Close the listener and the connection, then join the thread (bounded)."""
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        self._thread.join(WAIT)


def serve_page(image: bytes) -> Callable[[p.Read, socket.socket], None]:
    """An answer that replies correctly from ``image``: DATA then END."""

    def answer(read: p.Read, conn: socket.socket) -> None:
        data = image[read.offset : read.offset + read.length]
        conn.sendall(
            p.encode(p.Data(read.offset, data, read.request_id))
            + p.encode(p.End(len(data), read.request_id))
        )

    return answer


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    """Factory of ScriptedServers, closed at teardown."""
    made: list[ScriptedServer] = []

    def make(answer: Callable[[p.Read, socket.socket], None]) -> ScriptedServer:
        made.append(ScriptedServer(answer))
        return made[-1]

    yield make
    for srv in made:
        srv.close()


def test_garbage_reply_drops_the_link(
    scripted: Callable[..., ScriptedServer], image: bytes, region_factory: Regions
) -> None:
    """A reply that breaks the protocol kills the link; every fault is still answered."""

    def answer(read: p.Read, conn: socket.socket) -> None:
        conn.sendall(b"\x55\x46\x02\x06" + bytes(40))  # a DATA header with a wrong request id

    srv = scripted(answer)
    region = region_factory("anon", pages=4)
    with pump_link(srv.url, image) as (link, ops), served(region, ops) as handler:
        data = region.read(0, region.length)
        assert handler.stats.native_faults == 0
        assert link.dead == "EPROTO"
        assert ops.python_faults == 4
        assert srv.reads == 1  # never touched again once dead
    assert_image(data, image, "after garbage")


def test_error_reply_keeps_the_link(
    scripted: Callable[..., ScriptedServer], image: bytes, region_factory: Regions
) -> None:
    """An ERROR for one READ sends that fault to Python; the next fault is served natively."""
    good = serve_page(image)

    def answer(read: p.Read, conn: socket.socket) -> None:
        if read.offset == 0:
            conn.sendall(p.encode(p.Error(p.ErrorCode.INTERNAL, "bad chunk", read.request_id)))
        else:
            good(read, conn)

    srv = scripted(answer)
    region = region_factory("anon", pages=2)
    with pump_link(srv.url, image) as (link, ops), served(region, ops) as handler:
        data = region.read(0, PAGE) + region.read(PAGE, PAGE)
        assert handler.stats.native_faults == 1
        assert ops.python_faults == 1
        assert link.dead is None
    assert_image(data, image, "after an ERROR")


def test_stalled_server_fault_resolved_within_the_deadline(
    scripted: Callable[..., ScriptedServer], image: bytes, region_factory: Regions
) -> None:
    """A server that never answers costs a fault the link's timeout, then Python serves it."""
    srv = scripted(lambda read, conn: None)
    region = region_factory("anon", pages=2)
    with (
        pump_link(srv.url, image, timeout=0.2) as (link, ops),
        served(region, ops, deadline=0.4) as handler,
    ):
        started = time.monotonic()
        data = region.read(0, region.length)
        took = time.monotonic() - started
        assert handler.stats.expired == 0  # Python answered within the deadline
        assert link.dead == "ETIMEDOUT"
        assert ops.python_faults == 2
        assert 0.2 <= took < 0.4 + 0.2  # one timeout; the second fault never waits on the link
    assert_image(data, image, "after a stall")


def test_stop_while_the_pump_waits_on_the_socket_ends_promptly(
    scripted: Callable[..., ScriptedServer], image: bytes, region_factory: Regions
) -> None:
    """stop() ends a read the pump waits on (a 30 s timeout) at once; the fault is resolved."""
    srv = scripted(lambda read, conn: None)
    region = region_factory("anon", pages=1)
    with pump_link(srv.url, image, timeout=30.0) as (link, ops):
        handler = FaultHandler(deadline=60.0, fallback="zero")
        handler.register(region, Mode.MISSING, ops)
        handler.start()
        toucher = run_in_thread(region.read, 0, PAGE)
        wait_for(lambda: srv.reads == 1, "the pump's READ")
        started = time.monotonic()
        handler.stop()
        assert time.monotonic() - started < 2.0
        # Handed to Python as the stop began: its answer, or the stop's fallback.
        assert toucher.finish(WAIT) in (image[:PAGE], bytes(PAGE))
        assert link.dead == "ECANCELED"


def test_progress_sees_the_pump_faults_in_a_daemon_restore(
    image: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore through the daemon: pages right, served by the pump, counted in the report."""
    python_faults: list[int] = []
    handle_missing = faults.SourceOps.handle_missing

    def counted(self: faults.SourceOps, fault: Fault) -> Resolution:
        python_faults.append(fault.address)
        return handle_missing(self, fault)

    monkeypatch.setattr(faults.SourceOps, "handle_missing", counted)
    with tempfile.TemporaryDirectory(prefix="uffd-nr-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "s.snap")
        write_snapshot(path, {"mem": image})
        sock = os.path.join(tmp, "h.sock")
        digests = os.path.join(tmp, "digests")
        with (
            ServerProcess(path) as srv,
            DaemonThread(sock, srv.url, prefetch=False, working_set=None) as daemon,
        ):
            proc = spawn_restore(sock, SIZE, "--order", "sequential", digests=digests)
            result = finish_worker(proc, timeout=WAIT * 3)
            (report,) = daemon.reports(1)
        assert not bad_pages(read_digests(digests), digests_of_source(path, SIZE))
    assert result["pages"] == PAGES and result["sigbus"] == 0
    assert python_faults == []
    # The snapshot's zero pages are mapped at session start, every other page faulted.
    assert report["faulted"] + report["zeroed"] == PAGES and report["faulted"] > 0
    assert report["fault_p50_us"] > 0 and report["errors"] == []


def test_link_read_between_faults_keeps_the_link(
    server: ServerProcess, image: bytes, region_factory: Regions
) -> None:
    """A keepalive read over the link gets its page, and the pump serves faults after it."""
    region = region_factory("anon", pages=2)
    page = bytearray(PAGE)
    with pump_link(server.url, image) as (link, ops):
        assert link.read(0, 3 * PAGE, page, WAIT)
        assert bytes(page) == image[3 * PAGE : 4 * PAGE]
        with served(region, ops) as handler:
            data = region.read(0, region.length)
            assert handler.stats.native_faults == 2
            assert link.dead is None and ops.python_faults == 0
    assert not link.read(0, 0, page, WAIT)  # closed: nothing read
    assert_image(data, image, "after a keepalive")
