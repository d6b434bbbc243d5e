"""Child script: a process whose memory the test's FaultHandler serves, forking a storm of children.

Why a separate process: the forking thread holds its own GIL while the kernel
waits for the FORK event to be read, so the process that forks must not be the
one whose Python code serves the faults (see uffd.Userfaultfd's GIL warning).
Firecracker and any other restored process are in the same position.

Usage: ``python rel_forkstorm.py SOCK_FD NPAGES THREADS CHILDREN``. Protocol
(helpers.rel_common.send_json/recv_json over a socketpair):

1. here -> test: ``{addr, length, features, available, ioctls, pid}`` with the
   userfaultfd (EVENT_FORK; an anonymous region of NPAGES registered MISSING).
2. test -> here: ``{"go": true}`` once the handler serves the fd.
3. THREADS threads read the region a page at a time in random order (faults in
   flight) while the main thread forks CHILDREN children back to back; each
   child reads the whole region, checks every page against
   ``rel_common.page_pattern`` and exits 0 (all right) or 1.
4. stdout: ``{"children", "ok", "bad_status", "threads_ok", "fork_max_s"}``.

Every wait is bounded by SIGALRM (120 s).
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import threading
import time

from _handover import uffd_header
from rel_common import arm_alarm, page_pattern, recv_json, send_json

import uffd
from uffd import Feature, Mode, mem


def child_check(region: mem.Region, npages: int) -> int:
    ps = region.page_size
    data = region.read(0, region.length)
    bad = sum(data[i * ps : (i + 1) * ps] != page_pattern(i, ps) for i in range(npages))
    return 0 if bad == 0 else 1


def main() -> int:
    arm_alarm(120)
    sock = socket.socket(fileno=int(sys.argv[1]))
    npages, nthreads, nchildren = (int(x) for x in sys.argv[2:5])
    ufd = uffd.Userfaultfd(Feature.EVENT_FORK)
    region = mem.anon(npages * mem.PAGE_SIZE)
    ufd.register(region.addr, region.length, Mode.MISSING)
    send_json(sock, uffd_header(ufd, region), [ufd.fileno()])
    go, _ = recv_json(sock)
    assert go == {"go": True}

    ps = region.page_size
    results: list[bool] = []

    def reader(seed: int) -> None:
        order = list(range(npages))
        random.Random(seed).shuffle(order)
        ok = all(region.read(i * ps, ps) == page_pattern(i, ps) for i in order)
        results.append(ok)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    pids = []
    fork_max = 0.0
    for _ in range(nchildren):
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                status = child_check(region, npages)
            finally:
                os._exit(status)
        fork_max = max(fork_max, time.monotonic() - t0)
        pids.append(pid)
    ok = bad = 0
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) == 0:
            ok += 1
        else:
            bad += 1
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "children": len(pids),
                "ok": ok,
                "bad_status": bad,
                "threads_ok": len(results) == nthreads and all(results),
                "fork_max_s": fork_max,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
