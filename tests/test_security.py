"""Security: who may reach memory contents, and what a hostile peer can make the servers do.

The page server binds to loopback unless given a token; the token is
checked (HMAC of a nonce) before anything is served. The handler daemon's
Unix socket is owner-only and SO_PEERCRED-checked (same uid or root unless
``allow_uids`` says otherwise), tried here from a real process running as
uid 65534. Hostile clients (slow loris, huge length fields, wrong tokens,
reads beyond a region, request floods) are disconnected or refused while a
healthy client keeps restoring, and every limit (frame size, requests
pending per client, handshake size and region count) holds.

Snapshot paths: neither the page server nor the daemon takes a directory
plus a name from anyone; the operator passes one file path, peers address
regions by index (READ) and handshakes carry no paths. The tests below pin
that down (path-like region names stay opaque names, path-like handshake
keys are ignored) rather than test a ``../`` filter that does not exist.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.rel_common import NOBODY, ROOT, finish, page_pattern, pattern, spawn, wait_until

from uffd.pagestore import protocol as p

PS = 4096
WAIT = 30.0
TOKEN = b"s3cret-token-for-tests"


@pytest.fixture(scope="module")
def snap_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 MiB snapshot of pattern pages, region "mem", plus a tiny region "tiny"."""
    from uffd.pagestore.snapshot import write_snapshot

    path = tmp_path_factory.mktemp("sec") / "mem.snap"
    write_snapshot(path, {"mem": pattern(256, PS), "tiny": pattern(2, PS)})
    return path


@pytest.fixture
def snap(snap_path: Path) -> Iterator[object]:
    from uffd.pagestore.snapshot import Snapshot

    with Snapshot.open(snap_path) as s:
        yield s


class Raw:
    """A hand-driven client socket (to misbehave on purpose)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=WAIT)
        self.decoder = p.FrameDecoder(max_payload=1 << 21)
        self.frames: list[p.Frame] = []
        hello = self.recv()
        assert isinstance(hello, p.Hello)
        self.hello = hello

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> p.Frame:
        while not self.frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("closed")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def error_then_close(self) -> p.Error:
        """The next frame is an ERROR; then the server hangs up."""
        frame = self.recv()
        assert isinstance(frame, p.Error), frame
        try:
            while self.sock.recv(1 << 16):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
        return frame

    def drained_to_eof(self) -> bool:
        """Read (and drop) everything until the server's close: True if it did close."""
        try:
            while self.sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


# -- who may connect ----------------------------------------------------------------------------


def test_page_server_binds_loopback_by_default(snap: object) -> None:
    """No host given: the server listens on 127.0.0.1 only."""
    from uffd.pagestore.server import ServerThread

    with ServerThread(snap) as server:
        assert server.address[0] == "127.0.0.1"
        assert server.url.startswith("tcp://127.0.0.1:")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "10.1.2.3"])
def test_non_loopback_needs_a_token(snap: object, host: str) -> None:
    """Any non-loopback address without a token is refused before binding."""
    from uffd.pagestore.server import PageServer

    with pytest.raises(ValueError, match="without a token"):
        PageServer(snap, host=host)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        PageServer(snap, host=host, token=b"")  # type: ignore[arg-type]


def test_cli_refuses_public_bind_without_token(snap_path: Path) -> None:
    """``uffd serve --host 0.0.0.0`` without a token exits 2 with the reason; nothing listens."""
    env = {k: v for k, v in os.environ.items() if k != "UFFD_TOKEN"}
    done = subprocess.run(
        [sys.executable, "-m", "uffd", "serve", str(snap_path), "--host", "0.0.0.0"],
        capture_output=True,
        timeout=WAIT,
        cwd=str(ROOT),
        env=env,
    )
    assert done.returncode == 2
    assert b"without a token" in done.stderr and b"listening" not in done.stdout


def test_token_checked_on_all_interfaces(snap: object) -> None:
    """On 0.0.0.0 with a token: no token and a wrong token are refused, the right one reads."""
    from uffd.pagestore.client import RemoteError, ThreadedPageClient
    from uffd.pagestore.server import ServerThread

    with ServerThread(snap, host="0.0.0.0", token=TOKEN, insecure_plaintext=True) as server:  # type: ignore[arg-type]
        url = f"tcp://127.0.0.1:{server.address[1]}"
        for token in (None, b"wrong", TOKEN + b"x"):
            with pytest.raises(RemoteError) as info:
                ThreadedPageClient(url, token=token, request_timeout=5.0)
            assert info.value.code == p.ErrorCode.AUTH_FAILED
        # A replayed AUTH from another connection's nonce is worthless.
        first = Raw(("127.0.0.1", server.address[1]))
        second = Raw(("127.0.0.1", server.address[1]))
        second.send(p.encode(p.Auth(p.auth_mac(TOKEN, first.hello.nonce))))
        assert second.error_then_close().code == p.ErrorCode.AUTH_FAILED
        first.close()
        with ThreadedPageClient(url, token=TOKEN) as client:
            assert client.read("mem", 3 * PS, PS) == page_pattern(3, PS)


# -- hostile clients while a healthy one restores ------------------------------------------------


@pytest.mark.parametrize("max_frame", [64 << 10, p.MAX_FRAME], ids=["64KiB", "default-sendfile"])
def test_hostile_clients_do_not_disturb_a_restore(snap: object, max_frame: int) -> None:
    """Slow loris, huge lengths, wrong tokens, out-of-range reads, garbage and request floods,
    all at once: each gets its error, a healthy client verifies every page throughout, and the
    flooder that never reads is dropped after the send timeout (with 64 KiB frames and with the
    default 1 MiB ones, where replies go out by sendfile)."""
    from uffd.pagestore.client import ThreadedPageClient
    from uffd.pagestore.server import ServerThread

    data = pattern(256, PS)
    with ServerThread(
        snap,  # type: ignore[arg-type]
        token=TOKEN,
        handshake_timeout=1.0,
        idle_timeout=5.0,
        send_timeout=1.0,
        max_pending=8,
        max_frame=max_frame,
    ) as server:
        addr = server.address
        stop = threading.Event()
        healthy: dict[str, int] = {"rounds": 0, "bad": 0}

        def restore() -> None:
            with ThreadedPageClient(server.url, token=TOKEN) as client:
                while not stop.is_set():
                    futures = [client.fetch("mem", i * PS, PS) for i in range(256)]
                    for i, f in enumerate(futures):
                        healthy["bad"] += f.result(WAIT) != data[i * PS : (i + 1) * PS]
                    healthy["rounds"] += 1

        worker = threading.Thread(target=restore)
        worker.start()
        seen: dict[str, object] = {}
        try:
            # Slow loris: half a header, then nothing.
            loris = Raw(addr)
            loris.send(p.encode(p.List())[:5])
            # A header announcing a 4 GiB payload.
            huge = Raw(addr)
            huge.send(struct.pack(">HBBHHII", 0x5546, 1, p.FrameType.AUTH, 0, 0, 0, 0xFFFFFFFF))
            seen["huge"] = huge.error_then_close().code
            # Wrong token.
            wrong = Raw(addr)
            wrong.send(p.encode(p.Auth(p.auth_mac(b"guess", wrong.hello.nonce))))
            seen["wrong_token"] = wrong.error_then_close().code
            # Garbage instead of AUTH.
            garbage = Raw(addr)
            garbage.send(os.urandom(64))
            seen["garbage"] = garbage.error_then_close().code
            # Authenticated, then reads beyond the region and of a region that does not exist.
            nosy = Raw(addr)
            nosy.send(p.encode(p.Auth(p.auth_mac(TOKEN, nosy.hello.nonce))) + p.encode(p.List()))
            assert isinstance(nosy.recv(), p.Regions)
            nosy.send(
                p.encode(p.Read(0, 256 * PS, PS, request_id=1))
                + p.encode(p.Read(0, (1 << 64) - PS, PS, request_id=2))
                + p.encode(p.Read(7, 0, PS, request_id=3))
                + p.encode(p.Read(1, PS, 2 * PS, request_id=4))
            )
            codes = {}
            while len(codes) < 4:
                frame = nosy.recv()
                assert isinstance(frame, p.Error), frame
                codes[frame.request_id] = frame.code
            seen["beyond"] = codes
            # A flood of pipelined reads that never reads its replies.
            flood = Raw(addr)
            flood.send(p.encode(p.Auth(p.auth_mac(TOKEN, flood.hello.nonce))))
            flood.send(
                b"".join(p.encode(p.Read(0, 0, 256 * PS, request_id=i)) for i in range(1, 200))
            )
            # The loris is cut off after the handshake timeout.
            seen["loris"] = loris.error_then_close().code
            time.sleep(0.5)
            wait_until(lambda: healthy["rounds"] >= 3, WAIT, "three healthy restores")
            # The flooder stopped reading: dropped once a reply waited 1 s for it.
            wait_until(lambda: server.stats.stalled >= 1, WAIT, "the flooder dropped")
            seen["flood_closed"] = flood.drained_to_eof()
        finally:
            stop.set()
            worker.join(WAIT)
        assert not worker.is_alive()
        for conn in (loris, huge, wrong, garbage, nosy, flood):
            conn.close()
        # The flood got BUSY for what exceeded 8 pending requests, not a bigger queue.
        stats = server.stats
    assert healthy["bad"] == 0 and healthy["rounds"] >= 3
    assert seen["huge"] == p.ErrorCode.TOO_LARGE
    assert seen["wrong_token"] == p.ErrorCode.AUTH_FAILED
    assert seen["garbage"] in (p.ErrorCode.AUTH_FAILED, p.ErrorCode.BAD_FRAME)
    assert seen["loris"] == p.ErrorCode.TIMEOUT
    assert seen["flood_closed"] is True
    assert seen["beyond"] == {
        1: p.ErrorCode.OUT_OF_RANGE,
        2: p.ErrorCode.OUT_OF_RANGE,
        3: p.ErrorCode.UNKNOWN_REGION,
        4: p.ErrorCode.OUT_OF_RANGE,
    }
    assert stats.errors >= 8
    print(f"\nhostile clients: {seen}; healthy restores: {healthy['rounds']}")


def test_pending_requests_per_client_are_bounded(snap: object) -> None:
    """More READs in flight than max_pending: the excess gets BUSY, the rest is served, and
    no reply frame exceeds max_frame."""
    from uffd.pagestore.server import ServerThread

    with ServerThread(snap, max_pending=4, max_frame=16 << 10) as server:  # type: ignore[arg-type]
        conn = Raw(server.address)
        conn.send(p.encode(p.List()))
        assert isinstance(conn.recv(), p.Regions)
        conn.send(b"".join(p.encode(p.Read(0, 0, 64 * PS, request_id=i)) for i in range(1, 41)))
        busy, ended, biggest = set(), set(), 0
        while len(busy) + len(ended) < 40:
            frame = conn.recv()
            if isinstance(frame, p.Data):
                biggest = max(biggest, len(frame.data) + 8)
            elif isinstance(frame, p.Error):
                assert frame.code == p.ErrorCode.BUSY, frame
                busy.add(frame.request_id)
            elif isinstance(frame, p.End):
                ended.add(frame.request_id)
        conn.close()
    assert busy and ended and len(ended) >= 4
    assert biggest <= 16 << 10


# -- the daemon's Unix socket: SO_PEERCRED from a process running as nobody ---------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A short directory (Unix socket paths are short) others may traverse (0755)."""
    path = Path(tempfile.mkdtemp(prefix="uffd-sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
def memory_file(open_dir: Path) -> Path:
    """A raw memory image of 16 pattern pages."""
    path = open_dir / "mem.raw"
    path.write_bytes(pattern(16, PS))
    return path


def nobody_can_run_children() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start a child that becomes uid 65534"
    return None


@pytest.mark.skipif(nobody_can_run_children() is not None, reason=str(nobody_can_run_children()))
def test_daemon_socket_owner_only_and_peer_uid_checked(open_dir: Path, memory_file: Path) -> None:
    """The socket is 0600; nobody cannot even connect; with the mode opened up SO_PEERCRED
    still refuses uid 65534 by default, and allow_uids=[65534] lets it restore."""
    from uffd.restore.daemon import HandlerDaemon

    sock = str(open_dir / "h.sock")
    with HandlerDaemon(
        sock, str(memory_file), prefetch=False, working_set=None, progress=False
    ) as daemon:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        blocked = finish(spawn("rel_peer.py", sock, "16", "--drop"), WAIT)
        assert blocked["uid"] == NOBODY and not blocked["connected"]
        assert blocked["connect_errno"] == errno.EACCES
        os.chmod(sock, 0o666)  # defence in depth: the uid check must hold on its own
        refused = finish(spawn("rel_peer.py", sock, "16", "--drop"), WAIT)
        assert refused["connected"] and refused["sent"]
        (message,) = daemon.wait_refused(1, timeout=WAIT)
        assert f"uid {NOBODY} is not allowed" in message
        assert daemon.active == 0
    sock2 = str(open_dir / "h2.sock")
    with HandlerDaemon(
        sock2,
        str(memory_file),
        allow_uids=[NOBODY],
        prefetch=False,
        working_set=None,
        progress=False,
    ) as daemon:
        os.chmod(sock2, 0o666)
        served = finish(spawn("rel_peer.py", sock2, "16", "--drop", "--serve"), WAIT)
        assert served["uid"] == NOBODY and served["served_ok"], served
        (report,) = daemon.wait_reports(1, timeout=WAIT)
        assert report.uid == NOBODY and report.ok, report.errors
        assert report.faulted > 0
        # Root is not in an explicit allow list either.
        root_peer = finish(spawn("rel_peer.py", sock2, "16"), WAIT)
        assert root_peer["sent"]
        (message,) = daemon.wait_refused(1, timeout=WAIT)
        assert "uid 0 is not allowed" in message


def test_daemon_handshake_limits(open_dir: Path, memory_file: Path) -> None:
    """A handshake over 64 KiB, one with more than MAX_MAPPINGS regions, and a silent peer are
    refused with their reason; the daemon keeps serving."""
    import uffd
    from uffd.restore.daemon import HandlerDaemon
    from uffd.restore.firecracker import (
        MAX_MAPPINGS,
        HandshakeError,
        parse_mappings,
        send_handshake,
    )

    sock = str(open_dir / "lim.sock")
    with (
        HandlerDaemon(
            sock,
            str(memory_file),
            prefetch=False,
            working_set=None,
            progress=False,
            handshake_timeout=1.0,
        ) as daemon,
        uffd.Userfaultfd() as ufd,
    ):
        big = b"[" + b" " * (70 << 10) + b"]"
        many = json.dumps(
            [
                {"base_host_virt_addr": (i + 1) << 20, "size": PS, "offset": 0}
                for i in range(MAX_MAPPINGS + 1)
            ]
        ).encode()
        for payload in (big, many):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(WAIT)
                s.connect(sock)
                with contextlib.suppress(OSError):  # it may hang up before taking it all
                    send_handshake(s, ufd, payload)
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(sock)
        messages = daemon.wait_refused(3, timeout=WAIT)
        silent.close()
        text = " | ".join(messages)
        # 4097 regions do not even fit in the 64 KiB a handshake may take.
        assert text.count("longer than 65536 bytes") == 2
        assert "incomplete after" in text or "closed without" in text
        assert os.path.exists(sock)
    with pytest.raises(HandshakeError, match=f"at most {MAX_MAPPINGS}"):
        parse_mappings(many)


# -- snapshot paths -------------------------------------------------------------------------------


def test_path_like_region_names_stay_names(tmp_path: Path) -> None:
    """Regions named like paths are opaque names: served from the snapshot, nothing else opened."""
    from uffd.pagestore.client import ThreadedPageClient
    from uffd.pagestore.server import ServerThread
    from uffd.pagestore.snapshot import Snapshot, write_snapshot

    outside = tmp_path / "secret.txt"
    outside.write_bytes(b"S" * PS)
    names = ["../secret.txt", str(outside), "/etc/shadow", "..", "a/../../b"]
    path = tmp_path / "inner" / "names.snap"
    path.parent.mkdir()
    write_snapshot(path, {name: page_pattern(i, PS) for i, name in enumerate(names)})
    assert sorted(os.listdir(tmp_path)) == ["inner", "secret.txt"]
    assert os.listdir(path.parent) == ["names.snap"]
    with (
        Snapshot.open(path) as snap,
        ServerThread(snap) as server,
        ThreadedPageClient(server.url) as client,
    ):
        assert [r.name for r in client.regions] == names
        for i, name in enumerate(names):
            assert client.read(name, 0, PS) == page_pattern(i, PS)
            assert client.read(i, 0, PS) == page_pattern(i, PS)


def test_handshake_path_keys_are_ignored(open_dir: Path, memory_file: Path) -> None:
    """Path-like keys in a handshake (backend_path, snapshot) change nothing: the daemon only
    reads the source it was started with and writes the working set next to it."""
    from uffd.restore.firecracker import parse_mappings
    from uffd.restore.prefetch import working_set_path

    data = json.dumps(
        [
            {
                "base_host_virt_addr": 1 << 30,
                "size": PS,
                "offset": 0,
                "page_size": PS,
                "backend_path": "../../etc/passwd",
                "snapshot": "/etc/shadow",
            }
        ]
    ).encode()
    (m,) = parse_mappings(data)
    assert not hasattr(m, "backend_path") and m.offset == 0
    assert working_set_path(str(memory_file)) == str(memory_file) + ".ws.json"


def test_snapshot_temp_file_stays_in_the_target_directory(tmp_path: Path) -> None:
    """write_snapshot's temporary file lives beside the target; a failure leaves nothing."""
    from uffd.pagestore.snapshot import write_snapshot

    target = tmp_path / "d" / "x.snap"
    target.parent.mkdir()
    before = {p for p in Path(tempfile.gettempdir()).iterdir()}

    class Boom:
        """Not a buffer before Python 3.12; from 3.12 a buffer whose export fails."""

        def __buffer__(self, flags: int) -> memoryview:  # pragma: no cover - 3.12+ only
            raise RuntimeError("export failed")

    with pytest.raises((TypeError, ValueError, RuntimeError)):
        write_snapshot(target, {"mem": Boom()})
    assert os.listdir(target.parent) == []
    assert {p for p in Path(tempfile.gettempdir()).iterdir()} - before == set()
    write_snapshot(target, {"mem": page_pattern(0, PS)})
    assert os.listdir(target.parent) == ["x.snap"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
