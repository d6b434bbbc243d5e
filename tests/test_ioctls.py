"""Every range ioctl on a real kernel: what it installs, what it returns, where it is refused."""

from __future__ import annotations

import ctypes
import errno
import mmap

import pytest
from conftest import (
    HAS_PAGEMAP_WP,
    KIND_MINOR_FEATURE,
    KIND_MISSING_FEATURE,
    NO_FEATURES,
    PAGE,
    PM_PRESENT,
    PM_UFFD_WP,
    pagemap,
    read_one,
    requires,
    requires_kernel,
    run_toucher,
    skip_unless,
)

import uffd
from uffd import Feature, Ioctl, Mode

_CYCLE = bytes(range(1, 252))  # 251 (prime) non-zero bytes: no page repeats another


def pattern(n: int, seed: int = 1) -> bytes:
    """``n`` recognisable, non-zero bytes; a different ``seed`` gives different bytes."""
    start = seed % len(_CYCLE)
    return (_CYCLE * (n // len(_CYCLE) + 2))[start : start + n]


def assert_wp(addr: int, protected: bool) -> None:
    """The page's pagemap uffd-wp bit is ``protected`` (checked where pagemap reports it, 5.13+)."""
    if HAS_PAGEMAP_WP:
        assert bool(pagemap(addr) & PM_UFFD_WP) is protected


def wp_features(kind: str) -> Feature:
    """Features a MISSING|WP registration of ``kind`` needs."""
    extra = Feature(0) if kind == "anon" else Feature.WP_HUGETLBFS_SHMEM
    return Feature.PAGEFAULT_FLAG_WP | extra | KIND_MISSING_FEATURE[kind]


def open_for(uffd_factory, region, mode: Mode, features: Feature = NO_FEATURES):
    """An fd with the features ``mode`` needs on ``region``'s kind, the region registered."""
    if mode & Mode.MISSING:
        features |= KIND_MISSING_FEATURE[region.kind]
    if mode & Mode.WP:
        features |= wp_features(region.kind)
    if mode & Mode.MINOR:
        features |= KIND_MINOR_FEATURE[region.kind]
    skip_unless(features)
    ufd = uffd_factory(features)
    granted = ufd.register(region.addr, region.length, mode)
    return ufd, granted


# -- COPY ------------------------------------------------------------------------


def test_copy_installs_the_bytes(uffd_factory, region_kind):
    """COPY returns the bytes copied, they read back, and only the copied page is mapped."""
    region = region_kind
    ufd, granted = open_for(uffd_factory, region, Mode.MISSING)
    assert Ioctl.COPY in granted
    data = pattern(region.page_size)
    assert ufd.copy(region.addr, data, region.page_size) == region.page_size
    assert pagemap(region.addr) & PM_PRESENT
    assert not pagemap(region.addr + region.page_size) & PM_PRESENT
    assert region.read(0, region.page_size) == data


def test_copy_serves_a_missing_fault(uffd_factory, region_kind):
    """A read of a missing page blocks until COPY fills it; the reader then sees the bytes."""
    region = region_kind
    ufd, _ = open_for(uffd_factory, region, Mode.MISSING)
    size = region.page_size
    reader = run_toucher(region, size + 100, 16, read=True)
    fault = read_one(ufd)
    assert isinstance(fault, uffd.PageFault)
    assert fault.address == region.addr + size
    assert not fault.write
    data = pattern(size, seed=5)
    assert ufd.copy(region.addr + size, data, size) == size
    assert reader.finish() == data[100:116]


def _as_int_address(data: bytes, keep: list[object]) -> int:
    buf = ctypes.create_string_buffer(data, len(data))
    keep.append(buf)
    return ctypes.addressof(buf)


def _as_mmap(data: bytes, keep: list[object]) -> mmap.mmap:
    m = mmap.mmap(-1, len(data))
    m.write(data)
    keep.append(m)
    return m


SOURCES = {
    "bytes": lambda data, keep: bytes(data),
    "bytearray": lambda data, keep: bytearray(data),
    "memoryview": lambda data, keep: memoryview(bytearray(data)),
    "mmap": _as_mmap,
    "int": _as_int_address,
}


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_copy_source_kinds(uffd_factory, anon_region, source):
    """COPY takes ``src`` as bytes, bytearray, memoryview, mmap or an int address."""
    ufd, _ = open_for(uffd_factory, anon_region, Mode.MISSING)
    data = pattern(2 * PAGE, seed=len(source))
    keep: list[object] = []
    src = SOURCES[source](data, keep)
    assert ufd.copy(anon_region.addr + PAGE, src, 2 * PAGE) == 2 * PAGE
    assert anon_region.read(PAGE, 2 * PAGE) == data
    for item in keep:
        if isinstance(item, mmap.mmap):
            item.close()


def test_copy_from_a_longer_buffer_copies_length_bytes(uffd_factory, anon_region):
    """A source longer than ``length`` is fine: only ``length`` bytes are copied."""
    ufd, _ = open_for(uffd_factory, anon_region, Mode.MISSING)
    data = pattern(3 * PAGE)
    assert ufd.copy(anon_region.addr, data, PAGE) == PAGE
    assert anon_region.read(0, PAGE) == data[:PAGE]
    assert not pagemap(anon_region.addr + PAGE) & PM_PRESENT


# -- DONTWAKE and WAKE ---------------------------------------------------------------


@pytest.mark.parametrize("op", ["copy", "zeropage"])
def test_dontwake_leaves_the_thread_blocked_until_wake(uffd_factory, anon_region, op):
    """``wake=False`` installs the page but the faulting thread stays blocked until ``wake()``."""
    ufd, _ = open_for(uffd_factory, anon_region, Mode.MISSING)
    reader = run_toucher(anon_region, 0, 8, read=True)
    fault = read_one(ufd)
    assert fault.address == anon_region.addr
    if op == "copy":
        assert ufd.copy(anon_region.addr, pattern(PAGE), PAGE, wake=False) == PAGE
        expected = pattern(PAGE)[:8]
    else:
        assert ufd.zeropage(anon_region.addr, PAGE, wake=False) == PAGE
        expected = bytes(8)
    assert pagemap(anon_region.addr) & PM_PRESENT  # installed ...
    reader.join(0.3)
    assert reader.is_alive(), "DONTWAKE woke the faulting thread"  # ... but nobody woken
    ufd.wake(anon_region.addr, PAGE)
    assert reader.finish() == expected


def test_unregister_wakes_blocked_faults_and_stops_reporting(uffd_factory, anon_region):
    """UNREGISTER wakes a blocked fault (it then reads zeros); later accesses are not reported."""
    ufd, _ = open_for(uffd_factory, anon_region, Mode.MISSING)
    reader = run_toucher(anon_region, PAGE, 4, read=True)
    read_one(ufd)
    ufd.unregister(anon_region.addr, anon_region.length)
    assert reader.finish() == bytes(4)
    assert anon_region.read(2 * PAGE, 4) == bytes(4)
    assert ufd.read_events(timeout=0) == []


# -- ZEROPAGE ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_zeropage_reads_zeros(uffd_factory, region_factory, kind):
    """ZEROPAGE returns the bytes mapped and the range reads as zeros (anon and shmem)."""
    region = region_factory(kind)
    ufd, granted = open_for(uffd_factory, region, Mode.MISSING)
    assert Ioctl.ZEROPAGE in granted
    assert ufd.zeropage(region.addr, 2 * PAGE) == 2 * PAGE
    assert region.read(0, 2 * PAGE) == bytes(2 * PAGE)
    assert pagemap(region.addr) & PM_PRESENT


def test_zeropage_serves_a_fault(uffd_factory, anon_region):
    """A faulting reader woken by ZEROPAGE reads zeros."""
    ufd, _ = open_for(uffd_factory, anon_region, Mode.MISSING)
    reader = run_toucher(anon_region, 3 * PAGE, 32, read=True)
    assert read_one(ufd).address == anon_region.addr + 3 * PAGE
    assert ufd.zeropage(anon_region.addr + 3 * PAGE, PAGE) == PAGE
    assert reader.finish() == bytes(32)


def test_zeropage_on_hugetlb_is_refused_by_the_kernel(uffd_factory, region_factory):
    """hugetlb is not granted ZEROPAGE and the kernel answers EINVAL to it."""
    region = region_factory("hugetlb", pages=1)
    ufd, granted = open_for(uffd_factory, region, Mode.MISSING)
    assert Ioctl.ZEROPAGE not in granted
    assert Ioctl.COPY in granted
    with pytest.raises(uffd.UffdError) as info:
        ufd.zeropage(region.addr, region.length)
    assert info.value.errno == errno.EINVAL
    assert "UFFDIO_ZEROPAGE" in str(info.value)


# -- WRITEPROTECT --------------------------------------------------------------------


def test_copy_with_wp_then_write_is_a_wp_fault(uffd_factory, region_kind):
    """COPY ``wp=True`` installs a write-protected page: reads pass, a write is a WP fault."""
    region = region_kind
    size = region.page_size
    ufd, granted = open_for(uffd_factory, region, Mode.MISSING | Mode.WP)
    assert Ioctl.WRITEPROTECT in granted
    data = pattern(size)
    assert ufd.copy(region.addr, data, size, wp=True) == size
    assert_wp(region.addr, True)
    assert region.read(0, 16) == data[:16]  # reading a protected page does not fault
    assert ufd.read_events(timeout=0) == []
    writer = run_toucher(region, 0, 1, write=True)
    fault = read_one(ufd)
    assert isinstance(fault, uffd.PageFault)
    assert fault.address == region.addr
    assert fault.wp and fault.write and not fault.minor
    ufd.writeprotect(region.addr, size, protect=False)
    writer.finish()
    assert_wp(region.addr, False)
    assert region.read(0, size) == data


@requires_kernel(5, 13, "pagemap bit 57, uffd-wp")
def test_writeprotect_sets_and_clears_the_pagemap_bit(uffd_factory, region_kind):
    """WRITEPROTECT protect/unprotect sets and clears pagemap bit 57 on every page of the range."""
    region = region_kind
    size = region.page_size
    region.write(0, pattern(region.length))  # populate before registering
    features = wp_features(region.kind) & ~KIND_MISSING_FEATURE[region.kind]
    ufd, granted = open_for(uffd_factory, region, Mode.WP, features)
    assert Ioctl.WRITEPROTECT in granted
    pages = [region.addr + i * size for i in range(region.length // size)]
    assert not any(pagemap(p) & PM_UFFD_WP for p in pages)
    ufd.writeprotect(region.addr, region.length, protect=True)
    assert all(pagemap(p) & PM_UFFD_WP for p in pages)
    ufd.writeprotect(region.addr + size, size, protect=False)
    assert [bool(pagemap(p) & PM_UFFD_WP) for p in pages] == [True, False]
    region.write(size, b"ok")  # the unprotected page takes writes without a fault
    assert ufd.read_events(timeout=0) == []
    assert (
        region.read(0, region.length)
        == pattern(region.length)[:size] + b"ok" + pattern(region.length)[size + 2 :]
    )


@requires(Feature.PAGEFAULT_FLAG_WP)
def test_unprotect_dontwake_leaves_the_writer_blocked_until_wake(uffd_factory, anon_region):
    """Un-protecting with ``wake=False`` lifts the protection but wakes nobody until ``wake()``."""
    anon_region.write(0, b"x")
    ufd, _ = open_for(uffd_factory, anon_region, Mode.WP)
    ufd.writeprotect(anon_region.addr, PAGE)
    writer = run_toucher(anon_region, 0, 1, write=True)
    assert read_one(ufd).wp
    ufd.writeprotect(anon_region.addr, PAGE, protect=False, wake=False)
    assert_wp(anon_region.addr, False)
    writer.join(0.3)
    assert writer.is_alive(), "DONTWAKE woke the writer"
    ufd.wake(anon_region.addr, PAGE)
    writer.finish()
    assert anon_region.read(0, 1) == b"x"


# -- CONTINUE ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
def test_continue_maps_the_page_cache_after_a_minor_fault(
    uffd_factory, region_factory, track_region, kind
):
    """A MINOR fault on a page filled through an alias is served by CONTINUE with those bytes."""
    region = region_factory(kind, pages=2)
    size = region.page_size
    ufd, granted = open_for(uffd_factory, region, Mode.MINOR)
    assert Ioctl.CONTINUE in granted
    alias = track_region(region.alias())
    data = pattern(size, seed=9)
    alias.write(size, data)  # fills the page cache, not the registered mapping
    reader = run_toucher(region, size + 64, 32, read=True)
    fault = read_one(ufd)
    assert fault.minor and not fault.write and not fault.wp
    assert fault.address == region.addr + size
    assert ufd.continue_(region.addr + size, size) == size
    assert reader.finish() == data[64:96]
    assert pagemap(region.addr + size) & PM_PRESENT


@requires(Feature.MINOR_SHMEM, Feature.WP_HUGETLBFS_SHMEM, Feature.PAGEFAULT_FLAG_WP)
@requires_kernel(6, 4, "UFFDIO_CONTINUE_MODE_WP")
def test_continue_with_wp_maps_write_protected(uffd_factory, shmem_region, track_region):
    """CONTINUE ``wp=True`` maps the page-cache page write-protected (pagemap bit 57)."""
    ufd, _ = open_for(uffd_factory, shmem_region, Mode.MINOR | Mode.WP)
    track_region(shmem_region.alias()).write(0, b"cached")
    assert ufd.continue_(shmem_region.addr, PAGE, wp=True) == PAGE
    assert pagemap(shmem_region.addr) & PM_UFFD_WP
    assert shmem_region.read(0, 6) == b"cached"


def test_minor_registration_on_anon_is_unsupported(uffd_factory, anon_region):
    """MINOR (hence CONTINUE) on anonymous memory is refused: UnsupportedError, errno EINVAL."""
    skip_unless(Feature.MINOR_SHMEM)
    ufd = uffd_factory(Feature.MINOR_SHMEM)
    with pytest.raises(uffd.UnsupportedError) as info:
        ufd.register(anon_region.addr, anon_region.length, Mode.MINOR)
    assert info.value.errno == errno.EINVAL
    assert "UFFDIO_REGISTER" in str(info.value) and "MINOR" in str(info.value)


def test_continue_on_anon_missing_range_is_einval(uffd_factory, anon_region):
    """CONTINUE on an anon range (registered MISSING, not granted CONTINUE) gets EINVAL."""
    ufd, granted = open_for(uffd_factory, anon_region, Mode.MISSING)
    assert Ioctl.CONTINUE not in granted
    with pytest.raises(uffd.UffdError) as info:
        ufd.continue_(anon_region.addr, PAGE)
    assert info.value.errno == errno.EINVAL


# -- POISON --------------------------------------------------------------------------


def test_poison_then_read_is_a_page_access_error(uffd_factory, region_kind):
    """POISON returns the bytes handled; reading there raises PageAccessError with ``.address``."""
    region = region_kind
    size = region.page_size
    skip_unless(Feature.POISON)
    ufd, granted = open_for(uffd_factory, region, Mode.MISSING, Feature.POISON)
    assert Ioctl.POISON in granted
    assert ufd.poison(region.addr + size, size) == size
    with pytest.raises(uffd.PageAccessError) as info:
        region.read(size + 10, 4)
    err = info.value
    assert region.addr + size <= err.address < region.addr + 2 * size
    assert err.errno == errno.EFAULT
    assert "SIGBUS" in str(err)
    # The unpoisoned page still works.
    assert ufd.copy(region.addr, pattern(size), size) == size
    assert region.read(0, 4) == pattern(4)


@requires(Feature.POISON)
def test_poison_serves_a_fault_with_sigbus(uffd_factory, anon_region):
    """A reader blocked on a missing page gets PageAccessError when the page is poisoned."""
    ufd, _ = open_for(uffd_factory, anon_region, Mode.MISSING, Feature.POISON)
    reader = run_toucher(anon_region, 2 * PAGE, 8, read=True)
    assert read_one(ufd).address == anon_region.addr + 2 * PAGE
    assert ufd.poison(anon_region.addr + 2 * PAGE, PAGE) == PAGE
    with pytest.raises(uffd.PageAccessError) as info:
        reader.finish()
    assert info.value.address == anon_region.addr + 2 * PAGE


# -- MOVE ----------------------------------------------------------------------------


@requires(Feature.MOVE)
def test_move_takes_the_page_from_the_source(uffd_factory, region_factory):
    """MOVE returns the bytes moved; the destination has the content, the source is empty."""
    src, dst = region_factory("anon", pages=2), region_factory("anon", pages=2)
    data = pattern(2 * PAGE, seed=3)
    src.write(0, data)
    ufd, granted = open_for(uffd_factory, dst, Mode.MISSING, Feature.MOVE)
    assert Ioctl.MOVE in granted
    assert ufd.move(dst.addr, src.addr, 2 * PAGE) == 2 * PAGE
    assert dst.read(0, 2 * PAGE) == data
    assert not pagemap(src.addr) & PM_PRESENT
    assert not pagemap(src.addr + PAGE) & PM_PRESENT
    assert src.read(0, 2 * PAGE) == bytes(2 * PAGE)  # unregistered source: fresh zero pages


@requires(Feature.MOVE)
def test_move_serves_a_missing_fault(uffd_factory, region_factory):
    """A reader blocked on a missing destination page sees the moved bytes."""
    src, dst = region_factory("anon", pages=1), region_factory("anon", pages=1)
    src.write(0, pattern(PAGE, seed=4))
    ufd, _ = open_for(uffd_factory, dst, Mode.MISSING, Feature.MOVE)
    reader = run_toucher(dst, 0, 16, read=True)
    assert read_one(ufd).address == dst.addr
    assert ufd.move(dst.addr, src.addr, PAGE) == PAGE
    assert reader.finish() == pattern(PAGE, seed=4)[:16]


@requires(Feature.MOVE)
def test_move_over_a_source_hole(uffd_factory, region_factory):
    """A hole in the source stops MOVE (ENOENT) unless ``allow_src_holes`` skips it."""
    src, dst = region_factory("anon", pages=2), region_factory("anon", pages=2)
    src.write(0, b"first")  # page 1 of src is never touched: a hole
    ufd, _ = open_for(uffd_factory, dst, Mode.MISSING, Feature.MOVE)
    with pytest.raises(uffd.UffdError) as info:
        ufd.move(dst.addr + PAGE, src.addr + PAGE, PAGE)
    assert info.value.errno == errno.ENOENT
    assert ufd.move(dst.addr, src.addr, 2 * PAGE, allow_src_holes=True) == 2 * PAGE
    assert dst.read(0, 5) == b"first"
    assert not pagemap(dst.addr + PAGE) & PM_PRESENT


@requires(Feature.MOVE, Feature.MISSING_SHMEM)
def test_move_on_shmem_is_refused_although_register_grants_it(uffd_factory, region_factory):
    """shmem registration reports the MOVE bit, yet the kernel answers EINVAL: MOVE is anon-only.

    Recorded fact (Linux 6.8-6.18): UFFDIO_REGISTER's answer for any non-hugetlb
    range is UFFD_API_RANGE_IOCTLS, which includes _UFFDIO_MOVE; move_pages()
    then rejects a non-anonymous vma with EINVAL. The dispatch layer must not
    trust the register answer for MOVE.
    """
    src = region_factory("anon", pages=1)
    src.write(0, b"anon")
    dst = region_factory("shmem", pages=1)
    ufd, granted = open_for(uffd_factory, dst, Mode.MISSING, Feature.MOVE)
    assert Ioctl.MOVE in granted
    with pytest.raises(uffd.UffdError) as info:
        ufd.move(dst.addr, src.addr, PAGE)
    assert info.value.errno == errno.EINVAL
    assert "UFFDIO_MOVE" in str(info.value)
    assert src.read(0, 4) == b"anon"  # nothing moved
