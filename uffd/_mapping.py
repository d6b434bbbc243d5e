"""The mapping tables of a ``FaultHandler``: ``Mapping``, ``Fault``, per-fd lookup and ranges.

A ``Mapping`` is a registered range with its memory kind, modes, ops and the
ioctls honoured for it; a ``Fault`` is what a handler is given. Tables are
replaced whole on every change, so the dispatch thread reads them without a
lock (docs/dispatch.md, "Dispatch").
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import UnsupportedError, describe_range
from uffd._stats import Counters
from uffd._userfaultfd import Userfaultfd
from uffd.mem import Region, kind_of, page_sizes

if TYPE_CHECKING:
    from uffd._ops import UffdOps

_COPY_BIT = int(Ioctl.COPY)

__all__ = [
    "Fault",
    "Mapping",
    "Table",
    "Tables",
    "check_registrable",
    "describe_target",
    "required_features",
]


class Mapping:
    """A registered range ``[start, end)`` with its kind, modes, ops and honoured ioctls.

    ``ioctls`` is what the dispatch layer honours: ``ops.ioctls`` & the
    kernel's grant. ``stats`` counts its faults. The fd it is registered on
    (a forked child's mappings live on the child's fd) stays with the core:
    handlers see mappings, never the fd, so every ioctl goes through the
    dispatch layer's checks.
    A mapping split by an event (munmap, MADV_DONTNEED or mremap of a part)
    keeps, in each piece, the offsets of the range as registered: ``origin``
    is ``start``'s offset in that range (0 unless this is a later piece).
    ``honoured`` is ``ioctls`` as a plain int, for the fault path.
    """

    __slots__ = (
        "_ioctls",
        "_uffd",
        "end",
        "honoured",
        "kind",
        "mode",
        "ops",
        "origin",
        "page_size",
        "start",
        "stats",
    )

    def __init__(
        self,
        start: int,
        end: int,
        kind: str,
        mode: Mode,
        ops: UffdOps,
        page_size: int,
        uffd: Userfaultfd,
        ioctls: Ioctl = Ioctl(0),
    ) -> None:
        self.start = start
        self.end = end
        self.kind = kind
        self.mode = mode
        self.ops = ops
        self.page_size = page_size
        self._uffd = uffd
        self.ioctls = ioctls
        self.stats = Counters()
        self.origin = 0

    @property
    def ioctls(self) -> Ioctl:
        """The honoured ioctls: ``ops.ioctls`` & the kernel's grant."""
        return self._ioctls

    @ioctls.setter
    def ioctls(self, value: Ioctl) -> None:
        self._ioctls = Ioctl(value)
        self.honoured = int(value)  # the fault path tests plain ints: enum flag math costs µs

    @property
    def length(self) -> int:
        """``end - start``."""
        return self.end - self.start

    def check_install(self, offset: int, nbytes: int) -> None:
        """Refuse an install of ``nbytes`` at ``offset`` that is not whole pages inside.

        Raises UnsupportedError if COPY is not honoured here, ValueError for the range.
        """
        if not self.honoured & _COPY_BIT:
            raise UnsupportedError(f"install: COPY is not honoured on {self!r}")
        ps = self.page_size
        if offset % ps or nbytes % ps or offset < 0 or offset + nbytes > self.length:
            raise ValueError(
                f"install: offset {offset} + {nbytes} bytes is not whole pages inside {self!r}"
            )

    def _clone(self, start: int, end: int, uffd: Userfaultfd | None = None) -> Mapping:
        m = Mapping(
            start,
            end,
            self.kind,
            self.mode,
            self.ops,
            self.page_size,
            uffd or self._uffd,
            self.ioctls,
        )
        m.origin = self.origin + start - self.start
        return m

    def __repr__(self) -> str:
        return (
            f"<uffd.Mapping {self.kind} {describe_range(self.start, self.length)} "
            f"mode={self.mode!r} ops={type(self.ops).__name__} ioctls={self.ioctls!r}>"
        )


class Fault:
    """A page fault as handlers see it: ``address`` (page-aligned), ``offset`` (from the start
    of the range as registered, also in a piece of a split mapping), ``mapping``, ``kind``
    ("missing"|"minor"|"wp"), ``write``, ``thread_id``."""

    __slots__ = ("address", "kind", "mapping", "offset", "thread_id", "write")

    def __init__(
        self, address: int, mapping: Mapping, kind: str, write: bool, thread_id: int | None
    ) -> None:
        self.address = address
        self.offset = address - mapping.start + mapping.origin
        self.mapping = mapping
        self.kind = kind
        self.write = write
        self.thread_id = thread_id

    def __repr__(self) -> str:
        return (
            f"<uffd.Fault {self.kind} {self.address:#x} (+{self.offset:#x}) tid={self.thread_id}>"
        )


Mapping.__module__ = Fault.__module__ = "uffd"


def required_features(kind: str, mode: Mode) -> Feature:
    """The features an fd must have negotiated to serve ``mode`` on ``kind`` memory."""
    need = Feature(0)
    file_backed = kind in ("shmem", "hugetlb")
    if mode & Mode.MISSING and file_backed:
        need |= Feature.MISSING_SHMEM if kind == "shmem" else Feature.MISSING_HUGETLBFS
    if mode & Mode.MINOR:
        need |= Feature.MINOR_HUGETLBFS if kind == "hugetlb" else Feature.MINOR_SHMEM
    if mode & Mode.WP:
        need |= Feature.PAGEFAULT_FLAG_WP | (Feature.WP_HUGETLBFS_SHMEM if file_backed else 0)
    return need


def check_registrable(mapping: Mapping, mode: Mode, fd: Userfaultfd, where: str) -> None:
    """Refuse ``mode`` on ``mapping`` if its ops or ``fd``'s negotiated features do not allow it.

    Raises UnsupportedError saying who refused and why (``where`` names the range).
    """
    ops, fields = mapping.ops, {"op": "register", "addr": mapping.start, "length": mapping.length}
    if not ops.can_userfault(mapping, mode):
        raise UnsupportedError(
            f"{type(ops).__name__} refused {mode!r} on the {where}: it serves "
            f"{ops.features!r} (features derive from its handle_* methods)",
            **fields,
        )
    missing = required_features(mapping.kind, mode) & ~fd.features
    if missing:
        have = (
            "the kernel has it: pass it in features="
            if missing & fd.available == missing
            else "the kernel lacks it"
        )
        raise UnsupportedError(
            f"the handler's userfaultfd did not negotiate {missing!r}, needed for {mode!r} "
            f"on the {where} ({have})",
            **fields,
        )


class Table:
    """One fd's mappings, sorted by start; replaced whole on change so readers need no lock."""

    __slots__ = ("maps", "starts")

    def __init__(self, maps: list[Mapping]) -> None:
        self.maps = sorted(maps, key=lambda m: m.start)
        self.starts = [m.start for m in self.maps]

    def find(self, addr: int) -> Mapping | None:
        """The mapping holding ``addr``, or None."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            m = self.maps[i]
            if addr < m.end:
                return m
        return None


class Tables:
    """Every fd's ``Table`` (the handler's own fd, adopted ones, forked children's).

    The range arithmetic lives here: splitting at the edges of an unregister,
    a REMOVE or an UNMAP, moving pieces on a REMAP, copying a table for a
    forked child. Each change replaces a table whole, so the dispatch thread
    reads ``by_fd`` without a lock; changes are made under the handler's lock.
    """

    __slots__ = ("by_fd",)

    def __init__(self) -> None:
        self.by_fd: dict[int, Table] = {}

    def add_fd(self, fd: int) -> None:
        """Start an empty table for ``fd``."""
        self.by_fd[fd] = Table([])

    def remove_fd(self, fd: int) -> list[Mapping]:
        """Forget ``fd``'s table; its mappings (now retired)."""
        table = self.by_fd.pop(fd, None)
        return table.maps if table is not None else []

    def fd_of(self, m: Mapping) -> Userfaultfd:
        """The userfaultfd ``m`` is registered on (handlers never see it)."""
        return m._uffd

    def fd_number(self, m: Mapping) -> int:
        """``m``'s fd number, or -1 once that fd is closed."""
        return -1 if m._uffd.closed else m._uffd.fileno()

    def all(self) -> list[Mapping]:
        """Every mapping of every fd, sorted by start (then fd)."""
        tables = list(self.by_fd.values())  # a FORK may add a table meanwhile
        return sorted(
            (m for t in tables for m in t.maps), key=lambda m: (m.start, self.fd_number(m))
        )

    def overlapping(self, fd: int, start: int, end: int) -> list[Mapping]:
        """``fd``'s mappings that overlap [start, end)."""
        return [m for m in self.by_fd[fd].maps if m.start < end and start < m.end]

    def add(self, m: Mapping) -> None:
        """Add ``m`` to its fd's table."""
        fd = m._uffd.fileno()
        self.by_fd[fd] = Table([*self.by_fd[fd].maps, m])

    def holds(self, m: Mapping) -> bool:
        """``m`` is in its fd's table (registered here, not split or dropped since)."""
        table = self.by_fd.get(self.fd_number(m))
        return table is not None and m in table.maps

    def _split(self, fd: int, start: int, end: int) -> list[Mapping]:
        """Split fd's mappings at ``start`` and ``end``; return the pieces inside."""
        maps: list[Mapping] = []
        inside: list[Mapping] = []
        for m in self.by_fd[fd].maps:
            pieces = [m]
            for cut in (start, end):
                last = pieces[-1]
                if last.start < cut < last.end:
                    head, tail = last._clone(last.start, cut), last._clone(cut, last.end)
                    head.stats = last.stats  # the head keeps counting where the whole did
                    pieces[-1:] = [head, tail]
            for piece in pieces:
                (inside if start <= piece.start and piece.end <= end else maps).append(piece)
        self.by_fd[fd] = Table(maps + inside)
        return inside

    def drop(self, fd: int, start: int, end: int) -> list[Mapping]:
        """Remove [start, end) from fd's table (splitting what straddles it); the pieces removed."""
        inside = self._split(fd, start, end)
        self.by_fd[fd] = Table([m for m in self.by_fd[fd].maps if m not in inside])
        return inside

    def move(self, fd: int, old: int, new: int, length: int) -> list[Mapping]:
        """Apply an mremap of [old, old + length) to ``new``; the pieces moved."""
        moved = self._split(fd, old, old + length)
        rest = [m for m in self.by_fd[fd].maps if m not in moved]
        for m in moved:
            m.start, m.end = m.start - old + new, m.end - old + new
        self.by_fd[fd] = Table(rest + moved)
        return moved

    def copy_for_child(self, fd: int, child: Userfaultfd) -> list[Mapping]:
        """A forked child's table: a copy of every mapping of ``fd`` on ``child``."""
        copies = [m._clone(m.start, m.end, child) for m in self.by_fd[fd].maps]
        self.by_fd[child.fileno()] = Table(copies)
        return copies


def describe_target(
    target: Region | tuple[int, int],
    kind: str | None,
    page_size: int | None,
    ops: UffdOps | None,
    registered: bool,
) -> tuple[int, int, str, int]:
    """(addr, length, kind, page size) of a ``FaultHandler.register`` target, all checked.

    A page size is the memory's: the base page for anon and shmem, a huge
    page size of this host for hugetlb (for this process's memory, the one
    smaps reports). Raises ValueError (see ``register``).
    """
    found = None
    if isinstance(target, Region):
        addr, length = target.addr, target.length
        kind, found = kind or target.kind, target.page_size
    else:
        addr, length = target
        if kind is None and not registered:
            try:
                kind, _, _, found = kind_of(addr)
            except LookupError as err:
                raise ValueError(f"register: {err}: map the memory first") from None
        kind = kind or (ops.kind if ops is not None and ops.kind else "anon")
    allowed = [found] if found else page_sizes(kind)
    page_size = page_size or allowed[0]
    if page_size not in allowed:
        raise ValueError(
            f"register: page_size={page_size} is not a page size of this {kind} memory "
            f"({', '.join(map(str, allowed))}); leave it out to use the memory's own"
        )
    if length <= 0 or addr % page_size or length % page_size:
        raise ValueError(
            f"register: {describe_range(addr, length)} is not a positive multiple of the "
            f"{page_size}-byte page size of this {kind} memory"
        )
    return addr, length, kind, page_size
