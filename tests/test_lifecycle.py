"""Lifecycle: calls racing stop(), forks while events are read, handlers that misbehave.

Each test here failed before the fix it guards (issue 10 lists the defects).
The scenarios that could corrupt the heap or block threads forever when they
regress run in a process of their own (tests/helpers/lifecycle_scenarios.py),
bounded by a timeout; the rest bound every wait themselves.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from _dispatch_helpers import page_pattern, wait_for
from conftest import HPAGE, WAIT, Helper, requires, run_in_thread, wait_readable
from helpers.lifecycle_scenarios import Deferring

import uffd
from uffd import FaultHandler, Feature, Mode, Resolution, UffdOps, mem
from uffd._pump import Pump
from uffd.modules import FileOps, NativeSource

PS = mem.PAGE_SIZE
HELPERS = Path(__file__).resolve().parent / "helpers"
SCENARIO_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def fork_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/helpers/lifecycle_fork.c built as a shared library (skips without a compiler)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH to build lifecycle_fork.c")
    so = tmp_path_factory.mktemp("lifecycle") / "lifecycle_fork.so"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(so),
         str(HELPERS / "lifecycle_fork.c")],
        check=True,
        timeout=60,
    )  # fmt: skip
    return str(so)


def scenario(fork_lib: str, name: str, arg: int) -> str:
    """Run a lifecycle scenario in its own process (bounded); its last line of output."""
    try:
        done = subprocess.run(
            [sys.executable, str(HELPERS / "lifecycle_scenarios.py"), fork_lib, name, str(arg)],
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        last = out.strip().splitlines()[-1:] or ["before the first round"]
        pytest.fail(f"{name} hung for {SCENARIO_TIMEOUT:.0f} s, at {last[0]}")
    assert done.returncode == 0, f"{name} failed ({done.returncode}): {done.stderr[-2000:]}"
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else "(no output)"


# -- 1, 2: calls racing stop(); forks while a thread reads events ---------------------


def test_install_wake_resolve_racing_stop(fork_lib: str) -> None:
    """install/wake/resolve from three threads while stop() runs: each completes or says stopped."""
    result = scenario(fork_lib, "stop_race", 300)
    assert result.startswith("ok"), result
    print(result)


@requires(Feature.EVENT_FORK)
def test_c_fork_loop_while_a_thread_reads_events(fork_lib: str) -> None:
    """25 C-level forks with EVENT_FORK while read_events polls: no fork waits on the reader."""
    result = scenario(fork_lib, "fork_loop", 25)
    assert result.startswith("ok"), result
    print(result)


@requires(Feature.EVENT_FORK, Feature.PAGEFAULT_FLAG_WP)
@pytest.mark.parametrize("with_event", [0, 1], ids=["no-event", "event"])
def test_kernel_wp_fork(fork_lib: str, with_event: int) -> None:
    """The kernel's wp-fork case: the uffd-wp bit is inherited exactly when EVENT_FORK is on."""
    result = scenario(fork_lib, "wp_fork", with_event)
    assert result.startswith("ok"), result
    print(result)


@requires(Feature.EVENT_FORK, Feature.EVENT_REMAP, Feature.EVENT_REMOVE, Feature.PAGEFAULT_FLAG_WP)
@pytest.mark.parametrize("wp", [0, 1], ids=["missing", "missing+wp"])
def test_kernel_events(fork_lib: str, wp: int) -> None:
    """The kernel's events case: fork, faults, mremap and DONTNEED in a child, all served."""
    result = scenario(fork_lib, "events", wp)
    assert result.startswith("ok"), result
    print(result)


# -- 3, 4, 5: stop() from a handler, with a forked child holding the fd; BaseException -----


class Zero(UffdOps):
    """Zero-fills; ``before`` runs first (stopping the handler, raising) for the first faults."""

    def __init__(self, before: Callable[[uffd.Fault], None] | None = None, times: int = 1):
        self.before, self.times, self.seen = before, times, 0

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        self.seen += 1
        if self.before is not None and self.seen <= self.times:
            self.before(fault)
        return Resolution.zero()


def timed_read(region: mem.Region, offset: int) -> tuple[bytes, float]:
    """Read 8 bytes at ``offset`` from a helper thread (bounded); (data, seconds it took)."""
    t0 = time.monotonic()
    data = run_in_thread(region.read, offset, 8).finish()
    return data, time.monotonic() - t0


def test_stop_from_inside_a_handler() -> None:
    """stop() in a handler returns; the dispatch thread finishes: fds closed, no fault hangs."""
    region = mem.anon(4 * PS)
    handler = FaultHandler(fallback="zero", deadline=WAIT)
    handler.register(region, Mode.MISSING, Zero(lambda fault: handler.stop()))
    handler.start()
    assert timed_read(region, 0)[0] == bytes(8)
    wait_for(lambda: handler.uffd.closed, "the dispatch thread to finish the stop")
    data, took = timed_read(region, PS)  # unregistered by the stop: plain memory
    assert data == bytes(8) and took < 1.0
    handler.stop()  # the outer stop: nothing left to do, nothing raised
    assert handler.stats.total.faults == {"missing": 1}  # the stop's own fault, nothing after
    region.close()


def test_stop_with_a_forked_child_holding_the_fd() -> None:
    """stop() while a child (forked without EVENT_FORK) keeps a copy of the fd: no fault waits."""
    region = mem.anon(2 * PS)
    handler = FaultHandler(fallback="zero", deadline=WAIT).start()
    handler.register(region, Mode.MISSING)
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a threaded fork, on purpose
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the fd until the parent is done
        signal.alarm(int(WAIT * 2))
        os.read(rfd, 1)
        os._exit(0)
    try:
        handler.stop()
        data, took = timed_read(region, 0)
        assert data == bytes(8)
        assert took < 1.0, f"a fault after stop() waited {took:.1f} s for the child"
    finally:
        os.write(wfd, b"x")
        os.waitpid(pid, 0)
        os.close(rfd)
        os.close(wfd)
        region.close()


@pytest.mark.parametrize("error", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_handler_raising_base_exception(error: type[BaseException]) -> None:
    """A handler raising a BaseException: the fault takes the fallback, the thread serves on,
    stop() re-raises it."""
    region = mem.anon(2 * PS)
    handler = FaultHandler(fallback="zero", deadline=WAIT).start()

    def boom(fault: uffd.Fault) -> None:
        raise error("from the handler")

    handler.register(region, Mode.MISSING, Zero(boom))
    assert timed_read(region, 0)[0] == bytes(8)
    data, took = timed_read(region, PS)  # served by the handler, not the deadline
    assert data == bytes(8) and took < 1.0
    want = {"fallback-zero": 1, "zero": 1}  # counted just after the thread is woken
    wait_for(lambda: handler.stats.total.resolutions == want, "both faults counted")
    with pytest.raises(error, match="from the handler"):
        handler.stop()
    region.close()


# -- 6: argument holes --------------------------------------------------------------


@pytest.mark.parametrize("size", [3 * PS, 2 * PS, HPAGE])
def test_register_refuses_a_page_size_not_the_memorys(size: int) -> None:
    """register(page_size=...) must be the memory's own page size, else ValueError."""
    region = mem.anon(12 * PS)
    with FaultHandler() as handler, pytest.raises(ValueError, match="not a page size"):
        handler.register((region.addr, region.length), page_size=size)
    region.close()


@pytest.mark.parametrize("deadline", [1e-10, 1e-6, 0.0009])
def test_deadline_below_a_millisecond_refused(deadline: float) -> None:
    """A deadline the watchdog cannot honour (under 1 ms) is a ValueError, not silent fallbacks."""
    with pytest.raises(ValueError, match=r"deadline must be seconds from 0\.001"):
        FaultHandler(deadline=deadline)


# -- 7, 8: FileOps closed while registered; a stale entry after Region.close() --------


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_fileops_closed_while_registered(tmp_path: Path, native: bool) -> None:
    """FileOps.close() with a mapping registered: never another file's bytes.

    The pump reads its own copy of the fd; the Python path reports the closed
    ops and the fault takes the fallback (zeros), even after the number is reused.
    """
    source = tmp_path / "source"
    source.write_bytes(page_pattern(0, PS) + page_pattern(1, PS))
    other = tmp_path / "other"
    other.write_bytes(b"\xee" * 2 * PS)
    ops = FileOps(source, native=native)
    region = mem.anon(2 * PS)
    handler = FaultHandler(fallback="zero", deadline=WAIT).start()
    handler.register(region, Mode.MISSING, ops)
    number = ops._fd
    ops.close()
    reuse = os.open(other, os.O_RDONLY)
    try:
        assert reuse == number  # the number now names another file
        got = run_in_thread(region.read, 0, 2 * PS).finish()
    finally:
        os.close(reuse)
    if native:
        assert got == page_pattern(0, PS) + page_pattern(1, PS)
        handler.stop()
    else:
        assert got == bytes(2 * PS)
        with pytest.raises(uffd.UffdError, match="was closed while"):
            handler.stop()
    region.close()


def test_register_again_after_region_close_without_unmap_event() -> None:
    """A range unmapped (Region.close) and mapped anew registers again without EVENT_UNMAP."""
    with FaultHandler(fallback="zero") as handler:
        first = mem.anon(4 * PS)
        handler.register(first)
        addr = first.addr
        first.close()
        second = mem.Region(addr, 4 * PS, PS, "anon", None, False)
        mapped = uffd_mmap_fixed(addr, 4 * PS)
        assert mapped == addr
        handler.register(second)
        assert run_in_thread(second.read, 0, 8).finish() == bytes(8)
        assert [(m.start, m.end) for m in handler.mappings] == [(addr, addr + 4 * PS)]
        # A range still registered is a real overlap.
        with pytest.raises(ValueError, match="overlaps"):
            handler.register((addr, PS))
    second.close()


def uffd_mmap_fixed(addr: int, length: int) -> int:
    """mmap anonymous memory at exactly ``addr`` (MAP_FIXED); the address mapped."""
    from uffd._native import ffi, lib

    got = lib.mmap(
        ffi.cast("void *", addr), length, lib.PROT_READ | lib.PROT_WRITE,
        lib.MAP_PRIVATE | lib.MAP_ANONYMOUS | lib.MAP_FIXED, -1, 0,
    )  # fmt: skip
    return int(ffi.cast("uintptr_t", got))


# -- 9: ZEROPAGE on hugetlb ------------------------------------------------------------


def test_zeropage_on_hugetlb_is_unsupported(
    uffd_factory: Callable[..., uffd.Userfaultfd], hugetlb_pages: int
) -> None:
    """UFFDIO_ZEROPAGE on a hugetlb range raises UnsupportedError (errno EINVAL): never granted."""
    region = mem.hugetlb(hugetlb_pages)
    try:
        ufd = uffd_factory(Feature.MISSING_HUGETLBFS)
        granted = ufd.register(region.addr, region.length, Mode.MISSING)
        assert not granted & uffd.Ioctl.ZEROPAGE
        with pytest.raises(uffd.UnsupportedError, match="hugetlb") as info:
            ufd.zeropage(region.addr, region.length)
        assert info.value.errno == errno.EINVAL
    finally:
        region.close()


# -- 10: the C pump --------------------------------------------------------------------


def test_pump_remove_fd_frees_its_pending_slots() -> None:
    """remove_fd forgets the fd's pending faults: no fallback can later act on a reused number."""
    region = mem.anon(PS)
    ufd = uffd.Userfaultfd()
    ufd.register(region.addr, PS, Mode.MISSING)
    pump = Pump(int(WAIT * 1e9), 0)
    try:
        with pump.held():
            pump.add_fd(ufd.fileno())
            pump.map(ufd.fileno(), region.addr, region.addr + PS, PS, "zeropage", None, 0)
            reader = run_in_thread(region.read, 0, 8)
            (item,) = pump.wait(pump.buffer(4), int(WAIT * 1000))
            slot = item[1]
            pump.remove_fd(ufd.fileno())
            assert pump.fallback(slot) == -errno.ETIME  # nothing pending under that slot
            assert pump.drain() == 0
        ufd.close()  # releases the reader: the range goes with the fd
        assert reader.finish() == bytes(8)
    finally:
        pump.close(lambda: None)
        region.close()


class KmsgSource(UffdOps):
    """Pages from /dev/kmsg read at its end: the pump's pread blocks until the kernel logs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def native_source(self, mapping: uffd.Mapping) -> NativeSource:
        return NativeSource("file", fd=self.fd, max_run=PS)

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.zero()


def test_slow_file_source_does_not_stall_the_watchdog() -> None:
    """A native pread that blocks (a slow disk) leaves the watchdog free: other deadlines hold."""
    if os.geteuid() != 0 or not os.access("/dev/kmsg", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kmsg read and write (root) for a pread that blocks")
    kmsg = os.open("/dev/kmsg", os.O_RDONLY)
    os.lseek(kmsg, 0, os.SEEK_END)
    slow, waiting = mem.anon(PS), mem.anon(PS)
    deferring = Deferring()
    deadline = 0.3
    handler = FaultHandler(fallback="zero", deadline=deadline).start()
    try:
        handler.register(waiting, Mode.MISSING, deferring)
        handler.register(slow, Mode.MISSING, KmsgSource(kmsg))
        t0 = time.monotonic()
        other = run_in_thread(waiting.read, 0, 8)
        wait_for(lambda: deferring.faults, "the deferred fault")
        blocked = run_in_thread(slow.read, 0, 8)  # the pump preads /dev/kmsg: it blocks
        assert other.finish() == bytes(8)  # the watchdog's fallback, at the deadline
        assert time.monotonic() - t0 < deadline + 2.0
    finally:
        with open("/dev/kmsg", "w") as log:
            log.write("pyuffd test_lifecycle: releasing a pread on /dev/kmsg\n")
    assert len(blocked.finish()) == 8  # released by the log line (its first bytes)
    with pytest.raises(uffd.DeadlineExceededError):
        handler.stop()
    os.close(kmsg)
    slow.close()
    waiting.close()


class Pattern(UffdOps):
    """Serves every MISSING fault with one known page (0xA5) from Python."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.copy(b"\xa5" * PS)


def _paused_fault(handler: FaultHandler) -> tuple[mem.Region, uffd.Userfaultfd, Helper]:
    """An fd registered outside the handler, adopted paused by the running handler, and a
    thread faulting on it whose fault is pending in the kernel (bounded wait)."""
    region = mem.anon(PS)
    ufd = uffd.Userfaultfd()
    ufd.register(region.addr, PS, Mode.MISSING)
    handler._adopt_paused(ufd)
    reader = run_in_thread(region.read, 0, 8)
    assert wait_readable(ufd), "the fault never reached the adopted fd"
    return region, ufd, reader


def test_a_paused_adopted_fd_is_read_only_after_resume() -> None:
    """A started handler reads no fault of an fd adopted paused (it stays pending in the
    kernel, the thread waiting) until _resume, and then serves it by the mapping."""
    handler = FaultHandler(fallback="zero", deadline=0.05).start()
    region, ufd, reader = _paused_fault(handler)
    try:
        time.sleep(0.3)  # six deadlines: neither the dispatch thread nor the watchdog reads
        assert wait_readable(ufd, 0.0), "the paused fd's fault was read"
        assert reader.is_alive()
        handler.register(
            (region.addr, PS), Mode.MISSING, Pattern(), uffd=ufd, registered=True, kind="anon"
        )
        handler._resume(ufd)
        assert reader.finish() == b"\xa5" * 8
        assert sum(handler.stats.total.resolutions.values()) == 1
    finally:
        handler.stop()
        region.close()


def test_stop_resolves_a_fault_pending_on_a_paused_fd() -> None:
    """stop() with an adopted fd never resumed resolves its pending fault by the fallback,
    even while a copy of the fd stays open (closing it then releases nothing), and closes it."""
    handler = FaultHandler(fallback="zero", deadline=WAIT).start()
    region, ufd, reader = _paused_fault(handler)
    copy = os.dup(ufd.fileno())  # as a VMM keeps its own: the kernel keeps the range registered
    try:
        started = time.monotonic()
        handler.stop()
        assert reader.finish() == bytes(8)
        assert time.monotonic() - started < WAIT
        assert ufd.closed
    finally:
        os.close(copy)
        region.close()
