"""Connection floods against ``uffd serve`` with few fds: it survives, logs a bounded amount,
and serves an honest client during and right after the flood.

The server runs as a child (``python -m uffd serve -v``) with RLIMIT_NOFILE lowered
to 128, so a few hundred connections exhaust it quickly. The flood opens
connections as fast as it can, keeps up to 400 open and never speaks (the
pre-authentication flood: it needs no token). Two configurations:
the default connection cap (derived from the fd limit: 48 here), and a cap of
1000, far above the fds, so accept() itself runs out of fds (EMFILE).
"""

from __future__ import annotations

import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from uffd.pagestore.client import RemoteError, ThreadedPageClient

PS = 4096
FD_LIMIT = 128
FLOOD_CONNECTIONS = 400
# Bounds (stated in the README): an honest client is served within HONEST_BOUND
# seconds once the flood stops, and the whole run logs under LOG_BOUND bytes.
HONEST_BOUND = 2.0
LOG_BOUND = 64 << 10


def lower_fd_limit() -> None:
    """In the server child, before exec: 128 fds."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, hard))


@pytest.fixture
def memory_file(tmp_path: Path) -> Path:
    """A 64-page raw memory image with a distinct byte per page."""
    path = tmp_path / "mem.raw"
    path.write_bytes(b"".join(bytes([i + 1]) * PS for i in range(64)))
    return path


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """The test process itself needs about 450 fds for the flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD_CONNECTIONS + 100
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} fds, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Flood:
    """A thread keeping 400 silent connections open: each one the server drops is reopened."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.stop = threading.Event()
        self.opened = 0
        self.failed = 0
        self.socks: list[socket.socket] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            if len(self.socks) < FLOOD_CONNECTIONS:
                try:
                    sock = socket.create_connection(self.address, timeout=0.2)
                except OSError:
                    self.failed += 1
                    continue
                self.opened += 1
                self.socks.append(sock)
                continue
            poller = select.poll()
            by_fd = {sock.fileno(): sock for sock in self.socks}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(10):
                sock = by_fd[fd]
                try:
                    alive = bool(sock.recv(1 << 16))  # the HELLO: read, never answered
                except OSError:
                    alive = False
                if not alive:
                    sock.close()
                    self.socks.remove(sock)

    def end(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


def honest_read(url: str, expected: bytes) -> float:
    """Seconds for a fresh client to connect and read (and check) every page."""
    start = time.monotonic()
    with ThreadedPageClient(url, request_timeout=HONEST_BOUND) as client:
        assert client.read("mem", 0, len(expected)) == expected
    return time.monotonic() - start


def close_wait(pid: int) -> int:
    """The server's sockets stuck in CLOSE_WAIT (closed by the peer, never by it)."""
    return sum(c.status == psutil.CONN_CLOSE_WAIT for c in psutil.Process(pid).net_connections())


@pytest.mark.parametrize(
    "seconds",
    [pytest.param(1.0, id="2s"), pytest.param(10.0, id="20s", marks=pytest.mark.stress)],
)
@pytest.mark.parametrize("cap", [None, 1000], ids=["default-cap", "cap-over-fds"])
def test_flood_survived_and_honest_client_served(
    memory_file: Path, tmp_path: Path, enough_fds: None, cap: int | None, seconds: float
) -> None:
    """Under a 2 s (20 s under stress) flood of silent connections with 128 fds the server
    stays up, an honest client is served during it (within 3 tries) and within 2 s after it,
    no socket is left in CLOSE_WAIT, and the log stays under 64 KiB."""
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "uffd", "serve", str(memory_file), "-v"]
    if cap is not None:
        command += ["--max-clients", str(cap)]
    expected = memory_file.read_bytes()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, preexec_fn=lower_fd_limit
        )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        assert line.startswith("listening on tcp://"), line
        url = line.split()[-1]
        host, port = url[6:].rsplit(":", 1)
        baseline = honest_read(url, expected)
        flood = Flood((host, int(port)))
        try:
            time.sleep(seconds)
            tries, during, errors = 0, None, []
            while during is None and tries < 3:
                tries += 1
                try:
                    during = honest_read(url, expected)
                except (ConnectionError, TimeoutError, OSError) as err:
                    errors.append(repr(err))
            time.sleep(seconds)
        finally:
            flood.end()
        after = honest_read(url, expected)
        assert server.poll() is None, "the server died in the flood"
        deadline = time.monotonic() + 5
        while close_wait(server.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = close_wait(server.pid)
        fds = psutil.Process(server.pid).num_fds()
    finally:
        server.terminate()
        server.wait(10)
    log_text = log_path.read_text()
    print(
        f"\nflood ({'default cap' if cap is None else f'cap {cap}'}, {FD_LIMIT} fds): "
        f"{flood.opened} connections opened ({flood.failed} failed), honest client "
        f"{baseline * 1000:.1f} ms before, {(during or 0) * 1000:.1f} ms during "
        f"(try {tries}: {errors}), {after * 1000:.1f} ms after; log {len(log_text)} bytes; "
        f"{fds} fds open after"
    )
    assert during is not None, "no honest read succeeded during the flood"
    assert after < HONEST_BOUND
    assert stuck == 0
    assert len(log_text) < LOG_BOUND
    assert flood.opened > FD_LIMIT * 2
    if cap is not None:
        assert "accept failed (Too many open files)" in log_text
    assert "Traceback" not in log_text


# -- clients that stop reading -----------------------------------------------------------------

STALLED = 8
# The honest client's 1 MiB read under attack must stay under this (it took 29 s
# before bulk sends stopped blocking pool threads on stalled peers; ~10 ms idle).
BULK_BOUND = 0.5


def stalled_reader(address: tuple[str, int], region_length: int) -> socket.socket:
    """A client that asks for 64 MiB in 1 MiB READs and never reads a byte of the replies."""
    from uffd.pagestore import protocol as p

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(address)
    mib = 1 << 20
    reads = [p.Read(0, (i * mib) % region_length, mib, False, i + 1) for i in range(64)]
    sock.sendall(p.encode(p.List()) + b"".join(p.encode(r) for r in reads))
    return sock


def test_stalled_bulk_readers_do_not_starve_an_honest_client(tmp_path: Path) -> None:
    """Eight clients pipelining 1 MiB READs and never reading: an honest client's 1 MiB reads
    stay under 0.5 s each (sendfile turns never wait on a peer), and every staller is dropped
    once a reply waited send_timeout for it."""
    from uffd.pagestore.server import ServerThread
    from uffd.pagestore.snapshot import RawMemoryFile

    path = tmp_path / "mem.raw"
    image = os.urandom(32 << 20)
    path.write_bytes(image)
    mib = 1 << 20
    with (
        RawMemoryFile(path, page_size=PS) as raw,
        ServerThread(raw, send_timeout=3.0) as srv,
        ThreadedPageClient(srv.url, request_timeout=10) as honest,
    ):

        def timed_read(i: int) -> float:
            offset = (i * 7 % 32) * mib
            start = time.monotonic()
            assert honest.read("mem", offset, mib, urgent=False) == image[offset : offset + mib]
            return time.monotonic() - start

        baseline = sorted(timed_read(i) for i in range(10))
        stallers = [stalled_reader(srv.address, len(image)) for _ in range(STALLED)]
        try:
            time.sleep(0.3)  # their socket buffers fill and their sends stall
            attacked = sorted(timed_read(i) for i in range(20))
            deadline = time.monotonic() + 15
            while srv.stats.stalled < STALLED and time.monotonic() < deadline:
                time.sleep(0.05)
            stalled = srv.stats.stalled
        finally:
            for sock in stallers:
                sock.close()
    print(
        f"\nhonest 1 MiB read: p50 {baseline[5] * 1000:.1f} ms, max {baseline[-1] * 1000:.1f} ms "
        f"alone; p50 {attacked[10] * 1000:.1f} ms, max {attacked[-1] * 1000:.1f} ms next to "
        f"{STALLED} stalled readers; {stalled} stallers dropped"
    )
    assert attacked[-1] < BULK_BOUND
    assert stalled >= STALLED


def test_pending_requests_do_not_keep_a_silent_client(tmp_path: Path) -> None:
    """A client with READs pending that reads nothing and sends nothing more is disconnected
    within the send and idle timeouts (pending requests no longer suppress them)."""
    from uffd.pagestore.server import ServerThread
    from uffd.pagestore.snapshot import RawMemoryFile

    path = tmp_path / "mem.raw"
    path.write_bytes(os.urandom(8 << 20))
    with (
        RawMemoryFile(path, page_size=PS) as raw,
        ServerThread(raw, send_timeout=0.5, idle_timeout=0.5) as srv,
    ):
        sock = stalled_reader(srv.address, 8 << 20)
        start = time.monotonic()
        deadline = start + 10
        while not srv.stats.clients and time.monotonic() < deadline:
            time.sleep(0.01)  # until it is accepted
        while srv.stats.active and time.monotonic() < deadline:
            time.sleep(0.02)
        gone = time.monotonic() - start
        sock.close()
        assert srv.stats.active == 0, f"the silent client is still connected: {srv.stats}"
    assert gone < 3.0


def test_serve_logs_connections_refusals_and_summaries(memory_file: Path, tmp_path: Path) -> None:
    """``uffd serve -v`` logs with timestamps: the start, each connection, a wrong token
    (authentication failed) and one summary line per connection with what it was served."""
    token_file = tmp_path / "token"
    token_file.write_text("right\n")
    command = [sys.executable, "-m", "uffd", "serve", str(memory_file), "-v"]
    server = subprocess.Popen(
        [*command, "--token-file", str(token_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().decode().split()[-1]
        with pytest.raises(RemoteError, match="wrong token"):
            ThreadedPageClient(url, token=b"wrong", request_timeout=5)
        with ThreadedPageClient(url, token=b"right") as client:
            client.read("mem", 0, 4 * PS)
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    log = err.decode()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO .*serving ", log, re.M), log
    assert log.count(" connected") == 2
    assert "authentication failed (wrong token)" in log
    assert "1 requests, 16384 bytes of data" in log and "closed by the client" in log
