"""Shared helpers for the whole suite: capability gates, fixtures and fault helpers.

Everything here runs against the real kernel. The capability gates, huge
page reservations and regions come from pyuffd's own pytest plugin,
``uffd.testing`` (``requires_uffd`` marker, ``uffd_*`` fixtures), under the
names the suite has always used. What a test may rely on:

- ``CAPS`` (``uffd.probe()``, computed once), ``KERNEL`` ((major, minor)),
  ``PAGE`` (the base page size) and ``HPAGE`` (the default huge page size).
- ``requires(*features)`` (the plugin's ``requires_uffd`` marker),
  ``skip_unless(*features)`` and ``requires_kernel(major, minor, why)``: skips
  whose reason names what is missing and the running kernel.
- ``reserve_hugepages(n)`` (factory) and ``hugetlb_pages`` (indirect param,
  default 4): make at least n free default-size huge pages exist, restore
  vm.nr_hugepages at teardown, skip with the reason when that fails.
- ``uffd_factory(features, **kwargs)``: Userfaultfd objects closed at teardown.
- ``region_factory(kind, pages=4, **kwargs)``, ``anon_region``,
  ``shmem_region``, ``region_kind`` (parametrised anon/shmem/hugetlb): regions
  unmapped at teardown (after every uffd is closed, so no thread stays stuck);
  ``track_region(region)`` adds one the test made itself (an alias).
- ``run_toucher(region, offset, n, write=False, read=False)`` and
  ``run_in_thread(fn, *args)``: run a blocking access in a helper thread while
  the main thread serves the fault; ``.finish()`` joins with a timeout.
- ``pagemap(addr)``: the /proc/self/pagemap entry, with ``PM_PRESENT`` and
  ``PM_UFFD_WP`` bit masks.
- ``HelperProcess(script, *args)``: a ``tests/helpers`` script in a child
  process that hands over its userfaultfd (``forker`` builds on it).

Teardown order: uffds are closed first (that wakes any thread still blocked in
a fault or in an event wait), then helper threads are joined, then regions
are unmapped, then vm.nr_hugepages is restored.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import uffd
from uffd import Feature, mem
from uffd.testing import requirement_unmet
from uffd.testing._hugepages import HugePages, Unavailable

CAPS = uffd.probe()
"""What this host allows; every feature-dependent test gates on it."""


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short temporary directory (Unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="uffd-t-", dir="/tmp") as path:
        yield path


def _kernel_version(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


KERNEL = _kernel_version(CAPS.kernel)
"""The running kernel's (major, minor)."""

PAGE = mmap.PAGESIZE
"""The base page size."""

try:
    HPAGE = mem.huge_page_size()
except OSError:
    HPAGE = 2 << 20
"""The default huge page size (2 MiB on x86_64)."""

NO_FEATURES = Feature(0)
"""The empty feature set (a module-level default for factories)."""

WAIT = 5.0
"""Upper bound, in seconds, of every wait in the suite (events, joins, sockets)."""

PM_PRESENT = 1 << 63
"""/proc/self/pagemap: page present."""

PM_UFFD_WP = 1 << 57
"""/proc/self/pagemap: pte is uffd-wp write-protected (admin-guide/mm/pagemap.rst)."""

HAS_PAGEMAP_WP = KERNEL >= (5, 13)
"""Whether pagemap reports ``PM_UFFD_WP`` (Linux 5.13)."""

FEATURE_BITS = [
    "PAGEFAULT_FLAG_WP",
    "EVENT_FORK",
    "EVENT_REMAP",
    "EVENT_REMOVE",
    "MISSING_HUGETLBFS",
    "MISSING_SHMEM",
    "EVENT_UNMAP",
    "SIGBUS",
    "THREAD_ID",
    "MINOR_HUGETLBFS",
    "MINOR_SHMEM",
    "EXACT_ADDRESS",
    "WP_HUGETLBFS_SHMEM",
    "WP_UNPOPULATED",
    "POISON",
    "WP_ASYNC",
    "MOVE",
]
"""UFFD_FEATURE_* names (prefix dropped) in bit order: include/uapi/linux/userfaultfd.h."""

IOCTL_BITS = {
    "REGISTER": 0x00,
    "UNREGISTER": 0x01,
    "WAKE": 0x02,
    "COPY": 0x03,
    "ZEROPAGE": 0x04,
    "MOVE": 0x05,
    "WRITEPROTECT": 0x06,
    "CONTINUE": 0x07,
    "POISON": 0x08,
    "API": 0x3F,
}
"""_UFFDIO_* ioctl numbers (the bit of each in the api ``ioctls`` mask), same header."""

KIND_MISSING_FEATURE = {
    "anon": Feature(0),
    "shmem": Feature.MISSING_SHMEM,
    "hugetlb": Feature.MISSING_HUGETLBFS,
}
"""The feature a kernel reports when MISSING registration works for a memory kind."""

KIND_MINOR_FEATURE = {
    "shmem": Feature.MINOR_SHMEM,
    "hugetlb": Feature.MINOR_HUGETLBFS,
}
"""The feature MINOR registration (UFFDIO_CONTINUE) needs, per memory kind."""


# -- capability gates ------------------------------------------------------


def requires(*features: Feature) -> pytest.MarkDecorator:
    """Skip unless the kernel offers every feature; the reason names the missing ones.

    The ``requires_uffd`` marker of the ``uffd.testing`` plugin, which users' suites use too.
    """
    wanted = NO_FEATURES
    for f in features:
        wanted |= f
    return pytest.mark.requires_uffd(features=wanted)


def requires_kernel(major: int, minor: int, why: str) -> pytest.MarkDecorator:
    """Skip on kernels older than ``major.minor``; the reason says why and what runs."""
    return pytest.mark.skipif(
        (major, minor) > KERNEL,
        reason=f"needs Linux {major}.{minor}+ ({why}); running {CAPS.kernel}",
    )


requires_syscall = pytest.mark.skipif(
    not CAPS.syscall.works, reason=f"the userfaultfd syscall fails here: {CAPS.syscall.reason}"
)
"""Skip unless userfaultfd(2) opens and initialises a fd (``via="syscall"``)."""


def skip_unless(*features: Feature) -> None:
    """``pytest.skip`` inside a test (for parametrised cases) unless the features exist."""
    wanted = NO_FEATURES
    for f in features:
        wanted |= f
    why = requirement_unmet(wanted)
    if why is not None:
        pytest.skip(why)


# -- huge pages (the plugin's reservation, under the names the suite uses) ----


@contextlib.contextmanager
def hugepage_lock() -> Iterator[None]:
    """Serialise vm.nr_hugepages changes with other test processes on this host."""
    pages = HugePages()
    try:
        pages.lock()
    except Unavailable as why:
        pytest.skip(str(why))
    try:
        yield
    finally:
        pages.close()


def huge_available() -> int:
    """Default-size huge pages free and not reserved by another mapping."""
    return HugePages().available()


@pytest.fixture
def reserve_hugepages(uffd_hugepages: Callable[[int], int]) -> Callable[[int], int]:
    """Factory: ``reserve_hugepages(n)`` makes >= n free default-size huge pages exist.

    The plugin's ``uffd_hugepages``: raises /proc/sys/vm/nr_hugepages by what
    is missing, holds the host-wide lock for the rest of the test, restores
    the old value at teardown, and skips with the reason when the pages
    cannot be had. Returns the huge page size.
    """
    return uffd_hugepages


@pytest.fixture
def hugetlb_pages(request: pytest.FixtureRequest, reserve_hugepages: Callable[[int], int]) -> int:
    """At least ``request.param`` (default 4) free huge pages; returns the huge page size.

    Use ``@pytest.mark.parametrize("hugetlb_pages", [n], indirect=True)`` for n.
    """
    return reserve_hugepages(getattr(request, "param", 4))


# -- uffds, regions, threads -------------------------------------------------


class Helper(threading.Thread):
    """A daemon thread running ``fn(*args)``; keeps its result or exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True, name=f"helper-{getattr(fn, '__name__', 'fn')}")
        self._fn, self._args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._fn(*self._args)
        except BaseException as err:  # handed to the test by finish()
            self.error = err

    def finish(self, timeout: float = WAIT) -> Any:
        """Join (bounded), assert the thread ended, re-raise its error, return its result."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} still blocked after {timeout} s"
        if self.error is not None:
            raise self.error
        return self.result


_LIVE_THREADS: list[Helper] = []


def run_in_thread(fn: Callable[..., Any], *args: Any) -> Helper:
    """Start ``fn(*args)`` in a helper thread (for calls that block until an event is read)."""
    thread = Helper(fn, *args)
    thread.start()
    _LIVE_THREADS.append(thread)
    return thread


def run_toucher(
    region: mem.Region, offset: int, n: int, write: bool = False, *, read: bool = False
) -> Helper:
    """Access ``region`` from a helper thread and return it, started.

    ``Region.touch`` (or ``Region.read`` with ``read=True``; ``.result`` then
    holds the bytes) releases the GIL, so the main thread can serve the fault
    with ``read_events(timeout=...)`` and then ``finish()`` the thread.
    """
    if read:
        return run_in_thread(region.read, offset, n)
    return run_in_thread(region.touch, offset, n, write)


def wait_readable(ufd: uffd.Userfaultfd, timeout: float = WAIT) -> bool:
    """True once an event is pending on ``ufd`` (without reading it)."""
    import select

    poller = select.poll()
    poller.register(ufd.fileno(), select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def read_one(ufd: uffd.Userfaultfd, timeout: float = WAIT) -> uffd.Event:
    """Read exactly one event, waiting at most ``timeout`` seconds."""
    events = ufd.read_events(max_events=1, timeout=timeout)
    assert len(events) == 1, f"expected one event within {timeout} s, got {events}"
    return events[0]


def pagemap(addr: int) -> int:
    """The 64-bit /proc/self/pagemap entry of the page holding ``addr``."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        (entry,) = struct.unpack("=Q", f.read(8))
    return int(entry)


class _Resources:
    """What one test opened; released in a safe order at teardown."""

    def __init__(self) -> None:
        self.uffds: list[uffd.Userfaultfd] = []
        self.regions: list[mem.Region] = []

    def release(self) -> None:
        for ufd in self.uffds:
            ufd.close()
        threads, _LIVE_THREADS[:] = list(_LIVE_THREADS), []
        for thread in threads:
            thread.join(WAIT)
        for region in reversed(self.regions):
            region.close()


@pytest.fixture
def _resources(uffd_region_factory: Callable[..., mem.Region]) -> Iterator[_Resources]:
    # Depends on the plugin's region factory so that its regions are unmapped
    # (and huge pages given back) after every uffd here is closed.
    res = _Resources()
    try:
        yield res
    finally:
        res.release()


@pytest.fixture
def uffd_factory(_resources: _Resources) -> Callable[..., uffd.Userfaultfd]:
    """Factory: ``uffd_factory(features=Feature(0), **kwargs)`` -> an open Userfaultfd.

    Every fd it opens is closed at teardown, before regions are unmapped.
    """

    def make(features: Feature | int = NO_FEATURES, **kwargs: Any) -> uffd.Userfaultfd:
        ufd = uffd.Userfaultfd(features, **kwargs)
        _resources.uffds.append(ufd)
        return ufd

    return make


@pytest.fixture
def region_factory(
    _resources: _Resources, uffd_region_factory: Callable[..., mem.Region]
) -> Callable[..., mem.Region]:
    """Factory: ``region_factory(kind, pages=4, **kwargs)`` -> a Region unmapped at teardown.

    The plugin's ``uffd_region_factory``: ``pages`` counts the kind's own
    pages (huge pages for "hugetlb", reserved for the test); kwargs go to
    ``uffd.mem.<kind>``. Unmapped after every uffd of ``uffd_factory`` is closed.
    """
    return uffd_region_factory


@pytest.fixture
def track_region(_resources: _Resources) -> Callable[[mem.Region], mem.Region]:
    """``track_region(region)`` hands a region the test made (an alias...) to the teardown."""

    def track(region: mem.Region) -> mem.Region:
        _resources.regions.append(region)
        return region

    return track


@pytest.fixture
def anon_region(region_factory: Callable[..., mem.Region]) -> mem.Region:
    """Four pages of private anonymous memory."""
    return region_factory("anon")


@pytest.fixture
def shmem_region(region_factory: Callable[..., mem.Region]) -> mem.Region:
    """Four pages of shared memfd (shmem) memory."""
    return region_factory("shmem")


@pytest.fixture(params=["anon", "shmem", "hugetlb"])
def region_kind(
    request: pytest.FixtureRequest, region_factory: Callable[..., mem.Region]
) -> mem.Region:
    """Two pages of each memory kind (huge pages for hugetlb, reserved for the test)."""
    return region_factory(request.param, pages=2)


def adopt_fd(fd: int, features: int, available: int, ioctls: int) -> uffd.Userfaultfd:
    """Wrap a userfaultfd received from another process (SCM_RIGHTS) as a Userfaultfd.

    The library has no public constructor from a raw, already initialised fd,
    so this uses the same private path as a Fork event.
    """
    from types import SimpleNamespace

    parent = SimpleNamespace(
        features=Feature(features), available=Feature(available), ioctls=uffd.Ioctl(ioctls)
    )
    return uffd.Userfaultfd._adopt(fd, parent)  # type: ignore[arg-type]


# -- a forking child process (EVENT_FORK) -------------------------------------

HELPERS = Path(__file__).resolve().parent / "helpers"


class HelperProcess:
    """A ``tests/helpers`` script in a child process that hands us its userfaultfd.

    The script gets one end of a socketpair (its fd number first on its
    command line) and sends a JSON header (addr, length, features, available,
    ioctls, pid) with the fd attached (``helpers/_handover.py``); a header
    ``{"error": why}`` without an fd skips the test. ``uffd`` is that fd,
    ``sock`` our end and ``lines`` a binary file over it, for scripts that
    answer in lines.
    """

    def __init__(self, script: str, *args: str) -> None:
        self.sock, theirs = socket.socketpair()
        self.sock.settimeout(WAIT)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(HELPERS / script), str(theirs.fileno()), *args],
                pass_fds=[theirs.fileno()],
            )
        finally:
            theirs.close()
        self.uffd: uffd.Userfaultfd | None = None
        self.lines = self.sock.makefile("rb")
        try:
            msg, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
            self.header: dict[str, int] = json.loads(msg)
            if "error" in self.header:
                pytest.skip(f"{script} cannot open a userfaultfd: {self.header['error']}")
            assert fds, f"{script} sent no fd (message {msg!r})"
            self.uffd = adopt_fd(
                fds[0], self.header["features"], self.header["available"], self.header["ioctls"]
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close our end and the fd, then make sure the child is gone (killed if it lingers)."""
        self.lines.close()
        self.sock.close()
        if self.uffd is not None:
            self.uffd.close()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)


class Forker(HelperProcess):
    """Drives ``tests/helpers/forker.py`` in a child process (see its docstring).

    ``uffd`` is the child's userfaultfd (EVENT_FORK, a region registered
    MISSING at ``header["addr"]``), received over SCM_RIGHTS.
    """

    def __init__(self, nbytes: int = 16) -> None:
        super().__init__("forker.py", str(nbytes))

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, f"forker closed the socket after {data!r}"
            data += chunk
        return data

    def fork(self) -> None:
        """Tell the child to fork; it blocks until the FORK event is read here."""
        self.sock.sendall(b"g")

    def grandchild_data(self) -> bytes:
        """The bytes the grandchild read from the region (after its fault was served)."""
        import struct as _struct

        assert self._recv_exact(1) == b"D"
        (n,) = _struct.unpack("=I", self._recv_exact(4))
        return self._recv_exact(n)

    def wait_grandchild_gone(self) -> None:
        """Return once the child has reaped the grandchild (its mm has exited)."""
        assert self._recv_exact(1) == b"X"


@pytest.fixture
def forker() -> Iterator[Callable[..., Forker]]:
    """Factory: ``forker(nbytes=16)`` -> a started ``Forker``; killed at teardown."""
    started: list[Forker] = []

    def start(nbytes: int = 16) -> Forker:
        child = Forker(nbytes)
        started.append(child)
        return child

    yield start
    for child in started:
        child.close()
