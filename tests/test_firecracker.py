"""The Firecracker UFFD handshake: encoding, strict parsing, SCM_RIGHTS, the daemon's refusals."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import uffd
from uffd import Feature
from uffd.restore.firecracker import (
    MAX_MAPPINGS,
    GuestRegionUffdMapping,
    HandshakeError,
    encode_mappings,
    parse_mappings,
    peer_pidfd,
    recv_handshake,
    send_handshake,
    userfaultfd_from_fd,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from _helpers import (  # noqa: E402
    DaemonProcess,
    finish_worker,
    pattern,
    spawn_worker,
    wrong_pages,
)

PS = 4096
WAIT = 10.0
A = 0x7F0000000000


def fc_json(*regions: tuple[int, int, int]) -> bytes:
    """What Firecracker's serde_json writes for these (addr, size, offset) regions."""
    return (
        "["
        + ",".join(
            f'{{"base_host_virt_addr":{a},"size":{s},"offset":{o},'
            f'"page_size":4096,"page_size_kib":4096}}'
            for a, s, o in regions
        )
        + "]"
    ).encode()


def open_fds() -> set[str]:
    """This process's open fd numbers."""
    return set(os.listdir("/proc/self/fd"))


# -- encoding and parsing -----------------------------------------------------------


def test_encode_matches_firecracker_serde_bytes() -> None:
    """encode_mappings writes the bytes Firecracker sends: compact, fields in declaration order."""
    mappings = [
        GuestRegionUffdMapping(A, 0x100000, 0, PS),
        GuestRegionUffdMapping(A + 0x200000, 0x200000, 0x100000, PS),
    ]
    expected = fc_json((A, 0x100000, 0), (A + 0x200000, 0x200000, 0x100000))
    assert encode_mappings(mappings) == expected
    assert parse_mappings(expected) == mappings
    assert b"page_size_kib" not in encode_mappings(mappings, legacy=False)


@pytest.mark.parametrize(
    "fields",
    [
        '"page_size":4096,"page_size_kib":4096',
        '"page_size":4096',
        '"page_size_kib":4096',
        "",
        '"page_size":4096,"gpa_start":0',
    ],
    ids=["both", "page_size", "page_size_kib-in-bytes", "neither", "unknown-key"],
)
def test_every_historical_page_size_form_parses(fields: str) -> None:
    """page_size, page_size_kib (bytes, despite its name), both or neither; unknown keys ignored."""
    sep = "," if fields else ""
    data = f'[{{"base_host_virt_addr":{A},"size":8192,"offset":4096{sep}{fields}}}]'.encode()
    assert parse_mappings(data) == [GuestRegionUffdMapping(A, 8192, 4096, PS)]


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        (b"[{", "json", "not valid JSON"),
        (b"\xff\xfe", "json", "not UTF-8"),
        (b'{"size": 1}', "mappings", "JSON array"),
        (b"[]", "mappings", "empty"),
        (b"[1]", "mappings[0]", "JSON object"),
        (b'[{"size":4096,"offset":0}]', "mappings[0].base_host_virt_addr", "missing"),
        (
            f'[{{"base_host_virt_addr":{A},"size":4096.0,"offset":0}}]'.encode(),
            "mappings[0].size",
            "integer",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":true,"offset":0}}]'.encode(),
            "mappings[0].size",
            "integer",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":"4096","offset":0}}]'.encode(),
            "mappings[0].size",
            "integer",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":4096,"offset":-4096}}]'.encode(),
            "mappings[0].offset",
            "outside",
        ),
        (
            f'[{{"base_host_virt_addr":{A + 1},"size":4096,"offset":0}}]'.encode(),
            "mappings[0].base_host_virt_addr",
            "multiple of the page size",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":4097,"offset":0}}]'.encode(),
            "mappings[0].size",
            "multiple of the page size",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":4096,"offset":100}}]'.encode(),
            "mappings[0].offset",
            "multiple of the page size",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":0,"offset":0}}]'.encode(),
            "mappings[0].size",
            "empty region",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":4096,"offset":0,"page_size":3000}}]'.encode(),
            "mappings[0].page_size",
            "power of two",
        ),
        (
            f'[{{"base_host_virt_addr":{A},"size":4096,"offset":0,"page_size":4096,'
            f'"page_size_kib":4}}]'.encode(),
            "mappings[0].page_size_kib",
            "disagrees",
        ),
        (
            fc_json((A, 8192, 0), (A + 4096, 4096, 8192)),
            "mappings[1].base_host_virt_addr",
            "overlaps",
        ),
        (fc_json((A, 8192, 0), (A + 8192, 4096, 4096)), "mappings[1].offset", "overlaps"),
        (fc_json((2**64 - 4096, 8192, 0)), "mappings[0].base_host_virt_addr", r"passes 2\*\*64"),
    ],
)
def test_malformed_handshakes_name_the_field(data: bytes, field: str, words: str) -> None:
    """Each bad handshake raises HandshakeError whose field and message say what is wrong."""
    with pytest.raises(HandshakeError, match=words) as info:
        parse_mappings(data)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_too_many_regions_are_refused() -> None:
    """More than MAX_MAPPINGS regions is refused before any is looked at."""
    data = fc_json(*((A + i * PS, PS, i * PS) for i in range(MAX_MAPPINGS + 1)))
    with pytest.raises(HandshakeError, match="at most"):
        parse_mappings(data)


# -- SCM_RIGHTS --------------------------------------------------------------------


def test_send_and_receive_over_a_socket() -> None:
    """send_handshake -> recv_handshake carries the mappings, a working uffd, the peer's creds."""
    ufd = uffd.Userfaultfd(Feature.EVENT_REMOVE)
    mappings = [GuestRegionUffdMapping(A, 1 << 20, 0, PS)]
    a, b = socket.socketpair()
    with a, b, ufd:
        send_handshake(a, ufd, mappings)
        fd, got, cred = recv_handshake(b)
        assert got == mappings
        assert cred.pid == os.getpid() and cred.uid == os.geteuid()
        wrapped = userfaultfd_from_fd(fd)
        with wrapped:
            assert wrapped.features == Feature.EVENT_REMOVE
            assert os.path.samestat(os.fstat(fd), os.fstat(ufd.fileno()))


def test_a_message_split_across_sends_is_reassembled() -> None:
    """A stream socket may split the JSON: it is read until it parses; the fd comes first."""
    data = fc_json((A, PS, 0))
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        with a, b:
            fds = array.array("i", [r]).tobytes()
            a.sendmsg([data[:10]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
            a.sendall(data[10:])
            fd, got, _ = recv_handshake(b)
            os.close(fd)
            assert got == [GuestRegionUffdMapping(A, PS, 0, PS)]
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("nfds", "data", "field"),
    [
        (0, fc_json((A, PS, 0)), "fd"),
        (2, fc_json((A, PS, 0)), "fd"),
        (1, b'[{"base_host_virt_addr":1', "json"),
        (1, b"", "message"),
        (1, b"[" + b" " * 70000 + b"]", "message"),
        (1, fc_json((A, PS, 0), (A, PS, PS)), "mappings[1].base_host_virt_addr"),
    ],
    ids=["no-fd", "two-fds", "truncated", "empty", "too-long", "overlap"],
)
def test_bad_messages_are_refused_and_received_fds_closed(
    nfds: int, data: bytes, field: str
) -> None:
    """No fd, extra fds, truncated, empty or oversized data: HandshakeError, no fd left open."""
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(nfds)]
    try:
        before = open_fds()
        with b:
            with a:
                if nfds:
                    fds = array.array("i", [r for r, _ in pipes]).tobytes()
                    a.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                else:
                    a.sendall(data)
            with pytest.raises(HandshakeError) as info:
                recv_handshake(b, timeout=WAIT)
        assert info.value.field == field, info.value
        assert open_fds() <= before
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_silent_peer_times_out() -> None:
    """A peer that connects and sends nothing is refused after the timeout, not waited for."""
    a, b = socket.socketpair()
    with a, b:
        t = time.monotonic()
        with pytest.raises(HandshakeError, match="incomplete after"):
            recv_handshake(b, timeout=0.3)
        assert time.monotonic() - t < WAIT


def test_a_non_uffd_fd_is_recognised() -> None:
    """userfaultfd_from_fd refuses an fd that is not a userfaultfd."""
    r, w = os.pipe()
    try:
        with pytest.raises(HandshakeError, match="not a userfaultfd"):
            userfaultfd_from_fd(r)
    finally:
        os.close(r)
        os.close(w)


def test_the_stand_in_sends_firecrackers_bytes(short_tmp: str) -> None:
    """The stand-in's message is serde_json's bytes, with one uffd (EVENT_REMOVE) attached."""
    path = os.path.join(short_tmp, "raw.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(WAIT)
    proc = spawn_worker(
        "firecracker", "--socket", path, "--size", "256K", "--regions", "2", "--timeout", "20"
    )
    try:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            data, anc, flags, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16))
            assert conn.recv(1) == b"", "Firecracker closes the connection after the one message"
        fds = [fd for lvl, kind, raw in anc for fd in array.array("i", raw)]
        assert len(fds) == 1 and not flags & socket.MSG_CTRUNC
        mappings = parse_mappings(data)
        assert data == encode_mappings(mappings)
        assert [m.size for m in mappings] == [128 << 10, 128 << 10]
        assert [m.offset for m in mappings] == [0, 128 << 10]
        with userfaultfd_from_fd(fds[0]) as ufd:
            assert ufd.features == Feature.EVENT_REMOVE
    finally:
        proc.kill()
        proc.wait(WAIT)
        listener.close()


# -- the daemon refuses bad peers and stays up ------------------------------------------


def wait_log(daemon: DaemonProcess, text: str, timeout: float = WAIT) -> str:
    """The daemon's stderr once it contains ``text`` (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log()
        if text in log:
            return log
        time.sleep(0.02)
    raise AssertionError(f"{text!r} not logged within {timeout} s; log: {daemon.log()!r}")


def send_raw(path: str, data: bytes, fds: list[int]) -> bytes:
    """Connect, send ``data`` with ``fds``, half-close; return what the daemon sends back (b"")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(path)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        s.sendmsg([data], anc)
        s.shutdown(socket.SHUT_WR)
        return s.recv(100)


@pytest.fixture
def memory_file(short_tmp: str) -> str:
    """A 256 KiB raw memory file (Firecracker's memory snapshot format)."""
    path = os.path.join(short_tmp, "mem.raw")
    Path(path).write_bytes(pattern(256 << 10, seed=5))
    return path


def test_daemon_refuses_bad_handshakes_logs_them_and_stays_up(
    short_tmp: str, memory_file: str
) -> None:
    """Bad JSON, no fd, overlap, a non-uffd fd: each refused and logged; a stand-in is served."""
    sock = os.path.join(short_tmp, "h.sock")
    log = os.path.join(short_tmp, "daemon.log")
    with DaemonProcess(sock, memory_file, "--no-working-set", log_path=log) as daemon:
        ufd = uffd.Userfaultfd(Feature.EVENT_REMOVE)
        r, w = os.pipe()
        try:
            assert send_raw(sock, b'[{"base_host_virt_addr":', [ufd.fileno()]) == b""
            wait_log(daemon, "handshake: json: not valid JSON")
            assert send_raw(sock, fc_json((A, PS, 0)), []) == b""
            wait_log(daemon, "handshake: fd: no file descriptor arrived")
            assert (
                send_raw(sock, fc_json((A, 2 * PS, 0), (A + PS, PS, 2 * PS)), [ufd.fileno()]) == b""
            )
            wait_log(daemon, "mappings[1].base_host_virt_addr: [")
            assert send_raw(sock, fc_json((A, PS, 0)), [r]) == b""
            text = wait_log(daemon, "not a userfaultfd")
        finally:
            os.close(r)
            os.close(w)
            ufd.close()
        assert text.count("refused pid") == 4
        assert "ERROR" in text
        assert daemon.proc.poll() is None

        digests = os.path.join(short_tmp, "digests")
        worker = spawn_worker(
            "firecracker",
            "--socket",
            sock,
            "--size",
            "256K",
            "--regions",
            "2",
            "--digests",
            digests,
        )
        result = finish_worker(worker, timeout=30)
        (report,) = daemon.reports(1)
        assert report["pid"] == result["pid"] and report["regions"] == 2 and not report["errors"]
        assert not wrong_pages(digests, memory_file, 256 << 10)


def test_daemon_refuses_a_uid_not_allowed(short_tmp: str, memory_file: str) -> None:
    """--allow-uid 12345: a root peer is refused with a clear logged error; the daemon stays up."""
    sock = os.path.join(short_tmp, "h.sock")
    log = os.path.join(short_tmp, "daemon.log")
    with DaemonProcess(sock, memory_file, "--allow-uid", "12345", log_path=log) as daemon:
        with uffd.Userfaultfd(Feature.EVENT_REMOVE) as ufd:
            for _ in range(2):
                assert send_raw(sock, fc_json((A, PS, 0)), [ufd.fileno()]) == b""
            text = wait_log(daemon, f"uid {os.geteuid()} is not allowed (allowed uids: 12345")
            deadline = time.monotonic() + WAIT
            while text.count("is not allowed") < 2 and time.monotonic() < deadline:
                text = daemon.log()
        assert text.count("is not allowed") == 2
        # The log names the peer process (psutil), not only its pid.
        name = psutil.Process().name()
        assert f"refused pid {os.getpid()} ({name}, uid {os.geteuid()})" in text
        assert daemon.proc.poll() is None


def test_cli_help_and_usage_errors(short_tmp: str) -> None:
    """`uffd handler --help` exits 0; a missing --socket exits 2; an unreadable source exits 1
    (a page server that is down is not one: tests/test_daemon_warm.py)."""
    run = [sys.executable, "-m", "uffd", "handler"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0 and "--allow-uid" in out.stdout and "page_size_kib" in out.stdout
    out = subprocess.run([*run, "--source", "x"], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 2 and "--socket" in out.stderr
    sock = os.path.join(short_tmp, "h.sock")
    missing = os.path.join(short_tmp, "nope.snap")
    out = subprocess.run(
        [*run, "--socket", sock, "--source", missing], capture_output=True, text=True, timeout=WAIT
    )
    assert out.returncode == 1 and "nope.snap" in out.stderr


@pytest.mark.parametrize(
    "data",
    [b"[" * 100_000, b"[" * 17 + b"]" * 17, b'[{"a":' * 20 + b"1" + b"}]" * 20],
    ids=["unfinished-100k", "closed-17", "objects-40"],
)
def test_deep_json_is_refused_before_parsing(data: bytes) -> None:
    """JSON nested past MAX_DEPTH is a HandshakeError on "json", never a RecursionError."""
    with pytest.raises(HandshakeError, match=r"nested \d+ levels deep") as caught:
        parse_mappings(data)
    assert caught.value.field == "json"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Brackets inside strings (escaped quotes too) are not nesting: the mapping parses."""
    data = b'[{"base_host_virt_addr":4096,"size":4096,"offset":0,"x":"[[[[\\"[[[[[[[[[[[[[[[["}]'
    assert parse_mappings(data) == [GuestRegionUffdMapping(4096, 4096, 0, PS)]


def test_peer_pidfd_names_the_connecting_process() -> None:
    """SO_PEERPIDFD gives a pidfd of the peer (Linux 6.5+), immune to pid reuse; -1 without."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pidfd = peer_pidfd(a)
        if pidfd < 0:
            pytest.skip("this kernel has no SO_PEERPIDFD (Linux 6.5)")
        try:
            info = Path(f"/proc/self/fdinfo/{pidfd}").read_text()
        finally:
            os.close(pidfd)
    assert f"Pid:\t{os.getpid()}" in info
