"""uffd.dirty.DirtyTracker against the real kernel (UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN).

Writes go through ``Region.write`` (GIL released), so a writer thread runs
while the main thread collects. Another process's memory is tracked through
tests/helpers/dirty_child.py, which sends its userfaultfd over SCM_RIGHTS.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import random
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PAGE,
    PM_PRESENT,
    PM_UFFD_WP,
    WAIT,
    HelperProcess,
    pagemap,
    requires,
    run_in_thread,
)

import uffd
from uffd import Feature, Mode, mem
from uffd.dirty import DirtyRanges, DirtyTracker

pytestmark = requires(Feature.WP_ASYNC, Feature.WP_UNPOPULATED)

_NEEDED = Feature.WP_ASYNC | Feature.WP_UNPOPULATED


def merged(addr: int, pages: Iterable[int], page: int = PAGE) -> list[tuple[int, int]]:
    """The (start, length) ranges ``collect()`` should report for these page indices."""
    out: list[tuple[int, int]] = []
    for p in sorted(set(pages)):
        start = addr + p * page
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + page)
        else:
            out.append((start, page))
    return out


def flat(ranges: Iterable[tuple[int, int]]) -> array[int]:
    """The flat ``array('Q')`` (start, length, start, length, ...) of ``ranges``."""
    return array("Q", itertools.chain.from_iterable(ranges))


def pages_of(addr: int, ranges: Iterable[tuple[int, int]], page: int = PAGE) -> list[int]:
    """Page indices (from ``addr``) covered by ``ranges``, with repeats."""
    return [(start - addr) // page + i for start, length in ranges for i in range(length // page)]


def open_fds() -> set[str]:
    """The fd numbers open in this process."""
    return set(os.listdir("/proc/self/fd"))


def write_pages(region: mem.Region, pages: Iterable[int], rng: random.Random) -> None:
    """Write one byte at a random offset inside each page."""
    for p in pages:
        region.write(p * region.page_size + rng.randrange(region.page_size), b"\xa5")


@pytest.fixture
def tracker() -> Iterator[Callable[..., DirtyTracker]]:
    """Factory: ``tracker(target, **kwargs)`` -> a started DirtyTracker, stopped at teardown."""
    made: list[DirtyTracker] = []

    def make(target: Any, **kwargs: Any) -> DirtyTracker:
        t = DirtyTracker(target, **kwargs)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.stop()


# -- what is reported ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_collect_reports_exactly_the_written_pages(kind, region_factory, tracker):
    """Random written pages come back as sorted, merged ranges; a second collect is empty."""
    region = region_factory(kind, pages=256)
    region.touch(0, region.length, write=True)  # populated before start: not reported
    rng = random.Random(f"exact-{kind}")
    t = tracker(region)
    written = rng.sample(range(256), 90)
    write_pages(region, written, rng)
    got = t.collect()
    assert got == merged(region.addr, written)
    assert any(length > PAGE for _, length in got), "the pattern should contain adjacent pages"
    assert t.collect() == []


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_each_write_is_reported_by_exactly_the_next_collect(kind, region_factory, tracker):
    """Over several rounds each collect reports exactly that round's writes, overlaps included."""
    region = region_factory(kind, pages=128)
    rng = random.Random(f"rounds-{kind}")
    t = tracker(region)
    for _ in range(6):
        written = rng.sample(range(128), rng.randrange(1, 64))
        write_pages(region, written, rng)
        write_pages(region, written[:5], rng)  # written twice in a round: still once
        assert t.collect() == merged(region.addr, written)
    assert t.collect() == []


def test_first_write_to_an_untouched_page_is_reported(anon_region, tracker):
    """With WP_UNPOPULATED a write to a never-populated anon page is reported."""
    assert not pagemap(anon_region.addr + 2 * PAGE) & PM_PRESENT
    t = tracker(anon_region)
    assert pagemap(anon_region.addr + 2 * PAGE) & PM_UFFD_WP, "start() should leave a marker"
    anon_region.write(2 * PAGE + 7, b"x")
    assert t.collect() == [(anon_region.addr + 2 * PAGE, PAGE)]
    assert t.collect() == []


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_reads_are_not_reported(kind, region_factory, tracker):
    """Reading untouched and populated pages reports nothing; a later write still does."""
    region = region_factory(kind, pages=16)
    region.touch(0, 8 * PAGE, write=True)
    t = tracker(region)
    region.touch(0, region.length)
    assert region.read(0, region.length) == b"\0" * region.length
    assert t.collect() == []
    region.write(12 * PAGE, b"w")
    assert t.collect() == [(region.addr + 12 * PAGE, PAGE)]


def test_many_ranges_span_several_scan_calls(region_factory, tracker):
    """More ranges than one scan buffer holds (4096) are all reported, in order."""
    region = region_factory("anon", pages=20000)
    t = tracker(region)
    written = range(0, 20000, 2)
    write_pages(region, written, random.Random("many"))
    assert t.collect() == merged(region.addr, written)
    assert t.collect() == []


# -- DirtyRanges and collect_into --------------------------------------------------


def test_dirty_ranges_behave_like_a_list_of_tuples(region_factory, tracker):
    """A harvest compares, indexes, slices, iterates and counts like the list it replaces."""
    region = region_factory("anon", pages=64)
    t = tracker(region)
    written = [1, 2, 3, 10, 20, 21, 40, 63]
    write_pages(region, written, random.Random("seq"))
    got = t.collect()
    want = merged(region.addr, written)
    assert isinstance(got, DirtyRanges)
    assert got == want and want == got and got == tuple(want)
    assert got != want[:-1] and got != [*want[:-1], (want[-1][0], 2 * PAGE)]
    assert got != "not a list"
    assert len(got) == len(want) == 5 and got
    assert list(got) == want and list(reversed(got)) == want[::-1]
    assert [got[i] for i in range(-5, 5)] == want[-5:] + want
    for index in (slice(None), slice(1, 4), slice(-2, None), slice(None, None, -2), slice(9, 12)):
        assert got[index] == want[index], index
    for bad in (5, -6):
        with pytest.raises(IndexError, match="out of range"):
            got[bad]
    assert want[2] in got and (region.addr, PAGE) not in got and got.index(want[3]) == 3
    assert got.array == flat(want) and got.array.typecode == "Q"
    assert got.bytes == len(written) * PAGE
    assert list(got.pages(PAGE)) == [region.addr + p * PAGE for p in written]
    assert repr(got).startswith(f"<uffd.dirty.DirtyRanges 5 ranges, {len(written) * PAGE} bytes")
    assert f"({want[0][0]:#x}, {3 * PAGE})" in repr(got) and "1 more" in repr(got)
    with pytest.raises(TypeError):
        hash(got)


def test_empty_dirty_ranges():
    """DirtyRanges() is an empty, falsy sequence; pages() refuses a non-positive page size."""
    empty = DirtyRanges()
    assert empty == [] and not empty and len(empty) == 0 and empty.bytes == 0
    assert list(empty) == [] and list(empty.pages(PAGE)) == [] and empty[:] == []
    assert empty.array == array("Q")
    with pytest.raises(ValueError, match="page_size must be positive"):
        list(empty.pages(0))
    with pytest.raises(IndexError):
        empty[0]


def test_collect_into_writes_in_place_when_it_fits(region_factory, tracker):
    """collect_into returns out itself and writes its array in place, growing nothing that fits."""
    region = region_factory("anon", pages=1024)
    t = tracker(region)
    rng = random.Random("into")
    out = DirtyRanges()
    storage = out.array
    first = range(0, 1024, 2)  # 512 ranges: 8 KiB of storage, out of pymalloc's range
    write_pages(region, first, rng)
    assert t.collect_into(out) is out
    assert out.array is storage and out == merged(region.addr, first)
    address = storage.buffer_info()[0]
    second = range(1, 1024, 2)  # as many ranges: the same storage, rewritten
    write_pages(region, second, rng)
    assert t.collect_into(out) is out
    assert out.array is storage and storage.buffer_info()[0] == address
    assert out == merged(region.addr, second) and out.bytes == 512 * PAGE
    third = rng.sample(range(1024), 100)  # fewer: shortened to what was found
    write_pages(region, third, rng)
    assert t.collect_into(out) == merged(region.addr, third) and out.array is storage
    assert len(storage) == 2 * len(out)
    assert t.collect_into(out) == [] and out.array is storage and out.bytes == 0


def test_collect_into_grows_when_it_does_not_fit(region_factory, tracker, monkeypatch):
    """A harvest larger than out and than the spill buffer lands whole, over several rounds."""
    monkeypatch.setattr(uffd.dirty, "_SPILL_RANGES", 100)  # 100 ranges a round, for the start()
    region = region_factory("anon", pages=2048)
    t = tracker(region)
    rng = random.Random("grow")
    out = DirtyRanges()
    storage = out.array
    write_pages(region, [7, 8, 9], rng)
    assert t.collect_into(out) == [(region.addr + 7 * PAGE, 3 * PAGE)]
    written = [p for p in range(2048) if p % 3 != 1]  # 683 ranges of one or two pages
    write_pages(region, written, rng)
    assert t.collect_into(out) is out and out.array is storage
    assert storage == flat(merged(region.addr, written)) and out.bytes == len(written) * PAGE
    write_pages(region, written, rng)
    fresh = t.collect()
    assert fresh == out and fresh.array == storage and fresh.array is not storage


def test_collect_into_refuses_what_it_cannot_fill(region_factory, tracker):
    """A non-DirtyRanges raises TypeError; an exported array ValueError, and nothing is lost."""
    region = region_factory("anon", pages=16)
    t = tracker(region)
    region.write(3 * PAGE, b"e")
    with pytest.raises(TypeError, match="must be a DirtyRanges, not list"):
        t.collect_into([])  # type: ignore[arg-type]
    out = DirtyRanges()
    with memoryview(out.array), pytest.raises(ValueError, match="exported"):
        t.collect_into(out)
    assert out == [] and t.collect_into(out) == [(region.addr + 3 * PAGE, PAGE)]
    t.stop()
    with pytest.raises(ValueError, match="stopped"):
        t.collect_into(out)


@pytest.mark.parametrize(
    "pattern",
    ["every-other", "runs", "all"],
)
def test_large_harvest_matches_a_python_expectation(region_factory, tracker, pattern):
    """A 64 MiB harvest equals, range by range, what a pure-Python scan of the writes predicts."""
    pages = (64 << 20) // PAGE
    region = region_factory("anon", pages=pages)
    rng = random.Random(f"large-{pattern}")
    if pattern == "every-other":
        written: list[int] = list(range(0, pages, 2))
    elif pattern == "runs":  # random runs of 1-600 pages, crossing 2 MiB boundaries
        written, p = [], rng.randrange(16)
        while p < pages:
            run = rng.randrange(1, 600)
            written.extend(range(p, min(p + run, pages)))
            p += run + rng.randrange(1, 40)
    else:
        written = list(range(pages))
    t = tracker(region)
    write_pages(region, written, rng)
    got = t.collect()
    want = merged(region.addr, written)
    assert len(got) == len(want) and got.array == flat(want)
    assert got.bytes == len(written) * PAGE
    assert t.collect() == []


def test_hugetlb_pages_are_tracked_whole(region_factory, tracker):
    """On hugetlb a write reports its whole huge page; reading an untouched one reports nothing."""
    region = region_factory("hugetlb", pages=4)
    size = region.page_size
    t = tracker(region)
    region.read(0, 16)
    region.write(2 * size + 100, b"h")
    got = t.collect()
    assert got == [(region.addr + 2 * size, size)]
    assert list(got.pages(size)) == [region.addr + 2 * size]
    assert got.bytes == size
    assert t.collect() == []


@pytest.mark.parametrize("into", [False, True], ids=["collect", "collect_into"])
def test_concurrent_writer_loses_nothing(region_factory, tracker, into):
    """Each write racing with a harvest is reported by the harvests around it; none is lost."""
    region = region_factory("anon", pages=2048)
    order = random.Random("writer").sample(range(2048), 1536)
    t = tracker(region)
    out = DirtyRanges()

    def harvest() -> list[int]:
        return pages_of(region.addr, t.collect_into(out) if into else t.collect())

    late_flag = threading.Event()
    collects: list[list[int]] = []  # pages reported by each collect, in call order
    spans: dict[int, tuple[int, int]] = {}  # page -> collects returned before/after its write

    def writer() -> None:
        for i, page in enumerate(order):
            if i == 3 * len(order) // 4:
                # The last quarter starts after the main loop's last collect.
                assert late_flag.wait(WAIT)
            before = len(collects)
            region.write(page * PAGE, b"\x01")
            spans[page] = (before, len(collects))
            if i % 32 == 0:
                time.sleep(0)

    thread = run_in_thread(writer)
    deadline = time.monotonic() + WAIT
    while len(spans) < len(order) // 2:
        assert time.monotonic() < deadline, f"writer stuck after {len(spans)} pages"
        collects.append(harvest())
        time.sleep(0.0002)  # let the writer have the GIL
    collects.append(harvest())
    last_loop = len(collects)
    late_flag.set()
    thread.finish()
    collects.append(harvest())
    assert harvest() == []

    seen: dict[int, list[int]] = collections.defaultdict(list)
    for k, pages in enumerate(collects):
        for page in pages:
            seen[page].append(k)
    assert set(seen) == set(order), "a written page was never reported, or an unwritten one was"
    for page, (before, after) in spans.items():
        ks = seen[page]
        # No collect that returned before the write began reports it; the first
        # one to scan the page after the store landed does, and that is at most
        # one past the last that returned before the write finished. A collect
        # racing with the write fault may report it early as well: the kernel
        # grants write access before the store lands, and a store that finds the
        # page protected again faults again.
        assert before <= ks[0] and ks[-1] <= after + 1, (page, before, after, ks)
    late = [page for page, (before, _) in spans.items() if before == last_loop]
    assert late and set(late) <= set(collects[-1])


def test_stop_from_another_thread_waits_for_the_harvest(region_factory, monkeypatch):
    """stop() during a harvest in another thread lets it finish whole; the next one refuses."""
    # One range per round trip to C: a harvest of 2048 ranges takes 2048
    # scan calls, so the stop() lands in the middle of one.
    monkeypatch.setattr(uffd.dirty, "_SPILL_RANGES", 1)
    region = region_factory("anon", pages=4096)
    every_other = range(0, 4096, 2)
    t = DirtyTracker(region)
    t.start()
    write_pages(region, every_other, random.Random("stop"))
    harvesting, stopped = threading.Event(), threading.Event()

    def harvester() -> DirtyRanges:
        harvesting.set()
        got = t.collect()
        assert stopped.wait(WAIT)
        with pytest.raises(ValueError, match="stopped"):
            t.collect()
        return got

    thread = run_in_thread(harvester)
    assert harvesting.wait(WAIT)
    t.stop()
    stopped.set()
    assert thread.finish() == merged(region.addr, every_other)


# -- another process -------------------------------------------------------------------


class Child(HelperProcess):
    """Drives tests/helpers/dirty_child.py: its memory, its userfaultfd, its pid."""

    def __init__(self, pages: int) -> None:
        super().__init__("dirty_child.py", str(pages))
        self.addr, self.length, self.pid = (
            self.header["addr"],
            self.header["length"],
            self.header["pid"],
        )

    def access(self, write: Iterable[int] = (), read: Iterable[int] = ()) -> None:
        """Have the child write (or read) one byte in each page; returns once done."""
        command = {"write": list(write), "read": list(read)}
        self.sock.sendall(json.dumps(command).encode() + b"\n")
        answer = json.loads(self.lines.readline())
        assert answer == {"ok": len(command["write"]) + len(command["read"])}

    def exit(self) -> None:
        """Tell the child to exit; return once it is a zombie (not reaped yet)."""
        self.sock.sendall(b'{"exit": 0}\n')
        deadline = time.monotonic() + WAIT
        while Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, f"child {self.pid} did not exit"
            time.sleep(0.005)

    def vm_flags(self) -> list[str]:
        """The VmFlags of the child's mapping (``uw``: registered for WP)."""
        smaps = Path(f"/proc/{self.pid}/smaps").read_text()
        block = smaps[smaps.index(f"{self.addr:x}-") :]
        line = next(ln for ln in block.splitlines() if ln.startswith("VmFlags:"))
        return line.split()[1:]


@pytest.fixture
def child() -> Iterator[Child]:
    """A started dirty_child.py with 512 untouched anon pages; reaped at teardown."""
    c = Child(512)
    try:
        yield c
    finally:
        c.close()


def test_tracks_another_process(child, tracker):
    """A tracker fed the child's fd and pid reports exactly the pages the child writes."""
    rng = random.Random("child")
    child.access(write=range(0, 512, 3))  # before start: not reported
    t = tracker((child.addr, child.length), uffd=child.uffd, pid=child.pid)
    assert f"pid={child.pid}" in repr(t)
    assert t.collect() == []
    for _ in range(3):
        written = rng.sample(range(512), 100)
        child.access(write=written)
        assert t.collect() == merged(child.addr, written)
    child.access(read=range(512))
    assert t.collect() == []


def test_collect_after_the_process_exits_raises(child, tracker):
    """Once the tracked process has exited collect() raises ProcessGoneError; stop() works."""
    t = tracker((child.addr, child.length), uffd=child.uffd, pid=child.pid)
    child.access(write=[5])
    child.exit()
    started = time.monotonic()
    with pytest.raises(uffd.ProcessGoneError, match=f"process {child.pid} has exited"):
        t.collect()  # a zombie: its mm is gone already
    assert child.proc.wait(WAIT) == 0
    with pytest.raises(uffd.ProcessGoneError, match=f"process {child.pid} has exited"):
        t.collect()  # reaped
    assert time.monotonic() - started < WAIT
    t.stop()
    assert "stopped" in repr(t)


def test_fd_of_another_process_without_its_pid_is_refused(child):
    """The child's fd with no pid is caught at start(), and its registration undone."""
    t = DirtyTracker((child.addr, child.length), uffd=child.uffd)
    with pytest.raises(uffd.NoMappingError, match="pass pid="):
        t.start()
    assert "uw" not in child.vm_flags(), "the failed start left the child's range registered"
    with DirtyTracker((child.addr, child.length), uffd=child.uffd, pid=child.pid):
        assert "uw" in child.vm_flags()
    assert "uw" not in child.vm_flags()


def test_process_already_gone_is_reported_at_start(uffd_factory):
    """start() for a pid that has exited raises ProcessGoneError."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait(WAIT) == 0
    ufd = uffd_factory(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    t = DirtyTracker((1 << 30, PAGE), uffd=ufd, pid=proc.pid)
    with pytest.raises(uffd.ProcessGoneError, match=f"process {proc.pid} has exited"):
        t.start()


# -- contracts and bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    "delta_addr, length",
    [(1, 4 * PAGE), (0, 4 * PAGE - 1), (PAGE // 2, PAGE), (0, 0), (0, -PAGE)],
)
def test_unaligned_or_empty_target_is_refused(anon_region, delta_addr, length):
    """An (addr, length) that is unaligned or empty raises ValueError before any kernel call."""
    with pytest.raises(ValueError, match=r"page size|positive"):
        DirtyTracker((anon_region.addr + delta_addr, length))


def test_bad_target_type_is_refused():
    """A target that is neither a Region nor an (addr, length) pair raises TypeError."""
    with pytest.raises(TypeError, match="Region or an \\(addr, length\\)"):
        DirtyTracker("0x1000")  # type: ignore[arg-type]


def test_closed_region_or_uffd_is_refused(region_factory, uffd_factory):
    """A closed region or a closed userfaultfd raises ValueError."""
    region = region_factory("anon")
    ufd = uffd_factory(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    ufd.close()
    with pytest.raises(ValueError, match="userfaultfd is closed"):
        DirtyTracker(region, uffd=ufd)
    region.close()
    with pytest.raises(ValueError, match="region is closed"):
        DirtyTracker(region)


@pytest.mark.parametrize("features", [Feature(0), Feature.WP_UNPOPULATED, Feature.WP_ASYNC])
def test_uffd_without_the_features_is_refused(anon_region, uffd_factory, features):
    """A userfaultfd lacking WP_ASYNC or WP_UNPOPULATED raises UnsupportedError naming it."""
    ufd = uffd_factory(features)
    lacking = [f"Feature.{f.name}" for f in Feature if f in ~features & _NEEDED]
    with pytest.raises(uffd.UnsupportedError, match=f"opened without {' and '.join(lacking)}:"):
        DirtyTracker(anon_region, uffd=ufd)


def test_other_pid_needs_its_uffd():
    """A pid of another process without uffd= raises ValueError saying what to pass."""
    with pytest.raises(ValueError, match="needs its userfaultfd"):
        DirtyTracker((1 << 30, PAGE), pid=1)


def test_stop_twice_and_the_states_around_it(anon_region):
    """stop() is idempotent; collect() unstarted or stopped and a second start raise ValueError."""
    t = DirtyTracker(anon_region)
    assert "not started" in repr(t)
    with pytest.raises(ValueError, match="not started"):
        t.collect()
    t.stop()
    t.stop()
    with pytest.raises(ValueError, match="already stopped"):
        t.start()
    t2 = DirtyTracker(anon_region)
    t2.start()
    with pytest.raises(ValueError, match="already started"):
        t2.start()
    t2.stop()
    t2.stop()
    with pytest.raises(ValueError, match="stopped"):
        t2.collect()


def test_context_manager_starts_and_stops(anon_region, uffd_factory):
    """``with`` starts on enter and, on exit, unregisters the range and closes its fds."""
    fds = open_fds()
    with DirtyTracker(anon_region) as t:
        assert "started" in repr(t)
        assert len(open_fds() - fds) == 2  # its userfaultfd and /proc/self/pagemap
        anon_region.write(PAGE, b"c")
        assert t.collect() == [(anon_region.addr + PAGE, PAGE)]
    assert open_fds() == fds
    assert "stopped" in repr(t)
    # The range is free again: another userfaultfd can register it.
    other = uffd_factory(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    other.register(anon_region.addr, anon_region.length, Mode.WP)


def test_given_uffd_stays_open_and_this_pid_means_this_process(anon_region, uffd_factory):
    """A caller's fd is unregistered but not closed by stop(); pid=os.getpid() is the default."""
    ufd = uffd_factory(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    with DirtyTracker(anon_region, uffd=ufd, pid=os.getpid()) as t:
        assert "pid=" not in repr(t)
        anon_region.write(0, b"g")
        assert t.collect() == [(anon_region.addr, PAGE)]
    assert not ufd.closed
    ufd.register(anon_region.addr, anon_region.length, Mode.WP)


def test_unregistered_range_makes_collect_raise(anon_region, uffd_factory):
    """If the range is unregistered under the tracker, collect() raises NoMappingError."""
    ufd = uffd_factory(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    t = DirtyTracker(anon_region, uffd=ufd)
    t.start()
    ufd.unregister(anon_region.addr, anon_region.length)
    with pytest.raises(uffd.NoMappingError, match="no longer registered"):
        t.collect()
    t.stop()


def test_range_registered_elsewhere_fails_start_cleanly(anon_region, uffd_factory):
    """A range already registered on another fd fails start() with EBUSY and leaves no fd open."""
    other = uffd_factory(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    other.register(anon_region.addr, anon_region.length, Mode.WP)
    fds = open_fds()
    t = DirtyTracker(anon_region)
    with pytest.raises(uffd.UffdError, match="EBUSY"):
        t.start()
    assert open_fds() == fds
    assert "not started" in repr(t)
