"""vm_uffd_ops emulation: kernel_grant/honoured against the live kernel, derived ops attributes.

docs/dispatch.md: kernel_grant takes its refusals from the memory types and
its ioctl sets from 6.18, and both are checked against the live kernel for
every kind and mode: the emulated decision (refused or granted, and the ioctl
set) must equal what UFFDIO_REGISTER answers on this machine. Each case
registers a fresh region on a Userfaultfd that negotiated every feature the
kernel offers.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import CAPS

import uffd
from uffd import AnonOps, HugetlbOps, Ioctl, Mode, Resolution, ShmemOps, UffdOps, mem
from uffd._ops import KIND_IOCTLS, get_uffd_ops, kernel_grant

# (memory kind as Region.kind says, private mapping?)
LAYOUTS = [
    ("anon", True),
    ("shmem", False),
    ("shmem", True),
    ("hugetlb", False),
    ("hugetlb", True),
]
# Every combination of MISSING/WP/MINOR, mode 0, and an unknown bit alone and with MISSING.
MODES = [Mode(m) for m in range(10)]
BUILTIN = {kind: get_uffd_ops(kind) for kind in ("anon", "shmem", "hugetlb")}


def _make(kind: str, private: bool, reserve: Callable[[int], int]) -> mem.Region:
    if kind == "anon":
        return mem.anon(mem.PAGE_SIZE)
    if kind == "shmem":
        return mem.shmem(mem.PAGE_SIZE, private=private)
    return mem.hugetlb(reserve(1), private=private)


def _kernel_answer(ufd: uffd.Userfaultfd, region: mem.Region, mode: Mode) -> Ioctl | None:
    """What UFFDIO_REGISTER answers: the granted ioctls, or None for a refusal."""
    try:
        granted = ufd.register(region.addr, region.length, mode)
    except (uffd.UnsupportedError, ValueError):
        return None
    ufd.unregister(region.addr, region.length)
    return granted


@pytest.mark.parametrize(
    ("kind", "private", "mode"),
    [
        pytest.param(k, p, m, id=f"{k}-{'private' if p else 'shared'}-mode{int(m)}")
        for (k, p), m in itertools.product(LAYOUTS, MODES)
    ],
)
def test_emulation_equals_kernel(
    kind: str,
    private: bool,
    mode: Mode,
    uffd_factory: Callable[..., uffd.Userfaultfd],
    reserve_hugepages: Callable[[int], int],
) -> None:
    """kernel_grant and the built-in ops' honoured() answer UFFDIO_REGISTER's grant or refusal."""
    ufd = uffd_factory(CAPS.available)
    with _make(kind, private, reserve_hugepages) as region:
        assert region.kind == kind
        real = _kernel_answer(ufd, region, mode)
    emulated = kernel_grant(kind, mode)
    assert emulated == real, (
        f"kernel_grant({kind!r}, {mode!r}) = {emulated!r}, kernel said {real!r}"
    )
    assert BUILTIN[kind].honoured(kind, mode) == real


def test_kernel_facts_recorded() -> None:
    """The facts docs/dispatch.md records: MOVE granted on shmem, no ZEROPAGE/MOVE on hugetlb."""
    assert kernel_grant("shmem", Mode.MISSING) == Ioctl(0x13C)
    assert Ioctl.MOVE & kernel_grant("shmem", Mode.MISSING)  # type: ignore[operator]
    assert kernel_grant("hugetlb", Mode.MISSING | Mode.WP | Mode.MINOR) == Ioctl(0x1CC)
    assert not KIND_IOCTLS["hugetlb"] & (Ioctl.ZEROPAGE | Ioctl.MOVE)
    assert kernel_grant("file", Mode.MISSING) is None
    assert kernel_grant("anon", Mode(8)) is None


@pytest.mark.parametrize(("kind", "private"), LAYOUTS)
def test_handler_register_uses_the_emulation(
    kind: str, private: bool, reserve_hugepages: Callable[[int], int]
) -> None:
    """FaultHandler.register honours ops.ioctls & the kernel grant; refuses what the kernel does."""
    ops = BUILTIN[kind]
    with uffd.FaultHandler() as handler:
        for mode in MODES[1:8]:
            with _make(kind, private, reserve_hugepages) as region:
                if kernel_grant(kind, mode) is None:
                    with pytest.raises(uffd.UnsupportedError):
                        handler.register(region, mode)
                    continue
                mapping = handler.register(region, mode)
                assert mapping.ops is ops
                assert mapping.ioctls == ops.honoured(kind, mode) == kernel_grant(kind, mode)
                handler.unregister(mapping)
                assert handler.mappings == []


# -- derived attributes ------------------------------------------------------


def test_derived_features_and_ioctls() -> None:
    """features and ioctls follow from which handle_* methods a subclass defines."""

    class Missing(UffdOps):
        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            return Resolution.zero()

    class MissingWp(Missing):
        def handle_wp(self, fault: uffd.Fault) -> Resolution:
            return Resolution.unprotect()

    class Minor(UffdOps):
        kind = "shmem"

        def handle_continue(self, fault: uffd.Fault) -> Resolution:
            return Resolution.continue_()

    class Nothing(UffdOps):
        pass

    base = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.POISON
    assert Missing.features == Mode.MISSING
    assert Missing.ioctls == base
    assert MissingWp.features == Mode.MISSING | Mode.WP
    assert MissingWp.ioctls == base | Ioctl.WRITEPROTECT
    assert Minor.features == Mode.MINOR
    assert Minor.ioctls == KIND_IOCTLS["shmem"] & ~Ioctl.WRITEPROTECT
    assert Nothing.features == Mode(0)
    assert AnonOps.features == Mode.MISSING | Mode.WP
    assert AnonOps.ioctls == KIND_IOCTLS["anon"] & ~Ioctl.CONTINUE
    assert ShmemOps.features == HugetlbOps.features == Mode.MISSING | Mode.WP | Mode.MINOR
    assert ShmemOps.ioctls == KIND_IOCTLS["shmem"]
    assert HugetlbOps.ioctls == KIND_IOCTLS["hugetlb"]
    assert Missing().can_userfault(None, Mode.MISSING)  # type: ignore[arg-type]
    assert not Missing().can_userfault(None, Mode.MISSING | Mode.WP)  # type: ignore[arg-type]
    assert not ShmemOps().can_userfault(None, Mode(8) | Mode.MISSING)  # type: ignore[arg-type]
    assert Missing().honoured("shmem", Mode.MISSING) == base
    assert Missing().honoured("hugetlb", Mode.MISSING) == Ioctl.WAKE | Ioctl.COPY | Ioctl.POISON


@pytest.mark.parametrize(
    ("attr", "value", "implied"),
    [
        ("features", Mode.MISSING | Mode.WP, "Mode.MISSING"),
        ("features", Mode(0), "Mode.MISSING"),
        ("ioctls", Ioctl.WAKE | Ioctl.COPY, "ZEROPAGE"),
        (
            "ioctls",
            Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.POISON | Ioctl.CONTINUE,
            "POISON",
        ),
    ],
)
def test_mismatching_declaration_raises_at_class_creation(
    attr: str, value: int, implied: str
) -> None:
    """Declaring features/ioctls the handlers do not imply is a TypeError at class creation."""
    with pytest.raises(TypeError) as info:
        type(
            "Declared",
            (UffdOps,),
            {attr: value, "handle_missing": lambda self, fault: Resolution.zero()},
        )
    message = str(info.value)
    assert f"Declared.{attr}" in message
    assert "disagrees with its handlers" in message
    assert implied in message


def test_matching_declaration_is_accepted() -> None:
    """Declaring exactly what the handlers imply is allowed."""

    class Declared(UffdOps):
        features = Mode.MISSING | Mode.WP
        ioctls = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.POISON | Ioctl.WRITEPROTECT

        def handle_missing(self, fault: uffd.Fault) -> Resolution:
            return Resolution.zero()

        def handle_wp(self, fault: uffd.Fault) -> Resolution:
            return Resolution.unprotect()

    assert Declared.features == Mode.MISSING | Mode.WP
    assert Declared.ioctls & Ioctl.WRITEPROTECT


def test_get_uffd_ops() -> None:
    """get_uffd_ops picks the built-in by kind, passes explicit ops through, rejects "file"."""
    assert isinstance(get_uffd_ops("anon"), AnonOps)
    assert isinstance(get_uffd_ops("shmem"), ShmemOps)
    assert isinstance(get_uffd_ops("hugetlb"), HugetlbOps)
    assert get_uffd_ops("anon") is get_uffd_ops("anon")
    mine = ShmemOps()
    assert get_uffd_ops("anon", mine) is mine
    with pytest.raises(uffd.UnsupportedError) as info:
        get_uffd_ops("file")
    assert "'file'" in str(info.value)
    assert "pass ops=" in str(info.value)
    with pytest.raises(TypeError):
        get_uffd_ops("anon", object())  # type: ignore[arg-type]


def test_get_uffd_ops_of_real_mappings(tmp_path: Path) -> None:
    """get_uffd_ops(mapping): a Region by its kind, an (addr, length) by /proc/self/smaps,
    a registered Mapping by its own ops, a file mapping refused, nothing mapped a ValueError."""
    with mem.anon(mem.PAGE_SIZE) as anon, mem.shmem(mem.PAGE_SIZE) as shm:
        assert isinstance(get_uffd_ops(anon), AnonOps)
        assert isinstance(get_uffd_ops((shm.addr, shm.length)), ShmemOps)
        assert isinstance(get_uffd_ops((anon.addr, anon.length)), AnonOps)
        mine = AnonOps()
        with uffd.FaultHandler() as handler:
            mapping = handler.register(anon, Mode.MISSING, mine)
            assert get_uffd_ops(mapping) is mine
        assert isinstance(get_uffd_ops(shm.alias()), ShmemOps)
    path = tmp_path / "data"
    path.write_bytes(bytes(mem.PAGE_SIZE))
    with path.open("r+b") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        first = ctypes.c_char.from_buffer(m)
        addr = ctypes.addressof(first)
        del first  # releases the export, so the mmap can close
        with pytest.raises(uffd.UnsupportedError, match="'file'"):
            get_uffd_ops((addr, mem.PAGE_SIZE))
    with pytest.raises(ValueError, match="no mapping contains"):
        get_uffd_ops((1 << 46, mem.PAGE_SIZE))
    with pytest.raises(TypeError, match="get_uffd_ops"):
        get_uffd_ops(3.5)
