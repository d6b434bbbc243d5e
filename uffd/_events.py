"""Events read from a userfaultfd, and the one function that decodes them.

A ``struct uffd_msg`` is an event code, reserved bytes, then a union
(userfaultfd(2), "Reading from the userfaultfd structure"); ``decode`` is the
one place that reads it, for ``Userfaultfd.read_events`` and for the fault
pump's items alike.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

from uffd._errors import UffdError
from uffd._native import ffi, lib

if TYPE_CHECKING:
    from uffd._userfaultfd import Userfaultfd

__all__ = ["Event", "Fork", "PageFault", "Remap", "Remove", "Unmap", "decode", "decode_events"]

# The layout comes from the compiled headers (cffi), never typed here.
MSG_SIZE = ffi.sizeof("struct uffd_msg")
_EVENT_AT = ffi.offsetof("struct uffd_msg", "event")
_ARG_AT = ffi.offsetof("struct uffd_msg", "arg")
_ARG_WORDS = (MSG_SIZE - _ARG_AT) // 8  # the union, as u64 words


def record_struct(fields: list[tuple[int, str]], msg_at: int, size: int) -> struct.Struct:
    """A ``struct.Struct`` for a ``size``-byte record holding a uffd_msg at ``msg_at``.

    ``fields`` are (offset, format code) pairs before the message; the
    message unpacks as (event, w0, w1, w2): its code and the union's u64
    words, which ``decode`` reads per event. Offsets come from ffi, so the
    same record read by C and by Python cannot disagree.
    """
    fmt, at = "=", 0
    msg = [(msg_at + _EVENT_AT, "B"), *((msg_at + _ARG_AT + 8 * i, "Q") for i in range(_ARG_WORDS))]
    for offset, code in [*fields, *msg]:
        fmt += f"{offset - at}x{code}" if offset > at else code
        at = offset + struct.calcsize("=" + code)
    record = struct.Struct(fmt + (f"{size - at}x" if size > at else ""))
    assert record.size == size, (fmt, size)
    return record


_MSG = record_struct([], 0, MSG_SIZE)
PAGEFAULT = int(lib.UFFD_EVENT_PAGEFAULT)
FLAG_WRITE = int(lib.UFFD_PAGEFAULT_FLAG_WRITE)
FLAG_WP = int(lib.UFFD_PAGEFAULT_FLAG_WP)
FLAG_MINOR = int(lib.UFFD_PAGEFAULT_FLAG_MINOR)


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


def decode(
    code: int,
    words: tuple[int, int, int],
    *,
    thread_ids: bool,
    adopt_fd: Callable[[int], Userfaultfd],
) -> Event:
    """The event of one ``uffd_msg``: its ``code`` and the union's u64 ``words``.

    ``thread_ids`` says whether THREAD_ID was negotiated (the field is
    meaningless otherwise); ``adopt_fd`` wraps a forked child's new fd.
    Raises ``UffdError`` for an event code this library does not know: it
    means the fd negotiated a feature we did not ask for.
    """
    a, b, c = words
    if code == lib.UFFD_EVENT_PAGEFAULT:
        # feat.ptid is the union's third word's low half (a u32 on a little-endian host).
        return PageFault(b, a, (c & 0xFFFFFFFF) if thread_ids else None)
    if code == lib.UFFD_EVENT_FORK:
        return Fork(adopt_fd(a & 0xFFFFFFFF))
    if code == lib.UFFD_EVENT_REMAP:
        return Remap(a, b, c)
    if code == lib.UFFD_EVENT_REMOVE:
        return Remove(a, b)
    if code == lib.UFFD_EVENT_UNMAP:
        return Unmap(a, b)
    raise UffdError(0, f"read from userfaultfd: unknown event code {code:#x}")


def decode_events(
    data: bytes | memoryview,
    *,
    thread_ids: bool,
    adopt_fd: Callable[[int], Userfaultfd],
) -> list[Event]:
    """Decode whole ``uffd_msg`` records (see ``decode``)."""
    with memoryview(data) as view, view[: len(view) - len(view) % MSG_SIZE] as whole:
        return [
            decode(code, (a, b, c), thread_ids=thread_ids, adopt_fd=adopt_fd)
            for code, a, b, c in _MSG.iter_unpack(whole)
        ]
