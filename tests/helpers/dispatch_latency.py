"""Measure the per-fault latency of a FaultHandler on this machine (a report, not a test).

One toucher thread faults every page of a 4096-page anonymous region once,
in random order, one ``Region.touch`` call per page, each timed; the handler
serves them with ``BufferOps``: ``native=False`` (the Python dispatch path)
or ``native=True`` (the C pump's fast path; ``prefetch`` one page so each
fault installs exactly one page). Two CPU placements:

- same CPU: the whole process pinned to CPU 0 before the handler is made,
  so the pump, its watchdog, the dispatch thread and the toucher share it;
- different CPUs: the main thread pinned to CPU 0 before the handler is
  made and started (its threads inherit that), the toucher pins itself to
  CPU 1 (``sched_setaffinity(0, ...)`` applies to the calling thread).

The cost of a touch on a present page is measured the same way and shown,
so the fault cost is the difference. Usage:
``.venv/bin/python tests/helpers/dispatch_latency.py [--pages N] [--rounds R] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time

from uffd import FaultHandler, Mode, mem
from uffd.modules import BufferOps


def _touch_all(region: mem.Region, order: list[int], cpu: int | None) -> list[int]:
    """Touch each page in ``order`` (one call each), returning each call's ns."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ps = region.page_size
    clock = time.perf_counter_ns
    out = []
    for page in order:
        t0 = clock()
        region.touch(page * ps, 1)
        out.append(clock() - t0)
    return out


def _in_thread(fn, *args):  # type: ignore[no-untyped-def]
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(r=fn(*args)), name="toucher")
    t.start()
    t.join(120)
    if t.is_alive():
        raise RuntimeError("toucher still blocked after 120 s")
    return box["r"]


def measure(pages: int, native: bool, placement: str, seed: int) -> dict:
    """One round: a fresh region and handler; returns µs statistics per fault."""
    ps = mem.PAGE_SIZE
    buffer = bytearray(os.urandom(16)) * (pages * ps // 16)
    order = list(range(pages))
    random.Random(seed).shuffle(order)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0})
    try:
        region = mem.anon(pages * ps)
        try:
            # Made and started on CPU 0: the pump's threads inherit it.
            with FaultHandler(deadline=30) as handler:
                handler.register(
                    region, Mode.MISSING, BufferOps(buffer, native=native, prefetch=ps)
                )
                toucher_cpu = 1 if placement == "different CPUs" else None
                t0 = time.perf_counter_ns()
                faults = _in_thread(_touch_all, region, order, toucher_cpu)
                whole = time.perf_counter_ns() - t0
                present = _in_thread(_touch_all, region, order[:1024], toucher_cpu)
                stats = handler.stats
                served = stats.native_faults if native else sum(stats.total.faults.values())
            assert region.read(0, region.length) == buffer, "wrong contents"
        finally:
            region.close()
    finally:
        os.sched_setaffinity(0, before)
    return {
        "path": "C pump (native=True)" if native else "Python (native=False)",
        "placement": placement,
        "faults": served,
        "median_us": statistics.median(faults) / 1000,
        "p10_us": sorted(faults)[len(faults) // 10] / 1000,
        "p90_us": sorted(faults)[len(faults) * 9 // 10] / 1000,
        "mean_us": whole / pages / 1000,
        "present_touch_us": statistics.median(present) / 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs CPUs 0 and 1")
    rows = []
    for native in (False, True):
        for placement in ("same CPU", "different CPUs"):
            runs = [measure(args.pages, native, placement, seed) for seed in range(args.rounds)]
            best = min(runs, key=lambda r: r["median_us"])
            best["rounds_median_us"] = [round(r["median_us"], 1) for r in runs]
            rows.append(best)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{os.uname().release}, {args.pages} pages x {args.rounds} rounds, random order, "
        "µs per fault"
    )
    print(
        f"{'path':24} {'placement':15} {'median':>7} {'p10':>7} {'p90':>7} {'mean':>7} "
        f"{'present':>8}  rounds"
    )
    for r in rows:
        print(
            f"{r['path']:24} {r['placement']:15} {r['median_us']:7.1f} {r['p10_us']:7.1f} "
            f"{r['p90_us']:7.1f} {r['mean_us']:7.1f} {r['present_touch_us']:8.2f}  "
            f"{r['rounds_median_us']}"
        )


if __name__ == "__main__":
    main()
