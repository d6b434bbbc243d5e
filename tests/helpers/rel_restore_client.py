"""Child script: one restoring client of a page server, reading a region page by page.

Usage: ``python rel_restore_client.py URL REGION SEED [REPEAT]``. Connects
with ``ThreadedPageClient``, reads every page of REGION in an order shuffled
by SEED (one READ per page, up to 32 in flight), REPEAT times (default 1),
and checks each page against the test pattern (``rel_common.page_pattern``,
every 5th page zero). Prints one JSON line: ``{"sha256", "bad_pages",
"reads", "elapsed_s"}`` (the digest of the region as restored). Dies by
SIGALRM after 300 s whatever happens.
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import sys
import time

from rel_common import arm_alarm, page_pattern

from uffd.client import ThreadedPageClient


def expected(index: int, page_size: int) -> bytes:
    return bytes(page_size) if index % 5 == 0 else page_pattern(index, page_size)


def main() -> int:
    arm_alarm(300)
    url, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    repeat = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    t0 = time.monotonic()
    bad: set[int] = set()
    reads = 0
    with ThreadedPageClient(url, request_timeout=60.0) as client:
        ps = client.page_size
        length = next(r.length for r in client.regions if r.name == name)
        npages = length // ps
        image = bytearray(length)
        for round_ in range(repeat):
            order = list(range(npages))
            random.Random(seed * 1000 + round_).shuffle(order)
            inflight: collections.deque = collections.deque()
            for index in order:
                inflight.append((index, client.fetch(name, index * ps, ps)))
                if len(inflight) >= 32:
                    i, future = inflight.popleft()
                    image[i * ps : (i + 1) * ps] = future.result(60)
            while inflight:
                i, future = inflight.popleft()
                image[i * ps : (i + 1) * ps] = future.result(60)
            reads += npages
            bad.update(i for i in range(npages) if image[i * ps : (i + 1) * ps] != expected(i, ps))
    print(
        json.dumps(
            {
                "sha256": hashlib.sha256(image).hexdigest(),
                "bad_pages": sorted(bad)[:20],
                "reads": reads,
                "elapsed_s": time.monotonic() - t0,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
