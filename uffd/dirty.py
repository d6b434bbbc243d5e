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

A harvest is a ``DirtyRanges``: a read-only sequence of (start, length)
tuples backed by one flat ``array('Q')`` that C fills (csrc/uffd_dirty.c):
in place while it has room, the rest through the tracker's spill buffer and
one copy. Building a Python tuple per range cost more than the kernel's scan.

Requires Linux 6.7: UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import operator
import os
import threading
from array import array
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, overload

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

__all__ = ["DirtyRanges", "DirtyTracker"]

PAGE_SIZE = mmap.PAGESIZE
_NEEDED = Feature.WP_ASYNC | Feature.WP_UNPOPULATED
_REQUIRES = "Requires Linux 6.7: UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN"
_STATES = {"new": "not started", "started": "started", "stopped": "stopped"}
# Ranges beyond the result's array go to the tracker's spill buffer (1 MiB
# at most, reused by every harvest so it stays in memory), then onto the
# array in one copy: the array grows once per spill, to its exact size.
# Growing the array itself in steps cost more than the scan (fresh pages).
_SPILL_RANGES = 1 << 16
_PAIR = 16  # bytes of one (start, length) pair
_REPR_RANGES = 4


class DirtyRanges(Sequence[tuple[int, int]]):
    """The ranges one harvest found: a read-only sequence of ``(start, length)`` tuples.

    Sorted by address and merged (no two ranges touch). Iterating,
    indexing (negative indices and slices too; a slice is a list),
    ``len`` and ``==`` with a list of tuples work as on a list, so code
    written for a list keeps working. The storage is one flat
    ``array('Q')``, ``.array``: start, length, start, length, ...; C
    writes it, so no Python object exists per range until one is asked
    for. ``DirtyRanges()`` is empty, ready for
    ``DirtyTracker.collect_into``.

    Calling context: any thread, but not while a ``collect_into`` is
    filling it (it is resized and written then).
    """

    __slots__ = ("_array", "_bytes")

    def __init__(self) -> None:
        self._array = array("Q")
        self._bytes = 0

    @property
    def array(self) -> array[int]:
        """The storage itself: start, length, start, length, ... (do not resize it)."""
        return self._array

    @property
    def bytes(self) -> int:
        """The total length of the ranges, in bytes."""
        return self._bytes

    def pages(self, page_size: int) -> Iterator[int]:
        """The address of every ``page_size`` page in the ranges, in order.

        Raises:
            ValueError: ``page_size`` is not positive.
        """
        page_size = operator.index(page_size)
        if page_size <= 0:
            raise ValueError(f"DirtyRanges.pages: page_size must be positive, got {page_size}")
        for start, length in self:
            yield from range(start, start + length, page_size)

    def __len__(self) -> int:
        return len(self._array) // 2

    def __iter__(self) -> Iterator[tuple[int, int]]:
        words = iter(self._array)
        # One iterator twice: consecutive words pair up, in C.
        return zip(words, words, strict=False)

    @overload
    def __getitem__(self, index: int) -> tuple[int, int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, int]]: ...

    def __getitem__(self, index: int | slice) -> tuple[int, int] | list[tuple[int, int]]:
        words = self._array
        if isinstance(index, slice):
            return [(words[2 * i], words[2 * i + 1]) for i in range(len(self))[index]]
        i = operator.index(index)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"DirtyRanges index {index} out of range ({n} ranges)")
        return words[2 * i], words[2 * i + 1]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DirtyRanges):
            return self._array == other._array
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(map(operator.eq, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # collect_into changes it

    def __repr__(self) -> str:
        shown = ", ".join(f"({start:#x}, {length})" for start, length in self[:_REPR_RANGES])
        more = len(self) - _REPR_RANGES
        if more > 0:
            shown += f", ... {more} more"
        return f"<uffd.dirty.DirtyRanges {len(self)} ranges, {self._bytes} bytes: [{shown}]>"


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

    Calling context: any thread. ``start``, ``collect``, ``collect_into``
    and ``stop`` take turns (a lock): a ``stop()`` from another thread waits
    for a harvest in progress, which returns its result, and later harvests
    raise ValueError. The memory may be written from any thread or process
    meanwhile. A write that lands between two harvests (``collect()`` or
    ``collect_into()``) is reported by exactly the next one. A write racing
    with a harvest is reported by a harvest that returns after the store,
    and the racing one may report its page early too (the kernel grants
    write access before the store lands; a store that finds the page
    protected again faults again): under concurrent writes a page can show
    up in two harvests, never in none.
    Writes before ``start()`` are not reported; pages unmapped while
    tracked are dropped from the reports.

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
        # Serializes start, harvests and stop: the C scan writes the spill and
        # reads the pagemap fd without the GIL, so stop() must wait for it.
        self._lock = threading.Lock()
        self._harvest: Any = None
        self._spill: Any = None
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
        with self._lock:
            self._start()

    def _start(self) -> None:
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
            self._probe()
            self._alloc()
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
        with self._lock:
            self._stop()

    def _stop(self) -> None:
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

    def collect(self) -> DirtyRanges:
        """The ranges written since ``start()`` or the last harvest, as a new ``DirtyRanges``.

        Sorted by address, adjacent pages merged into one range. The same
        PAGEMAP_SCAN ioctl that reports a page write-protects it again, so a
        write between two calls is reported once (see the class docstring
        for writes racing with the call). Empty (``== []``) when nothing was
        written. Releases the GIL while scanning; allocates only the result's
        array, at its exact size (grown once per 65,536 ranges);
        ``collect_into`` reuses one.

        Raises:
            ValueError: the tracker is not started, or stopped.
            ProcessGoneError: the process ``pid`` has exited (or exec'd).
            NoMappingError: part of the range is no longer registered for
                async write-protect (unmapped and mapped again, unregistered).
            UnsupportedError: the kernel has no PAGEMAP_SCAN (Linux < 6.7).
            UffdError: the scan failed otherwise.
        """
        out = DirtyRanges()
        with self._lock:
            self._check_started("collect")
            self._fill(out)
        return out

    def collect_into(self, out: DirtyRanges) -> DirtyRanges:
        """Like ``collect()``, but into ``out``'s storage, replacing its ranges; returns ``out``.

        ``out.array`` stays the same array object: it is written in place,
        grown only when this harvest has more ranges than ``out`` held, and
        shortened to the ranges found. Start with ``DirtyRanges()`` or any
        earlier harvest.

        Calling context: as ``collect()``; nothing may read ``out`` meanwhile.

        Raises:
            TypeError: ``out`` is not a DirtyRanges.
            ValueError: the tracker is not started or stopped, or
                ``out.array`` is exported (a memoryview or numpy array of it
                is alive): release that first, nothing was harvested.
            ProcessGoneError, NoMappingError, UnsupportedError, UffdError:
                as ``collect()``; ``out`` then holds the ranges harvested
                before the failure (they are write-protected again already).
        """
        if not isinstance(out, DirtyRanges):
            raise TypeError(
                f"DirtyTracker.collect_into: out must be a DirtyRanges, not {type(out).__name__}"
            )
        words = out.array
        try:
            # Resizing is refused while the array is exported: find out before
            # the scan write-protects pages that could then not be stored.
            words.append(0)
        except BufferError:
            raise ValueError(
                "DirtyTracker.collect_into: out.array is exported (a memoryview or buffer of it "
                "is alive), so it cannot be resized: release it first"
            ) from None
        words.pop()
        with self._lock:
            self._check_started("collect_into")
            self._fill(out)
        return out

    # -- internals -------------------------------------------------------

    def _check_started(self, what: str) -> None:
        if self._harvest is None:
            raise ValueError(f"DirtyTracker.{what}: the tracker is {_STATES[self._state]}")

    def _fill(self, out: DirtyRanges) -> None:
        """Harvest into ``out``'s array: in place while it has room, then through the spill."""
        h = self._harvest
        h.pos, h.ranges, h.bytes = self._addr, 0, 0
        words = out.array
        cap = len(words) // 2
        try:
            while True:
                with ffi.from_buffer("uint64_t[]", words, require_writable=True) as pairs:
                    rc = lib.pyuffd_dirty_harvest(self._pagemap, h, pairs, cap)
                if h.ranges > cap:
                    del words[2 * cap :]  # an odd length (appended to by hand) stays aligned
                    words.frombytes(ffi.buffer(self._spill, (h.ranges - cap) * _PAIR))
                    cap = h.ranges
                if rc == 1:
                    break
                if rc != 0:
                    self._raise_scan(rc)
        finally:
            # Whatever happened, out holds exactly what was harvested.
            del words[2 * h.ranges :]
            out._bytes = h.bytes
        if self._pid is not None:
            self._check_alive()

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
        # No more ranges than every other page of the range can be written.
        spill = min(_SPILL_RANGES, self._length // PAGE_SIZE // 2 + 1)
        self._spill = ffi.new("uint64_t[]", 2 * spill)
        self._harvest = ffi.new(
            "struct pyuffd_harvest *",
            {"end": self._end, "spill": self._spill, "spill_cap": spill},
        )

    def _probe(self) -> None:
        """Is there PAGEMAP_SCAN, and does the pagemap's process see our registration?

        A read-only scan of the first page for PAGE_IS_WPALLOWED: it finds the
        page only if the mm behind the pagemap has it registered for async
        write-protect, which fails when ``uffd`` came from another process
        than ``pid`` (UFFDIO_REGISTER acted on that other mm).
        """
        region = ffi.new("struct page_region *")
        arg = ffi.new("struct pm_scan_arg *")
        arg.start = self._addr
        arg.end = self._addr + self._page_size
        arg.vec = int(ffi.cast("uintptr_t", region))
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
        if rc == lib.PYUFFD_HARVEST_STALLED:
            raise UffdError(
                _errno.EIO,
                f"PAGEMAP_SCAN on {where} made no progress at {self._harvest.pos:#x}; please "
                f"report this kernel ({os.uname().release})",
                op="PAGEMAP_SCAN",
                addr=self._addr,
                length=self._length,
            )
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
        self._harvest = self._spill = None
        fd, self._pagemap = self._pagemap, -1
        if fd >= 0:
            os.close(fd)
        if self._owns_uffd and self._uffd is not None:
            ufd, self._uffd, self._owns_uffd = self._uffd, None, False
            ufd.close()
