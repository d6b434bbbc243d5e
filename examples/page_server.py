"""Page server: serve a snapshot's pages over TCP, and read them back with a client.

Writes a snapshot of ``--size`` bytes with a known pattern (or serves
``--snapshot``), starts a :class:`uffd.pagestore.server.PageServer` on 127.0.0.1 in a
background thread, then a :class:`uffd.pagestore.client.ThreadedPageClient` reads the
whole image in 1 MiB requests, a few pages as urgent single-page reads, and
checks every byte. ``--forever`` keeps serving until Ctrl-C afterwards (point
``python -m uffd handler --source tcp://...`` at it).

Run: ``python examples/page_server.py [--size 8M] [--snapshot PATH] [--forever]``.
Exits 0 when everything read back matches.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

from _helpers import parse_size, pattern

from uffd.pagestore.client import ThreadedPageClient
from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import open_source, write_snapshot


def main(argv: list[str] | None = None) -> int:
    """Serve, read back, verify; 0 when the bytes match."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("8M"))
    parser.add_argument("--snapshot", help="serve this snapshot or raw memory file instead")
    parser.add_argument("--forever", action="store_true", help="keep serving until Ctrl-C")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="uffd-serve-") as tmp:
        path = args.snapshot
        if path is None:
            path = os.path.join(tmp, "memory.snap")
            info = write_snapshot(path, {"memory": pattern(args.size)})
            print(f"wrote {path}: {len(info.regions)} region, {args.size >> 10} KiB")
        with open_source(path) as source, ServerThread(source) as server:
            print(f"serving {path} on {server.url}: page size {source.page_size}")
            for region in source.regions:
                stored = region.present_pages
                print(f"  region {region.name!r}: {region.length} bytes, {stored} pages stored")
            ok = True
            with ThreadedPageClient(server.url) as client:
                for region in client.regions:
                    t = time.perf_counter()
                    step = 1 << 20
                    futures = [
                        (
                            off,
                            client.fetch(
                                region.name, off, min(step, region.length - off), urgent=False
                            ),
                        )
                        for off in range(0, region.length, step)
                    ]
                    for off, future in futures:
                        if future.result(30) != source.read(
                            region.name, off, min(step, region.length - off)
                        ):
                            print(f"MISMATCH in {region.name!r} at {off}")
                            ok = False
                    dt = time.perf_counter() - t
                    kib, ms, rate = region.length >> 10, dt * 1e3, region.length / dt / 1e6
                    print(f"read {region.name!r} back: {kib} KiB in {ms:.0f} ms ({rate:.0f} MB/s)")
                    rng = random.Random(1)
                    pages = region.length // client.page_size
                    for _ in range(8):
                        off = rng.randrange(pages) * client.page_size
                        t = time.perf_counter()
                        page = client.read(region.name, off, client.page_size, urgent=True)
                        ok &= page == source.read(region.name, off, client.page_size)
                    last_us = (time.perf_counter() - t) * 1e6
                    print(f"8 urgent single-page reads: the last took {last_us:.0f} us")
            stats = server.stats
            print(f"server stats: {stats}")
            if args.forever:
                print("serving until Ctrl-C")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
    if not ok:
        return 1
    print("every byte read back matches the snapshot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
