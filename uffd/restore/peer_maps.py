"""Which of a peer's mappings are registered with userfaultfd: :func:`registered_ranges`.

A process that hands its userfaultfd to the daemon may have registered more
than it lists in the handshake. The daemon's handler would not know those
ranges, and a fault there would be woken to fault again, forever. The
kernel shows every registration in ``/proc/PID/smaps``: the ``um`` VmFlag
(VM_UFFD_MISSING) of each mapping, proc(5). The session registers what it
finds outside the handshake, so such faults are refused, take the fallback,
and are counted.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

__all__ = ["PeerRange", "registered_ranges", "uncovered"]

_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ", re.MULTILINE)
_PAGE = re.compile(r"^KernelPageSize:\s+(\d+) kB$", re.MULTILINE)
_FLAGS = re.compile(r"^VmFlags:(.*)$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class PeerRange:
    """A mapping of the peer registered MISSING: ``[start, end)``, its page size and kind."""

    start: int
    end: int
    page_size: int
    kind: str


def registered_ranges(pid: int) -> list[PeerRange]:
    """The peer's mappings registered MISSING on some userfaultfd, in address order.

    Raises:
        OSError: ``/proc/PID/smaps`` cannot be read (the process is gone, or
            this process may not inspect it).
    """
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as f:
        text = f.read()
    out = []
    headers = list(_HEADER.finditer(text))
    for i, head in enumerate(headers):
        body = text[head.end() : headers[i + 1].start() if i + 1 < len(headers) else len(text)]
        flags_m = _FLAGS.search(body)
        flags = set(flags_m.group(1).split()) if flags_m else set()
        if "um" not in flags:
            continue
        page_m = _PAGE.search(body)
        page = int(page_m.group(1)) * 1024 if page_m else 4096
        kind = "hugetlb" if "ht" in flags else "shmem" if "sh" in flags else "anon"
        out.append(PeerRange(int(head.group(1), 16), int(head.group(2), 16), page, kind))
    return out


def uncovered(found: PeerRange, covered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts ``[start, end)`` of ``found`` outside every ``covered`` ``[start, end)``."""
    parts = [(found.start, found.end)]
    for lo, hi in covered:
        parts = [
            piece
            for a, b in parts
            for piece in ((a, min(b, lo)), (max(a, hi), b))
            if piece[0] < piece[1]
        ]
    return parts
