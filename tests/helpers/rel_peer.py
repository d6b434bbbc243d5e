"""Child script: a process that hands its memory to the handler daemon, Firecracker style.

Usage: ``python rel_peer.py SOCKET NPAGES [--drop] [--serve]``.

Imports everything first (the venv may not be readable by the target user),
then with ``--drop`` becomes uid/gid 65534 (nobody) for good. It opens a
userfaultfd (``user_mode_only=True`` when unprivileged: the only kind that
user may open here), maps NPAGES anonymous pages, registers them MISSING,
connects to SOCKET and sends the handshake (JSON mappings + the fd). With
``--serve`` it then reads every page (user-mode accesses, served by the
daemon) and checks it against ``rel_common.page_pattern``.

stdout, one JSON line: ``{"uid", "connected", "connect_errno", "sent",
"served_ok", "bad_pages"}``. SIGALRM after 30 s bounds everything (a refused
peer that touched its memory would otherwise wait forever).
"""

from __future__ import annotations

import json
import os
import socket
import sys

from rel_common import arm_alarm, drop_privileges, page_pattern

import uffd
from uffd import Mode, mem
from uffd.restore.firecracker import GuestRegionUffdMapping, send_handshake


def main() -> int:
    arm_alarm(30)
    path, npages = sys.argv[1], int(sys.argv[2])
    flags = set(sys.argv[3:])
    if "--drop" in flags:
        drop_privileges()
    result: dict[str, object] = {"uid": os.getuid(), "connected": False, "sent": False}
    ufd = uffd.Userfaultfd(user_mode_only=os.getuid() != 0)
    region = mem.anon(npages * mem.PAGE_SIZE)
    ufd.register(region.addr, region.length, Mode.MISSING)
    mapping = GuestRegionUffdMapping(region.addr, region.length, 0, mem.PAGE_SIZE)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(path)
    except OSError as err:
        result["connect_errno"] = err.errno
        print(json.dumps(result), flush=True)
        return 0
    result["connected"] = True
    send_handshake(sock, ufd, [mapping])
    result["sent"] = True
    sock.close()
    if "--serve" in flags:
        ps = mem.PAGE_SIZE
        data = region.read(0, region.length)
        bad = [i for i in range(npages) if data[i * ps : (i + 1) * ps] != page_pattern(i, ps)]
        result["served_ok"] = not bad
        result["bad_pages"] = bad[:10]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
