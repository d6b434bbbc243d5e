"""Default-size huge pages for a test: reserve them, hold a host-wide lock, give them back.

Tests of hugetlb memory need free huge pages, which most hosts do not keep.
As root, :class:`HugePages` raises ``/proc/sys/vm/nr_hugepages`` by what is
missing and restores the old value when closed; other users can only use
pages that are already free. Several test runs on one host (CI jobs, or
engineers side by side) serialise through a lock file, so one run cannot
restore ``nr_hugepages`` between another run's reservation and its mmap.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

__all__ = ["HugePages", "Unavailable"]

LOCK_PATH = Path("/tmp/pyuffd-tests-hugepages.lock")
LOCK_TIMEOUT = 30.0


class Unavailable(Exception):
    """The huge pages cannot be had; ``str()`` says why (the skip reason)."""


class HugePages:
    """Reservations of default-size huge pages for one test; :meth:`close` undoes them.

    ``reserve(n)`` returns the huge page size once at least ``n`` pages are
    free (and not reserved by another mapping). Single-threaded: one test's
    setup and teardown.
    """

    def __init__(self) -> None:
        from uffd.mem import huge_page_size

        try:
            self.size = huge_page_size()
        except OSError as err:
            self.size = 0
            self._why_none = str(err)
        self._dir = Path(f"/sys/kernel/mm/hugepages/hugepages-{self.size // 1024}kB")
        self._stack = contextlib.ExitStack()
        self._locked = False
        self._restore: int | None = None

    def _read(self, name: str) -> int:
        return int((self._dir / name).read_text())

    def available(self) -> int:
        """Default-size huge pages free and not reserved by another mapping."""
        return self._read("free_hugepages") - self._read("resv_hugepages")

    def lock(self) -> None:
        """Hold the host-wide lock until :meth:`close` (taken once).

        Raises:
            Unavailable: another run held the lock for LOCK_TIMEOUT seconds.
        """
        if self._locked:
            return
        handle = self._stack.enter_context(open(LOCK_PATH, "a"))  # noqa: SIM115  (held open)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"another test run held {LOCK_PATH} for {LOCK_TIMEOUT:.0f} s"
                    ) from None
                time.sleep(0.05)
        self._stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        self._locked = True

    def reserve(self, n: int) -> int:
        """Make at least ``n`` free huge pages exist; return the huge page size.

        Raises:
            Unavailable: no hugetlb support, not root and too few free, or
                the kernel could not find the memory (fragmentation).
        """
        if not self.size or not self._dir.is_dir():
            why = getattr(self, "_why_none", f"no {self.size // 1024} KiB hugetlb pool")
            raise Unavailable(f"no huge pages on Linux {os.uname().release}: {why}")
        self.lock()
        if self.available() >= n:
            return self.size
        if os.geteuid() != 0:
            raise Unavailable(
                f"could not reserve {n} huge pages: {self.available()} free and not root "
                "(vm.nr_hugepages is read-only; ask for `sysctl vm.nr_hugepages=N`)"
            )
        path = self._dir / "nr_hugepages"
        old = self._read("nr_hugepages")
        if self._restore is None:
            self._restore = old
            self._stack.callback(path.write_text, f"{old}\n")
        target = old + n - self.available()
        try:
            path.write_text(f"{target}\n")
        except OSError as err:
            raise Unavailable(
                f"could not reserve {n} huge pages: writing nr_hugepages={target}: {err}"
            ) from None
        have = self.available()
        if have < n:
            raise Unavailable(
                f"could not reserve {n} huge pages: only {have} free after writing "
                f"nr_hugepages={target} (memory fragmented?)"
            )
        return self.size

    def close(self) -> None:
        """Restore vm.nr_hugepages (when this changed it) and release the lock."""
        self._stack.close()
        self._locked = False
        self._restore = None
