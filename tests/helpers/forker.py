"""Child process that produces a UFFD_EVENT_FORK for a test in another process.

Why a separate process: ``os.fork()`` holds the GIL while the kernel waits
for the FORK event to be read, so no Python thread of the forking process
can read it. The test process reads it instead, from an fd passed here.

Usage: ``python forker.py SOCK_FD [NBYTES]`` with SOCK_FD one end of a
socketpair (pass_fds). Protocol, one message each way at a time:

1. here -> test: JSON header (addr, length, features, available, ioctls,
   pid) with the userfaultfd attached (SCM_RIGHTS). The fd has EVENT_FORK
   and an anonymous region of four pages registered MISSING. If the fd
   cannot be opened, the header is ``{"error": reason}`` with no fd.
2. test -> here: ``b"g"``; we call ``os.fork()``, which blocks until the
   test reads the FORK event.
3. grandchild -> test: ``b"D"`` + 4-byte length + the first NBYTES (default
   16) of the region, read with ``Region.read`` (the test serves that fault
   on ``Fork.uffd``); then the grandchild exits.
4. here -> test: ``b"X"`` once the grandchild has been reaped (its mm is
   gone), then we exit when the test closes its end (or on ``b"q"``).

Every wait is bounded by ``signal.alarm``: a stuck helper dies in 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

from _handover import send_uffd

import uffd
from uffd import Feature, Mode, mem

ALARM = 30


def main() -> int:
    signal.alarm(ALARM)
    sock = socket.socket(fileno=int(sys.argv[1]))
    nbytes = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    try:
        ufd = uffd.Userfaultfd(Feature.EVENT_FORK)
    except OSError as err:  # e.g. EVENT_FORK needs CAP_SYS_PTRACE: the test skips
        sock.sendall(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
        return 1
    region = mem.anon(4 * mem.PAGE_SIZE)
    ufd.register(region.addr, region.length, Mode.MISSING)
    send_uffd(sock, ufd, region)
    if sock.recv(1) != b"g":
        return 1
    pid = os.fork()
    if pid == 0:
        signal.alarm(ALARM)
        try:
            data = region.read(0, nbytes)
            sock.sendall(b"D" + struct.pack("=I", len(data)) + data)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    sock.sendall(b"X")
    sock.recv(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
