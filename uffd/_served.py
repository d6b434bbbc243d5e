"""What one FaultHandler serves: its userfaultfds and their mappings, kept in step with the pump.

``ServedFds`` keeps the fds (the handler's own, adopted ones, forked
children's), the mapping tables (``_mapping.Tables``, which own the range
arithmetic) and the pump (``_pump``) in step: an fd added is watched and
gets a table; a mapping published is in its table and in the pump, with its
fallback and native source; a range dropped, moved or copied for a child
changes both; an fd retired is forgotten by both, its mappings kept for
the stats. It also knows what the kernel never says: which forked child has
exited (no event, no POLLHUP) and which fd was closed under the handler
(epoll drops it silently). When to act on that (the fork and reaping
policy) is the handler's. Callers hold the handler's lock and the pump.
"""

from __future__ import annotations

import contextlib
import errno as _errno
from collections.abc import Iterator

from uffd import mem
from uffd._constants import Feature, Ioctl
from uffd._errors import UffdError
from uffd._events import Remap, Remove, Unmap
from uffd._mapping import Mapping, Tables
from uffd._pump import Pump
from uffd._userfaultfd import Userfaultfd, fd_identity, mm_gone

_ZEROPAGE_BIT, _POISON_BIT = int(Ioctl.ZEROPAGE), int(Ioctl.POISON)

__all__ = ["ServedFds"]


class ServedFds:
    """The handler's fds by number; ``retired`` holds the mappings it dropped.

    ``poison`` says whether the handler's fallback may be a poison marker
    ("sigbus") where the mapping honours POISON; ``own_mm`` whether the first
    fd added (the handler's own) serves this process's memory.
    """

    def __init__(self, pump: Pump, maps: Tables, poison: bool, own_mm: bool) -> None:
        self._pump, self._maps, self._poison, self._own_mm = pump, maps, poison, own_mm
        self._own: Userfaultfd | None = None
        self._fds: dict[int, Userfaultfd] = {}
        self._identity: dict[int, tuple[int, int] | None] = {}
        # FORK events' child fds, reaped once the child exits; a plain attribute,
        # tested by the dispatch loop on every pass.
        self.forked: set[int] = set()
        self.retired: list[Mapping] = []

    def __contains__(self, n: int) -> bool:
        return n in self._fds

    def __getitem__(self, n: int) -> Userfaultfd:
        return self._fds[n]

    def __iter__(self) -> Iterator[Userfaultfd]:
        return iter(list(self._fds.values()))

    def add(self, ufd: Userfaultfd, *, forked: bool = False, paused: bool = False) -> None:
        """Serve ``ufd``: watched by the pump (``paused``: not read until ``serve``), with an
        empty table."""
        n = ufd.fileno()
        self._pump.add_fd(n, paused=paused)
        self._own = self._own or ufd
        self._fds[n] = ufd
        self._identity[n] = fd_identity(n)
        self._maps.add_fd(n)
        if forked:
            self.forked.add(n)

    def serve(self, ufd: Userfaultfd) -> None:
        """Start reading ``ufd``'s faults, added paused. Raises ValueError if it is not served."""
        n = self.number(ufd)
        if n is None:
            raise ValueError("resume: that userfaultfd is not served by this handler")
        self._pump.serve_fd(n)

    def retire(self, n: int) -> Userfaultfd:
        """Stop serving fd ``n``; its object, for the caller to close or detach."""
        self.retired.extend(self._maps.remove_fd(n))
        self._identity.pop(n, None)
        self.forked.discard(n)
        self._pump.remove_fd(n)
        return self._fds.pop(n)

    def exited(self) -> list[int]:
        """The forked children's fds whose process has exited."""
        return [n for n in self.forked if mm_gone(n)]

    def closed_under(self) -> list[int]:
        """The fds closed under the handler (their number names another file, or none)."""
        return [
            n
            for n, ufd in self._fds.items()
            if not ufd.closed and fd_identity(n) != self._identity.get(n)
        ]

    def number(self, ufd: Userfaultfd) -> int | None:
        """The number ``ufd`` is served under, or None."""
        return next((n for n, known in self._fds.items() if known is ufd), None)

    def lose(self, n: int, err: int) -> UffdError | None:
        """Drop fd ``n`` that failed under the pump; the error to report if it was the handler's.

        EBADF means the number is not ours any more: it is never closed again.
        """
        if n not in self._fds:
            self._pump.remove_fd(n)
            return None
        lost = self.retire(n)
        if err == _errno.EBADF:
            lost.detach()
        if lost is not self._own:
            return None
        return UffdError(
            err,
            f"the handler's userfaultfd (fd {n}) was closed under the running handler "
            f"([{_errno.errorcode.get(err, err)}]: closed while in use?): the kernel released "
            "its faulting threads and unregistered its ranges; the handler did not close that "
            "fd number again",
        )

    def process_gone(self, n: int) -> bool:
        """Has the process whose faults fd ``n`` served exited?

        The handler's own fd serves this process, which cannot have exited; a
        forked child's fd reaped (closed) already: its process had exited.
        """
        own = self._own is not None and not self._own.closed and n == self._own.fileno()
        if n not in self._fds and not own:
            return True
        return (not own or not self._own_mm) and mm_gone(n)

    def release_ranges(self) -> None:
        """Unregister every range: closing an fd does not, while a copy of it is open.

        A process forked without EVENT_FORK keeps a copy of each fd, and the
        kernel releases a userfaultfd's ranges only when the last copy closes;
        unregistering wakes whoever waits and leaves no fault to wait for.
        """
        for n, ufd in self._fds.items():
            table = self._maps.by_fd.get(n)
            for m in table.maps if table is not None else []:
                # The range or its process may be gone already.
                with contextlib.suppress(OSError, ValueError):
                    ufd.unregister(m.start, m.length)

    def close_all(self) -> None:
        """Close every fd (after the pump is freed: no ioctl can meet a reused number)."""
        for ufd in self._fds.values():
            ufd.close()

    # -- mappings ------------------------------------------------------------

    def publish(self, m: Mapping) -> None:
        """Serve ``m``: in its fd's table and in the pump."""
        self._pump_map(m)
        self._maps.add(m)

    def _pump_map(self, m: Mapping) -> None:
        """Give ``m`` to the pump with its fallback (poison where it may, else a zero page)."""
        ufd = self._maps.fd_of(m)
        if self._poison and m.honoured & _POISON_BIT and ufd.features & Feature.POISON:
            fallback = "poison"
        else:
            fallback = "zeropage" if m.honoured & _ZEROPAGE_BIT else "zerocopy"
        native = m.ops.native_source(m)
        n = ufd.fileno()
        self._pump.map(n, m.start, m.end, m.page_size, fallback, native, m.origin)

    def drop(self, n: int, start: int, end: int) -> None:
        """Stop serving [start, end) of fd ``n`` (what straddles it keeps its outer parts)."""
        self.retired.extend(self._maps.drop(n, start, end))
        self._pump.unmap(n, start, end)

    def clear_stale(self, ufd: Userfaultfd, start: int, end: int, own: bool, where: str) -> None:
        """Refuse an overlap with [start, end), unless the overlapped entries are stale.

        Without EVENT_UNMAP nothing tells the handler that a registered range
        of this process (``own``) was unmapped (``Region.close()``) or mapped
        anew; the kernel's registration then no longer exists (smaps shows no
        uffd flag), and the stale entries are dropped instead.

        Raises ValueError for a real overlap.
        """
        overlap = self._maps.overlapping(ufd.fileno(), start, end)
        if not overlap:
            return
        if not own or mem.userfault_registered(start, end - start):
            raise ValueError(f"register: {where} overlaps {overlap[0]!r}")
        self.drop(ufd.fileno(), start, end)

    def add_child(self, n: int, child: Userfaultfd) -> None:
        """Serve a forked child's fd with a copy of every mapping of its parent's fd ``n``."""
        try:
            self.add(child, forked=True)
        except BaseException:
            child.close()  # not served: closing it lets the child's faults through
            raise
        for m in self._maps.copy_for_child(n, child):
            self._pump_map(m)

    def follow(self, n: int, event: Remap | Remove | Unmap) -> None:
        """Apply a REMAP, REMOVE or UNMAP event read from fd ``n``."""
        if isinstance(event, Remap):
            moved = self._maps.move(n, event.old, event.new, event.length)
            # Unmap the old range from the pump (that splits a map straddling
            # it) and map the moved pieces anew at their new addresses.
            self._pump.unmap(n, event.old, event.old + event.length)
            for m in moved:
                self._pump_map(m)
        elif isinstance(event, Remove):
            # The pages are gone; unregister so later accesses get zero pages.
            if self._maps.overlapping(n, event.start, event.end):
                with contextlib.suppress(UffdError, ValueError):  # gone already, maybe
                    self._fds[n].unregister(event.start, event.end - event.start)
                self.drop(n, event.start, event.end)
        else:
            self.drop(n, event.start, event.end)
