"""Memory to register: anonymous, shmem (memfd) and hugetlb (memfd MFD_HUGETLB) regions.

``Region.read``, ``write`` and ``touch`` run in C with the GIL released, so
another Python thread (a FaultHandler) can resolve the faults they raise,
and they are SIGBUS-safe: an access that hits a poisoned page (or a missing
page with UFFD_FEATURE_SIGBUS) raises ``uffd.PageAccessError`` instead of
killing the process. Plain Python access to registered memory
(``ctypes.string_at``, a memoryview over it) holds the GIL while it faults;
see the GIL warning in ``uffd.Userfaultfd``.
"""

from __future__ import annotations

import errno as _errno
import mmap
import operator
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from uffd._errors import PageAccessError, check, describe_range
from uffd._native import ffi, lib

__all__ = [
    "Region",
    "anon",
    "huge_page_size",
    "hugetlb",
    "kind_of",
    "page_sizes",
    "shmem",
    "userfault_registered",
    "write_at",
]

PAGE_SIZE = mmap.PAGESIZE
_MAP_FAILED = 2**64 - 1
_MAX_LENGTH = 1 << 63


def huge_page_size() -> int:
    """The default huge page size (Hugepagesize in /proc/meminfo), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    raise OSError(
        _errno.ENOTSUP, "this kernel has no hugetlb support (no Hugepagesize in /proc/meminfo)"
    )


def page_sizes(kind: str) -> list[int]:
    """The page sizes ``kind`` memory can have here, the default first.

    anon and shmem map base pages as far as userfaultfd is concerned (a THP
    is still registered and resolved page by page); hugetlb has one size per
    /sys/kernel/mm/hugepages pool.
    """
    if kind != "hugetlb":
        return [PAGE_SIZE]
    pools = Path("/sys/kernel/mm/hugepages")
    sizes = sorted(int(p.name.split("-")[1][:-2]) * 1024 for p in pools.glob("hugepages-*kB"))
    try:
        default = huge_page_size()
    except OSError:
        return sizes
    return [default, *(s for s in sizes if s != default)]


def _mmap_hint(err: int, what: str) -> str:
    """The remedy to append to an mmap failure message, if there is one."""
    if err == _errno.ENOMEM and "hugetlb" in what:
        return " (reserve huge pages first: echo N > /proc/sys/vm/nr_hugepages)"
    return ""


def _mmap(length: int, prot: int, flags: int, fd: int, what: str) -> int:
    addr = int(ffi.cast("uintptr_t", lib.mmap(ffi.NULL, length, prot, flags, fd, 0)))
    if addr == _MAP_FAILED:
        err = ffi.errno
        hint = _mmap_hint(err, what)
        raise OSError(err, f"mmap of {length} bytes for {what} failed: {os.strerror(err)}{hint}")
    return addr


def _munmap(addr: int, length: int) -> None:
    if length and lib.munmap(ffi.cast("void *", addr), length) != 0:
        err = ffi.errno
        raise OSError(err, f"munmap {describe_range(addr, length)}: {os.strerror(err)}")


def _map_aligned(length: int, align: int | None, prot: int, flags: int, fd: int, what: str) -> int:
    """mmap ``length`` bytes, starting on an ``align`` boundary when asked."""
    if align is None:
        return _mmap(length, prot, flags, fd, what)
    if align <= 0 or align & (align - 1) or align >= _MAX_LENGTH:
        raise ValueError(f"align must be a positive power of two below 2**63, got {align}")
    # Reserve length + align of nothing, then place the real mapping inside it.
    span = length + align
    base = _mmap(
        span, lib.PROT_NONE, lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE, -1, what
    )
    start = (base + align - 1) & ~(align - 1)
    placed = int(
        ffi.cast(
            "uintptr_t",
            lib.mmap(ffi.cast("void *", start), length, prot, flags | lib.MAP_FIXED, fd, 0),
        )
    )
    if placed == _MAP_FAILED:
        err = ffi.errno
        _munmap(base, span)
        hint = _mmap_hint(err, what)
        raise OSError(
            err, f"mmap of {length} bytes for {what} at {start:#x}: {os.strerror(err)}{hint}"
        )
    _munmap(base, start - base)
    _munmap(start + length, base + span - start - length)
    return start


class Region:
    """A mapping made by ``anon``, ``shmem`` or ``hugetlb``; owns the mapping (and memfd).

    Attributes: ``addr``, ``length``, ``page_size``, ``kind`` ("anon",
    "shmem", "hugetlb"), ``private`` (memfd mapped MAP_PRIVATE), ``memfd``
    (the memfd's fd, or None for anon). ``close()`` unmaps (idempotent); other
    calls on a closed region raise ValueError.
    """

    def __init__(
        self, addr: int, length: int, page_size: int, kind: str, memfd: int | None, private: bool
    ) -> None:
        self.addr = addr
        self.length = length
        self.page_size = page_size
        self.kind = kind
        self.memfd = memfd
        self.private = private
        self._closed = False

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<uffd.mem.Region {self.kind} {describe_range(self.addr, self.length)}{state}>"

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran."""
        return self._closed

    def _span(self, op: str, offset: Any, n: Any) -> int:
        """Check [offset, offset+n) lies inside the region; return its address."""
        if self._closed:
            raise ValueError(f"Region.{op} on a closed region")
        offset, n = operator.index(offset), operator.index(n)
        if offset < 0 or n < 0 or offset + n > self.length:
            raise ValueError(
                f"Region.{op}: offset {offset} + {n} bytes is outside the "
                f"region of {self.length} bytes"
            )
        return self.addr + int(offset)

    def read(self, offset: int, n: int) -> bytes:
        """Copy ``n`` bytes at ``offset`` out of the region (GIL released, SIGBUS-safe)."""
        addr = self._span("read", offset, n)
        out = bytearray(n)
        fault = ffi.new("uint64_t *")
        rc = lib.pyuffd_mem_read(ffi.from_buffer(out), addr, n, fault)
        _raise_access("Region.read", rc, fault, addr, n)
        return bytes(out)

    def write(self, offset: int, data: Any) -> None:
        """Copy ``data`` (any buffer) into the region at ``offset`` (GIL released, SIGBUS-safe)."""
        with memoryview(data) as view, view.cast("B") as flat:
            _write(self._span("write", offset, flat.nbytes), flat, "Region.write")

    def touch(self, offset: int, n: int, write: bool = False) -> None:
        """Access one byte per page from ``offset`` over ``n`` bytes.

        ``write=True`` does an atomic add of zero: a write access that leaves
        the contents unchanged. The first access is at ``offset`` itself, so
        a sub-page offset reaches the kernel (EXACT_ADDRESS).
        """
        addr = self._span("touch", offset, n)
        fault = ffi.new("uint64_t *")
        rc = lib.pyuffd_mem_touch(addr, n, self.page_size, int(write), fault)
        _raise_access("Region.touch", rc, fault, addr, n)

    def madvise(self, advice: int, offset: int = 0, length: int | None = None) -> None:
        """madvise(2) on part of the region (MADV_DONTNEED, MADV_REMOVE, ...)."""
        length = self.length - offset if length is None else length
        addr = self._span("madvise", offset, length)
        if lib.madvise(ffi.cast("void *", addr), length, advice) != 0:
            err = ffi.errno
            raise OSError(
                err, f"madvise({advice}) on {describe_range(addr, length)}: {os.strerror(err)}"
            )

    def mremap(self) -> int:
        """Move the mapping to a new address (mremap MAYMOVE|FIXED); returns the old address."""
        if self._closed:
            raise ValueError("Region.mremap on a closed region")
        target = _mmap(
            self.length,
            lib.PROT_NONE,
            lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_NORESERVE,
            -1,
            "mremap target",
        )
        moved = int(
            ffi.cast(
                "uintptr_t",
                lib.mremap(
                    ffi.cast("void *", self.addr),
                    self.length,
                    self.length,
                    lib.MREMAP_MAYMOVE | lib.MREMAP_FIXED,
                    ffi.cast("void *", target),
                ),
            )
        )
        if moved == _MAP_FAILED:
            err = ffi.errno
            _munmap(target, self.length)
            raise OSError(
                err, f"mremap of {describe_range(self.addr, self.length)}: {os.strerror(err)}"
            )
        old, self.addr = self.addr, moved
        return old

    def alias(self) -> Region:
        """A second MAP_SHARED mapping of the same memfd (shmem and hugetlb only)."""
        if self.memfd is None:
            raise ValueError(
                "Region.alias: anonymous memory has no second view; use shmem or hugetlb"
            )
        if self._closed:
            raise ValueError("Region.alias on a closed region")
        fd = os.dup(self.memfd)
        try:
            addr = _mmap(
                self.length,
                lib.PROT_READ | lib.PROT_WRITE,
                lib.MAP_SHARED,
                fd,
                f"{self.kind} alias",
            )
        except BaseException:
            os.close(fd)
            raise
        return Region(addr, self.length, self.page_size, self.kind, fd, False)

    def close(self) -> None:
        """Unmap the region and close its memfd; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        _munmap(self.addr, self.length)
        if self.memfd is not None:
            os.close(self.memfd)

    def __enter__(self) -> Region:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A backstop only: a region registered on a live handler must be closed explicitly.
        if not getattr(self, "_closed", True):
            self.close()


def _raise_access(op: str, rc: int, fault: Any, addr: int, n: int) -> None:
    if rc == -_errno.EFAULT:
        where = int(fault[0])
        raise PageAccessError(
            f"{op} {describe_range(addr, n)}: SIGBUS at {where:#x} "
            "(a poisoned page, or a missing page with UFFD_FEATURE_SIGBUS)",
            address=where,
            op=op.rsplit(".", 1)[-1],
            length=n,
        )
    check(rc, op, addr, n)


def _write(addr: int, flat: memoryview, op: str) -> None:
    fault = ffi.new("uint64_t *")
    with ffi.from_buffer(flat) as src:
        rc = lib.pyuffd_mem_write(addr, src, flat.nbytes, fault)
    _raise_access(op, rc, fault, addr, flat.nbytes)


def write_at(addr: int, data: Any) -> None:
    """Copy ``data`` (any buffer) into this process's memory at ``addr``.

    GIL released and SIGBUS-safe, like ``Region.write``, for memory no
    Region describes (the FaultHandler's copy over a present page).

    Raises:
        PageAccessError: the write hit SIGBUS.
        UffdError: EFAULT-like failures of the access itself.
    """
    with memoryview(data) as view, view.cast("B") as flat:
        _write(addr, flat, "write_at")


def _check_length(length: Any, page_size: int, what: str) -> int:
    length = operator.index(length)
    if length <= 0 or length % page_size:
        raise ValueError(
            f"{what}: length must be a positive multiple of the {page_size}-byte "
            f"page size, got {length}"
        )
    if length >= _MAX_LENGTH:
        # mmap takes a size_t and ftruncate an off_t: larger would be an OverflowError.
        raise ValueError(f"{what}: length {length} is larger than any address space")
    return int(length)


def anon(length: int, *, align: int | None = None) -> Region:
    """A private anonymous mapping (MAP_PRIVATE|MAP_ANONYMOUS), read-write."""
    length = _check_length(length, PAGE_SIZE, "uffd.mem.anon")
    flags = lib.MAP_PRIVATE | lib.MAP_ANONYMOUS
    addr = _map_aligned(length, align, lib.PROT_READ | lib.PROT_WRITE, flags, -1, "anon")
    return Region(addr, length, PAGE_SIZE, "anon", None, True)


def _memfd_region(
    kind: str, length: int, page_size: int, memfd_flags: int, private: bool, align: int | None
) -> Region:
    fd = os.memfd_create(f"pyuffd-{kind}", os.MFD_CLOEXEC | memfd_flags)
    try:
        os.ftruncate(fd, length)
        flags = lib.MAP_PRIVATE if private else lib.MAP_SHARED
        addr = _map_aligned(length, align, lib.PROT_READ | lib.PROT_WRITE, flags, fd, kind)
    except BaseException:
        os.close(fd)
        raise
    return Region(addr, length, page_size, kind, fd, private)


def shmem(length: int, *, private: bool = False, align: int | None = None) -> Region:
    """A memfd (shmem) mapping; ``private=True`` maps it MAP_PRIVATE."""
    length = _check_length(length, PAGE_SIZE, "uffd.mem.shmem")
    return _memfd_region("shmem", length, PAGE_SIZE, 0, private, align)


def hugetlb(length: int, *, private: bool = False, align: int | None = None) -> Region:
    """A hugetlb memfd mapping (MFD_HUGETLB, default huge page size).

    Raises OSError(ENOMEM) with the remedy when no huge pages are reserved.
    """
    size = huge_page_size()
    length = _check_length(length, size, "uffd.mem.hugetlb")
    return _memfd_region("hugetlb", length, size, os.MFD_HUGETLB, private, align or size)


# VmFlags of a range registered with a userfaultfd: missing, wp, minor (proc(5)).
_UFFD_FLAGS = frozenset({"um", "uw", "ui"})


def userfault_registered(addr: int, length: int) -> bool:
    """Is any part of [addr, addr + length) of this process registered with a userfaultfd?

    Read from /proc/self/smaps (VmFlags um/uw/ui): the kernel's own view, which
    survives neither an munmap nor a new mapping over the range.
    """
    start = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(None, 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            start = lo if lo < addr + length and addr < hi else None
        elif start is not None and line.startswith("VmFlags:") and _UFFD_FLAGS & set(line.split()):
            return True
    return False


def kind_of(addr: int) -> tuple[str, int, int, int]:
    """Memory kind of the mapping holding ``addr``, from /proc/self/smaps.

    Returns (kind, start, end, page_size) with kind "anon", "shmem",
    "hugetlb" or "file". Raises LookupError when nothing is mapped there.
    """
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split(None, 5)
        if "-" not in head[0] or len(head) < 5 or ":" in head[0]:
            continue
        start, end = (int(x, 16) for x in head[0].split("-"))
        if not start <= addr < end:
            continue
        path = head[5] if len(head) > 5 else ""
        page_size = PAGE_SIZE
        for detail in lines[i + 1 : i + 30]:
            if detail.startswith("KernelPageSize:"):
                page_size = int(detail.split()[1]) * 1024
                break
        if page_size > PAGE_SIZE:
            kind = "hugetlb"
        elif not path or path.startswith("["):
            kind = "anon"
        elif path.startswith(("/memfd:", "/dev/zero", "/SYSV", "/dev/shm/")):
            kind = "shmem"
        else:
            kind = "file"
        return kind, start, end, page_size
    raise LookupError(f"no mapping contains {addr:#x}")
