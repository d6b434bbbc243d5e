"""``Resolution``: what a handler answers for a fault, for the core to install.

Handlers never touch the fd; they describe the outcome and the core performs
the ioctl, after checking it against the mapping's honoured ioctls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from uffd._constants import Ioctl
from uffd._errors import HandlerRefusedError, UnsupportedError

if TYPE_CHECKING:
    from uffd._mapping import Fault

__all__ = ["Resolution", "plan"]


class Resolution:
    """A fault's outcome: copy, zero, continue_, unprotect, poison, refuse, defer."""

    __slots__ = ("data", "keep_wp", "kind", "reason")

    COPY = "copy"
    ZERO = "zero"
    CONTINUE = "continue"
    UNPROTECT = "unprotect"
    POISON = "poison"
    REFUSE = "refuse"
    DEFER = "defer"

    def __init__(
        self, kind: str, data: Any = None, keep_wp: bool = False, reason: str = ""
    ) -> None:
        self.kind = kind
        self.data = data
        self.keep_wp = keep_wp
        self.reason = reason

    @classmethod
    def copy(cls, data: Any, *, keep_wp: bool = False) -> Resolution:
        """Install ``data`` (a buffer of at least one page) at the faulting page.

        ``keep_wp=True`` installs it write-protected (UFFDIO_COPY_MODE_WP): for
        a WP fault this is "copy, then stay protected"; needs Mode.WP.
        """
        # The answer to most faults: built without the __init__ call (a third of its cost).
        r = _new(cls)
        r.kind, r.data, r.keep_wp, r.reason = cls.COPY, data, keep_wp, ""
        return r

    @classmethod
    def zero(cls) -> Resolution:
        """Install a zero page (UFFDIO_ZEROPAGE; on hugetlb, a copy of zeros)."""
        return _ZERO

    @classmethod
    def continue_(cls) -> Resolution:
        """Map the page already in the page cache (UFFDIO_CONTINUE, MINOR faults)."""
        return _CONTINUE

    @classmethod
    def unprotect(cls) -> Resolution:
        """Remove write protection from the page and wake the writer (WP faults)."""
        return _UNPROTECT

    @classmethod
    def poison(cls) -> Resolution:
        """Install a poison marker: the access gets SIGBUS (UFFDIO_POISON, Linux 6.6)."""
        return _POISON

    @classmethod
    def refuse(cls, reason: str) -> Resolution:
        """Decline the fault; the core applies the fallback policy and records ``reason``."""
        return cls(cls.REFUSE, reason=reason)

    @classmethod
    def defer(cls) -> Resolution:
        """Answer later with ``handler.resolve(fault, resolution)`` from any thread.

        The deadline and fallback still apply to a fault never resolved.
        """
        return _DEFER

    @property
    def need(self) -> int:
        """``ioctl`` as a plain int (enum flag arithmetic costs microseconds on the fault path)."""
        return _NEEDS.get(self.kind, 0) | (_WRITEPROTECT if self.keep_wp else 0)

    @property
    def ioctl(self) -> Ioctl:
        """The ioctl this resolution needs honoured on the mapping (none for refuse/defer)."""
        return Ioctl(self.need)

    def __repr__(self) -> str:
        detail = f" {self.reason!r}" if self.reason else " keep_wp" if self.keep_wp else ""
        return f"<Resolution {self.kind}{detail}>"


_new = object.__new__
_NEEDS = {
    Resolution.COPY: int(Ioctl.COPY),
    Resolution.ZERO: int(Ioctl.ZEROPAGE),
    Resolution.CONTINUE: int(Ioctl.CONTINUE),
    Resolution.UNPROTECT: int(Ioctl.WRITEPROTECT),
    Resolution.POISON: int(Ioctl.POISON),
}
_WRITEPROTECT = int(Ioctl.WRITEPROTECT)
_ZEROPAGE, _COPY = int(Ioctl.ZEROPAGE), int(Ioctl.COPY)
_ZERO = Resolution(Resolution.ZERO)
_CONTINUE = Resolution(Resolution.CONTINUE)
_UNPROTECT = Resolution(Resolution.UNPROTECT)
_POISON = Resolution(Resolution.POISON)
_DEFER = Resolution(Resolution.DEFER)
Resolution.__module__ = "uffd"


def plan(r: Resolution, fault: Fault, poison_negotiated: bool) -> tuple[str, Any, bool]:
    """How to install ``r`` for ``fault``: (what, data or None, write-protected).

    ``what`` is the resolution's kind ("copy", "zero", "continue", "poison",
    "unprotect"); a zero page on memory without ZEROPAGE (hugetlb) becomes a
    copy of zeros. Called on the dispatch thread (or a ``resolve`` caller's).

    Raises the error to record (the fault then takes the fallback):
    HandlerRefusedError for a refusal; UnsupportedError for an ioctl the
    mapping does not honour, POISON not negotiated, or ``keep_wp`` on a WP
    fault (it would fault again forever); TypeError/ValueError for copy data
    that is not a buffer of at least a page.
    """
    m = fault.mapping
    ops = type(m.ops).__name__
    kind, need, data, honoured = r.kind, r.need, r.data, m.honoured
    if kind == Resolution.REFUSE:
        raise HandlerRefusedError(0, f"{ops} refused {fault!r}: {r.reason}")
    if kind == Resolution.ZERO and not honoured & _ZEROPAGE and honoured & _COPY:
        # hugetlb has no ZEROPAGE: a zero page is a copy of zeros.
        kind, need, data = Resolution.COPY, _COPY, bytes(m.page_size)
    if kind not in _NEEDS or need & ~honoured:
        raise UnsupportedError(
            f"{ops} answered {r!r} for {fault!r}, but {Ioctl(need & ~honoured)!r} is not "
            f"honoured on this mapping (honoured: {m.ioctls!r})"
        )
    if kind == Resolution.POISON and not poison_negotiated:
        raise UnsupportedError(f"{r!r} for {fault!r}: UFFD_FEATURE_POISON was not negotiated")
    if r.keep_wp and fault.kind == "wp":
        raise UnsupportedError(
            f"{r!r} for {fault!r} would leave the page write-protected, so the write would "
            "fault again forever; use keep_wp=False (or Resolution.unprotect())"
        )
    if data is not None:
        try:
            view = memoryview(data)
        except TypeError as err:
            raise TypeError(f"Resolution.copy data for {fault!r} is not a buffer: {err}") from None
        with view:  # released before anything is raised (a live export in a traceback)
            size, contiguous = view.nbytes, view.c_contiguous
        if not contiguous:
            raise ValueError(f"Resolution.copy data for {fault!r} is not a contiguous buffer")
        if size < m.page_size:
            raise ValueError(
                f"Resolution.copy data for {fault!r} holds {size} bytes, a page is {m.page_size}"
            )
    return kind, data, r.keep_wp
