"""A custom UffdOps: pages computed on first touch, first writes logged (the README example)."""

import hashlib

import uffd
from uffd import FaultHandler, Mode, Resolution, UffdOps


class Derived(UffdOps):
    """Every page holds the SHA-256 of its index, repeated: computed on first touch."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        digest = hashlib.sha256(str(fault.offset // 4096).encode()).digest()
        return Resolution.copy(digest * (4096 // 32))

    def handle_wp(self, fault: uffd.Fault) -> Resolution:
        print(f"first write to page {fault.offset // 4096} by thread {fault.thread_id}")
        return Resolution.unprotect()


region = uffd.mem.anon(64 * 4096)
with FaultHandler(deadline=1.0) as handler:
    handler.register(region, Mode.MISSING | Mode.WP, Derived())
    assert region.read(4096, 32) == hashlib.sha256(b"1").digest()
    print(handler.stats.total.resolutions)
