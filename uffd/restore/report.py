"""What one restore session did: :class:`SessionReport`, printed by the daemon when it ends."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["SessionReport"]


@dataclasses.dataclass
class SessionReport:
    """What one session did; ``errors`` are the messages of what went wrong.

    ``faulted``/``prefetched``/``working_set`` count pages, ``zeroed`` the
    pages the snapshot stores as zero (given the zero page in bulk), ``bytes`` the
    bytes installed; ``elapsed``, ``first_fault`` and ``complete`` are seconds
    from the handshake (``complete``: every page present or handed out to
    prefetch). Latency percentiles are the FaultHandler's, in microseconds.
    """

    pid: int
    uid: int
    regions: int
    length: int
    page_size: int
    faulted: int = 0
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

    def summary(self) -> str:
        """One line: pages faulted and prefetched, bytes, MB/s, time to first fault, errors."""
        first = (
            "no faults"
            if self.first_fault is None
            else f"first fault {self.first_fault * 1e3:.1f} ms after handshake"
        )
        done = "" if self.complete is None else f", all present after {self.complete:.2f} s"
        errors = f"; {len(self.errors)} errors: {self.errors[0]}" if self.errors else ""
        return (
            f"pid {self.pid}: {_size(self.length)} in {self.regions} regions: "
            f"{self.faulted} pages faulted, {self.prefetched} prefetched"
            f"{f' ({self.working_set} from the working set)' if self.working_set else ''}; "
            f"{self.bytes / 1e6:.1f} MB at {self.throughput / 1e6:.1f} MB/s{done}; {first}, "
            f"fault latency p50 {self.fault_p50_us:.0f} us p99 {self.fault_p99_us:.0f} us; "
            f"session {self.elapsed:.2f} s{errors}"
        )


def _size(n: int) -> str:
    """``n`` bytes for people: "512 bytes", "4.0 KiB", "1.5 GiB"."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"
