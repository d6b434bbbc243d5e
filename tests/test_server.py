"""The page server and its clients over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.frames import FramePeer, frames_until

from uffd.cli import main
from uffd.pagestore import protocol as p
from uffd.pagestore.client import PageClient, PeerGoneError, RemoteError, ThreadedPageClient
from uffd.pagestore.server import PageServer, ServerThread
from uffd.pagestore.snapshot import RawMemoryFile, RegionInfo, Snapshot, write_snapshot

PS = 4096
PAGES = 256
WAIT = 5.0
ROOT = Path(__file__).resolve().parent.parent


def mixed_pages(npages: int, seed: int) -> bytes:
    """Random pages with about a third all-zero."""
    rng = random.Random(seed)
    buf = bytearray(npages * PS)
    for i in range(npages):
        if rng.random() > 0.33:
            buf[i * PS : (i + 1) * PS] = rng.randbytes(PS)
            buf[i * PS] |= 1
    return bytes(buf)


MEM = mixed_pages(PAGES, seed=1)
SMALL = mixed_pages(8, seed=2)


@pytest.fixture(scope="module")
def snap_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot with regions "mem" (256 mixed pages), "small" (8) and "zeros" (32)."""
    path = tmp_path_factory.mktemp("server") / "s.snap"
    write_snapshot(path, {"mem": MEM, "small": SMALL, "zeros": bytes(32 * PS)}, page_size=PS)
    return path


@pytest.fixture
def snap(snap_path: Path) -> Iterator[Snapshot]:
    """The snapshot, opened for the test."""
    with Snapshot.open(snap_path) as s:
        yield s


@pytest.fixture
def server(snap: Snapshot) -> Iterator[ServerThread]:
    """A default server on 127.0.0.1."""
    with ServerThread(snap) as srv:
        yield srv


class SlowSource:
    """A snapshot whose reads take ``delay`` seconds each (a slow disk)."""

    def __init__(self, inner: Snapshot, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.path = inner.path
        self.page_size = inner.page_size
        self.regions = inner.regions

    def region(self, name: str) -> RegionInfo:
        return self.inner.region(name)

    def read(self, name: str, offset: int, length: int) -> bytes:
        time.sleep(self.delay)
        return self.inner.read(name, offset, length)

    def extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, bool]]:
        return self.inner.extents(name, offset, length)

    def is_present(self, name: str, offset: int) -> bool:
        return self.inner.is_present(name, offset)

    def close(self) -> None:
        self.inner.close()


class RawConn(FramePeer):
    """A hand-written peer (:class:`FramePeer`) that has read the server's HELLO."""

    def __init__(self, address: tuple[str, int], rcvbuf: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(WAIT)
        sock.connect(address)
        super().__init__(sock)
        self.hello = self.recv()
        assert isinstance(self.hello, p.Hello)

    def login(self, token: bytes | None = None) -> p.Regions:
        if token is not None:
            self.send(p.Auth(p.auth_mac(token, self.hello.nonce)))
        self.send(p.List(request_id=0))
        regions = self.recv()
        assert isinstance(regions, p.Regions)
        return regions


def collect(conn: RawConn, request_ids: set[int]) -> dict[int, list[p.Frame]]:
    """Frames per request until every id in ``request_ids`` got END or ERROR."""
    replies: dict[int, list[p.Frame]] = {rid: [] for rid in request_ids}
    open_ids = set(request_ids)
    while open_ids:
        frame = conn.recv()
        replies[frame.request_id].append(frame)
        if isinstance(frame, (p.End, p.Error)):
            open_ids.discard(frame.request_id)
    return replies


def assert_still_serving(url: str) -> None:
    """A fresh client can read a page correctly."""
    with ThreadedPageClient(url) as client:
        assert client.read("mem", 5 * PS, PS) == MEM[5 * PS : 6 * PS]


# -- serving ------------------------------------------------------------------


def test_sixteen_clients_verify_every_page(server: ServerThread) -> None:
    """16 concurrent clients each read every page, one request per page, all correct."""

    async def one_client() -> int:
        client = await PageClient.connect(server.url)
        try:
            pages = await asyncio.gather(
                *(client.read("mem", i * PS, PS, urgent=i % 2 == 0) for i in range(PAGES))
            )
            for i, page in enumerate(pages):
                assert page == MEM[i * PS : (i + 1) * PS], f"page {i}"
            return len(pages)
        finally:
            await client.close()

    async def all_clients() -> list[int]:
        return await asyncio.gather(*(one_client() for _ in range(16)))

    assert asyncio.run(all_clients()) == [PAGES] * 16
    assert server.stats.clients == 16
    assert server.stats.requests == 16 * PAGES
    assert server.stats.bytes + server.stats.zero_bytes == 16 * len(MEM)
    assert server.stats.errors == 0


def test_threaded_client_pipelines_many_fetches(server: ServerThread) -> None:
    """ThreadedPageClient.fetch returns futures at once; 512 in flight all resolve right."""
    with ThreadedPageClient(server.url) as client:
        assert client.page_size == PS
        assert [r.name for r in client.regions] == ["mem", "small", "zeros"]
        futures = [client.fetch("mem", (i % PAGES) * PS, PS) for i in range(512)]
        for i, future in enumerate(futures):
            page = i % PAGES
            assert future.result(WAIT) == MEM[page * PS : (page + 1) * PS]
        assert client.read("small", 0, 8 * PS) == SMALL
        assert client.read(2, 0, 32 * PS) == bytes(32 * PS)  # by region id


def test_urgent_served_before_queued_prefetch(snap: Snapshot) -> None:
    """An urgent READ sent after 40 queued prefetch READs is answered before most of them."""
    with ServerThread(SlowSource(snap, 0.001)) as srv:
        conn = RawConn(srv.address)
        conn.login()
        for late in (False, True):
            prefetch = [p.Read(0, (i % 8) * 32 * PS, 32 * PS, False, i + 1) for i in range(40)]
            urgent = p.Read(1, 0, PS, True, 1000)
            if late:
                # The server is busy streaming prefetch replies when the urgent one arrives.
                conn.send(*prefetch)
                first = conn.recv()
                assert isinstance(first, (p.Data, p.Zero)) and first.request_id == 1
                conn.send(urgent)
            else:
                conn.send(*prefetch, urgent)
            order = []
            while len(order) < 41:
                frame = conn.recv()
                if isinstance(frame, p.End):
                    order.append(frame.request_id)
            assert sorted(order) == [*range(1, 41), 1000]
            assert order.index(1000) < 5, order
        conn.close()


def test_long_request_served_in_pieces(snap: Snapshot) -> None:
    """A small max_frame splits a reply into page-sized DATA frames; bytes still right."""
    with ServerThread(snap, max_frame=PS + 8) as srv:
        conn = RawConn(srv.address)
        assert conn.hello.max_frame == PS + 8
        conn.login()
        conn.send(p.Read(0, 0, 16 * PS, True, 7))
        frames = collect(conn, {7})[7]
        conn.close()
        data = [f for f in frames if isinstance(f, p.Data)]
        assert all(len(f.data) == PS for f in data)
        assert frames[-1] == p.End(16 * PS, 7)
        out = bytearray(16 * PS)
        for f in data:
            out[f.offset : f.offset + PS] = f.data
        assert out == MEM[: 16 * PS]
        with ThreadedPageClient(srv.url) as client:
            assert client.read("mem", 0, PAGES * PS) == MEM


def test_zero_runs_sent_without_bytes(server: ServerThread) -> None:
    """An all-zero range is answered by ZERO frames only: no page bytes cross the wire."""
    conn = RawConn(server.address)
    conn.login()
    conn.send(p.Read(2, 0, 32 * PS, False, 3))
    frames = collect(conn, {3})[3]
    conn.close()
    assert frames == [p.Zero(0, 32 * PS, 3), p.End(32 * PS, 3)]
    assert server.stats.bytes == 0
    assert server.stats.zero_bytes == 32 * PS


def test_short_replies_completed_by_client(snap: Snapshot) -> None:
    """A read over max_read is served short (END says how much); the client asks for the rest."""
    with ServerThread(snap, max_read=4 * PS) as srv:
        conn = RawConn(srv.address)
        conn.login()
        conn.send(p.Read(0, 8 * PS, 64 * PS, True, 9))
        frames = collect(conn, {9})[9]
        conn.close()
        assert frames[-1] == p.End(4 * PS, 9)
        with ThreadedPageClient(srv.url) as client:
            assert client.read("mem", 0, PAGES * PS) == MEM
        assert srv.stats.requests == 1 + PAGES // 4


def test_bad_requests_get_errors_and_connection_stays(server: ServerThread) -> None:
    """Out-of-range, misaligned and unknown-region READs fail alone; the client keeps working."""
    with ThreadedPageClient(server.url) as client:
        with pytest.raises(RemoteError, match="outside region 'mem'") as info:
            client.read("mem", PAGES * PS - PS, 2 * PS)
        assert info.value.code is p.ErrorCode.OUT_OF_RANGE
        with pytest.raises(RemoteError, match="multiples of the page size") as info:
            client.read("mem", 100, PS)
        assert info.value.code is p.ErrorCode.OUT_OF_RANGE
        with pytest.raises(RemoteError, match="no region 7") as info:
            client.read(7, 0, PS)
        assert info.value.code is p.ErrorCode.UNKNOWN_REGION
        with pytest.raises(KeyError, match="nope"):
            client.read("nope", 0, PS)
        assert client.read("mem", 0, 4 * PS) == MEM[: 4 * PS]
    assert server.stats.errors == 3


def test_busy_when_too_many_pending(snap: Snapshot) -> None:
    """READs beyond max_pending get ERROR BUSY for their ids; the rest are served."""
    with ServerThread(SlowSource(snap, 0.01), max_pending=2) as srv:
        conn = RawConn(srv.address)
        assert conn.hello.max_pending == 2
        conn.login()
        conn.send(*(p.Read(1, 0, PS, True, i) for i in range(1, 9)))
        replies = collect(conn, set(range(1, 9)))
        busy = [rid for rid, frames in replies.items() if isinstance(frames[-1], p.Error)]
        served = [rid for rid, frames in replies.items() if isinstance(frames[-1], p.End)]
        assert busy and len(served) >= 2
        assert all(replies[rid][-1].code is p.ErrorCode.BUSY for rid in busy)  # type: ignore[union-attr]
        conn.send(p.Read(1, PS, PS, True, 50))
        assert collect(conn, {50})[50][-1] == p.End(PS, 50)
        conn.close()


def test_corrupt_chunk_gives_internal_error(tmp_path: Path) -> None:
    """A chunk failing its checksum gives ERROR INTERNAL for that read only."""
    path = tmp_path / "bad.snap"
    write_snapshot(path, {"a": b"\x01" * (4 * PS), "b": b"\x02" * PS}, page_size=PS, chunk_pages=2)
    data = bytearray(path.read_bytes())
    data[64 + 3 * PS] ^= 0xFF  # stored page 3 of "a": chunk 1
    path.write_bytes(data)
    with Snapshot.open(path) as bad, ServerThread(bad) as srv, ThreadedPageClient(srv.url) as c:
        with pytest.raises(RemoteError, match="chunk 1 fails its checksum") as info:
            c.read("a", 2 * PS, 2 * PS)
        assert info.value.code is p.ErrorCode.INTERNAL
        assert c.read("a", 0, 2 * PS) == b"\x01" * (2 * PS)
        assert c.read("b", 0, PS) == b"\x02" * PS


# -- broken clients ---------------------------------------------------------------


def test_malformed_frame_closes_only_that_client(server: ServerThread) -> None:
    """Garbage after HELLO gets ERROR BAD_FRAME and a hang-up; another client is unaffected."""
    with ThreadedPageClient(server.url) as good:
        bad = RawConn(server.address)
        bad.login()
        bad.send(b"\xde\xad\xbe\xef" * 8)
        err = bad.closed_after_error(p.ErrorCode.BAD_FRAME)
        assert "bad magic" in err.message
        bad.close()
        assert good.read("mem", 0, 8 * PS) == MEM[: 8 * PS]
    wrong_type = RawConn(server.address)
    wrong_type.login()
    wrong_type.send(p.Data(0, b"x"))
    wrong_type.closed_after_error(p.ErrorCode.BAD_FRAME)
    wrong_type.close()
    assert_still_serving(server.url)


def test_oversized_length_field_refused(server: ServerThread) -> None:
    """A header claiming a 4 GiB payload gets ERROR TOO_LARGE at once and a hang-up."""
    bad = RawConn(server.address)
    bad.login()
    bad.send(struct.pack(">HBBHHII", 0x5546, 1, p.FrameType.READ, 0, 0, 1, 0xFFFFFFFF))
    bad.closed_after_error(p.ErrorCode.TOO_LARGE)
    bad.close()
    assert_still_serving(server.url)


def test_slow_loris_handshake_dropped(snap: Snapshot) -> None:
    """A client trickling its AUTH a byte at a time is cut off at the handshake deadline."""
    token = b"s3cret"
    with ServerThread(snap, token=token, handshake_timeout=0.4) as srv:
        loris = RawConn(srv.address)
        auth = p.encode(p.Auth(p.auth_mac(token, loris.hello.nonce)))
        start = time.monotonic()
        cut_off = False
        for byte in auth:
            try:
                loris.sock.sendall(bytes([byte]))
            except OSError:
                cut_off = True
                break
            time.sleep(0.05)
            if select.select([loris.sock], [], [], 0)[0]:
                cut_off = True
                break
        assert cut_off, "the whole AUTH trickled in without the server minding"
        elapsed = time.monotonic() - start
        frame = loris.recv()
        assert isinstance(frame, p.Error) and frame.code is p.ErrorCode.TIMEOUT
        assert 0.3 < elapsed < 3.0
        loris.close()
        silent = RawConn(srv.address)
        silent.closed_after_error(p.ErrorCode.TIMEOUT)
        silent.close()
        with ThreadedPageClient(srv.url, token=token) as good:
            assert good.read("mem", 0, PS) == MEM[:PS]


def test_idle_client_dropped(snap: Snapshot) -> None:
    """A logged-in client that sends nothing for idle_timeout gets ERROR TIMEOUT."""
    with ServerThread(snap, idle_timeout=0.3) as srv:
        conn = RawConn(srv.address)
        conn.login()
        start = time.monotonic()
        conn.closed_after_error(p.ErrorCode.TIMEOUT)
        assert time.monotonic() - start < 2.0
        conn.close()


def test_wrong_or_missing_token_refused(snap: Snapshot) -> None:
    """Wrong token: ERROR AUTH_FAILED and a hang-up; no token: RemoteError; right one works."""
    with ServerThread(snap, token=b"right") as srv:
        raw = RawConn(srv.address)
        assert raw.hello.auth_required
        raw.send(p.Auth(p.auth_mac(b"wrong", raw.hello.nonce)), p.List())
        raw.closed_after_error(p.ErrorCode.AUTH_FAILED)
        raw.close()
        skip_auth = RawConn(srv.address)
        skip_auth.send(p.List())
        skip_auth.closed_after_error(p.ErrorCode.AUTH_FAILED)
        skip_auth.close()
        with pytest.raises(RemoteError, match="wrong token") as info:
            ThreadedPageClient(srv.url, token=b"wrong")
        assert info.value.code is p.ErrorCode.AUTH_FAILED
        with pytest.raises(RemoteError, match="requires a token"):
            ThreadedPageClient(srv.url)
        with ThreadedPageClient(srv.url, token=b"right") as client:
            assert client.read("small", 0, 8 * PS) == SMALL


def test_non_loopback_needs_token(snap: Snapshot) -> None:
    """Binding 0.0.0.0 without a token is refused, and with one but without TLS unless
    plaintext is chosen explicitly; then it serves (after AUTH)."""
    with pytest.raises(ValueError, match="without a token"):
        PageServer(snap, host="0.0.0.0")
    with pytest.raises(ValueError, match="without a token"):
        PageServer(snap, host="example.org")
    with pytest.raises(ValueError, match="empty"):
        PageServer(snap, token=b"")
    with pytest.raises(ValueError, match=r"without TLS.*--insecure-plaintext"):
        PageServer(snap, host="0.0.0.0", token=b"k")
    with ServerThread(snap, host="0.0.0.0", token=b"k", insecure_plaintext=True) as srv:
        host, port = srv.address
        assert host == "0.0.0.0"
        with pytest.raises(RemoteError):
            ThreadedPageClient(f"tcp://127.0.0.1:{port}")
        with ThreadedPageClient(f"tcp://127.0.0.1:{port}", token=b"k") as client:
            assert client.read("mem", 0, 2 * PS) == MEM[: 2 * PS]


# -- the server going away ----------------------------------------------------------


def test_server_gone_fails_pending_fast(snap: Snapshot) -> None:
    """Closing the server mid-stream fails every pending and later fetch with PeerGoneError."""
    srv = ServerThread(SlowSource(snap, 0.02))
    client = ThreadedPageClient(srv.url)
    try:
        futures = [client.fetch("mem", (i % PAGES) * PS, PS) for i in range(200)]
        futures[0].result(WAIT)
        start = time.monotonic()
        srv.close()
        failed = 0
        for future in futures[1:]:
            try:
                future.result(WAIT)
            except PeerGoneError as err:
                assert "127.0.0.1" in str(err)
                failed += 1
        assert failed > 100
        assert time.monotonic() - start < 2.0
        with pytest.raises(PeerGoneError, match=r"127\.0\.0\.1"):
            client.fetch("mem", 0, PS).result(WAIT)
    finally:
        client.close()
        srv.close()


def test_request_timeout_instead_of_hang() -> None:
    """A server that never answers a READ makes the read fail with TimeoutError."""

    async def scenario() -> None:
        writers: list[asyncio.StreamWriter] = []

        def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            writer.write(p.encode(p.Hello(bytes(32), False)))
            writer.write(p.encode(p.Regions(PS, (p.RegionEntry("mem", PS),))))

        mute_server = await asyncio.start_server(mute, "127.0.0.1", 0)
        port = mute_server.sockets[0].getsockname()[1]
        client = await PageClient.connect("127.0.0.1", port, request_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply"):
            await client.read("mem", 0, PS)
        assert time.monotonic() - start < 2.0
        await client.close()
        mute_server.close()
        for writer in writers:
            writer.close()
        await mute_server.wait_closed()

    asyncio.run(scenario())


def test_closed_client_refuses_and_fails_pending(snap: Snapshot) -> None:
    """close() fails pending fetches with ValueError; later fetches fail the same way."""
    with ServerThread(SlowSource(snap, 0.05)) as srv:
        client = ThreadedPageClient(srv.url)
        futures = [client.fetch("mem", i * PS, PS) for i in range(20)]
        client.close()
        client.close()
        outcomes = []
        for future in futures:
            try:
                future.result(WAIT)
                outcomes.append("ok")
            except (ValueError, PeerGoneError, Exception) as err:
                outcomes.append(type(err).__name__)
        assert "ValueError" in outcomes or "CancelledError" in outcomes
        assert "PeerGoneError" not in outcomes
        with pytest.raises(ValueError, match="closed"):
            client.fetch("mem", 0, PS).result(WAIT)


# -- command line ---------------------------------------------------------------


def test_snapshot_info_cli(snap_path: Path, tmp_path: Path, capsys: Any) -> None:
    """``snapshot info`` prints the layout (text and JSON); a bad file exits 1 with why."""
    assert main(["snapshot", "info", str(snap_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "page size:   4096" in out and "mem: 1048576 bytes, 256 pages" in out
    assert "all checksums match" in out
    assert main(["snapshot", "info", str(snap_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["page_size"] == PS
    assert [r["name"] for r in info["regions"]] == ["mem", "small", "zeros"]
    assert info["regions"][2]["present_pages"] == 0
    assert info["file_size"] == snap_path.stat().st_size
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"nope" * 100)
    assert main(["snapshot", "info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "bad magic" in err


def _start_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "uffd", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _listening_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(15)
    assert result and result[0].startswith("listening on tcp://"), (result, proc.poll())
    return result[0].split()[-1]


def test_serve_cli_end_to_end(snap_path: Path, tmp_path: Path) -> None:
    """``python -m uffd serve`` prints its URL, serves pages, exits 0 on SIGTERM."""
    pytest.importorskip("uffd.cli", reason="uffd.cli (the lead's command line) not present")
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    proc = _start_cli(["serve", str(snap_path), "--port", "0", "--token-file", str(token_file)])
    try:
        url = _listening_url(proc)
        assert url.startswith("tcp://127.0.0.1:")
        with ThreadedPageClient(url, token=b"t0ken") as client:
            assert client.read("mem", 0, PAGES * PS) == MEM
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT)
    refused = _start_cli(["serve", str(snap_path), "--host", "0.0.0.0"], {"UFFD_TOKEN": ""})
    _, err = refused.communicate(timeout=15)
    assert refused.returncode == 2
    assert "without a token" in err


def test_serve_cli_killed_fails_client(snap_path: Path) -> None:
    """SIGKILL of a serving process: the client's pending fetches fail with PeerGoneError."""
    pytest.importorskip("uffd.cli", reason="uffd.cli (the lead's command line) not present")
    proc = _start_cli(["serve", str(snap_path)], {"UFFD_TOKEN": "env-token"})
    try:
        url = _listening_url(proc)
        with ThreadedPageClient(url, token=b"env-token") as client:
            assert client.read("small", 0, PS) == SMALL[:PS]
            proc.send_signal(signal.SIGSTOP)  # freeze it so fetches stay pending
            futures = [client.fetch("mem", i * PS, PS) for i in range(50)]
            time.sleep(0.1)
            proc.kill()
            start = time.monotonic()
            for future in futures:
                with pytest.raises(PeerGoneError):
                    future.result(WAIT)
            assert time.monotonic() - start < 2.0
    finally:
        proc.kill()
        proc.communicate(timeout=WAIT)


# -- the bulk path and fetch_into ---------------------------------------------------


def test_fetch_into_fills_caller_buffers(server: ServerThread) -> None:
    """fetch_into writes page bytes and zero ranges into the caller's buffer (even a dirty one)."""
    with ThreadedPageClient(server.url) as client:
        buf = bytearray(b"\xee" * (PAGES * PS))
        assert client.fetch_into("mem", 0, buf, urgent=False).result(WAIT) == PAGES * PS
        assert buf == MEM
        zeros = mmap.mmap(-1, 32 * PS)
        zeros.write(b"\xee" * (32 * PS))
        assert client.fetch_into("zeros", 0, zeros).result(WAIT) == 32 * PS
        assert zeros[:] == bytes(32 * PS)
        part = memoryview(buf)[8 * PS : 12 * PS]
        assert client.fetch_into("small", 0, part).result(WAIT) == 4 * PS
        assert buf[8 * PS : 12 * PS] == SMALL[: 4 * PS]
        with pytest.raises(KeyError, match="nope"):
            client.fetch_into("nope", 0, part).result(WAIT)
        with pytest.raises(TypeError, match="writable"):
            client.fetch_into("mem", 0, bytes(PS))
        zeros.close()


def test_bulk_replies_sent_from_the_file(tmp_path: Path) -> None:
    """Large replies (sendfile path) are byte-exact, split at max_frame, counted in stats."""
    rng = random.Random(5)
    image = rng.randbytes(1024 * PS)
    path = tmp_path / "mem.raw"
    path.write_bytes(image)
    with RawMemoryFile(path, page_size=PS) as raw, ServerThread(raw, max_frame=64 * PS + 8) as srv:
        conn = RawConn(srv.address)
        conn.login()
        conn.send(p.Read(0, 8 * PS, 512 * PS, False, 4))
        frames = collect(conn, {4})[4]
        conn.close()
        data = [f for f in frames if isinstance(f, p.Data)]
        assert max(len(f.data) for f in data) == 64 * PS
        assert frames[-1] == p.End(256 * PS, 4)  # short: max_read is 1 MiB
        assert b"".join(f.data for f in data) == image[8 * PS : 264 * PS]
        with ThreadedPageClient(srv.url) as client:
            assert client.read("mem", 0, 1024 * PS, urgent=False) == image
        assert srv.stats.bytes == 256 * PS + 1024 * PS


def test_urgent_not_queued_behind_bulk_bytes(tmp_path: Path) -> None:
    """An urgent READ sent behind 16 MiB of queued prefetch is answered before most of it."""
    path = tmp_path / "mem.raw"
    path.write_bytes(random.Random(6).randbytes(1024 * PS))
    with RawMemoryFile(path, page_size=PS) as raw, ServerThread(raw) as srv:
        conn = RawConn(srv.address)
        conn.login()
        prefetch = [p.Read(0, (i % 4) * 256 * PS, 256 * PS, False, i + 1) for i in range(16)]
        conn.send(*prefetch)
        first = conn.recv()
        assert isinstance(first, p.Data) and first.request_id == 1
        conn.send(p.Read(0, 1000 * PS, PS, True, 1000))
        order = []
        while len(order) < 17:
            frame = conn.recv()
            if isinstance(frame, p.End):
                order.append(frame.request_id)
        conn.close()
        # Ahead of it only what the kernel's socket buffers already hold (a few MiB).
        assert order.index(1000) < 8, order


def test_corrupt_chunk_on_the_bulk_path(tmp_path: Path) -> None:
    """A large read over a chunk failing its checksum: ERROR INTERNAL and no byte of it sent."""
    path = tmp_path / "bad.snap"
    good = bytes(range(1, 256)) * (64 * PS // 255) + b"\x01" * (64 * PS % 255)
    write_snapshot(path, {"a": good}, page_size=PS, chunk_pages=16)
    data = bytearray(path.read_bytes())
    data[64 + 40 * PS] ^= 0xFF  # stored page 40: chunk 2
    path.write_bytes(data)
    with Snapshot.open(path) as bad, ServerThread(bad) as srv:
        conn = RawConn(srv.address)
        conn.login()
        conn.send(p.Read(0, 0, 64 * PS, False, 3))
        frames = collect(conn, {3})[3]
        assert len(frames) == 1 and isinstance(frames[0], p.Error), frames
        assert frames[0].code is p.ErrorCode.INTERNAL
        conn.send(p.Read(0, 0, 32 * PS, False, 4))
        frames = collect(conn, {4})[4]
        conn.close()
        assert b"".join(f.data for f in frames if isinstance(f, p.Data)) == good[: 32 * PS]


def test_fetch_into_timeout_leaves_buffer_alone() -> None:
    """A reply arriving after its request timed out is dropped, not written into the buffer."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    release = threading.Event()

    def late_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(p.encode(p.Hello(bytes(32), False)))
            decoder = p.FrameDecoder()
            frames: list[p.Frame] = []
            frames_until(conn, decoder, frames, p.List)
            conn.sendall(p.encode(p.Regions(PS, (p.RegionEntry("mem", 4 * PS),))))
            read = frames_until(conn, decoder, frames, p.Read)
            release.wait(WAIT)
            conn.sendall(
                p.encode(p.Data(0, b"\x55" * PS, read.request_id))
                + p.encode(p.End(PS, read.request_id))
            )
            conn.recv(1)  # until the client closes

    thread = threading.Thread(target=late_server, daemon=True)
    thread.start()
    try:
        with ThreadedPageClient(f"tcp://127.0.0.1:{port}", request_timeout=0.2) as client:
            buf = bytearray(b"\xee" * PS)
            with pytest.raises(TimeoutError, match="no reply"):
                client.fetch_into("mem", 0, buf).result(WAIT)
            release.set()
            time.sleep(0.2)
            assert buf == b"\xee" * PS
    finally:
        release.set()
        thread.join(WAIT)
        listener.close()


def test_urgent_read_splits_a_bulk_piece_in_flight(tmp_path: Path) -> None:
    """An urgent READ arriving while a 12 MiB bulk piece is blocked on a full socket is answered
    at the piece's next 256 KiB frame boundary, before the piece's END; the bulk reply is
    still complete and in order."""
    path = tmp_path / "mem.raw"
    image = random.Random(9).randbytes(4096 * PS)
    path.write_bytes(image)
    with (
        RawMemoryFile(path, page_size=PS) as raw,
        ServerThread(raw, max_frame=(12 << 20) + 8, max_read=12 << 20) as srv,
    ):
        conn = RawConn(srv.address, rcvbuf=64 << 10)
        conn.login()
        conn.send(p.Read(0, 0, 12 << 20, False, 1))
        time.sleep(0.3)  # not reading: the server's sendfile blocks mid-piece
        conn.send(p.Read(0, 1000 * PS, PS, True, 2))
        ends: list[int] = []
        data: dict[int, bytes] = {1: b"", 2: b""}
        while len(ends) < 2:
            frame = conn.recv()
            if isinstance(frame, p.Data):
                assert frame.offset == len(data[frame.request_id]) + (
                    1000 * PS if frame.request_id == 2 else 0
                )
                data[frame.request_id] += frame.data
            elif isinstance(frame, p.End):
                ends.append(frame.request_id)
                if frame.request_id == 1 and frame.served < 12 << 20:
                    ends.pop()  # served short: ask for the rest, as a client does
                    conn.send(p.Read(0, frame.served, (12 << 20) - frame.served, False, 1))
        conn.close()
    assert ends == [2, 1], ends
    assert data[2] == image[1000 * PS : 1001 * PS]
    assert data[1] == image[: 12 << 20]
