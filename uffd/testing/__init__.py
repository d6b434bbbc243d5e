"""``uffd.testing``: a pytest plugin for projects that use userfaultfd.

Installed with pyuffd and loaded by pytest through the ``pytest11`` entry
point (or ``-p uffd.testing``). CI hosts often cannot run userfaultfd (a
container's seccomp profile, no privilege, an old kernel, no huge pages):
tests say what they need and are skipped with the reason where the host
lacks it, instead of failing.

Marker::

    @pytest.mark.requires_uffd(features=Feature.MOVE, memory="hugetlb", hugepages=2)

``features`` (a ``Feature`` set, or names: ``"MOVE,WP_ASYNC"``) must be
available and some way to open a userfaultfd must work (``uffd.probe()``,
whose reason the skip repeats). ``memory`` ("anon", "shmem" or "hugetlb")
adds what registering that memory needs; "hugetlb" also reserves
``hugepages`` free huge pages for the test: as root by raising
vm.nr_hugepages (restored afterwards), otherwise only pages already free.
``python -m uffd probe --require FEATURE,...`` is the same gate for shell CI.

Fixtures (each cleans up after the test, in a safe order: handlers stopped,
then regions unmapped, then huge pages given back):

- ``uffd_caps``: the host's ``uffd.probe()`` (once per session).
- ``uffd_hugepages``: ``reserve(n)`` -> the huge page size, or a skip.
- ``uffd_region_factory``: ``make(kind="anon", pages=4, **kwargs)`` -> a
  ``uffd.mem`` Region (pages of the kind's own size).
- ``uffd_region``: two pages of each memory kind in turn (parametrised).
- ``uffd_handler``: a started ``FaultHandler`` (user-mode-only where that is
  all this user may open); ``stop()`` at teardown re-raises handler errors.
- ``uffd_served_region``: ``serve(data, kind="anon")`` -> a Region whose
  pages fault in from ``data`` through ``uffd_handler``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from uffd.testing._hugepages import HugePages, Unavailable

if TYPE_CHECKING:
    from uffd import Capabilities, FaultHandler, Feature
    from uffd.mem import Region

__all__ = ["MEMORY_KINDS", "requirement_unmet"]

MEMORY_KINDS = ("anon", "shmem", "hugetlb")
"""The memory kinds of ``uffd.mem``, in the order ``uffd_region`` runs them."""

_CAPS: list[Capabilities] = []


def _caps() -> Capabilities:
    if not _CAPS:
        from uffd import probe

        _CAPS.append(probe())
    return _CAPS[0]


def requirement_unmet(features: Feature | str = "", memory: str | None = None) -> str | None:
    """Why this host cannot run a test that needs ``features`` on ``memory``; None if it can.

    Huge page availability is not checked here (``uffd_hugepages`` reserves them).

    Raises:
        ValueError: an unknown feature name or memory kind.
    """
    from uffd import Feature
    from uffd.probe import parse_features, unmet

    wanted = parse_features(features) if isinstance(features, str) else Feature(features)
    if memory == "shmem":
        wanted |= Feature.MISSING_SHMEM
    elif memory == "hugetlb":
        wanted |= Feature.MISSING_HUGETLBFS
    elif memory not in (None, "anon"):
        raise ValueError(f"memory must be one of {', '.join(MEMORY_KINDS)}, got {memory!r}")
    return unmet(_caps(), wanted)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so ``--strict-markers`` accepts it."""
    config.addinivalue_line(
        "markers",
        "requires_uffd(features=..., memory=None, hugepages=2): skip unless this host can "
        "open a userfaultfd with these features (and, for memory='hugetlb', reserve huge "
        "pages); the reason names what is missing (uffd.testing)",
    )


@pytest.fixture(scope="session")
def uffd_caps() -> Capabilities:
    """What this host allows (``uffd.probe()``), computed once per session."""
    return _caps()


@pytest.fixture
def uffd_hugepages() -> Iterator[Callable[[int], int]]:
    """Factory: ``reserve(n)`` makes >= n free default-size huge pages exist; returns their size.

    Skips the test with the reason when they cannot be had. Restores
    vm.nr_hugepages at teardown (always) and holds a host-wide lock meanwhile.
    """
    pages = HugePages()

    def reserve(n: int) -> int:
        try:
            return pages.reserve(n)
        except Unavailable as why:
            pytest.skip(str(why))

    try:
        yield reserve
    finally:
        pages.close()


@pytest.fixture(autouse=True)
def _uffd_requirements(request: pytest.FixtureRequest) -> None:
    """Apply the test's ``requires_uffd`` markers: skip with the reason, or reserve huge pages."""
    for marker in request.node.iter_markers("requires_uffd"):
        if marker.args:
            raise TypeError("requires_uffd takes keyword arguments only: features=, memory=")
        memory = marker.kwargs.get("memory")
        why = requirement_unmet(marker.kwargs.get("features", ""), memory)
        if why is not None:
            pytest.skip(why)
        if memory == "hugetlb":
            request.getfixturevalue("uffd_hugepages")(marker.kwargs.get("hugepages", 2))


class _Regions:
    """The regions one test made, unmapped at teardown (after its handlers stopped)."""

    def __init__(self, reserve: Callable[[int], int]) -> None:
        self._reserve = reserve
        self.made: list[Region] = []

    def make(self, kind: str = "anon", pages: int = 4, **kwargs: Any) -> Region:
        from uffd import mem

        if kind == "hugetlb":
            region = mem.hugetlb(pages * self._reserve(pages), **kwargs)
        elif kind in ("anon", "shmem"):
            region = getattr(mem, kind)(pages * mem.PAGE_SIZE, **kwargs)
        else:
            raise ValueError(f"kind must be one of {', '.join(MEMORY_KINDS)}, got {kind!r}")
        self.made.append(region)
        return region

    def close(self) -> None:
        for region in reversed(self.made):
            region.close()


@pytest.fixture
def uffd_region_factory(
    uffd_hugepages: Callable[[int], int],
) -> Iterator[Callable[..., Region]]:
    """Factory: ``make(kind="anon", pages=4, **kwargs)`` -> a Region, unmapped at teardown.

    ``pages`` counts the kind's own pages (huge pages for "hugetlb", reserved
    for the test); kwargs go to ``uffd.mem.<kind>`` (``private=``, ``align=``).
    """
    regions = _Regions(uffd_hugepages)
    try:
        yield regions.make
    finally:
        regions.close()


@pytest.fixture(params=MEMORY_KINDS)
def uffd_region(
    request: pytest.FixtureRequest, uffd_region_factory: Callable[..., Region]
) -> Region:
    """Two pages of each memory kind in turn; skipped where the kind cannot be served here."""
    why = requirement_unmet(memory=request.param)
    if why is not None:
        pytest.skip(why)
    return uffd_region_factory(request.param, pages=2)


@pytest.fixture
def uffd_handler(
    request: pytest.FixtureRequest, uffd_region_factory: Callable[..., Region]
) -> Iterator[FaultHandler]:
    """A started ``FaultHandler``; stopped at teardown, which re-raises its handlers' errors.

    It enables the features of the test's ``requires_uffd`` markers (e.g.
    THREAD_ID, so faults carry the thread id). Where this user may only open
    a user-mode-only userfaultfd, the handler uses one (kernel-mode accesses
    to its regions then fail with EFAULT). Skips when no userfaultfd can be
    opened at all.
    """
    from uffd import FaultHandler, Feature, Userfaultfd
    from uffd.probe import parse_features

    features = Feature(0)
    for marker in request.node.iter_markers("requires_uffd"):
        wanted = marker.kwargs.get("features", "")
        features |= parse_features(wanted) if isinstance(wanted, str) else Feature(wanted)
    why = requirement_unmet(features)
    if why is not None:
        pytest.skip(why)
    caps = _caps()
    if caps.syscall.works or caps.device.works:
        handler = FaultHandler(features=features)
    else:
        handler = FaultHandler(uffd=Userfaultfd(features, user_mode_only=True))
    handler.start()
    try:
        yield handler
    finally:
        handler.stop()


@pytest.fixture
def uffd_served_region(
    uffd_handler: FaultHandler, uffd_region_factory: Callable[..., Region]
) -> Callable[..., Region]:
    """Factory: ``serve(data, kind="anon")`` -> a Region whose pages fault in from ``data``.

    ``data`` (bytes-like) fills the region, whose length it must be a whole
    number of the kind's pages; faults are served by ``uffd_handler`` from
    the buffer (natively, without Python, by ``uffd.modules.BufferOps``).

    Raises (from ``serve``):
        ValueError: ``data`` is empty or not whole pages of that kind.
    """
    from uffd import Mode
    from uffd.mem import PAGE_SIZE, huge_page_size
    from uffd.modules import BufferOps

    def serve(data: Any, kind: str = "anon") -> Region:
        why = requirement_unmet(memory=kind)
        if why is not None:
            pytest.skip(why)
        view = memoryview(data).cast("B")
        page = huge_page_size() if kind == "hugetlb" else PAGE_SIZE
        if not view.nbytes or view.nbytes % page:
            raise ValueError(
                f"data of {view.nbytes} bytes is not a whole number of {kind} pages ({page} bytes)"
            )
        region = uffd_region_factory(kind, pages=view.nbytes // page)
        uffd_handler.register(region, Mode.MISSING, BufferOps(view))
        return region

    return serve
