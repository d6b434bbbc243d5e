"""Dirty-page tracking: ``DirtyTracker`` (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN).

How it works (userfaultfd(2), ioctl_userfaultfd(2), and PAGEMAP_SCAN in the
kernel's Documentation/admin-guide/mm/pagemap.rst): the range is registered
``Mode.WP`` on a userfaultfd with WP_ASYNC and WP_UNPOPULATED, then
write-protected as a whole. With WP_ASYNC a write to a protected page raises
no event: the kernel's fault path clears the page's uffd-wp bit and the
write goes on. WP_UNPOPULATED puts a marker on every page not yet populated,
so the first write to a never-touched page is seen as well. ``collect()``
then asks PAGEMAP_SCAN, on /proc/PID/pagemap, for the pages whose bit is
clear (PAGE_IS_WRITTEN) with PM_SCAN_WP_MATCHING, which protects each page
again under the same page-table lock it was read under: a write is reported
by exactly one ``collect()``, never lost between two, never reported twice.

The memory may be another process's: pass that process's userfaultfd
(received over a unix socket with SCM_RIGHTS) and its pid. The userfaultfd
ioctls act on the mm the fd was created in, whichever process calls them,
and PAGEMAP_SCAN goes to that process's pagemap file.

Requires Linux 6.7: UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import operator
import os
from types import TracebackType
from typing import Any

from uffd._constants import Feature, Mode
from uffd._errors import (
    NoMappingError,
    ProcessGoneError,
    UffdError,
    UnsupportedError,
    check,
    describe_range,
)
from uffd._native import ffi, lib
from uffd._userfaultfd import Userfaultfd
from uffd.mem import Region

__all__ = ["DirtyTracker"]

PAGE_SIZE = mmap.PAGESIZE
_NEEDED = Feature.WP_ASYNC | Feature.WP_UNPOPULATED
_REQUIRES = "Requires Linux 6.7: UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN"
# 96 KiB of page_region, allocated once per tracker. The kernel walks at
# most 512 regions per pass whatever this is; a larger vec only saves
# ioctl calls, and a batch this size keeps the per-batch Python work small.
_VEC_LEN = 4096
_WORDS = 3  # uint64_t fields of a struct page_region: start, end, categories
_sub = operator.sub
_STATES = {"new": "not started", "started": "started", "stopped": "stopped"}


def _target_range(target: Any) -> tuple[int, int, int, Region | None]:
    """(addr, length, page_size, region) of a Region or an (addr, length) pair."""
    if isinstance(target, Region):
        if target.closed:
            raise ValueError("DirtyTracker: the target region is closed")
        return target.addr, target.length, target.page_size, target
    try:
        addr, length = target
        addr, length = operator.index(addr), operator.index(length)
    except (TypeError, ValueError):
        raise TypeError(
            f"DirtyTracker: target must be a uffd.mem.Region or an (addr, length) pair of ints, "
            f"not {target!r}"
        ) from None
    if length <= 0:
        raise ValueError(f"DirtyTracker: length must be positive, got {length}")
    if addr < 0 or addr + length > 1 << 64:
        raise ValueError(
            f"DirtyTracker: range {describe_range(addr, length)} is outside the address space"
        )
    if addr % PAGE_SIZE or length % PAGE_SIZE:
        raise ValueError(
            f"DirtyTracker: range {describe_range(addr, length)} is not aligned to the "
            f"{PAGE_SIZE}-byte page size"
        )
    return addr, length, PAGE_SIZE, None


def _missing_features(ufd: Userfaultfd) -> str | None:
    """Why ``ufd`` cannot drive a tracker, or None when it can."""
    missing = _NEEDED & ~ufd.features
    if not missing:
        return None
    names = " and ".join(f"Feature.{f.name}" for f in Feature if f in missing)
    absent = _NEEDED & ~ufd.available
    if absent:
        return (
            f"the userfaultfd lacks {names}, and this kernel ({os.uname().release}) does not "
            f"offer {Feature(absent)!r} (WP_UNPOPULATED needs Linux 6.4, WP_ASYNC 6.7)"
        )
    return (
        f"the userfaultfd was opened without {names}: open it with "
        "Userfaultfd(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)"
    )


class DirtyTracker:
    """Report the pages written in a range since the last ``collect()``.

    ``target`` is a ``uffd.mem.Region`` or an ``(addr, length)`` pair,
    page-aligned. By default the memory is this process's and the tracker
    opens (and owns) its own userfaultfd with WP_ASYNC | WP_UNPOPULATED, or
    uses ``uffd`` if given (it must have both features; the tracker does
    not close it). For another process's memory pass ``pid`` and ``uffd``,
    that process's userfaultfd (received over SCM_RIGHTS); the caller
    needs ptrace read access to it (same user, or CAP_SYS_PTRACE).

    Calling context: ``start``, ``collect`` and ``stop`` from one thread at
    a time (they share a scan buffer); the memory may be written from any
    thread or process meanwhile. A write that lands between two
    ``collect()`` calls is reported by exactly the next one. A write racing
    with a ``collect()`` is reported by a collect that returns after the
    store, and the racing one may report its page early too (the kernel
    grants write access before the store lands; a store that finds the page
    protected again faults again): under concurrent writes a page can show
    up in two collects, never in none. Writes before ``start()`` are not
    reported; pages unmapped while tracked are dropped from the reports.

    Requires Linux 6.7: UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN.

    Raises:
        ValueError: an unaligned or empty range, a closed region or
            userfaultfd, ``pid`` of another process without ``uffd``.
        TypeError: ``target`` is neither a Region nor an (addr, length) pair.
        UnsupportedError: ``uffd`` lacks WP_ASYNC or WP_UNPOPULATED.
    """

    def __init__(
        self,
        target: Region | tuple[int, int],
        *,
        uffd: Userfaultfd | None = None,
        pid: int | None = None,
    ) -> None:
        self._pagemap = -1
        self._owns_uffd = False
        self._arg: Any = None
        self._vec: Any = None
        self._words = memoryview(b"")
        self._state = "new"
        addr, length, page_size, region = _target_range(target)
        self._addr, self._length, self._end = addr, length, addr + length
        self._page_size = page_size
        self._region = region  # kept alive while tracked
        if pid is not None:
            pid = operator.index(pid)
            if pid <= 0:
                raise ValueError(f"DirtyTracker: pid must be positive, got {pid}")
            if pid == os.getpid():
                pid = None
        if pid is not None and uffd is None:
            raise ValueError(
                f"DirtyTracker: tracking process {pid} needs its userfaultfd: pass uffd= "
                "(opened in that process with WP_ASYNC | WP_UNPOPULATED, received over "
                "SCM_RIGHTS)"
            )
        if uffd is not None:
            if not isinstance(uffd, Userfaultfd):
                raise TypeError(
                    f"DirtyTracker: uffd must be a Userfaultfd, not {type(uffd).__name__}"
                )
            if uffd.closed:
                raise ValueError("DirtyTracker: the userfaultfd is closed")
            why = _missing_features(uffd)
            if why:
                raise UnsupportedError(
                    f"DirtyTracker on {describe_range(addr, length)}: {why}", op="UFFDIO_API"
                )
        self._pid = pid
        self._uffd = uffd

    def __repr__(self) -> str:
        who = f" pid={self._pid}" if self._pid is not None else ""
        where = describe_range(self._addr, self._length)
        return f"<uffd.dirty.DirtyTracker {where}{who} {_STATES[self._state]}>"

    # -- lifecycle -------------------------------------------------------

    def start(self) -> None:
        """Register the range ``Mode.WP`` and write-protect it all: tracking starts here.

        Opens the userfaultfd if none was given, and /proc/PID/pagemap
        (kept open until ``stop()``). A tracker starts once; a second
        ``start()`` raises ValueError.

        Requires Linux 6.7: UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN.

        Raises:
            UnsupportedError: the kernel lacks WP_ASYNC, WP_UNPOPULATED or
                PAGEMAP_SCAN (the message names which).
            ProcessGoneError: the process ``pid`` has exited.
            PermissionError: no ptrace read access to process ``pid``.
            NoMappingError: ``uffd`` does not serve the process whose pagemap
                was opened (``pid`` is wrong).
            UffdError: UFFDIO_REGISTER failed (EBUSY: the range is registered
                on another userfaultfd; EINVAL: not all of it is mapped).
        """
        if self._state != "new":
            raise ValueError(f"DirtyTracker.start: the tracker is already {self._state}")
        registered = False
        try:
            if self._uffd is None:
                self._uffd = self._open_uffd()
                self._owns_uffd = True
            self._pagemap = self._open_pagemap()
            self._uffd.register(self._addr, self._length, Mode.WP)
            registered = True
            # UFFDIO_WRITEPROTECT rather than a PAGEMAP_SCAN write-protect pass:
            # both install markers on unpopulated ptes of anon and shmem, but
            # only this one does so on unpopulated hugetlb ptes.
            self._uffd.writeprotect(self._addr, self._length)
            self._alloc()
            self._probe()
        except BaseException as err:
            if registered:
                # The original error matters more than a failed undo.
                with contextlib.suppress(UffdError, ValueError):
                    self._uffd.unregister(self._addr, self._length)  # type: ignore[union-attr]
            gone = (
                isinstance(err, UffdError)
                and not isinstance(err, ProcessGoneError)
                and self._pid is not None
                and self._pagemap >= 0
                and not self._mm_alive()
            )
            self._release()
            if gone:
                # A dead mm makes the uffd ioctls fail with ENOMEM or ESRCH.
                raise ProcessGoneError(
                    _errno.ESRCH,
                    f"DirtyTracker.start on {describe_range(self._addr, self._length)}: "
                    f"process {self._pid} exited meanwhile",
                    op=getattr(err, "op", None),
                    addr=self._addr,
                    length=self._length,
                ) from err
            raise
        self._state = "started"

    def stop(self) -> None:
        """Unregister the range and close what the tracker opened; a second call does nothing.

        If the memory went away first (the process exited, the range was
        unmapped) or ``uffd`` was closed, the registration went with it and
        there is nothing to undo.

        Raises:
            UffdError: UFFDIO_UNREGISTER failed for another reason (the
                tracker is stopped and its fds closed all the same).
        """
        if self._state == "stopped":
            return
        started, self._state = self._state == "started", "stopped"
        try:
            if started and self._uffd is not None and not self._uffd.closed:
                try:
                    self._uffd.unregister(self._addr, self._length)
                except UffdError as err:
                    if not self._registration_gone(err):
                        raise
        finally:
            self._release()

    def __enter__(self) -> DirtyTracker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # A backstop only: closes the fds; an owned userfaultfd unregisters on close.
        if getattr(self, "_pagemap", -1) >= 0 or getattr(self, "_owns_uffd", False):
            self._release()

    # -- harvesting ------------------------------------------------------

    def collect(self) -> list[tuple[int, int]]:
        """The (start, length) ranges written since ``start()`` or the last ``collect()``.

        Sorted by address, adjacent pages merged into one range. The same
        PAGEMAP_SCAN ioctl that reports a page write-protects it again, so a
        write between two calls is reported once (see the class docstring
        for writes racing with the call). Returns ``[]`` when nothing was
        written. Releases the GIL while in the kernel; allocates nothing but
        the result.

        Raises:
            ValueError: the tracker is not started, or stopped.
            ProcessGoneError: the process ``pid`` has exited (or exec'd).
            NoMappingError: part of the range is no longer registered for
                async write-protect (unmapped and mapped again, unregistered).
            UnsupportedError: the kernel has no PAGEMAP_SCAN (Linux < 6.7).
            UffdError: the scan failed otherwise.
        """
        arg = self._arg
        if arg is None:
            raise ValueError(f"DirtyTracker.collect: the tracker is {_STATES[self._state]}")
        scan = lib.pyuffd_pagemap_scan
        fd = self._pagemap
        words = self._words
        end = self._end
        out: list[tuple[int, int]] = []
        pos = arg.start = self._addr
        while True:
            n = scan(fd, arg)
            if n < 0:
                self._raise_scan(n)
            if n:
                # Strided views of the vec: no list is built but the result.
                starts = words[0 : _WORDS * n : _WORDS]
                ends = words[1 : _WORDS * n : _WORDS]
                # A full vec ends a call and the next resumes at walk_end. The
                # kernel stops at a page that does not extend the last range,
                # so ranges do not touch across calls; this keeps the result
                # merged should a kernel ever stop mid-range.
                if out and out[-1][0] + out[-1][1] == starts[0]:
                    first = out.pop()[0]
                    out.append((first, ends[0] - first))
                    starts, ends = starts[1:], ends[1:]
                out.extend(zip(starts, map(_sub, ends, starts), strict=True))
            walk_end = arg.walk_end
            if walk_end >= end:
                break
            if walk_end <= pos:
                raise UffdError(
                    _errno.EIO,
                    f"PAGEMAP_SCAN on {describe_range(self._addr, self._length)} made no "
                    f"progress at {pos:#x}; please report this kernel ({os.uname().release})",
                    op="PAGEMAP_SCAN",
                    addr=self._addr,
                    length=self._length,
                )
            pos = arg.start = walk_end
        if self._pid is not None:
            self._check_alive()
        return out

    # -- internals -------------------------------------------------------

    def _open_uffd(self) -> Userfaultfd:
        try:
            return Userfaultfd(_NEEDED)
        except UnsupportedError as err:
            raise UnsupportedError(
                f"DirtyTracker needs UFFD_FEATURE_WP_ASYNC (Linux 6.7) and WP_UNPOPULATED "
                f"(Linux 6.4): {err}",
                op="UFFDIO_API",
            ) from err

    def _open_pagemap(self) -> int:
        pid = self._pid
        path = f"/proc/{'self' if pid is None else pid}/pagemap"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise ProcessGoneError(
                err.errno or _errno.ESRCH,
                f"DirtyTracker on {describe_range(self._addr, self._length)}: process {pid} "
                f"has exited ({path}: {err.strerror})",
                op="open pagemap",
                addr=self._addr,
                length=self._length,
            ) from err
        except PermissionError as err:
            raise PermissionError(
                err.errno,
                f"DirtyTracker: cannot open {path}: {err.strerror}; reading another process's "
                "pagemap needs ptrace read access to it (PTRACE_MODE_READ: the same user and a "
                "dumpable process, or CAP_SYS_PTRACE; see kernel.yama.ptrace_scope)",
            ) from err
        if pid is not None:
            try:
                self._check_alive(fd)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def _mm_alive(self, fd: int | None = None) -> bool:
        """False once the target's mm is gone.

        PAGEMAP_SCAN on a dead mm reports nothing instead of failing, but a
        read of the pagemap returns 0 bytes once the mm has no users (and
        for a file opened after the process released its mm). The entry of
        page 0 is read: it exists in every live mm.
        """
        return bool(os.pread(self._pagemap if fd is None else fd, 8, 0))

    def _check_alive(self, fd: int | None = None) -> None:
        """Raise ProcessGoneError once the target's mm is gone."""
        if self._mm_alive(fd):
            return
        raise ProcessGoneError(
            _errno.ESRCH,
            f"PAGEMAP_SCAN on {describe_range(self._addr, self._length)}: process "
            f"{self._pid} has exited (or exec'd); stop the tracker",
            op="PAGEMAP_SCAN",
            addr=self._addr,
            length=self._length,
        )

    def _registration_gone(self, err: UffdError) -> bool:
        """Did UFFDIO_UNREGISTER fail because the memory went away (nothing left to undo)?"""
        if isinstance(err, (ProcessGoneError, NoMappingError)) or err.errno == _errno.EINVAL:
            return True  # the mm exited, or the range is no longer (all) mapped
        # A dead mm answers ENOMEM to UFFDIO_UNREGISTER (mmget_not_zero fails).
        return self._pid is not None and self._pagemap >= 0 and not self._mm_alive()

    def _alloc(self) -> None:
        self._vec = ffi.new("struct page_region[]", _VEC_LEN)
        self._words = memoryview(ffi.buffer(self._vec)).cast("Q")
        arg = ffi.new("struct pm_scan_arg *")
        arg.flags = lib.PM_SCAN_WP_MATCHING | lib.PM_SCAN_CHECK_WPASYNC
        arg.end = self._end
        arg.vec = int(ffi.cast("uintptr_t", self._vec))
        arg.vec_len = _VEC_LEN
        arg.category_mask = lib.PAGE_IS_WRITTEN
        arg.return_mask = lib.PAGE_IS_WRITTEN
        self._arg = arg

    def _probe(self) -> None:
        """Is there PAGEMAP_SCAN, and does the pagemap's process see our registration?

        A read-only scan of the first page for PAGE_IS_WPALLOWED: it finds the
        page only if the mm behind the pagemap has it registered for async
        write-protect, which fails when ``uffd`` came from another process
        than ``pid`` (UFFDIO_REGISTER acted on that other mm).
        """
        arg = ffi.new("struct pm_scan_arg *")
        arg.start = self._addr
        arg.end = self._addr + self._page_size
        arg.vec = self._arg.vec
        arg.vec_len = 1
        arg.category_mask = lib.PAGE_IS_WPALLOWED
        arg.return_mask = lib.PAGE_IS_WPALLOWED
        rc = lib.pyuffd_pagemap_scan(self._pagemap, arg)
        if rc < 0:
            self._raise_scan(rc)
        if rc == 0:
            who = "this process" if self._pid is None else f"process {self._pid}"
            raise NoMappingError(
                _errno.ENOENT,
                f"PAGEMAP_SCAN on {describe_range(self._addr, self._length)}: {who} does not "
                "have the range registered for async write-protect after UFFDIO_REGISTER: the "
                "userfaultfd serves another process (pass pid= of the process it came from)",
                op="PAGEMAP_SCAN",
                addr=self._addr,
                length=self._length,
            )

    def _raise_scan(self, rc: int) -> None:
        where = describe_range(self._addr, self._length)
        if self._pid is not None:
            self._check_alive()
        if rc in (-_errno.ENOTTY, -_errno.EINVAL):
            raise UnsupportedError(
                f"PAGEMAP_SCAN on {where} failed: [{_errno.errorcode[-rc]}] this kernel "
                f"({os.uname().release}) has no PAGEMAP_SCAN ioctl on /proc/PID/pagemap. "
                f"{_REQUIRES} (and CONFIG_PROC_PAGE_MONITOR)",
                op="PAGEMAP_SCAN",
                addr=self._addr,
                length=self._length,
            )
        if rc == -_errno.EPERM:
            raise NoMappingError(
                _errno.EPERM,
                f"PAGEMAP_SCAN on {where} failed: [EPERM] part of the range is no longer "
                "registered for async write-protect (was it unmapped and mapped again, or "
                "unregistered?); stop the tracker and start a new one",
                op="PAGEMAP_SCAN",
                addr=self._addr,
                length=self._length,
            )
        check(rc, "PAGEMAP_SCAN", self._addr, self._length)

    def _release(self) -> None:
        self._arg = None
        self._words = memoryview(b"")
        self._vec = None
        fd, self._pagemap = self._pagemap, -1
        if fd >= 0:
            os.close(fd)
        if self._owns_uffd and self._uffd is not None:
            ufd, self._uffd, self._owns_uffd = self._uffd, None, False
            ufd.close()
