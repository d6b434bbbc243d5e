"""Child side of the userfaultfd handover the helper scripts share with conftest.HelperProcess.

The parent starts a script with one end of a socketpair (its fd number the
first argument); the script sends one JSON header line (addr, length,
features, available, ioctls, pid) with its userfaultfd attached (SCM_RIGHTS).
"""

from __future__ import annotations

import json
import os
import socket

from uffd import Userfaultfd, mem


def uffd_header(ufd: Userfaultfd, region: mem.Region) -> dict[str, int]:
    """What the parent needs to serve ``region`` through ``ufd`` once it has the fd."""
    return {
        "addr": region.addr,
        "length": region.length,
        "features": int(ufd.features),
        "available": int(ufd.available),
        "ioctls": int(ufd.ioctls),
        "pid": os.getpid(),
    }


def send_uffd(sock: socket.socket, ufd: Userfaultfd, region: mem.Region) -> None:
    """Send the header describing ``region`` and ``ufd``, with the fd attached."""
    header = uffd_header(ufd, region)
    socket.send_fds(sock, [json.dumps(header).encode() + b"\n"], [ufd.fileno()])
