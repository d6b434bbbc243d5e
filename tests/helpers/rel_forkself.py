"""Child script: os.fork() in the FaultHandler's own process while faults are in flight.

Usage: ``python rel_forkself.py MODE ROUNDS`` with MODE ``children`` (six
children fork back to back and read their pages while the dispatch thread is
busy) or ``inflight`` (a thread of this process faults too while the main
thread forks eight children in a tight loop). Each round uses a fresh handler
(deadline 1 s, fallback zero) and checks every page every child read.

stdout, one JSON line: ``{"rounds", "bad_children", "expired", "fork_max_s"}``.
Runs in its own process so that a regression (fork() waiting forever for its
FORK event to be read) cannot hang the test run: the test kills it after a
bounded wait and reports the threads' kernel wait channels.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time

from rel_common import arm_alarm, page_identity, page_pattern

import uffd
from uffd import Feature, Mode, Resolution, mem

PS = mem.PAGE_SIZE
NPAGES = 64


class PatternOps(uffd.UffdOps):
    """MISSING faults get the pattern page for their offset."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        return Resolution.copy(page_pattern(fault.offset // PS, PS))


def child(region: mem.Region) -> None:
    status = 1
    try:
        data = region.read(0, region.length)
        ok = all(page_identity(data[i * PS : (i + 1) * PS]) == i for i in range(NPAGES))
        status = 0 if ok else 1
    finally:
        os._exit(status)


def one_round(mode: str) -> tuple[int, int, float]:
    handler = uffd.FaultHandler(features=Feature.EVENT_FORK, deadline=1.0, fallback="zero")
    region = mem.anon(NPAGES * PS)
    handler.start()
    handler.register(region, Mode.MISSING, PatternOps())
    reader = None
    if mode == "inflight":
        reader = threading.Thread(target=region.read, args=(0, region.length))
        reader.start()
    pids = []
    stall = 0.0
    for _ in range(8 if mode == "inflight" else 6):
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            child(region)
        stall = max(stall, time.monotonic() - t0)
        pids.append(pid)
    bad = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        bad += os.waitstatus_to_exitcode(status) != 0
    if reader is not None:
        reader.join(10)
    expired = handler.stats.expired
    with contextlib.suppress(uffd.UffdError):  # the expirations, counted above
        handler.stop()
    region.close()
    return bad, expired, stall


def main() -> int:
    arm_alarm(300)
    mode, rounds = sys.argv[1], int(sys.argv[2])
    bad = expired = 0
    stall = 0.0
    for _ in range(rounds):
        b, e, s = one_round(mode)
        bad, expired, stall = bad + b, expired + e, max(stall, s)
    print(
        json.dumps(
            {"rounds": rounds, "bad_children": bad, "expired": expired, "fork_max_s": stall}
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
