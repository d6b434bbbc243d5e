"""Kernel constants as ``enum.IntFlag``: ``Feature``, ``Mode``, ``Ioctl``.

Values come from the compiled extension, which takes them from the 6.18
uAPI headers (see csrc/uffd_uapi.h); names drop the kernel prefix. Unknown
bits that a newer kernel reports are kept as raw bits, never rejected:
``IntFlag`` keeps pseudo-members for any integer (``boundary=KEEP``).
"""

from __future__ import annotations

import enum

from uffd._native import lib

__all__ = ["Feature", "Ioctl", "Mode"]


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* bits negotiated by UFFDIO_API (userfaultfd(2))."""

    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE


class Mode(enum.IntFlag):
    """UFFDIO_REGISTER_MODE_* bits: which faults a registered range reports."""

    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


class Ioctl(enum.IntFlag):
    """One bit per ``_UFFDIO_*`` number, as UFFDIO_API and UFFDIO_REGISTER report them."""

    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    MOVE = 1 << lib._UFFDIO_MOVE
    WRITEPROTECT = 1 << lib._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << lib._UFFDIO_CONTINUE
    POISON = 1 << lib._UFFDIO_POISON
    API = 1 << lib._UFFDIO_API


for _flag in (Feature, Mode, Ioctl):
    _flag.__module__ = "uffd"
