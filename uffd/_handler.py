"""``FaultHandler``: serve page faults of registered mappings through their ``UffdOps``.

The fault path, one step per module: the fd (``_userfaultfd``) → the C pump
(csrc/uffd_pump.c, which reads and times faults without the GIL) → dispatch
(this module: find the mapping, classify the fault, call its ops) → ops
(``_ops``) → ``Resolution`` → the ioctl, performed by the pump on the
fault's slot. Non-cooperative events (fork, mremap, MADV_DONTNEED/REMOVE,
munmap) update the mapping table in the order they were read, so a fault
read after an event is always dispatched against the updated table.

Never hang a faulting thread: a handler that raises, returns None, refuses,
or misses the deadline gets the fallback ("sigbus": UFFDIO_POISON where
honoured, else a zero page; or "zero"), and the error is re-raised from
``stop()``/``join()``. The pump's watchdog (C, no GIL) enforces the deadline
even when no Python code can run: a thread that faults while holding the
GIL is resolved and reported, never a silent deadlock (dispatch.md).
"""

from __future__ import annotations

import contextlib
import errno as _errno
import struct
import threading
import time
from types import TracebackType
from typing import Any

from uffd import mem
from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import (
    DeadlineExceededError,
    HandlerRefusedError,
    UffdError,
    UnsupportedError,
    check,
    describe_range,
)
from uffd._mapping import Fault, Mapping, Table, required_features
from uffd._native import ffi, lib
from uffd._ops import UffdOps, get_uffd_ops, kernel_grant
from uffd._resolution import Resolution
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
_ITEM = struct.Struct("=iIQB7xQQQ")
_ITEM_SIZE = 48
_EAGAIN_RETRIES = 16
_MAX_DEADLINE = 86400.0 * 365  # a year: the pump keeps nanoseconds in a u64
_MAX_BATCH = 4096  # faults one pump wait hands over at most
_REAP_INTERVAL_MS = 1000  # how often the dispatch loop looks for exited forked children
_DID = {
    lib.PYUFFD_DID_POISON: "poison",
    lib.PYUFFD_DID_ZEROPAGE: "zero",
    lib.PYUFFD_DID_ZEROCOPY: "zero",
    lib.PYUFFD_DID_UNPROTECT: "unprotect",
    lib.PYUFFD_DID_CONTINUE: "continue",
    lib.PYUFFD_DID_WAKE: "wake",
}
_REFUSE, _ZERO, _POISON = Resolution.REFUSE, Resolution.ZERO, Resolution.POISON
_COPY_KIND = Resolution.COPY
_DEFER = Resolution.defer()
_FINISHED = Resolution(
    Resolution.REFUSE, reason="answered by its handler"
)  # a Fault's _early once done
_ZEROPAGE, _COPY = int(Ioctl.ZEROPAGE), int(Ioctl.COPY)
_OP_COPY = lib.PYUFFD_OP_COPY
_COPY_MODE_WP = lib.UFFDIO_COPY_MODE_WP
_FLAG_MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR
_FLAG_WP = lib.UFFD_PAGEFAULT_FLAG_WP
_FLAG_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
_EVENT_PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
_resolve = lib.pyuffd_pump_resolve
_OPS = {
    Resolution.COPY: lib.PYUFFD_OP_COPY,
    Resolution.ZERO: lib.PYUFFD_OP_ZEROPAGE,
    Resolution.CONTINUE: lib.PYUFFD_OP_CONTINUE,
    Resolution.POISON: lib.PYUFFD_OP_POISON,
    Resolution.UNPROTECT: lib.PYUFFD_OP_UNPROTECT,
}


class FaultHandler:
    """A thread that serves the page faults of registered mappings.

    ``features`` are extra UFFD features to negotiate (EVENT_FORK, EVENT_REMAP,
    EVENT_REMOVE, EVENT_UNMAP to follow the process's mappings); the handler
    adds the features it needs when the kernel has them (``auto_features``).
    ``fallback`` ("sigbus" or "zero") resolves faults a handler failed; a
    poison marker is never used for a thread of this process outside a
    SIGBUS-safe Region access (the SIGBUS would kill the process): that thread
    gets a zero page. ``deadline`` (seconds) bounds every fault. ``uffd``
    serves a userfaultfd opened elsewhere (``Userfaultfd.from_fd``) instead
    of opening one; the handler owns it from then on. ``spin`` (seconds)
    is how long the pump polls for the next fault before it sleeps: it
    yields the CPU while polling, so it costs nothing when the faulting
    thread shares the handler's CPU, and saves a cross-CPU wake-up (most of
    the fault latency here) when it does not; 0 turns it off. ``batch`` is
    how many faults the dispatch thread takes from the pump at once.

    Methods may be called from any thread; the handlers run on the dispatch
    thread. With EVENT_FORK, a ``os.fork()`` in this process is safe: the
    FORK event is read by C code that needs no GIL.

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
        if not 0 < deadline <= _MAX_DEADLINE:
            raise ValueError(
                f"deadline must be positive seconds up to {_MAX_DEADLINE:g}, got {deadline!r}"
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
        self._pump: Any = None
        self._fds: dict[int, Userfaultfd] = {}
        self._tables: dict[int, Table] = {}
        self._retired: list[Mapping] = []
        self._orphans = Counters()
        self._errors: list[BaseException] = []
        self._deferred: dict[int, Fault] = {}
        self._identity: dict[int, tuple[int, int] | None] = {}
        # fds of forked children (FORK events), reaped once their process exits
        self._forked: set[int] = set()
        self._native_at_stop = 0  # stats after stop(): the pump is gone
        self._retry: list[tuple[Fault, Resolution, int]] = []
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._expired = 0
        self._events_applied = 0  # kernel events applied to the table, for install()
        # Written by C, never read: the pump reports progress through rc.
        self._done = ffi.new("int64_t *")
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
        pump = lib.pyuffd_pump_new(self._deadline_ns)
        if pump == ffi.NULL:
            self.uffd.close()
            raise OSError(ffi.errno, "could not start the fault pump (out of memory or threads?)")
        self._pump = pump
        lib.pyuffd_pump_set_spin(pump, int(spin * 1e9))
        self._add_fd(self.uffd)

    # -- registration ----------------------------------------------------

    def _add_fd(self, fd: Userfaultfd) -> None:
        check(lib.pyuffd_pump_add_fd(self._pump, fd.fileno()), "epoll add userfaultfd")
        self._fds[fd.fileno()] = fd
        self._identity[fd.fileno()] = fd_identity(fd.fileno())
        self._tables[fd.fileno()] = Table([])

    def adopt(self, fd: Userfaultfd) -> None:
        """Serve an externally created userfaultfd too (e.g. received over SCM_RIGHTS).

        The handler owns it from now on and closes it at ``stop()``.
        """
        self._require_running("adopt")
        with self._lock:
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
        otherwise they come from the Region or /proc/self/smaps.

        Raises:
            UnsupportedError: the ops, the negotiated features or the kernel
                refused; the message says who and why.
            ValueError: mode 0, an unaligned range, an overlap with a mapping,
                an ``(addr, length)`` where nothing is mapped.
        """
        self._require_running("register")
        self._settle()  # a range just unmapped or moved: its events applied first
        mode = Mode(mode)
        if not mode:
            raise ValueError("register: mode must name at least one of Mode.MISSING, WP, MINOR")
        fd = uffd or self.uffd
        if isinstance(target, mem.Region):
            addr, length = target.addr, target.length
            page_size = page_size or target.page_size
            kind = kind or target.kind
        else:
            addr, length = target
            if kind is None and not registered:
                try:
                    kind, _, _, found = mem.kind_of(addr)
                except LookupError as err:
                    raise ValueError(f"register: {err}: map the memory first") from None
                page_size = page_size or found
            else:
                kind = kind or (ops.kind if ops is not None and ops.kind else "anon")
                default = mem.huge_page_size() if kind == "hugetlb" else mem.PAGE_SIZE
                page_size = page_size or default
        if length <= 0 or addr % page_size or length % page_size:
            raise ValueError(
                f"register: {describe_range(addr, length)} is not a positive multiple of the "
                f"{page_size}-byte page size of this {kind} memory"
            )
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
        with self._lock:
            table = self._tables[fd.fileno()]
            for other in table.maps:
                if other.start < addr + length and addr < other.end:
                    raise ValueError(f"register: {where} overlaps {other!r}")
            granted = kernel_grant(kind, mode) if registered else fd.register(addr, length, mode)
            if granted is None:
                raise UnsupportedError(f"the kernel refuses {mode!r} on the {where}", op="register")
            mapping.ioctls = Ioctl(ops.ioctls & granted)
            mapping._fallback = self._fallback_for(mapping)
            self._publish(mapping)
        return mapping

    def _fallback_for(self, m: Mapping) -> int:
        if (
            self.fallback == "sigbus"
            and m.ioctls & Ioctl.POISON
            and m._uffd.features & Feature.POISON
        ):
            return int(lib.PYUFFD_FALLBACK_POISON)
        if m.ioctls & Ioctl.ZEROPAGE:
            return int(lib.PYUFFD_FALLBACK_ZEROPAGE)
        return int(lib.PYUFFD_FALLBACK_ZEROCOPY)

    def _publish(self, m: Mapping) -> None:
        """Add ``m`` to its fd's table and to the pump (lock held)."""
        self._pump_map(m)
        fd = m._uffd.fileno()
        self._tables[fd] = Table([*self._tables[fd].maps, m])

    def _pump_map(self, m: Mapping) -> None:
        """Give ``m`` (its fallback and native source) to the pump (lock held)."""
        native = m.ops.native_source(m)
        source, src_addr, src_fd, src_off, max_run = native or (lib.PYUFFD_SOURCE_NONE, 0, -1, 0, 0)
        # A source describes the range as registered; a piece of a split starts further in.
        if source == lib.PYUFFD_SOURCE_MEMORY:
            src_addr += m._origin
        elif source == lib.PYUFFD_SOURCE_FILE:
            src_off += m._origin
        check(
            lib.pyuffd_pump_map(
                self._pump,
                m._uffd.fileno(),
                m.start,
                m.end,
                m.page_size,
                m._fallback,
                source,
                src_addr,
                src_fd,
                src_off,
                max_run,
            ),
            "pump map",
        )

    def unregister(self, mapping: Mapping) -> None:
        """UFFDIO_UNREGISTER ``mapping`` and drop it; faults pending on it are woken."""
        self._settle()
        with self._lock:
            fd = mapping._uffd.fileno() if not mapping._uffd.closed else -1
            table = self._tables.get(fd)
            if table is None or mapping not in table.maps:
                raise ValueError(f"unregister: {mapping!r} is not registered on this handler")
            mapping._uffd.unregister(mapping.start, mapping.length)
            self._drop(fd, mapping.start, mapping.end)

    def _split(self, fd: int, start: int, end: int) -> list[Mapping]:
        """Split fd's mappings at ``start`` and ``end``; return those inside (lock held)."""
        maps: list[Mapping] = []
        inside: list[Mapping] = []
        for m in self._tables[fd].maps:
            pieces = [m]
            for cut in (start, end):
                last = pieces[-1]
                if last.start < cut < last.end:
                    head, tail = last._clone(last.start, cut), last._clone(cut, last.end)
                    head.stats = last.stats
                    pieces[-1:] = [head, tail]
            for piece in pieces:
                (inside if start <= piece.start and piece.end <= end else maps).append(piece)
        self._tables[fd] = Table(maps + inside)
        return inside

    def _drop(self, fd: int, start: int, end: int) -> None:
        """Remove [start, end) from fd's table and the pump (lock held)."""
        inside = self._split(fd, start, end)
        self._retired.extend(inside)
        self._tables[fd] = Table([m for m in self._tables[fd].maps if m not in inside])
        check(lib.pyuffd_pump_unmap(self._pump, fd, start, end), "pump unmap")

    # -- lifecycle -------------------------------------------------------

    def _require_running(self, op: str) -> None:
        if self._stopped:
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
        pending (deferred faults never answered), then close every fd, which
        wakes any thread still waiting and unregisters its ranges. Idempotent;
        the first recorded handler error is raised (with a note counting the others).
        """
        if not self._stopped:
            self._stopped = True
            lib.pyuffd_pump_stop(self._pump)
            stuck = False
            if self._thread is not None:
                self._thread.join(timeout if timeout is not None else max(5.0, 2 * self.deadline))
                stuck = self._thread.is_alive()
            with self._lock:
                self._detach_lost_fds()
                for fault in self._deferred.values():
                    did = lib.pyuffd_pump_fallback(self._pump, fault._slot)
                    if did < 0 or did & 0xFF == lib.PYUFFD_DID_WAKE:
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
                lib.pyuffd_pump_drain(self._pump)
                self._native_at_stop = int(lib.pyuffd_pump_native_faults(self._pump))
                if stuck:
                    self._errors.append(
                        UffdError(
                            0,
                            "the dispatch thread did not stop: a handler is blocked; "
                            "its fds were closed",
                        )
                    )
                else:
                    lib.pyuffd_pump_free(self._pump)
                for fd in self._fds.values():
                    fd.close()
        self._raise_errors()

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
        if getattr(self, "_pump", None) is not None and not self._stopped and self._thread is None:
            # Never started: release the pump and fd quietly.
            self._stopped = True
            lib.pyuffd_pump_free(self._pump)
            self.uffd.close()

    # -- introspection ---------------------------------------------------

    @property
    def mappings(self) -> list[Mapping]:
        """Every registered mapping (forked children's too), sorted by start.

        Events already read (an mremap or MADV_DONTNEED that has returned) are
        applied to the table first, as for ``register`` and ``unregister``.
        """
        self._settle()
        return self._sorted_mappings()

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
        with self._lock:  # stop() frees the pump under it
            if self._stopped:
                return
            target = lib.pyuffd_pump_events_read(self._pump)
        until = time.monotonic() + self.deadline
        while self._events_applied < target and not self._stopped and time.monotonic() < until:
            time.sleep(0.0002)

    def _sorted_mappings(self) -> list[Mapping]:
        # list() copies at once: a FORK event may add a table on the dispatch thread meanwhile.
        tables = list(self._tables.values())
        return sorted(
            (m for t in tables for m in t.maps),
            key=lambda m: (m.start, m._uffd.fileno() if not m._uffd.closed else -1),
        )

    @property
    def stats(self) -> HandlerStats:
        """Counters per mapping and in total, native faults, deadline fallbacks."""
        with self._lock:
            mappings = self._sorted_mappings()
            live = {(m.start, m.end): m.stats for m in mappings}
            total = self._orphans
            for m in [*mappings, *self._retired]:
                total = total.merged(m.stats)
            if self._stopped:
                native = self._native_at_stop
            else:
                native = int(lib.pyuffd_pump_native_faults(self._pump))
        return HandlerStats(total, live, native, self._expired)

    # -- prefetch helpers (core-side installs, not handlers) --------------

    def install(self, mapping: Mapping, offset: int, data: Any, *, wake: bool = False) -> int:
        """UFFDIO_COPY ``data`` at ``mapping.start + offset``; pages already present are skipped.

        For background prefetch, from any thread: ``wake=False`` sets
        DONTWAKE; call ``wake`` once per batch. Returns the bytes installed,
        which is short when the mappings are changing (an event read but not
        yet applied to the table: a page dropped by MADV_DONTNEED must not
        come back); try again later. Raises UnsupportedError if COPY is not
        honoured on the mapping, ValueError for a range outside it.
        """
        if not mapping.ioctls & Ioctl.COPY:
            raise UnsupportedError(f"install: COPY is not honoured on {mapping!r}")
        view = memoryview(data).cast("B")
        ps = mapping.page_size
        if offset % ps or view.nbytes % ps or offset < 0 or offset + view.nbytes > mapping.length:
            raise ValueError(
                f"install: offset {offset} + {view.nbytes} bytes is not whole pages "
                f"inside {mapping!r}"
            )
        mode = 0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE
        done = ffi.new("int64_t *")
        installed = pos = 0
        # Released on the way out: a traceback keeping this frame (and the export)
        # alive in a garbage cycle would crash CPython 3.11's gc (memoryview tp_clear).
        with ffi.from_buffer(view) as buf:
            while pos < view.nbytes:
                dst = mapping.start + offset + pos
                rc = lib.pyuffd_pump_install(
                    self._pump,
                    mapping._uffd.fileno(),
                    dst,
                    buf + pos,
                    view.nbytes - pos,
                    mode,
                    self._events_applied,
                    done,
                )
                installed += done[0]
                pos += done[0]
                if rc == 0:
                    break
                if rc == -_errno.EEXIST:
                    pos += ps  # a page is there already: skip it
                elif rc != -_errno.EAGAIN:
                    check(rc, "install (UFFDIO_COPY)", dst, view.nbytes - pos)
                elif not done[0]:
                    break  # the mappings are changing: stop here
                # A partial copy (EAGAIN with progress) stopped at a present page.
        return installed

    def wake(self, mapping: Mapping, offset: int, length: int) -> None:
        """UFFDIO_WAKE a part of ``mapping`` (after DONTWAKE installs)."""
        mapping._uffd.wake(mapping.start + offset, length)

    # -- dispatch --------------------------------------------------------

    def _run(self) -> None:
        items = ffi.new("struct pyuffd_item[]", self._batch)
        view = ffi.buffer(items)
        unpack = _ITEM.unpack_from
        pump = self._pump
        next_reap = 0.0
        while True:
            timeout_ms = 100 if self._retry else _REAP_INTERVAL_MS if self._forked else -1
            n = lib.pyuffd_pump_wait(pump, items, self._batch, timeout_ms)
            if self._forked and time.monotonic() >= next_reap:
                # Exited children send no event: look for them now and then.
                with self._lock:
                    self._reap_exited()
                next_reap = time.monotonic() + _REAP_INTERVAL_MS / 1000
            if n == 0:
                return
            if n < 0:
                if n in (-_errno.EINTR, -_errno.ETIMEDOUT):
                    self._retry_pending()
                    continue
                self._record(UffdError(-n, f"fault pump wait failed: [{_errno.errorcode.get(-n)}]"))
                return
            batch = [unpack(view, i * _ITEM_SIZE) for i in range(n)]
            if n > 1 and any(item[3] != _EVENT_PAGEFAULT for item in batch):
                # read() hands out pending faults before pending events, so a fault
                # in this batch may have been raised after an event that comes later
                # in it (a mremap or MADV_DONTNEED waiting for its event to be read):
                # apply the events first, then look the faults up (stable sort).
                batch.sort(key=lambda item: item[3] == _EVENT_PAGEFAULT)
            # A fault read longer ago than the deadline has been (or is about to
            # be) answered by the watchdog, which reports it: do not run its handler.
            stale = time.monotonic_ns() - self._deadline_ns
            for fd, slot, t_ns, event, a, b, c in batch:
                try:
                    if event == _EVENT_PAGEFAULT:
                        if t_ns > stale:
                            self._dispatch(fd, slot, t_ns, a, b, c)
                    else:
                        self._on_event(fd, slot, event, a, b, c)
                except Exception as err:
                    self._record(err)
            if self._retry:
                self._retry_pending()

    def _dispatch(self, fd: int, slot: int, t_ns: int, flags: int, address: int, ptid: int) -> None:
        table = self._tables.get(fd)
        m = table.find(address) if table is not None else None
        if m is None:
            # Unregistered or moved under the fault (a REMOVE, UNMAP or REMAP raced
            # it): wake the thread; it faults again, on what is there now. A zero
            # page here would land in whatever the kernel has registered at this
            # address by now (the range moved back, a new registration).
            ps = mem.PAGE_SIZE
            _resolve(
                self._pump,
                fd,
                slot,
                lib.PYUFFD_OP_WAKE,
                address & ~(ps - 1),
                ffi.NULL,
                ps,
                0,
                self._done,
            )
            with self._lock:
                self._orphans.record("missing", "wake", time.monotonic_ns() - t_ns)
            return
        if flags & _FLAG_MINOR:
            kind, handle = "minor", m.ops.handle_continue
        elif flags & _FLAG_WP:
            kind, handle = "wp", m.ops.handle_wp
        else:
            kind, handle = "missing", m.ops.handle_missing
        fault = Fault(
            address & ~(m.page_size - 1),
            m,
            kind,
            bool(flags & _FLAG_WRITE),
            (ptid & 0xFFFFFFFF) or None,
            slot,
            t_ns,
        )
        try:
            if handle is None:
                raise UnsupportedError(
                    f"{type(m.ops).__name__} has no handler for {kind} faults ({fault!r})"
                )
            resolution = handle(fault)
        except Exception as err:
            fault._early = _FINISHED
            self._fail(fault, err)
            return
        if resolution is _DEFER:
            with self._lock:
                # resolve() may have answered already, from another thread.
                early, fault._early = fault._early, _DEFER
                if early is None:
                    self._deferred[slot] = fault
            if early is not None:
                self._apply(fault, early)
            return
        fault._early = _FINISHED
        if resolution is None:
            self._fail(
                fault,
                TypeError(f"{type(m.ops).__name__}.handle_{kind} returned None for {fault!r}"),
            )
        else:
            self._apply(fault, resolution)

    def resolve(self, fault: Fault, resolution: Resolution) -> bool:
        """Answer a deferred fault, from any thread.

        May be called before the handler has even returned ``defer()`` (a
        fast network reply); the answer is then installed as soon as it
        does. Returns True if the resolution was installed or queued, False
        if the fault was already resolved (the deadline fallback, or
        ``stop()``) or its process has exited (nothing waits for the page:
        counted as "gone", not an error). Errors are recorded like a
        handler's and the fault takes the fallback.
        """
        with self._lock:
            if fault._early is None:
                fault._early = resolution  # the handler has not returned yet
                return True
            if self._deferred.get(fault._slot) is not fault or self._stopped:
                return False
            del self._deferred[fault._slot]
            # Under the lock: stop() frees the pump under it, never mid-install.
            return self._apply(fault, resolution)

    def _apply(self, fault: Fault, r: Resolution, attempt: int = 0) -> bool:
        """Install ``r`` for ``fault`` through the pump; True if installed or queued for a retry."""
        m = fault.mapping
        ps = m.page_size
        data = r.data
        kind = type(data)
        if (
            r.kind is _COPY_KIND
            and not r.keep_wp
            and m._honoured & r.need == r.need
            and (
                (kind is bytes and len(data) >= ps)
                or (kind is memoryview and data.c_contiguous and data.nbytes >= ps)
            )
        ):
            # The common cases: bytes go to C as they are, a memoryview as its buffer.
            op, src, mode = _OP_COPY, data if kind is bytes else ffi.from_buffer(data), 0
        else:
            prepared = self._prepare(fault, r)
            if prepared is None:
                return False
            op, src, mode = prepared
        rc = _resolve(
            self._pump, m._uffd._fd, fault._slot, op, fault.address, src, ps, mode, self._done
        )
        if src is not data and isinstance(src, ffi.CData) and src != ffi.NULL:
            # Release the buffer export now: this frame may outlive the call in the
            # traceback of an error recorded below, and a garbage cycle holding a
            # memoryview with a live export crashes CPython 3.11's gc (tp_clear).
            ffi.release(src)
        del src
        if rc == -_errno.EEXIST:
            # Only for a WP or MINOR fault: the pump answers 0 (and wakes) when
            # EEXIST or ENOENT means someone else resolved the fault.
            return self._present(fault, r, op)
        if rc == 0:
            latency = time.monotonic_ns() - fault._t_ns
            with self._lock:  # resolve() may run on other threads
                m.stats.record(fault.kind, r.kind, latency)
            return True
        if rc == -_errno.ETIME:
            return False  # the watchdog resolved it; its notice reports that
        gone = rc == -_errno.EBADF and m._uffd.closed and m._uffd is not self.uffd
        if rc == -_errno.ESRCH or gone:
            # The faulting process has exited (its fd may be reaped already): nobody
            # waits for this page, so it is not an error. Free the slot for the watchdog.
            lib.pyuffd_pump_fallback(self._pump, fault._slot)
            with self._lock:
                m.stats.record(fault.kind, "gone", time.monotonic_ns() - fault._t_ns)
            return False
        if rc == -_errno.EBADF:
            # Closed under the running handler (os.close, or its close() while
            # serving): the kernel has released the threads; report the fd lost.
            lib.pyuffd_pump_fallback(self._pump, fault._slot)
            with self._lock:
                for n, known in list(self._fds.items()):
                    if known is m._uffd:
                        self._fd_lost(n, _errno.EBADF)
            return False
        if rc == -_errno.EAGAIN and attempt < _EAGAIN_RETRIES:
            # The mappings are changing: the event is queued; retry after reading it.
            self._retry.append((fault, r, attempt + 1))
            return True
        if rc == -_errno.EAGAIN:
            # Still changing after every retry (a storm of forks keeps mmap_changing
            # raised): wake the thread instead; it faults again and that fault is
            # served like any other. Nothing is lost, so nothing is recorded.
            rc = _resolve(
                self._pump,
                m._uffd._fd,
                fault._slot,
                lib.PYUFFD_OP_WAKE,
                fault.address,
                ffi.NULL,
                ps,
                0,
                self._done,
            )
            if rc == 0:
                with self._lock:
                    m.stats.record(fault.kind, "wake", time.monotonic_ns() - fault._t_ns)
                return False
        try:
            check(rc, f"resolving {fault!r} with {r!r}", fault.address, ps)
        except UffdError as err:
            self._fail(fault, err)
        return False

    def _present(self, fault: Fault, r: Resolution, op: int) -> bool:
        """EEXIST for a WP or MINOR fault: the page is there, so ``r`` did not resolve it.

        For a MISSING fault (or a CONTINUE) EEXIST means another install won
        the race, and the pump has woken the thread; a WP or MINOR fault is on
        a page that exists, and waking the thread would only fault it again,
        forever: the pump leaves it pending. A WP fault's copy is done by
        overwriting the page; anything else is the handler's mistake: recorded,
        and the fallback (unprotect, continue) lets the thread on.
        """
        if fault.kind == "wp" and op == _OP_COPY:
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

    def _copy_over(self, fault: Fault, r: Resolution) -> bool:
        """Copy-then-unprotect for a WP fault on a present page (UFFDIO_COPY said EEXIST).

        No ioctl replaces a present page, so for this process's own memory the
        page is unprotected without waking the writer, overwritten, and the
        writer woken (``keep_wp`` was refused before: it would fault forever).
        A write by another thread in between is overwritten: the handler's data
        wins, as a copy would.
        Another process's memory is not writable from here: that is recorded
        as an error and the fault takes the fallback (unprotect).
        """
        m = fault.mapping
        ps, addr, fd = m.page_size, fault.address, m._uffd._fd
        if m._uffd is not self.uffd or not self._own_mm:
            self._fail(
                fault,
                UnsupportedError(
                    f"{type(m.ops).__name__}.handle_wp returned {r!r} for {fault!r}, a present "
                    "page of another process, which cannot be overwritten from here; return "
                    "Resolution.unprotect() (or copy only into unpopulated pages)"
                ),
            )
            return False
        rc = lib.pyuffd_writeprotect(fd, addr, ps, lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE)
        if rc == 0:
            src = ffi.from_buffer(r.data)
            rc = lib.pyuffd_mem_write(addr, src, ps, ffi.new("uint64_t *"))
            ffi.release(src)
        if rc == 0:
            rc = _resolve(
                self._pump, fd, fault._slot, lib.PYUFFD_OP_WAKE, addr, ffi.NULL, ps, 0, self._done
            )
        if rc == 0:
            with self._lock:
                m.stats.record(fault.kind, r.kind, time.monotonic_ns() - fault._t_ns)
            return True
        if rc == -_errno.ETIME:
            return False  # the watchdog resolved it meanwhile; its notice reports that
        try:
            check(rc, f"copying over the present page for {fault!r} with {r!r}", addr, ps)
        except UffdError as err:
            self._fail(fault, err)
        return False

    def _prepare(self, fault: Fault, r: Resolution) -> tuple[int, Any, int] | None:
        """(pump op, source, mode) for ``r``; None after recording why it cannot be installed."""
        m = fault.mapping
        kind = r.kind
        if kind == _REFUSE:
            self._fail(
                fault,
                HandlerRefusedError(0, f"{type(m.ops).__name__} refused {fault!r}: {r.reason}"),
            )
            return None
        op = _OPS.get(kind)
        need = r.need
        honoured = m._honoured
        ps = m.page_size
        keep, mode = r.data, 0
        if kind == _ZERO and not honoured & _ZEROPAGE and honoured & _COPY:
            # hugetlb has no ZEROPAGE: a zero page is a copy of zeros.
            keep = bytes(ps)
            op, need = _OP_COPY, _COPY
        if op is None or need & ~honoured:
            self._fail(
                fault,
                UnsupportedError(
                    f"{type(m.ops).__name__} answered {r!r} for {fault!r}, but "
                    f"{Ioctl(need & ~honoured)!r} is not honoured on this mapping "
                    f"(honoured: {m.ioctls!r})"
                ),
            )
            return None
        if kind == _POISON and not m._uffd.features & Feature.POISON:
            self._fail(
                fault,
                UnsupportedError(f"{r!r} for {fault!r}: UFFD_FEATURE_POISON was not negotiated"),
            )
            return None
        if r.keep_wp and fault.kind == "wp":
            self._fail(
                fault,
                UnsupportedError(
                    f"{r!r} for {fault!r} would leave the page write-protected, so the write "
                    "would fault again forever; use keep_wp=False (or Resolution.unprotect())"
                ),
            )
            return None
        if keep is None:
            return op, ffi.NULL, 0
        try:
            buf = ffi.from_buffer(keep)
        except TypeError as err:
            self._fail(
                fault, TypeError(f"Resolution.copy data for {fault!r} is not a buffer: {err}")
            )
            return None
        if len(buf) < ps:
            self._fail(
                fault,
                ValueError(
                    f"Resolution.copy data for {fault!r} holds {len(buf)} bytes, a page is {ps}"
                ),
            )
            return None
        if r.keep_wp:
            mode = _COPY_MODE_WP
        return op, buf, mode

    def _retry_pending(self) -> None:
        pending, self._retry = self._retry, []
        for fault, r, attempt in pending:
            self._apply(fault, r, attempt)

    def _fail(self, fault: Fault, err: BaseException) -> None:
        """Record ``err`` and resolve ``fault`` by the fallback."""
        did = lib.pyuffd_pump_fallback(self._pump, fault._slot)
        with self._lock:
            fault.mapping.stats.errors += 1
            if did >= 0:
                fault.mapping.stats.record(
                    fault.kind,
                    "fallback-" + _DID.get(did & 0xFF, "?"),
                    time.monotonic_ns() - fault._t_ns,
                )
        self._record(err)

    def _record(self, err: BaseException) -> None:
        with self._lock:
            self._errors.append(err)

    # -- events ----------------------------------------------------------

    def _on_event(self, fd: int, did: int, event: int, a: int, b: int, c: int) -> None:
        if event == lib.PYUFFD_EVENT_EXPIRED:
            self._on_expired(fd, did, a, b, c & 0xFFFFFFFF)
            return
        if event == lib.PYUFFD_EVENT_FD_ERROR:
            with self._lock:
                self._fd_lost(fd, a)
            return
        try:
            with self._lock:
                self._apply_event(fd, event, a, b, c)
        finally:
            # Counted even when applying failed, or installs would wait forever.
            self._events_applied += 1

    def _apply_event(self, fd: int, event: int, a: int, b: int, c: int) -> None:
        """Update the mapping table for a kernel event (lock held)."""
        if event == lib.UFFD_EVENT_FORK:
            self._reap_exited()
            parent = self._fds[fd]
            child = Userfaultfd._adopt(a & 0xFFFFFFFF, parent)
            try:
                self._add_fd(child)
            except BaseException:
                child.close()  # not served: closing it lets the child's faults through
                raise
            self._forked.add(child.fileno())
            for m in self._tables[fd].maps:
                self._publish(m._clone(m.start, m.end, child))
        elif event == lib.UFFD_EVENT_REMAP:
            moved = self._split(fd, a, a + c)
            rest = [m for m in self._tables[fd].maps if m not in moved]
            for m in moved:
                m.start, m.end = m.start - a + b, m.end - a + b
            self._tables[fd] = Table(rest + moved)
            # Unmap the old range from the pump (that splits a map straddling
            # it) and map the moved pieces anew at their new addresses.
            check(lib.pyuffd_pump_unmap(self._pump, fd, a, a + c), "pump unmap")
            for m in moved:
                self._pump_map(m)
        elif event == lib.UFFD_EVENT_REMOVE:
            # The pages are gone; unregister so later accesses get zero pages.
            if self._split(fd, a, b):
                # The range or the process may be gone already.
                with contextlib.suppress(UffdError, ValueError):
                    self._fds[fd].unregister(a, b - a)
                self._drop(fd, a, b)
        elif event == lib.UFFD_EVENT_UNMAP:
            self._drop(fd, a, b)

    def _reap_exited(self) -> None:
        """Close the fds of forked children whose process has exited (lock held).

        The kernel says nothing when a child's mm goes away (no event, no
        POLLHUP), so each FORK event and the dispatch loop, once a second,
        probe the earlier children; without this
        every child ever forked keeps an fd and one of the pump's 256 fd slots
        for the handler's lifetime, and FORK events fail with EMFILE after that.
        """
        for n in [n for n in self._forked if mm_gone(n)]:
            self._forked.discard(n)
            waiting = [f for f in self._deferred.values() if f.mapping._uffd.fileno() == n]
            waiting += [f for f, _, _ in self._retry if f.mapping._uffd.fileno() == n]
            self._retry = [item for item in self._retry if item[0] not in waiting]
            for fault in waiting:
                # Nobody waits for these pages any more: "gone", not an error.
                self._deferred.pop(fault._slot, None)
                lib.pyuffd_pump_fallback(self._pump, fault._slot)  # frees the slot (ESRCH)
                fault.mapping.stats.record(fault.kind, "gone", time.monotonic_ns() - fault._t_ns)
            lost = self._fds.pop(n)
            table = self._tables.pop(n, None)
            if table is not None:
                self._retired.extend(table.maps)
            self._identity.pop(n, None)
            lib.pyuffd_pump_remove_fd(self._pump, n)
            lost.close()

    def _fd_lost(self, fd: int, err: int) -> None:
        """Drop an fd that failed under the pump (lock held); report it if it is the handler's."""
        lost = self._fds.pop(fd, None)
        table = self._tables.pop(fd, None)
        if table is not None:
            self._retired.extend(table.maps)
        lib.pyuffd_pump_remove_fd(self._pump, fd)
        if lost is None:
            return
        if err == _errno.EBADF:
            lost._fd = -1  # not ours any more: never close that number, it may be reused
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
        gone = not did & 0xFF and (
            (fd not in self._fds and fd != self.uffd._fd)
            or ((fd != self.uffd._fd or not self._own_mm) and mm_gone(fd))
        )
        with self._lock:
            self._expired += 0 if gone else 1
            for slot, fault in list(self._deferred.items()):
                if (
                    fault.address == address & ~(fault.mapping.page_size - 1)
                    and fault.mapping._uffd.fileno() == fd
                ):
                    del self._deferred[slot]
                    break
            table = self._tables.get(fd)
            m = table.find(address) if table is not None else None
            if m is not None and gone:
                m.stats.record("missing", "gone", self._deadline_ns)
            elif m is not None:
                m.stats.errors += 1
                kind = (
                    "minor"
                    if flags & lib.UFFD_PAGEFAULT_FLAG_MINOR
                    else "wp"
                    if flags & lib.UFFD_PAGEFAULT_FLAG_WP
                    else "missing"
                )
                m.stats.record(kind, "fallback-" + _DID.get(did & 0xFF, "?"), self._deadline_ns)
        if gone:
            return
        what = _DID.get(did & 0xFF, "nothing (the fallback failed)")
        if did & lib.PYUFFD_DID_UNGUARDED:
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
