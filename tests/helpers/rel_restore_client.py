"""Child script: one process lazily restored from a page server through userfaultfd.

Usage: ``python rel_restore_client.py URL REGION SEED [REPEAT]``. Maps an
empty anonymous region the size of REGION, registers it with a FaultHandler
whose ops fetch each faulting page from the server (an urgent READ, the
fault deferred and resolved when the reply arrives), then 4 threads read
the region page by page in orders shuffled by SEED, so faults are in flight
on all of them at once. Every page is checked against the test pattern
(``rel_common.page_pattern``, every 5th page zero). REPEAT times (default 1),
a fresh region each time. Prints one JSON line: ``{"sha256", "bad_pages",
"faults", "errors", "elapsed_s"}`` (the digest of the last region as
restored). Dies by SIGALRM after 300 s whatever happens.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import random
import sys
import threading
import time

from rel_common import arm_alarm, page_pattern

import uffd
from uffd import Mode, Resolution, mem
from uffd.pagestore.client import ThreadedPageClient

READERS = 4


def expected(index: int, page_size: int) -> bytes:
    return bytes(page_size) if index % 5 == 0 else page_pattern(index, page_size)


class FetchOps(uffd.UffdOps):
    """MISSING faults: an urgent READ of the page; resolved from the client's thread."""

    def __init__(self, client: ThreadedPageClient, name: str) -> None:
        self.client = client
        self.name = name
        self.handler: uffd.FaultHandler | None = None

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        future = self.client.fetch(self.name, fault.offset, fault.mapping.page_size, urgent=True)
        future.add_done_callback(lambda f: self._arrived(fault, f))
        return Resolution.defer()

    def _arrived(self, fault: uffd.Fault, future: concurrent.futures.Future[bytes]) -> None:
        err = future.exception()
        answer = (
            Resolution.refuse(f"fetch failed: {err}") if err else Resolution.copy(future.result())
        )
        assert self.handler is not None
        self.handler.resolve(fault, answer)


def restore_once(
    client: ThreadedPageClient, name: str, length: int, seed: int
) -> tuple[bytes, int, int]:
    """One lazy restore into a fresh region; (contents, faults served, handler errors)."""
    ps = client.page_size
    npages = length // ps
    ops = FetchOps(client, name)
    with mem.anon(length) as region, uffd.FaultHandler(deadline=30.0, fallback="zero") as handler:
        ops.handler = handler
        handler.register(region, Mode.MISSING, ops)

        def reader(k: int) -> None:
            order = list(range(npages))
            random.Random(seed * 100 + k).shuffle(order)
            for index in order:
                region.read(index * ps, ps)  # C, GIL released: the fault goes to the handler

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        image = region.read(0, length)
        stats = handler.stats
    return image, stats.total.faults["missing"], stats.total.errors


def main() -> int:
    arm_alarm(300)
    url, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    t0 = time.monotonic()
    bad: set[int] = set()
    faults = errors = 0
    image = b""
    with ThreadedPageClient(url, request_timeout=60.0) as client:
        ps = client.page_size
        length = next(r.length for r in client.regions if r.name == name)
        for round_ in range(repeat):
            image, served, failed = restore_once(client, name, length, seed * 1000 + round_)
            faults += served
            errors += failed
            bad.update(
                i for i in range(length // ps) if image[i * ps : (i + 1) * ps] != expected(i, ps)
            )
    print(
        json.dumps(
            {
                "sha256": hashlib.sha256(image).hexdigest(),
                "bad_pages": sorted(bad)[:20],
                "faults": faults,
                "errors": errors,
                "elapsed_s": time.monotonic() - t0,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
