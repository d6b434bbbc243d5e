"""``FaultHandler``: serve page faults of registered mappings through their ``UffdOps``.

The fault path, one step per module: the fd (``_userfaultfd``) → the pump
(``_pump``: the C pump reads and times faults without the GIL) → dispatch
(this module: find the mapping in ``_mapping``'s tables, classify the fault,
call its ops) → ops (``_ops``) → ``Resolution`` (``_resolution.plan``) → the
ioctl, performed by the pump on the fault's slot. Non-cooperative events
(fork, mremap, MADV_DONTNEED/REMOVE, munmap; userfaultfd(2)) update the
tables in the order they were read, so a fault read after an event is always
dispatched against the updated table.

Never hang a faulting thread: a handler that raises (anything, ``SystemExit``
too), returns None, refuses, or misses the deadline gets the fallback
("sigbus": UFFDIO_POISON where honoured, else a zero page; or "zero"), and
the error is re-raised from ``stop()``/``join()``. The pump's watchdog (C,
no GIL) enforces the deadline even when no Python code can run (dispatch.md).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import threading
import time
from types import TracebackType
from typing import Any

from uffd import mem
from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import DeadlineExceededError, UffdError, UnsupportedError, check, describe_range
from uffd._events import FLAG_MINOR, FLAG_WP, FLAG_WRITE, PAGEFAULT, Fork, Remap, Remove, decode
from uffd._mapping import Fault, Mapping, Tables, required_features
from uffd._ops import UffdOps, get_uffd_ops, kernel_grant
from uffd._pump import DID_WAKE, EXPIRED, FD_ERROR, Outcome, Pump, did_name, did_unguarded
from uffd._resolution import Resolution, plan
from uffd._stats import Counters, HandlerStats
from uffd._userfaultfd import Userfaultfd, api_answer, fd_identity, mm_gone

__all__ = ["FaultHandler"]

# Features the handler negotiates on its own when the kernel has them: they
# widen what can be registered without changing how events are delivered.
AUTO_FEATURES = (
    Feature.PAGEFAULT_FLAG_WP
    | Feature.MISSING_SHMEM
    | Feature.MISSING_HUGETLBFS
    | Feature.MINOR_SHMEM
    | Feature.MINOR_HUGETLBFS
    | Feature.WP_HUGETLBFS_SHMEM
    | Feature.POISON
    | Feature.THREAD_ID
)
_FALLBACKS = ("sigbus", "zero")
_EAGAIN_RETRIES = 16
# Below a millisecond the watchdog (a 2 ms tick) could not tell a deadline from
# none, and every fault would take the fallback before its handler ran.
_MIN_DEADLINE = 1e-3
_MAX_DEADLINE = 86400.0 * 365  # a year: the pump keeps nanoseconds in a u64
_MAX_BATCH = 4096  # faults one pump wait hands over at most
_REAP_INTERVAL_MS = 1000  # how often the dispatch loop looks for exited forked children
_COPY_BIT, _ZEROPAGE_BIT, _POISON_BIT = int(Ioctl.COPY), int(Ioctl.ZEROPAGE), int(Ioctl.POISON)
_COPY, _DEFER = Resolution.COPY, Resolution.defer()
# A fault's ``early`` once its handler answered: resolve() then refuses.
_FINISHED = Resolution(Resolution.REFUSE, reason="answered by its handler")


class _Fault(Fault):
    """A ``Fault`` with what the dispatch layer needs to answer it: fd, pump slot, read time.

    ``early`` is None while its handler runs; then ``_DEFER`` once deferred,
    ``_FINISHED`` once answered, or the answer ``resolve()`` gave first.
    """

    __slots__ = ("early", "fd", "slot", "t_ns")

    def __init__(
        self, address: int, m: Mapping, kind: str, write: bool, tid: int | None, fd: int,
        slot: int, t_ns: int,
    ) -> None:  # fmt: skip
        Fault.__init__(self, address, m, kind, write, tid)
        self.fd, self.slot, self.t_ns = fd, slot, t_ns
        self.early: Resolution | None = None


def _stopped_error(op: str) -> UffdError:
    return UffdError(
        _errno.EBADF,
        f"FaultHandler.{op}: handler stopped (stop() has begun); it installs, wakes and "
        "resolves nothing more",
    )


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
        self._fds: dict[int, Userfaultfd] = {}
        self._identity: dict[int, tuple[int, int] | None] = {}
        self._maps = Tables()
        self._retired: list[Mapping] = []
        self._orphans = Counters()
        self._errors: list[BaseException] = []
        self._deferred: dict[int, _Fault] = {}
        self._forked: set[int] = set()  # FORK events' child fds, reaped once the child exits
        self._retry: list[tuple[_Fault, Resolution, int]] = []
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._finished = False
        self._expired = 0
        self._events_applied = 0  # kernel events applied to the tables, for install()
        self._native_at_stop = 0  # stats after stop(): the pump is gone
        self._own_mm = uffd is None
        if uffd is not None:
            self.uffd = uffd  # e.g. received from a process a daemon serves
        else:
            if auto_features:
                answer = api_answer()
                features = Feature(features | (AUTO_FEATURES & (answer[0] if answer else 0)))
            try:
                self.uffd = Userfaultfd(features)
            except PermissionError as err:
                # The fd's own remedy (user_mode_only=True) is not a FaultHandler argument.
                raise PermissionError(
                    err.errno,
                    f"{err.strerror}; for a FaultHandler: "
                    "FaultHandler(uffd=Userfaultfd(user_mode_only=True))",
                ) from None
        self.features = self.uffd.features
        try:
            self._pump = Pump(self._deadline_ns, int(spin * 1e9))
        except OSError:
            self.uffd.close()
            raise
        with self._pump.held():
            self._add_fd(self.uffd)

    # -- registration ----------------------------------------------------

    def _add_fd(self, fd: Userfaultfd) -> None:
        self._pump.add_fd(fd.fileno())
        self._fds[fd.fileno()] = fd
        self._identity[fd.fileno()] = fd_identity(fd.fileno())
        self._maps.add_fd(fd.fileno())

    def adopt(self, fd: Userfaultfd) -> None:
        """Serve an externally created userfaultfd too (e.g. received over SCM_RIGHTS).

        The handler owns it from now on and closes it at ``stop()``.
        """
        self._require_running("adopt")
        with self._lock, self._pump.held():
            self._add_fd(fd)

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
        addr, length, kind, page_size = _describe(target, kind, page_size, ops, registered)
        ops = get_uffd_ops(kind, ops)
        mapping = Mapping(addr, addr + length, kind, mode, ops, page_size, fd)
        where = f"{kind} mapping {describe_range(addr, length)}"
        if not ops.can_userfault(mapping, mode):
            raise UnsupportedError(
                f"{type(ops).__name__} refused {mode!r} on the {where}: it serves "
                f"{ops.features!r} (features derive from its handle_* methods)",
                op="register",
                addr=addr,
                length=length,
            )
        missing = required_features(kind, mode) & ~fd.features
        if missing:
            have = (
                "the kernel has it: pass it in features="
                if missing & fd.available == missing
                else "the kernel lacks it"
            )
            raise UnsupportedError(
                f"the handler's userfaultfd did not negotiate {missing!r}, needed for {mode!r} "
                f"on the {where} ({have})",
                op="register",
                addr=addr,
                length=length,
            )
        with self._lock, self._pump.held():
            self._clear_overlap(fd, addr, addr + length, where)
            granted = kernel_grant(kind, mode) if registered else fd.register(addr, length, mode)
            if granted is None:
                raise UnsupportedError(f"the kernel refuses {mode!r} on the {where}", op="register")
            mapping.ioctls = Ioctl(ops.ioctls & granted)
            self._pump_map(mapping)
            self._maps.add(mapping)
        return mapping

    def _clear_overlap(self, fd: Userfaultfd, start: int, end: int, where: str) -> None:
        """Refuse an overlap, unless the overlapped entries are stale (lock held).

        Without EVENT_UNMAP nothing tells the handler that a registered range
        of this process was unmapped (``Region.close()``) or mapped anew; the
        kernel's own registration then no longer exists (smaps shows no uffd
        flag), and the stale entries are dropped instead.
        """
        overlap = self._maps.overlapping(fd.fileno(), start, end)
        if not overlap:
            return
        own = fd is self.uffd and self._own_mm
        if not own or mem.userfault_registered(start, end - start):
            raise ValueError(f"register: {where} overlaps {overlap[0]!r}")
        self._drop(fd.fileno(), start, end)

    def _fallback_of(self, m: Mapping) -> str:
        """The pump's fallback for ``m``: poison where it may, else a zero page."""
        ufd = self._maps.fd_of(m)
        if self.fallback == "sigbus" and m.honoured & _POISON_BIT and ufd.features & Feature.POISON:
            return "poison"
        return "zeropage" if m.honoured & _ZEROPAGE_BIT else "zerocopy"

    def _pump_map(self, m: Mapping) -> None:
        """Give ``m`` (its fallback and native source) to the pump (lock and pump held)."""
        fd = self._maps.fd_number(m)
        native = m.ops.native_source(m)
        self._pump.map(fd, m.start, m.end, m.page_size, self._fallback_of(m), native, m.origin)

    def unregister(self, mapping: Mapping) -> None:
        """UFFDIO_UNREGISTER ``mapping`` and drop it; faults pending on it are woken."""
        self._settle()
        with self._lock, self._pump.held():
            if not self._maps.holds(mapping):
                raise ValueError(f"unregister: {mapping!r} is not registered on this handler")
            self._maps.fd_of(mapping).unregister(mapping.start, mapping.length)
            self._drop(self._maps.fd_number(mapping), mapping.start, mapping.end)

    def _drop(self, fd: int, start: int, end: int) -> None:
        """Remove [start, end) from fd's table and the pump (lock and pump held)."""
        self._retired.extend(self._maps.drop(fd, start, end))
        self._pump.unmap(fd, start, end)

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
                self._detach_lost_fds()
                for fault in self._deferred.values():
                    did = pump.fallback(fault.slot)
                    if did < 0 or did & 0xFF == DID_WAKE:
                        # Its page is there already (a prefetch installed it, and
                        # the thread went on) or nobody waits: nothing was lost.
                        continue
                    self._errors.append(
                        DeadlineExceededError(
                            f"deferred fault at {fault.address:#x} was never resolved "
                            "before stop(); resolved by the fallback",
                            address=fault.address,
                            thread_id=fault.thread_id,
                        )
                    )
                self._deferred.clear()
                pump.drain()
                self._native_at_stop = pump.native_faults()
                self._release_ranges()
            if stuck:
                self._errors.append(
                    UffdError(
                        0,
                        "the dispatch thread did not stop: a handler is blocked; its ranges "
                        "were unregistered, and its fds close when that handler returns",
                    )
                )
        # Outside the lock: a holder still inside the pump may need it to get out.
        pump.close(self._close_fds, 0.0 if stuck else 5.0)

    def _release_ranges(self) -> None:
        """Unregister every range (lock held): closing an fd does not, while a copy is open.

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

    def _close_fds(self) -> None:
        for fd in list(self._fds.values()):
            fd.close()

    def _detach_lost_fds(self) -> None:
        """Forget, without closing, each fd that was closed under the handler (lock held).

        Closing a userfaultfd releases its faulting threads and unregisters its
        ranges; epoll drops it silently, so a pump that never read it again
        only notices here. Its number may belong to another file by now.
        """
        for n, fd in list(self._fds.items()):
            if not fd.closed and fd_identity(n) != self._identity.get(n):
                self._fd_lost(n, _errno.EBADF)

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
        try:
            with self._pump.held():
                target = self._pump.events_read()
        except UffdError:
            return  # stopped
        until = time.monotonic() + self.deadline
        while self._events_applied < target and not self._stopping and time.monotonic() < until:
            time.sleep(0.0002)

    @property
    def stats(self) -> HandlerStats:
        """Counters per mapping and in total, native faults, deadline fallbacks."""
        with self._lock:
            mappings = self._maps.all()
            live = {(m.start, m.end): m.stats for m in mappings}
            total = self._orphans
            for m in [*mappings, *self._retired]:
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
        if not mapping.honoured & _COPY_BIT:
            raise UnsupportedError(f"install: COPY is not honoured on {mapping!r}")
        with memoryview(data) as whole, whole.cast("B") as view:
            ps = mapping.page_size
            if (
                offset % ps
                or view.nbytes % ps
                or offset < 0
                or offset + view.nbytes > mapping.length
            ):
                raise ValueError(
                    f"install: offset {offset} + {view.nbytes} bytes is not whole pages "
                    f"inside {mapping!r}"
                )
            if self._stopping:
                raise _stopped_error("install")
            with self._pump.held():
                return self._install(mapping, offset, view, wake)

    def _install(self, mapping: Mapping, offset: int, view: memoryview, wake: bool) -> int:
        fd = self._maps.fd_number(mapping)
        installed = pos = 0
        while pos < view.nbytes:
            dst = mapping.start + offset + pos
            with view[pos:] as rest:
                rc, done = self._pump.install(fd, dst, rest, wake, self._events_applied)
            installed += done
            pos += done
            if rc == 0:
                break
            if rc == -_errno.EEXIST:
                pos += mapping.page_size  # a page is there already: skip it
            elif self._stopping:
                raise _stopped_error("install")  # stop() unregistered the range under us
            elif rc != -_errno.EAGAIN:
                check(rc, "install (UFFDIO_COPY)", dst, view.nbytes - pos)
            elif not done:
                break  # the mappings are changing: stop here
            # A partial copy (EAGAIN with progress) stopped at a present page.
        return installed

    def wake(self, mapping: Mapping, offset: int, length: int) -> None:
        """UFFDIO_WAKE a part of ``mapping`` (after DONTWAKE installs).

        Raises UffdError ("handler stopped") once ``stop()`` has begun.
        """
        if self._stopping:
            raise _stopped_error("wake")
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
        if not isinstance(fault, _Fault):
            raise ValueError(f"resolve: {fault!r} is not a fault this handler dispatched")
        with self._pump.held():
            with self._lock:
                if self._stopping:
                    raise _stopped_error("resolve")
                if fault.early is None:
                    fault.early = resolution  # the handler has not returned yet
                    return True
                if self._deferred.get(fault.slot) is not fault:
                    return False
                del self._deferred[fault.slot]
            return self._apply(fault, resolution)

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
        pump = self._pump
        items = pump.buffer(self._batch)
        next_reap = 0.0
        while True:
            timeout_ms = 100 if self._retry else _REAP_INTERVAL_MS if self._forked else -1
            try:
                batch = pump.wait(items, self._batch, timeout_ms)
            except (TimeoutError, InterruptedError):
                batch = None
            except UffdError as err:
                self._record(err)
                return
            if self._forked and time.monotonic() >= next_reap:
                # Exited children send no event: look for them now and then.
                with self._lock:
                    self._reap_exited()
                next_reap = time.monotonic() + _REAP_INTERVAL_MS / 1000
            if batch is None:
                self._retry_pending()
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
                            self._dispatch(fd, slot, t_ns, a, b, c)
                    else:
                        self._on_event(fd, slot, event, (a, b, c))
                except BaseException as err:  # SystemExit too: recorded, the thread serves on
                    self._record(err)
            if self._retry:
                self._retry_pending()

    def _dispatch(self, fd: int, slot: int, t_ns: int, flags: int, address: int, ptid: int) -> None:
        table = self._maps.by_fd.get(fd)
        m = table.find(address) if table is not None else None
        if m is None:
            # Unregistered or moved under the fault (a REMOVE, UNMAP or REMAP raced
            # it): wake the thread; it faults again, on what is there now. A zero
            # page here would land in whatever the kernel has registered at this
            # address by now (the range moved back, a new registration).
            with contextlib.suppress(UffdError):
                self._pump.resolve(fd, slot, "wake", address & ~(mem.PAGE_SIZE - 1), mem.PAGE_SIZE)
            with self._lock:
                self._orphans.record("missing", "wake", time.monotonic_ns() - t_ns)
            return
        if flags & FLAG_MINOR:
            kind, handle = "minor", m.ops.handle_continue
        elif flags & FLAG_WP:
            kind, handle = "wp", m.ops.handle_wp
        else:
            kind, handle = "missing", m.ops.handle_missing
        write, tid = bool(flags & FLAG_WRITE), (ptid & 0xFFFFFFFF) or None
        fault = _Fault(address & ~(m.page_size - 1), m, kind, write, tid, fd, slot, t_ns)
        try:
            if handle is None:
                raise UnsupportedError(
                    f"{type(m.ops).__name__} has no handler for {kind} faults ({fault!r})"
                )
            resolution = handle(fault)
        except BaseException as err:  # SystemExit and KeyboardInterrupt too: never lost
            fault.early = _FINISHED
            self._fail(fault, err)
            return
        if resolution is _DEFER:
            with self._lock:
                # resolve() may have answered already, from another thread.
                early, fault.early = fault.early, _DEFER
                if early is None:
                    self._deferred[slot] = fault
            if early is not None:
                self._apply(fault, early)
            return
        fault.early = _FINISHED
        if resolution is None:
            self._fail(
                fault,
                TypeError(f"{type(m.ops).__name__}.handle_{kind} returned None for {fault!r}"),
            )
        else:
            self._apply(fault, resolution)

    def _apply(self, fault: _Fault, r: Resolution, attempt: int = 0) -> bool:
        """Install ``r`` for ``fault`` through the pump; True if installed or queued for a retry."""
        m = fault.mapping
        data, wp = r.data, False
        kind = type(data)
        if (
            r.kind is _COPY
            and not r.keep_wp
            and m.honoured & _COPY_BIT
            and (
                (kind is bytes and len(data) >= m.page_size)
                or (kind is memoryview and data.c_contiguous and data.nbytes >= m.page_size)
            )
        ):
            how = _COPY  # the common cases: no checks beyond these
        else:
            try:
                how, data, wp = plan(r, fault, bool(self._maps.fd_of(m).features & Feature.POISON))
            except Exception as err:
                self._fail(fault, err)
                return False
        try:
            outcome = self._pump.resolve(
                fault.fd, fault.slot, how, fault.address, m.page_size, data, wp
            )
        except UffdError as err:
            self._fail(fault, err)
            return False
        if outcome is Outcome.INSTALLED:
            with self._lock:  # resolve() may run on other threads
                m.stats.record(fault.kind, r.kind, time.monotonic_ns() - fault.t_ns)
            return True
        return self._outcome(fault, r, how, outcome, attempt)

    def _outcome(self, fault: _Fault, r: Resolution, how: str, outcome: Outcome, n: int) -> bool:
        """Act on an outcome other than INSTALLED; True if the fault is (or will be) resolved."""
        m = fault.mapping
        ufd = self._maps.fd_of(m)
        if outcome is Outcome.PRESENT:
            # Only a WP or MINOR fault: the pump answers INSTALLED (and wakes) when
            # EEXIST or ENOENT means someone else resolved the fault.
            return self._present(fault, r, how)
        if outcome is Outcome.EXPIRED:
            return False  # the watchdog resolved it; its notice reports that
        if outcome is Outcome.GONE or (
            outcome is Outcome.CLOSED and ufd.closed and ufd is not self.uffd
        ):
            # The faulting process has exited (its fd may be reaped already): nobody
            # waits for this page, so it is not an error. Free the slot for the watchdog.
            self._pump.fallback(fault.slot)
            with self._lock:
                m.stats.record(fault.kind, "gone", time.monotonic_ns() - fault.t_ns)
            return False
        if outcome is Outcome.CLOSED:
            # Closed under the running handler (os.close, or its close() while
            # serving): the kernel has released the threads; report the fd lost.
            self._pump.fallback(fault.slot)
            with self._lock:
                for number, known in list(self._fds.items()):
                    if known is ufd:
                        self._fd_lost(number, _errno.EBADF)
            return False
        if n < _EAGAIN_RETRIES:
            # The mappings are changing: the event is queued; retry after reading it.
            self._retry.append((fault, r, n + 1))
            return True
        # Still changing after every retry (a storm of forks keeps mmap_changing
        # raised): wake the thread instead; it faults again and that fault is
        # served like any other. Nothing is lost, so nothing is recorded.
        try:
            if (
                self._pump.resolve(fault.fd, fault.slot, "wake", fault.address, m.page_size)
                is Outcome.INSTALLED
            ):
                with self._lock:
                    m.stats.record(fault.kind, "wake", time.monotonic_ns() - fault.t_ns)
                return False
            raise UffdError(
                _errno.EAGAIN, f"resolving {fault!r} with {r!r}: the mappings kept changing"
            )
        except UffdError as err:
            self._fail(fault, err)
        return False

    def _present(self, fault: _Fault, r: Resolution, how: str) -> bool:
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
        self._fail(
            fault,
            UnsupportedError(
                f"{type(fault.mapping.ops).__name__}.handle_{fault.kind} answered {r!r} for "
                f"{fault!r}, but the page is present (EEXIST), so that cannot resolve a "
                f"{fault.kind} fault; return {remedy}"
            ),
        )
        return False

    def _copy_over(self, fault: _Fault, r: Resolution) -> bool:
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
        if ufd is not self.uffd or not self._own_mm:
            self._fail(
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
            self._fail(fault, err)
            return False
        if done is Outcome.INSTALLED:
            with self._lock:
                m.stats.record(fault.kind, r.kind, time.monotonic_ns() - fault.t_ns)
            return True
        return False  # the watchdog resolved it meanwhile; its notice reports that

    def _retry_pending(self) -> None:
        pending, self._retry = self._retry, []
        for fault, r, attempt in pending:
            self._apply(fault, r, attempt)

    def _fail(self, fault: _Fault, err: BaseException) -> None:
        """Record ``err`` and resolve ``fault`` by the fallback."""
        did = self._pump.fallback(fault.slot)
        with self._lock:
            fault.mapping.stats.errors += 1
            if did >= 0:
                latency = time.monotonic_ns() - fault.t_ns
                fault.mapping.stats.record(fault.kind, "fallback-" + did_name(did), latency)
        self._record(err)

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
        """Update the tables for a kernel event (lock held, on the dispatch thread)."""
        if isinstance(event, Fork):
            self._reap_exited()
            child = event.uffd
            try:
                self._add_fd(child)
            except BaseException:
                child.close()  # not served: closing it lets the child's faults through
                raise
            self._forked.add(child.fileno())
            for m in self._maps.copy_for_child(fd, child):
                self._pump_map(m)
        elif isinstance(event, Remap):
            moved = self._maps.move(fd, event.old, event.new, event.length)
            # Unmap the old range from the pump (that splits a map straddling
            # it) and map the moved pieces anew at their new addresses.
            self._pump.unmap(fd, event.old, event.old + event.length)
            for m in moved:
                self._pump_map(m)
        elif isinstance(event, Remove):
            # The pages are gone; unregister so later accesses get zero pages.
            if self._maps.overlapping(fd, event.start, event.end):
                # The range or the process may be gone already.
                with contextlib.suppress(UffdError, ValueError):
                    self._fds[fd].unregister(event.start, event.end - event.start)
                self._drop(fd, event.start, event.end)
        else:  # Unmap
            self._drop(fd, event.start, event.end)

    def _reap_exited(self) -> None:
        """Close the fds of forked children whose process has exited (lock held).

        The kernel says nothing when a child's mm goes away (no event, no
        POLLHUP), so each FORK event and the dispatch loop, once a second,
        probe the earlier children; without this every child ever forked
        keeps an fd and one of the pump's 256 fd slots for the handler's
        lifetime, and FORK events fail with EMFILE after that.
        """
        for n in [n for n in self._forked if mm_gone(n)]:
            self._forked.discard(n)
            waiting = [f for f in self._deferred.values() if f.fd == n]
            waiting += [f for f, _, _ in self._retry if f.fd == n]
            self._retry = [item for item in self._retry if item[0] not in waiting]
            for fault in waiting:
                # Nobody waits for these pages any more: "gone", not an error.
                self._deferred.pop(fault.slot, None)
                self._pump.fallback(fault.slot)  # frees the slot (ESRCH)
                fault.mapping.stats.record(fault.kind, "gone", time.monotonic_ns() - fault.t_ns)
            self._retire_fd(n).close()

    def _retire_fd(self, n: int) -> Userfaultfd:
        """Stop serving fd ``n`` (lock held); its object, for the caller to close or detach."""
        self._retired.extend(self._maps.remove_fd(n))
        self._identity.pop(n, None)
        self._pump.remove_fd(n)
        return self._fds.pop(n)

    def _fd_lost(self, fd: int, err: int) -> None:
        """Drop an fd that failed under the pump (lock held); report it if it is the handler's."""
        if fd not in self._fds:
            self._pump.remove_fd(fd)
            return
        lost = self._retire_fd(fd)
        if err == _errno.EBADF:
            lost.detach()  # not ours any more: never close that number, it may be reused
        if lost is self.uffd:
            self._errors.insert(
                0,
                UffdError(
                    err,
                    f"the handler's userfaultfd (fd {fd}) was closed under the running handler "
                    f"([{_errno.errorcode.get(err, err)}]: closed while in use?): the kernel "
                    "released its faulting threads and unregistered its ranges; the handler did "
                    "not close that fd number again",
                ),
            )

    def _on_expired(self, fd: int, did: int, flags: int, address: int, ptid: int) -> None:
        # A fallback that failed because the faulting process has exited (ESRCH)
        # left nobody waiting: that is the process's end, not a missed deadline.
        # The handler's own fd serves this process, which cannot have exited.
        # A forked child's fd reaped (closed) before this notice: its process had exited.
        own = not self.uffd.closed and fd == self.uffd.fileno()
        gone = not did & 0xFF and (
            (fd not in self._fds and not own) or ((not own or not self._own_mm) and mm_gone(fd))
        )
        with self._lock:
            self._expired += 0 if gone else 1
            for slot, fault in list(self._deferred.items()):
                if fault.address == address & ~(fault.mapping.page_size - 1) and fault.fd == fd:
                    del self._deferred[slot]
                    break
            table = self._maps.by_fd.get(fd)
            m = table.find(address) if table is not None else None
            if m is not None and gone:
                m.stats.record("missing", "gone", self._deadline_ns)
            elif m is not None:
                m.stats.errors += 1
                kind = "minor" if flags & FLAG_MINOR else "wp" if flags & FLAG_WP else "missing"
                m.stats.record(kind, "fallback-" + did_name(did), self._deadline_ns)
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
                f"fault at {address:#x} missed the {self.deadline:g} s deadline: {why}; "
                f"resolved with {what}",
                address=address,
                thread_id=ptid or None,
            )
        )


def _describe(
    target: mem.Region | tuple[int, int],
    kind: str | None,
    page_size: int | None,
    ops: UffdOps | None,
    registered: bool,
) -> tuple[int, int, str, int]:
    """(addr, length, kind, page size) of a registration target, all checked.

    A page size is the memory's: the base page for anon and shmem, a huge
    page size of this host for hugetlb (for this process's memory, the one
    smaps reports). Raises ValueError (see ``register``).
    """
    found = None
    if isinstance(target, mem.Region):
        addr, length = target.addr, target.length
        kind, found = kind or target.kind, target.page_size
    else:
        addr, length = target
        if kind is None and not registered:
            try:
                kind, _, _, found = mem.kind_of(addr)
            except LookupError as err:
                raise ValueError(f"register: {err}: map the memory first") from None
        kind = kind or (ops.kind if ops is not None and ops.kind else "anon")
    allowed = [found] if found else mem.page_sizes(kind)
    page_size = page_size or allowed[0]
    if page_size not in allowed:
        raise ValueError(
            f"register: page_size={page_size} is not a page size of this {kind} memory "
            f"({', '.join(map(str, allowed))}); leave it out to use the memory's own"
        )
    if length <= 0 or addr % page_size or length % page_size:
        raise ValueError(
            f"register: {describe_range(addr, length)} is not a positive multiple of the "
            f"{page_size}-byte page size of this {kind} memory"
        )
    return addr, length, kind, page_size
