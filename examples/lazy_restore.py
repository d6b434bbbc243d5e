"""Lazy restore: a worker process gets its memory on demand from a page server.

What happens:

1. a snapshot of ``--size`` bytes with a known pattern is written (or
   ``--snapshot`` is used), and a page server serves it on 127.0.0.1;
2. the UFFD handler daemon starts, in this process (``--daemon thread``) or
   as ``python -m uffd handler`` (``--daemon process``), with the page
   server as its source;
3. a worker *process* maps empty memory, opens a userfaultfd, registers the
   memory MISSING and hands the fd and its regions to the daemon with the
   Firecracker handshake; then it reads every page in random (or
   ``--order sequential``) order and hashes each one;
4. the daemon serves the faults from the page server (deferred resolutions)
   while it prefetches the rest in growing chunks;
5. the worker's page digests are compared, page by page, with the snapshot's.

Run: ``python examples/lazy_restore.py [--size 16M] [--order random|sequential]
[--daemon thread|process] [--no-prefetch]``. Exits 0 when every page matches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _helpers import (
    DaemonProcess,
    DaemonThread,
    finish_worker,
    parse_size,
    pattern,
    spawn_restore,
    wrong_pages,
)

from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import open_source, write_snapshot


def main(argv: list[str] | None = None) -> int:
    """Run the restore and check it; 0 when every page matches the snapshot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("16M"))
    parser.add_argument("--snapshot", help="restore this snapshot (its first --size bytes)")
    parser.add_argument("--order", choices=("random", "sequential"), default="random")
    parser.add_argument("--daemon", choices=("thread", "process"), default="thread")
    parser.add_argument("--no-prefetch", action="store_true", help="serve faults only")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="uffd-lazy-") as tmp:
        snapshot = args.snapshot
        if snapshot is None:
            snapshot = os.path.join(tmp, "worker.snap")
            info = write_snapshot(snapshot, {"memory": pattern(args.size)})
            print(f"wrote {snapshot}: {args.size >> 10} KiB, {info.file_size >> 10} KiB on disk")
        source = open_source(snapshot)
        sock = os.path.join(tmp, "handler.sock")
        digests = os.path.join(tmp, "digests")
        extra_flags = ["--no-prefetch"] if args.no_prefetch else []
        with source, ServerThread(source) as server:
            print(f"page server listening on {server.url}")
            if args.daemon == "process":
                daemon: DaemonProcess | DaemonThread = DaemonProcess(
                    sock, server.url, "--once", "--no-working-set", *extra_flags
                )
            else:
                daemon = DaemonThread(
                    sock, server.url, prefetch=not args.no_prefetch, working_set=None
                )
            with daemon:
                print(f"handler daemon ({args.daemon}) listening on {sock}")
                t0 = time.perf_counter()
                worker = spawn_restore(sock, args.size, "--order", args.order, digests=digests)
                result = finish_worker(worker)
                wall = time.perf_counter() - t0
                (report,) = daemon.reports(1)
        wrong = wrong_pages(digests, snapshot, args.size)

    print(
        f"worker pid {result['pid']} read {result['pages']} pages in {args.order} order in "
        f"{result['elapsed_s']:.2f} s (first access {result['first_access_ms']:.2f} ms)"
    )
    print(
        f"daemon: {report['faulted']} pages faulted, {report['prefetched']} prefetched, "
        f"{report['bytes'] / 1e6:.1f} MB at {report['throughput'] / 1e6:.1f} MB/s, "
        f"fault latency p50 {report['fault_p50_us']:.0f} us, {len(report['errors'])} errors"
    )
    if wrong:
        print(f"MISMATCH: {len(wrong)} pages differ from the snapshot, first {wrong[:8]}")
        return 1
    print(f"verified {result['pages']} pages against the snapshot in {wall:.2f} s: all match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
