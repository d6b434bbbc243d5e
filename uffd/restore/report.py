"""What one restore session did: :class:`SessionReport`, printed by the daemon when it ends."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["SessionReport", "human_size", "plural"]


@dataclasses.dataclass
class SessionReport:
    """What one session did; ``errors`` are the messages of what went wrong.

    ``faulted``/``prefetched``/``working_set``/``zeroed`` count the pages
    each installed: by faults, by prefetch (of which from the working set),
    and the zero pages a snapshot stores mapped in bulk; they add up to the
    pages present. ``faults`` counts the faults served, a fault on a page
    prefetch installed first included. ``refused`` counts faults refused
    because their address is in no region of the handshake (they took the
    fallback). ``bytes`` the bytes present; ``elapsed``, ``first_fault`` and
    ``complete`` are seconds from the handshake (``complete``: every page present or handed out to
    prefetch). Latency percentiles are the FaultHandler's, in microseconds.
    """

    pid: int
    uid: int
    regions: int
    length: int
    page_size: int
    faulted: int = 0
    faults: int = 0
    refused: int = 0
    prefetched: int = 0
    working_set: int = 0
    zeroed: int = 0
    bytes: int = 0
    elapsed: float = 0.0
    first_fault: float | None = None
    complete: float | None = None
    fault_p50_us: float = 0.0
    fault_p99_us: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing went wrong."""
        return not self.errors

    @property
    def throughput(self) -> float:
        """Bytes per second installed, up to the moment every page was present (or the end)."""
        span = self.complete if self.complete is not None else self.elapsed
        return self.bytes / span if span > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (with ``throughput`` in bytes per second)."""
        doc = dataclasses.asdict(self)
        doc["throughput"] = self.throughput
        return doc

    @property
    def pages(self) -> int:
        """Pages in the restored regions."""
        return self.length // self.page_size if self.page_size else 0

    def summary(self) -> str:
        """One line: pages by who installed them, bytes and rate, time to first fault, errors."""
        first = (
            "no faults"
            if self.first_fault is None
            else f"first fault {self.first_fault * 1e3:.1f} ms after the handshake"
        )
        done = "" if self.complete is None else f", all present after {self.complete:.2f} s"
        ws = f" ({self.working_set} from the working set)" if self.working_set else ""
        zero = f", {self.zeroed} zero" if self.zeroed else ""
        refused = (
            f"; {plural(self.refused, 'fault')} outside the handshake refused"
            if (self.refused)
            else ""
        )
        errors = f"; {plural(len(self.errors), 'error')}: {self.errors[0]}" if self.errors else ""
        return (
            f"pid {self.pid}: {human_size(self.length)} in {plural(self.regions, 'region')}, "
            f"{self.pages} pages: {self.faulted} faulted, {self.prefetched} prefetched{ws}{zero}; "
            f"{human_size(self.bytes)} at {human_size(round(self.throughput))}/s{done}; "
            f"{first}, fault latency p50 {self.fault_p50_us:.0f} us p99 "
            f"{self.fault_p99_us:.0f} us; session {self.elapsed:.2f} s{refused}{errors}"
        )


def plural(n: int, noun: str) -> str:
    """``"1 region"``, ``"2 regions"``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def human_size(n: int) -> str:
    """``n`` bytes for people, in binary units: "512 bytes", "4 KiB", "256 KiB", "1.5 GiB"."""
    if n < 1024:
        return plural(n, "byte")
    value = n / 1024
    units = iter(("MiB", "GiB", "TiB"))
    unit = "KiB"
    while value >= 1024 and unit != "TiB":
        value /= 1024
        unit = next(units)
    return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
