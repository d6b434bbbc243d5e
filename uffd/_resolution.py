"""``Resolution``: what a handler answers for a fault, for the core to install.

Handlers never touch the fd; they describe the outcome and the core performs
the ioctl, after checking it against the mapping's honoured ioctls.
"""

from __future__ import annotations

from typing import Any

from uffd._constants import Ioctl

__all__ = ["Resolution"]


class Resolution:
    """A fault's outcome: copy, zero, continue_, unprotect, poison, refuse, defer."""

    __slots__ = ("data", "keep_wp", "kind", "need", "reason")

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
        # A plain int: enum flag arithmetic costs microseconds on the fault path.
        self.need = _NEEDS.get(kind, 0) | (_WRITEPROTECT if keep_wp else 0)

    @classmethod
    def copy(cls, data: Any, *, keep_wp: bool = False) -> Resolution:
        """Install ``data`` (a buffer of at least one page) at the faulting page.

        ``keep_wp=True`` installs it write-protected (UFFDIO_COPY_MODE_WP): for
        a WP fault this is "copy, then stay protected"; needs Mode.WP.
        """
        return cls(cls.COPY, data, keep_wp)

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
    def ioctl(self) -> Ioctl:
        """The ioctl this resolution needs honoured on the mapping (none for refuse/defer)."""
        return Ioctl(self.need)

    def __repr__(self) -> str:
        detail = f" {self.reason!r}" if self.reason else " keep_wp" if self.keep_wp else ""
        return f"<Resolution {self.kind}{detail}>"


_NEEDS = {
    Resolution.COPY: int(Ioctl.COPY),
    Resolution.ZERO: int(Ioctl.ZEROPAGE),
    Resolution.CONTINUE: int(Ioctl.CONTINUE),
    Resolution.UNPROTECT: int(Ioctl.WRITEPROTECT),
    Resolution.POISON: int(Ioctl.POISON),
}
_WRITEPROTECT = int(Ioctl.WRITEPROTECT)
_ZERO = Resolution(Resolution.ZERO)
_CONTINUE = Resolution(Resolution.CONTINUE)
_UNPROTECT = Resolution(Resolution.UNPROTECT)
_POISON = Resolution(Resolution.POISON)
_DEFER = Resolution(Resolution.DEFER)
Resolution.__module__ = "uffd"
