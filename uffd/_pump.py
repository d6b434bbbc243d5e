"""The fault pump's room: the one Python owner of the C pump (csrc/uffd_pump.c).

Everything that touches the pump goes through ``Pump``: it owns the C
object's lifetime, decodes the items ``wait`` hands back (the layout comes
from ffi), names what a resolution came to (``Outcome``), and translates a
``NativeSource`` and a fallback to the pump's constants, which nobody else
sees.

Lifetime: every call needs a *hold* on the pump (``hold``/``release``, or
``with pump.held():``). The dispatch thread holds it for its whole run, so
its per-fault calls cost nothing extra; a public entry point called from
another thread (``install``, ``wake``, ``resolve``) holds it for its
duration. ``close`` refuses new holds (``UffdError``: "handler stopped"),
waits a bounded time for the current ones, and frees the C object once the
last holder is gone: no call ever runs on freed state, and the caller
closes the fds only after that, so no ioctl ever lands on a reused number.
"""

from __future__ import annotations

import errno as _errno
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

from uffd._errors import UffdError, check
from uffd._events import record_struct
from uffd._native import ffi, lib

__all__ = [
    "DID_WAKE",
    "EXPIRED",
    "FD_ERROR",
    "NativeSource",
    "Outcome",
    "Pump",
    "RemoteLink",
    "did_name",
    "did_unguarded",
    "stopped",
]

# The pump's own notices among the items (the kernel's event codes start at 0x12).
EXPIRED = int(lib.PYUFFD_EVENT_EXPIRED)
FD_ERROR = int(lib.PYUFFD_EVENT_FD_ERROR)
DID_WAKE = int(lib.PYUFFD_DID_WAKE)
_DID_UNGUARDED = int(lib.PYUFFD_DID_UNGUARDED)
_DID = {
    lib.PYUFFD_DID_POISON: "poison",
    lib.PYUFFD_DID_ZEROPAGE: "zero",
    lib.PYUFFD_DID_ZEROCOPY: "zero",
    lib.PYUFFD_DID_UNPROTECT: "unprotect",
    lib.PYUFFD_DID_CONTINUE: "continue",
    lib.PYUFFD_DID_WAKE: "wake",
}
_OPS = {
    "copy": lib.PYUFFD_OP_COPY,
    "zero": lib.PYUFFD_OP_ZEROPAGE,
    "continue": lib.PYUFFD_OP_CONTINUE,
    "poison": lib.PYUFFD_OP_POISON,
    "unprotect": lib.PYUFFD_OP_UNPROTECT,
    "wake": lib.PYUFFD_OP_WAKE,
}
_FALLBACKS = {
    "poison": lib.PYUFFD_FALLBACK_POISON,
    "zeropage": lib.PYUFFD_FALLBACK_ZEROPAGE,
    "zerocopy": lib.PYUFFD_FALLBACK_ZEROCOPY,
}
_SOURCES = {
    "memory": lib.PYUFFD_SOURCE_MEMORY,
    "file": lib.PYUFFD_SOURCE_FILE,
    "zero": lib.PYUFFD_SOURCE_ZERO,
    "remote": lib.PYUFFD_SOURCE_REMOTE,
}
_ITEM = record_struct(
    [
        (ffi.offsetof("struct pyuffd_item", "fd"), "i"),
        (ffi.offsetof("struct pyuffd_item", "slot"), "I"),
        (ffi.offsetof("struct pyuffd_item", "t_ns"), "Q"),
    ],
    ffi.offsetof("struct pyuffd_item", "msg"),
    ffi.sizeof("struct pyuffd_item"),
)
_ITEM_SIZE = _ITEM.size
_resolve = lib.pyuffd_pump_resolve
_OP_COPY = lib.PYUFFD_OP_COPY
_COPY_MODE_WP = int(lib.UFFDIO_COPY_MODE_WP)
_COPY_DONTWAKE = int(lib.UFFDIO_COPY_MODE_DONTWAKE)
# Bytes per UFFDIO_COPY of an install: a fault waits for the step under way (the pump's
# lock), ~16 us at 4 GB/s. Measured, 1 GiB restore from a file: a fault read 186 us after
# it was raised with 4 MiB copies, 7 us with 128 KiB; once the C loop kept the lock busy
# back to back, 128 KiB steps cost file faults +20 us at p50, 64 KiB none (2-5 % slower
# loop alone).
_INSTALL_STEP = 64 << 10
_TAKE_BATCH = 4096  # served faults RemoteLink.take hands over at most (the C ring's size)
_CLOSE_WAIT = 5.0  # seconds close() waits for other holders before leaving the free to them


def stopped(op: str) -> UffdError:
    """The error of a call made once the handler's stop() has begun (api.md, section 9)."""
    return UffdError(
        _errno.EBADF,
        f"FaultHandler.{op}: handler stopped (stop() has begun); it installs, wakes and "
        "resolves nothing more",
    )


def did_name(did: int) -> str:
    """What a fallback did ("poison", "zero", "unprotect", "continue", "wake"), from its code."""
    return _DID.get(did & 0xFF, "?")


def did_unguarded(did: int) -> bool:
    """The fallback served a thread of this process outside a SIGBUS-safe access."""
    return bool(did & _DID_UNGUARDED)


class Outcome(Enum):
    """What ``Pump.resolve`` came to, in the kernel's words turned into the handler's."""

    INSTALLED = "installed"  # done, the thread woken (also when someone else won: EEXIST/ENOENT)
    PRESENT = "present"  # EEXIST on a WP/MINOR fault: the page is there, the fault still pending
    EXPIRED = "expired"  # the slot was resolved already (the deadline's fallback)
    GONE = "gone"  # ESRCH: the faulting process has exited
    CLOSED = "closed"  # EBADF: the fd was closed under the handler
    CHANGING = "changing"  # EAGAIN: the mappings are changing; retry after the events


_OUTCOMES = {
    0: Outcome.INSTALLED,
    -_errno.EEXIST: Outcome.PRESENT,
    -_errno.ETIME: Outcome.EXPIRED,
    -_errno.ESRCH: Outcome.GONE,
    -_errno.EBADF: Outcome.CLOSED,
    -_errno.EAGAIN: Outcome.CHANGING,
}


class RemoteLink:
    """A page server's fault-only connection, read by the pump (``NativeSource("remote")``).

    Takes ``fd``, a connected socket past its handshake (HELLO, AUTH, LIST)
    that carries nothing else, speaking protocol ``version`` with frames of
    at most ``max_frame`` bytes: from the constructor on the link owns it
    and nobody else may read, write or close it. The pump sends one URGENT
    READ per fault and receives the reply into the page (csrc/uffd_link.c);
    any failure but a refused read kills the link, and the faults then reach
    the mapping's ``handle_missing`` like any other. The socket is closed
    once ``close()`` was called and no pump maps the link any more.

    Calling context: any thread. ``notify_fd`` is readable while ``take()``
    has served faults to hand over, or once the link is dead.

    ``RemoteLink.notes()`` makes one without a socket: given as the ``link``
    of a "memory" ``NativeSource`` (a file's mapping), it gathers the faults
    the pump serves from it for ``take()``, and ``kill()`` sends that
    mapping's faults back to ``handle_missing`` (its source failed).

    Raises (constructor): OSError when the link cannot be made (no memory or
    fds); ``fd`` is then still the caller's.
    """

    def __init__(self, fd: int, version: int, max_frame: int) -> None:
        ptr = lib.pyuffd_link_new(fd, version, max_frame)
        if ptr == ffi.NULL:
            raise OSError(ffi.errno, "could not set up the page server's fault link")
        self._ptr: Any = ptr
        self._lock = threading.Lock()
        self._out = ffi.new("uint64_t[]", 2 * _TAKE_BATCH)
        self._lost = ffi.new("uint64_t *")
        self.notify_fd = int(lib.pyuffd_link_notify_fd(ptr))

    @classmethod
    def notes(cls) -> RemoteLink:
        """A link without a socket: the served-fault ring of a "memory" source (``read``
        returns False). Raises OSError when it cannot be made (no memory or fds)."""
        return cls(-1, 0, 0)

    @property
    def dead(self) -> str | None:
        """Why the link stopped serving ("ETIMEDOUT", "EPROTO": garbage, "EPIPE": the server
        closed, "ECANCELED": killed or the handler stopped), or None while it serves."""
        with self._lock:
            err = int(lib.pyuffd_link_dead(self._ptr)) if self._ptr is not None else _errno.EBADF
        return _errno.errorcode.get(err, str(err)) if err else None

    def take(self) -> tuple[list[int], int]:
        """The faults served since the last call, oldest first, as a flat list of pairs
        (address, nanoseconds from the pump's read to the wake), and how many more were
        served but not kept (the pump keeps the latest 4096)."""
        with self._lock:
            if self._ptr is None:
                return [], 0
            got = lib.pyuffd_link_take(self._ptr, self._out, _TAKE_BATCH, self._lost)
            return list(self._out[0 : 2 * got]), int(self._lost[0])

    def read(self, region: int, offset: int, into: bytearray, timeout: float) -> bool:
        """Receive [offset, +len(into)) of ``region`` into ``into`` over the link (GIL released);
        True when done. False: not read (the link is closed, dead, busy with a fault, or
        the server refused), which a failure also makes the link's death."""
        with self._lock:
            if self._ptr is None:
                return False
            ptr = self._ptr
            lib.pyuffd_link_get(ptr)  # alive while the read waits, without the lock
        try:
            with ffi.from_buffer(into) as buf:
                rc = lib.pyuffd_link_read(
                    ptr, region, offset, buf, len(into), int(timeout * 1e9), -1
                )
        finally:
            lib.pyuffd_link_put(ptr)
        return bool(rc == 0)

    def kill(self) -> None:
        """Stop serving faults over the link (a read in progress ends at once); idempotent."""
        with self._lock:
            if self._ptr is not None:
                lib.pyuffd_link_kill(self._ptr)

    @contextmanager
    def _pointer(self) -> Iterator[Any]:
        """The C link, kept alive for the with-block (``Pump.map`` takes its own reference).

        Raises ValueError once the link is closed.
        """
        with self._lock:
            if self._ptr is None:
                raise ValueError("NativeSource: its RemoteLink is closed")
            yield self._ptr

    def close(self) -> None:
        """Kill the link and drop this reference (the socket closes with the last); idempotent."""
        with self._lock:
            ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.pyuffd_link_kill(ptr)
            lib.pyuffd_link_put(ptr)


@dataclass(frozen=True)
class NativeSource:
    """Where the pump takes a mapping's pages from, without entering Python.

    ``kind`` is "memory" (bytes at ``address`` + the fault's offset), "file"
    (``fd`` at ``offset`` + the fault's offset; bytes past the end read as
    zeros), "zero", or "remote" (``region`` of a page server at ``offset`` +
    the fault's offset, read over ``link``, waiting at most ``timeout``
    seconds a fault). While faults are sequential the pump installs up to
    ``max_run`` bytes per fault (a run that doubles from one page; a remote
    source serves one page a fault). A file source's fd is duplicated by
    the pump, which reads its own copy for as long as a mapping uses it, as
    it references a remote link; memory must outlive the mapping. Another
    source may have a ``link`` too (``RemoteLink.notes()``): the faults it
    serves are noted there, and none once the link is killed.
    """

    kind: str
    address: int = 0
    fd: int = -1
    offset: int = 0
    max_run: int = 0
    link: RemoteLink | None = None
    region: int = 0
    timeout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _SOURCES:
            raise ValueError(
                f"NativeSource kind must be one of {', '.join(map(repr, _SOURCES))}, "
                f"not {self.kind!r}"
            )
        if self.kind == "file" and self.fd < 0:
            raise ValueError("NativeSource('file') needs an open fd (the file was closed?)")
        if self.kind == "remote" and (self.link is None or self.timeout <= 0):
            raise ValueError("NativeSource('remote') needs a RemoteLink and a timeout > 0")


class Pump:
    """The C fault pump: one per FaultHandler; see the module docstring for its lifetime.

    Raises (constructor): OSError when the pump cannot be started (out of
    memory or threads).
    """

    def __init__(self, deadline_ns: int, spin_ns: int) -> None:
        ptr = lib.pyuffd_pump_new(deadline_ns)
        if ptr == ffi.NULL:
            raise OSError(ffi.errno, "could not start the fault pump (out of memory or threads?)")
        self._ptr = ptr
        self._gate = threading.Condition(threading.Lock())
        self._holders = 0
        self._closing = False
        self._freed = False
        self._after_free: Callable[[], None] | None = None
        # resolve()'s progress cell: written by C, never read (the outcome is in rc).
        self._done = ffi.new("int64_t *")
        lib.pyuffd_pump_set_spin(ptr, spin_ns)

    # -- lifetime ----------------------------------------------------------

    def hold(self) -> None:
        """Keep the pump alive until ``release``; raises UffdError once ``close`` began."""
        with self._gate:
            if self._closing:
                raise stopped("call")
            self._holders += 1

    def release(self) -> None:
        """Drop a hold; the last one out after ``close`` frees the pump."""
        with self._gate:
            self._holders -= 1
            last = self._closing and not self._holders
            self._gate.notify_all()
        if last:
            self._free()

    @contextmanager
    def held(self) -> Iterator[None]:
        """``hold`` for the duration of a with-block."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    def close(self, after_free: Callable[[], None], timeout: float = _CLOSE_WAIT) -> bool:
        """Refuse new holds, wait up to ``timeout`` for the current ones, free the pump.

        ``after_free`` (closing the fds the pump watched) runs right after the
        free, here or, when a holder is still inside (a stuck handler), in the
        thread whose ``release`` frees it. Returns True if freed here.
        """
        with self._gate:
            self._closing = True
            self._after_free = after_free
            self._gate.wait_for(lambda: not self._holders, timeout)
            if self._holders:
                return False
        self._free()
        return True

    def _free(self) -> None:
        with self._gate:
            if self._freed:
                return
            self._freed = True
        lib.pyuffd_pump_free(self._ptr)
        if self._after_free is not None:
            self._after_free()

    def free_unused(self) -> None:
        """Free a pump that was never used (a handler never started); idempotent."""
        with self._gate:
            self._closing = True
        self._free()

    # -- fds and maps (callers hold the pump) -------------------------------

    def add_fd(self, fd: int, *, paused: bool = False) -> None:
        """Watch userfaultfd ``fd`` (sets O_NONBLOCK on its open file).

        ``paused``: keep it in the tables but read nothing from it (neither the
        dispatch thread nor the watchdog) until ``serve_fd``; ``drain`` still
        falls back its waiting faults.
        """
        check(lib.pyuffd_pump_add_fd(self._ptr, fd, int(paused)), "epoll add userfaultfd")

    def serve_fd(self, fd: int) -> None:
        """Start reading ``fd``, added paused; raises OSError (ENOENT) if it is not paused."""
        check(lib.pyuffd_pump_serve_fd(self._ptr, fd), "epoll add paused userfaultfd")

    def remove_fd(self, fd: int) -> None:
        """Stop watching ``fd``: its maps and its pending faults are forgotten."""
        lib.pyuffd_pump_remove_fd(self._ptr, fd)

    def map(
        self,
        fd: int,
        start: int,
        end: int,
        page_size: int,
        fallback: str,
        source: NativeSource | None,
        origin: int,
    ) -> None:
        """Serve [start, end) of ``fd`` with ``fallback`` and ``source``.

        ``fallback`` is "poison", "zeropage" or "zerocopy" (hugetlb: a copy of
        zeros). ``origin`` is ``start``'s offset in the range the source
        describes (a piece of a split mapping starts further in).
        """
        kind, addr, src_fd, offset, run = lib.PYUFFD_SOURCE_NONE, 0, -1, 0, 0
        if source is not None:
            kind, src_fd, run = _SOURCES[source.kind], source.fd, source.max_run
            addr = source.address + origin if source.kind == "memory" else 0
            offset = source.offset + origin if source.kind in ("file", "remote") else 0
        with ExitStack() as stack:
            link = ffi.NULL
            if source is not None and source.link is not None:
                link = stack.enter_context(source.link._pointer())
            rc = lib.pyuffd_pump_map(
                self._ptr, fd, start, end, page_size, _FALLBACKS[fallback], kind, addr, src_fd,
                offset, run, link, source.region if source else 0,
                int(source.timeout * 1e9) if source else 0,
            )  # fmt: skip
        check(rc, "pump map")

    def unmap(self, fd: int, start: int, end: int) -> None:
        """Stop serving [start, end) of ``fd`` (maps straddling it keep their outer parts)."""
        check(lib.pyuffd_pump_unmap(self._ptr, fd, start, end), "pump unmap")

    # -- the fault path (callers hold the pump) -----------------------------

    def buffer(self, n: int) -> tuple[Any, memoryview]:
        """A buffer for ``wait`` holding up to ``n`` items (the cdata and a view of it)."""
        items = ffi.new("struct pyuffd_item[]", n)
        return items, memoryview(ffi.buffer(items))

    def wait(self, buffer: tuple[Any, memoryview], timeout_ms: int) -> list[tuple[int, ...]]:
        """Block (GIL released) until faults or events arrive; decoded items, oldest first.

        Each item is (fd, slot, t_ns, event, w0, w1, w2): the userfaultfd, the
        fault's slot (or for a notice what its fallback did), when it was
        read, the event code (``EXPIRED``/``FD_ERROR`` for the pump's own
        notices) and the message's words (``uffd._events.decode``). An empty
        list means the pump stopped.

        Raises:
            TimeoutError: ``timeout_ms`` passed with nothing to hand over.
            InterruptedError: a signal interrupted the wait.
            UffdError: the wait failed.
        """
        items, view = buffer
        got = lib.pyuffd_pump_wait(self._ptr, items, len(items), timeout_ms)
        if got == 1:  # the common case, one fault a wait: half the cost of iter_unpack
            return [_ITEM.unpack_from(view)]
        if got >= 0:
            return list(_ITEM.iter_unpack(view[: got * _ITEM_SIZE]))
        if got == -_errno.ETIMEDOUT:
            raise TimeoutError
        if got == -_errno.EINTR:
            raise InterruptedError
        check(got, "fault pump wait")
        return []

    def copy(self, fd: int, slot: int, address: int, length: int, data: Any) -> Outcome:
        """``resolve(..., "copy", ...)`` for bytes or a contiguous memoryview: the fast path."""
        if type(data) is bytes:
            rc = _resolve(self._ptr, fd, slot, _OP_COPY, address, data, length, 0, self._done)
        else:
            src = ffi.from_buffer(data)
            try:
                rc = _resolve(self._ptr, fd, slot, _OP_COPY, address, src, length, 0, self._done)
            finally:
                ffi.release(src)  # never left to a traceback's frame (CPython 3.11 gc)
        outcome = _OUTCOMES.get(rc)
        if outcome is None:
            check(rc, f"resolving the fault at {address:#x} by copy", address, length)
        return outcome  # type: ignore[return-value]

    def resolve(
        self, fd: int, slot: int, how: str, address: int, length: int, data: Any = None,
        wp: bool = False,
    ) -> Outcome:  # fmt: skip
        """Resolve the fault in ``slot`` by ``how`` ("copy", "zero", ..., "wake").

        ``data`` is what a copy installs (bytes go to C as they are; another
        buffer is exported for the call only), ``wp`` installs it
        write-protected. Raises ``UffdError`` for an outcome the handler
        cannot act on (the message names the fault and the errno).
        """
        mode = _COPY_MODE_WP if wp else 0
        if data is None or type(data) is bytes:
            rc = lib.pyuffd_pump_resolve(
                self._ptr, fd, slot, _OPS[how], address, data or ffi.NULL, length, mode, self._done
            )
        else:
            # Released at once: a live export kept by a traceback's frame in a garbage
            # cycle crashes CPython 3.11's gc (memoryview tp_clear).
            with ffi.from_buffer(data) as src:
                rc = lib.pyuffd_pump_resolve(
                    self._ptr, fd, slot, _OPS[how], address, src, length, mode, self._done
                )
        outcome = _OUTCOMES.get(rc)
        if outcome is None:
            check(rc, f"resolving the fault at {address:#x} by {how}", address, length)
        return outcome  # type: ignore[return-value]

    def fallback(self, slot: int) -> int:
        """Resolve ``slot`` by its mapping's fallback; what it did (``did_name``) or -errno."""
        return int(lib.pyuffd_pump_fallback(self._ptr, slot))

    def install(
        self,
        fd: int,
        dst: int,
        data: memoryview,
        page_size: int,
        wake: bool,
        applied: Callable[[], int],
        stopping: Callable[[], bool],
    ) -> int:
        """UFFDIO_COPY ``data`` to ``dst`` for a prefetch; the bytes installed.

        One C call (``pyuffd_install_run``, GIL released) copies the run in
        steps of ``_INSTALL_STEP``, so a fault read meanwhile waits for one
        step, never for the run. Pages already present are skipped. Each
        step is refused (and the install ends short) unless ``applied()``
        events were applied to the tables, every event the pump has read: a
        page the process dropped must not come back; the run goes on only
        if more were applied since. ``wake=False`` is DONTWAKE. Safe from
        several threads at once.

        Raises UffdError: "handler stopped" once ``stopping()`` (stop()
        unregistered the range under the copy), or what the copy met (its
        ``done``: the bytes installed before it).
        """
        installed = ffi.new("int64_t *")
        reached = ffi.new("uint64_t *")
        mode = 0 if wake else _COPY_DONTWAKE
        step = max(_INSTALL_STEP - _INSTALL_STEP % page_size, page_size)
        total = pos = 0
        with ffi.from_buffer(data) as src:
            while pos < data.nbytes:
                seen = applied()
                rc = lib.pyuffd_install_run(
                    self._ptr,
                    fd,
                    dst + pos,
                    src + pos,
                    data.nbytes - pos,
                    step,
                    page_size,
                    mode,
                    seen,
                    installed,
                    reached,
                )
                total += installed[0]
                pos += reached[0]
                if rc == 0:
                    break
                if stopping():
                    raise stopped("install")  # stop() unregistered the range
                if rc != -_errno.EAGAIN:
                    check(rc, "install (UFFDIO_COPY)", dst + pos, data.nbytes - pos, done=total)
                if applied() == seen:
                    break  # the mappings are changing: the rest is left to faults
        return total

    def drain(self) -> int:
        """Resolve every pending fault by its fallback; how many there were."""
        return int(lib.pyuffd_pump_drain(self._ptr))

    def stop(self) -> None:
        """Make ``wait`` return an empty list (from any thread, also inside a handler)."""
        lib.pyuffd_pump_stop(self._ptr)

    def events_read(self) -> int:
        """Non-fault events the pump has read so far (installs wait for them to be applied)."""
        return int(lib.pyuffd_pump_events_read(self._ptr))

    def wait_applied(
        self, applied: Callable[[], int], stopping: Callable[[], bool], timeout: float
    ) -> None:
        """Wait (up to ``timeout`` s, or ``stopping()``) until ``applied()`` reaches the number
        of events the pump has read so far: the tables then show every change a process
        made before its mremap or madvise returned."""
        target = self.events_read()
        until = time.monotonic() + timeout
        while applied() < target and not stopping() and time.monotonic() < until:
            time.sleep(0.0002)

    def native_faults(self) -> int:
        """Faults the pump served without Python."""
        return int(lib.pyuffd_pump_native_faults(self._ptr))
