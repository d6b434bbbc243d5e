"""Leak checks with psutil: repeated use returns every fd and does not grow the RSS.

Each test runs one warm-up round (lazily created fds and allocator arenas),
takes the process's fd count and RSS from psutil, repeats the work many
times, and compares. A leak of one fd or one page per fault or per object
shows as dozens to thousands; the RSS bounds leave room for the allocator.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import uffd
from uffd import FaultHandler, Mode, Resolution, UffdOps
from uffd.modules import BufferOps
from uffd.pagestore.capture import capture_process

PAGE = 4096
ME = psutil.Process()


def _usage() -> tuple[int, int]:
    gc.collect()
    return ME.num_fds(), ME.memory_info().rss


def _check_no_growth(work: Callable[[], None], rounds: int, rss_slack: int) -> None:
    """Run ``work`` once to warm up, then ``rounds`` times: no fd more, RSS within the slack."""
    work()
    fds_before, rss_before = _usage()
    for _ in range(rounds):
        work()
    fds_after, rss_after = _usage()
    assert fds_after == fds_before, f"{fds_after - fds_before} fds leaked over {rounds} rounds"
    grown = rss_after - rss_before
    print(f"\n{rounds} rounds: fds {fds_before} -> {fds_after}, RSS grew {grown / 2**20:.1f} MiB")
    assert grown < rss_slack, f"RSS grew {grown / 2**20:.1f} MiB over {rounds} rounds"


class _Pattern(UffdOps):
    """Each page holds its index byte (served from Python)."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.copy(bytes([fault.offset // PAGE % 256]) * PAGE)


def test_userfaultfd_open_close_leaks_nothing() -> None:
    """500 Userfaultfd open/register/close cycles return every fd."""

    def work() -> None:
        for _ in range(50):
            region = uffd.mem.anon(4 * PAGE)
            with uffd.Userfaultfd() as fd:
                fd.register(region.addr, region.length, Mode.MISSING)
            region.close()

    _check_no_growth(work, rounds=10, rss_slack=8 << 20)


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_fault_handler_cycles_leak_nothing(native: bool) -> None:
    """30 handlers started, serving 256 faults each, and stopped: no fd or page kept."""
    source = bytes(range(256)) * (256 * PAGE // 256)

    def work() -> None:
        region = uffd.mem.anon(256 * PAGE)
        ops: UffdOps = BufferOps(source) if native else _Pattern()
        with FaultHandler(deadline=5.0) as handler:
            handler.register(region, Mode.MISSING, ops)
            data = region.read(0, region.length)
        region.close()
        assert data[PAGE] == (source[PAGE] if native else 1)

    # A leaked page per fault would be 30 * 256 * 4 KiB = 30 MiB.
    _check_no_growth(work, rounds=30, rss_slack=12 << 20)


def test_capture_process_leaks_nothing(tmp_path: Path) -> None:
    """40 captures of a live process close their /proc fds and free their buffers."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, os; b = os.urandom(1 << 20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        out = tmp_path / "snap.pyuffd"

        def work() -> None:
            capture_process(out, child.pid, freeze=True)

        _check_no_growth(work, rounds=40, rss_slack=16 << 20)
        assert os.path.getsize(out) > 1 << 20
    finally:
        child.kill()
        child.wait(10)
