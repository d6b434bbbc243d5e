"""CPU placements for the benchmark: where the handler and the toucher run.

A userfaultfd round trip costs very different amounts depending on whether
the faulting thread and the handler share a CPU (a context switch) or not (a
cross-CPU wakeup, which on a VM may mean waking an idle vCPU).  The suite
measures both.  CPUs are taken from this process's affinity mask
(``os.sched_getaffinity(0)``), so a run under ``taskset`` or a cgroup cpuset
stays inside it.  A placement of -1 means unpinned.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = [
    "UNPINNED",
    "Placement",
    "cross_cpu",
    "cross_cpu_unavailable",
    "describe",
    "same_cpu",
]


class Placement(NamedTuple):
    """CPUs for the handler thread and the toucher thread(s); -1 is unpinned."""

    handler_cpu: int
    toucher_cpu: int


UNPINNED = Placement(-1, -1)


def _cpus() -> list[int]:
    """Return the CPUs this process may run on, lowest first."""
    return sorted(os.sched_getaffinity(0))


def same_cpu() -> Placement:
    """Return handler and toucher on the same CPU: the lowest allowed one."""
    cpu = _cpus()[0]
    return Placement(cpu, cpu)


def cross_cpu_unavailable() -> str | None:
    """Return why cross_cpu() gives None, or None when it gives a placement."""
    cpus = _cpus()
    if len(cpus) >= 2:
        return None
    return (
        f"only CPU {cpus[0]} is in this process's affinity mask "
        "(os.sched_getaffinity(0)); a cross-CPU placement needs two"
    )


def cross_cpu() -> Placement | None:
    """Return handler and toucher on two different CPUs: the two lowest allowed.

    Returns None when only one CPU is available; cross_cpu_unavailable()
    says why.
    """
    cpus = _cpus()
    if len(cpus) < 2:
        return None
    return Placement(cpus[0], cpus[1])


def describe(placement: tuple[int, int] | None) -> str:
    """Return a short human description of a placement (None: cross-CPU unavailable)."""
    if placement is None:
        return f"cross-CPU unavailable: {cross_cpu_unavailable() or 'no placement given'}"
    handler, toucher = placement
    if handler < 0 and toucher < 0:
        return "unpinned (the scheduler places handler and toucher)"
    if handler == toucher:
        return f"same CPU (handler and toucher on CPU {handler})"
    where = {cpu: f"CPU {cpu}" if cpu >= 0 else "unpinned" for cpu in (handler, toucher)}
    kind = "cross CPU" if handler >= 0 and toucher >= 0 else "partly pinned"
    return f"{kind} (handler on {where[handler]}, toucher on {where[toucher]})"
