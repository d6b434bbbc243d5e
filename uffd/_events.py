"""Events read from a userfaultfd, and the one function that decodes them.

A ``struct uffd_msg`` is 32 bytes: an event code, reserved bytes, then a
24-byte union (userfaultfd(2), "Reading from the userfaultfd structure").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from uffd._errors import UffdError
from uffd._native import lib

if TYPE_CHECKING:
    from uffd._userfaultfd import Userfaultfd

__all__ = ["Event", "Fork", "PageFault", "Remap", "Remove", "Unmap", "decode_events"]

MSG_SIZE = 32
_HEADER = struct.Struct("=B3x4x")
_PAGEFAULT = struct.Struct("=8xQQI4x")
_FORK = struct.Struct("=8xI20x")
_TRIPLE = struct.Struct("=8xQQQ")
_PAIR = struct.Struct("=8xQQ8x")


@dataclass(frozen=True)
class PageFault:
    """A page fault (UFFD_EVENT_PAGEFAULT).

    ``address`` is as the kernel reports it: page-aligned unless the fd was
    opened with EXACT_ADDRESS. ``thread_id`` is the faulting thread's native
    id with THREAD_ID, else None.
    """

    address: int
    flags: int
    thread_id: int | None = None

    @property
    def write(self) -> bool:
        """The access was a write (UFFD_PAGEFAULT_FLAG_WRITE)."""
        return bool(self.flags & lib.UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        """A write to a write-protected page (UFFD_PAGEFAULT_FLAG_WP)."""
        return bool(self.flags & lib.UFFD_PAGEFAULT_FLAG_WP)

    @property
    def minor(self) -> bool:
        """A minor fault: the page is cached but not mapped (UFFD_PAGEFAULT_FLAG_MINOR)."""
        return bool(self.flags & lib.UFFD_PAGEFAULT_FLAG_MINOR)


@dataclass(frozen=True)
class Fork:
    """The registered process forked (UFFD_EVENT_FORK); ``uffd`` serves the child."""

    uffd: Userfaultfd


@dataclass(frozen=True)
class Remap:
    """A registered range moved with mremap (UFFD_EVENT_REMAP)."""

    old: int
    new: int
    length: int


@dataclass(frozen=True)
class Remove:
    """Pages were dropped by MADV_DONTNEED/MADV_REMOVE (UFFD_EVENT_REMOVE)."""

    start: int
    end: int


@dataclass(frozen=True)
class Unmap:
    """A registered range was unmapped (UFFD_EVENT_UNMAP)."""

    start: int
    end: int


Event = Union[PageFault, Fork, Remap, Remove, Unmap]  # noqa: UP007 - a runtime alias on 3.10

for _cls in (PageFault, Fork, Remap, Remove, Unmap):
    _cls.__module__ = "uffd"


def decode_events(
    data: bytes | memoryview,
    *,
    thread_ids: bool,
    adopt_fd: Callable[[int], Userfaultfd],
) -> list[Event]:
    """Decode whole ``uffd_msg`` records.

    ``thread_ids`` says whether THREAD_ID was negotiated (the field is
    meaningless otherwise); ``adopt_fd`` wraps a forked child's new fd.
    Raises ``UffdError`` for an event code this library does not know: it
    means the fd negotiated a feature we did not ask for.
    """
    events: list[Event] = []
    for offset in range(0, len(data) - len(data) % MSG_SIZE, MSG_SIZE):
        (code,) = _HEADER.unpack_from(data, offset)
        if code == lib.UFFD_EVENT_PAGEFAULT:
            flags, address, ptid = _PAGEFAULT.unpack_from(data, offset)
            events.append(PageFault(address, flags, ptid if thread_ids else None))
        elif code == lib.UFFD_EVENT_FORK:
            (ufd,) = _FORK.unpack_from(data, offset)
            events.append(Fork(adopt_fd(ufd)))
        elif code == lib.UFFD_EVENT_REMAP:
            events.append(Remap(*_TRIPLE.unpack_from(data, offset)))
        elif code == lib.UFFD_EVENT_REMOVE:
            events.append(Remove(*_PAIR.unpack_from(data, offset)))
        elif code == lib.UFFD_EVENT_UNMAP:
            events.append(Unmap(*_PAIR.unpack_from(data, offset)))
        else:
            raise UffdError(0, f"read from userfaultfd: unknown event code {code:#x}")
    return events
