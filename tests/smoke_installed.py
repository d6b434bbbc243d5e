"""Smoke test of an installed pyuffd, run as a file from outside the checkout (by .ci/run).

Usage: ``python smoke_installed.py CHECKOUT``. Proves that the installed
package (not the checkout's ``uffd/``) imports, reports the version its
metadata carries, probes the host, and serves a fault through its compiled
extension. Exits non-zero with the reason on any failure.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path


def main(checkout: Path) -> int:
    """Run the checks; 0 when the installed package works, else 1 with the reason."""
    import uffd
    from uffd import FaultHandler, Mode, Resolution, UffdOps

    where = Path(uffd.__file__).resolve()
    if where.is_relative_to(checkout.resolve()):
        print(f"smoke: imported uffd from the checkout ({where}), not the install", file=sys.stderr)
        return 1
    if uffd.__version__ != metadata.version("pyuffd"):
        print(f"smoke: __version__ {uffd.__version__} is not the metadata's", file=sys.stderr)
        return 1
    caps = uffd.probe()
    if not (caps.syscall.works or caps.device.works or caps.user_mode_only.works):
        print(f"smoke: no userfaultfd open path works here:\n{caps}", file=sys.stderr)
        return 1

    page = os.urandom(caps.page_size)

    class Filler(UffdOps):
        """Every page of the region holds the same random page."""

        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            return Resolution.copy(page)

    region = uffd.mem.anon(4 * caps.page_size)
    with FaultHandler(deadline=5.0) as handler:
        handler.register(region, Mode.MISSING, Filler())
        got = region.read(2 * caps.page_size, caps.page_size)
    region.close()
    if got != page:
        print("smoke: the served page has the wrong contents", file=sys.stderr)
        return 1
    print(f"smoke: pyuffd {uffd.__version__} from {where.parent}: probe ok, a fault served")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
