"""Answers: a handler's ``Resolution`` for a fault installed through the pump, outcomes settled.

The step of the fault path after the ops (uffd/_handler.py dispatches, the
ops answer): ``Answers`` checks the answer (``_resolution.plan``), has the
pump install it on the fault's slot (``_pump.Pump.resolve``) and acts on
what came of it: counted, retried while the mappings change, copied over a
present write-protected page, or resolved by the fallback with the error
recorded. It also keeps the faults that are deferred (answered later by
``FaultHandler.resolve``) and reports those the watchdog had to answer.

Calling context: the dispatch thread, and ``FaultHandler.resolve`` callers
(any thread), all holding the pump; ``lock`` is the handler's.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import threading
import time
from collections.abc import Callable

from uffd import mem
from uffd._constants import Feature, Ioctl
from uffd._errors import DeadlineExceededError, UffdError, UnsupportedError
from uffd._events import FLAG_MINOR, FLAG_WP
from uffd._mapping import Fault, Tables
from uffd._pump import DID_WAKE, Outcome, Pump, did_name, did_unguarded
from uffd._resolution import Resolution, plan
from uffd._stats import Counters
from uffd._userfaultfd import Userfaultfd

__all__ = ["Answers", "PendingFault"]

_EAGAIN_RETRIES = 16
_COPY_BIT = int(Ioctl.COPY)
_COPY, _DEFER = Resolution.COPY, Resolution.defer()
# Module constants, not attribute lookups, on the fault path (an Enum member
# costs ~80 ns to look up on Python 3.11).
_INSTALLED = Outcome.INSTALLED
_monotonic_ns = time.monotonic_ns
# A fault's ``early`` once its handler answered: resolve() then refuses.
_FINISHED = Resolution(Resolution.REFUSE, reason="answered by its handler")


class PendingFault(Fault):
    """A ``Fault`` with what it takes to answer it: its fd, pump slot and read time.

    ``early`` is None while its handler runs; then ``_DEFER`` once deferred,
    ``_FINISHED`` once answered, or the answer ``resolve()`` gave first.
    """

    __slots__ = ("early", "fd", "slot", "t_ns")

    # Set right after construction by the dispatch thread (one call less per fault).
    early: Resolution | None
    fd: int
    slot: int
    t_ns: int


class Answers:
    """Installs answers and settles outcomes for one FaultHandler (see the module docstring).

    ``own`` is the handler's own userfaultfd when it serves this process's
    memory (a present page can then be overwritten), else None. ``record``
    keeps an error for ``stop()``; ``lost`` reports an fd closed under the
    handler.
    """

    def __init__(
        self,
        pump: Pump,
        maps: Tables,
        lock: threading.RLock,
        own: Userfaultfd | None,
        record: Callable[[BaseException], None],
        lost: Callable[[Userfaultfd], None],
    ) -> None:
        self._pump, self._maps, self._lock, self._own = pump, maps, lock, own
        self._copy = pump.copy  # bound once: the fault path's install
        self._record, self._lost = record, lost
        self.deferred: dict[int, PendingFault] = {}
        self.retry: list[tuple[PendingFault, Resolution, int]] = []
        self.orphans = Counters()  # faults on no mapping, for the stats total

    def orphan(self, fd: int, slot: int, t_ns: int, address: int) -> None:
        """A fault on no mapping: unregistered or moved under it (a REMOVE, UNMAP or REMAP
        raced it). The thread is woken and faults again on what is there now; a zero page
        here would land in whatever is registered at this address by now."""
        with contextlib.suppress(UffdError):
            self._pump.resolve(fd, slot, "wake", address & ~(mem.PAGE_SIZE - 1), mem.PAGE_SIZE)
        self.orphans.record("missing", "wake", time.monotonic_ns() - t_ns)

    # -- after the handler ran ----------------------------------------------

    def take(self, fault: PendingFault, resolution: Resolution | None) -> None:
        """What the fault's handler returned, when it is no answer: defer it, or fail (None).

        Answers go to ``apply`` directly (one call less per fault).
        """
        if resolution is _DEFER:
            with self._lock:
                # resolve() may have answered already, from another thread.
                early, fault.early = fault.early, _DEFER
                if early is None:
                    self.deferred[fault.slot] = fault
            if early is not None:
                self.apply(fault, early)
            return
        fault.early = _FINISHED
        ops = type(fault.mapping.ops).__name__
        self.fail(fault, TypeError(f"{ops}.handle_{fault.kind} returned None for {fault!r}"))

    def raised(self, fault: PendingFault, err: BaseException) -> None:
        """The fault's handler raised ``err`` (anything, SystemExit too): recorded, fallback."""
        fault.early = _FINISHED
        self.fail(fault, err)

    def resolve(self, fault: PendingFault, resolution: Resolution) -> bool:
        """``FaultHandler.resolve``: an early or a deferred answer (lock not held)."""
        with self._lock:
            if fault.early is None:
                fault.early = resolution  # the handler has not returned yet
                return True
            if self.deferred.get(fault.slot) is not fault:
                return False
            del self.deferred[fault.slot]
        return self.apply(fault, resolution)

    # -- installing ----------------------------------------------------------

    def apply(self, fault: PendingFault, r: Resolution | None, attempt: int = 0) -> bool:
        """Install ``r`` for ``fault`` through the pump; True if installed or queued for a retry.

        ``defer()`` or None from a handler go to ``take``.
        """
        if r is _DEFER or r is None:
            self.take(fault, r)
            return False
        fault.early = _FINISHED
        m = fault.mapping
        data = r.data
        kind = type(data)
        try:
            if (
                r.kind is _COPY
                and not r.keep_wp
                and m.honoured & _COPY_BIT
                and (
                    (kind is bytes and len(data) >= m.page_size)
                    or (kind is memoryview and data.c_contiguous and data.nbytes >= m.page_size)
                )
            ):
                # The common cases: no checks beyond these.
                how = _COPY
                outcome = self._copy(fault.fd, fault.slot, fault.address, m.page_size, data)
            else:
                poison = bool(self._maps.fd_of(m).features & Feature.POISON)
                how, data, wp = plan(r, fault, poison)
                outcome = self._pump.resolve(
                    fault.fd, fault.slot, how, fault.address, m.page_size, data, wp
                )
        except Exception as err:  # plan's refusal, or an errno the outcome does not name
            self.fail(fault, err)
            return False
        if outcome is _INSTALLED:
            m.stats.record(fault.kind, r.kind, _monotonic_ns() - fault.t_ns, fault.thread_id)
            return True
        return self._settle(fault, r, how, outcome, attempt)

    def _settle(
        self, fault: PendingFault, r: Resolution, how: str, outcome: Outcome, n: int
    ) -> bool:
        """Act on an outcome other than INSTALLED; True if the fault is (or will be) resolved."""
        ufd = self._maps.fd_of(fault.mapping)
        if outcome is Outcome.PRESENT:
            # Only a WP or MINOR fault: the pump answers INSTALLED (and wakes) when
            # EEXIST or ENOENT means someone else resolved the fault.
            return self._present(fault, r, how)
        if outcome is Outcome.EXPIRED:
            return False  # the watchdog resolved it; its notice reports that
        if outcome is Outcome.GONE or (
            outcome is Outcome.CLOSED and ufd.closed and ufd is not self._own
        ):
            # The faulting process has exited (its fd may be reaped already): nobody
            # waits for this page, so it is not an error. Free the slot for the watchdog.
            self._pump.fallback(fault.slot)
            self._count(fault, "gone")
            return False
        if outcome is Outcome.CLOSED:
            # Closed under the running handler (os.close, or its close() while
            # serving): the kernel has released the threads; report the fd lost.
            self._pump.fallback(fault.slot)
            self._lost(ufd)
            return False
        if n < _EAGAIN_RETRIES:
            # The mappings are changing: the event is queued; retry after reading it.
            self.retry.append((fault, r, n + 1))
            return True
        # Still changing after every retry (a storm of forks keeps mmap_changing
        # raised): wake the thread instead; it faults again and that fault is
        # served like any other. Nothing is lost, so nothing is recorded.
        try:
            woken = self._pump.resolve(
                fault.fd, fault.slot, "wake", fault.address, fault.mapping.page_size
            )
        except UffdError as err:
            self.fail(fault, err)
            return False
        if woken is Outcome.INSTALLED:
            self._count(fault, "wake")
        else:
            self.fail(fault, UffdError(_errno.EAGAIN, f"{fault!r}: the mappings kept changing"))
        return False

    def _present(self, fault: PendingFault, r: Resolution, how: str) -> bool:
        """EEXIST for a WP or MINOR fault: the page is there, so ``r`` did not resolve it.

        For a MISSING fault (or a CONTINUE) EEXIST means another install won
        the race, and the pump has woken the thread; a WP or MINOR fault is on
        a page that exists, and waking the thread would only fault it again,
        forever: the pump leaves it pending. A WP fault's copy is done by
        overwriting the page; anything else is the handler's mistake: recorded,
        and the fallback (unprotect, continue) lets the thread on.
        """
        if fault.kind == "wp" and how == _COPY:
            return self._copy_over(fault, r)
        remedy = "Resolution.unprotect()" if fault.kind == "wp" else "Resolution.continue_()"
        self.fail(
            fault,
            UnsupportedError(
                f"{type(fault.mapping.ops).__name__}.handle_{fault.kind} answered {r!r} for "
                f"{fault!r}, but the page is present (EEXIST), so that cannot resolve a "
                f"{fault.kind} fault; return {remedy}"
            ),
        )
        return False

    def _copy_over(self, fault: PendingFault, r: Resolution) -> bool:
        """Copy-then-unprotect for a WP fault on a present page (UFFDIO_COPY said EEXIST).

        No ioctl replaces a present page, so for this process's own memory the
        page is unprotected without waking the writer, overwritten, and the
        writer woken (``keep_wp`` was refused before: it would fault forever).
        A write by another thread in between is overwritten: the handler's data
        wins, as a copy would. Another process's memory is not writable from
        here: that is recorded as an error and the fault takes the fallback.
        """
        m = fault.mapping
        ufd = self._maps.fd_of(m)
        if ufd is not self._own:
            self.fail(
                fault,
                UnsupportedError(
                    f"{type(m.ops).__name__}.handle_wp returned {r!r} for {fault!r}, a present "
                    "page of another process, which cannot be overwritten from here; return "
                    "Resolution.unprotect() (or copy only into unpopulated pages)"
                ),
            )
            return False
        try:
            ufd.writeprotect(fault.address, m.page_size, False, wake=False)
            with memoryview(r.data) as data:
                mem.write_at(fault.address, data[: m.page_size])
            done = self._pump.resolve(fault.fd, fault.slot, "wake", fault.address, m.page_size)
        except UffdError as err:
            self.fail(fault, err)
            return False
        if done is Outcome.INSTALLED:
            self._count(fault, r.kind)
            return True
        return False  # the watchdog resolved it meanwhile; its notice reports that

    def retry_pending(self) -> None:
        """Apply again the answers that met EAGAIN, after the events were read."""
        pending, self.retry = self.retry, []
        for fault, r, attempt in pending:
            self.apply(fault, r, attempt)

    def fail(self, fault: PendingFault, err: BaseException) -> None:
        """Record ``err`` and resolve ``fault`` by the fallback."""
        did = self._pump.fallback(fault.slot)
        with self._lock:
            fault.mapping.stats.errors += 1
        if did >= 0:
            self._count(fault, "fallback-" + did_name(did))
        self._record(err)

    def _count(self, fault: PendingFault, how: str) -> None:
        latency = time.monotonic_ns() - fault.t_ns
        fault.mapping.stats.record(fault.kind, how, latency, fault.thread_id)

    # -- faults nobody answered ------------------------------------------------

    def expired(
        self, fd: int, did: int, flags: int, address: int, ptid: int, gone: bool, deadline: float
    ) -> None:
        """The watchdog resolved a fault at its deadline (``did``); counted, and reported
        unless ``gone`` (its process had exited: nobody waited)."""
        deadline_ns = int(deadline * 1e9)
        with self._lock:
            for slot, fault in list(self.deferred.items()):
                if fault.address == address & ~(fault.mapping.page_size - 1) and fault.fd == fd:
                    del self.deferred[slot]
                    break
            table = self._maps.by_fd.get(fd)
            m = table.find(address) if table is not None else None
            if m is not None and gone:
                m.stats.record("missing", "gone", deadline_ns)
            elif m is not None:
                m.stats.errors += 1
                kind = "minor" if flags & FLAG_MINOR else "wp" if flags & FLAG_WP else "missing"
                m.stats.record(kind, "fallback-" + did_name(did), deadline_ns)
        if gone:
            return
        what = did_name(did) if did & 0xFF else "nothing (the fallback failed)"
        if did_unguarded(did):
            why = (
                f"thread {ptid} of this process faulted there while the dispatch thread could not "
                "run, most likely because the faulting thread held the GIL (plain Python or ctypes "
                "access to registered memory); use Region.read/write/touch, which release it"
            )
        else:
            why = "the handler did not answer in time"
        self._record(
            DeadlineExceededError(
                f"fault at {address:#x} missed the {deadline:g} s deadline: {why}; "
                f"resolved with {what}",
                address=address,
                thread_id=ptid or None,
            )
        )

    def forget_fd(self, fd: int) -> None:
        """A forked child exited: its deferred and retried faults are "gone" (lock held)."""
        waiting = [f for f in self.deferred.values() if f.fd == fd]
        waiting += [f for f, _, _ in self.retry if f.fd == fd]
        self.retry = [item for item in self.retry if item[0] not in waiting]
        for fault in waiting:
            # Nobody waits for these pages any more: "gone", not an error.
            self.deferred.pop(fault.slot, None)
            self._pump.fallback(fault.slot)  # frees the slot (ESRCH)
            self._count(fault, "gone")

    def abandon(self) -> list[BaseException]:
        """At stop(): resolve every deferred fault by the fallback; the errors to report."""
        errors: list[BaseException] = []
        for fault in self.deferred.values():
            did = self._pump.fallback(fault.slot)
            if did < 0 or did & 0xFF == DID_WAKE:
                # Its page is there already (a prefetch installed it, and the
                # thread went on) or nobody waits: nothing was lost.
                continue
            errors.append(
                DeadlineExceededError(
                    f"deferred fault at {fault.address:#x} was never resolved before stop(); "
                    "resolved by the fallback",
                    address=fault.address,
                    thread_id=fault.thread_id,
                )
            )
        self.deferred.clear()
        return errors
