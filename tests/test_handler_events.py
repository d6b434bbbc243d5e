"""Non-cooperative events while serving: fork, mremap, MADV_DONTNEED/MADV_REMOVE, munmap.

The handler negotiates EVENT_FORK|EVENT_REMAP|EVENT_REMOVE|EVENT_UNMAP; each
syscall that raises an event blocks until the event is read (by the C pump,
without the GIL), so each runs in a helper thread joined with a bound. The
mapping table is checked after each event, then faults show it is obeyed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from _dispatch_helpers import (
    assert_pages,
    child_copies,
    fork_child,
    page_pattern,
    pattern_buffer,
    uffd_vmflags,
    wait_for,
)
from conftest import PAGE, run_in_thread
from uffd._native import ffi, lib

from uffd import FaultHandler, Feature, Mode, mem
from uffd.modules import BufferOps

Regions = Callable[..., mem.Region]
EVENTS = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE | Feature.EVENT_UNMAP
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def spans(handler: FaultHandler) -> list[tuple[int, int]]:
    """The handler's own (not forked children's) mappings as (start, end)."""
    return [(m.start, m.end) for m in handler.mappings if m._uffd is handler.uffd]


def pattern_at(offset: int = 0) -> Callable[[int], bytes]:
    """expect() for pages read from a buffer mapping starting ``offset`` pages in."""
    return lambda i: page_pattern(offset + i, PAGE)


@pytest.fixture
def served(region_factory: Regions) -> Iterator[Callable[..., tuple[FaultHandler, mem.Region]]]:
    """Factory: (handler with all events, started; a region of ``pages`` served from a pattern)."""
    handlers: list[FaultHandler] = []

    def make(kind: str = "anon", pages: int = 4, native: bool = False) -> tuple:
        region = region_factory(kind, pages=pages)
        handler = FaultHandler(features=EVENTS).start()
        handlers.append(handler)
        handler.register(
            region, Mode.MISSING, BufferOps(pattern_buffer(pages, PAGE), native=native)
        )
        return handler, region

    yield make
    for handler in handlers:
        handler.stop()


def test_fork_copies_every_mapping(region_factory: Regions) -> None:
    """A fork copies each of the parent's mappings onto the child's one fd, and serves it there."""
    a = region_factory("anon", pages=2)
    b = region_factory("anon", pages=3)
    with FaultHandler(features=EVENTS) as handler:
        handler.register(a, Mode.MISSING, BufferOps(pattern_buffer(2, PAGE)))
        handler.register(b)
        assert handler.features & EVENTS == EVENTS
        data = fork_child(lambda: a.read(0, a.length) + b.read(0, b.length))
        (ca,) = wait_for(lambda: child_copies(handler, a), "the copy of a")
        (cb,) = wait_for(lambda: child_copies(handler, b), "the copy of b")
        assert ca._uffd is cb._uffd
        assert ca._uffd.features == handler.uffd.features
        assert len(handler.mappings) == 4
        assert spans(handler) == sorted([(a.addr, a.addr + a.length), (b.addr, b.addr + b.length)])
    assert_pages(data[: a.length], PAGE, pattern_at(), "a in the child")
    assert data[a.length :] == bytes(b.length)
    assert sum(cb.stats.faults.values()) == 3


@NATIVE
def test_mremap_moves_mapping(native: bool, served: Callable) -> None:
    """After mremap the table holds the new address and faults there get the right offsets."""
    handler, region = served(native=native)
    (mapping,) = handler.mappings
    first = region.read(0, PAGE)  # populated before the move: moves with the mapping
    old = run_in_thread(region.mremap).finish()
    assert region.addr != old
    wait_for(lambda: spans(handler) == [(region.addr, region.addr + region.length)], "the move")
    assert handler.mappings == [mapping]
    assert uffd_vmflags(region.addr) == {"um"}
    assert_pages(first + region.read(PAGE, 3 * PAGE), PAGE, pattern_at(), "moved")
    stats = handler.stats
    if native:
        assert stats.native_faults >= 2
    else:
        wait_for(lambda: sum(mapping.stats.faults.values()) == 4, "4 faults on the moved mapping")


@NATIVE
def test_madv_dontneed_drops_range(native: bool, served: Callable) -> None:
    """MADV_DONTNEED unregisters the range: it leaves the table and later reads there get zeros."""
    handler, region = served(pages=6, native=native)
    start = region.addr
    assert_pages(region.read(0, 3 * PAGE), PAGE, pattern_at(), "before")
    run_in_thread(region.madvise, lib.MADV_DONTNEED, PAGE, 2 * PAGE).finish()
    want = [(start, start + PAGE), (start + 3 * PAGE, start + 6 * PAGE)]
    wait_for(lambda: spans(handler) == want, "the split table")
    assert uffd_vmflags(start + PAGE) == set()
    assert uffd_vmflags(start) == {"um"}
    # Pages 3-5 fault now, in the tail piece: served at their offsets in the registered range.
    data = region.read(0, region.length)
    expect = [page_pattern(0, PAGE), bytes(PAGE), bytes(PAGE)] + [
        page_pattern(i, PAGE) for i in (3, 4, 5)
    ]
    assert_pages(data, PAGE, expect.__getitem__, "after")
    run_in_thread(region.madvise, lib.MADV_DONTNEED, 3 * PAGE, PAGE).finish()
    wait_for(lambda: spans(handler) == [want[0], (start + 4 * PAGE, start + 6 * PAGE)], "page 3")
    assert region.read(3 * PAGE, PAGE) == bytes(PAGE)


def test_madv_remove_on_shmem(served: Callable, track_region: Callable) -> None:
    """MADV_REMOVE punches shmem pages out: the range leaves the table and reads zeros."""
    handler, region = served(kind="shmem")
    alias = track_region(region.alias())
    assert_pages(region.read(0, region.length), PAGE, pattern_at(), "before")
    run_in_thread(region.madvise, lib.MADV_REMOVE, 0, 2 * PAGE).finish()
    start = region.addr
    wait_for(lambda: spans(handler) == [(start + 2 * PAGE, start + 4 * PAGE)], "the table")
    assert region.read(0, 2 * PAGE) == bytes(2 * PAGE)
    assert alias.read(0, 2 * PAGE) == bytes(2 * PAGE)  # gone from the page cache
    assert_pages(region.read(2 * PAGE, 2 * PAGE), PAGE, pattern_at(2), "kept")


def test_munmap_drops_mapping(served: Callable, region_factory: Regions) -> None:
    """munmap of part, then all, of a region removes exactly that from the table."""
    handler, region = served()
    other = region_factory("anon", pages=2)
    handler.register(other)
    start = region.addr
    run_in_thread(lib.munmap, ffi.cast("void *", start + PAGE), PAGE).finish()
    want = sorted([(start, start + PAGE), (start + 2 * PAGE, start + 4 * PAGE)])
    wait_for(
        lambda: spans(handler) == sorted([*want, (other.addr, other.addr + other.length)]),
        "the hole in the table",
    )
    assert_pages(region.read(2 * PAGE, 2 * PAGE), PAGE, pattern_at(2), "after the hole")
    close_around_hole(region, PAGE, PAGE)
    wait_for(lambda: spans(handler) == [(other.addr, other.addr + other.length)], "region gone")
    assert other.read(0, other.length) == bytes(other.length)


def close_around_hole(region: mem.Region, hole: int, length: int) -> None:
    """Unmap what is left of ``region`` around the hole at ``hole`` (offset), piece by piece.

    Never the whole range again (what ``region.close()`` would do): the hole's
    page may belong to another mapping by now. Under ASan a new thread's data
    landed there, and unmapping it crashed that thread.
    """
    start = region.addr
    run_in_thread(lib.munmap, ffi.cast("void *", start), hole).finish()
    rest = hole + length
    run_in_thread(lib.munmap, ffi.cast("void *", start + rest), region.length - rest).finish()
    region._closed = True  # unmapped above: teardown must not unmap the range again


@NATIVE
def test_split_mapping_forked_child(native: bool, served: Callable) -> None:
    """A child forked after a split is served at the offsets of the range as registered."""
    handler, region = served(native=native)
    start = region.addr
    run_in_thread(lib.munmap, ffi.cast("void *", start + PAGE), PAGE).finish()
    wait_for(lambda: len(spans(handler)) == 2, "the split")
    data = fork_child(lambda: region.read(0, PAGE) + region.read(2 * PAGE, 2 * PAGE))
    assert_pages(data, PAGE, lambda i: page_pattern((0, 2, 3)[i], PAGE), "child")
    copies = wait_for(
        lambda: [m for m in handler.mappings if m._uffd is not handler.uffd], "copies"
    )
    assert [(m.start, m.end) for m in copies] == spans(handler)
    close_around_hole(region, PAGE, PAGE)


def _map_anon(addr: int | None = None, prot: int | None = None) -> int:
    """mmap one anonymous page (at ``addr`` with MAP_FIXED when given); returns its address."""
    flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | (lib.MAP_FIXED if addr else 0)
    prot = lib.PROT_READ | lib.PROT_WRITE if prot is None else prot
    got = lib.mmap(ffi.cast("void *", addr or 0), PAGE, prot, flags, -1, 0)
    return int(ffi.cast("uintptr_t", got))


@NATIVE
def test_partial_mremap_moves_one_piece(
    native: bool, region_factory: Regions, track_region: Callable
) -> None:
    """mremap of one page moves just that piece, at its offset; the hole keeps no stale source."""
    region = region_factory("anon", pages=4)
    start = region.addr
    # EVENT_REMAP alone: no UNMAP event follows the move to clean the old range up.
    with FaultHandler(features=Feature.EVENT_REMAP) as handler:
        handler.register(region, Mode.MISSING, BufferOps(pattern_buffer(4, PAGE), native=native))
        target = _map_anon(prot=lib.PROT_NONE)
        flags = lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED
        moved = run_in_thread(
            lambda: int(
                ffi.cast(
                    "uintptr_t",
                    lib.mremap(
                        ffi.cast("void *", start + PAGE),
                        PAGE,
                        PAGE,
                        flags,
                        ffi.cast("void *", target),
                    ),
                )
            )
        ).finish()
        assert moved == target
        piece = track_region(mem.Region(target, PAGE, PAGE, "anon", None, True))
        want = sorted(
            [(start, start + PAGE), (start + 2 * PAGE, start + 4 * PAGE), (target, target + PAGE)]
        )
        wait_for(lambda: spans(handler) == want, "the moved piece")
        assert piece.read(0, PAGE) == page_pattern(1, PAGE)
        assert_pages(region.read(2 * PAGE, 2 * PAGE), PAGE, pattern_at(2), "the tail")
        # New memory in the hole, registered with the built-in AnonOps: zeros, not page 1.
        assert _map_anon(start + PAGE) == start + PAGE
        hole = track_region(mem.Region(start + PAGE, PAGE, PAGE, "anon", None, True))
        handler.register(hole)
        assert run_in_thread(hole.read, 0, PAGE).finish() == bytes(PAGE)
        close_around_hole(region, PAGE, PAGE)  # the hole is `hole`'s to unmap
