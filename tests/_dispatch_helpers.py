"""Helpers for the FaultHandler / UffdOps / modules tests (test_ops, test_handler*, ...).

What conftest.py does not have: page patterns and page-by-page checks, the
VmFlags of a mapping (to prove the kernel was never asked), readers that
fault every page from several threads at once, a bounded
``os.fork()`` whose child reports through a pipe, bounded polling, and
``stop_raises`` (stop a handler, assert what it re-raises).

Every wait here is bounded by ``conftest.WAIT`` (or the caller's timeout).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT, run_in_thread

import uffd

__all__ = [
    "ChildError",
    "assert_pages",
    "child_copies",
    "fork_child",
    "page_pattern",
    "pattern_buffer",
    "read_concurrently",
    "run_all",
    "stop_raises",
    "uffd_vmflags",
    "wait_for",
    "zeros",
]


def page_pattern(index: int, size: int, salt: int = 0x5A) -> bytes:
    """``size`` bytes naming page ``index`` and ``salt``: never all zeros, distinct per page."""
    return struct.pack("=QQ", 0xC0DE0000 + index, salt) * (size // 16)


def pattern_buffer(pages: int, size: int, salt: int = 0x5A) -> bytearray:
    """``pages`` consecutive ``page_pattern`` pages."""
    return bytearray(b"".join(page_pattern(i, size, salt) for i in range(pages)))


def assert_pages(
    data: bytes, page_size: int, expect: Callable[[int], bytes], what: str = ""
) -> None:
    """Check ``data`` page by page against ``expect(page_index)``; the message names the page."""
    assert len(data) % page_size == 0, f"{what}: {len(data)} bytes is not whole pages"
    for i in range(len(data) // page_size):
        got = data[i * page_size : (i + 1) * page_size]
        want = expect(i)
        if got != want:
            first = next(k for k in range(page_size) if got[k] != want[k])
            pytest.fail(
                f"{what}: page {i} differs at byte {first}: got {got[first : first + 16].hex()}, "
                f"want {want[first : first + 16].hex()}"
            )


def zeros(page_size: int) -> Callable[[int], bytes]:
    """``expect`` for assert_pages: every page zero."""
    page = bytes(page_size)
    return lambda _i: page


def uffd_vmflags(addr: int) -> set[str]:
    """The userfaultfd VmFlags ("um", "uw", "ui") of the mapping holding ``addr`` (smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split(None, 1)[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= addr < end
        elif inside and line.startswith("VmFlags:"):
            return {f for f in line.split()[1:] if f in ("um", "uw", "ui")}
    raise LookupError(f"no mapping holds {addr:#x}")


def wait_for(pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``pred`` until it is truthy (returns it), failing after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def run_all(fns: Iterable[Callable[[], Any]], timeout: float = WAIT) -> list[Any]:
    """Run each callable in its own helper thread at once; join (bounded) and return the results."""
    threads = [run_in_thread(fn) for fn in fns]
    return [t.finish(timeout) for t in threads]


def read_concurrently(region: uffd.mem.Region, nthreads: int = 4, timeout: float = WAIT) -> bytes:
    """Read every page of ``region`` with ``Region.read``: page i from thread i % nthreads, at once.

    Returns the region's bytes in order. Each read releases the GIL, so the
    handler thread serves the faults while all threads wait on them.
    """
    ps = region.page_size
    pages = region.length // ps
    barrier = threading.Barrier(nthreads, timeout=timeout)

    def reader(k: int) -> dict[int, bytes]:
        barrier.wait()
        return {i: region.read(i * ps, ps) for i in range(k, pages, nthreads)}

    got: dict[int, bytes] = {}
    for part in run_all([lambda k=k: reader(k) for k in range(nthreads)], timeout):
        got.update(part)
    return b"".join(got[i] for i in range(pages))


def child_copies(handler: uffd.FaultHandler, region: uffd.mem.Region) -> list[uffd.Mapping]:
    """The mappings a FORK event copied from ``region``'s range onto a child's fd."""
    span = (region.addr, region.addr + region.length)
    return [m for m in handler.mappings if m._uffd is not handler.uffd and (m.start, m.end) == span]


def stop_raises(
    handler: uffd.FaultHandler, exc_type: type[BaseException], *substrings: str
) -> BaseException:
    """``handler.stop()`` must raise ``exc_type`` whose message holds every substring."""
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        handler.stop()
    assert time.monotonic() - t0 < WAIT, "stop() took too long"
    message = str(info.value)
    for part in substrings:
        assert part in message, f"{part!r} not in {message!r}"
    return info.value


class ChildError(AssertionError):
    """The forked child failed; the message holds what it reported."""


def fork_child(fn: Callable[[], bytes], timeout: float = WAIT) -> bytes:
    """``os.fork()``; the child runs ``fn()``, writes its bytes to a pipe and ``os._exit``s.

    Returns those bytes in the parent. The child is bounded by ``alarm``; the
    parent waits at most ``timeout`` for its report and its exit, then kills
    it. The fork itself blocks until a FaultHandler with EVENT_FORK reads the
    FORK event (its C pump does so without the GIL).
    """
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        # A multi-threaded fork is what is under test; the child only runs fn.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            signal.alarm(int(timeout * 2) + 1)
            os.close(rfd)
            try:
                out = b"K" + fn()
            except BaseException as err:
                out, code = b"E" + repr(err).encode(), 1
            view = memoryview(struct.pack("=Q", len(out)) + out)
            while view:
                view = view[os.write(wfd, view) :]
        finally:
            os._exit(code)
    os.close(wfd)
    chunks: list[bytes] = []
    end = time.monotonic() + timeout
    try:
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                raise ChildError(f"child {pid} sent nothing for {timeout} s")
            chunk = os.read(rfd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(rfd)
        _reap(pid, end)
    blob = b"".join(chunks)
    (n,) = struct.unpack_from("=Q", blob)
    out = blob[8 : 8 + n]
    if len(out) != n or out[:1] != b"K":
        raise ChildError(f"child {pid} failed: {out[1:].decode(errors='replace')}")
    return out[1:]


def _reap(pid: int, end: float) -> None:
    while time.monotonic() < end + 1:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise ChildError(f"child {pid} did not exit; killed")
