"""Constant values equal the kernel's uAPI, and the running kernel agrees with them."""

from __future__ import annotations

import pytest
from conftest import CAPS, FEATURE_BITS, IOCTL_BITS, PAGE, requires, requires_kernel

import uffd
from uffd import Feature, Ioctl, Mode

# -- values ------------------------------------------------------------------------


@pytest.mark.parametrize(("bit", "name"), list(enumerate(FEATURE_BITS)))
def test_feature_bit(bit, name):
    """Each UFFD_FEATURE_* has the kernel's bit (api.md order, bits 0..16)."""
    assert int(Feature[name]) == 1 << bit


def test_mode_values():
    """UFFDIO_REGISTER_MODE_MISSING/WP/MINOR are 1, 2 and 4."""
    assert (int(Mode.MISSING), int(Mode.WP), int(Mode.MINOR)) == (1, 2, 4)


@pytest.mark.parametrize(("name", "bit"), sorted(IOCTL_BITS.items()))
def test_ioctl_bit(name, bit):
    """Each Ioctl member is one bit at its _UFFDIO_* number."""
    assert int(Ioctl[name]) == 1 << bit


def test_ioctl_request_numbers_match_their_bits():
    """The UFFDIO_* request codes carry the same _UFFDIO_* numbers (ioctl nr field)."""
    from uffd._native import lib

    for name, bit in IOCTL_BITS.items():
        request = getattr(lib, f"UFFDIO_{name}")
        assert request & 0xFF == bit, name
        assert (request >> 8) & 0xFF == 0xAA, name  # UFFDIO type


# -- forward compatibility -------------------------------------------------------------


def test_unknown_feature_bit_is_kept():
    """``Feature(1 << 40)`` keeps its bit instead of raising."""
    assert int(Feature(1 << 40)) == 1 << 40
    assert int(Feature.MOVE | Feature(1 << 40)) == (1 << 16) | (1 << 40)


def test_unknown_ioctl_bit_is_kept():
    """``Ioctl(1 << 20)`` keeps its bit instead of raising."""
    assert int(Ioctl(1 << 20)) == 1 << 20


def test_register_answer_with_unknown_bit_is_kept():
    """A register answer with a bit this library does not know keeps every bit."""
    answer = Ioctl(0x13C | 1 << 30)
    assert int(answer) == 0x13C | 1 << 30
    assert Ioctl.COPY in answer and Ioctl.POISON in answer


# -- the running kernel ----------------------------------------------------------------


@requires_kernel(6, 8, "UFFD_FEATURE_MOVE is the newest of the 17 features")
def test_kernel_offers_all_17_features():
    """On Linux >= 6.8 ``probe().available`` is exactly bits 0..16."""
    assert int(CAPS.available) == (1 << 17) - 1, CAPS.missing_features


def test_available_bits_are_all_known():
    """Every bit the kernel reports is one of the 17 this library names."""
    assert int(CAPS.available) & ~((1 << 17) - 1) == 0


def test_api_handshake_reports_register_unregister_api():
    """UFFDIO_API's ioctls are exactly REGISTER|UNREGISTER|API."""
    with uffd.Userfaultfd() as ufd:
        assert ufd.ioctls == Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API
        assert int(ufd.ioctls) == (1 << 63) | 0b11


@requires_kernel(6, 8, "UFFDIO_MOVE (6.8) and UFFDIO_POISON (6.6) in the register answer")
def test_register_anon_missing_grants_0x13c(uffd_factory, anon_region):
    """Registering anon MISSING grants exactly 0x13C: WAKE|COPY|ZEROPAGE|MOVE|POISON.

    This proves the MOVE (5) and POISON (8) bit numbers are the kernel's.
    """
    ufd = uffd_factory()
    granted = ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    assert int(granted) == 0x13C
    assert granted == Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.MOVE | Ioctl.POISON


@requires(Feature.PAGEFAULT_FLAG_WP)
def test_register_anon_wp_adds_writeprotect(uffd_factory, anon_region):
    """Registering anon MISSING|WP also grants WRITEPROTECT (bit 6)."""
    ufd = uffd_factory(Feature.PAGEFAULT_FLAG_WP)
    granted = ufd.register(anon_region.addr, anon_region.length, Mode.MISSING | Mode.WP)
    assert Ioctl.WRITEPROTECT in granted and Ioctl.COPY in granted


@requires(Feature.MINOR_SHMEM)
def test_register_shmem_minor_grants_continue(uffd_factory, shmem_region):
    """Registering shmem MINOR grants CONTINUE (bit 7)."""
    ufd = uffd_factory(Feature.MINOR_SHMEM)
    granted = ufd.register(shmem_region.addr, shmem_region.length, Mode.MINOR)
    assert Ioctl.CONTINUE in granted


def test_page_size_matches_probe():
    """probe() reports the page size the tests use."""
    assert CAPS.page_size == PAGE
