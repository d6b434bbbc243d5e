"""The error hierarchy and the one place where a C return code becomes one.

C returns ``-errno``; :func:`check` turns that into the right exception
subclass with a message that says which operation failed, on which range,
and what to do about it. Every subclass keeps ``errno`` (they are OSErrors),
plus the structured fields ``op``, ``addr``, ``length`` and ``done``.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "DeadlineExceededError",
    "HandlerRefusedError",
    "MappingChangedError",
    "NoMappingError",
    "PageAccessError",
    "PageExistsError",
    "ProcessGoneError",
    "UffdError",
    "UnsupportedError",
    "check",
    "describe_range",
]


class UffdError(OSError):
    """A userfaultfd operation failed; ``errno``, ``op``, ``addr``, ``length``, ``done``."""

    def __init__(
        self,
        err: int,
        message: str,
        *,
        op: str | None = None,
        addr: int | None = None,
        length: int | None = None,
        done: int = 0,
    ) -> None:
        super().__init__(err, message)
        self.op = op
        self.addr = addr
        self.length = length
        self.done = done

    def __str__(self) -> str:
        return str(self.strerror)


class PageExistsError(UffdError):
    """EEXIST: a page is already mapped at the destination (another resolver won the race)."""


class MappingChangedError(UffdError):
    """EAGAIN: the mappings changed under the operation; ``done`` bytes were completed.

    Read the pending events (a REMOVE, REMAP or UNMAP), then retry the rest.
    """


class NoMappingError(UffdError):
    """ENOENT: the range is no longer mapped or registered (unmapped, or mm gone)."""


class ProcessGoneError(UffdError):
    """ESRCH: the process whose memory this fd serves has exited."""


class UnsupportedError(UffdError):
    """A feature, mode or ioctl that the kernel or the mapping's ops do not honour.

    Raised before the kernel is called when the refusal is known; ``errno`` is
    EINVAL, what the kernel itself would answer.
    """

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(_errno.EINVAL, message, **fields)  # type: ignore[arg-type]


class PageAccessError(UffdError):
    """A Region access hit SIGBUS (a poisoned page, or UFFD_FEATURE_SIGBUS); see ``address``."""

    def __init__(self, message: str, *, address: int, **fields: object) -> None:
        super().__init__(_errno.EFAULT, message, addr=address, **fields)  # type: ignore[arg-type]
        self.address = address


class DeadlineExceededError(UffdError):
    """A fault was not resolved within the deadline; the fallback resolved it."""

    def __init__(self, message: str, *, address: int, thread_id: int | None) -> None:
        super().__init__(_errno.ETIMEDOUT, message, op="fault", addr=address)
        self.address = address
        self.thread_id = thread_id


class HandlerRefusedError(UffdError):
    """A handler answered ``Resolution.refuse(reason)``; the fallback resolved the fault."""


for _cls in (
    UffdError,
    DeadlineExceededError,
    HandlerRefusedError,
    PageExistsError,
    MappingChangedError,
    NoMappingError,
    ProcessGoneError,
    UnsupportedError,
    PageAccessError,
):
    _cls.__module__ = "uffd"

_BY_ERRNO: dict[int, type[UffdError]] = {
    _errno.EEXIST: PageExistsError,
    _errno.EAGAIN: MappingChangedError,
    _errno.ENOENT: NoMappingError,
    _errno.ESRCH: ProcessGoneError,
}

# What to do, per errno, for the ioctls; kept short and concrete.
_ADVICE: dict[int, str] = {
    _errno.EEXIST: "a page is already there; treat the fault as resolved and wake the range",
    _errno.EAGAIN: "the mappings changed (an unread REMOVE/REMAP/UNMAP event); "
    "read the events, then retry the remaining bytes",
    _errno.ENOENT: "the range is not mapped or not registered any more",
    _errno.ESRCH: "the process that owned this memory has exited; stop serving it",
    _errno.EINVAL: "the kernel rejected the arguments: check the range is registered with a "
    "mode that allows this ioctl, page-aligned for its memory type, and the mode bits",
    _errno.EFAULT: "the source or destination address is not accessible",
    _errno.ENOMEM: "the kernel could not allocate memory or a huge page (check nr_hugepages)",
    _errno.EBUSY: "the range is busy (already registered on another userfaultfd?)",
    _errno.EPERM: "not permitted: see `python -m uffd probe`",
    _errno.EBADF: "the file descriptor is not open",
}


def describe_range(addr: int | None, length: int | None) -> str:
    """``0x1000-0x3000 (8192 bytes)`` for messages; empty when there is no range."""
    if addr is None:
        return ""
    if length is None:
        return f"{addr:#x}"
    return f"{addr:#x}-{addr + length:#x} ({length} bytes)"


def check(
    rc: int,
    op: str,
    addr: int | None = None,
    length: int | None = None,
    *,
    done: int = 0,
) -> int:
    """Return ``rc`` if it is not negative; otherwise raise the exception for ``-rc``.

    The message names ``op`` (an ioctl or syscall name), the range, the errno
    and what to do. ``done`` is carried to the exception (bytes completed
    before an EAGAIN).
    """
    if rc >= 0:
        return rc
    err = -rc
    where = describe_range(addr, length)
    text = (
        f"{op}{' on ' + where if where else ''} failed: "
        f"[{_errno.errorcode.get(err, err)}] {os.strerror(err)}"
    )
    advice = _ADVICE.get(err)
    if advice:
        text += f"; {advice}"
    if done:
        text += f" ({done} bytes were done before the error)"
    if err in (_errno.EPERM, _errno.EACCES):
        raise PermissionError(err, text)
    cls = _BY_ERRNO.get(err, UffdError)
    raise cls(err, text, op=op, addr=addr, length=length, done=done)
