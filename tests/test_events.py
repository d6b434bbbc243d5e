"""Each event type produced by a real kernel condition, and parsed into its dataclass.

MADV_DONTNEED, mremap and munmap on a range with REMOVE/REMAP/UNMAP enabled
block the calling thread until the event is read, so they run on a helper
thread (Region.madvise/mremap/close release the GIL) while the main thread
reads. EVENT_FORK is produced by a child process (tests/helpers/forker.py):
``os.fork()`` holds the GIL while the kernel waits for the FORK event to be
read, so no thread of the forking process could read it.
"""

from __future__ import annotations

import threading

import pytest
from conftest import (
    KIND_MINOR_FEATURE,
    PAGE,
    WAIT,
    read_one,
    requires,
    run_in_thread,
    run_toucher,
)
from uffd._native import lib

import uffd
from uffd import Feature, Mode

# -- non-cooperative events -----------------------------------------------------------


@requires(Feature.EVENT_FORK)
def test_fork_event_hands_over_the_child_fd(forker):
    """A fork yields Fork(uffd) negotiated like the parent's fd; it serves the child's faults."""
    child = forker(nbytes=16)
    parent_fd = child.uffd
    child.fork()
    event = read_one(parent_fd)
    assert isinstance(event, uffd.Fork)
    fork_fd = event.uffd
    try:
        assert isinstance(fork_fd, uffd.Userfaultfd)
        assert fork_fd.fileno() != parent_fd.fileno()
        assert fork_fd.features == parent_fd.features == Feature.EVENT_FORK
        assert fork_fd.available == parent_fd.available
        assert fork_fd.ioctls == parent_fd.ioctls
        # The grandchild's read of its (inherited, registered) region faults on the new fd.
        fault = read_one(fork_fd)
        assert isinstance(fault, uffd.PageFault)
        assert fault.address == child.header["addr"]
        assert parent_fd.read_events(timeout=0) == []
        data = b"grandchild-bytes" + bytes(PAGE - 16)
        assert fork_fd.copy(child.header["addr"], data, PAGE) == PAGE
        assert child.grandchild_data() == data[:16]
    finally:
        fork_fd.close()


@requires(Feature.EVENT_REMAP)
def test_mremap_produces_remap(uffd_factory, anon_region):
    """mremap of a registered region yields Remap(old, new, length); the move then finishes."""
    ufd = uffd_factory(Feature.EVENT_REMAP)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    mover = run_in_thread(anon_region.mremap)
    event = read_one(ufd)
    old = mover.finish()
    assert isinstance(event, uffd.Remap)
    assert event == uffd.Remap(old=old, new=anon_region.addr, length=anon_region.length)
    assert old != anon_region.addr


@requires(Feature.EVENT_REMAP)
def test_registration_follows_the_remapped_region(uffd_factory, anon_region):
    """After a Remap the new address is registered: a read there faults at the new address."""
    ufd = uffd_factory(Feature.EVENT_REMAP)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    mover = run_in_thread(anon_region.mremap)
    assert isinstance(read_one(ufd), uffd.Remap)
    mover.finish()
    reader = run_toucher(anon_region, 0, 4, read=True)
    assert read_one(ufd).address == anon_region.addr
    ufd.copy(anon_region.addr, b"moved" + bytes(PAGE - 5), PAGE)
    assert reader.finish() == b"move"


@requires(Feature.EVENT_REMOVE)
def test_madv_dontneed_produces_remove(uffd_factory, anon_region):
    """MADV_DONTNEED on a registered range yields Remove(start, end) and blocks until it is read."""
    ufd = uffd_factory(Feature.EVENT_REMOVE)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    ufd.copy(anon_region.addr, b"x" * 2 * PAGE, 2 * PAGE)
    advisor = run_in_thread(anon_region.madvise, lib.MADV_DONTNEED, PAGE, 2 * PAGE)
    advisor.join(0.2)
    assert advisor.is_alive(), "madvise returned before its REMOVE event was read"
    event = read_one(ufd)
    advisor.finish()
    assert event == uffd.Remove(start=anon_region.addr + PAGE, end=anon_region.addr + 3 * PAGE)
    assert anon_region.read(0, 1) == b"x"  # page 0 was not dropped


@requires(Feature.EVENT_UNMAP)
def test_munmap_produces_unmap(uffd_factory, anon_region):
    """Unmapping a registered region (Region.close) yields Unmap(start, end)."""
    ufd = uffd_factory(Feature.EVENT_UNMAP)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    start, end = anon_region.addr, anon_region.addr + anon_region.length
    closer = run_in_thread(anon_region.close)
    event = read_one(ufd)
    closer.finish()
    assert event == uffd.Unmap(start=start, end=end)
    assert anon_region.closed


def test_without_event_features_nothing_is_reported(uffd_factory, anon_region):
    """Without REMOVE/UNMAP, madvise and munmap return at once and no event is queued."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    anon_region.madvise(lib.MADV_DONTNEED)
    anon_region.close()
    assert ufd.read_events(timeout=0) == []


# -- page fault details ------------------------------------------------------------------


@requires(Feature.THREAD_ID)
def test_thread_id_is_the_faulting_threads_native_id(uffd_factory, anon_region):
    """With THREAD_ID, PageFault.thread_id is the faulting thread's native id."""
    ufd = uffd_factory(Feature.THREAD_ID)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    reader = run_toucher(anon_region, 0, 1)
    fault = read_one(ufd)
    assert fault.thread_id == reader.native_id
    assert fault.thread_id != threading.get_native_id()
    ufd.zeropage(anon_region.addr, PAGE)
    reader.finish()


def test_thread_id_is_none_without_the_feature(uffd_factory, anon_region):
    """Without THREAD_ID, PageFault.thread_id is None."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    reader = run_toucher(anon_region, 0, 1)
    assert read_one(ufd).thread_id is None
    ufd.zeropage(anon_region.addr, PAGE)
    reader.finish()


@requires(Feature.EXACT_ADDRESS)
def test_exact_address_keeps_the_sub_page_offset(uffd_factory, anon_region):
    """With EXACT_ADDRESS the fault address is the byte touched (offset 4096+123 ends in 123)."""
    ufd = uffd_factory(Feature.EXACT_ADDRESS)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    reader = run_toucher(anon_region, PAGE + 123, 1)
    fault = read_one(ufd)
    assert fault.address == anon_region.addr + PAGE + 123
    assert fault.address % PAGE == 123
    ufd.zeropage(anon_region.addr + PAGE, PAGE)
    reader.finish()


def test_fault_address_is_page_aligned_without_exact_address(uffd_factory, anon_region):
    """Without EXACT_ADDRESS the fault address is the page's start."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    reader = run_toucher(anon_region, PAGE + 123, 1)
    assert read_one(ufd).address == anon_region.addr + PAGE
    ufd.zeropage(anon_region.addr + PAGE, PAGE)
    reader.finish()


@pytest.mark.parametrize("write", [False, True])
def test_missing_fault_write_flag(uffd_factory, anon_region, write):
    """A missing-page fault has ``write`` set exactly for a write access; never ``wp``/``minor``."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    toucher = run_toucher(anon_region, 0, 1, write=write)
    fault = read_one(ufd)
    assert (fault.write, fault.wp, fault.minor) == (write, False, False)
    ufd.zeropage(anon_region.addr, PAGE)
    toucher.finish()


@requires(Feature.PAGEFAULT_FLAG_WP)
def test_wp_fault_flags(uffd_factory, anon_region):
    """A write to a write-protected page is a fault with ``wp`` and ``write`` set."""
    anon_region.write(0, b"w")
    ufd = uffd_factory(Feature.PAGEFAULT_FLAG_WP)
    ufd.register(anon_region.addr, anon_region.length, Mode.WP)
    ufd.writeprotect(anon_region.addr, PAGE)
    writer = run_toucher(anon_region, 0, 1, write=True)
    fault = read_one(ufd)
    assert (fault.write, fault.wp, fault.minor) == (True, True, False)
    assert fault.address == anon_region.addr
    ufd.writeprotect(anon_region.addr, PAGE, protect=False)
    writer.finish()


@requires(KIND_MINOR_FEATURE["shmem"])
def test_minor_fault_flags(uffd_factory, shmem_region, track_region):
    """A read of a shmem page present in the page cache but not mapped is a ``minor`` fault."""
    ufd = uffd_factory(Feature.MINOR_SHMEM)
    ufd.register(shmem_region.addr, shmem_region.length, Mode.MINOR)
    track_region(shmem_region.alias()).write(0, b"m")
    reader = run_toucher(shmem_region, 0, 1, read=True)
    fault = read_one(ufd)
    assert (fault.write, fault.wp, fault.minor) == (False, False, True)
    ufd.continue_(shmem_region.addr, PAGE)
    assert reader.finish() == b"m"


def test_one_read_returns_faults_of_several_threads(uffd_factory, anon_region):
    """Faults from two blocked threads are both returned, each once."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    readers = [run_toucher(anon_region, i * PAGE, 1) for i in (1, 3)]
    seen: set[int] = set()
    for _ in range(20):
        seen |= {e.address for e in ufd.read_events(timeout=WAIT / 20)}  # type: ignore[union-attr]
        if len(seen) == 2:
            break
    assert seen == {anon_region.addr + PAGE, anon_region.addr + 3 * PAGE}
    for address in seen:
        ufd.zeropage(address, PAGE)
    for reader in readers:
        reader.finish()
