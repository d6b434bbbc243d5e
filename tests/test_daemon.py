"""The UFFD handler daemon end to end: real sockets, a real page server, real worker processes.

Each test starts what it needs (page server, daemon in this process or as
``python -m uffd handler``, worker processes from examples/_worker.py) and
checks the restored memory page by page against the source.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from uffd.pagestore.snapshot import write_snapshot
from uffd.restore.daemon import FileSource, HandlerDaemon
from uffd.restore.firecracker import GuestRegionUffdMapping, HandshakeError
from uffd.restore.layout import GuestLayout
from uffd.restore.prefetch import WorkingSet, WorkingSetError
from uffd.restore.session import _kind
from uffd.restore.sources import _FlatLayout

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from _helpers import (  # noqa: E402
    DIGEST,
    PAGE,
    DaemonProcess,
    DaemonThread,
    ServerProcess,
    _Lines,
    bad_pages,
    digests_of_source,
    finish_worker,
    page_digest,
    pattern,
    read_digests,
    spawn_restore,
    wrong_pages,
)
from rel_common import pattern as helper_pattern  # noqa: E402

WAIT = 30.0
SIZE = 2 << 20


@pytest.fixture
def snapshot(short_tmp: str) -> str:
    """A 2 MiB snapshot of the known pattern (every 16th page zero, so not stored)."""
    path = os.path.join(short_tmp, "w.snap")
    write_snapshot(path, {"memory": pattern(SIZE)})
    return path


def restore(
    sock: str, short_tmp: str, *args: str, size: int = SIZE
) -> tuple[dict[str, object], bytes]:
    """Run a restore worker against ``sock``; its JSON result and page digests."""
    digests = os.path.join(short_tmp, f"digests-{os.urandom(4).hex()}")
    proc = spawn_restore(sock, size, *args, digests=digests)
    result = finish_worker(proc, timeout=WAIT)
    return result, read_digests(digests)


@pytest.mark.parametrize(
    ("order", "remote", "prefetch"),
    [("random", True, True), ("sequential", True, True), ("sequential", False, False)],
    ids=["random-page-server", "sequential-page-server", "sequential-file-faults-only"],
)
def test_lazy_restore_matches_the_snapshot_page_by_page(
    short_tmp: str, snapshot: str, order: str, remote: bool, prefetch: bool
) -> None:
    """A worker process reading its memory in random or sequential order gets every page right."""
    sock = os.path.join(short_tmp, "h.sock")
    with ServerProcess(snapshot) as server:
        source = server.url if remote else snapshot
        with DaemonThread(sock, source, prefetch=prefetch, working_set=None) as daemon:
            result, got = restore(sock, short_tmp, "--order", order)
            (report,) = daemon.reports(1)
    assert not bad_pages(got, digests_of_source(snapshot, SIZE))
    pages = SIZE // PAGE
    assert result["pages"] == pages and result["sigbus"] == 0
    assert report["pid"] == result["pid"] and report["errors"] == []
    assert report["faulted"] + report["prefetched"] + report["zeroed"] >= pages
    assert report["first_fault"] is not None and report["fault_p50_us"] > 0
    if not prefetch:
        # The snapshot's zero pages (every 16th) are mapped in bulk, the rest fault.
        assert report["prefetched"] == 0 and report["zeroed"] <= pages // 16
        assert report["complete"] is not None  # noted by the last fault
        assert report["faulted"] + report["zeroed"] >= pages
    # The snapshot's zero pages are known (the file, or the page server's map) and mapped
    # in bulk, never fetched; the pass starts after the first fault, so a fast reader may
    # fault on some first (answered with a ZERO frame), but not on all of them in a row.
    assert report["zeroed"] > 0 or report["faulted"] >= pages // 16


@pytest.mark.parametrize("remote", [False, True], ids=["file", "page-server"])
def test_regions_map_to_their_offsets_in_the_source(short_tmp: str, remote: bool) -> None:
    """Three regions at a handshake offset are filled from that part of a two-region snapshot,
    from the file or from a page server (prefetch reads that span both source regions)."""
    path = os.path.join(short_tmp, "two.snap")
    image = pattern(3 << 20, seed=9)
    write_snapshot(path, {"low": image[: 1 << 20], "high": image[1 << 20 :]})
    sock = os.path.join(short_tmp, "h.sock")
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(ServerProcess(path)).url if remote else path
        daemon = stack.enter_context(DaemonThread(sock, source, working_set=None))
        result, got = restore(sock, short_tmp, "--regions", "3", "--offset", str(512 << 10))
        (report,) = daemon.reports(1)
    assert report["regions"] == 3 and not report["errors"]
    assert not bad_pages(got, digests_of_source(path, SIZE, offset=512 << 10))
    assert result["pages"] == SIZE // PAGE


def test_flat_layout_spans_regions() -> None:
    """A flat range across two source regions is cut into one piece per region."""
    layout = _FlatLayout([("a", 8192), ("b", 4096), ("c", 8192)])
    assert layout.length == 20480
    assert layout.pieces(4096, 12288) == [("a", 4096, 4096), ("b", 0, 4096), ("c", 0, 4096)]
    with pytest.raises(ValueError, match="outside the source image"):
        layout.pieces(16384, 8192)


def test_guest_layout_maps_addresses_to_flat_offsets_and_the_source() -> None:
    """Regions sent out of address order: host address, flat offset and source offset agree."""
    high = GuestRegionUffdMapping(0x20000, 2 * PAGE, 5 * PAGE, PAGE)
    low = GuestRegionUffdMapping(0x10000, PAGE, 0, PAGE)
    layout = GuestLayout([high, low])
    assert (layout.length, layout.starts) == (3 * PAGE, [0, 2 * PAGE])
    assert layout.flat(0x20000 + PAGE + 7) == PAGE
    assert layout.flat(0x10000 + 9) == 2 * PAGE
    assert layout.flat(0x10000 + PAGE) is None and layout.flat(0x100) is None
    assert layout.address(2 * PAGE) == 0x10000 and layout.source_offset(PAGE) == 6 * PAGE
    assert layout.flat_of_source(0, 8 * PAGE) == [(0, 2 * PAGE), (2 * PAGE, PAGE)]
    with pytest.raises(HandshakeError, match="lies outside the source"):
        layout.check_source(6 * PAGE, PAGE, "s")
    with pytest.raises(HandshakeError, match="mixed page sizes"):
        GuestLayout([low, GuestRegionUffdMapping(0x40000000, 2 << 20, PAGE, 2 << 20)])


def test_region_kind_follows_the_handshake_page_size() -> None:
    """Base pages are anon; huge pages of any size are hugetlb, served at that size."""
    assert _kind(PAGE) == "anon"
    assert _kind(2 << 20) == "hugetlb"
    assert _kind(1 << 30) == "hugetlb"


@pytest.mark.parametrize("first", [False, True], ids=["after-reads", "before-reads-prefetching"])
def test_balloon_remove_reads_zeros(short_tmp: str, snapshot: str, first: bool) -> None:
    """MADV_DONTNEED (a balloon) on a range: later reads there are zeros, prefetch or not."""
    sock = os.path.join(short_tmp, "h.sock")
    balloon = f"{256 << 10}:{512 << 10}"
    extra = ["--balloon", balloon, "--order", "sequential"] + (["--balloon-first"] if first else [])
    with DaemonThread(sock, snapshot, working_set=None) as daemon:
        result, got = restore(sock, short_tmp, *extra)
        (report,) = daemon.reports(1)
    assert result["balloon_pages"] == 128
    assert result["balloon_zero_pages"] == 128
    want = bytearray(digests_of_source(snapshot, SIZE))
    if first:
        # Read after the balloon inflated: the worker saw zeros there from the start.
        zero = page_digest(bytes(PAGE))
        for index in range(64, 192):
            want[index * DIGEST : (index + 1) * DIGEST] = zero
    assert not bad_pages(got, bytes(want))
    assert not report["errors"]


def _restore_through_a_dying_server(
    short_tmp: str, snapshot: str, server: ServerProcess, sock: str, pause: int
) -> tuple[dict[str, object], bytes]:
    digests = os.path.join(short_tmp, "digests")
    proc = spawn_restore(
        sock,
        SIZE,
        "--order",
        "sequential",
        "--pause-after",
        str(pause),
        digests=digests,
        stdin=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert _Lines(proc.stdout).readline(WAIT) == f'{{"paused": {pause}}}'
    server.kill()
    proc.stdin.write(b"\n")
    proc.stdin.flush()
    return finish_worker(proc, timeout=WAIT), read_digests(digests)


def test_killed_page_server_zero_fallback(
    short_tmp: str, snapshot: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The page server dies mid-restore: later faults get zero pages, the error is logged."""
    sock = os.path.join(short_tmp, "h.sock")
    pause = 100
    with (
        ServerProcess(snapshot) as server,
        DaemonThread(sock, server.url, prefetch=False, working_set=None, fallback="zero") as daemon,
        caplog.at_level(logging.ERROR, logger="uffd.restore.daemon"),
    ):
        result, got = _restore_through_a_dying_server(short_tmp, snapshot, server, sock, pause)
        (report,) = daemon.reports(1)
    want = digests_of_source(snapshot, SIZE)
    zero = page_digest(bytes(PAGE))
    assert not bad_pages(got[: pause * DIGEST], want[: pause * DIGEST])
    rest = got[pause * DIGEST :]
    assert all(rest[i : i + DIGEST] == zero for i in range(0, len(rest), DIGEST))
    assert result["sigbus"] == 0
    assert report["errors"] and "failed" in report["errors"][0]
    assert f"source {report['errors'][0].split()[1]}" in caplog.text
    assert "faults now fail by the 'zero' fallback" in caplog.text


def test_killed_page_server_sigbus_fallback(short_tmp: str, snapshot: str) -> None:
    """sigbus fallback: the worker's reads raise PageAccessError; the CLI logs it, exits 1."""
    sock = os.path.join(short_tmp, "h.sock")
    log = os.path.join(short_tmp, "daemon.log")
    pause = 100
    with (
        ServerProcess(snapshot) as server,
        DaemonProcess(
            sock,
            server.url,
            "--once",
            "--no-prefetch",
            "--no-working-set",
            "--fallback",
            "sigbus",
            log_path=log,
        ) as daemon,
    ):
        result, got = _restore_through_a_dying_server(short_tmp, snapshot, server, sock, pause)
        (report,) = daemon.reports(1)
        code = daemon.wait(WAIT)
        text = daemon.log()
    # Every page read after the server died raised SIGBUS, except the snapshot's zero
    # pages (every 16th) the zero-page pass had mapped from the server's map by then
    # (usually all; on a slow host the pass may still be under way when the server dies).
    want = digests_of_source(snapshot, SIZE)
    pages = [slice(i * DIGEST, (i + 1) * DIGEST) for i in range(SIZE // PAGE)]
    lost = [i for i, at in enumerate(pages) if got[at] != want[at]]
    assert result["sigbus"] == len(lost) >= SIZE // PAGE - pause - SIZE // PAGE // 16
    assert all(i >= pause for i in lost)
    assert not bad_pages(got[: pause * DIGEST], digests_of_source(snapshot, pause * PAGE))
    assert code == 1
    assert "ERROR" in text and f"source {server.url} failed" in text
    assert "'sigbus' fallback" in text
    assert report["errors"]


def test_working_set_is_recorded_then_installed_first(short_tmp: str, snapshot: str) -> None:
    """Run 1 records the faulted pages next to the snapshot; run 2 installs them before faults."""
    sock = os.path.join(short_tmp, "h.sock")
    ws_path = snapshot + ".ws.json"
    with DaemonThread(sock, snapshot, prefetch=False) as daemon:
        restore(sock, short_tmp, "--size", str(512 << 10))
        (first,) = daemon.reports(1)
    recorded = WorkingSet.load(ws_path, page_size=PAGE, length=SIZE)
    # Zero pages (every 16th) are mapped in bulk: stored pages fault and are recorded, and
    # so is a zero page touched while the pass maps it (the report's count is clamped to
    # the pages the pass did not map: one fewer, then).
    assert first["faulted"] <= len(recorded) <= first["faulted"] + 128 // 16
    assert first["faulted"] + first["zeroed"] >= 128
    assert first["faulted"] >= 128 - 128 // 16
    with DaemonThread(sock, snapshot, prefetch=False) as daemon:
        _, got = restore(sock, short_tmp, "--size", str(SIZE))
        (second,) = daemon.reports(1)
    assert second["working_set"] > 0
    assert second["working_set"] + second["faulted"] + second["zeroed"] >= SIZE // PAGE
    assert not bad_pages(got, digests_of_source(snapshot, SIZE))
    assert len(WorkingSet.load(ws_path, page_size=PAGE, length=SIZE)) >= 128


def test_two_processes_are_restored_at_once(short_tmp: str, snapshot: str) -> None:
    """Two workers restored concurrently through one daemon each get the right memory."""
    sock = os.path.join(short_tmp, "h.sock")
    with DaemonThread(sock, snapshot, working_set=None) as daemon:
        procs = []
        for seed in (1, 2):
            digests = os.path.join(short_tmp, f"d{seed}")
            proc = spawn_restore(sock, SIZE, "--seed", str(seed), digests=digests)
            procs.append((proc, digests))
        results = [finish_worker(proc, timeout=WAIT) for proc, _ in procs]
        reports = daemon.reports(2)
    for _, digests in procs:
        assert not wrong_pages(digests, snapshot, SIZE)
    assert {r["pid"] for r in reports} == {r["pid"] for r in results}


def test_a_region_outside_the_source_is_refused(
    short_tmp: str, snapshot: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handshake offset past the end of the source is refused, naming the field; no hang."""
    sock = os.path.join(short_tmp, "h.sock")
    with caplog.at_level(logging.ERROR, logger="uffd.restore.daemon"):
        daemon = HandlerDaemon(sock, snapshot, working_set=None, progress=False).start()
        try:
            proc = spawn_restore(sock, SIZE, "--offset", str(SIZE), "--timeout", "3")
            (message,) = daemon.wait_refused(1, WAIT)
            proc.kill()
            proc.wait(WAIT)
        finally:
            daemon.close()
    assert "mappings[0].offset" in message and "lies outside the source" in message
    assert message in caplog.text
    assert not os.path.exists(sock)


def test_file_source_reads_across_regions(short_tmp: str) -> None:
    """FileSource sees a snapshot's regions end to end as one image."""
    path = os.path.join(short_tmp, "r.snap")
    write_snapshot(path, {"a": b"\x01" * PAGE, "b": b"\x02" * PAGE})
    source = FileSource(path)
    try:
        assert source.length == 2 * PAGE
        assert source.read(0, 2 * PAGE) == b"\x01" * PAGE + b"\x02" * PAGE
        assert source.fetch(PAGE, PAGE).result(0) == b"\x02" * PAGE
    finally:
        source.close()


def test_cli_once_exits_0_after_a_clean_session(short_tmp: str, snapshot: str) -> None:
    """`uffd handler --once` prints the summary line and exits 0 after one clean session."""
    sock = os.path.join(short_tmp, "h.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uffd", "handler", "--socket", sock, "--source", snapshot, "--once"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert _Lines(proc.stdout).readline(WAIT) == f"listening on {sock}"
        restore(sock, short_tmp)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert proc.returncode == 0, err
    line = out.decode().strip()
    # The summary counts every page once, in one system of units, "1 region".
    counts = re.search(
        r"in 1 region, (\d+) pages: (\d+) faulted, (\d+) prefetched, (\d+) zero;", line
    )
    assert line.startswith("uffd handler: pid ") and counts, line
    total, faulted, prefetched, zero = map(int, counts.groups())
    assert total == SIZE // PAGE == faulted + prefetched + zero
    assert "2 MiB at " in line and "MiB/s" in line and " MB" not in line
    assert "first fault" in line and "errors" not in line
    assert os.path.exists(snapshot + ".ws.json")


def test_a_live_socket_is_not_stolen_a_stale_one_is_replaced(short_tmp: str, snapshot: str) -> None:
    """A second daemon on a socket in use fails with EADDRINUSE; a stale socket file is reused."""
    sock = os.path.join(short_tmp, "h.sock")
    with DaemonThread(sock, snapshot, working_set=None):
        with pytest.raises(OSError, match="another process is serving") as info:
            HandlerDaemon(sock, snapshot, working_set=None)
        assert info.value.errno == errno.EADDRINUSE
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)
    stale.close()
    assert os.path.exists(sock)
    daemon = HandlerDaemon(sock, snapshot, working_set=None)
    try:
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    finally:
        daemon.close()


HELPERS = Path(__file__).resolve().parent / "helpers"


def _limited_nofile(limit: int) -> Callable[[], None]:
    """preexec_fn: the child starts with at most ``limit`` fds (RLIMIT_NOFILE)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return apply


def test_an_fd_flood_is_survived(short_tmp: str, snapshot: str) -> None:
    """Out of fds (RLIMIT_NOFILE 48): accept() fails with EMFILE, the daemon stays up and logs
    a bounded amount, a session in progress is not touched, and an honest peer is served
    within 30 s once the flood stops."""
    sock = os.path.join(short_tmp, "h.sock")
    log_path = os.path.join(short_tmp, "daemon.log")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uffd",
            "handler",
            "--socket",
            sock,
            "--source",
            snapshot,
            "--json",
            "--no-progress",
            "--no-working-set",
            "--fallback",
            "zero",
        ],
        stdout=subprocess.PIPE,
        stderr=open(log_path, "wb"),  # noqa: SIM115
        preexec_fn=_limited_nofile(48),
    )
    flood: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        lines = _Lines(proc.stdout)
        assert (lines.readline(WAIT) or "").startswith("listening on")
        digests = os.path.join(short_tmp, "held")
        held = spawn_restore(sock, SIZE, "--pause-after", "8", digests=digests, stdin=True)
        assert held.stdout is not None
        assert json.loads(_Lines(held.stdout).readline(WAIT) or "{}") == {"paused": 8}
        for _ in range(300):  # silent peers: far more than the daemon has fds for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError, ConnectionRefusedError):
                s.connect(sock)
            flood.append(s)
        time.sleep(2.0)
        daemon = psutil.Process(proc.pid)
        assert proc.poll() is None and daemon.num_fds() <= 48
        for s in flood:
            s.close()
        flood.clear()
        held.stdin.write(b"go\n")  # type: ignore[union-attr]
        held.stdin.flush()  # type: ignore[union-attr]
        assert finish_worker(held, timeout=WAIT)["sigbus"] == 0
        assert not wrong_pages(digests, snapshot, SIZE)
        result, got = restore(sock, short_tmp)  # an honest peer after the flood
        assert not bad_pages(got, digests_of_source(snapshot, SIZE)) and result["sigbus"] == 0
        log_text = Path(log_path).read_text()
        assert "accept() failed" in log_text and "EMFILE" in log_text
        assert len(log_text) < 20_000, "the log grew with the flood"
    finally:
        for s in flood:
            s.close()
        proc.terminate()
        proc.communicate(timeout=WAIT)
    assert proc.returncode == 0


def test_a_range_left_out_of_the_handshake_is_refused_not_woken_forever(
    short_tmp: str,
) -> None:
    """Faults in a range the peer registered but did not list take the fallback (zeros here),
    are counted in the report, and do not spin: the peer reads them in well under a second."""
    npages = 64
    path = os.path.join(short_tmp, "mem.raw")
    Path(path).write_bytes(helper_pattern(npages, PAGE))
    sock = os.path.join(short_tmp, "h.sock")
    with DaemonThread(sock, path, working_set=None, fallback="zero") as daemon:
        proc = subprocess.run(
            [sys.executable, str(HELPERS / "daemon_extra_range_peer.py"), sock, str(npages)],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        (report,) = daemon.reports(1)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["listed_ok"] and result["extra_first_bytes"] == [0]
    assert result["extra_s"] < 5.0
    assert report["refused"] == npages and report["pid"] == result["pid"]


def test_deep_json_is_refused_with_the_field_and_the_daemon_goes_on(
    short_tmp: str, snapshot: str
) -> None:
    """A handshake nested 100,000 deep is refused (field "json") before parsing: no
    RecursionError, no traceback; the daemon then serves an honest peer."""
    sock = os.path.join(short_tmp, "h.sock")
    daemon = HandlerDaemon(sock, snapshot, working_set=None, progress=False).start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock)
            s.sendall(b"[" * 100_000)
            s.shutdown(socket.SHUT_WR)
            (refusal,) = daemon.wait_refused(1, timeout=WAIT)
        assert re.search(r"handshake: json: nested \d+ levels deep; at most 16", refusal)
        _, got = restore(sock, short_tmp)
        assert not bad_pages(got, digests_of_source(snapshot, SIZE))
    finally:
        daemon.close()


def test_working_set_problems_are_start_up_errors(short_tmp: str, snapshot: str) -> None:
    """--working-set in a missing directory, or a file claiming a billion pages, stops
    `uffd handler` at start-up with exit 1 naming the flag and path; the claim is refused
    without building it (RSS stays bounded)."""
    run = [
        sys.executable,
        "-m",
        "uffd",
        "handler",
        "--socket",
        os.path.join(short_tmp, "h.sock"),
        "--source",
        snapshot,
    ]
    out = subprocess.run(
        [*run, "--working-set", "/nonexistent/dir/ws.json"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert out.returncode == 1
    assert "--working-set /nonexistent/dir/ws.json: the directory /nonexistent/dir" in out.stderr
    huge = os.path.join(short_tmp, "huge.ws.json")
    Path(huge).write_text(
        json.dumps(
            {"format": "pyuffd-working-set", "version": 1, "page_size": PAGE, "runs": [[0, 10**9]]}
        )
    )
    before = psutil.Process().memory_info().rss
    with pytest.raises(WorkingSetError, match="inside the 512 pages"):
        WorkingSet.load(huge, page_size=PAGE, length=SIZE)
    with pytest.raises(WorkingSetError, match="inside the 16777216 pages"):
        WorkingSet.load(huge)
    assert psutil.Process().memory_info().rss - before < 64 << 20
    out = subprocess.run(
        [*run, "--working-set", huge], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert out.returncode == 1 and f"--working-set {huge}" in out.stderr and "bad run" in out.stderr


def test_the_socket_is_bound_with_its_mode_and_no_umask(
    short_tmp: str, snapshot: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket appears with 0600 (0666 with --allow-uid of another user) and the
    process-wide umask is never touched while binding (other threads create files)."""
    calls: list[int] = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    for allow, mode in ((None, 0o600), ([os.geteuid(), 4242], 0o666)):
        sock = os.path.join(short_tmp, "h.sock")
        daemon = HandlerDaemon(sock, snapshot, working_set=None, progress=False, allow_uids=allow)
        try:
            assert stat.S_IMODE(os.lstat(sock).st_mode) == mode
            assert sorted(os.listdir(short_tmp)) == sorted(["h.sock", "w.snap"])
        finally:
            daemon.close()
    assert calls == []


def test_cli_names_the_socket_path_in_its_errors(short_tmp: str, snapshot: str) -> None:
    """--socket on a regular file, or in a missing directory, exits 1 naming the path;
    --progress without tqdm warns that there will be no bars."""
    regular = os.path.join(short_tmp, "plain")
    Path(regular).write_text("x")
    run = [sys.executable, "-m", "uffd", "handler", "--source", snapshot, "--no-working-set"]
    out = subprocess.run(
        [*run, "--socket", regular], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert out.returncode == 1 and f"--socket {regular}: the path exists and is not a socket" in (
        out.stderr
    )
    assert "Address already in use" not in out.stderr
    missing = os.path.join(short_tmp, "nodir", "h.sock")
    out = subprocess.run(
        [*run, "--socket", missing], capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert out.returncode == 1
    assert f"--socket {missing}: the directory {os.path.dirname(missing)} does not exist" in (
        out.stderr
    )
    no_tqdm = (
        "import sys; sys.modules['tqdm'] = None; from uffd.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            no_tqdm,
            "handler",
            "--source",
            snapshot,
            "--socket",
            missing,
            "--progress",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert out.returncode == 1 and "--progress needs tqdm, which is not installed" in out.stderr
