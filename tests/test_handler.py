"""FaultHandler with the built-in ops: real faults from threads and a forked child, refusals, stats.

Faults are raised by ``Region.read``/``write``/``touch`` (C, GIL released)
from helper threads, or by a child of ``os.fork()`` that the handler adopts
through EVENT_FORK; contents are checked page by page.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from _dispatch_helpers import (
    assert_pages,
    child_copies,
    fork_child,
    page_pattern,
    pattern_buffer,
    read_concurrently,
    run_all,
    stop_raises,
    uffd_vmflags,
    wait_for,
    zeros,
)
from conftest import (
    HAS_PAGEMAP_WP,
    PAGE,
    PM_UFFD_WP,
    WAIT,
    pagemap,
    requires,
    run_in_thread,
    run_toucher,
)

import uffd
from uffd import FaultHandler, Feature, Ioctl, Mode, Resolution, UffdOps, mem
from uffd.modules import BufferOps

Regions = Callable[..., mem.Region]


class MissingOnly(UffdOps):
    """Answers every MISSING fault with whatever ``answer`` holds."""

    def __init__(self, answer: Resolution) -> None:
        self.answer = answer

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return self.answer


# -- built-in ops serve real faults --------------------------------------------


def test_anon_ops_zero_fills_threads(region_factory: Regions) -> None:
    """AnonOps answers MISSING faults from 4 threads with zero pages."""
    region = region_factory("anon", pages=8)
    with FaultHandler() as handler:
        mapping = handler.register(region)
        assert isinstance(mapping.ops, uffd.AnonOps)
        assert_pages(read_concurrently(region), PAGE, zeros(PAGE), "anon")
    counts = handler.stats.total  # after stop(): every fault is counted
    assert counts.faults == {"missing": 8}
    assert counts.resolutions == {"zero": 8}
    assert counts.errors == 0


def test_anon_ops_unprotects_writes(region_factory: Regions) -> None:
    """AnonOps lets writes to write-protected pages through, and the written data lands."""
    region = region_factory("anon", pages=4)
    region.write(0, pattern_buffer(4, PAGE, salt=1))
    with FaultHandler() as handler:
        handler.register(region, Mode.WP)
        handler.uffd.writeprotect(region.addr, region.length, True)
        run_all([lambda i=i: region.write(i * PAGE, page_pattern(i, PAGE, 2)) for i in range(4)])
    counts = handler.stats.total
    assert_pages(region.read(0, region.length), PAGE, lambda i: page_pattern(i, PAGE, 2), "anon wp")
    assert counts.faults == {"wp": 4}
    assert counts.resolutions == {"unprotect": 4}


def test_shmem_ops_minor_continues(region_factory: Regions, track_region: Callable) -> None:
    """ShmemOps CONTINUEs MINOR faults: threads see what was written through the alias."""
    region = region_factory("shmem", pages=8)
    alias = track_region(region.alias())
    alias.write(0, pattern_buffer(8, PAGE))
    with FaultHandler() as handler:
        mapping = handler.register(region, Mode.MINOR)
        assert mapping.ioctls & Ioctl.CONTINUE
        assert_pages(
            read_concurrently(region), PAGE, lambda i: page_pattern(i, PAGE), "shmem minor"
        )
    counts = handler.stats.total
    assert counts.faults == {"minor": 8}
    assert counts.resolutions == {"continue": 8}


def test_shmem_ops_missing_zero_fills(region_factory: Regions) -> None:
    """ShmemOps zero-fills MISSING faults of a shared memfd."""
    region = region_factory("shmem", pages=4)
    with FaultHandler() as handler:
        handler.register(region, Mode.MISSING)
        assert_pages(read_concurrently(region), PAGE, zeros(PAGE), "shmem missing")
    assert handler.stats.total.resolutions == {"zero": 4}


@pytest.mark.parametrize("mode", [Mode.MISSING, Mode.MINOR], ids=["missing", "minor"])
def test_hugetlb_ops(mode: Mode, region_factory: Regions, track_region: Callable) -> None:
    """HugetlbOps serves MISSING (a copy of zeros: no ZEROPAGE) and MINOR faults on huge pages."""
    region = region_factory("hugetlb", pages=2)
    size = region.page_size
    if mode == Mode.MINOR:
        track_region(region.alias()).write(0, pattern_buffer(2, size))

    def expect(i: int) -> bytes:
        return page_pattern(i, size) if mode == Mode.MINOR else bytes(size)

    with FaultHandler() as handler:
        mapping = handler.register(region, mode)
        assert not mapping.ioctls & Ioctl.ZEROPAGE
        assert_pages(read_concurrently(region, nthreads=2), size, expect, "hugetlb")
    counts = handler.stats.total
    assert sum(counts.faults.values()) == 2
    assert counts.resolutions == {"zero" if mode == Mode.MISSING else "continue": 2}


# -- built-in ops serve a forked child -----------------------------------------


def test_anon_ops_serve_forked_child(region_factory: Regions) -> None:
    """A forked child's MISSING faults reach the parent's handler on the child's fd."""
    region = region_factory("anon", pages=4)
    with FaultHandler(features=Feature.EVENT_FORK) as handler:
        handler.register(region)
        region.write(0, page_pattern(0, PAGE))  # populated before the fork: copied
        data = fork_child(lambda: region.read(0, region.length))
        assert_pages(
            data, PAGE, lambda i: page_pattern(0, PAGE) if i == 0 else bytes(PAGE), "child"
        )
        (copy,) = wait_for(lambda: child_copies(handler, region), "the child's mapping")
        assert copy.ops is handler.mappings[0].ops
    assert copy.stats.faults == {"missing": 3}  # the child's 3 unpopulated pages
    assert handler.stats.total.faults == {"missing": 4}


def test_shmem_ops_serve_forked_child(region_factory: Regions, track_region: Callable) -> None:
    """A forked child's MINOR faults on shared shmem are CONTINUEd on its fd."""
    region = region_factory("shmem", pages=4)
    track_region(region.alias()).write(0, pattern_buffer(4, PAGE))
    with FaultHandler(features=Feature.EVENT_FORK) as handler:
        handler.register(region, Mode.MINOR)
        data = fork_child(lambda: region.read(0, region.length))
        assert_pages(data, PAGE, lambda i: page_pattern(i, PAGE), "child")
        (copy,) = wait_for(lambda: child_copies(handler, region), "the child's mapping")
    assert copy.stats.resolutions == {"continue": 4}


def test_hugetlb_ops_serve_forked_child(region_factory: Regions) -> None:
    """A forked child's MISSING fault on a huge page gets zeros; a page filled before is shared."""
    region = region_factory("hugetlb", pages=2)
    size = region.page_size
    with FaultHandler(features=Feature.EVENT_FORK) as handler:
        handler.register(region)
        region.write(0, page_pattern(0, size))
        data = fork_child(lambda: region.read(0, region.length))
        assert_pages(
            data, size, lambda i: page_pattern(0, size) if i == 0 else bytes(size), "child"
        )
        (copy,) = wait_for(lambda: child_copies(handler, region), "the child's mapping")
    assert copy.stats.faults == {"missing": 1}


# -- refusals before the kernel is called ---------------------------------------


def test_ops_refuses_mode_it_lacks(region_factory: Regions) -> None:
    """AnonOps + MINOR and a MISSING-only ops + WP are refused by the ops; nothing is registered."""
    region = region_factory("anon", pages=1)
    with FaultHandler() as handler:
        with pytest.raises(uffd.UnsupportedError) as info:
            handler.register(region, Mode.MINOR)
        assert "AnonOps refused" in str(info.value)
        assert "MINOR" in str(info.value)
        with pytest.raises(uffd.UnsupportedError) as info:
            handler.register(region, Mode.WP, MissingOnly(Resolution.zero()))
        message = str(info.value)
        assert "MissingOnly refused" in message
        assert "WP" in message
        assert "features derive from its handle_* methods" in message
        assert uffd_vmflags(region.addr) == set()
        assert handler.mappings == []


def test_unnegotiated_feature_refused(region_factory: Regions) -> None:
    """Without auto_features, shmem MINOR is refused: MINOR_SHMEM was not negotiated."""
    region = region_factory("shmem", pages=1)
    with FaultHandler(auto_features=False) as handler:
        assert not handler.features & Feature.MINOR_SHMEM
        with pytest.raises(uffd.UnsupportedError) as info:
            handler.register(region, Mode.MINOR)
        message = str(info.value)
        assert "did not negotiate" in message
        assert "MINOR_SHMEM" in message
        assert "pass it in features=" in message
        assert uffd_vmflags(region.addr) == set()


@pytest.mark.parametrize("fallback", ["zero", "sigbus"])
@pytest.mark.parametrize(
    ("answer", "ioctl"),
    [(Resolution.continue_(), "CONTINUE"), (Resolution.unprotect(), "WRITEPROTECT")],
    ids=["continue", "unprotect"],
)
def test_unhonoured_ioctl_takes_fallback(
    answer: Resolution, ioctl: str, fallback: str, region_factory: Regions
) -> None:
    """A resolution needing an unhonoured ioctl gets the fallback; stop() names the ioctl."""
    region = region_factory("anon", pages=1)
    handler = FaultHandler(fallback=fallback).start()
    mapping = handler.register(region, Mode.MISSING, MissingOnly(answer))
    assert not mapping.ioctls & Ioctl[ioctl]
    reader = run_toucher(region, 0, 8, read=True)
    if fallback == "zero":
        assert reader.finish() == bytes(8)
    else:
        with pytest.raises(uffd.PageAccessError):
            reader.finish()
    error = stop_raises(
        handler, uffd.UnsupportedError, "MissingOnly answered", ioctl, "not honoured"
    )
    assert error.errno is not None
    assert handler.stats.total.errors == 1


def test_poison_without_feature(region_factory: Regions) -> None:
    """Resolution.poison() without POISON negotiated is refused before the ioctl; reads zeros."""
    region = region_factory("anon", pages=1)
    handler = FaultHandler(auto_features=False).start()
    mapping = handler.register(region, Mode.MISSING, MissingOnly(Resolution.poison()))
    assert mapping.ioctls & Ioctl.POISON  # granted by the kernel, yet unusable
    assert run_toucher(region, 0, 8, read=True).finish() == bytes(8)
    stop_raises(handler, uffd.UnsupportedError, "POISON was not negotiated")


# -- resolutions on write-protected and present pages ---------------------------


class CopyKeepWp(UffdOps):
    """MISSING: the pattern page, installed write-protected; WP: unprotect (counted)."""

    def __init__(self, wrap: Callable[[bytes], object]) -> None:
        self.wrap = wrap

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.copy(self.wrap(page_pattern(0, PAGE)), keep_wp=True)

    def handle_wp(self, fault: uffd.Fault) -> Resolution:
        return Resolution.unprotect()


@requires(Feature.PAGEFAULT_FLAG_WP)
@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=lambda w: w.__name__)
def test_copy_keep_wp_installs_protected_for_every_buffer_type(
    wrap: Callable[[bytes], object], region_factory: Regions
) -> None:
    """copy(keep_wp=True) leaves the page write-protected whatever buffer type carries it."""
    region = region_factory("anon", pages=1)
    with FaultHandler() as handler:
        handler.register(region, Mode.MISSING | Mode.WP, CopyKeepWp(wrap))
        assert run_toucher(region, 0, PAGE, read=True).finish() == page_pattern(0, PAGE)
        if HAS_PAGEMAP_WP:
            assert pagemap(region.addr) & PM_UFFD_WP
        run_toucher(region, 0, 8, write=True).finish()
    assert handler.stats.total.faults == {"missing": 1, "wp": 1}
    assert handler.stats.total.resolutions == {"copy": 1, "unprotect": 1}


class WpAnswers(UffdOps):
    """WP faults get ``answer``."""

    def __init__(self, answer: Resolution) -> None:
        self.answer = answer

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.zero()

    def handle_wp(self, fault: uffd.Fault) -> Resolution:
        return self.answer


@requires(Feature.PAGEFAULT_FLAG_WP)
def test_wp_copy_on_present_page_copies_then_unprotects(region_factory: Regions) -> None:
    """handle_wp returning copy(data) on a present page: the page becomes data, then the
    write lands on it (copy-then-unprotect), once."""
    region = region_factory("anon", pages=1)
    region.write(0, page_pattern(0, PAGE, salt=1))
    new = page_pattern(0, PAGE, salt=2)
    with FaultHandler() as handler:
        handler.register(region, Mode.WP, WpAnswers(Resolution.copy(new)))
        handler.uffd.writeprotect(region.addr, region.length, True)
        run_in_thread(region.write, 0, b"written!").finish()
        if HAS_PAGEMAP_WP:
            assert not pagemap(region.addr) & PM_UFFD_WP
    assert region.read(0, PAGE) == b"written!" + new[8:]
    assert handler.stats.total.faults == {"wp": 1}
    assert handler.stats.total.resolutions == {"copy": 1}


@requires(Feature.PAGEFAULT_FLAG_WP)
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (Resolution.copy(bytes(PAGE), keep_wp=True), "fault again forever"),
        (Resolution.zero(), "the page is present"),
    ],
    ids=["copy-keep-wp", "zero"],
)
def test_wp_answers_that_cannot_resolve_take_the_fallback(
    answer: Resolution, message: str, region_factory: Regions
) -> None:
    """A WP answer that would leave the page protected is an error, not a livelock: the
    fallback unprotects, the write lands, stop() names the cause."""
    region = region_factory("anon", pages=1)
    region.write(0, page_pattern(0, PAGE, salt=1))
    handler = FaultHandler().start()
    handler.register(region, Mode.WP, WpAnswers(answer))
    handler.uffd.writeprotect(region.addr, region.length, True)
    run_in_thread(region.write, 0, b"written!").finish()
    stop_raises(handler, uffd.UnsupportedError, message)
    assert region.read(0, PAGE) == b"written!" + page_pattern(0, PAGE, salt=1)[8:]
    assert handler.stats.total.faults == {"wp": 1}
    assert handler.stats.total.errors == 1


class MinorCopies(UffdOps):
    """MINOR faults answered with a copy, which cannot resolve them (the page is cached)."""

    def handle_continue(self, fault: uffd.Fault) -> Resolution:
        return Resolution.copy(bytes(PAGE))


@requires(Feature.MINOR_SHMEM)
def test_minor_copy_takes_the_fallback(region_factory: Regions, track_region: Callable) -> None:
    """copy() for a MINOR fault meets EEXIST: an error naming continue_(), and the "zero"
    fallback CONTINUEs, so the reader sees the page cache, not a livelock."""
    region = region_factory("shmem", pages=1)
    alias = track_region(region.alias())
    alias.write(0, page_pattern(0, PAGE))
    handler = FaultHandler(fallback="zero").start()
    handler.register(region, Mode.MINOR, MinorCopies())
    assert run_toucher(region, 0, PAGE, read=True).finish() == page_pattern(0, PAGE)
    stop_raises(handler, uffd.UnsupportedError, "page is present", "continue_()")
    assert handler.stats.total.faults == {"minor": 1}


# -- kernel outcomes of a resolution -------------------------------------------


class InstallsFirst(UffdOps):
    """Installs ``first`` itself (as a prefetch would), then answers with ``second``: EEXIST."""

    def __init__(self, first: bytes, second: bytes) -> None:
        self.first, self.second = first, second
        self.handler: FaultHandler | None = None

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        assert self.handler is not None
        assert self.handler.install(fault.mapping, fault.offset, self.first) == PAGE
        return Resolution.copy(self.second)


def test_eexist_is_resolved_and_the_thread_woken(region_factory: Regions) -> None:
    """A copy that meets EEXIST (the page was installed meanwhile) counts as resolved: the
    thread is woken and sees the page that won, no error."""
    region = region_factory("anon", pages=1)
    ops = InstallsFirst(page_pattern(0, PAGE, salt=1), page_pattern(0, PAGE, salt=2))
    with FaultHandler() as handler:
        ops.handler = handler
        handler.register(region, Mode.MISSING, ops)
        assert run_toucher(region, 0, PAGE, read=True).finish() == page_pattern(0, PAGE, salt=1)
    assert handler.stats.total.resolutions == {"copy": 1}
    assert handler.stats.total.errors == 0


class UnregistersFirst(UffdOps):
    """Unregisters the mapping (as a racing unregister would), then answers: ENOENT."""

    def __init__(self) -> None:
        self.handler: FaultHandler | None = None

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        assert self.handler is not None
        self.handler.unregister(fault.mapping)
        return Resolution.copy(page_pattern(0, PAGE))


def test_enoent_wakes_the_thread_onto_plain_memory(region_factory: Regions) -> None:
    """A copy into a range unregistered meanwhile meets ENOENT: the thread is woken and faults
    again on plain memory (a zero page), no error, nothing installed."""
    region = region_factory("anon", pages=1)
    ops = UnregistersFirst()
    with FaultHandler() as handler:
        ops.handler = handler
        handler.register(region, Mode.MISSING, ops)
        assert run_toucher(region, 0, PAGE, read=True).finish() == bytes(PAGE)
        assert handler.mappings == []
    assert handler.stats.total.errors == 0


# -- stats ----------------------------------------------------------------------


def test_stats_per_mapping_and_total(region_factory: Regions, track_region: Callable) -> None:
    """stats count faults and resolutions by kind per mapping and in total, errors, latencies."""
    anon = region_factory("anon", pages=4)
    shm = region_factory("shmem", pages=3)
    track_region(shm.alias()).write(0, pattern_buffer(3, PAGE))
    buffer = pattern_buffer(4, PAGE)

    class FailsPage2(BufferOps):
        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            if fault.offset == 2 * PAGE:
                raise RuntimeError("page 2 is broken")
            return super().handle_missing(fault)

    handler = FaultHandler(fallback="zero").start()
    a = handler.register(anon, Mode.MISSING, FailsPage2(buffer, native=False))
    b = handler.register(shm, Mode.MINOR)
    read_concurrently(anon)
    read_concurrently(shm, nthreads=3)
    # A reader is woken before its fault is counted: wait for the last count.
    wait_for(lambda: sum(handler.stats.total.latency_us_log2) == 7, "7 counted faults")
    stats = handler.stats
    assert set(stats.per_mapping) == {(a.start, a.end), (b.start, b.end)}
    pa, pb = stats.per_mapping[(a.start, a.end)], stats.per_mapping[(b.start, b.end)]
    assert pa.faults == {"missing": 4}
    assert pa.resolutions == {"copy": 3, "fallback-zero": 1}
    assert pa.errors == 1
    assert pb.faults == {"minor": 3}
    assert pb.resolutions == {"continue": 3}
    assert pb.errors == 0
    assert stats.total.faults == {"missing": 4, "minor": 3}
    assert stats.total.errors == 1
    for counters in (pa, pb, stats.total):
        assert sum(counters.latency_us_log2) == sum(counters.faults.values())
    assert stats.total.percentile_us(0.5) > 0
    assert stats.native_faults == 0
    assert stats.expired == 0
    stop_raises(handler, RuntimeError, "page 2 is broken")


# -- several mappings, several handlers ------------------------------------------


def test_several_mappings_one_handler(region_factory: Regions, track_region: Callable) -> None:
    """One handler serves three mappings with three ops, faulted at once from many threads."""
    zero = region_factory("anon", pages=4)
    buf = region_factory("anon", pages=4)
    minor = region_factory("shmem", pages=4)
    track_region(minor.alias()).write(0, pattern_buffer(4, PAGE, salt=7))
    with FaultHandler() as handler:
        handler.register(zero)
        handler.register(
            buf, Mode.MISSING, BufferOps(pattern_buffer(4, PAGE, salt=3), native=False)
        )
        handler.register(minor, Mode.MINOR)
        assert [m.start for m in handler.mappings] == sorted([zero.addr, buf.addr, minor.addr])
        got = run_all([lambda r=r: read_concurrently(r) for r in (zero, buf, minor)])
    assert_pages(got[0], PAGE, zeros(PAGE), "anon")
    assert_pages(got[1], PAGE, lambda i: page_pattern(i, PAGE, 3), "buffer")
    assert_pages(got[2], PAGE, lambda i: page_pattern(i, PAGE, 7), "minor")


def test_two_handlers_concurrently(region_factory: Regions) -> None:
    """Two FaultHandlers in one process each serve their own region, at the same time."""
    regions = [region_factory("anon", pages=8) for _ in range(2)]
    handlers = [FaultHandler().start() for _ in range(2)]
    try:
        for salt, (handler, region) in enumerate(zip(handlers, regions, strict=True)):
            handler.register(
                region, Mode.MISSING, BufferOps(pattern_buffer(8, PAGE, salt), native=False)
            )
        barrier = threading.Barrier(2, timeout=WAIT)

        def both(region: mem.Region) -> bytes:
            barrier.wait()
            return read_concurrently(region)

        got = run_all([lambda r=r: both(r) for r in regions])
        for salt, data in enumerate(got):
            assert_pages(data, PAGE, lambda i, s=salt: page_pattern(i, PAGE, s), f"handler {salt}")
    finally:
        for handler in handlers:
            handler.stop()
    for handler in handlers:
        assert handler.stats.total.resolutions == {"copy": 8}
