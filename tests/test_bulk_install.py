"""The bulk install loop (csrc/uffd_install.c) against a real userfaultfd, and installs through it.

``pyuffd_install_run`` copies a run in UFFDIO_COPY steps, skips pages already
present, stops with EAGAIN while the mappings change and with the kernel's
error when the range is gone, refuses what is not whole pages, and runs
without the GIL. ``Pump.install`` and ``FaultHandler.install`` go through it.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from _dispatch_helpers import page_pattern
from conftest import PAGE, WAIT, pagemap, read_one, requires, run_in_thread, wait_readable
from uffd._native import ffi, lib

import uffd
from uffd import FaultHandler, Feature, Mode, UffdError, mem
from uffd._pump import Pump
from uffd.restore.prefetch_thread import joined

STEP = 4 * PAGE
PM_PRESENT = 1 << 63


@pytest.fixture
def pump() -> Iterator[Pump]:
    """A fault pump that never waits: the install loop only takes its lock."""
    p = Pump(10**9, 0)
    yield p
    p.free_unused()


def image(pages: int, seed: int = 0) -> bytes:
    """``pages`` distinct pattern pages."""
    return b"".join(page_pattern(seed + i, PAGE) for i in range(pages))


def run(
    pump: Pump, fd: int, dst: int, src: bytes, length: int, *, step: int = STEP, seen: int = 0
) -> tuple[int, int, int]:
    """``pyuffd_install_run`` of ``src[:length]`` to ``dst``: (rc, installed, reached)."""
    installed = ffi.new("int64_t *")
    reached = ffi.new("uint64_t *")
    with ffi.from_buffer(src) as buf:
        rc = lib.pyuffd_install_run(
            pump._ptr, fd, dst, buf, length, step, PAGE, 0, seen, installed, reached
        )
    return rc, installed[0], reached[0]


Registered = Callable[..., tuple[uffd.Userfaultfd, mem.Region]]


@pytest.fixture
def registered(
    uffd_factory: Callable[..., uffd.Userfaultfd], region_factory: Callable[..., mem.Region]
) -> Registered:
    """``registered(pages, features=0)``: a userfaultfd and that many anonymous pages
    registered MISSING on it (both released at teardown)."""

    def make(pages: int, features: Feature | int = 0) -> tuple[uffd.Userfaultfd, mem.Region]:
        ufd = uffd_factory(features)
        region = region_factory("anon", pages=pages)
        ufd.register(region.addr, region.length, Mode.MISSING)
        return ufd, region

    return make


def present(region: mem.Region) -> list[bool]:
    """Which pages of the region are mapped (pagemap), without touching any."""
    return [
        bool(pagemap(region.addr + i * PAGE) & PM_PRESENT) for i in range(region.length // PAGE)
    ]


def test_run_installs_every_page_in_steps(pump: Pump, registered: Registered) -> None:
    """A run longer than its step (and not a multiple of it) lands whole, page for page."""
    ufd, region = registered(18)
    data = image(18)
    assert run(pump, ufd.fileno(), region.addr, data, len(data)) == (0, len(data), len(data))
    assert region.read(0, region.length) == data


def test_run_skips_pages_already_present_and_keeps_them(pump: Pump, registered: Registered) -> None:
    """Pages placed before the run (one mid-step, two across a step boundary, the last) are
    skipped (EEXIST), keep their contents, and are not counted as installed."""
    ufd, region = registered(16)
    placed = (2, 7, 8, 15)
    for i in placed:
        ufd.copy(region.addr + i * PAGE, b"P" * PAGE, PAGE)
    data = image(16)
    rc, installed, reached = run(pump, ufd.fileno(), region.addr, data, len(data))
    assert (rc, installed, reached) == (0, (16 - len(placed)) * PAGE, len(data))
    got = region.read(0, region.length)
    for i in range(16):
        want = b"P" * PAGE if i in placed else page_pattern(i, PAGE)
        assert got[i * PAGE : (i + 1) * PAGE] == want, f"page {i}"


def test_run_stops_at_an_unregistered_part(pump: Pump, registered: Registered) -> None:
    """After the tail is unregistered the run installs the steps before it and stops with
    ENOENT at the step reaching it (a copy must lie inside one registered range)."""
    ufd, region = registered(12)
    ufd.unregister(region.addr + 6 * PAGE, 6 * PAGE)
    data = image(12)
    assert run(pump, ufd.fileno(), region.addr, data, len(data)) == (
        -errno.ENOENT,
        STEP,
        STEP,
    )
    assert present(region)[:6] == [True] * 4 + [False] * 2
    assert region.read(0, STEP) == data[:STEP]
    assert region.read(6 * PAGE, 6 * PAGE) == bytes(6 * PAGE)  # never copied: plain zero fill


def test_run_stops_at_an_unmapped_part(pump: Pump, registered: Registered) -> None:
    """After the tail is unmapped the run installs up to the hole and stops with ENOENT."""
    ufd, region = registered(12)
    assert lib.munmap(ffi.cast("void *", region.addr + 8 * PAGE), 4 * PAGE) == 0
    data = image(12)
    assert run(pump, ufd.fileno(), region.addr, data, len(data)) == (
        -errno.ENOENT,
        8 * PAGE,
        8 * PAGE,
    )
    assert region.read(0, 8 * PAGE) == data[: 8 * PAGE]


@requires(Feature.EVENT_REMOVE)
def test_run_stops_with_eagain_while_the_mappings_change(
    pump: Pump, registered: Registered
) -> None:
    """EAGAIN, nothing installed, while a REMOVE event is unread (the kernel's mmap_changing)
    or when the pump has read an event the caller has not applied (events_seen behind)."""
    ufd, region = registered(8, Feature.EVENT_REMOVE)
    data = image(8)
    assert run(pump, ufd.fileno(), region.addr, data, len(data), seen=1) == (-errno.EAGAIN, 0, 0)
    # MADV_DONTNEED blocks in the kernel until the REMOVE event is read.
    remover = run_in_thread(region.madvise, lib.MADV_DONTNEED, 0, region.length)
    assert wait_readable(ufd), "madvise(DONTNEED) raised no REMOVE event"
    assert run(pump, ufd.fileno(), region.addr, data, len(data)) == (-errno.EAGAIN, 0, 0)
    assert read_one(ufd) == uffd.Remove(region.addr, region.addr + region.length)
    remover.finish()
    assert present(region) == [False] * 8
    # Once the event is read, the same run goes through.
    assert run(pump, ufd.fileno(), region.addr, data, len(data)) == (0, len(data), len(data))


def test_run_refuses_what_is_not_whole_pages(pump: Pump, registered: Registered) -> None:
    """A length, destination or step that is not whole pages is EINVAL before any copy."""
    ufd, region = registered(4)
    data = image(4)
    fd = ufd.fileno()
    assert run(pump, fd, region.addr, data, 3 * PAGE + 100) == (-errno.EINVAL, 0, 0)
    assert run(pump, fd, region.addr + 100, data, 2 * PAGE) == (-errno.EINVAL, 0, 0)
    assert run(pump, fd, region.addr, data, 2 * PAGE, step=PAGE + 1) == (-errno.EINVAL, 0, 0)
    assert run(pump, fd, region.addr, data, 2 * PAGE, step=0) == (-errno.EINVAL, 0, 0)
    assert present(region) == [False] * 4


def test_install_of_a_partial_page_is_a_clear_error(
    region_factory: Callable[..., mem.Region],
) -> None:
    """FaultHandler.install of bytes that are not whole pages says so and installs nothing."""
    region = region_factory("anon", pages=4)
    with FaultHandler() as handler:
        mapping = handler.register(region, Mode.MISSING, uffd.AnonOps())
        with pytest.raises(ValueError, match="not whole pages"):
            handler.install(mapping, 0, b"x" * (PAGE + 1))
        assert present(region) == [False] * 4


def test_run_on_a_closed_fd_is_ebadf_and_a_clear_error(pump: Pump, registered: Registered) -> None:
    """A closed userfaultfd: the loop returns EBADF; Pump.install raises UffdError naming it."""
    ufd, region = registered(4)
    fd = ufd.fileno()
    ufd.close()
    data = image(4)
    assert run(pump, fd, region.addr, data, len(data)) == (-errno.EBADF, 0, 0)
    with pytest.raises(UffdError, match=r"EBADF.*not open") as info:
        pump.install(fd, region.addr, memoryview(data), PAGE, False, lambda: 0, lambda: False)
    assert info.value.errno == errno.EBADF


def test_pump_install_goes_on_once_the_event_is_applied(pump: Pump, registered: Registered) -> None:
    """Pump.install ends short (no error) while an event is unapplied, and goes on when the
    applied count moves during the call."""
    ufd, region = registered(8)
    data = memoryview(image(8))
    fd, addr = ufd.fileno(), region.addr
    # An applied count that never matches the events the pump read: the run is left to faults.
    assert pump.install(fd, addr, data, PAGE, True, lambda: 1, lambda: False) == 0
    counts = iter([1, 0, 0])  # behind at first, applied at the re-check
    assert pump.install(fd, addr, data, PAGE, True, lambda: next(counts), lambda: False) == len(
        data
    )
    assert region.read(0, region.length) == bytes(data)


def test_the_loop_runs_without_the_gil(pump: Pump, registered: Registered) -> None:
    """Another Python thread keeps running while one install loop copies 64 MiB."""
    pages = (64 << 20) // PAGE
    ufd, region = registered(pages)
    data = bytes(range(256)) * (region.length // 256)
    window: list[float] = []

    def install() -> tuple[int, int, int]:
        window.append(time.monotonic())
        out = run(pump, ufd.fileno(), region.addr, data, len(data), step=32 * PAGE)
        window.append(time.monotonic())
        return out

    ticks: list[float] = []
    worker = threading.Thread(target=install)
    worker.start()
    deadline = time.monotonic() + WAIT
    while worker.is_alive() and time.monotonic() < deadline:
        ticks.append(time.monotonic())
    worker.join(WAIT)
    assert not worker.is_alive()
    assert len(window) == 2, "the install did not finish"
    inside = [t for t in ticks if window[0] < t < window[1]]
    # Holding the GIL for the whole loop would leave this thread no tick inside its window.
    assert len(inside) > 100, f"{len(inside)} ticks in {window[1] - window[0]:.3f} s"
    assert region.read(region.length - PAGE, PAGE) == data[-PAGE:]


def test_contiguous_runs_are_joined_up_to_the_limit() -> None:
    """Chunks that follow each other are joined (never past the limit, never across a region
    start, whose region may lie elsewhere in the process); a jump starts anew."""
    k = 64 << 10
    runs = [(0, k), (k, 2 * k), (3 * k, 4 * k), (7 * k, 8 * k), (100 * k, k), (101 * k, k)]
    assert list(joined(iter(runs), 8 * k)) == [(0, 7 * k), (7 * k, 8 * k), (100 * k, 2 * k)]
    assert list(joined(iter(runs), 8 * k, {3 * k, 101 * k})) == [
        (0, 3 * k),
        (3 * k, 4 * k),
        (7 * k, 8 * k),
        (100 * k, k),
        (101 * k, k),
    ]
    assert list(joined(iter(runs), k)) == runs
    assert list(joined(iter([]), k)) == []
