"""The mapping table of a ``FaultHandler``: ``Mapping``, ``Fault`` and per-fd lookup.

A ``Mapping`` is a registered range with its memory kind, modes, ops and the
ioctls honoured for it; a ``Fault`` is what a handler is given. Tables are
replaced whole on every change, so the dispatch thread reads them without a
lock (docs/dispatch.md, "Dispatch").
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import describe_range
from uffd._native import lib
from uffd._stats import Counters
from uffd._userfaultfd import Userfaultfd

if TYPE_CHECKING:
    from uffd._ops import UffdOps
    from uffd._resolution import Resolution

__all__ = ["Fault", "Mapping", "Table", "required_features"]


class Mapping:
    """A registered range ``[start, end)`` with its kind, modes, ops and honoured ioctls.

    ``ioctls`` is what the dispatch layer honours: ``ops.ioctls`` & the
    kernel's grant. ``stats`` counts its faults. The fd it is registered on
    (a forked child's mappings live on the child's fd) stays with the core:
    handlers see mappings, never the fd, so every ioctl goes through the
    dispatch layer's checks.
    A mapping split by an event (munmap, MADV_DONTNEED or mremap of a part)
    keeps, in each piece, the offsets of the range as registered.
    """

    __slots__ = (
        "_fallback",
        "_honoured",
        "_ioctls",
        "_origin",
        "_uffd",
        "end",
        "kind",
        "mode",
        "ops",
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
        self._fallback = lib.PYUFFD_FALLBACK_ZEROPAGE
        # Offset of ``start`` in the range as registered: non-zero for the tail of a split.
        self._origin = 0

    @property
    def ioctls(self) -> Ioctl:
        """The honoured ioctls: ``ops.ioctls`` & the kernel's grant."""
        return self._ioctls

    @ioctls.setter
    def ioctls(self, value: Ioctl) -> None:
        self._ioctls = Ioctl(value)
        self._honoured = int(value)  # the fault path tests plain ints

    @property
    def length(self) -> int:
        """``end - start``."""
        return self.end - self.start

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
        m._fallback = self._fallback
        m._origin = self._origin + start - self.start
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

    __slots__ = (
        "_early",
        "_slot",
        "_t_ns",
        "address",
        "kind",
        "mapping",
        "offset",
        "thread_id",
        "write",
    )

    def __init__(
        self,
        address: int,
        mapping: Mapping,
        kind: str,
        write: bool,
        thread_id: int | None,
        slot: int,
        t_ns: int,
    ) -> None:
        self.address = address
        self.offset = address - mapping.start + mapping._origin
        self.mapping = mapping
        self.kind = kind
        self.write = write
        self.thread_id = thread_id
        self._slot = slot
        self._t_ns = t_ns
        # None while the handler runs; then _DEFER once deferred, or an early answer.
        self._early: Resolution | None = None

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


class Table:
    """One fd's mappings, sorted by start; replaced whole on change so readers need no lock."""

    __slots__ = ("maps", "starts")

    def __init__(self, maps: list[Mapping]) -> None:
        self.maps = sorted(maps, key=lambda m: m.start)
        self.starts = [m.start for m in self.maps]

    def find(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            m = self.maps[i]
            if addr < m.end:
                return m
        return None
