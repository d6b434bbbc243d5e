"""Where a restored process's memory is: its host addresses, the flat space, the source.

The handshake's regions (:class:`uffd.restore.firecracker.GuestRegionUffdMapping`)
are laid end to end in the order sent: the session's flat space, over which
prefetch plans (:class:`uffd.restore.prefetch.AdaptivePrefetcher`). A flat offset is
a host address in the peer (``base_host_virt_addr`` + the offset in the
region) and a position in the source image (``offset`` + the same).
The regions are expected to stay where the handshake put them (Firecracker
never mremaps guest memory).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

from uffd.restore.firecracker import GuestRegionUffdMapping, HandshakeError

__all__ = ["GuestLayout"]


class GuestLayout:
    """The handshake's regions in the session's flat space; pure arithmetic, thread-safe.

    Raises (constructor):
        HandshakeError: the regions have different page sizes.
    """

    def __init__(self, mappings: Sequence[GuestRegionUffdMapping]) -> None:
        page_sizes = {m.page_size for m in mappings}
        if len(page_sizes) != 1:
            raise HandshakeError(
                "mappings", f"mixed page sizes {sorted(page_sizes)}; one is expected"
            )
        self.page_size = page_sizes.pop()
        self.mappings = list(mappings)
        # Flat offset of each region: no prefetch chunk crosses one.
        self.starts = list(itertools.accumulate((m.size for m in mappings[:-1]), initial=0))
        self.length = sum(m.size for m in mappings)
        self._by_addr = sorted(range(len(mappings)), key=lambda i: mappings[i].base_host_virt_addr)
        self._addr_starts = [mappings[i].base_host_virt_addr for i in self._by_addr]

    def check_source(self, length: int, page_size: int, label: str) -> None:
        """Check every region against a source of ``length`` bytes of ``page_size`` pages.

        Raises:
            HandshakeError: a region lies outside the source, or its page size
                is not a multiple of the source's.
        """
        for i, m in enumerate(self.mappings):
            if m.offset + m.size > length:
                raise HandshakeError(
                    f"mappings[{i}].offset",
                    f"[{m.offset:#x}, +{m.size:#x}) lies outside the source {label} "
                    f"({length} bytes)",
                )
            if m.page_size % page_size:
                raise HandshakeError(
                    f"mappings[{i}].page_size",
                    f"{m.page_size} is not a multiple of the source's page size {page_size}",
                )

    def flat(self, address: int) -> int | None:
        """Flat offset of the page holding host ``address``; None outside every region."""
        i = bisect.bisect_right(self._addr_starts, address) - 1
        if i < 0:
            return None
        region = self._by_addr[i]
        m = self.mappings[region]
        if address >= m.end:
            return None
        inside = address - m.base_host_virt_addr
        return self.starts[region] + inside - inside % self.page_size

    def _region(self, flat: int) -> tuple[GuestRegionUffdMapping, int]:
        """The region holding flat offset ``flat`` and the offset in it."""
        i = bisect.bisect_right(self.starts, flat) - 1
        return self.mappings[i], flat - self.starts[i]

    def source_offset(self, flat: int) -> int:
        """Where flat offset ``flat`` is in the source image."""
        m, inside = self._region(flat)
        return m.offset + inside

    def address(self, flat: int) -> int:
        """The peer's host address of flat offset ``flat``."""
        m, inside = self._region(flat)
        return m.base_host_virt_addr + inside

    def flat_of_source(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Flat ranges ``(flat, length)`` holding the source range [offset, offset+length)."""
        out = []
        for start, m in zip(self.starts, self.mappings, strict=True):
            lo = max(offset, m.offset)
            hi = min(offset + length, m.offset + m.size)
            if lo < hi:
                out.append((start + lo - m.offset, hi - lo))
        return out
