"""One restored process of the fan-out bench: ``python -m uffd.bench.fanout_worker``.

Usage: ``python -m uffd.bench.fanout_worker SOCKET BYTES SEED PACE_US TIMEOUT_S``

Maps ``BYTES`` of anonymous memory, opens a userfaultfd and registers it
MISSING, prints ``ready`` and waits for a line on stdin (so the bench starts
all its workers at once), then hands fd + regions to the handler daemon at
``SOCKET`` (Firecracker's handshake). Like a guest running while its memory
streams in, it touches a random page every ``PACE_US`` and times each access
(those to pages mincore(2) said were missing just before are the urgent
faults), until every page is present or ``TIMEOUT_S`` passes. Then it checks
every byte against :func:`page` (every page distinct, so no two chunks of the
image are equal and a chunk store cannot dedup them) and prints one JSON
line: ``handover`` and ``complete_at`` (CLOCK_MONOTONIC seconds),
``first_access_ms``, ``fault_us`` (sorted), ``touches``, ``bad_pages``.
"""

from __future__ import annotations

import ctypes
import json
import random
import sys
import time
from typing import Any

PAGE = 4096
_SALT = b"uffd-fan"


def page(index: int) -> bytes:
    """The bench image's page ``index``: its index and a salt, repeated."""
    return (index.to_bytes(8, "little") + _SALT) * (PAGE // 16)


def image(length: int) -> bytes:
    """The first ``length`` bytes (whole pages) of the bench image."""
    return b"".join(page(i) for i in range(length // PAGE))


def _mincore() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.mincore
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


def main(argv: list[str]) -> int:
    """Run one worker (see the module docstring); exit status 0, or 1 on a setup failure."""
    import uffd
    from uffd import Feature, Mode, mem
    from uffd.restore.firecracker import GuestRegionUffdMapping, connect_and_send

    socket_path, size, seed, pace_us, timeout = (
        argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]),
    )  # fmt: skip
    npages = size // PAGE
    region = mem.anon(size)
    ufd = uffd.Userfaultfd(Feature.EVENT_REMOVE)
    ufd.register(region.addr, size, Mode.MISSING)
    mincore = _mincore()
    vec = (ctypes.c_ubyte * npages)()
    one = ctypes.c_ubyte()
    rng = random.Random(seed)
    print("ready", flush=True)
    sys.stdin.readline()
    handover = time.monotonic()
    connect_and_send(socket_path, ufd, [GuestRegionUffdMapping(region.addr, size, 0, PAGE)])
    faults: list[float] = []
    first_ms: float | None = None
    complete_at = 0.0
    touches = 0
    give_up = handover + timeout
    next_check = 0.0
    while time.monotonic() < give_up:
        index = rng.randrange(npages)
        mincore(region.addr + index * PAGE, PAGE, ctypes.byref(one))
        t = time.perf_counter_ns()
        region.read(index * PAGE, 1)
        took = (time.perf_counter_ns() - t) / 1e3
        touches += 1
        if first_ms is None:
            first_ms = (time.monotonic() - handover) * 1e3
        if not one.value & 1:
            faults.append(took)
        now = time.monotonic()
        if now >= next_check:
            next_check = now + 0.005
            mincore(region.addr, size, vec)
            if 0 not in bytes(vec):  # mincore sets 1 for each resident page
                complete_at = time.monotonic()
                break
        time.sleep(pace_us / 1e6)
    bad = 0
    step = 256 * PAGE
    for start in range(0, size, step):
        n = min(step, size - start)
        got = region.read(start, n)
        if got != b"".join(page(i) for i in range(start // PAGE, (start + n) // PAGE)):
            bad += sum(got[o : o + PAGE] != page((start + o) // PAGE) for o in range(0, n, PAGE))
    print(
        json.dumps(
            {
                "handover": handover,
                "complete_at": complete_at,
                "first_access_ms": first_ms,
                "fault_us": sorted(faults),
                "touches": touches,
                "bad_pages": bad,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
