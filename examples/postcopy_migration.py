"""Post-copy migration of a live process's memory, with dirty-page pre-copy rounds.

The source is a live worker process that keeps writing its memory. Both
sides start from the same base image (the worker's initial contents: think
of a VM template both hosts have). The migration:

1. the source worker hands its own userfaultfd (WP_ASYNC | WP_UNPOPULATED)
   to this controller over a Unix socket (SCM_RIGHTS, the Firecracker-style
   handshake), and :class:`uffd.dirty.DirtyTracker` tracks its memory from
   here (``pid=``: PAGEMAP_SCAN on its /proc/PID/pagemap);
2. pre-copy rounds: each round, the pages written since the last round are
   read from the running source (/proc/PID/mem) and written into the
   destination's page store (a raw memory file holding the base image);
   rounds stop when the dirty set is small or ``--rounds`` is reached;
3. stop-and-copy: the source is stopped (SIGSTOP), the final dirty set is
   copied, and the destination worker resumes at once: its memory is
   restored lazily by the UFFD handler daemon from a page server over the
   store (post-copy: pages arrive on demand, the rest is prefetched);
4. the destination's memory is checked page by page against the source's
   final memory (read from the stopped source), and by whole-image hash.

Run: ``python examples/postcopy_migration.py [--size 16M] [--rounds 6]``.
Requires Linux 6.7 (WP_ASYNC and PAGEMAP_SCAN). Exits 0 when the memories match.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _helpers import (
    PAGE,
    DaemonThread,
    bad_pages,
    combined,
    digests_of,
    finish_worker,
    parse_size,
    pattern,
    read_digests,
    spawn_restore,
    spawn_worker,
)

from uffd.dirty import DirtyTracker
from uffd.pagestore.server import ServerThread
from uffd.pagestore.snapshot import RawMemoryFile
from uffd.restore.firecracker import recv_handshake, userfaultfd_from_fd

SEED = 3


def _copy(mem_fd: int, store_fd: int, base: int, ranges: Sequence[tuple[int, int]]) -> int:
    """Copy address ranges of the source's memory into the store; returns pages copied."""
    pages = 0
    for start, length in ranges:
        data = os.pread(mem_fd, length, start)
        os.pwrite(store_fd, data, start - base)
        pages += length // PAGE
    return pages


def _wait_stopped(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("T", "t"):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    """Migrate the worker; 0 when the destination's memory equals the source's final memory."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("16M"))
    parser.add_argument("--rounds", type=int, default=6, help="most pre-copy rounds")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between rounds")
    parser.add_argument("--converged", type=int, default=64, help="dirty pages to stop at")
    args = parser.parse_args(argv)
    size = args.size
    with tempfile.TemporaryDirectory(prefix="uffd-migrate-") as tmp:
        store = os.path.join(tmp, "destination.mem")
        Path(store).write_bytes(pattern(size, SEED))
        print(f"destination page store {store}: the {size >> 10} KiB base image")

        control = os.path.join(tmp, "control.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(control)
        listener.listen(1)
        listener.settimeout(20)
        source = spawn_worker(
            "writer", "--socket", control, "--size", str(size), "--seed", str(SEED), stdin=True
        )
        dest = None
        try:
            conn, _ = listener.accept()
            with conn:
                fd, (mapping,), cred = recv_handshake(conn)
            listener.close()
            ufd = userfaultfd_from_fd(fd)
            base = mapping.base_host_virt_addr
            print(f"source worker pid {cred.pid}: {size >> 10} KiB at {base:#x}, live")
            tracker = DirtyTracker((base, size), uffd=ufd, pid=cred.pid)
            tracker.start()
            assert source.stdin is not None
            source.stdin.write(b"go\n")
            source.stdin.flush()
            mem_fd = os.open(f"/proc/{cred.pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
            store_fd = os.open(store, os.O_WRONLY | os.O_CLOEXEC)

            # The destination is ready before the source stops: page server,
            # daemon, and a worker waiting to hand over its userfaultfd.
            with RawMemoryFile(store) as raw, ServerThread(raw) as server:
                sock = os.path.join(tmp, "handler.sock")
                with DaemonThread(sock, server.url, working_set=None) as daemon:
                    digests = os.path.join(tmp, "digests")
                    dest = spawn_restore(sock, size, "--wait-go", digests=digests, stdin=True)
                    total = 0
                    for number in range(1, args.rounds + 1):
                        time.sleep(args.interval)
                        t = time.perf_counter()
                        pages = _copy(mem_fd, store_fd, base, tracker.collect())
                        total += pages
                        print(
                            f"pre-copy round {number}: {pages} dirty pages copied in "
                            f"{(time.perf_counter() - t) * 1e3:.1f} ms"
                        )
                        if pages <= args.converged:
                            break

                    stopped = time.monotonic()
                    os.kill(cred.pid, signal.SIGSTOP)
                    _wait_stopped(cred.pid)
                    final = _copy(mem_fd, store_fd, base, tracker.collect())
                    total += final
                    os.fsync(store_fd)
                    assert dest.stdin is not None
                    dest.stdin.write(b"go\n")
                    dest.stdin.flush()
                    copied = time.monotonic()
                    print(
                        f"source stopped; stop-and-copy of {final} pages took "
                        f"{(copied - stopped) * 1e3:.1f} ms; destination resumed"
                    )
                    # Ground truth: the stopped source's final memory.
                    want = digests_of(os.pread(mem_fd, size, base))
                    result = finish_worker(dest)
                    (report,) = daemon.reports(1)
            tracker.stop()
            os.close(mem_fd)
            os.close(store_fd)
            got = read_digests(digests)
        finally:
            for proc in (source, dest):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(10)

    first_page = result["handover_monotonic"] + result["first_access_ms"] / 1e3
    print(
        f"destination pid {result['pid']}: first page {(first_page - stopped) * 1e3:.1f} ms "
        f"after the source stopped; {report['faulted']} pages pulled on demand, "
        f"{report['prefetched']} prefetched"
    )
    print(f"pre-copy and stop-and-copy sent {total} dirty pages in all")
    wrong = bad_pages(got, want)
    if wrong:
        print(f"MISMATCH: {len(wrong)} pages differ from the source's final memory: {wrong[:8]}")
        return 1
    print(
        f"destination memory == source's final memory: {len(got) // 8} pages, hash {combined(got)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
