"""FaultHandler extras for tools: early answers to deferred faults, installs, a given fd."""

from __future__ import annotations

import os
import threading

from _dispatch_helpers import page_pattern, wait_for
from conftest import WAIT, run_in_thread

import uffd
from uffd import FaultHandler, Mode, Resolution, UffdOps

PS = uffd.mem.PAGE_SIZE


class AnswerFirst(UffdOps):
    """Answers each fault through handler.resolve() *before* returning defer()."""

    def __init__(self) -> None:
        self.handler: FaultHandler | None = None

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        assert self.handler is not None
        self.handler.resolve(fault, Resolution.copy(page_pattern(fault.offset // PS, PS)))
        return Resolution.defer()


def test_resolve_before_defer_returns_is_installed() -> None:
    """A deferred fault answered before its handler returned is installed at once."""
    region = uffd.mem.anon(8 * PS)
    ops = AnswerFirst()
    with FaultHandler(deadline=5.0) as handler:
        ops.handler = handler
        handler.register(region, Mode.MISSING, ops)
        data = run_in_thread(region.read, 0, region.length).finish()
        assert handler.stats.expired == 0
    assert data == b"".join(page_pattern(i, PS) for i in range(8))
    region.close()


def test_resolve_of_a_finished_fault_is_refused() -> None:
    """resolve() on a fault its handler already answered returns False and installs nothing."""
    seen: list[uffd.Fault] = []

    class Zero(UffdOps):
        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            seen.append(fault)
            return Resolution.zero()

    region = uffd.mem.anon(PS)
    with FaultHandler() as handler:
        handler.register(region, Mode.MISSING, Zero())
        assert region.read(0, 8) == bytes(8)
        assert handler.resolve(seen[0], Resolution.copy(b"x" * PS)) is False
        assert region.read(0, 8) == bytes(8)
    region.close()


def test_install_skips_present_pages_and_reports_bytes() -> None:
    """install() copies around pages already present and returns only the bytes it installed."""
    region = uffd.mem.anon(8 * PS)
    with FaultHandler() as handler:
        mapping = handler.register(region, Mode.MISSING, uffd.AnonOps())
        assert handler.install(mapping, 2 * PS, b"a" * PS, wake=True) == PS
        assert handler.install(mapping, 5 * PS, b"b" * PS, wake=True) == PS
        chunk = b"".join(page_pattern(i, PS) for i in range(8))
        installed = handler.install(mapping, 0, chunk, wake=False)
        handler.wake(mapping, 0, region.length)
        assert installed == 6 * PS
        pages = [region.read(i * PS, PS) for i in range(8)]
        assert handler.stats.total.faults == {}
    assert pages[2] == b"a" * PS and pages[5] == b"b" * PS
    assert [p for i, p in enumerate(pages) if i not in (2, 5)] == [
        page_pattern(i, PS) for i in range(8) if i not in (2, 5)
    ]
    region.close()


def test_handler_serves_a_given_userfaultfd() -> None:
    """FaultHandler(uffd=...) serves an fd made elsewhere (wrapped with from_fd) and owns it."""
    made = uffd.Userfaultfd(uffd.Feature.THREAD_ID)
    received = uffd.Userfaultfd.from_fd(os.dup(made.fileno()))
    made.close()
    region = uffd.mem.anon(4 * PS)
    tids: list[int | None] = []

    class Log(UffdOps):
        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            tids.append(fault.thread_id)
            return Resolution.copy(b"g" * PS)

    handler = FaultHandler(uffd=received)
    assert handler.uffd is received and handler.features == uffd.Feature.THREAD_ID
    with handler:
        handler.register(region, Mode.MISSING, Log())
        reader = threading.Thread(target=lambda: region.read(0, 8))
        reader.start()
        reader.join(WAIT)
        assert not reader.is_alive()
        wait_for(lambda: tids, "the fault to be logged")
    assert received.closed
    assert tids and tids[0] is not None
    region.close()
