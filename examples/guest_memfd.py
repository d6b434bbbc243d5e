"""guest_memfd-style serving: fill a process's memfd memory with pwrite, then CONTINUE.

On Linux 7.1 a VMM restoring a "secret-free" guest whose memory is a
guest_memfd registers it with userfaultfd and hands the handler two fds:
the userfaultfd and the guest_memfd. The handler never maps guest memory;
it writes each page into the guest_memfd (write/pwrite) and resolves the
fault with UFFDIO_CONTINUE. This runs the same flow on 6.18 with a shmem
memfd standing in for guest_memfd (docs/dispatch.md):

1. a memory snapshot file of ``--size`` bytes is written;
2. a forked "guest" maps a memfd of that size, registers it MISSING|MINOR
   and sends (userfaultfd, memfd) over a socket, with SCM_RIGHTS;
3. the handler (this process) pwrites the first ``--prefetch`` pages into
   the memfd before the guest starts: those faults arrive MINOR (the page
   is in the file) and are only continued; every other page faults MISSING
   and is filled from the snapshot, then continued (``GuestMemfdOps``);
4. the guest reads its whole memory and reports a SHA-256 of it;
5. the handler checks that digest against the snapshot's, and that its own
   /proc/self/maps never held the memfd.

Run: ``python examples/guest_memfd.py [--size 4M] [--prefetch 64]``.
Exits 0 when the guest's memory equals the snapshot and was never mapped here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import struct
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _helpers import PAGE, parse_size, pattern

import uffd
from uffd import Feature, Mode
from uffd.modules import GuestMemfdOps

TIMEOUT = 30.0
MODE = Mode.MISSING | Mode.MINOR


def guest(sock: socket.socket, size: int) -> None:
    """The forked guest: memory is a memfd; hand it over, wait for "go", read it all."""
    code = 1
    try:
        signal.alarm(int(TIMEOUT))
        memory = uffd.mem.shmem(size)
        ufd = uffd.Userfaultfd(Feature.MISSING_SHMEM | Feature.MINOR_SHMEM)
        ufd.register(memory.addr, memory.length, MODE)
        assert memory.memfd is not None
        head = struct.pack("=QQ", memory.addr, memory.length)
        socket.send_fds(sock, [head], [ufd.fileno(), memory.memfd])
        if sock.recv(1) == b"g":
            t0 = time.monotonic()
            data = memory.read(0, memory.length)  # every page faults, in order
            ms = (time.monotonic() - t0) * 1e3
            sock.sendall(hashlib.sha256(data).digest() + struct.pack("=d", ms))
            code = 0
    finally:
        os._exit(code)


def maps_of(inode: int) -> list[str]:
    """Lines of this process's /proc/self/maps that map the file with ``inode``."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return [line for line in lines if len(line.split()) > 4 and line.split()[4] == str(inode)]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock`` (its timeout bounds each wait)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"the guest closed the socket after {len(data)} of {n} bytes")
        data += chunk
    return data


def serve(snapshot: str, size: int, prefetch: int) -> bool:
    """Fork the guest, serve its memfd through GuestMemfdOps, verify; True if all is well."""
    ours, theirs = socket.socketpair()
    ours.settimeout(TIMEOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads: the guest only
        pid = os.fork()
    if pid == 0:
        ours.close()
        guest(theirs, size)
    theirs.close()
    source = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head, fds, _, _ = socket.recv_fds(ours, 64, 2)
        addr, length = struct.unpack("=QQ", head)
        ufd, memfd = uffd.Userfaultfd.from_fd(fds[0]), fds[1]
        print(f"guest {pid} sent its userfaultfd and memfd: {length >> 10} KiB at {addr:#x}")
        ops = GuestMemfdOps(memfd, lambda offset, n: os.pread(source, n, offset))
        for i in range(min(prefetch, length // PAGE)):
            os.pwrite(memfd, os.pread(source, PAGE, i * PAGE), i * PAGE)
        with uffd.FaultHandler(uffd=ufd) as handler:
            handler.register((addr, length), MODE, ops, registered=True, kind="shmem")
            ours.sendall(b"g")
            reply = recv_exactly(ours, 40)
            mapped_here = maps_of(os.fstat(memfd).st_ino)
        os.close(memfd)
    finally:
        os.close(source)
        ours.close()
        _, status = os.waitpid(pid, 0)
    digest, (ms,) = reply[:32], struct.unpack("=d", reply[32:])
    want = hashlib.sha256(Path(snapshot).read_bytes()).digest()
    print(
        f"guest read {length // PAGE} pages in {ms:.1f} ms: {ops.filled} filled with pwrite "
        f"then continued (MISSING), {ops.continued} continued as they were (MINOR, prefetched)"
    )
    print(f"handler process maps the memfd: {'yes' if mapped_here else 'no'}")
    same = digest == want
    print(f"guest memory == snapshot: {'yes' if same else 'NO'} (sha256 {digest.hex()[:32]})")
    return same and not mapped_here and os.waitstatus_to_exitcode(status) == 0


def main(argv: list[str] | None = None) -> int:
    """Write the snapshot, serve the guest, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("4M"))
    parser.add_argument("--prefetch", type=int, default=64, help="pages written before the guest")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="uffd-gmem-") as tmp:
        snapshot = os.path.join(tmp, "mem.raw")
        Path(snapshot).write_bytes(pattern(args.size, seed=11))
        ok = serve(snapshot, args.size, args.prefetch)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
