"""A custom UffdOps: pages computed on first touch, first writes logged (the README example)."""

import hashlib

import uffd
from uffd import FaultHandler, Feature, Mode, Resolution, UffdOps


class Derived(UffdOps):
    """Every page holds the SHA-256 of its index, repeated: computed on first touch.

    Pages go in write-protected (keep_wp=True), so the first write to each one
    raises a WP fault: handle_wp logs it and lifts the protection.
    """

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        digest = hashlib.sha256(str(fault.offset // 4096).encode()).digest()
        return Resolution.copy(digest * (4096 // 32), keep_wp=True)

    def handle_wp(self, fault: uffd.Fault) -> Resolution:
        print(f"first write to page {fault.offset // 4096} by thread {fault.thread_id}")
        return Resolution.unprotect()


region = uffd.mem.anon(64 * 4096)
with FaultHandler(features=Feature.THREAD_ID, deadline=1.0) as handler:
    handler.register(region, Mode.MISSING | Mode.WP, Derived())
    assert region.read(4096, 32) == hashlib.sha256(b"1").digest()  # page 1 computed
    region.write(4096, b"hello")  # its first write: logged
    region.write(4096 + 64, b"again")  # no longer protected: not logged
    region.write(5 * 4096, b"x")  # page 5 computed, then its first write logged
total = handler.stats.total  # final once the handler has stopped
print(f"faults {dict(total.faults)}, resolutions {dict(total.resolutions)}")
