"""``uffd.mem`` regions: attributes, placement, aliases, bounded access, kinds, huge pages."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

import pytest
from conftest import HPAGE, PAGE, PM_PRESENT, huge_available, hugepage_lock, pagemap

from uffd import mem

# -- attributes and kinds ---------------------------------------------------------------

EXPECTED_PAGE_SIZE = {"anon": PAGE, "shmem": PAGE, "hugetlb": HPAGE}


def test_region_attributes(region_kind):
    """Each kind has its ``kind``, page size, page-aligned ``addr`` and the length asked for."""
    region = region_kind
    assert region.page_size == EXPECTED_PAGE_SIZE[region.kind]
    assert region.length == 2 * region.page_size
    assert region.addr % region.page_size == 0
    assert not region.closed


def test_kind_of_reports_each_kind(region_kind):
    """``mem.kind_of(addr)`` names the region's kind, its bounds and its page size."""
    region = region_kind
    kind, start, end, page_size = mem.kind_of(region.addr + region.length - 1)
    assert kind == region.kind
    assert start <= region.addr and region.addr + region.length <= end
    assert page_size == region.page_size


def test_kind_of_file_mapping_and_nothing(tmp_path):
    """A mapped regular file is "file"; an address with nothing mapped raises LookupError."""
    path = tmp_path / "data"
    path.write_bytes(bytes(PAGE))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), PAGE) as m:
        cell = ctypes.c_char.from_buffer(m)
        try:
            kind, start, end, page_size = mem.kind_of(ctypes.addressof(cell))
        finally:
            del cell  # drop the export before the mmap closes
    assert (kind, end - start, page_size) == ("file", PAGE, PAGE)
    with pytest.raises(LookupError):
        mem.kind_of(0x1000)


def test_private_memfd_regions_keep_the_kind(region_factory):
    """``shmem(private=True)`` is a MAP_PRIVATE shmem mapping: writes do not reach the memfd."""
    region = region_factory("shmem", pages=1, private=True)
    assert region.kind == "shmem" and region.private
    region.write(0, b"private")
    assert region.read(0, 7) == b"private"
    assert os.pread(region.memfd, 7, 0) == bytes(7)


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_align_places_the_start_on_the_boundary(region_factory, kind):
    """``align=2 MiB`` starts the mapping on a 2 MiB boundary."""
    region = region_factory(kind, pages=4, align=2 << 20)
    assert region.addr % (2 << 20) == 0
    assert mem.kind_of(region.addr)[1] == region.addr
    region.write(0, b"aligned")
    assert region.read(0, 7) == b"aligned"


def test_align_must_be_a_power_of_two():
    """A non power of two ``align`` is a ValueError."""
    with pytest.raises(ValueError, match="power of two"):
        mem.anon(PAGE, align=3 * PAGE)


@pytest.mark.parametrize("length", [0, PAGE + 1, -PAGE])
def test_length_must_be_whole_pages(length):
    """A zero, negative or partial-page length is a ValueError naming the page size."""
    with pytest.raises(ValueError, match=f"{PAGE}-byte page size"):
        mem.anon(length)


# -- alias -----------------------------------------------------------------------------


def test_shmem_alias_shares_contents(shmem_region, track_region):
    """An alias of shmem is a second mapping of the same memory, both ways."""
    alias = track_region(shmem_region.alias())
    assert alias.addr != shmem_region.addr
    assert (alias.kind, alias.length, alias.page_size) == ("shmem", shmem_region.length, PAGE)
    shmem_region.write(PAGE, b"from-original")
    assert alias.read(PAGE, 13) == b"from-original"
    alias.write(0, b"from-alias")
    assert shmem_region.read(0, 10) == b"from-alias"


def test_hugetlb_alias_shares_contents(region_factory, track_region):
    """An alias of a hugetlb region shares its huge pages."""
    region = region_factory("hugetlb", pages=1)
    alias = track_region(region.alias())
    region.write(HPAGE - 4, b"tail")
    assert alias.read(HPAGE - 4, 4) == b"tail"


def test_anon_alias_is_a_value_error(anon_region):
    """Anonymous memory has no second view: ``alias()`` raises ValueError."""
    with pytest.raises(ValueError, match="anonymous"):
        anon_region.alias()


# -- read / write / touch ------------------------------------------------------------------


def test_write_then_read_round_trips(anon_region):
    """``write`` then ``read`` returns the bytes, across a page boundary."""
    anon_region.write(PAGE - 3, b"across")
    assert anon_region.read(PAGE - 3, 6) == b"across"
    assert anon_region.read(0, 0) == b""


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("read", (-1, 1)),
        ("read", (4 * PAGE - 1, 2)),
        ("read", (0, -1)),
        ("write", (4 * PAGE - 1, b"ab")),
        ("write", (-1, b"a")),
        ("touch", (0, 4 * PAGE + 1)),
        ("touch", (-PAGE, PAGE)),
    ],
)
def test_access_outside_the_region_is_a_value_error(anon_region, op, args):
    """``read``/``write``/``touch`` outside [0, length) raise ValueError and touch nothing."""
    with pytest.raises(ValueError, match="outside the region"):
        getattr(anon_region, op)(*args)


def test_touch_populates_and_write_touch_keeps_contents(anon_region):
    """``touch`` maps the pages it visits; ``touch(write=True)`` leaves the bytes unchanged."""
    anon_region.touch(0, PAGE)
    assert pagemap(anon_region.addr) & PM_PRESENT
    assert not pagemap(anon_region.addr + 2 * PAGE) & PM_PRESENT
    data = bytes(range(256)) * (4 * PAGE // 256)
    anon_region.write(0, data)
    anon_region.touch(0, anon_region.length, write=True)
    anon_region.touch(5, 2 * PAGE, write=True)  # sub-page start
    assert anon_region.read(0, anon_region.length) == data


def test_write_accepts_any_buffer(anon_region):
    """``write`` takes bytes, bytearray and memoryview."""
    anon_region.write(0, b"ab")
    anon_region.write(2, bytearray(b"cd"))
    anon_region.write(4, memoryview(b"ef"))
    assert anon_region.read(0, 6) == b"abcdef"


# -- closing ---------------------------------------------------------------------------------


def test_close_unmaps_and_twice_is_a_no_op():
    """``close()`` unmaps the region (``closed``); a second close does nothing; access fails."""
    region = mem.anon(PAGE)
    addr = region.addr
    region.close()
    assert region.closed
    region.close()
    with pytest.raises(LookupError):
        mem.kind_of(addr)
    with pytest.raises(ValueError, match="closed"):
        region.read(0, 1)


def test_context_manager_closes():
    """``with mem.shmem(...)`` closes the mapping and the memfd on exit."""
    with mem.shmem(PAGE) as region:
        memfd = region.memfd
        assert memfd is not None
        os.fstat(memfd)
    assert region.closed
    with pytest.raises(OSError) as info:
        os.fstat(memfd)
    assert info.value.errno == errno.EBADF


# -- huge pages ------------------------------------------------------------------------------


@pytest.mark.parametrize("hugetlb_pages", [2], indirect=True)
def test_hugetlb_region_with_reserved_pages(hugetlb_pages):
    """With huge pages reserved, ``mem.hugetlb`` maps them, 2 MiB aligned, usable end to end."""
    assert hugetlb_pages == HPAGE
    with mem.hugetlb(2 * HPAGE) as region:
        assert (region.kind, region.page_size) == ("hugetlb", HPAGE)
        assert region.addr % HPAGE == 0
        region.write(2 * HPAGE - 3, b"end")
        assert region.read(2 * HPAGE - 3, 3) == b"end"
        assert mem.kind_of(region.addr)[3] == HPAGE


def test_hugetlb_length_must_be_whole_huge_pages():
    """A hugetlb length that is not a multiple of the huge page size is a ValueError."""
    with pytest.raises(ValueError, match=f"{HPAGE}-byte page size"):
        mem.hugetlb(PAGE)


def test_hugetlb_without_pages_is_enomem_naming_nr_hugepages():
    """Without free huge pages, ``mem.hugetlb`` raises OSError ENOMEM mentioning nr_hugepages."""
    with hugepage_lock():
        try:
            nr = int(Path("/proc/sys/vm/nr_hugepages").read_text())
        except OSError as err:
            pytest.skip(f"cannot read vm.nr_hugepages: {err}")
        if nr != 0 or huge_available() != 0:
            pytest.skip(f"huge pages are available here (vm.nr_hugepages={nr})")
        with pytest.raises(OSError) as info:
            mem.hugetlb(HPAGE)
    assert info.value.errno == errno.ENOMEM
    assert "nr_hugepages" in str(info.value)
