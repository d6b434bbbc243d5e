"""Ops modules (uffd.modules) serving real faults from threads and from a forked child.

BufferOps and FileOps with ``native=True`` are served by the C pump without
Python (``stats.native_faults`` grows) and with ``native=False`` by their
``handle_missing`` (it does not); MinorFillOps fills the page cache through
an alias and CONTINUEs; WriteLogOps logs each first write once.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from _dispatch_helpers import (
    assert_pages,
    child_copies,
    fork_child,
    page_pattern,
    pattern_buffer,
    read_concurrently,
    run_all,
    wait_for,
)
from conftest import PAGE, run_in_thread

import uffd
from uffd import FaultHandler, Feature, Mode, mem
from uffd.modules import BufferOps, FileOps, MinorFillOps, WriteLogOps

Regions = Callable[..., mem.Region]
NATIVE = pytest.mark.parametrize("native", [True, False], ids=["native", "python"])


def _served(handler: FaultHandler, native: bool, pages: int) -> None:
    """Check who served ``pages`` faults: the C pump alone, or Python alone (before stop())."""
    stats = handler.stats
    if native:
        # Sequential faults may install a run of pages per fault: at least one, at most pages.
        assert 1 <= stats.native_faults <= pages
        assert sum(stats.total.faults.values()) == 0
    else:
        assert stats.native_faults == 0
        wait_for(lambda: sum(handler.stats.total.faults.values()) == pages, f"{pages} faults")
        assert handler.stats.total.resolutions == {"copy": pages}


# -- BufferOps ---------------------------------------------------------------


@NATIVE
def test_buffer_ops_threads(native: bool, region_factory: Regions) -> None:
    """BufferOps copies the buffer's pages at the fault offsets, natively or in Python."""
    region = region_factory("anon", pages=16)
    buffer = pattern_buffer(16, PAGE)
    with FaultHandler() as handler:
        handler.register(region, Mode.MISSING, BufferOps(buffer, native=native))
        assert_pages(read_concurrently(region), PAGE, lambda i: page_pattern(i, PAGE), "buffer")
        _served(handler, native, 16)
        native_faults = handler.stats.native_faults
    assert handler.stats.native_faults == native_faults  # kept after stop()


@NATIVE
def test_buffer_ops_forked_child(native: bool, region_factory: Regions) -> None:
    """A forked child's faults are served from the parent's buffer on the child's fd."""
    region = region_factory("anon", pages=4)
    with FaultHandler(features=Feature.EVENT_FORK) as handler:
        handler.register(region, Mode.MISSING, BufferOps(pattern_buffer(4, PAGE), native=native))
        data = fork_child(lambda: region.read(0, region.length))
        assert_pages(data, PAGE, lambda i: page_pattern(i, PAGE), "child")
        (copy,) = wait_for(lambda: child_copies(handler, region), "the child's mapping")
        assert isinstance(copy.ops, BufferOps)
        _served(handler, native, 4)
    assert sum(handler.mappings[0].stats.faults.values()) == 0  # the parent never faulted


# -- FileOps -----------------------------------------------------------------


@pytest.fixture
def page_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A file of 4.5 pattern pages: read from offset PAGE, a 5-page mapping ends past EOF."""
    content = bytes(pattern_buffer(5, PAGE, salt=0x66))[: 9 * PAGE // 2]
    path = tmp_path / "pages.bin"
    path.write_bytes(content)
    return path, content


def _file_page(content: bytes, offset: int) -> Callable[[int], bytes]:
    """Page i of a mapping served from ``content`` at ``offset``, zero-padded past its end."""
    return lambda i: content[offset + i * PAGE : offset + (i + 1) * PAGE].ljust(PAGE, b"\0")


@NATIVE
def test_file_ops_threads(
    native: bool, page_file: tuple[Path, bytes], region_factory: Regions
) -> None:
    """FileOps serves pages from the file at offset + fault offset; past EOF reads zeros."""
    path, content = page_file
    region = region_factory("anon", pages=5)
    ops = FileOps(path, offset=PAGE, native=native)
    try:
        with FaultHandler() as handler:
            handler.register(region, Mode.MISSING, ops)
            data = read_concurrently(region)
            _served(handler, native, 5)
    finally:
        ops.close()
    assert_pages(data, PAGE, _file_page(content, PAGE), "file")
    assert data[-PAGE:] == bytes(PAGE)
    assert data[3 * PAGE : 3 * PAGE + PAGE // 2] != bytes(PAGE // 2)


@NATIVE
def test_file_ops_forked_child(
    native: bool, page_file: tuple[Path, bytes], region_factory: Regions
) -> None:
    """A forked child's faults are served from the file on the child's fd."""
    path, content = page_file
    region = region_factory("shmem", pages=4)
    ops = FileOps(path, native=native)
    try:
        with FaultHandler(features=Feature.EVENT_FORK) as handler:
            handler.register(region, Mode.MISSING, ops)
            data = fork_child(lambda: region.read(0, region.length))
            wait_for(lambda: child_copies(handler, region), "the child's mapping")
            _served(handler, native, 4)
    finally:
        ops.close()
    assert_pages(data, PAGE, _file_page(content, 0), "child")


# -- MinorFillOps ------------------------------------------------------------


def _minor_setup(
    kind: str, region_factory: Regions, track_region: Callable
) -> tuple[mem.Region, MinorFillOps, Callable[[int], bytes]]:
    """A 2-page region whose page cache holds salt-9 pages; fill() rewrites page 0 only."""
    region = region_factory(kind, pages=2)
    size = region.page_size
    alias = track_region(region.alias())
    alias.write(0, pattern_buffer(2, size, salt=9))

    def fill(offset: int, n: int) -> bytes | None:
        assert n == size
        return page_pattern(offset // size, size, salt=1) if offset == 0 else None

    def expect(i: int) -> bytes:
        return page_pattern(i, size, salt=1 if i == 0 else 9)

    return region, MinorFillOps(alias, fill), expect


@pytest.mark.parametrize("kind", ["shmem", "hugetlb"])
def test_minor_fill_ops_threads(kind: str, region_factory: Regions, track_region: Callable) -> None:
    """MinorFillOps writes fill()'s bytes through the alias, keeps the page on None, CONTINUEs."""
    region, ops, expect = _minor_setup(kind, region_factory, track_region)
    with FaultHandler() as handler:
        handler.register(region, Mode.MINOR, ops)
        data = read_concurrently(region, nthreads=2)
    assert_pages(data, region.page_size, expect, kind)
    assert ops.filled == 1
    assert handler.stats.total.resolutions == {"continue": 2}


def test_minor_fill_ops_forked_child(region_factory: Regions, track_region: Callable) -> None:
    """A forked child's MINOR faults are filled through the parent's alias and CONTINUEd."""
    region, ops, expect = _minor_setup("shmem", region_factory, track_region)
    with FaultHandler(features=Feature.EVENT_FORK) as handler:
        handler.register(region, Mode.MINOR, ops)
        data = fork_child(lambda: region.read(0, region.length))
        (copy,) = wait_for(lambda: child_copies(handler, region), "the child's mapping")
    assert_pages(data, PAGE, expect, "child")
    assert ops.filled == 1
    assert copy.stats.faults == {"minor": 2}


# -- WriteLogOps -------------------------------------------------------------


def _protected(region: mem.Region, handler: FaultHandler, ops: WriteLogOps) -> None:
    region.write(0, pattern_buffer(region.length // PAGE, PAGE, salt=1))
    handler.register(region, Mode.WP, ops)
    handler.uffd.writeprotect(region.addr, region.length, True)


def test_write_log_ops_threads(region_factory: Regions) -> None:
    """WriteLogOps logs each written page exactly once, with the writer's tid; writes land."""
    region = region_factory("anon", pages=8)
    ops = WriteLogOps()
    written = {1: 0, 2: 1, 5: 2, 6: 3}  # page -> writer thread

    def writer(k: int) -> int:
        for page, who in written.items():
            if who == k:
                region.write(page * PAGE, page_pattern(page, PAGE, salt=2))
                region.write(page * PAGE, page_pattern(page, PAGE, salt=3))  # no second fault
        return threading.get_native_id()

    with FaultHandler() as handler:
        _protected(region, handler, ops)
        tids = run_all([lambda k=k: writer(k) for k in range(4)])
    log = ops.take()
    assert sorted(offset for offset, _ in log) == [p * PAGE for p in sorted(written)]
    assert {offset: tid for offset, tid in log} == {p * PAGE: tids[k] for p, k in written.items()}
    assert ops.take() == []
    assert_pages(
        region.read(0, region.length),
        PAGE,
        lambda i: page_pattern(i, PAGE, salt=3 if i in written else 1),
        "written",
    )
    assert handler.stats.total.resolutions == {"unprotect": 4}


def test_write_log_ops_forked_child(region_factory: Regions) -> None:
    """A forked child's write is logged with its tid and let through; the parent's page stays."""
    region = region_factory("anon", pages=4)
    ops = WriteLogOps()

    def child() -> bytes:
        region.write(PAGE, page_pattern(1, PAGE, salt=4))
        return struct.pack("=q", os.getpid()) + region.read(0, region.length)

    with FaultHandler(features=Feature.EVENT_FORK) as handler:
        _protected(region, handler, ops)
        out = fork_child(child)
        (pid,) = struct.unpack_from("=q", out)
        assert_pages(
            out[8:], PAGE, lambda i: page_pattern(i, PAGE, salt=4 if i == 1 else 1), "child"
        )
        assert ops.take() == [(PAGE, pid)]
        assert region.read(PAGE, PAGE) == page_pattern(1, PAGE, salt=1)  # COW: parent unchanged
        # The parent's own page is still protected: its first write is logged now.
        tid = run_in_thread(
            lambda: (region.write(PAGE, b"x"), threading.get_native_id())[1]
        ).finish()
        assert ops.take() == [(PAGE, tid)]
        assert wait_for(lambda: child_copies(handler, region), "the child's mapping")


def test_module_ops_reject_wrong_modes(region_factory: Regions, track_region: Callable) -> None:
    """Each module ops serves only the mode its handlers imply."""
    region = region_factory("shmem", pages=1)
    with FaultHandler() as handler:
        for ops, mode in [
            (BufferOps(bytes(PAGE)), Mode.WP),
            (WriteLogOps(), Mode.MISSING),
            (MinorFillOps(track_region(region.alias()), lambda o, n: None), Mode.MISSING),
        ]:
            with pytest.raises(uffd.UnsupportedError) as info:
                handler.register(region, mode, ops)
            assert f"{type(ops).__name__} refused" in str(info.value)
    assert BufferOps.features == FileOps.features == Mode.MISSING
    assert MinorFillOps.features == Mode.MINOR
    assert WriteLogOps.features == Mode.WP
