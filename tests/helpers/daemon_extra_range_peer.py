"""Child script: a peer that registered two ranges but lists only the first in its handshake.

Usage: ``python daemon_extra_range_peer.py SOCKET PAGES``.

It maps two anonymous regions of PAGES pages, registers both MISSING on one
userfaultfd, sends the handshake for the first only, then reads the first
byte of every page of the second (the daemon knows nothing of them) and of
the first. stdout, one JSON line: ``{"pid", "extra_first_bytes",
"listed_ok", "extra_s"}``. SIGALRM after 30 s bounds everything (a daemon
that woke those faults forever would hang it).
"""

from __future__ import annotations

import json
import os
import sys
import time

from rel_common import arm_alarm, page_pattern

import uffd
from uffd import Feature, Mode, mem
from uffd.restore.firecracker import GuestRegionUffdMapping, connect_and_send


def main() -> int:
    arm_alarm(30)
    path, npages = sys.argv[1], int(sys.argv[2])
    ps = mem.PAGE_SIZE
    ufd = uffd.Userfaultfd(Feature.EVENT_REMOVE)
    listed, extra = mem.anon(npages * ps), mem.anon(npages * ps)
    for region in (listed, extra):
        ufd.register(region.addr, region.length, Mode.MISSING)
    connect_and_send(path, ufd, [GuestRegionUffdMapping(listed.addr, listed.length, 0, ps)])
    t0 = time.monotonic()
    extra_bytes = sorted({extra.read(i * ps, 1)[0] for i in range(npages)})
    extra_s = time.monotonic() - t0
    data = listed.read(0, listed.length)
    ok = all(data[i * ps : (i + 1) * ps] == page_pattern(i, ps) for i in range(npages))
    result = {"pid": os.getpid(), "extra_first_bytes": extra_bytes, "listed_ok": ok}
    result["extra_s"] = extra_s
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
