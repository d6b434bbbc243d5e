"""``make demo``: lazily restore a 256 MiB worker from a page server and print the figures.

1. write a 256 MiB snapshot with a known pattern (every 16th page zero) to a
   temporary directory;
2. start the page server on 127.0.0.1 (``python -m uffd serve``);
3. start the UFFD handler daemon (``python -m uffd handler --once``) with
   the page server as its source;
4. start a worker process that maps 256 MiB of empty memory, hands its
   userfaultfd to the daemon (Firecracker's handshake) and reads every page
   in random order, hashing each one;
5. print the time to first access, pages faulted vs prefetched, the restore
   throughput, and compare every page's hash with the snapshot's.

Each component is its own process, as in a real deployment. ``--size``
changes the size. Exits 0 when every page matches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from _helpers import (
    DaemonProcess,
    ServerProcess,
    finish_worker,
    parse_size,
    pattern,
    spawn_restore,
    wrong_pages,
)

from uffd.pagestore.snapshot import write_snapshot


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when the restored memory matches the snapshot page for page."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--order", choices=("random", "sequential"), default="random")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="uffd-demo-") as tmp:
        snapshot = os.path.join(tmp, "worker.snap")
        t = time.perf_counter()
        info = write_snapshot(snapshot, {"memory": pattern(args.size)})
        print(
            f"snapshot: {args.size >> 20} MiB written to {snapshot} in "
            f"{time.perf_counter() - t:.1f} s ({info.file_size >> 20} MiB on disk: zero pages "
            "are not stored)"
        )
        sock = os.path.join(tmp, "handler.sock")
        digests = os.path.join(tmp, "digests")
        log = os.path.join(tmp, "daemon.log")
        with ServerProcess(snapshot) as server:
            print(f"page server: {server.url}")
            with DaemonProcess(
                sock, server.url, "--once", "--no-working-set", log_path=log
            ) as daemon:
                print(f"handler daemon: {sock}")
                t = time.perf_counter()
                worker = spawn_restore(sock, args.size, "--order", args.order, digests=digests)
                result = finish_worker(worker, timeout=120)
                restore_s = time.perf_counter() - t
                (report,) = daemon.reports(1)
                errors = daemon.log()
        t = time.perf_counter()
        wrong = wrong_pages(digests, snapshot, args.size)
        verify_s = time.perf_counter() - t

    pages = result["pages"]
    complete = report["complete"] or report["elapsed"]
    print(f"time to first access:  {result['first_access_ms']:.2f} ms")
    print(
        f"pages faulted:         {report['faulted']} ({100 * report['faulted'] / pages:.1f}%), "
        f"fault latency p50 {report['fault_p50_us']:.0f} us, p99 {report['fault_p99_us']:.0f} us"
    )
    print(
        f"pages prefetched:      {report['prefetched']} ({100 * report['prefetched'] / pages:.1f}%)"
    )
    print(
        f"restore throughput:    {args.size / complete / 1e6:.0f} MB/s "
        f"({args.size >> 20} MiB present after {complete:.2f} s; the worker read every "
        f"page in {args.order} order in {result['elapsed_s']:.2f} s, "
        f"{restore_s:.2f} s with startup)"
    )
    if report["errors"]:
        print(f"daemon errors:         {report['errors']}\n{errors}")
        return 1
    if wrong:
        print(
            f"MISMATCH: {len(wrong)} of {pages} pages differ from the snapshot, first {wrong[:8]}"
        )
        return 1
    print(f"verified {pages} pages: every page matches the snapshot ({verify_s:.1f} s)")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
