"""``Userfaultfd``: one userfaultfd file descriptor and its ioctls (ioctl_userfaultfd(2)).

This is the thin layer: it keeps no table of registered ranges and passes
every valid call to the kernel. Arguments are checked here first (types,
zero lengths, page alignment, a closed fd, a short source buffer) so the
kernel only ever sees calls that can be right; refusing an ioctl a mapping
does not honour is the dispatch layer's job (uffd/_handler.py). The GIL
warning is in the ``Userfaultfd`` docstring.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import math
import mmap
import operator
import os
import time
from types import TracebackType
from typing import Any

from uffd import mem
from uffd._constants import Feature, Ioctl, Mode
from uffd._errors import UffdError, UnsupportedError, check, describe_range
from uffd._events import MSG_SIZE, Event, decode_events
from uffd._native import ffi, lib

__all__ = ["AUTO_FEATURES", "Userfaultfd", "explain_open_error", "open_for_handler"]

PAGE_SIZE = mmap.PAGESIZE
_MAX_BATCH = 4096  # events read by one read_events() call at most
_MAX_WAIT_MS = 2**31 - 1  # poll() timeout limit (an int of milliseconds)
_VIAS = ("auto", "syscall", "device")


def explain_open_error(via: str, err: int) -> str:
    """Why opening a userfaultfd through ``via`` ("syscall"/"device") failed, and the remedy."""
    if via == "device":
        if err == _errno.ENOENT:
            return (
                "/dev/userfaultfd does not exist (Linux 6.1 added it; udev may not have created it)"
            )
        if err in (_errno.EACCES, _errno.EPERM):
            return (
                "/dev/userfaultfd is not accessible to this user: grant access to its group "
                "(it is root-only by default) or use the syscall"
            )
    else:
        if err == _errno.ENOSYS:
            return "the kernel was built without CONFIG_USERFAULTFD"
        if err in (_errno.EPERM, _errno.EACCES):
            return (
                "vm.unprivileged_userfaultfd is 0 and this process lacks CAP_SYS_PTRACE: "
                "pass user_mode_only=True (handles user-mode faults only), set "
                "sysctl vm.unprivileged_userfaultfd=1, use /dev/userfaultfd, or run as root"
            )
    return os.strerror(err)


def _open_fd(flags: int, via: str) -> int:
    """Open a raw userfaultfd by ``via``; raises PermissionError/UffdError with both reasons."""
    order: tuple[str, ...]
    if via == "syscall":
        order = ("syscall",)
    elif via == "device":
        order = ("device",)
    else:
        # The device needs no sysctl or capability, only file access, so it is
        # tried first; the syscall is the fallback (older kernels, no access).
        order = ("device", "syscall")
    failures: list[tuple[str, int]] = []
    for path in order:
        fd = lib.pyuffd_open_device(flags) if path == "device" else lib.pyuffd_open_syscall(flags)
        if fd >= 0:
            return int(fd)
        failures.append((path, -fd))
    reasons = "; ".join(f"{path}: {explain_open_error(path, err)}" for path, err in failures)
    err = failures[-1][1]
    if any(e in (_errno.EPERM, _errno.EACCES) for _, e in failures):
        raise PermissionError(err, f"cannot open a userfaultfd ({reasons})")
    check(-err, f"open userfaultfd ({reasons})")
    raise AssertionError("unreachable")  # pragma: no cover


# fdinfo's API line shows the kernel's internal "initialised" flag with the features.
_INITIALISED = 1 << 31
_api_cache: list[tuple[int, int]] = []


def api_answer() -> tuple[int, int] | None:
    """(available features, ioctls) that UFFDIO_API answers here (one short-lived fd, cached)."""
    if not _api_cache:
        try:
            with Userfaultfd() as probe:
                _api_cache.append((int(probe.available), int(probe.ioctls)))
        except OSError:
            return None
    return _api_cache[0]


def _fdinfo(fd: int) -> bytes:
    """/proc/self/fdinfo/FD (a few lines). Two syscalls, no text file object: a handler
    daemon wraps each session's fd on the way to its first fault, on a cold cache.

    Raises:
        OSError: ``fd`` is not open.
    """
    info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(info, 1 << 16)
    finally:
        os.close(info)


def _index(name: str, value: Any) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None


def _check_address(op: str, name: str, value: int, length: int) -> None:
    """A source address must fit the kernel's u64 with its length (checked before C sees it)."""
    if value < 0 or value + length >= 1 << 64:
        raise ValueError(
            f"{op}: {name} {describe_range(value, length)} is outside the address space"
        )


class Userfaultfd:
    """One userfaultfd file descriptor, opened and initialised (UFFDIO_API).

    ``features`` are the UFFD_FEATURE_* bits to enable; a kernel that lacks
    one raises ``UnsupportedError`` naming the missing bits. ``via`` picks the
    open path: "device" (/dev/userfaultfd, Linux 6.1), "syscall", or "auto"
    (the device first, the syscall as fallback). ``user_mode_only`` asks for
    UFFD_USER_MODE_ONLY: faults the kernel itself takes on the range (a
    ``read()`` into it) then fail with EFAULT instead of being reported.

    The object owns the fd: ``close()`` (idempotent) closes it; any other
    call on a closed object raises ValueError. Closing does not wake a
    thread blocked in ``read_events`` on another thread: use a timeout or the
    FaultHandler, whose stop eventfd exists for this reason.

    GIL warning: every call that can block or fault releases the GIL while
    it is in the kernel, but some waits are not ours to release. With
    EVENT_FORK, ``os.fork()`` holds the GIL while the kernel waits for the
    FORK event to be read, so a monitor that needs the GIL to reach its next
    ``read_events`` deadlocks the fork. The same holds for any thread that
    faults on registered memory while holding the GIL (``ctypes.string_at``
    on a registered page, a plain ``mmap`` slice). Only a reader that runs in
    C without the GIL, the FaultHandler's pump, is safe in those cases; use
    ``Region.read/write/touch``, which release the GIL, to access the memory.

    Raises:
        PermissionError: the open or a feature (EVENT_FORK needs
            CAP_SYS_PTRACE) is not permitted; the message says why and what to do.
        UnsupportedError: a requested feature is not available on this kernel.
        ValueError: ``via`` is not one of "auto", "syscall", "device".
    """

    def __init__(
        self,
        features: Feature | int = Feature(0),
        *,
        nonblock: bool = True,
        cloexec: bool = True,
        user_mode_only: bool = False,
        via: str = "auto",
    ) -> None:
        self._fd = -1
        if via not in _VIAS:
            raise ValueError(f"via must be one of {', '.join(map(repr, _VIAS))}, not {via!r}")
        requested = _index("features", features)
        if not 0 <= requested < 1 << 64:
            raise ValueError(
                f"UFFDIO_API: features must be a mask of UFFD_FEATURE_* bits (0 to 2**64-1), "
                f"got {requested}"
            )
        flags = (os.O_NONBLOCK if nonblock else 0) | (os.O_CLOEXEC if cloexec else 0)
        flags |= lib.UFFD_USER_MODE_ONLY if user_mode_only else 0
        fd = _open_fd(flags, via)
        try:
            available, ioctls = self._handshake(fd, requested, flags, via)
        except BaseException:
            os.close(fd)
            raise
        self._init(fd, Feature(requested), Feature(available), Ioctl(ioctls))

    @staticmethod
    def _handshake(fd: int, requested: int, flags: int, via: str) -> tuple[int, int]:
        out_features = ffi.new("uint64_t *")
        out_ioctls = ffi.new("uint64_t *")
        rc = lib.pyuffd_api(fd, requested, out_features, out_ioctls)
        if rc == -_errno.EINVAL and requested:
            # UFFDIO_API succeeds once per fd, so ask a fresh fd what exists.
            probe_fd = _open_fd(flags, via)
            try:
                check(lib.pyuffd_api(probe_fd, 0, out_features, out_ioctls), "UFFDIO_API")
            finally:
                os.close(probe_fd)
            missing = Feature(requested & ~out_features[0])
            if missing:
                raise UnsupportedError(
                    f"UFFDIO_API: this kernel ({os.uname().release}) does not support "
                    f"{missing!r} (bits {int(missing):#x}); check uffd.probe().available "
                    "before asking for it",
                    op="UFFDIO_API",
                )
        if rc in (-_errno.EPERM, -_errno.EACCES):
            raise PermissionError(
                -rc,
                f"UFFDIO_API with {Feature(requested)!r} was refused: EVENT_FORK needs "
                "CAP_SYS_PTRACE (or vm.unprivileged_userfaultfd=1); drop it or run privileged",
            )
        check(rc, "UFFDIO_API")
        return out_features[0], out_ioctls[0]

    def _init(self, fd: int, features: Feature, available: Feature, ioctls: Ioctl) -> None:
        self._fd = fd
        self.features = features
        self.available = available
        self.ioctls = ioctls
        self._thread_ids = bool(features & Feature.THREAD_ID)
        # read_events' buffer, allocated once (an anonymous mapping: no memory is used
        # until a read fills it). With EVENT_FORK a fork() elsewhere in the process holds
        # glibc's malloc locks until its FORK event is read, so a reader that called
        # malloc on its way to read() would wait on the fork that waits on it. A list
        # pops and appends atomically and without malloc: the pool needs no lock (whose
        # semaphore malloc would allocate, here, in a Fork event's decoding).
        self._buffers = [ffi.from_buffer("struct uffd_msg[]", mmap.mmap(-1, _MAX_BATCH * MSG_SIZE))]

    @classmethod
    def _adopt(cls, fd: int, parent: Userfaultfd) -> Userfaultfd:
        """Wrap an fd the kernel already initialised (a FORK event's child fd)."""
        obj = cls.__new__(cls)
        obj._init(fd, parent.features, parent.available, parent.ioctls)
        return obj

    @classmethod
    def from_fd(cls, fd: int) -> Userfaultfd:
        """Wrap a userfaultfd initialised elsewhere (received over SCM_RIGHTS, inherited).

        The object takes ownership of ``fd``. ``features`` and ``ioctls`` are
        what its creator negotiated, read from /proc/self/fdinfo; ``available``
        is what this kernel offers (both as UFFDIO_API answers them here, or
        fdinfo's view when no fd can be opened). Raises ValueError if ``fd``
        is not an initialised userfaultfd.
        """
        fd = _index("fd", fd)
        try:
            info = _fdinfo(fd)
        except OSError as err:
            raise ValueError(f"from_fd: fd {fd} is not open ({err.strerror})") from None
        api = [line.split()[1] for line in info.splitlines() if line.startswith(b"API:")]
        if not api:
            raise ValueError(f"from_fd: fd {fd} is not a userfaultfd (no API line in its fdinfo)")
        _, features, ioctls = (int(x, 16) for x in api[0].split(b":"))
        if not features & _INITIALISED:
            raise ValueError(f"from_fd: userfaultfd {fd} has not been through UFFDIO_API yet")
        features &= ~_INITIALISED
        available, ioctls = api_answer() or (features, ioctls)
        obj = cls.__new__(cls)
        obj._init(fd, Feature(features), Feature(available | features), Ioctl(ioctls))
        return obj

    # -- lifecycle -------------------------------------------------------

    def fileno(self) -> int:
        """The fd number; raises ValueError when closed."""
        return self._require_open("fileno")

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran."""
        return self._fd < 0

    def close(self) -> None:
        """Close the fd; a second call does nothing."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def detach(self) -> int:
        """Give up the fd without closing it (it was closed elsewhere); returns the old number.

        The object is closed from then on; the number may already belong to
        another file, which is why it must not be closed again.
        """
        fd, self._fd = self._fd, -1
        return fd

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # A backstop only: owners should close explicitly.
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<uffd.Userfaultfd {state} features={self.features!r}>"

    def _require_open(self, op: str) -> int:
        fd = self._fd
        if fd < 0:
            raise ValueError(f"{op} on a closed Userfaultfd")
        return fd

    def _range(self, op: str, addr: Any, length: Any) -> tuple[int, int, int]:
        """Check ``addr``/``length`` and return (fd, addr, length)."""
        fd = self._require_open(op)
        addr = _index("addr", addr)
        length = _index("length", length)
        if length <= 0:
            raise ValueError(f"{op}: length must be positive, got {length}")
        if addr < 0 or addr + length >= 1 << 64:
            raise ValueError(
                f"{op}: range {describe_range(addr, length)} is outside the address space"
            )
        if addr % PAGE_SIZE or length % PAGE_SIZE:
            raise ValueError(
                f"{op}: range {describe_range(addr, length)} is not aligned to the "
                f"{PAGE_SIZE}-byte page size (hugetlb ranges need the huge page size)"
            )
        return fd, addr, length

    # -- registration ----------------------------------------------------

    def register(self, addr: int, length: int, mode: Mode | int) -> Ioctl:
        """UFFDIO_REGISTER a range for ``mode``; returns the ioctls the kernel grants for it.

        Raises:
            ValueError: mode 0, a bad or unaligned range, a closed fd.
            UnsupportedError: the kernel refused the mode for this memory
                (MINOR on anon, WP without PAGEFAULT_FLAG_WP semantics, ...).
            UffdError: EBUSY (registered on another fd), ENOMEM, ...
        """
        mode = _index("mode", mode)
        if mode <= 0 or mode >= 1 << 64:
            raise ValueError(
                f"register: mode must name at least one of Mode.MISSING, WP, MINOR, got {mode}"
            )
        fd, addr, length = self._range("UFFDIO_REGISTER", addr, length)
        out = ffi.new("uint64_t *")
        rc = lib.pyuffd_register(fd, addr, length, mode, out)
        if rc == -_errno.EINVAL:
            raise UnsupportedError(
                f"UFFDIO_REGISTER on {describe_range(addr, length)} with {Mode(mode)!r} failed: "
                "[EINVAL] the kernel does not support this mode for this memory (MINOR needs "
                "shmem/hugetlb, WP on shmem/hugetlb needs WP_HUGETLBFS_SHMEM, each mode needs its "
                "feature negotiated), or the range is not a whole mapping of one memory type",
                op="UFFDIO_REGISTER",
                addr=addr,
                length=length,
            )
        check(rc, "UFFDIO_REGISTER", addr, length)
        return Ioctl(out[0])

    def unregister(self, addr: int, length: int) -> None:
        """UFFDIO_UNREGISTER a range; faults pending on it are woken."""
        fd, addr, length = self._range("UFFDIO_UNREGISTER", addr, length)
        check(lib.pyuffd_unregister(fd, addr, length), "UFFDIO_UNREGISTER", addr, length)

    # -- resolving faults ------------------------------------------------

    def _fill(self, op: str, call: Any, dst: int, length: int, *args: int) -> int:
        done = ffi.new("int64_t *")
        rc = call(*args, done)
        check(rc, op, dst, length, done=int(done[0]))
        return int(done[0])

    def copy(self, dst: int, src: Any, length: int, *, wake: bool = True, wp: bool = False) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src`` into ``dst``; returns the bytes copied.

        ``src`` is an address or a buffer (bytes, bytearray, memoryview, mmap)
        of at least ``length`` bytes. ``wake=False`` sets DONTWAKE (wake later
        with ``wake()``); ``wp=True`` installs the pages write-protected.

        Raises:
            PageExistsError, MappingChangedError (``.done``), NoMappingError,
            ProcessGoneError, UffdError; ValueError/TypeError for bad arguments.
        """
        fd, dst, length = self._range("UFFDIO_COPY", dst, length)
        mode = (0 if wake else lib.UFFDIO_COPY_MODE_DONTWAKE) | (
            lib.UFFDIO_COPY_MODE_WP if wp else 0
        )
        if isinstance(src, int):
            _check_address("UFFDIO_COPY", "src", src, length)
            return self._fill(
                "UFFDIO_COPY", lib.pyuffd_copy, dst, length, fd, dst, src, length, mode
            )
        try:
            view = memoryview(src)
        except TypeError:
            raise TypeError(
                f"UFFDIO_COPY: src must be an address or a buffer, not {type(src).__name__}"
            ) from None
        # Both buffers are released before an error propagates: a traceback
        # cycle holding a memoryview with a live export crashes CPython's GC
        # (memoryview tp_clear drops its mbuf while the export still exists).
        with view:
            if view.nbytes < length:
                raise ValueError(
                    f"UFFDIO_COPY to {describe_range(dst, length)}: src holds only "
                    f"{view.nbytes} bytes, {length} needed"
                )
            if not view.c_contiguous:
                raise ValueError(
                    f"UFFDIO_COPY to {describe_range(dst, length)}: src is not a contiguous "
                    "buffer (a strided memoryview?); pass bytes(src) or a contiguous slice"
                )
            with ffi.from_buffer(view) as keep:  # the buffer must outlive the ioctl
                src_addr = int(ffi.cast("uintptr_t", keep))
                return self._fill(
                    "UFFDIO_COPY", lib.pyuffd_copy, dst, length, fd, dst, src_addr, length, mode
                )

    def zeropage(self, addr: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_ZEROPAGE: map the zero page over the range; returns the bytes mapped.

        Raises UnsupportedError on hugetlb (never granted ZEROPAGE; the kernel
        answers EINVAL), besides the errors ``copy`` raises.
        """
        fd, addr, length = self._range("UFFDIO_ZEROPAGE", addr, length)
        mode = 0 if wake else lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        try:
            return self._fill(
                "UFFDIO_ZEROPAGE", lib.pyuffd_zeropage, addr, length, fd, addr, length, mode
            )
        except UffdError as err:
            if err.errno == _errno.EINVAL and _is_hugetlb(addr):
                raise UnsupportedError(
                    f"UFFDIO_ZEROPAGE on {describe_range(addr, length)}: hugetlb ranges are "
                    "never granted ZEROPAGE; copy a page of zeros (copy()) instead",
                    op="UFFDIO_ZEROPAGE",
                    addr=addr,
                    length=length,
                ) from None
            raise

    def continue_(self, addr: int, length: int, *, wake: bool = True, wp: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages of a MINOR range; returns the bytes mapped.

        Requires Linux 5.13 (shmem) / 5.12 (hugetlb); ``wp=True`` needs 6.6.
        """
        fd, addr, length = self._range("UFFDIO_CONTINUE", addr, length)
        mode = (0 if wake else lib.UFFDIO_CONTINUE_MODE_DONTWAKE) | (
            lib.UFFDIO_CONTINUE_MODE_WP if wp else 0
        )
        return self._fill(
            "UFFDIO_CONTINUE", lib.pyuffd_continue, addr, length, fd, addr, length, mode
        )

    def poison(self, addr: int, length: int, *, wake: bool = True) -> int:
        """UFFDIO_POISON: install poison markers (accesses get SIGBUS); returns the bytes handled.

        Requires Linux 6.6: UFFD_FEATURE_POISON.
        """
        fd, addr, length = self._range("UFFDIO_POISON", addr, length)
        mode = 0 if wake else lib.UFFDIO_POISON_MODE_DONTWAKE
        return self._fill("UFFDIO_POISON", lib.pyuffd_poison, addr, length, fd, addr, length, mode)

    def move(
        self, dst: int, src: int, length: int, *, wake: bool = True, allow_src_holes: bool = False
    ) -> int:
        """UFFDIO_MOVE pages from ``src`` to ``dst`` (anon only); returns the bytes moved.

        Requires Linux 6.8: UFFD_FEATURE_MOVE.
        """
        fd, dst, length = self._range("UFFDIO_MOVE", dst, length)
        src = _index("src", src)
        _check_address("UFFDIO_MOVE", "src", src, length)
        if src % PAGE_SIZE:
            raise ValueError(
                f"UFFDIO_MOVE: src {src:#x} is not aligned to the {PAGE_SIZE}-byte page size"
            )
        mode = (0 if wake else lib.UFFDIO_MOVE_MODE_DONTWAKE) | (
            lib.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES if allow_src_holes else 0
        )
        return self._fill("UFFDIO_MOVE", lib.pyuffd_move, dst, length, fd, dst, src, length, mode)

    def writeprotect(
        self, addr: int, length: int, protect: bool = True, *, wake: bool = True
    ) -> None:
        """UFFDIO_WRITEPROTECT: protect or un-protect a WP-registered range.

        ``wake`` applies when un-protecting; protecting never wakes (the
        kernel rejects WP together with DONTWAKE), so it is ignored then.
        """
        fd, addr, length = self._range("UFFDIO_WRITEPROTECT", addr, length)
        if protect:
            mode = lib.UFFDIO_WRITEPROTECT_MODE_WP
        else:
            mode = 0 if wake else lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        check(lib.pyuffd_writeprotect(fd, addr, length, mode), "UFFDIO_WRITEPROTECT", addr, length)

    def wake(self, addr: int, length: int) -> None:
        """UFFDIO_WAKE the threads waiting on faults in the range."""
        fd, addr, length = self._range("UFFDIO_WAKE", addr, length)
        check(lib.pyuffd_wake(fd, addr, length), "UFFDIO_WAKE", addr, length)

    # -- events ----------------------------------------------------------

    def read_events(self, max_events: int = 64, timeout: float | None = 0) -> list[Event]:
        """Read up to ``max_events`` pending events.

        ``timeout=0`` returns ``[]`` at once when nothing is pending, ``None``
        waits forever, a float waits up to that many seconds. EINTR is retried
        (signal handlers run in between). The GIL is released while waiting,
        but see the class docstring's GIL warning: a thread that forks (with
        EVENT_FORK) or faults on registered memory while holding the GIL
        blocks until its event is read, and this method needs the GIL to
        return: a deadlock that only the FaultHandler's C pump avoids.
        On a blocking fd (``nonblock=False``) a bounded wait sets O_NONBLOCK
        on the open file for the duration of the call.

        Raises:
            ValueError: closed fd or ``max_events`` < 1.
            UffdError: the read failed (EBADF if the fd was closed under us).
        """
        fd = self._require_open("read_events")
        max_events = _index("max_events", max_events)
        if max_events < 1:
            raise ValueError(f"read_events: max_events must be at least 1, got {max_events}")
        if timeout is not None and not timeout >= 0:  # NaN too
            raise ValueError(f"read_events: timeout must be >= 0 or None, got {timeout}")
        if timeout == math.inf:
            timeout = None  # waits forever, as None does
        if timeout is not None:
            status = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not status & os.O_NONBLOCK:
                # poll() on a blocking userfaultfd always answers POLLERR (the
                # kernel cannot promise read() won't block), so a bounded wait
                # needs O_NONBLOCK for the duration of the call.
                fcntl.fcntl(fd, fcntl.F_SETFL, status | os.O_NONBLOCK)
                try:
                    return self._read_events(fd, max_events, timeout)
                finally:
                    fcntl.fcntl(fd, fcntl.F_SETFL, status)
        return self._read_events(fd, max_events, timeout)

    def _read_events(self, fd: int, max_events: int, timeout: float | None) -> list[Event]:
        # "At most max_events": never more than the buffer holds.
        max_events = min(max_events, _MAX_BATCH)
        # Nothing between here and read() returning may call malloc (see _init): the
        # buffer is the fd's own; a second thread reading the same fd meanwhile gets
        # one of its own, the only case that allocates.
        try:
            buf = self._buffers.pop()
        except IndexError:
            buf = ffi.new("struct uffd_msg[]", _MAX_BATCH)  # then pooled like the first
        try:
            n = self._wait_and_read(fd, buf, max_events, timeout)
            return decode_events(
                ffi.buffer(buf, n * MSG_SIZE),
                thread_ids=self._thread_ids,
                adopt_fd=lambda ufd: Userfaultfd._adopt(ufd, self),
            )
        finally:
            self._buffers.append(buf)

    @staticmethod
    def _wait_and_read(fd: int, buf: Any, max_events: int, timeout: float | None) -> int:
        """Messages read into ``buf`` (0 when the wait ended first); EINTR is retried."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if deadline is None:
                wait_ms = -1
            else:
                # Capped to what poll() takes; the loop waits again for the rest.
                wait_ms = min(_MAX_WAIT_MS, max(0, math.ceil((deadline - time.monotonic()) * 1000)))
            n = lib.pyuffd_read_msgs(fd, buf, max_events, wait_ms)
            if n > 0:
                return int(n)
            if n != -_errno.EINTR:
                check(n, "read userfaultfd events")
            if wait_ms == 0:
                return 0


Userfaultfd.__module__ = "uffd"


def _is_hugetlb(addr: int) -> bool:
    """Is ``addr`` in a hugetlb mapping of this process? (False when it cannot tell.)"""
    try:
        return mem.kind_of(addr)[0] == "hugetlb"
    except LookupError:
        return False


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


def open_for_handler(features: Feature, auto_features: bool) -> Userfaultfd:
    """The FaultHandler's own fd: ``features`` plus, with ``auto_features``, AUTO_FEATURES
    the kernel has.

    Raises PermissionError with the remedy that fits a FaultHandler, and
    whatever ``Userfaultfd()`` raises.
    """
    if auto_features:
        answer = api_answer()
        features = Feature(features | (AUTO_FEATURES & (answer[0] if answer else 0)))
    try:
        return Userfaultfd(features)
    except PermissionError as err:
        # The fd's own remedy (user_mode_only=True) is not a FaultHandler argument.
        raise PermissionError(
            err.errno,
            f"{err.strerror}; for a FaultHandler: "
            "FaultHandler(uffd=Userfaultfd(user_mode_only=True))",
        ) from None


def mm_gone(fd: int) -> bool:
    """True once the process whose memory userfaultfd ``fd`` serves has exited.

    UFFDIO_COPY answers ESRCH for a dead mm before looking at the range. The
    probe targets an address no process maps (2**46) and copies from the same
    address in this process, also unmapped, so on a live mm it installs
    nothing: ENOENT (not registered) or EFAULT (the source).
    """
    done = ffi.new("int64_t *")
    probe = 1 << 46
    rc = lib.pyuffd_copy(fd, probe, probe, PAGE_SIZE, lib.UFFDIO_COPY_MODE_DONTWAKE, done)
    return bool(rc == -_errno.ESRCH)


def fd_identity(fd: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of an open fd (each userfaultfd has its own anon inode), or None."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino
