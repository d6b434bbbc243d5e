"""Never hang a faulting thread (docs/dispatch.md, rule 5), and deferred resolution.

A handler that raises, returns None, refuses, sleeps past the deadline, or
never answers a deferred fault; a thread that faults while holding the GIL;
stop() with faults pending; the userfaultfd closed under the handler. In
every case the faulting thread is released within a bound and the error is
re-raised from stop().
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from _dispatch_helpers import (
    assert_pages,
    page_pattern,
    run_all,
    stop_raises,
    wait_for,
)
from conftest import HELPERS, PAGE, WAIT, run_in_thread, run_toucher

import uffd
from uffd import FaultHandler, Mode, Resolution, UffdOps, mem

Regions = Callable[..., mem.Region]


class Answer(UffdOps):
    """Calls ``fn(fault)`` for every MISSING fault and returns what it returns."""

    def __init__(self, fn: Callable[[uffd.Fault], Resolution | None]) -> None:
        self.fn = fn

    def handle_missing(self, fault: uffd.Fault) -> Resolution | None:
        return self.fn(fault)


class Broken(Exception):
    """What the failing handler raises."""


def _boom(fault: uffd.Fault) -> Resolution:
    raise Broken(f"no data for {fault.offset:#x}")


def timed_read(region: mem.Region, offset: int = 0, n: int = 8) -> tuple[bytes, float]:
    """``Region.read`` and how long it took."""
    t0 = time.monotonic()
    data = region.read(offset, n)
    return data, time.monotonic() - t0


# -- a handler that fails -------------------------------------------------------


@pytest.mark.parametrize("fallback", ["zero", "sigbus"])
def test_handler_raises(fallback: str, region_factory: Regions) -> None:
    """A raising handler: the reader gets the fallback (zeros or SIGBUS); stop() re-raises."""
    region = region_factory("anon", pages=1)
    handler = FaultHandler(fallback=fallback).start()
    handler.register(region, Mode.MISSING, Answer(_boom))
    reader = run_toucher(region, 0, 8, read=True)
    if fallback == "zero":
        assert reader.finish() == bytes(8)
    else:
        with pytest.raises(uffd.PageAccessError) as info:
            reader.finish()
        assert info.value.address == region.addr
    stop_raises(handler, Broken, "no data for 0x0")
    assert handler.stats.total.resolutions == {
        "fallback-zero" if fallback == "zero" else "fallback-poison": 1
    }


@pytest.mark.parametrize(
    ("answer", "error", "words"),
    [
        (lambda f: None, TypeError, ("Answer.handle_missing returned None",)),
        (
            lambda f: Resolution.refuse("not today"),
            uffd.HandlerRefusedError,
            ("Answer refused", "not today"),
        ),
    ],
    ids=["none", "refuse"],
)
def test_handler_returns_none_or_refuses(
    answer: Callable, error: type, words: tuple[str, ...], region_factory: Regions
) -> None:
    """None is a TypeError, refuse() a HandlerRefusedError; both give the fallback."""
    region = region_factory("anon", pages=2)
    handler = FaultHandler(fallback="zero").start()
    handler.register(region, Mode.MISSING, Answer(answer))
    assert run_toucher(region, 0, region.length, read=True).finish() == bytes(region.length)
    exc = stop_raises(handler, error, *words)
    assert "1 more handler errors were recorded" in "".join(getattr(exc, "__notes__", []))
    assert handler.stats.total.errors == 2


# -- deadlines --------------------------------------------------------------------


@pytest.mark.parametrize("fallback", ["zero", "sigbus"])
def test_handler_sleeps_past_deadline(fallback: str, region_factory: Regions) -> None:
    """A handler stuck past the deadline: this fault and one raised meanwhile are both released."""
    deadline = 0.3
    region = region_factory("anon", pages=2)
    started = threading.Event()

    def slow(fault: uffd.Fault) -> Resolution:
        if fault.offset == 0:
            started.set()
            time.sleep(deadline + 0.5)
        return Resolution.copy(page_pattern(0, PAGE))

    handler = FaultHandler(deadline=deadline, fallback=fallback).start()
    handler.register(region, Mode.MISSING, Answer(slow))
    first = run_in_thread(timed_read, region, 0)
    assert started.wait(WAIT)
    # Raised while the dispatch thread is busy: the C watchdog reads and times it.
    second = run_in_thread(timed_read, region, PAGE)
    for reader in (first, second):
        if fallback == "zero":
            data, elapsed = reader.finish()
            assert data == bytes(8)
            assert elapsed < deadline + 1.0
        else:
            with pytest.raises(uffd.PageAccessError):
                reader.finish(deadline + 1.0)
    error = stop_raises(handler, uffd.DeadlineExceededError, "missed the 0.3 s deadline")
    assert "did not answer in time" in str(error)
    stats = handler.stats
    assert stats.expired == 2
    kind = "fallback-zero" if fallback == "zero" else "fallback-poison"
    assert stats.total.resolutions == {kind: 2}
    assert stats.total.errors == 2


def test_fault_while_holding_gil() -> None:
    """A thread faulting with the GIL held gets zeros (not SIGBUS) in time; stop() says why."""
    deadline = 0.5
    proc = subprocess.run(
        [sys.executable, str(HELPERS / "dispatch_gil.py"), str(deadline)],
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["data"] == "00" * 8, (
        "the fallback must be a zero page: a poison would kill the process"
    )
    assert deadline <= out["elapsed"] < deadline + 1.0
    error = out["error"]
    assert error is not None, "stop() must report the deadline"
    assert error["type"] == "DeadlineExceededError"
    assert "GIL" in error["message"]
    assert error["thread_id"] == out["tid"]
    assert out["expired"] == 1
    assert out["resolutions"] == {"fallback-zero": 1}


# -- deferred resolution ------------------------------------------------------------


def test_deferred_faults_resolved_in_reverse(region_factory: Regions) -> None:
    """Four faults deferred at once are answered later, in reverse order, from another thread."""
    region = region_factory("anon", pages=4)
    deferred: list[uffd.Fault] = []
    all_in = threading.Event()

    def defer(fault: uffd.Fault) -> Resolution:
        deferred.append(fault)
        if len(deferred) == 4:
            all_in.set()
        return Resolution.defer()

    with FaultHandler(deadline=WAIT) as handler:
        handler.register(region, Mode.MISSING, Answer(defer))
        readers = [run_in_thread(region.read, i * PAGE, PAGE) for i in range(4)]

        def resolver() -> list[bool]:
            assert all_in.wait(WAIT), f"only {len(deferred)} faults in flight"
            answered = []
            for fault in sorted(deferred, key=lambda f: f.offset, reverse=True):
                time.sleep(0.01)
                answered.append(
                    handler.resolve(
                        fault, Resolution.copy(page_pattern(fault.offset // PAGE, PAGE))
                    )
                )
            return answered

        assert run_all([resolver]) == [[True] * 4]
        data = b"".join(reader.finish() for reader in readers)
        assert_pages(data, PAGE, lambda i: page_pattern(i, PAGE), "deferred")
        assert handler.resolve(deferred[0], Resolution.zero()) is False  # already answered
        assert len({f.thread_id for f in deferred}) == 4
    assert handler.stats.total.resolutions == {"copy": 4}


def test_deferred_fault_never_resolved(region_factory: Regions) -> None:
    """A deferred fault nobody answers gets the fallback at the deadline; late resolve() fails."""
    deadline = 0.3
    region = region_factory("anon", pages=1)
    deferred: list[uffd.Fault] = []
    handler = FaultHandler(deadline=deadline, fallback="zero").start()
    handler.register(
        region, Mode.MISSING, Answer(lambda f: deferred.append(f) or Resolution.defer())
    )
    data, elapsed = run_in_thread(timed_read, region).finish()
    assert data == bytes(8)
    assert elapsed < deadline + 1.0
    wait_for(lambda: handler.stats.expired == 1, "the expiry notice")
    assert handler.resolve(deferred[0], Resolution.copy(page_pattern(0, PAGE))) is False
    assert region.read(0, 8) == bytes(8)
    stop_raises(handler, uffd.DeadlineExceededError, "did not answer in time")


def test_stop_resolves_pending_faults(region_factory: Regions) -> None:
    """stop() with deferred faults pending releases their threads, reports them, refuses resolve."""
    region = region_factory("anon", pages=3)
    deferred: list[uffd.Fault] = []
    handler = FaultHandler(deadline=60, fallback="zero").start()
    handler.register(
        region, Mode.MISSING, Answer(lambda f: deferred.append(f) or Resolution.defer())
    )
    readers = [run_in_thread(region.read, i * PAGE, 8) for i in range(3)]
    wait_for(lambda: len(deferred) == 3, "3 deferred faults")
    t0 = time.monotonic()
    error = stop_raises(handler, uffd.DeadlineExceededError, "never resolved before stop()")
    assert [reader.finish() for reader in readers] == [bytes(8)] * 3
    assert time.monotonic() - t0 < WAIT
    assert "2 more handler errors were recorded" in "".join(error.__notes__)
    with pytest.raises(uffd.UffdError, match="handler stopped"):
        handler.resolve(deferred[0], Resolution.zero())


def test_uffd_closed_under_handler(region_factory: Regions) -> None:
    """Closing the uffd under a running handler releases the faulting thread; stop() says so."""
    region = region_factory("anon", pages=2)
    deferred: list[uffd.Fault] = []
    handler = FaultHandler(deadline=60).start()
    handler.register(
        region, Mode.MISSING, Answer(lambda f: deferred.append(f) or Resolution.defer())
    )
    reader = run_in_thread(timed_read, region)
    wait_for(lambda: deferred, "the deferred fault")
    number = handler.uffd.fileno()
    os.close(number)
    # The kernel releases the waiter and unregisters the range: a plain zero page.
    data, _elapsed = reader.finish()
    assert data == bytes(8)
    assert run_in_thread(region.read, PAGE, 8).finish() == bytes(8)
    # The number now belongs to an unrelated file, which stop() must leave open.
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != number:
        os.dup2(devnull, number)
        os.close(devnull)
    try:
        stop_raises(handler, uffd.UffdError, f"(fd {number}) was closed under the running handler")
        assert os.readlink(f"/proc/self/fd/{number}") == os.devnull
    finally:
        os.close(number)
    assert handler.uffd.closed
