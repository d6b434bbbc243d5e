"""The usual hand-rolled Python userfaultfd handler, as a baseline.

This is what a user writes without pyuffd: ``userfaultfd(2)`` through
``ctypes`` (syscall 323 on x86_64), ioctl_userfaultfd(2) requests through
``fcntl.ioctl`` on ``struct.pack``-ed structs, and a Python thread doing
``os.read(fd, 32)`` in a loop with one UFFDIO_COPY per fault from a
``bytes``-like source.  It runs the ``random``, ``sequential`` and ``threads``
workloads of ``csrc/bench/ref_handler.c`` and returns a report of the same
shape as :func:`uffd.bench.reference.run_reference`.

The touching happens in ``libtouch.so`` (``csrc/bench/touch.c``) through
``ctypes.CDLL``, which releases the GIL: a Python thread touching the
registered memory would fault with the GIL held and the handler thread could
never run.  For the same reason this module never reads registered memory
from Python until every page has been filled.

x86_64 only (the syscall number and ioctl encoding are hard-coded, as a
hand-rolled handler would have them).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import random
import statistics
import struct
import threading
import time
from array import array
from pathlib import Path
from typing import Any

from uffd.bench.reference import default_build_dir, touch_library

__all__ = ["NAIVE_WORKLOADS", "run_naive"]

NAIVE_WORKLOADS = ("random", "sequential", "threads")

_NR_USERFAULTFD = 323
_UFFD_API = 0xAA
_UFFD_EVENT_PAGEFAULT = 0x12
_UFFDIO_REGISTER_MODE_MISSING = 1


def _ioc(direction: int, nr: int, size: int) -> int:
    """Encode an ioctl number for the userfaultfd magic 0xAA (asm-generic/ioctl.h)."""
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_UFFDIO_API = _ioc(3, 0x3F, 24)
_UFFDIO_REGISTER = _ioc(3, 0x00, 32)
_UFFDIO_WAKE = _ioc(2, 0x02, 16)
_UFFDIO_COPY = _ioc(3, 0x03, 40)
_UFFDIO_ZEROPAGE = _ioc(3, 0x04, 32)

_PROT_RW = 0x1 | 0x2
_MAP_PRIVATE_ANON = 0x02 | 0x20
_MAP_FAILED = ctypes.c_void_p(-1).value

_PAGE = os.sysconf("SC_PAGE_SIZE")
_VERIFY_SAMPLES = 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

_touch_libs: dict[Path, ctypes.CDLL] = {}


def _libtouch(build_dir: Path) -> ctypes.CDLL:
    """Build if stale and load ``libtouch.so``, once per path."""
    path = touch_library(build_dir).resolve()
    lib = _touch_libs.get(path)
    if lib is None:
        lib = ctypes.CDLL(str(path))
        u64p = ctypes.POINTER(ctypes.c_uint64)
        lib.touch_pages.restype = ctypes.c_int
        lib.touch_pages.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int,
            u64p,
        ]
        lib.touch_range.restype = ctypes.c_int
        lib.touch_range.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            u64p,
        ]
        _touch_libs[path] = lib
    return lib


def _pattern(i: int) -> int:
    """Return the byte every page i of the source holds (as in ref_handler.c)."""
    return 1 + i % 251


def _check(rc: int, what: str) -> None:
    """Raise OSError for a libtouch return code (0 or -errno)."""
    if rc:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


class _Handler:
    """The handler thread: blocking os.read of one uffd_msg, one UFFDIO_COPY per fault.

    Owns the userfaultfd: it closes it when it stops.  If it fails, closing
    the fd releases every thread blocked on a fault (they get zero pages), so
    the toucher returns instead of hanging; the caller re-raises ``error``.
    """

    def __init__(self, fd: int, base: int, src_addr: int, stop_page: int, cpu: int) -> None:
        self.fd = fd
        self.base = base
        self.src_addr = src_addr
        self.stop_page = stop_page
        self.cpu = cpu
        self.faults = 0
        self.cpu_ns = 0  # the thread's CPU time over its whole life, taken as it stops
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="naive-uffd-handler", daemon=True)

    def _run(self) -> None:
        try:
            if self.cpu >= 0:
                # On Linux this pins the calling thread only.
                os.sched_setaffinity(0, {self.cpu})
            self._serve()
        except BaseException as exc:
            self.error = exc
        finally:
            os.close(self.fd)

    def _serve(self) -> None:
        copy = bytearray(40)
        while True:
            msg = os.read(self.fd, 32)
            if msg[0] != _UFFD_EVENT_PAGEFAULT:
                raise RuntimeError(f"unexpected userfaultfd event {msg[0]:#x}")
            (address,) = struct.unpack_from("Q", msg, 16)
            page = address & ~(_PAGE - 1)
            if page == self.stop_page:
                fcntl.ioctl(self.fd, _UFFDIO_ZEROPAGE, struct.pack("QQQq", page, _PAGE, 0, 0))
                self.cpu_ns = time.thread_time_ns()
                return
            struct.pack_into(
                "QQQQq", copy, 0, page, self.src_addr + (page - self.base), _PAGE, 0, 0
            )
            try:
                fcntl.ioctl(self.fd, _UFFDIO_COPY, copy)
            except OSError as err:
                if err.errno != errno.EEXIST:
                    raise
                # Filled already by an earlier message: wake the retrying thread.
                fcntl.ioctl(self.fd, _UFFDIO_WAKE, struct.pack("QQ", page, _PAGE))
            self.faults += 1


def _open_uffd(base: int, length: int) -> int:
    """Open a blocking userfaultfd, do the API handshake, register base..+length MISSING."""
    fd: int = _libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"userfaultfd(2): {os.strerror(err)}")
    try:
        fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("QQQ", _UFFD_API, 0, 0)))
        fcntl.ioctl(
            fd,
            _UFFDIO_REGISTER,
            bytearray(struct.pack("QQQQ", base, length, _UFFDIO_REGISTER_MODE_MISSING, 0)),
        )
    except OSError:
        os.close(fd)
        raise
    return fd


def _verify(base: int, pages: int, workload: str) -> None:
    """Compare a sample of pages in full with the source pattern."""
    samples = min(pages, _VERIFY_SAMPLES)
    for k in range(samples + 1):
        i = k * pages // samples if k < samples else pages - 1
        got = ctypes.string_at(base + i * _PAGE, _PAGE)
        want = bytes([_pattern(i)]) * _PAGE
        if got != want:
            b = next(j for j in range(_PAGE) if got[j] != want[j])
            raise RuntimeError(
                f"naive handler, {workload}: page {i} byte {b} is {got[b]:#x}, want {want[b]:#x}"
            )


def _touch(
    lib: ctypes.CDLL, workload: str, addr: int, pages: int, threads: int, cpu: int, seed: int
) -> tuple[int, int, array[int] | None]:
    """Touch ``pages`` pages at ``addr`` in libtouch the way ``workload`` does.

    Returns libtouch's rc, the elapsed ns and, for ``random`` (shuffled with
    ``seed``), each fault's ns; shared with :mod:`uffd.bench.workloads`.
    """
    elapsed = ctypes.c_uint64()
    if workload == "random":
        perm = list(range(pages))
        random.Random(seed).shuffle(perm)
        order = array("Q", perm)
        fault_ns = array("Q", bytes(8 * pages))
        rc = lib.touch_pages(
            addr,
            pages,
            _PAGE,
            order.buffer_info()[0],
            fault_ns.buffer_info()[0],
            cpu,
            ctypes.byref(elapsed),
        )
        return rc, elapsed.value, fault_ns
    rc = lib.touch_range(
        addr,
        pages,
        _PAGE,
        threads if workload == "threads" else 1,
        cpu,
        ctypes.byref(elapsed),
    )
    return rc, elapsed.value, None


def _figures(pages: int, elapsed_ns: int, fault_ns: array[int] | None) -> dict[str, float]:
    """The timing figures of one :func:`_touch` run (fault latencies when it has them)."""
    figures = {"pages_per_s": pages * 1e9 / elapsed_ns, "elapsed_ns": float(elapsed_ns)}
    if fault_ns is not None:
        ordered = sorted(fault_ns)
        figures["fault_ns_median"] = float(statistics.median(ordered))
        figures["fault_ns_p90"] = float(ordered[(pages * 9 - 1) // 10])
        figures["fault_ns_mean"] = sum(ordered) / pages
    return figures


def _run_once(
    lib: ctypes.CDLL,
    workload: str,
    pages: int,
    src_addr: int,
    threads: int,
    handler_cpu: int,
    toucher_cpu: int,
    seed: int,
) -> dict[str, float]:
    """One repeat: fresh memory and userfaultfd, the handler, the touchers, the check."""
    length = (pages + 1) * _PAGE
    base = _libc.mmap(None, length, _PROT_RW, _MAP_PRIVATE_ANON, -1, 0)
    if base in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap({length}): {os.strerror(err)}")
    try:
        # One extra page past the workload: touching it stops the handler.
        stop_page = base + pages * _PAGE
        handler = _Handler(_open_uffd(base, length), base, src_addr, stop_page, handler_cpu)
        handler.thread.start()
        rc, elapsed_ns, fault_ns = _touch(lib, workload, base, pages, threads, toucher_cpu, seed)
        # Through libtouch too: a fault taken with the GIL held would deadlock.
        stop = ctypes.c_uint64()
        stop_rc = lib.touch_pages(stop_page, 1, _PAGE, None, None, -1, ctypes.byref(stop))
        handler.thread.join()
        if handler.error is not None:
            raise RuntimeError(
                f"naive handler, {workload}: handler thread failed: {handler.error}"
            ) from handler.error
        _check(rc, f"libtouch ({workload})")
        _check(stop_rc, "libtouch (stop page)")
        _verify(base, pages, workload)
        figures = _figures(pages, elapsed_ns, fault_ns)
        figures["faults"] = handler.faults
        figures["handler_cpu_ns"] = float(handler.cpu_ns)
        figures["cpu_us_per_fault"] = handler.cpu_ns / 1e3 / max(1, handler.faults)
        return figures
    finally:
        _libc.munmap(base, length)


def run_naive(
    workload: str,
    pages: int,
    *,
    threads: int = 1,
    handler_cpu: int = -1,
    toucher_cpu: int = -1,
    repeat: int = 3,
    seed: int = 1,
    build_dir: Path | None = None,
) -> dict[str, Any]:
    """Run one workload with the hand-rolled ctypes handler; return a reference-shaped report.

    Runs on the calling thread plus one Python handler thread (pinned to
    handler_cpu from inside itself) and the C toucher thread(s) (pinned to
    toucher_cpu); -1 leaves a side unpinned.  The calling thread's own CPU
    affinity is unchanged afterwards.  The report has the keys of
    :func:`uffd.bench.reference.run_reference`: one list per figure and the
    medians under ``"median"``.  ``random`` shuffles with Python's
    ``random``, so its page order differs from the C reference's.

    Raises:
        ValueError: unknown workload, or threads != 1 for another workload.
        OSError: userfaultfd(2), an ioctl or mmap failed (errno kept).
        RuntimeError: the handler thread failed, the build failed, or a
            page's contents are wrong.
    """
    if workload not in NAIVE_WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(NAIVE_WORKLOADS)}")
    if threads != 1 and workload != "threads":
        raise ValueError(f"threads={threads} only applies to the 'threads' workload")
    if pages < 1 or repeat < 1 or threads < 1:
        raise ValueError("pages, repeat and threads must be at least 1")
    lib = _libtouch(build_dir if build_dir is not None else default_build_dir())
    source = bytearray(b"".join(bytes([_pattern(i)]) * _PAGE for i in range(pages)))
    source_view = (ctypes.c_char * len(source)).from_buffer(source)
    src_addr = ctypes.addressof(source_view)
    runs = [
        _run_once(lib, workload, pages, src_addr, threads, handler_cpu, toucher_cpu, seed + rep)
        for rep in range(repeat)
    ]
    report: dict[str, Any] = {
        "workload": workload,
        "pages": pages,
        "threads": threads,
        "handler_cpu": handler_cpu,
        "toucher_cpu": toucher_cpu,
        "repeat": repeat,
        "seed": seed,
        "page_size": _PAGE,
        "verified": True,
    }
    for name in runs[0]:
        report[name] = [run[name] for run in runs]
    report["median"] = {name: statistics.median(report[name]) for name in runs[0]}
    return report
