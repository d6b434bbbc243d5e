"""Quickstart: register a region and serve its faults from a thread (the README example)."""

import os
import threading

import uffd
from uffd import Mode

SIZE = 16 * 4096
pages = os.urandom(SIZE)  # where the contents come from
region = uffd.mem.anon(SIZE)  # memory that starts empty

fd = uffd.Userfaultfd()
fd.register(region.addr, region.length, Mode.MISSING)
served = []


def serve() -> None:  # resolve each fault with a copy
    for _ in range(SIZE // 4096):
        (fault,) = fd.read_events(max_events=1, timeout=5)
        page = fault.address - region.addr
        fd.copy(fault.address, pages[page : page + 4096], 4096)
        served.append(page // 4096)


server = threading.Thread(target=serve)
server.start()
assert region.read(0, SIZE) == pages  # faults in, page by page
server.join()
print(f"served {len(served)} faults, pages {served}: the region holds the random pages")
