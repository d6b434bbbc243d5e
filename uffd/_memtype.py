"""Memory types: the shipped kernel's ``struct vm_uffd_ops`` in Python (docs/dispatch.md).

In Linux 7.1 (the guest_memfd series, "mm, kvm: allow uffd support in
guest_memfd", v2 of 2026-03-06) a memory type opts in to userfaultfd(2)
with five callbacks and no bitmask: ``can_userfault``, ``get_folio_noalloc``,
``alloc_folio``, ``filemap_add`` and ``filemap_remove``. What a type may be
registered for follows from which of them it provides (``MemoryType.refusal``,
the kernel's ``vma_can_userfault``), and which fault a registered page
raises follows from ``get_folio_noalloc`` (``classify``, the kernel's
``__do_userfault``). ``mfill_copy`` is UFFDIO_COPY's callback sequence.

This layer sits under the policy ops (``UffdOps`` decides *what* a page
holds; the memory type says *where* pages live and whether one is there).
The built-in kinds are instances (``MEMORY_TYPES``); ``FileMemory`` is a
type whose page cache is a file user space fills with pwrite(2), never
mapping it: a shmem memfd standing in for guest_memfd.
"""

from __future__ import annotations

import errno as _errno
import mmap
import os
from typing import TYPE_CHECKING, Any, ClassVar

from uffd._constants import Mode
from uffd._errors import UffdError, UnsupportedError
from uffd._native import lib
from uffd._resolution import Resolution

if TYPE_CHECKING:
    from uffd._mapping import Mapping

__all__ = [
    "MEMORY_TYPES",
    "AnonMemory",
    "FileMemory",
    "Folio",
    "HugetlbMemory",
    "MemoryType",
    "classify",
    "mfill_copy",
]

_ALL_MODES = Mode.MISSING | Mode.WP | Mode.MINOR
_OPTIONAL = ("get_folio_noalloc", "alloc_folio", "filemap_add", "filemap_remove")


class Folio:
    """One page of a memory type, as the callbacks hand it to each other.

    ``pgoff`` is the page's index in the memory (the file's page index for a
    file, the page index in the mapping for anonymous memory); ``data`` is
    the page-sized buffer a folio from ``alloc_folio`` is filled through, and
    None for a folio ``get_folio_noalloc`` found (the page stays where it is:
    looking it up never copies or maps it).
    """

    __slots__ = ("data", "pgoff")

    def __init__(self, pgoff: int, data: bytearray | None = None) -> None:
        self.pgoff = pgoff
        self.data = data

    def __repr__(self) -> str:
        return f"<uffd.Folio pgoff={self.pgoff}{' new' if self.data is not None else ''}>"


class MemoryType:
    """A memory type's userfaultfd callbacks: ``struct vm_uffd_ops`` of Linux 7.1.

    ``can_userfault(mapping, mode)`` is required (the default accepts every
    mode, as shmem's and hugetlb's do). The others are optional; a subclass
    provides one by defining the method, and ``provides`` (derived at class
    creation) lists those it defines:

    - ``get_folio_noalloc(pgoff) -> Folio | None``: the page if the memory
      holds it, else None; never allocates. Needed for MINOR (UFFDIO_CONTINUE
      maps what it returns) and, for file-backed memory mapped at PTE level,
      for every registration (``__do_userfault`` looks each fault up with it);
    - ``alloc_folio(mapping, addr) -> Folio | None``: a new, not yet visible
      page for UFFDIO_COPY to fill; None when it cannot be had;
    - ``filemap_add(folio, mapping, addr)``: put the filled page into the
      memory's cache (raises OSError on failure);
    - ``filemap_remove(folio, mapping)``: undo ``filemap_add``.

    The kernel's ``inode`` argument is the instance itself (a memory type
    object is bound to its memory); its ``vma`` is the ``Mapping``, possibly
    None when the decision is asked for a kind rather than for a mapping.
    ``hugetlb`` types are special-cased by core mm, as in the series: only
    ``can_userfault`` is asked. ``anonymous`` types have no file.

    Calling context: the callbacks run on the FaultHandler's dispatch thread
    (through ``UffdOps`` handlers) or at registration; like handlers, they
    must not touch registered memory.
    """

    name: ClassVar[str] = "memory"
    hugetlb: ClassVar[bool] = False
    anonymous: ClassVar[bool] = False
    #: The optional callbacks the class defines (derived, never declared).
    provides: ClassVar[frozenset[str]] = frozenset()
    #: The modes those callbacks make possible (derived): WP always (page
    #: tables only), MISSING with alloc_folio, MINOR with get_folio_noalloc.
    modes: ClassVar[Mode] = Mode.WP

    get_folio_noalloc: Any = None
    alloc_folio: Any = None
    filemap_add: Any = None
    filemap_remove: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        provides = frozenset(n for n in _OPTIONAL if getattr(cls, n) is not None)
        if "filemap_add" in provides and "filemap_remove" not in provides:
            # The core calls filemap_remove when the page cannot be installed
            # after filemap_add: without it a failed UFFDIO_COPY leaves the page behind.
            raise TypeError(f"{cls.__qualname__} defines filemap_add but not filemap_remove")
        cls.provides = provides
        modes = Mode.WP
        if cls.hugetlb or "alloc_folio" in provides:
            modes |= Mode.MISSING
        if cls.hugetlb or "get_folio_noalloc" in provides:
            modes |= Mode.MINOR
        cls.modes = modes

    def can_userfault(self, mapping: Mapping | None, mode: Mode) -> bool:
        """May ``mapping`` of this type be registered with ``mode``? Default: yes."""
        return True

    def refusal(self, mapping: Mapping | None, mode: Mode) -> str | None:
        """Why registering ``mode`` is refused (``vma_can_userfault``), or None if allowed.

        The order is the kernel's: the mode itself (UFFDIO_REGISTER), the
        callbacks the type provides, then the type's own ``can_userfault``.
        """
        if not mode or int(mode) & ~int(_ALL_MODES):
            return f"{mode!r} is not a registration mode (name MISSING, WP and/or MINOR)"
        pte_file = not self.anonymous and not self.hugetlb
        if pte_file and "get_folio_noalloc" not in self.provides:
            return (
                f"{self.name} memory provides no get_folio_noalloc, which file-backed memory "
                "mapped at PTE level needs for every mode (__do_userfault looks each fault up)"
            )
        if mode & ~self.modes & (Mode.MISSING | Mode.MINOR):
            need = "get_folio_noalloc" if mode & ~self.modes & Mode.MINOR else "alloc_folio"
            return (
                f"{self.name} memory cannot serve {mode & ~self.modes!r}: it provides no {need} "
                f"(it provides {sorted(self.provides) or 'no optional callback'})"
            )
        if not self.can_userfault(mapping, mode):
            return f"{type(self).__name__}.can_userfault refused {mode!r}"
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} provides={sorted(self.provides)}>"


def _offset(mapping: Mapping, addr: int) -> int:
    """``addr``'s byte offset from the start of the range as registered (``Fault.offset``)."""
    # origin: a piece of a split mapping keeps the offsets of the whole range.
    return addr - mapping.start + mapping.origin


class AnonMemory(MemoryType):
    """Private anonymous memory: no page cache, so no MINOR (``anon_uffd_ops``)."""

    name = "anon"
    anonymous = True

    def can_userfault(self, mapping: Mapping | None, mode: Mode) -> bool:
        """Anything but MINOR: anonymous memory has no cache to find a page in."""
        return not mode & Mode.MINOR

    def alloc_folio(self, mapping: Mapping, addr: int) -> Folio:
        """A zeroed page for the core to copy into and install."""
        ps = mapping.page_size
        return Folio(_offset(mapping, addr) // ps, bytearray(ps))


class HugetlbMemory(MemoryType):
    """hugetlbfs: special-cased by core mm (the series leaves hugetlb out); every mode."""

    name = "hugetlb"
    hugetlb = True


def _cached_pages(fd: int, offset: int, length: int) -> int:
    """Pages of ``fd``'s page cache in ``[offset, offset + length)``, swapped-out ones included.

    cachestat counts a folio whatever its state (a fallocated, not yet
    written shmem page too, which SEEK_DATA calls a hole), and a shmem page
    that was swapped out as "evicted": it is still the file's page, and the
    fault path swaps it in and reports MINOR, so it counts as present.

    Raises:
        UnsupportedError: no cachestat(2) (Linux < 6.5) or a file it does not
            cover (hugetlbfs).
        OSError: anything else cachestat answered (EBADF, EPERM).
    """
    rc = int(lib.pyuffd_cached_pages(fd, offset, length))
    if rc >= 0:
        return rc
    err = -rc
    if err in (_errno.ENOSYS, _errno.EOPNOTSUPP):
        raise UnsupportedError(
            f"cachestat(2) on fd {fd}: {os.strerror(err)}; FileMemory looks pages up with it "
            "(Linux 6.5, not hugetlbfs) so as never to map the memory"
        )
    raise OSError(err, f"cachestat(2) on fd {fd}: {os.strerror(err)}")


class FileMemory(MemoryType):
    """Memory whose page cache is a file that user space fills: shmem (a memfd), 4 KiB pages.

    This is the guest_memfd shape: the handler writes a page into the file
    with pwrite(2) (``filemap_add``) and the faulting process maps it with
    UFFDIO_CONTINUE; the handler never maps the memory. ``fd`` is the file
    (the instance does not own it); ``offset`` is the file offset at which
    the registered range starts (0 when the whole memfd is mapped).
    Unbound (``fd=None``) it describes the shmem kind for registration
    decisions only; its page callbacks then raise ValueError.

    Requires Linux 6.5 (cachestat(2)) to look pages up.
    """

    name = "shmem"

    def __init__(self, fd: int | None = None, *, offset: int = 0) -> None:
        if offset < 0 or offset % mmap.PAGESIZE:
            raise ValueError(f"FileMemory offset must be page-aligned and >= 0, got {offset}")
        self.fd = fd
        self.offset = offset

    def _file(self) -> int:
        if self.fd is None:
            raise ValueError(
                "this FileMemory has no file (it stands for the shmem kind); "
                "use FileMemory(memfd) to look pages up or fill them"
            )
        return self.fd

    def pgoff(self, mapping: Mapping, addr: int) -> int:
        """The file page index behind ``addr`` (the kernel's ``linear_page_index``)."""
        return (self.offset + _offset(mapping, addr)) // mapping.page_size

    def get_folio_noalloc(self, pgoff: int) -> Folio | None:
        """The page at ``pgoff`` if the file's cache holds it, else None; reads nothing.

        Raises:
            UnsupportedError: no cachestat(2) (Linux < 6.5), or hugetlbfs.
            ValueError: this FileMemory has no file.
        """
        present = _cached_pages(self._file(), pgoff * mmap.PAGESIZE, mmap.PAGESIZE)
        return Folio(pgoff) if present else None

    def alloc_folio(self, mapping: Mapping, addr: int) -> Folio | None:
        """A page buffer for ``addr``; None past the end of the file (kvm_gmem_folio_alloc)."""
        pgoff = self.pgoff(mapping, addr)
        if pgoff * mapping.page_size >= os.fstat(self._file()).st_size:
            return None
        return Folio(pgoff, bytearray(mapping.page_size))

    def filemap_add(self, folio: Folio, mapping: Mapping, addr: int) -> None:
        """pwrite the folio's page into the file at its offset.

        Raises:
            OSError: pwrite failed or wrote less than a page (then ENOSPC);
                part of the page may have reached the file: ``filemap_remove``
                takes it out again.
        """
        data = folio.data
        if data is None:
            raise ValueError(f"filemap_add of {folio!r}: it has no data (not from alloc_folio)")
        at = folio.pgoff * len(data)
        written = os.pwrite(self._file(), data, at)
        if written != len(data):
            raise OSError(
                _errno.ENOSPC, f"short pwrite: {written} of {len(data)} bytes at offset {at}"
            )

    def filemap_remove(self, folio: Folio, mapping: Mapping) -> None:
        """Punch the page out of the file, so it is missing again (FALLOC_FL_PUNCH_HOLE).

        Raises:
            OSError: fallocate(2) refused (EOPNOTSUPP: the file cannot punch holes).
            ValueError: this FileMemory has no file.
        """
        ps = mapping.page_size
        rc = lib.pyuffd_punch_hole(self._file(), folio.pgoff * ps, ps)
        if rc < 0:
            raise OSError(
                -rc, f"punching page {folio.pgoff} out of fd {self.fd}: {os.strerror(-rc)}"
            )


#: The built-in kinds as memory types: what 6.18's core mm hard-codes, in callback form.
MEMORY_TYPES: dict[str, MemoryType] = {
    "anon": AnonMemory(),
    "shmem": FileMemory(),
    "hugetlb": HugetlbMemory(),
}


def classify(memory: MemoryType, mode: Mode, pgoff: int) -> str | None:
    """The userfault a fault on page ``pgoff`` raises, as ``__do_userfault`` decides it.

    The page is looked up with ``get_folio_noalloc``: found and registered
    MINOR → "minor"; not found and registered MISSING → "missing"; else None
    (no userfault: the fault is served as if unregistered). WP faults come
    from the page tables, not from here.

    Raises:
        UnsupportedError: the type has no ``get_folio_noalloc`` (it could not
            have been registered MISSING or MINOR).
    """
    if not mode & (Mode.MISSING | Mode.MINOR):
        return None
    if "get_folio_noalloc" not in memory.provides:
        raise UnsupportedError(f"{memory!r} cannot classify faults: no get_folio_noalloc")
    if memory.get_folio_noalloc(pgoff) is not None:
        return "minor" if mode & Mode.MINOR else None
    return "missing" if mode & Mode.MISSING else None


def mfill_copy(memory: MemoryType, mapping: Mapping, addr: int, data: Any) -> Resolution:
    """UFFDIO_COPY of ``data`` at ``addr`` as the shipped core runs it; the Resolution to install.

    ``alloc_folio`` → copy → ``filemap_add``. A type without a cache
    (anonymous) gets the filled page as a copy; a type with one has the page
    in its cache afterwards, and the faulting process maps it with CONTINUE.
    Where the kernel calls ``filemap_remove`` when the PTE cannot be installed,
    here it runs when ``filemap_add`` itself fails: a pwrite is not atomic,
    and half a page left in the file would be found by the next lookup.

    Raises:
        UnsupportedError: the type has no ``alloc_folio``.
        UffdError: no folio (ENOMEM), or ``filemap_add`` failed (its errno);
            the page was taken out of the cache again.
        ValueError: ``data`` is shorter than a page.
    """
    if "alloc_folio" not in memory.provides:
        raise UnsupportedError(f"{memory!r} cannot fill pages: no alloc_folio")
    folio = memory.alloc_folio(mapping, addr)
    if folio is None:
        raise UffdError(
            _errno.ENOMEM,
            f"{memory.name}.alloc_folio gave no page for {addr:#x} (past the end of the memory?)",
            op="copy",
            addr=addr,
        )
    buf = folio.data
    if buf is None:
        raise TypeError(f"{memory.name}.alloc_folio returned {folio!r} without a page buffer")
    page = memoryview(data).cast("B")
    if page.nbytes < len(buf):
        raise ValueError(f"mfill_copy: {page.nbytes} bytes of data, a page is {len(buf)}")
    buf[:] = page[: len(buf)]
    if "filemap_add" not in memory.provides:
        return Resolution.copy(buf)
    try:
        memory.filemap_add(folio, mapping, addr)
    except OSError as err:
        undone = "the page was taken out again"
        try:
            memory.filemap_remove(folio, mapping)
        except OSError as again:
            undone = f"taking the page out again failed too ({again.strerror})"
        raise UffdError(
            err.errno or _errno.EIO,
            f"{memory.name}.filemap_add of page {folio.pgoff} for {addr:#x} failed "
            f"({err.strerror or err}); {undone}; the fault takes the handler's fallback",
            op="copy",
            addr=addr,
        ) from err
    return Resolution.continue_()


for _cls in (MemoryType, FileMemory, Folio):  # exported from uffd
    _cls.__module__ = "uffd"
