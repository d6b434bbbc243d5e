"""guest_memfd-style ops: fill a shared memfd with pwrite, then CONTINUE; never map it.

The flow Firecracker's guest_memfd handlers use on Linux 7.1 (write into the
memory's file, then UFFDIO_CONTINUE), run on 6.18 with a shmem memfd
standing in for guest_memfd (docs/dispatch.md, "Where the emulation and
7.1 differ").
"""

from __future__ import annotations

from collections.abc import Callable

from uffd._constants import Mode
from uffd._errors import UnsupportedError
from uffd._mapping import Fault, Mapping
from uffd._memtype import FileMemory, MemoryType, classify, mfill_copy
from uffd._ops import UffdOps
from uffd._resolution import Resolution

__all__ = ["GuestMemfdOps"]

_BOTH = Mode.MISSING | Mode.MINOR


class GuestMemfdOps(UffdOps):
    """Serve a process whose memory is a shared memfd, without mapping the memfd here.

    ``memfd`` is the memory's file (an fd, or a ``FileMemory`` for one);
    ``fill(offset, size)`` returns the ``size`` bytes the page at file
    ``offset`` must hold (from a snapshot, over a network). Register the
    mapping with ``Mode.MISSING | Mode.MINOR``.

    A fault is classified as ``__do_userfault`` does it: by asking the file
    whether it holds the page. Not there (MISSING): the page is filled with
    pwrite(2) and the fault resolved with UFFDIO_CONTINUE (``mfill_copy``);
    there (MINOR, or a MISSING fault whose page was filled since it was
    raised): UFFDIO_CONTINUE maps it as it is. The handler process never has
    the memory mapped, as guest_memfd's secret-free VMs require: it only
    writes the file. ``filled`` and ``continued`` count the two outcomes.

    A failed pwrite is the fault's error (recorded, re-raised from
    ``FaultHandler.stop()``); the part of the page that reached the file is
    punched out again and the fault takes the handler's fallback.

    Calling context: the handlers (and so ``fill``) run on the
    FaultHandler's dispatch thread while the faulting thread waits; the
    counters are that thread's to write.

    Requires Linux 5.14 (UFFD_FEATURE_MINOR_SHMEM) and 6.5 (cachestat(2),
    which looks pages up without mapping them).
    """

    kind = "shmem"

    def __init__(self, memfd: int | FileMemory, fill: Callable[[int, int], bytes]) -> None:
        self.memory = memfd if isinstance(memfd, FileMemory) else FileMemory(memfd)
        self.fill = fill
        self.filled = 0
        self.continued = 0

    def memory_type(self, mapping: Mapping | None) -> MemoryType:
        """The memfd's own memory type, whatever the mapping's kind says."""
        return self.memory

    def can_userfault(self, mapping: Mapping | None, mode: Mode) -> bool:
        """Only ``Mode.MISSING | Mode.MINOR``; the memfd type decides the rest.

        Raises:
            UnsupportedError: another mode, saying why both are needed.
        """
        if Mode(mode) & _BOTH != _BOTH:
            raise UnsupportedError(
                f"GuestMemfdOps needs Mode.MISSING | Mode.MINOR, not {Mode(mode)!r}: without "
                "MISSING the kernel fills holes with zeros without asking, without MINOR "
                "UFFDIO_CONTINUE is not granted",
                op="register",
            )
        return super().can_userfault(mapping, mode)

    def handle_missing(self, fault: Fault) -> Resolution:
        """Fill the page through the file unless it got there since the fault; then CONTINUE."""
        pgoff = self.memory.pgoff(fault.mapping, fault.address)
        if classify(self.memory, fault.mapping.mode, pgoff) == "minor":
            self.continued += 1
            return Resolution.continue_()
        size = fault.mapping.page_size
        resolution = mfill_copy(
            self.memory, fault.mapping, fault.address, self.fill(pgoff * size, size)
        )
        self.filled += 1
        return resolution

    def handle_continue(self, fault: Fault) -> Resolution:
        """The page is in the file: map it."""
        self.continued += 1
        return Resolution.continue_()
