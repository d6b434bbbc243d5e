"""``FaultHandler``: serve page faults of registered mappings through their ``UffdOps``.

The fault path, one step per module (userfaultfd(2)): the fd (``_userfaultfd``)
→ the pump (``_pump``: C, no GIL) → dispatch (here: the mapping from
``_mapping``'s tables, the fault's kind, its ops) → ops (``_ops``) → the
answer (``_answer``: checked, installed by the pump on the fault's slot).
What is served, fds and mappings, is ``_served``'s; events update it in the
order they were read, so a fault read after an event meets the updated
table. Never hang a faulting thread: whatever a handler does (raises, even
``SystemExit``; returns None; refuses; misses the deadline), the fault gets
the fallback and the error is re-raised from ``stop()`` (docs/dispatch.md, rule 5).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import threading
import time
from types import TracebackType
from typing import Any

from uffd import mem
from uffd._answer import Answers, PendingFault
from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import UffdError, UnsupportedError, describe_range
from uffd._events import FLAG_MINOR, FLAG_WP, FLAG_WRITE, PAGEFAULT, Fork, decode
from uffd._mapping import Fault, Mapping, Tables, check_registrable, describe_target
from uffd._ops import UffdOps, get_uffd_ops, kernel_grant
from uffd._pump import EXPIRED, FD_ERROR, Pump, stopped
from uffd._resolution import Resolution
from uffd._served import ServedFds
from uffd._stats import HandlerStats
from uffd._userfaultfd import Userfaultfd, open_for_handler

__all__ = ["FaultHandler"]

_FALLBACKS = ("sigbus", "zero")
# Below a millisecond the watchdog (a 2 ms tick) could not tell a deadline from
# none, and every fault would take the fallback before its handler ran.
_MIN_DEADLINE = 1e-3
_MAX_DEADLINE = 86400.0 * 365  # a year: the pump keeps nanoseconds in a u64
_MAX_BATCH = 4096  # faults one pump wait hands over at most
_REAP_INTERVAL_MS = 1000  # how often the dispatch loop looks for exited forked children
_MINOR_OR_WP = FLAG_MINOR | FLAG_WP


class FaultHandler:
    """A thread that serves the page faults of registered mappings.

    ``features`` are extra UFFD features to negotiate (EVENT_FORK, EVENT_REMAP,
    EVENT_REMOVE, EVENT_UNMAP to follow the process's mappings); the handler
    adds the features it needs when the kernel has them (``auto_features``).
    ``fallback`` ("sigbus" or "zero") resolves faults a handler failed; a
    poison marker is never used for a thread of this process outside a
    SIGBUS-safe Region access (the SIGBUS would kill the process): that thread
    gets a zero page. ``deadline`` (seconds, at least 1 ms) bounds every fault.
    ``uffd`` serves a userfaultfd opened elsewhere (``Userfaultfd.from_fd``)
    instead of opening one; the handler owns it from then on. ``spin``
    (seconds) is how long the pump polls for the next fault before it sleeps:
    it yields the CPU while polling, so it costs nothing when the faulting
    thread shares the handler's CPU, and saves a cross-CPU wake-up when it
    does not; 0 turns it off. ``batch`` is how many faults the dispatch
    thread takes from the pump at once.

    Methods may be called from any thread; the handlers run on the dispatch
    thread. ``install``, ``wake`` and ``resolve`` raise ``UffdError``
    ("handler stopped") once ``stop()`` has begun. ``stop()`` from inside a
    handler requests the stop and returns; the dispatch thread finishes it.
    With EVENT_FORK, a ``os.fork()`` in this process is safe: the FORK event
    is read by C code that needs no GIL.

    Raises (constructor): PermissionError, UnsupportedError (a requested
    feature the kernel lacks), ValueError (a fallback, deadline, batch, spin or
    features value out of range).
    """

    def __init__(
        self,
        *,
        features: Feature = Feature(0),
        fallback: str = "sigbus",
        deadline: float = 1.0,
        auto_features: bool = True,
        batch: int = 64,
        uffd: Userfaultfd | None = None,
        spin: float = 50e-6,
    ) -> None:
        if fallback not in _FALLBACKS:
            raise ValueError(f"fallback must be 'sigbus' or 'zero', not {fallback!r}")
        if not _MIN_DEADLINE <= deadline <= _MAX_DEADLINE:
            raise ValueError(
                f"deadline must be seconds from {_MIN_DEADLINE:g} to {_MAX_DEADLINE:g}, "
                f"got {deadline!r}"
            )
        if not isinstance(batch, int) or not 1 <= batch <= _MAX_BATCH:
            raise ValueError(f"batch must be an int from 1 to {_MAX_BATCH}, got {batch!r}")
        if not 0 <= spin <= 1:
            raise ValueError(f"spin must be seconds from 0 to 1, got {spin!r}")
        if int(features) < 0:
            raise ValueError(f"features must be a mask of uffd.Feature bits, got {features!r}")
        self.fallback = fallback
        self.deadline = float(deadline)
        self._deadline_ns = int(self.deadline * 1e9)
        self._batch = batch
        self._maps = Tables()
        self._errors: list[BaseException] = []
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._finished = False
        self._expired = 0
        self._events_applied = 0  # kernel events applied to the tables, for install()
        self._native_at_stop = 0  # stats after stop(): the pump is gone
        self._own_mm = uffd is None
        # e.g. received from a process a daemon serves
        self.uffd = uffd if uffd is not None else open_for_handler(features, auto_features)
        self.features = self.uffd.features
        try:
            self._pump = Pump(self._deadline_ns, int(spin * 1e9))
        except OSError:
            self.uffd.close()
            raise
        self._fds = ServedFds(self._pump, self._maps, fallback == "sigbus", self._own_mm)
        own = self.uffd if self._own_mm else None
        self._answers = Answers(self._pump, self._maps, self._lock, own, self._record, self._lost)
        self._apply = self._answers.apply  # bound once: called for every fault
        with self._pump.held():
            self._fds.add(self.uffd)

    # -- registration ----------------------------------------------------

    def adopt(self, fd: Userfaultfd) -> None:
        """Serve an externally created userfaultfd too (e.g. received over SCM_RIGHTS).

        The handler owns it from now on and closes it at ``stop()``.
        """
        self._require_running("adopt")
        with self._lock, self._pump.held():
            self._fds.add(fd)

    def _adopt_paused(self, fd: Userfaultfd) -> None:
        """``adopt``, but none of ``fd``'s faults is read until ``_resume(fd)`` (private).

        For an owner that registers the fd's ranges on a handler already
        started (the restore daemon's spare): a fault raised meanwhile waits
        in the kernel instead of reaching the dispatch thread before its
        mapping is published. Until ``_resume`` no deadline runs for those
        faults; ``stop()`` resolves them by the fallback like any pending.
        """
        self._require_running("adopt")
        with self._lock, self._pump.held():
            self._fds.add(fd, paused=True)

    def _resume(self, fd: Userfaultfd) -> None:
        """Start serving ``fd`` adopted by ``_adopt_paused`` (private).

        Raises ValueError if ``fd`` is not served here, OSError if it was not paused.
        """
        self._require_running("adopt")
        with self._lock, self._pump.held():
            self._fds.serve(fd)

    def register(
        self,
        target: mem.Region | tuple[int, int],
        mode: Mode = Mode.MISSING,
        ops: UffdOps | None = None,
        *,
        uffd: Userfaultfd | None = None,
        registered: bool = False,
        kind: str | None = None,
        page_size: int | None = None,
    ) -> Mapping:
        """Register ``target`` (a Region or ``(addr, length)``) for ``mode`` with ``ops``.

        Resolves the ops (``ops``, else the built-in for the memory kind),
        asks ``ops.can_userfault``, checks the negotiated features, calls
        UFFDIO_REGISTER (skipped when ``registered=True``: the owner of an
        adopted fd did it) and honours ``ops.ioctls`` & the kernel's grant.
        ``kind`` and ``page_size`` describe memory this process cannot
        inspect (another process's, e.g. hugetlb with a non-default size);
        otherwise they come from the Region or /proc/self/smaps. A mapping of
        this process that was unmapped or replaced without an UNMAP event no
        longer blocks a registration of its range.

        Raises:
            UnsupportedError: the ops, the negotiated features or the kernel
                refused; the message says who and why.
            ValueError: mode 0, a page size that is not the memory's, an
                unaligned range, an overlap with a mapping, an
                ``(addr, length)`` where nothing is mapped.
        """
        self._require_running("register")
        self._settle()  # a range just unmapped or moved: its events applied first
        mode = Mode(mode)
        if not mode:
            raise ValueError("register: mode must name at least one of Mode.MISSING, WP, MINOR")
        fd = uffd or self.uffd
        addr, length, kind, page_size = describe_target(target, kind, page_size, ops, registered)
        ops = get_uffd_ops(kind, ops)
        mapping = Mapping(addr, addr + length, kind, mode, ops, page_size, fd)
        where = f"{kind} mapping {describe_range(addr, length)}"
        check_registrable(mapping, mode, fd, where)
        with self._lock, self._pump.held():
            self._fds.clear_stale(fd, addr, addr + length, fd is self.uffd and self._own_mm, where)
            granted = kernel_grant(kind, mode) if registered else fd.register(addr, length, mode)
            if granted is None:
                raise UnsupportedError(f"the kernel refuses {mode!r} on the {where}", op="register")
            mapping.ioctls = Ioctl(ops.ioctls & granted)
            self._fds.publish(mapping)
        return mapping

    def unregister(self, mapping: Mapping) -> None:
        """UFFDIO_UNREGISTER ``mapping`` and drop it; faults pending on it are woken."""
        self._settle()
        with self._lock, self._pump.held():
            if not self._maps.holds(mapping):
                raise ValueError(f"unregister: {mapping!r} is not registered on this handler")
            self._maps.fd_of(mapping).unregister(mapping.start, mapping.length)
            self._fds.drop(self._maps.fd_number(mapping), mapping.start, mapping.end)

    # -- lifecycle -------------------------------------------------------

    def _require_running(self, op: str) -> None:
        if self._stopping:
            raise ValueError(f"FaultHandler.{op} after stop()")

    def start(self) -> FaultHandler:
        """Start the dispatch thread (once)."""
        self._require_running("start")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="uffd-fault-handler", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop serving, resolve pending faults by the fallback, close the fds, re-raise errors.

        Order: stop the pump, join the dispatch thread, resolve what is still
        pending (deferred faults never answered), unregister every range (a
        forked child holding a copy of an fd would otherwise keep faults
        waiting), free the pump once no call is inside it, then close the fds.
        Idempotent; the first recorded handler error is raised (with a note
        counting the others). Called from inside a handler it only requests
        the stop: the dispatch thread finishes it when the handler returns.
        """
        with self._lock:
            first, self._stopping = not self._stopping, True
        if first:
            with contextlib.suppress(UffdError), self._pump.held():
                self._pump.stop()
        if threading.current_thread() is self._thread:
            return
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else max(5.0, 2 * self.deadline))
            stuck = self._thread.is_alive()
        self._finish(stuck)
        self._raise_errors()

    def _finish(self, stuck: bool) -> None:
        """The end of a stop, once, by whichever of stop() and the dispatch thread comes first."""
        pump = self._pump
        with self._lock:
            if self._finished:
                return
            self._finished = True
            with pump.held():
                for n in self._fds.closed_under():
                    self._fd_lost(n, _errno.EBADF)
                self._errors.extend(self._answers.abandon())
                pump.drain()
                self._native_at_stop = pump.native_faults()
                self._fds.release_ranges()
            if stuck:
                self._errors.append(
                    UffdError(
                        0,
                        "the dispatch thread did not stop: a handler is blocked; its ranges "
                        "were unregistered, and its fds close when that handler returns",
                    )
                )
        # Outside the lock: a holder still inside the pump may need it to get out.
        pump.close(self._fds.close_all, 0.0 if stuck else 5.0)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the dispatch thread to end (``stop()`` elsewhere), then re-raise errors."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._raise_errors()

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            first = errors[0]
            if len(errors) > 1:
                note = f"({len(errors) - 1} more handler errors were recorded)"
                # PEP 678 notes; Python 3.10 has the attribute convention, not add_note().
                first.__notes__ = [*getattr(first, "__notes__", []), note]  # type: ignore[attr-defined]
            raise first

    def __enter__(self) -> FaultHandler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        except Exception:
            if exc is None:
                raise

    def __del__(self) -> None:
        if getattr(self, "_pump", None) is not None and self._thread is None and not self._stopping:
            # Never started: release the pump and fd quietly.
            self._stopping = True
            self._pump.free_unused()
            self.uffd.close()

    # -- introspection ---------------------------------------------------

    @property
    def mappings(self) -> list[Mapping]:
        """Every registered mapping (forked children's too), sorted by start.

        Events already read (an mremap or MADV_DONTNEED that has returned) are
        applied to the table first, as for ``register`` and ``unregister``.
        """
        self._settle()
        with self._lock:  # not halfway through an unregister (whose UNREGISTER wakes faults)
            return self._maps.all()

    def _settle(self) -> None:
        """Wait until every event the pump has read is applied to the table.

        mremap, MADV_DONTNEED and fork return once the pump has *read* their
        event; the dispatch thread applies it a moment later. A caller that
        acts on the table right after (registers the freed range anew,
        unregisters the moved mapping) waits for that, up to the deadline; the
        dispatch thread itself (a handler calling in) never waits on itself.
        """
        if self._thread is None or threading.current_thread() is self._thread:
            return
        with contextlib.suppress(UffdError), self._pump.held():  # stopped: nothing to wait for
            self._pump.wait_applied(
                lambda: self._events_applied, lambda: self._stopping, self.deadline
            )

    @property
    def stats(self) -> HandlerStats:
        """Counters per mapping and in total, native faults, deadline fallbacks."""
        with self._lock:
            mappings = self._maps.all()
            live = {(m.start, m.end): m.stats for m in mappings}
            total = self._answers.orphans
            for m in [*mappings, *self._fds.retired]:
                total = total.merged(m.stats)
            native = self._native_at_stop
            if not self._finished:
                with contextlib.suppress(UffdError), self._pump.held():
                    native = self._pump.native_faults()
        return HandlerStats(total, live, native, self._expired)

    # -- prefetch helpers (core-side installs, not handlers) --------------

    def install(self, mapping: Mapping, offset: int, data: Any, *, wake: bool = False) -> int:
        """UFFDIO_COPY ``data`` at ``mapping.start + offset``; pages already present are skipped.

        For background prefetch, from any thread: ``wake=False`` sets
        DONTWAKE; call ``wake`` once per batch. Returns the bytes installed,
        which is short when the mappings are changing (an event read but not
        yet applied to the table: a page dropped by MADV_DONTNEED must not
        come back); try again later. Raises UnsupportedError if COPY is not
        honoured on the mapping, ValueError for a range outside it, UffdError
        ("handler stopped") once ``stop()`` has begun.
        """
        with memoryview(data) as whole, whole.cast("B") as view:
            mapping.check_install(offset, view.nbytes)
            if self._stopping:
                raise stopped("install")
            with self._pump.held():
                return self._pump.install(
                    self._maps.fd_number(mapping),
                    mapping.start + offset,
                    view,
                    mapping.page_size,
                    wake,
                    lambda: self._events_applied,
                    lambda: self._stopping,
                )

    def wake(self, mapping: Mapping, offset: int, length: int) -> None:
        """UFFDIO_WAKE a part of ``mapping`` (after DONTWAKE installs).

        Raises UffdError ("handler stopped") once ``stop()`` has begun.
        """
        if self._stopping:
            raise stopped("wake")
        with self._pump.held():
            self._maps.fd_of(mapping).wake(mapping.start + offset, length)

    def resolve(self, fault: Fault, resolution: Resolution) -> bool:
        """Answer a deferred fault, from any thread.

        May be called before the handler has even returned ``defer()`` (a
        fast network reply); the answer is then installed as soon as it
        does. Returns True if the resolution was installed or queued, False
        if the fault was already resolved (the deadline fallback) or its
        process has exited (nothing waits for the page: counted as "gone",
        not an error). Errors are recorded like a handler's and the fault
        takes the fallback.

        Raises:
            UffdError: "handler stopped": ``stop()`` has begun.
            ValueError: ``fault`` was not given to a handler by this FaultHandler.
        """
        if not isinstance(fault, PendingFault):
            raise ValueError(f"resolve: {fault!r} is not a fault this handler dispatched")
        with self._pump.held():
            if self._stopping:
                raise stopped("resolve")
            return self._answers.resolve(fault, resolution)

    # -- dispatch --------------------------------------------------------

    def _run(self) -> None:
        try:
            self._pump.hold()  # for the whole run: the per-fault calls need no more
        except UffdError:
            return  # stopped before the thread ran
        try:
            self._serve()
        finally:
            self._pump.release()
            if self._stopping:
                self._finish(stuck=False)

    def _serve(self) -> None:
        pump, forked, answers, dispatch = (
            self._pump,
            self._fds.forked,
            self._answers,
            self._dispatch,
        )
        items = pump.buffer(self._batch)
        next_reap = 0.0
        while True:
            timeout_ms = 100 if answers.retry else _REAP_INTERVAL_MS if forked else -1
            try:
                batch = pump.wait(items, timeout_ms)
            except (TimeoutError, InterruptedError):
                batch = None
            except UffdError as err:
                self._record(err)
                return
            if forked and time.monotonic() >= next_reap:
                # Exited children send no event: look for them now and then.
                with self._lock:
                    self._reap_exited()
                next_reap = time.monotonic() + _REAP_INTERVAL_MS / 1000
            if batch is None:
                answers.retry_pending()
                continue
            if not batch:
                return  # stopped
            if len(batch) > 1 and any(item[3] != PAGEFAULT for item in batch):
                # read() hands out pending faults before pending events, so a fault
                # in this batch may have been raised after an event that comes later
                # in it (a mremap or MADV_DONTNEED waiting for its event to be read):
                # apply the events first, then look the faults up (stable sort).
                batch.sort(key=lambda item: item[3] == PAGEFAULT)
            # A fault read longer ago than the deadline has been (or is about to
            # be) answered by the watchdog, which reports it: do not run its handler.
            stale = time.monotonic_ns() - self._deadline_ns
            for fd, slot, t_ns, event, a, b, c in batch:
                try:
                    if event == PAGEFAULT:
                        if t_ns > stale:
                            dispatch(fd, slot, t_ns, a, b, c)
                    else:
                        self._on_event(fd, slot, event, (a, b, c))
                except BaseException as err:  # SystemExit too: recorded, the thread serves on
                    self._record(err)
            if answers.retry:
                answers.retry_pending()

    def _dispatch(self, fd: int, slot: int, t_ns: int, flags: int, address: int, ptid: int) -> None:
        table = self._maps.by_fd.get(fd)
        m = table.find(address) if table is not None else None
        if m is None:
            self._answers.orphan(fd, slot, t_ns, address)
            return
        if not flags & _MINOR_OR_WP:
            kind, handle = "missing", m.ops.handle_missing
        elif flags & FLAG_MINOR:
            kind, handle = "minor", m.ops.handle_continue
        else:
            kind, handle = "wp", m.ops.handle_wp
        fault = PendingFault(
            address & -m.page_size, m, kind, flags & FLAG_WRITE != 0, ptid & 0xFFFFFFFF or None
        )
        fault.fd, fault.slot, fault.t_ns, fault.early = fd, slot, t_ns, None
        try:
            if handle is None:
                raise UnsupportedError(
                    f"{type(m.ops).__name__} has no handler for {kind} faults ({fault!r})"
                )
            resolution = handle(fault)
        except BaseException as err:  # SystemExit and KeyboardInterrupt too: never lost
            self._answers.raised(fault, err)
            return
        self._apply(fault, resolution)

    def _record(self, err: BaseException) -> None:
        with self._lock:
            self._errors.append(err)

    # -- events: fork and reaping policy ------------------------------------

    def _on_event(self, fd: int, did: int, code: int, words: tuple[int, int, int]) -> None:
        if code == EXPIRED:
            self._on_expired(fd, did, words[0], words[1], words[2] & 0xFFFFFFFF)
            return
        if code == FD_ERROR:
            with self._lock:
                self._fd_lost(fd, words[0])
            return
        try:
            event = decode(code, words, thread_ids=False, adopt_fd=Userfaultfd.from_fd)
            with self._lock:
                self._apply_event(fd, event)
        finally:
            # Counted even when applying failed, or installs would wait forever.
            self._events_applied += 1

    def _apply_event(self, fd: int, event: Any) -> None:
        """Update what is served for a kernel event (lock held, on the dispatch thread)."""
        if isinstance(event, Fork):
            self._reap_exited()  # each fork a chance to free the slots of exited children
            self._fds.add_child(fd, event.uffd)
        else:
            self._fds.follow(fd, event)

    def _reap_exited(self) -> None:
        """Close the fds of forked children whose process has exited (lock held).

        The kernel says nothing when a child's mm goes away (no event, no
        POLLHUP), so each FORK event and the dispatch loop, once a second,
        probe the earlier children; without this every child ever forked
        keeps an fd and one of the pump's 256 fd slots for the handler's
        lifetime, and FORK events fail with EMFILE after that.
        """
        for n in self._fds.exited():
            self._answers.forget_fd(n)
            self._fds.retire(n).close()

    def _lost(self, ufd: Userfaultfd) -> None:
        """An fd closed under the running handler (EBADF from an install)."""
        with self._lock:
            number = self._fds.number(ufd)
            if number is not None:
                self._fd_lost(number, _errno.EBADF)

    def _fd_lost(self, fd: int, err: int) -> None:
        """Drop an fd that failed under the pump (lock held); report it if it is the handler's."""
        report = self._fds.lose(fd, err)
        if report is not None:
            self._errors.insert(0, report)  # first: it explains the errors after it

    def _on_expired(self, fd: int, did: int, flags: int, address: int, ptid: int) -> None:
        # A fallback that failed because the faulting process has exited (ESRCH)
        # left nobody waiting: that is the process's end, not a missed deadline.
        gone = not did & 0xFF and self._fds.process_gone(fd)
        with self._lock:
            self._expired += 0 if gone else 1
        self._answers.expired(fd, did, flags, address, ptid, gone, self.deadline)
