"""The daemon's ``--source FILE`` faults are served by the pump (a raw file's mapping, no Python).

Real daemon (in this process), real restore workers (child processes with
their own userfaultfd), real sparse raw memory files on disk. A raw file's
faults are copied from its read-only mapping by the C pump and reach the
session's progress through the served-fault ring; a snapshot file's stay
in Python (its chunks are checksummed there); once the source failed, a
fault is refused by Python, never served natively.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PAGE

from uffd._mapping import Fault
from uffd._resolution import Resolution
from uffd.bench.restore_daemon import PipeLines
from uffd.pagestore.snapshot import write_snapshot
from uffd.restore import faults
from uffd.restore.sources import FileSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from _helpers import (
    DIGEST,
    DaemonThread,
    bad_pages,
    digests_of_source,
    finish_worker,
    page_digest,
    pattern,
    read_digests,
    spawn_restore,
)

PAGES = 256
SIZE = PAGES * PAGE
WAIT = 30.0


def write_sparse(path: str, image: bytes) -> None:
    """``image`` as a raw file whose zero pages are holes (never written)."""
    with open(path, "wb") as f:
        f.truncate(len(image))
        for at in range(0, len(image), PAGE):
            page = image[at : at + PAGE]
            if any(page):
                f.seek(at)
                f.write(page)


class Watched:
    """Every SourceOps a session makes, and the faults its Python path saw."""

    def __init__(self) -> None:
        self.ops: list[faults.SourceOps] = []
        self.python_faults: list[int] = []


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Iterator[Watched]:
    """Records the sessions' SourceOps and counts the faults ``handle_missing`` gets."""
    seen = Watched()
    init, handle_missing = faults.SourceOps.__init__, faults.SourceOps.handle_missing

    def recording_init(self: faults.SourceOps, parts: faults.SessionParts) -> None:
        init(self, parts)
        seen.ops.append(self)

    def counted(self: faults.SourceOps, fault: Fault) -> Resolution:
        seen.python_faults.append(fault.address)
        return handle_missing(self, fault)

    monkeypatch.setattr(faults.SourceOps, "__init__", recording_init)
    monkeypatch.setattr(faults.SourceOps, "handle_missing", counted)
    yield seen


def test_raw_file_faults_are_served_by_the_pump(short_tmp: str, watched: Watched) -> None:
    """Every faulted page of a raw file comes from the pump, byte-exact, and progress counts it."""
    path = os.path.join(short_tmp, "mem.raw")
    write_sparse(path, bytes(pattern(SIZE, seed=5)))
    sock, digests = os.path.join(short_tmp, "h.sock"), os.path.join(short_tmp, "d")
    with DaemonThread(sock, path, prefetch=False, working_set=None) as daemon:
        proc = spawn_restore(sock, SIZE, "--order", "sequential", digests=digests)
        result = finish_worker(proc, timeout=WAIT)
        (report,) = daemon.reports(1, timeout=WAIT)
    assert not bad_pages(read_digests(digests), digests_of_source(path, SIZE))
    assert result["pages"] == PAGES and result["sigbus"] == 0
    (ops,) = watched.ops
    assert watched.python_faults == []
    # The holes touched before the zero-page pass are faulted too (zeros from the mapping).
    assert ops.parts.handler.stats.native_faults == report["faulted"] > 0
    assert report["faulted"] + report["zeroed"] == PAGES
    assert report["errors"] == [] and report["fault_p50_us"] > 0


def test_snapshot_file_faults_stay_in_python(short_tmp: str, watched: Watched) -> None:
    """A snapshot's pages are packed and checksummed: its faults take the Python path."""
    path = os.path.join(short_tmp, "s.snap")
    write_snapshot(path, {"mem": bytes(pattern(SIZE, seed=6))})
    source = FileSource(path)
    try:
        assert source.native_address(0, SIZE) is None
    finally:
        source.close()
    sock, digests = os.path.join(short_tmp, "h.sock"), os.path.join(short_tmp, "d")
    with DaemonThread(sock, path, prefetch=False, working_set=None) as daemon:
        proc = spawn_restore(sock, SIZE, "--order", "sequential", digests=digests)
        finish_worker(proc, timeout=WAIT)
        (report,) = daemon.reports(1, timeout=WAIT)
    assert not bad_pages(read_digests(digests), digests_of_source(path, SIZE))
    (ops,) = watched.ops
    assert ops.parts.handler.stats.native_faults == 0
    assert len(watched.python_faults) == report["faulted"] > 0


def test_native_address_is_the_file_mapping(short_tmp: str) -> None:
    """A raw file's native address holds the file's bytes; a range past a hole-only run has none."""
    path = os.path.join(short_tmp, "mem.raw")
    image = bytes(pattern(SIZE, seed=7))
    write_sparse(path, image)
    source = FileSource(path)
    try:
        address = source.native_address(PAGE, 4 * PAGE)
        assert address is not None
        first = source.native_address(0, SIZE)
        assert first is not None and address == first + PAGE
        assert source.view(PAGE, 4 * PAGE) == image[PAGE : 5 * PAGE]
        assert source.native_address(15 * PAGE, PAGE) is None  # wholly in a hole
    finally:
        source.close()


def test_fault_after_the_source_failed_is_refused_by_python(
    short_tmp: str, watched: Watched
) -> None:
    """Once the file fails (truncated), later faults reach Python and are refused, not served."""
    path = os.path.join(short_tmp, "mem.raw")
    write_sparse(path, bytes(pattern(SIZE, seed=8)))
    sock, digests = os.path.join(short_tmp, "h.sock"), os.path.join(short_tmp, "d")
    pause = 100
    with DaemonThread(sock, path, prefetch=False, working_set=None, fallback="zero") as daemon:
        proc = spawn_restore(
            sock, SIZE, "--order", "sequential", "--pause-after", str(pause), digests=digests,
            stdin=True,
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        line = PipeLines(proc.stdout.fileno()).readline(WAIT)
        assert line.strip() == f'{{"paused": {pause}}}'
        (ops,) = watched.ops
        native_before = ops.parts.handler.stats.native_faults
        os.truncate(path, pause * PAGE)
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        result = finish_worker(proc, timeout=WAIT)
        (report,) = daemon.reports(1, timeout=WAIT)
    got = read_digests(digests)
    zero = page_digest(bytes(PAGE))
    assert result["sigbus"] == 0
    assert ops.parts.handler.stats.native_faults == native_before
    assert report["errors"] and "truncated" in report["errors"][0]
    # Every page after the cut was refused by Python and given the zero fallback.
    rest = range(pause, PAGES)
    assert all(got[i * DIGEST : (i + 1) * DIGEST] == zero for i in rest)
    assert len(watched.python_faults) >= len(rest) - report["zeroed"]
