"""Fault channels (protocol version 3, LIST flag FAULTS): READs served in C, real sockets.

Each test talks to a real PageServer on 127.0.0.1 over real sockets, on a
fault channel (served by csrc/uffd_serve.c on a thread of its own) and, to
compare, on a plain connection (the asyncio path): the same bytes, the same
ERROR codes and messages, the same timeouts.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.frames import FramePeer

from uffd.pagestore import protocol as p
from uffd.pagestore.client import ThreadedPageClient
from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import RawMemoryFile, Snapshot, write_snapshot
from uffd.restore.urgent import UrgentLink

PS = 4096
PAGES = 512
WAIT = 5.0


def _image(npages: int, seed: int) -> bytes:
    """Random pages, about a third of them zero, in runs."""
    rng = random.Random(seed)
    buf = bytearray(npages * PS)
    page = 0
    while page < npages:
        run = rng.randint(1, 8)
        if rng.random() > 0.33:
            buf[page * PS : (page + run) * PS] = rng.randbytes(
                len(buf[page * PS : (page + run) * PS])
            )
        page += run
    return bytes(buf)


IMAGE = _image(PAGES, seed=11)


@pytest.fixture(scope="module")
def raw_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw memory file: IMAGE, then 64 pages of hole (sent as ZERO frames)."""
    path = tmp_path_factory.mktemp("faults") / "mem.raw"
    with open(path, "wb") as f:
        f.write(IMAGE)
        f.truncate(len(IMAGE) + 64 * PS)
    return path


@pytest.fixture(scope="module")
def snap_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of IMAGE ("mem") and a small second region, 4-page chunks."""
    path = tmp_path_factory.mktemp("faults") / "s.snap"
    write_snapshot(path, {"mem": IMAGE, "tail": IMAGE[: 8 * PS]}, page_size=PS, chunk_pages=4)
    return path


@pytest.fixture(params=["raw", "snapshot"])
def server(
    request: pytest.FixtureRequest, raw_path: Path, snap_path: Path
) -> Iterator[ServerThread]:
    """A default server of a raw memory file, or of a verified snapshot."""
    if request.param == "raw":
        source: RawMemoryFile | Snapshot = RawMemoryFile(
            raw_path, regions=[("mem", 0, len(IMAGE)), ("tail", len(IMAGE), 64 * PS)]
        )
    else:
        source = Snapshot.open(snap_path)
    with source, ServerThread(source) as srv:
        yield srv


class Conn(FramePeer):
    """A hand-written peer (:class:`FramePeer`) past LIST; ``faults`` asks for a fault channel.

    ``wrap`` turns the connected socket into the one to speak on (TLS).
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        faults: bool,
        version: int = 3,
        wrap: Callable[[socket.socket], socket.socket] | None = None,
    ) -> None:
        sock = socket.create_connection(address, timeout=WAIT)
        super().__init__(sock if wrap is None else wrap(sock), version)
        hello = self.recv()
        assert isinstance(hello, p.Hello)
        self.send(p.List(faults=faults))
        regions = self.recv()
        assert isinstance(regions, p.Regions)
        self.regions = regions


def _bytes_of(frames: list[p.Frame], offset: int) -> bytes:
    """The bytes a reply's DATA and ZERO frames give, checked to be in order from ``offset``."""
    out = bytearray()
    for frame in frames:
        if isinstance(frame, p.Data):
            assert frame.offset == offset + len(out)
            out += frame.data
        elif isinstance(frame, p.Zero):
            assert frame.offset == offset + len(out)
            out += bytes(frame.length)
    end = frames[-1]
    assert isinstance(end, p.End) and end.served == len(out)
    return bytes(out)


def _fault_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "uffd-page-faults"]


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- the protocol ---------------------------------------------------------------------


def test_faults_flag_needs_version_3() -> None:
    """LIST FAULTS round-trips in version 3; not encodable in 2, BAD_FRAME in a v2 header."""
    wire = p.encode(p.List(faults=True), 3)
    assert p.HEADER.unpack_from(wire)[3] == p.FLAG_FAULTS
    assert p.FrameDecoder().feed(wire) == [p.List(faults=True)]
    with pytest.raises(ValueError, match="version 3"):
        p.encode(p.List(faults=True), 2)
    v2 = struct.pack(">HBBHHII", p.MAGIC, 2, p.FrameType.LIST, p.FLAG_FAULTS, 0, 0, 0)
    with pytest.raises(p.ProtocolError, match="flags") as info:
        p.FrameDecoder().feed(v2)
    assert info.value.code is p.ErrorCode.BAD_FRAME


# -- serving --------------------------------------------------------------------------


def test_pages_from_the_c_loop_match_the_image_and_the_asyncio_path(server: ServerThread) -> None:
    """Single pages, runs across zeros, a region's end and an over-max_read READ: right bytes."""
    fast = Conn(server.address, faults=True)
    plain = Conn(server.address, faults=False)
    _wait_until(lambda: len(_fault_threads()) == 1, "the fault channel's thread")
    rng = random.Random(3)
    reads = [(0, 0, PS), (0, (PAGES - 1) * PS, PS), (0, 0, PAGES * PS), (1, 0, 8 * PS)]
    reads += [(0, rng.randrange(PAGES) * PS, rng.randint(1, 40) * PS) for _ in range(200)]
    for rid, (region, offset, length) in enumerate(reads, 1):
        length = min(length, PAGES * PS - offset) if region == 0 else length
        read = p.Read(region, offset, length, True, rid)
        got, want = fast.reply(read), plain.reply(read)
        data = _bytes_of(got, offset)
        assert data == _bytes_of(want, offset)
        if region == 0:
            assert data == IMAGE[offset : offset + len(data)]
        if length <= 64 << 10:
            assert got == want  # the same frames, not only the same bytes
    fast.close()
    plain.close()
    _wait_until(lambda: not _fault_threads(), "the channel's thread to end")
    # The channel's counts reach the server's when its C loop returns (here: at EOF).
    _wait_until(lambda: server.stats.requests == 2 * len(reads), "the counters")


def test_urgent_link_reads_through_the_c_loop(server: ServerThread) -> None:
    """UrgentLink asks for a fault channel and reads every page right through it."""
    link = UrgentLink(server.url)
    try:
        _wait_until(lambda: len(_fault_threads()) == 1, "the fault channel's thread")
        page = bytearray(PS)
        for index in range(PAGES):
            assert link.read_into("mem", index * PS, memoryview(page), WAIT)
            assert page == IMAGE[index * PS : (index + 1) * PS], index
        whole = bytearray(PAGES * PS)
        assert link.read_into("mem", 0, memoryview(whole), WAIT)
        assert whole == IMAGE
    finally:
        link.close()


def test_errors_match_the_asyncio_path(server: ServerThread) -> None:
    """Every refused READ gets the asyncio path's code and message, and the channel goes on."""
    fast = Conn(server.address, faults=True)
    plain = Conn(server.address, faults=False)
    bad = [
        p.Read(7, 0, PS, True, 1),  # UNKNOWN_REGION
        p.Read(0, 100, PS, True, 2),  # misaligned: OUT_OF_RANGE
        p.Read(0, 0, 100, True, 3),
        p.Read(0, PAGES * PS - PS, 2 * PS, True, 4),  # past the end
        p.Read(0, (1 << 64) - PS, 2 * PS, True, 5),  # wraps around in 64 bits
        p.Read(0, 0, 0, True, 6),  # empty: END 0
        p.Read(0, PAGES * PS, 0, False, 7),
    ]
    for read in bad:
        got = fast.reply(read)
        assert got == plain.reply(read)
        assert isinstance(got[-1], (p.Error, p.End))
    assert fast.reply(p.Read(0, PS, PS, True, 9)) == plain.reply(p.Read(0, PS, PS, True, 9))
    fast.close()
    plain.close()


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (b"\xde\xad\xbe\xef" * 9, p.ErrorCode.BAD_FRAME),  # bad magic
        (struct.pack(">HBBHHII", p.MAGIC, 3, 5, 0, 0, 1, 0xFFFFFFFF), p.ErrorCode.TOO_LARGE),
        (struct.pack(">HBBHHII", p.MAGIC, 3, 5, 2, 0, 1, 20) + bytes(20), p.ErrorCode.BAD_FRAME),
        (struct.pack(">HBBHHII", p.MAGIC, 3, 5, 0, 1, 1, 20) + bytes(20), p.ErrorCode.BAD_FRAME),
        (struct.pack(">HBBHHII", p.MAGIC, 3, 5, 0, 0, 1, 21) + bytes(21), p.ErrorCode.BAD_FRAME),
        (struct.pack(">HBBHHII", p.MAGIC, 9, 5, 0, 0, 1, 20) + bytes(20), p.ErrorCode.VERSION),
        (struct.pack(">HBBHHII", p.MAGIC, 3, 99, 0, 0, 1, 0), p.ErrorCode.BAD_FRAME),
        (p.encode(p.Data(0, b"x"), 3), p.ErrorCode.BAD_FRAME),
    ],
)
def test_broken_frames_close_like_the_asyncio_path(
    server: ServerThread, wire: bytes, code: p.ErrorCode
) -> None:
    """A frame the C loop does not take gets the asyncio path's ERROR, then a hang-up."""
    errors = []
    for faults in (True, False):
        conn = Conn(server.address, faults=faults)
        conn.send(wire)
        errors.append(conn.closed_after_error(code))
        conn.close()
    assert errors[0] == errors[1]
    assert server.stats.errors == 2


def test_other_frame_types_refused_on_a_fault_channel(server: ServerThread) -> None:
    """A LIST or MAP on a fault channel is BAD_FRAME: it carries READs only."""
    for frame in (p.List(), p.Map(0, 0, PS)):
        conn = Conn(server.address, faults=True)
        conn.send(frame)
        assert "only READ" in conn.closed_after_error(p.ErrorCode.BAD_FRAME).message
        conn.close()


def test_corrupt_chunk_gives_the_same_internal_error(tmp_path: Path) -> None:
    """A chunk failing its checksum: the same ERROR INTERNAL on both paths; the rest is served."""
    path = tmp_path / "bad.snap"
    write_snapshot(path, {"a": b"\x01" * (4 * PS)}, page_size=PS, chunk_pages=2)
    data = bytearray(path.read_bytes())
    data[64 + 3 * PS] ^= 0xFF  # stored page 3: chunk 1
    path.write_bytes(data)
    with Snapshot.open(path) as bad, ServerThread(bad) as srv:
        fast = Conn(srv.address, faults=True)
        plain = Conn(srv.address, faults=False)
        read = p.Read(0, 2 * PS, PS, True, 1)
        got = fast.reply(read)
        assert got == plain.reply(read)
        assert isinstance(got[-1], p.Error) and got[-1].code is p.ErrorCode.INTERNAL
        assert "checksum" in got[-1].message
        good = fast.reply(p.Read(0, 0, 2 * PS, True, 2))
        assert _bytes_of(good, 0) == b"\x01" * (2 * PS)
        fast.close()
        plain.close()


# -- versions -------------------------------------------------------------------------


def test_version_2_client_still_served(server: ServerThread) -> None:
    """A version-2 client (no FAULTS) gets its pages in version-2 frames, MAP included."""
    conn = Conn(server.address, faults=False, version=2)
    got = conn.reply(p.Read(0, 0, 4 * PS, True, 1))
    assert _bytes_of(got, 0) == IMAGE[: 4 * PS]
    assert conn.decoder.version == 2
    conn.send(p.Map(0, 0, 8 * PS, request_id=2))
    assert isinstance(conn.recv(), p.Presence)
    conn.close()
    with ThreadedPageClient(server.url) as client:
        assert client.read("mem", PS, 2 * PS) == IMAGE[PS : 3 * PS]


def test_urgent_link_against_a_version_2_server() -> None:
    """Against a server speaking 1..2, UrgentLink sends a plain v2 LIST and reads as before."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[p.Frame] = []
    versions: list[int] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(p.encode(p.Hello(bytes(32), False, max_version=2), 1))
            decoder = p.FrameDecoder(versions=(1, 2))
            while len(seen) < 2:
                seen.extend(decoder.feed(conn.recv(1 << 16)))
                versions.append(decoder.version)
                if len(seen) == 1:
                    conn.sendall(p.encode(p.Regions(PS, (p.RegionEntry("mem", 4 * PS),)), 2))
            read = seen[1]
            assert isinstance(read, p.Read)
            conn.sendall(
                p.encode(p.Data(read.offset, b"\x07" * PS, read.request_id), 2)
                + p.encode(p.End(PS, read.request_id), 2)
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        link = UrgentLink(f"tcp://127.0.0.1:{listener.getsockname()[1]}", timeout=WAIT)
        page = bytearray(PS)
        assert link.read_into("mem", PS, memoryview(page), WAIT)
        link.close()
        thread.join(WAIT)
        assert page == b"\x07" * PS
        assert seen[0] == p.List(faults=False) and versions == [2, 2]
    finally:
        listener.close()


def test_unverified_snapshot_keeps_the_asyncio_path(snap_path: Path) -> None:
    """A snapshot not verified at start is served to a fault channel by the asyncio path."""
    with Snapshot.open(snap_path) as snap, ServerThread(snap, verify=False) as srv:
        conn = Conn(srv.address, faults=True)
        got = conn.reply(p.Read(0, 0, 8 * PS, True, 1))
        assert _bytes_of(got, 0) == IMAGE[: 8 * PS]
        assert not _fault_threads()
        conn.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls_connection_keeps_the_asyncio_path(snap_path: Path, tmp_path: Path) -> None:
    """Under TLS a LIST flagged FAULTS is honoured by the asyncio path: pages right, no C loop."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=x",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        cwd=tmp_path, check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    client_side = ssl.create_default_context(cafile=tmp_path / "cert.pem")
    with Snapshot.open(snap_path) as snap, ServerThread(snap, ssl=server_side) as srv:
        conn = Conn(
            srv.address,
            faults=True,
            wrap=lambda sock: client_side.wrap_socket(sock, server_hostname="127.0.0.1"),
        )
        got = conn.reply(p.Read(0, 0, 8 * PS, True, 1))
        assert _bytes_of(got, 0) == IMAGE[: 8 * PS]
        assert not _fault_threads()
        conn.close()


# -- bounds ---------------------------------------------------------------------------


def test_stop_ends_open_fault_channels_at_once(snap_path: Path) -> None:
    """close() with fault channels open (one idle, one mid-frame) returns fast, no thread left."""
    with Snapshot.open(snap_path) as snap:
        srv = ServerThread(snap)
        idle = Conn(srv.address, faults=True)
        partial = Conn(srv.address, faults=True)
        partial.send(p.encode(p.Read(0, 0, PS, True, 1), 3)[:20])
        _wait_until(lambda: len(_fault_threads()) == 2, "two channel threads")
        start = time.monotonic()
        srv.close()
        assert time.monotonic() - start < 2.0
        _wait_until(lambda: not _fault_threads(), "the channel threads to end")
        for conn in (idle, partial):
            conn.sock.settimeout(WAIT)
            assert conn.sock.recv(1 << 16) == b""
            conn.close()


def test_half_frame_then_silence_dropped_at_the_frame_timeout(snap_path: Path) -> None:
    """A READ cut short and never finished gets ERROR TIMEOUT after handshake_timeout."""
    with Snapshot.open(snap_path) as snap, ServerThread(snap, handshake_timeout=0.4) as srv:
        for faults in (True, False):
            conn = Conn(srv.address, faults=faults)
            conn.send(p.encode(p.Read(0, 0, PS, True, 1), 3)[:30])
            start = time.monotonic()
            err = conn.closed_after_error(p.ErrorCode.TIMEOUT)
            assert 0.3 < time.monotonic() - start < 3.0
            assert err.message == "timed out waiting for a complete frame"
            conn.close()


def test_idle_fault_channel_dropped(snap_path: Path) -> None:
    """A fault channel with nothing to do for idle_timeout gets the asyncio path's TIMEOUT."""
    with Snapshot.open(snap_path) as snap, ServerThread(snap, idle_timeout=0.3) as srv:
        messages = []
        for faults in (True, False):
            conn = Conn(srv.address, faults=faults)
            assert conn.reply(p.Read(0, 0, PS, True, 1))[-1] == p.End(PS, 1)
            start = time.monotonic()
            messages.append(conn.closed_after_error(p.ErrorCode.TIMEOUT).message)
            assert 0.2 < time.monotonic() - start < 3.0
            conn.close()
        assert messages[0] == messages[1] == "idle for 0.3 s"


def test_flood_without_reading_dropped_at_the_send_timeout(snap_path: Path) -> None:
    """A peer sending READs and reading no reply is dropped after send_timeout; others go on."""
    with Snapshot.open(snap_path) as snap, ServerThread(snap, send_timeout=0.3) as srv:
        flood = Conn(srv.address, faults=True)
        flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        read = p.encode(p.Read(0, 0, PAGES * PS, True, 1), 3)
        deadline = time.monotonic() + WAIT
        flood.sock.settimeout(0.2)
        with pytest.raises(OSError):  # its sends stop once the server stops reading, then break
            while time.monotonic() < deadline:
                try:
                    flood.sock.sendall(read * 16)
                except TimeoutError:
                    if srv.stats.stalled:
                        raise
        _wait_until(lambda: srv.stats.stalled == 1, "the stalled count")
        flood.close()
        link = UrgentLink(srv.url)
        page = bytearray(PS)
        assert link.read_into("mem", PS, memoryview(page), WAIT) and page == IMAGE[PS : 2 * PS]
        link.close()


def test_concurrent_fault_channels_each_get_their_pages(server: ServerThread) -> None:
    """Eight fault channels read random pages at once, each page right."""
    failures: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        link = UrgentLink(server.url)
        page = bytearray(PS)
        try:
            for _ in range(300):
                index = rng.randrange(PAGES)
                if not link.read_into("mem", index * PS, memoryview(page), WAIT):
                    failures.append(f"{seed}: read {index} failed")
                elif page != IMAGE[index * PS : (index + 1) * PS]:
                    failures.append(f"{seed}: page {index} wrong")
        finally:
            link.close()

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not failures
    _wait_until(lambda: server.stats.requests == 8 * 300, "the counters")
