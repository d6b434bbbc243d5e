"""The daemon's spares (uffd.restore.warm) with a real daemon and server.

Spare page-server connections: a session takes connections opened ahead of
it; they must serve the right pages, be replaced when the server restarts,
be closed when the daemon stops, and never be needed: a server down at the
daemon's start leaves no spare (the daemon starts all the same), and
sessions work once it is back.

The spare FaultHandler: each session takes a handler made ahead of it (its
own userfaultfd and pump ready) and adopts the process's userfaultfd on it:
that handler must serve every page right, be stopped with its session, be
replaced by a fresh one for the next session, survive a refused handshake,
and be stopped with the daemon when no session took it.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from uffd import FaultHandler
from uffd.pagestore.snapshot import write_snapshot
from uffd.restore.daemon import HandlerDaemon
from uffd.restore.sources import RemoteSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _dispatch_helpers import wait_for
from _helpers import (
    DaemonProcess,
    ServerProcess,
    bad_pages,
    digests_of_source,
    finish_worker,
    pattern,
    read_digests,
    spawn_restore,
)

WAIT = 30.0
SIZE = 1 << 20


@pytest.fixture
def snapshot(short_tmp: str) -> str:
    """A 1 MiB snapshot of the known pattern."""
    path = os.path.join(short_tmp, "w.snap")
    write_snapshot(path, {"memory": pattern(SIZE)})
    return path


def _restore_checked(daemon: HandlerDaemon, sock: str, tmp: str, snapshot: str, n: int) -> None:
    """One worker restored through ``daemon``: every page right, a report without errors."""
    digests = os.path.join(tmp, f"digests-{n}")
    finish_worker(spawn_restore(sock, SIZE, "--order", "random", digests=digests), timeout=WAIT)
    report = daemon.wait_reports(n, WAIT)[n - 1]
    assert report.errors == []
    assert not bad_pages(read_digests(digests), digests_of_source(snapshot, SIZE))


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1]


def test_a_session_on_the_warm_spare_gets_every_page(short_tmp: str, snapshot: str) -> None:
    """The daemon connects a spare before any session; the session that takes it reads every
    page right, and a new spare is connected after that session's first fault."""
    sock = os.path.join(short_tmp, "h.sock")
    with ServerProcess(snapshot) as server, HandlerDaemon(sock, server.url, working_set=None) as d:
        assert isinstance(d.source, RemoteSource)
        wait_for(lambda: d.source.spare_ready, "a spare before the first session", WAIT)
        _restore_checked(d, sock, short_tmp, snapshot, 1)
        wait_for(lambda: d.source.spare_ready, "the next spare after the session", WAIT)
        _restore_checked(d, sock, short_tmp, snapshot, 2)


def test_a_restarted_server_is_met_with_fresh_connections(short_tmp: str, snapshot: str) -> None:
    """The server restarts between two sessions: the spare it closed is never handed out, the
    next session reads every page right, and a fresh spare replaces it."""
    sock = os.path.join(short_tmp, "h.sock")
    server = ServerProcess(snapshot)
    try:
        with HandlerDaemon(sock, server.url, working_set=None) as d:
            assert isinstance(d.source, RemoteSource)
            _restore_checked(d, sock, short_tmp, snapshot, 1)
            wait_for(lambda: d.source.spare_ready, "a spare after the first session", WAIT)
            server.close()
            server = ServerProcess(snapshot, "--port", _port(server.url))
            _restore_checked(d, sock, short_tmp, snapshot, 2)
            wait_for(lambda: d.source.spare_ready, "a fresh spare from the new server", WAIT)
            _restore_checked(d, sock, short_tmp, snapshot, 3)
    finally:
        server.close()


def _threads(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def test_daemon_stop_closes_the_spare(short_tmp: str, snapshot: str) -> None:
    """Closing the daemon closes its spare connections and stops their keeper, within seconds:
    no thread and no fd of theirs is left behind."""
    sock = os.path.join(short_tmp, "h.sock")
    with ServerProcess(snapshot) as server:
        fds = len(os.listdir("/proc/self/fd"))
        daemon = HandlerDaemon(sock, server.url, working_set=None).start()
        try:
            assert isinstance(daemon.source, RemoteSource)
            wait_for(lambda: daemon.source.spare_ready, "a spare", WAIT)
            assert _threads("uffd-warm-spare")
        finally:
            started = time.monotonic()
            daemon.close()
        assert time.monotonic() - started < 5.0
        wait_for(lambda: not _threads("uffd-warm-spare"), "the keeper and clients gone", 5.0)
        assert not _threads("uffd-page-client")
        assert len(os.listdir("/proc/self/fd")) == fds


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def test_a_server_down_at_start_does_not_stop_the_daemon(short_tmp: str, snapshot: str) -> None:
    """`uffd handler` starts while its page server is down (a warning, no spare); a session
    then is refused with the connection error, and once the server is up sessions restore
    every page."""
    sock = os.path.join(short_tmp, "h.sock")
    port = _free_port()
    log_path = os.path.join(short_tmp, "daemon.log")
    with DaemonProcess(sock, f"tcp://127.0.0.1:{port}", log_path=log_path) as daemon:
        assert "starting without it: sessions connect once it is back" in daemon.log()
        early = spawn_restore(sock, SIZE)
        try:
            wait_for(lambda: "Connection refused" in daemon.log(), "the refusal logged", WAIT)
        finally:
            early.kill()  # refused: nothing serves its faults, it waits for ever
            early.wait(WAIT)
        with ServerProcess(snapshot, "--port", port):
            for n in range(2):
                digests = os.path.join(short_tmp, f"digests-{n}")
                spawn = spawn_restore(sock, SIZE, "--order", "random", digests=digests)
                finish_worker(spawn, timeout=WAIT)
                (report,) = daemon.reports(1, WAIT)
                assert report["errors"] == []
                assert not bad_pages(read_digests(digests), digests_of_source(snapshot, SIZE))


def _spare(daemon: HandlerDaemon) -> FaultHandler:
    """The daemon's spare handler, once one is made (bounded wait)."""
    wait_for(lambda: daemon.spare_handler is not None, "a spare fault handler", WAIT)
    spare = daemon.spare_handler
    assert spare is not None
    return spare


def _restore_on_spare(daemon: HandlerDaemon, sock: str, tmp: str, snapshot: str, n: int) -> None:
    """Session ``n`` runs on the spare that was waiting: every page right, no error, the
    snapshot's zero pages (every 16th) mapped on the process's fd, not the spare's own;
    that handler served its faults and was stopped (its fds closed) with the session."""
    spare = _spare(daemon)
    assert not spare.uffd.closed
    digests = os.path.join(tmp, f"digests-{n}")
    finish_worker(spawn_restore(sock, SIZE, "--order", "random", digests=digests), timeout=WAIT)
    report = daemon.wait_reports(n, WAIT)[n - 1]
    assert report.errors == []
    assert report.zeroed > 0
    assert not bad_pages(read_digests(digests), digests_of_source(snapshot, SIZE))
    stats = spare.stats
    assert stats.native_faults + sum(stats.total.resolutions.values()) >= 1
    assert spare.uffd.closed


def test_a_session_on_the_spare_handler_restores_every_page(short_tmp: str, snapshot: str) -> None:
    """A session from a page server runs on the handler made and started before it came
    (its fd adopted paused until the regions are registered): it restores every page
    right, and that handler ends with the session."""
    sock = os.path.join(short_tmp, "h.sock")
    with ServerProcess(snapshot) as server, HandlerDaemon(sock, server.url, working_set=None) as d:
        thread = _spare(d)._thread
        assert thread is not None and thread.is_alive()  # started ahead, off the session's path
        _restore_on_spare(d, sock, short_tmp, snapshot, 1)
        thread.join(WAIT)
        assert not thread.is_alive()


def test_sessions_in_a_row_each_get_a_fresh_spare(short_tmp: str, snapshot: str) -> None:
    """Three sessions one after the other each run on a spare of their own, made after
    the previous one took its spare; every page of each is right."""
    sock = os.path.join(short_tmp, "h.sock")
    with HandlerDaemon(sock, snapshot, working_set=None, progress=False) as d:
        used: list[FaultHandler] = []
        for n in (1, 2, 3):
            used.append(_spare(d))
            _restore_on_spare(d, sock, short_tmp, snapshot, n)
        assert len({id(h) for h in used}) == 3
        assert _spare(d) not in used


def test_daemon_stop_with_an_unused_spare_leaves_nothing(short_tmp: str, snapshot: str) -> None:
    """Closing a daemon whose spare handler no session took stops that handler and its
    keeper within seconds: no thread and no fd of theirs is left."""
    sock = os.path.join(short_tmp, "h.sock")
    fds = len(os.listdir("/proc/self/fd"))
    before = set(threading.enumerate())
    daemon = HandlerDaemon(sock, snapshot, working_set=None, progress=False).start()
    try:
        spare = _spare(daemon)
        assert not spare.uffd.closed
    finally:
        started = time.monotonic()
        daemon.close()
    assert time.monotonic() - started < 5.0
    assert spare.uffd.closed
    wait_for(lambda: set(threading.enumerate()) <= before, "the daemon's threads gone", 5.0)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_refused_handshake_does_not_lose_the_spare(short_tmp: str, snapshot: str) -> None:
    """A connection that sends no valid handshake is refused and leaves the spare handler
    waiting, untouched; the next session runs on it and restores every page."""
    sock = os.path.join(short_tmp, "h.sock")
    with HandlerDaemon(sock, snapshot, working_set=None, progress=False) as d:
        spare = _spare(d)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock)
            s.sendall(b"not a handshake")
            s.shutdown(socket.SHUT_WR)
            (refusal,) = d.wait_refused(1, WAIT)
        assert "handshake" in refusal
        assert d.spare_handler is spare and not spare.uffd.closed
        _restore_on_spare(d, sock, short_tmp, snapshot, 1)


def test_a_session_refused_after_its_handshake_does_not_lose_the_spare(
    short_tmp: str, snapshot: str
) -> None:
    """A handshake whose region lies outside the source is refused before the session
    asks for a handler: the spare stays waiting for the next session."""
    sock = os.path.join(short_tmp, "h.sock")
    with HandlerDaemon(sock, snapshot, working_set=None, progress=False) as d:
        spare = _spare(d)
        proc = spawn_restore(sock, SIZE, "--offset", str(SIZE), "--timeout", "3")
        try:
            (refusal,) = d.wait_refused(1, WAIT)
        finally:
            proc.kill()
            proc.wait(WAIT)
        assert "lies outside the source" in refusal
        assert d.spare_handler is spare and not spare.uffd.closed
        _restore_on_spare(d, sock, short_tmp, snapshot, 1)
