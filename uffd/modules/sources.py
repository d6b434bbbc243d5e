"""MISSING-fault ops whose pages come from a buffer or a file, served natively by the pump."""

from __future__ import annotations

import os
from typing import Any

from uffd._errors import UffdError
from uffd._mapping import Fault, Mapping
from uffd._native import ffi
from uffd._ops import UffdOps
from uffd._pump import NativeSource
from uffd._resolution import Resolution

__all__ = ["DEFAULT_PREFETCH", "BufferOps", "FileOps"]

DEFAULT_PREFETCH = 1 << 20


class BufferOps(UffdOps):
    """Serve MISSING faults by copying from a buffer at the fault's offset.

    ``buffer`` is any writable or read-only buffer (bytes, bytearray, mmap,
    a Region's memory is not: it would fault); it must hold at least as many
    bytes as every mapping it serves and outlive them. ``native=True`` (the
    default) lets the C pump install pages without entering Python;
    ``prefetch`` (bytes) is the longest run it installs per fault while
    faults are sequential (1 MiB by default; one page turns it off).
    """

    def __init__(
        self, buffer: Any, *, native: bool = True, prefetch: int = DEFAULT_PREFETCH
    ) -> None:
        self._view = memoryview(buffer).cast("B")
        self._cdata = ffi.from_buffer(self._view)
        self._native = native
        self.prefetch = prefetch

    def native_source(self, mapping: Mapping) -> NativeSource | None:
        """The buffer's address, for the pump's memory source."""
        if not self._native:
            return None
        self._check_size(mapping)
        address = int(ffi.cast("uintptr_t", self._cdata))
        return NativeSource("memory", address=address, max_run=self.prefetch)

    def _check_size(self, mapping: Mapping) -> None:
        if len(self._view) < mapping.length:
            raise ValueError(
                f"BufferOps: buffer of {len(self._view)} bytes is shorter than {mapping!r}"
            )

    def handle_missing(self, fault: Fault) -> Resolution:
        """Copy the page at the fault's offset."""
        return Resolution.copy(self._view[fault.offset : fault.offset + fault.mapping.page_size])


class FileOps(UffdOps):
    """Serve MISSING faults from a file: page at mapping offset ``o`` comes from ``offset + o``.

    Bytes past the end of the file read as zeros. The file is opened
    read-only and closed by ``close()``. ``native=True`` lets the C pump
    pread and install pages without entering Python, up to ``prefetch``
    bytes per fault while faults are sequential.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        offset: int = 0,
        native: bool = True,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.path = os.fspath(path)
        self.offset = offset
        self._native = native
        self.prefetch = prefetch

    def native_source(self, mapping: Mapping) -> NativeSource | None:
        """The file's fd and offset, for the pump's file source (the pump reads a dup)."""
        if not self._native or self._fd < 0:
            return None
        return NativeSource("file", fd=self._fd, offset=self.offset, max_run=self.prefetch)

    def handle_missing(self, fault: Fault) -> Resolution:
        """pread the page; a short read is padded with zeros.

        Raises UffdError once ``close()`` ran (the pump, reading its own copy
        of the fd, serves the faults it can without this).
        """
        if self._fd < 0:
            raise UffdError(
                0, f"FileOps for {self.path} was closed while {fault.mapping!r} uses it"
            )
        size = fault.mapping.page_size
        data = os.pread(self._fd, size, self.offset + fault.offset)
        return Resolution.copy(data.ljust(size, b"\0"))

    def close(self) -> None:
        """Close the file. Safe while mappings still use it: the pump keeps its own copy."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
