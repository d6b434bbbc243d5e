"""Lifecycle scenarios that must run in a process of their own (tests/test_lifecycle.py).

Each one, if the bug it guards against came back, would corrupt the heap or
leave threads blocked forever (fork() holding glibc's malloc locks, a lock
taken on freed memory): in the pytest process that would take the rest of
the suite down with it. Here the test's timeout kills the process instead.

Usage: ``python lifecycle_scenarios.py SO NAME [ARG...]``: SO is
tests/helpers/lifecycle_fork.c built as a shared library. Prints one line
per round (``round N``: a hang shows where) and ``ok ...`` at the end; exits
1 with the reason on stderr when a check fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import uffd
from uffd import (
    FaultHandler,
    Feature,
    Fork,
    Mode,
    PageFault,
    Remap,
    Remove,
    Resolution,
    UffdOps,
    mem,
)

PS = mem.PAGE_SIZE
ROUND_WAIT = 10.0  # seconds any one round may take before the scenario fails
PM_UFFD_WP = 1 << 57
# MADV_PAGEOUT (Linux 5.4; asm-generic/mman-common.h): Python's mmap may lack the name.
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)


def load(so: str) -> ctypes.CDLL:
    """The C fork helpers, called with the GIL released (ctypes.CDLL)."""
    lib = ctypes.CDLL(so)
    for name in ("fork_exit", "fork_check_wp", "fork_events"):
        getattr(lib, name).restype = ctypes.c_int
    lib.fork_check_wp.argtypes = [ctypes.c_uint64]
    lib.fork_events.argtypes = [ctypes.c_uint64] * 4
    return lib


def fail(why: str) -> None:
    """Report a failed check and exit 1."""
    print(why, file=sys.stderr, flush=True)
    os._exit(1)


def reap(pid: int, timeout: float = ROUND_WAIT) -> int:
    """Wait (bounded) for child ``pid``; its exit status."""
    if pid < 0:
        fail(f"fork failed: {os.strerror(-pid)}")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.001)
    fail(f"child {pid} did not exit within {timeout} s")
    return -1


class Reader(threading.Thread):
    """Reads events with ``Userfaultfd.read_events`` until stopped, handing each to ``on_event``.

    ``timeout=0`` polls: the reader is back in ``read_events`` at once, the
    worst case for a fork that holds the malloc locks while it waits.
    """

    def __init__(self, ufd: uffd.Userfaultfd, on_event: Callable[[Any], None], poll: float = 0):
        super().__init__(daemon=True)
        self.ufd, self.on_event, self.poll = ufd, on_event, poll
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for event in self.ufd.read_events(timeout=self.poll):
                    self.on_event(event)
        except BaseException as err:  # reported by finish()
            self.error = err

    def finish(self) -> None:
        self.stop.set()
        self.join(ROUND_WAIT)
        if self.is_alive() or self.error is not None:
            fail(f"event reader: {'still blocked' if self.is_alive() else repr(self.error)}")


def fork_loop(lib: ctypes.CDLL, rounds: int) -> None:
    """C fork() with EVENT_FORK while another thread polls read_events: every fork returns."""
    ufd = uffd.Userfaultfd(Feature.EVENT_FORK)
    region = mem.anon(4 * PS)
    ufd.register(region.addr, region.length, Mode.MISSING)
    children: list[uffd.Userfaultfd] = []

    def on_event(event: Any) -> None:
        if not isinstance(event, Fork):
            fail(f"unexpected event {event!r}")
        children.append(event.uffd)
        event.uffd.close()

    reader = Reader(ufd, on_event)
    reader.start()
    for n in range(rounds):
        print(f"round {n}", flush=True)
        if reap(lib.fork_exit()) != 0:
            fail(f"round {n}: the child failed")
    reader.finish()
    if len(children) != rounds:
        fail(f"{len(children)} FORK events for {rounds} forks")
    print(f"ok {rounds} forks, {len(children)} FORK events", flush=True)


def wp_fork(lib: ctypes.CDLL, with_event: int) -> None:
    """The kernel's wp-fork test: a protected page's uffd-wp bit survives fork with EVENT_FORK.

    Without EVENT_FORK the child's copy drops the bit; with it (a thread reads
    the FORK event meanwhile) the bit persists, on the present pte and on the
    marker left when the page is zapped; un-protecting clears it.
    """
    ufd = uffd.Userfaultfd(Feature.PAGEFAULT_FLAG_WP | (Feature.EVENT_FORK if with_event else 0))
    region = mem.anon(PS)
    ufd.register(region.addr, PS, Mode.WP)
    region.write(0, b"\1")
    ufd.writeprotect(region.addr, PS, True)
    forks: list[uffd.Userfaultfd] = []
    reader = Reader(ufd, lambda e: forks.append(e.uffd))
    reader.start()
    for state in ("present", "zapped"):
        if state == "zapped":
            region.madvise(MADV_PAGEOUT)  # a marker where the pte was
        if not pagemap(region.addr) & PM_UFFD_WP:
            fail(f"{state}: the parent's page lost its uffd-wp bit")
        got = reap(lib.fork_check_wp(region.addr))
        if got != int(bool(with_event)):
            fail(f"{state}: the child's uffd-wp bit is {got}, expected {int(bool(with_event))}")
    reader.finish()
    if len(forks) != (2 if with_event else 0):
        fail(f"{len(forks)} FORK events read")
    for child in forks:
        child.close()
    ufd.writeprotect(region.addr, PS, False)
    region.write(0, b"\2")
    if pagemap(region.addr) & PM_UFFD_WP:
        fail("the uffd-wp bit stayed after un-protecting")
    print(f"ok wp-fork with_event={with_event}", flush=True)


def pagemap(addr: int) -> int:
    """This process's pagemap entry for ``addr``."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PS * 8)
        return int.from_bytes(f.read(8), "little")


def events(lib: ctypes.CDLL, wp: int) -> None:
    """The kernel's events test: a forked child faults, mremaps and drops pages; all are served.

    The monitor reads the parent's fd until the FORK event, then the child's,
    installing page i as (i + 1) (write-protected with ``wp``; a write then
    raises a WP fault that is un-protected), following the REMAP, and
    unregistering on REMOVE. Every page faults exactly once as MISSING.
    """
    npages = 16
    features = Feature.EVENT_FORK | Feature.EVENT_REMAP | Feature.EVENT_REMOVE
    features |= Feature.PAGEFAULT_FLAG_WP if wp else 0
    parent = uffd.Userfaultfd(features)
    area, to = mem.anon(npages * PS), mem.anon(npages * PS)
    mode = Mode.MISSING | (Mode.WP if wp else 0)
    parent.register(area.addr, area.length, mode)
    state: dict[str, Any] = {"fd": parent, "base": area.addr, "missing": 0, "wp": 0}
    removed: list[tuple[int, int]] = []

    def on_event(event: Any) -> None:
        fd: uffd.Userfaultfd = state["fd"]
        if isinstance(event, Fork):
            state["fd"] = reader.ufd = event.uffd
        elif isinstance(event, Remap):
            state["base"] = event.new
        elif isinstance(event, Remove):
            removed.append((event.start, event.end))
            fd.unregister(event.start, event.end - event.start)
        elif isinstance(event, PageFault) and event.wp:
            state["wp"] += 1
            fd.writeprotect(event.address, PS, False)
        elif isinstance(event, PageFault):
            if any(lo <= event.address < hi for lo, hi in removed):
                fd.zeropage(event.address, PS)  # dropped before the unregister: zeros
                return
            state["missing"] += 1
            index = (event.address - state["base"]) // PS
            page = (index + 1).to_bytes(8, "little") + bytes(PS - 8)
            fd.copy(event.address, page, PS, wp=bool(wp))

    reader = Reader(parent, on_event, poll=0.01)
    reader.start()
    status = reap(lib.fork_events(area.addr, to.addr, npages, PS))
    reader.finish()
    if status != 0:
        fail(f"the faulting child failed at step {status}")
    if state["missing"] != npages:
        fail(f"{state['missing']} MISSING faults for {npages} pages")
    if wp and state["wp"] != npages:
        fail(f"{state['wp']} WP faults for {npages} write-protected pages")
    print(f"ok events wp={wp}: {state['missing']} missing, {state['wp']} wp faults", flush=True)


class Deferring(UffdOps):
    """Defers every MISSING fault; the faults are kept for resolve()."""

    def __init__(self) -> None:
        self.faults: list[uffd.Fault] = []

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        self.faults.append(fault)
        return Resolution.defer()


class Hammer(threading.Thread):
    """Calls ``call`` in a loop from a barrier on, until it raises; keeps how it ended."""

    def __init__(self, call: Callable[[], Any], go: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.call, self.go = call, go
        self.calls = 0
        self.ended: BaseException | None = None

    def run(self) -> None:
        self.go.wait(ROUND_WAIT)
        try:
            while True:
                self.call()
                self.calls += 1
        except BaseException as err:  # judged by race_round
            self.ended = err


def race_round(n: int, region: mem.Region, page: bytes) -> tuple[int, int]:
    """One round of stop_race; (calls that completed, calls refused as "handler stopped")."""
    ops = Deferring()
    handler = FaultHandler(deadline=ROUND_WAIT, fallback="zero").start()
    mapping = handler.register(region, Mode.MISSING, ops)
    toucher = threading.Thread(target=region.read, args=(7 * PS, 8), daemon=True)
    toucher.start()
    end = time.monotonic() + ROUND_WAIT
    while not ops.faults and time.monotonic() < end:
        time.sleep(0.0005)
    if not ops.faults:
        fail(f"round {n}: no fault reached the handler")
    fault, go = ops.faults[0], threading.Barrier(4)
    hammers = [
        Hammer(lambda: handler.install(mapping, (n % 6) * PS, page), go),
        Hammer(lambda: handler.wake(mapping, 0, PS), go),
        Hammer(lambda: handler.resolve(fault, Resolution.copy(page)), go),
    ]
    for t in hammers:
        t.start()
    go.wait(ROUND_WAIT)
    time.sleep((n % 5) * 0.0002)
    # DeadlineExceededError: stop() came before any resolve(); the fallback answered.
    with contextlib.suppress(uffd.DeadlineExceededError):
        handler.stop()
    for t in [*hammers, toucher]:
        t.join(ROUND_WAIT)
        if t.is_alive():
            fail(f"round {n}: a thread is still blocked after stop()")
    for t in hammers:
        if not isinstance(t.ended, uffd.UffdError) or "handler stopped" not in str(t.ended):
            fail(f"round {n}: a call ended with {t.ended!r}, not 'handler stopped'")
    region.madvise(mmap.MADV_DONTNEED)  # empty again for the next round
    return sum(t.calls for t in hammers), len(hammers)


def stop_race(lib: ctypes.CDLL, rounds: int) -> None:
    """install/wake/resolve from three threads while stop() runs: done, or "handler stopped".

    Nothing else may come out of them (no crash, no hang, no other error),
    and every faulting thread is released by the time stop() returns.
    """
    region = mem.anon(8 * PS)
    page = b"\x5a" * PS
    done = refused = 0
    for n in range(rounds):
        print(f"round {n}", flush=True)
        calls, stopped = race_round(n, region, page)
        done, refused = done + calls, refused + stopped
    print(f"ok {rounds} rounds: {done} calls done, {refused} refused", flush=True)


SCENARIOS: dict[str, Callable[[ctypes.CDLL, int], None]] = {
    "fork_loop": fork_loop,
    "wp_fork": wp_fork,
    "events": events,
    "stop_race": stop_race,
}

if __name__ == "__main__":
    SCENARIOS[sys.argv[2]](load(sys.argv[1]), int(sys.argv[3]))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: a thread blocked by a regression must not hang it
