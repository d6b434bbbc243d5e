"""Child process whose memory a test tracks with ``DirtyTracker(..., pid=...)``.

Usage: ``python dirty_child.py SOCK_FD PAGES`` with SOCK_FD one end of a
socketpair (pass_fds). It maps PAGES anonymous pages (never touched) and
opens a userfaultfd with WP_ASYNC | WP_UNPOPULATED; the test registers and
scans that memory from its own process. Protocol, one JSON line per
message:

1. here -> test: the header (addr, length, features, available, ioctls,
   pid), with the userfaultfd attached (SCM_RIGHTS).
2. test -> here: ``{"write": [page, ...]}`` or ``{"read": [page, ...]}``:
   one byte written (``Region.write``) or read in each page, in order;
   here -> test: ``{"ok": n}`` once all n accesses are done.
3. test -> here: ``{"exit": 0}`` (or EOF): we exit at once.

Every wait is bounded by ``signal.alarm``: a stuck helper dies in 30 s.
"""

from __future__ import annotations

import json
import signal
import socket
import sys

from _handover import send_uffd

from uffd import Feature, Userfaultfd, mem

ALARM = 30


def main() -> int:
    signal.alarm(ALARM)
    sock = socket.socket(fileno=int(sys.argv[1]))
    pages = int(sys.argv[2])
    ufd = Userfaultfd(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    region = mem.anon(pages * mem.PAGE_SIZE)
    send_uffd(sock, ufd, region)
    for line in sock.makefile("rb"):
        command = json.loads(line)
        if "exit" in command:
            break
        for page in command.get("write", []):
            region.write(page * mem.PAGE_SIZE, b"\x5a")
        for page in command.get("read", []):
            region.read(page * mem.PAGE_SIZE, 1)
        done = len(command.get("write", [])) + len(command.get("read", []))
        sock.sendall(json.dumps({"ok": done}).encode() + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
