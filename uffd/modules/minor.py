"""MINOR-fault ops: fill the page cache through another view of the memfd, then CONTINUE."""

from __future__ import annotations

from collections.abc import Callable

from uffd._mapping import Fault
from uffd._ops import UffdOps
from uffd._resolution import Resolution
from uffd.mem import Region

__all__ = ["MinorFillOps"]


class MinorFillOps(UffdOps):
    """Resolve MINOR faults of a shmem/hugetlb mapping registered with Mode.MINOR.

    A MINOR fault means the page is in the page cache but not mapped here.
    ``fill(offset, size)`` returns the bytes the page should hold (or None to
    keep what the page cache has); they are written through ``alias`` (a
    second, unregistered mapping of the same memfd: ``region.alias()``), and
    the fault is resolved with UFFDIO_CONTINUE. ``alias`` must map the memfd
    from offset 0, as ``Region.alias`` does; writing through it never
    faults on this handler, so the dispatch-thread rule holds.
    """

    def __init__(self, alias: Region, fill: Callable[[int, int], bytes | None]) -> None:
        self.alias = alias
        self.fill = fill
        self.filled = 0

    def handle_continue(self, fault: Fault) -> Resolution:
        """Write the page through the alias, then map it."""
        data = self.fill(fault.offset, fault.mapping.page_size)
        if data is not None:
            self.alias.write(fault.offset, data)
            self.filled += 1
        return Resolution.continue_()
