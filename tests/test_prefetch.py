"""The adaptive prefetch planner and the working-set file (pure logic, no userfaultfd)."""

from __future__ import annotations

import collections
import itertools
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffd.restore.prefetch import (
    MAX_CHUNK,
    MIN_CHUNK,
    AdaptivePrefetcher,
    WorkingSet,
    WorkingSetError,
    working_set_path,
)
from uffd.restore.prefetch_thread import _RingReads

PS = 4096
MIB = 1 << 20


def drain(p: AdaptivePrefetcher) -> list[tuple[int, int]]:
    """Every remaining chunk, in order."""
    out = []
    while (chunk := p.next_chunk()) is not None:
        out.append(chunk)
    return out


def test_chunks_double_from_64k_to_4m_while_sequential() -> None:
    """Sequential chunks go 64 KiB, 128 KiB, ... 4 MiB, then stay at 4 MiB, back to back."""
    p = AdaptivePrefetcher(32 * MIB, page_size=PS)
    chunks = drain(p)
    sizes = [length for _, length in chunks]
    assert sizes[:8] == [64 << 10, 128 << 10, 256 << 10, 512 << 10, MIB, 2 * MIB, 4 * MIB, 4 * MIB]
    assert max(sizes) == MAX_CHUNK and sizes[0] == MIN_CHUNK
    assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(chunks))
    assert sum(sizes) == 32 * MIB and p.done and p.next_chunk() is None


def test_a_fault_elsewhere_restarts_just_after_it_at_64k() -> None:
    """A fault far from the stream: the next chunk starts on the next page, 64 KiB long."""
    p = AdaptivePrefetcher(64 * MIB, page_size=PS)
    for _ in range(5):
        p.next_chunk()
    assert p.chunk_size == 2 * MIB
    p.on_fault(40 * MIB + 3 * PS + 17)
    assert p.next_chunk() == (40 * MIB + 4 * PS, MIN_CHUNK)
    assert p.next_chunk() == (40 * MIB + 4 * PS + MIN_CHUNK, 2 * MIN_CHUNK)


def test_a_fault_on_the_stream_keeps_the_chunk_size() -> None:
    """A fault inside the last chunk (the workload catching up) keeps the grown size."""
    p = AdaptivePrefetcher(64 * MIB, page_size=PS)
    for _ in range(4):
        start, length = p.next_chunk()  # type: ignore[misc]
    size = p.chunk_size
    p.on_fault(start + length - PS)
    assert p.next_chunk() == (start + length, size)


def test_consecutive_faults_count_as_sequential() -> None:
    """Faults on consecutive pages (no prefetch yet) do not reset the size."""
    p = AdaptivePrefetcher(64 * MIB, page_size=PS)
    p.next_chunk()
    p.next_chunk()
    p.on_fault(30 * MIB)
    p.on_fault(30 * MIB + PS)
    assert p.next_chunk() == (30 * MIB + 2 * PS, MIN_CHUNK)


def test_present_pages_are_never_handed_out() -> None:
    """Pages marked present or faulted are skipped; a chunk ends at the first present page."""
    p = AdaptivePrefetcher(MIB, page_size=PS)
    assert p.mark_present(5 * PS, 2 * PS) == 2
    assert p.mark_present(5 * PS, 3 * PS) == 1
    p.on_fault(20 * PS)
    p._cursor = 0  # start from the front to see the skip
    first = p.next_chunk()
    assert first == (0, 5 * PS)
    handed = [first, *drain(p)]
    pages = [off // PS + i for off, n in handed for i in range(n // PS)]
    assert sorted(pages) == sorted(set(range(256)) - {5, 6, 7, 20})
    assert len(pages) == len(set(pages))


def test_wraps_round_to_pages_skipped_before_a_restart() -> None:
    """After a fault near the end, the stream wraps round for the pages it jumped over."""
    p = AdaptivePrefetcher(MIB, page_size=PS)
    p.next_chunk()
    p.on_fault(MIB - 2 * PS)
    chunks = drain(p)
    assert chunks[0] == (MIB - PS, PS)
    assert chunks[1][0] == MIN_CHUNK
    assert p.done and p.missing_pages == 0


def test_chunks_never_cross_a_boundary() -> None:
    """Region boundaries cut chunks (one UFFDIO_COPY never spans two mappings)."""
    p = AdaptivePrefetcher(8 * MIB, page_size=PS, boundaries=[3 * MIB + 5 * PS])
    for off, n in drain(p):
        assert not off < 3 * MIB + 5 * PS < off + n


def test_missing_runs_reports_the_holes() -> None:
    """missing_runs lists the runs not yet present in a range."""
    p = AdaptivePrefetcher(16 * PS, page_size=PS)
    p.mark_present(2 * PS, 3 * PS)
    p.on_fault(9 * PS)
    assert p.missing_runs(0, 12 * PS) == [(0, 2 * PS), (5 * PS, 4 * PS), (10 * PS, 2 * PS)]


def test_bad_geometry_is_refused() -> None:
    """Lengths, chunk sizes and boundaries must be whole pages."""
    with pytest.raises(ValueError, match="whole number"):
        AdaptivePrefetcher(PS + 1, page_size=PS)
    with pytest.raises(ValueError, match="min_chunk"):
        AdaptivePrefetcher(MIB, page_size=PS, min_chunk=2 * MIB, max_chunk=MIB)
    with pytest.raises(ValueError, match="boundary"):
        AdaptivePrefetcher(MIB, page_size=PS, boundaries=[100])
    with pytest.raises(ValueError, match="outside"):
        AdaptivePrefetcher(MIB, page_size=PS).on_fault(MIB)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=1, max_value=600),
    st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=10**6)), max_size=80),
)
def test_every_page_is_handed_out_exactly_once(npages: int, steps: list[tuple[bool, int]]) -> None:
    """Whatever faults interleave, chunks and faults cover every page once, chunks within limits."""
    p = AdaptivePrefetcher(npages * PS, page_size=PS, boundaries=[npages // 3 * PS])
    seen: set[int] = set()
    faulted: set[int] = set()
    for is_fault, value in steps:
        if is_fault:
            page = value % npages
            if page not in seen:
                faulted.add(page)
            seen.add(page)
            p.on_fault(page * PS)
        elif (chunk := p.next_chunk()) is not None:
            off, n = chunk
            assert MIN_CHUNK >= PS and 0 < n <= MAX_CHUNK and n <= p.max_pages * PS
            pages = set(range(off // PS, (off + n) // PS))
            assert not pages & seen
            seen |= pages
    for off, n in drain(p):
        pages = set(range(off // PS, (off + n) // PS))
        assert not pages & seen
        seen |= pages
    assert seen == set(range(npages))


def test_working_set_round_trip(tmp_path: os.PathLike[str]) -> None:
    """save() then load() gives the same pages; runs are sorted and merged on disk."""
    path = os.path.join(tmp_path, "snap.ws.json")
    ws = WorkingSet(PS, 64 * PS)
    ws.update([9 * PS, 3 * PS + 100, 4 * PS, 5 * PS, 40 * PS])
    ws.save(path)
    doc = json.loads(Path(path).read_text())
    assert doc["runs"] == [[3, 3], [9, 1], [40, 1]]
    assert doc["format"] == "pyuffd-working-set" and doc["version"] == 1
    back = WorkingSet.load(path, page_size=PS, length=64 * PS)
    assert back.pages() == [3 * PS, 4 * PS, 5 * PS, 9 * PS, 40 * PS]
    assert back.ranges() == [(3 * PS, 3 * PS), (9 * PS, PS), (40 * PS, PS)]
    assert back.ranges(max_length=2 * PS)[:2] == [(3 * PS, 2 * PS), (5 * PS, PS)]
    assert 4 * PS in back and 6 * PS not in back and len(back) == 5


def test_working_set_save_is_atomic(tmp_path: os.PathLike[str]) -> None:
    """save() replaces the file in one rename and leaves no temporary file behind."""
    path = os.path.join(tmp_path, "snap.ws.json")
    WorkingSet(PS).save(path)
    inode = os.stat(path).st_ino
    ws = WorkingSet(PS)
    ws.add(0)
    ws.save(path)
    assert os.stat(path).st_ino != inode
    assert os.listdir(tmp_path) == ["snap.ws.json"]
    assert working_set_path("/x/snap") == "/x/snap.ws.json"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"{not json", "not JSON"),
        (b'{"format": "other"}', "not a pyuffd-working-set"),
        (b'{"format": "pyuffd-working-set", "version": 9}', "version 9"),
        (b'{"format": "pyuffd-working-set", "version": 1, "page_size": 4096}', "malformed"),
        (
            b'{"format": "pyuffd-working-set", "version": 1, "page_size": 4096, "length": 8192,'
            b' "runs": [[1, 5]]}',
            "bad run",
        ),
        (
            b'{"format": "pyuffd-working-set", "version": 1, "page_size": 8192, "runs": []}',
            "8192-byte pages",
        ),
    ],
)
def test_bad_working_set_files_are_refused(
    tmp_path: os.PathLike[str], content: bytes, match: str
) -> None:
    """A malformed, foreign or mismatched working-set file raises WorkingSetError naming it."""
    path = os.path.join(tmp_path, "bad.ws.json")
    with open(path, "wb") as f:
        f.write(content)
    with pytest.raises(WorkingSetError, match=match):
        WorkingSet.load(path, page_size=PS)


def test_working_set_for_another_layout_is_refused(tmp_path: os.PathLike[str]) -> None:
    """A working set recorded for a snapshot of another length is not used."""
    path = os.path.join(tmp_path, "snap.ws.json")
    WorkingSet(PS, 16 * PS).save(path)
    with pytest.raises(WorkingSetError, match="recorded for 65536 bytes"):
        WorkingSet.load(path, page_size=PS, length=32 * PS)


def test_the_prefetch_ring_hands_out_space_first_in_first_out() -> None:
    """The receive ring places reads after the newest, wraps to the start when the end is
    full, and never overlaps a read still in flight."""
    ring = _RingReads.__new__(_RingReads)
    ring.size = 100
    ring._used = collections.deque()
    assert ring._alloc(101) is None and ring._alloc(40) == 0
    ring._used.extend([(0, 40), (40, 40)])
    assert ring._alloc(30) is None  # 20 left at the end, none before the oldest
    ring._used.popleft()  # the oldest installed: [0, 40) free again
    assert ring._alloc(20) == 80 and ring._alloc(30) == 0 and ring._alloc(41) is None
    ring._used.append((0, 30))  # wrapped: free space is [30, 40) only
    assert ring._alloc(10) == 30 and ring._alloc(11) is None
