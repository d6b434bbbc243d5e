"""The present-page map (protocol version 2): a client learns the zero pages without fetching.

A restore installs the zero runs in bulk at session start (UFFDIO_ZEROPAGE)
and never asks for them; these tests prove the map is exact, moves no page
bytes, spans several PRESENCE frames for big regions, and that version-1
peers on either side keep working.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.frames import frames_until

from uffd.pagestore import protocol as p
from uffd.pagestore.client import PeerGoneError, ThreadedPageClient
from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import RawMemoryFile, Snapshot, write_snapshot

PS = 4096
WAIT = 5.0  # seconds any one socket read may take


def mixed(npages: int, seed: int) -> bytes:
    """Pages, each zero with probability 1/2, in runs of random length."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < npages * PS:
        run = rng.randint(1, 40)
        page = bytes(PS) if rng.random() < 0.5 else rng.randbytes(PS)
        out += page * run
    return bytes(out[: npages * PS])


def test_extents_match_the_snapshot_and_move_no_page_bytes(tmp_path: Path) -> None:
    """ThreadedPageClient.extents equals Snapshot.extents for the region and for sub-ranges,
    and the server sends no page bytes for it."""
    path = tmp_path / "m.snap"
    write_snapshot(path, {"a": mixed(3000, 1), "b": bytes(64 * PS)})
    with Snapshot.open(path) as snap, ServerThread(snap) as srv:
        with ThreadedPageClient(srv.url) as client:
            assert client.version == p.VERSION == 3
            assert client.extents("a") == snap.extents("a")
            assert client.extents("a", 8 * PS, 1000 * PS) == snap.extents("a", 8 * PS, 1000 * PS)
            assert client.extents("a", 13 * PS, 3 * PS) == snap.extents("a", 13 * PS, 3 * PS)
            assert client.extents("b") == [(0, 64 * PS, False)]
            with pytest.raises(ValueError, match="page-aligned"):
                client.extents("a", 1, PS)
        assert srv.stats.bytes == 0


def test_extents_of_a_sparse_two_gib_file_span_several_frames(tmp_path: Path) -> None:
    """A 2 GiB + 3-page sparse raw file (data at three places): the map takes three PRESENCE
    frames (1 GiB each at most) and is exact."""
    path = tmp_path / "sparse.raw"
    size = (2 << 30) + 3 * PS
    with open(path, "wb") as f:
        f.truncate(size)
        for at in (5 * PS, (1 << 30) + PS, size - PS):
            f.seek(at)
            f.write(os.urandom(PS))
    with RawMemoryFile(path, page_size=PS) as raw, ServerThread(raw) as srv:
        with ThreadedPageClient(srv.url) as client:
            got = client.extents("mem")
        assert got == raw.extents("mem")
    assert [(o, n) for o, n, present in got if present] == [
        (5 * PS, PS),
        ((1 << 30) + PS, PS),
        (size - PS, PS),
    ]


def test_version_one_client_is_served_in_version_one(tmp_path: Path) -> None:
    """A client that speaks only version 1 (frames and decoder) is served as before; a MAP in
    a version-1 header is a BAD_FRAME."""
    path = tmp_path / "v1.snap"
    data = mixed(64, 2)
    write_snapshot(path, {"mem": data})
    with Snapshot.open(path) as snap, ServerThread(snap) as srv:
        sock = socket.create_connection(srv.address, timeout=WAIT)
        decoder = p.FrameDecoder(versions=(1,))
        frames: list[p.Frame] = []

        def until(kind: type) -> p.Frame:
            return frames_until(sock, decoder, frames, kind)

        hello = until(p.Hello)
        assert isinstance(hello, p.Hello) and hello.min_version == 1 and hello.max_version == 3
        sock.sendall(p.encode(p.List(), 1) + p.encode(p.Read(0, 0, 8 * PS, True, 5), 1))
        until(p.Regions)
        assert until(p.End) == p.End(8 * PS, 5)
        sock.sendall(p.encode(p.Read(0, 0, PS, True, 6), 1)[:3] + b"\x0a" + bytes(32))
        error = until(p.Error)
        assert isinstance(error, p.Error) and error.code == p.ErrorCode.BAD_FRAME
        sock.close()


def test_new_client_against_a_version_one_server() -> None:
    """A server whose HELLO offers only version 1: the client speaks 1 and extents() reports
    the whole range present (fetch everything: always correct)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def v1_server() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(p.encode(p.Hello(bytes(32), False, min_version=1, max_version=1), 1))
            header = conn.recv(p.HEADER.size)
            seen.append(header[2])
            conn.sendall(p.encode(p.Regions(PS, (p.RegionEntry("mem", 16 * PS),)), 1))
            conn.recv(1)  # until the client closes

    thread = threading.Thread(target=v1_server, daemon=True)
    thread.start()
    try:
        with ThreadedPageClient(f"tcp://127.0.0.1:{listener.getsockname()[1]}") as client:
            assert client.version == 1
            assert client.extents("mem") == [(0, 16 * PS, True)]
    finally:
        thread.join(WAIT)
        listener.close()
    assert seen == [1]


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (lambda rid: p.Presence(0, b"\xff" * 64, rid), "past the MAP's range"),
        (lambda rid: p.Data(0, b"\x55" * PS, rid), "page data in answer to a MAP"),
    ],
    ids=["bitmap-past-range", "page-data"],
)
def test_presence_out_of_place_is_a_violation(answer: Callable[[int], p.Frame], match: str) -> None:
    """A server answering a MAP with page data, or a bitmap past the range: PeerGoneError."""
    listener = socket.create_server(("127.0.0.1", 0))

    def liar() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            conn.sendall(p.encode(p.Hello(bytes(32), False)))
            conn.recv(1 << 16)
            conn.sendall(p.encode(p.Regions(PS, (p.RegionEntry("mem", 16 * PS),))))
            request = frames_until(conn, p.FrameDecoder(), [], p.Map)
            conn.sendall(p.encode(answer(request.request_id)))
            conn.recv(1)

    thread = threading.Thread(target=liar, daemon=True)
    thread.start()
    try:
        with (
            ThreadedPageClient(f"tcp://127.0.0.1:{listener.getsockname()[1]}") as client,
            pytest.raises(PeerGoneError, match=match),
        ):
            client.extents("mem")
    finally:
        thread.join(WAIT)
        listener.close()
