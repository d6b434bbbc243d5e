"""Snapshot files: named memory regions with their zero pages left out.

A snapshot holds the page size, a list of named regions and, for each region,
a bitmap of the pages that are present (all-zero pages are not stored), the
present pages themselves packed in order, and a table of chunks (up to
``chunk_pages`` stored pages each) with a BLAKE2b-128 checksum per chunk.
Everything is little-endian. The file opens with a 64-byte header (magic
``b"PYUFFDSN"``, format version 1, page size, chunk size, region count, the
offset, size and checksum of the region table); the page data follows, and
the region table (descriptors, bitmaps, chunk tables) closes the file. The
byte-level layout is in docs/snapshot.md.

Reading a page is O(1): on open, a prefix sum of the bitmap's popcounts is
computed per 64-bit word, so page index -> rank among present pages -> file
offset is two lookups and one popcount. Reads use ``os.pread`` on one fd, so
any number of threads (and an asyncio server's thread pool) may read at once.
Each chunk is checksum-verified the first time a read touches it.

:class:`RawMemoryFile` gives the same reader interface over a raw memory
image (Firecracker's memory snapshot file: guest memory stored at its file
offset), and :func:`open_source` picks one or the other by the magic.

This module is pure Python: no userfaultfd and no compiled extension needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import mmap
import os
import struct
import sys
import tempfile
from array import array
from collections.abc import Iterator, Mapping, Sequence
from typing import ClassVar, Protocol, TypeVar

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PageSource",
    "RawMemoryFile",
    "RegionInfo",
    "Snapshot",
    "SnapshotError",
    "SnapshotInfo",
    "UnknownRegionError",
    "open_source",
    "write_snapshot",
]

MAGIC = b"PYUFFDSN"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# magic, version, header size, page size, chunk pages, region count, flags,
# table offset, table size, checksum of header[0:48] + table.
_HEADER = struct.Struct("<8sIIIIIIQQ16s")
# name length, name (zero padded), length, present pages, data offset,
# bitmap offset, chunk table offset, chunk count, reserved.
_REGION = struct.Struct("<B255sQQQQQII")
# data offset, page count, reserved, checksum.
_CHUNK = struct.Struct("<QII16s")
_CHECKSUM_OFFSET = 48
_DIGEST_SIZE = 16

MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 30
MAX_CHUNK_PAGES = 1 << 24
MAX_REGIONS = 65535
MAX_NAME_BYTES = 255
# The region table (descriptors, bitmaps, chunk tables) may hold at most this
# much: 256 MiB of bitmap describe 8 TiB of 4 KiB pages. A reader holds the
# bitmaps and their rank sums in memory, so this bounds what a file can make
# it allocate, whatever sizes its (checksummed, but forgeable) table claims.
MAX_TABLE_BYTES = 256 << 20
# Files are hashed and verified in pieces of this size: memory use does not
# grow with the size of a chunk or of the table.
_IO_PIECE = 1 << 20

_WORD_MASK = (1 << 64) - 1
_REWRITE_HINT = "the file is damaged; re-create it with write_snapshot()"
_TRUNCATED_HINT = "the file is truncated (an interrupted copy?); copy or re-create it"


class SnapshotError(ValueError):
    """A snapshot file is malformed, truncated, of another version or fails a checksum.

    Attributes: ``path`` (the file), ``offset`` (the file offset of the bad
    field or chunk, or None when the problem has no single place). The
    message names both and says what to do.
    """

    def __init__(self, path: str, offset: int | None, problem: str, hint: str) -> None:
        where = "" if offset is None else f" at file offset {offset}"
        super().__init__(f"{path}: {problem}{where}; {hint}")
        self.path = path
        self.offset = offset

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownRegionError(SnapshotError, KeyError):
    """The snapshot has no region of that name (a KeyError too)."""

    def __init__(self, path: str, name: str, known: Sequence[str]) -> None:
        names = ", ".join(repr(n) for n in known) or "none"
        super().__init__(path, None, f"no region named {name!r}", f"the regions are: {names}")
        self.name = name


@dataclasses.dataclass(frozen=True)
class RegionInfo:
    """One region: its name, its length in bytes and how many of its pages are stored."""

    name: str
    length: int
    present_pages: int


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    """What :func:`write_snapshot` wrote: the path, page size, regions and file size."""

    path: str
    page_size: int
    regions: list[RegionInfo]
    file_size: int


class PageSource(Protocol):
    """The reader interface the page server needs (Snapshot and RawMemoryFile have it)."""

    path: str
    page_size: int
    regions: list[RegionInfo]

    def region(self, name: str) -> RegionInfo: ...

    def read(self, name: str, offset: int, length: int) -> bytes: ...

    def extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, bool]]: ...

    def is_present(self, name: str, offset: int) -> bool: ...

    def close(self) -> None: ...


def _check_page_size(page_size: int) -> None:
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size & (page_size - 1):
        raise ValueError(
            f"page_size {page_size} is not a power of two between {MIN_PAGE_SIZE} and "
            f"{MAX_PAGE_SIZE}; pass mmap.PAGESIZE or a huge page size"
        )


def _check_range(
    what: str, name: str, length: int, page_size: int, offset: int, count: int | None
) -> int:
    """Validate a page-aligned (offset, count) inside a region; return the count."""
    if count is None:
        count = length - offset
    if offset < 0 or count < 0 or offset + count > length:
        raise ValueError(
            f"{what} of region {name!r}: [{offset}, {offset}+{count}) is outside the "
            f"region [0, {length})"
        )
    if offset % page_size or count % page_size:
        raise ValueError(
            f"{what} of region {name!r}: offset {offset} and length {count} must be "
            f"multiples of the page size {page_size}"
        )
    return count


_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def _pread_cached(fd: int, length: int, offset: int) -> bytes | None:
    """Read only from the page cache (preadv2 RWF_NOWAIT); None when that would block.

    Also None where RWF_NOWAIT is missing (Linux < 4.14) or refused by the file system.
    """
    if not _RWF_NOWAIT:
        return None
    buf = bytearray(length)
    try:
        done = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except OSError:
        return None
    return bytes(buf) if done == length else None


def _pread_exact(fd: int, length: int, offset: int) -> bytes | None:
    """Read exactly ``length`` bytes at ``offset``; None if the file ends first."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# -- writing -----------------------------------------------------------------


def _region_view(name: object, value: object, page_size: int) -> tuple[str, bytes, memoryview]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"region name {name!r} must be a non-empty str")
    encoded = name.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        raise ValueError(
            f"region name {name[:40]!r}... is {len(encoded)} bytes in UTF-8; "
            f"the limit is {MAX_NAME_BYTES}"
        )
    try:
        view = memoryview(value).cast("B")  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            f"region {name!r}: {type(value).__name__} is not a contiguous buffer "
            "(pass bytes, bytearray, memoryview or mmap)"
        ) from err
    if len(view) % page_size:
        length = len(view)
        view.release()
        raise ValueError(
            f"region {name!r} is {length} bytes, not a multiple of the page size {page_size}"
        )
    return name, encoded, view


@dataclasses.dataclass
class _Written:
    name: bytes
    length: int
    present: int
    data_offset: int
    words: list[int]
    chunks: list[tuple[int, int, bytes]]


def _write_region(
    out: _FileWriter, encoded: bytes, view: memoryview, page_size: int, chunk_pages: int
) -> _Written:
    """Stream one region's non-zero pages to ``out``; return its metadata."""
    zero = bytes(page_size)
    data_offset = out.pos
    words: list[int] = []
    chunks: list[tuple[int, int, bytes]] = []
    word = 0
    present = 0
    in_chunk = 0
    chunk_start = data_offset
    hasher = hashlib.blake2b(digest_size=_DIGEST_SIZE)
    npages = len(view) // page_size
    for index in range(npages):
        start = index * page_size
        # A copy then memcmp is ~8x faster than comparing the memoryview slice.
        page = bytes(view[start : start + page_size])
        if page != zero:
            word |= 1 << (index & 63)
            out.write(page)
            hasher.update(page)
            present += 1
            in_chunk += 1
            if in_chunk == chunk_pages:
                chunks.append((chunk_start, in_chunk, hasher.digest()))
                chunk_start = out.pos
                in_chunk = 0
                hasher = hashlib.blake2b(digest_size=_DIGEST_SIZE)
        if index & 63 == 63:
            words.append(word)
            word = 0
    if npages & 63:
        words.append(word)
    if in_chunk:
        chunks.append((chunk_start, in_chunk, hasher.digest()))
    return _Written(encoded, len(view), present, data_offset, words, chunks)


class _FileWriter:
    """Buffered ``os.write`` that knows its position (the file is written front to back).

    Not a BufferedWriter: one of those left unflushed after an error would
    flush into whatever file reuses the fd number when it is collected.
    """

    _FLUSH_AT = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pos = 0
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.pos += len(data)
        if len(self._buffer) >= self._FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        data, self._buffer = self._buffer, bytearray()
        done = os.write(self.fd, data)
        while done < len(data):
            done += os.write(self.fd, memoryview(data)[done:])


def _table_bytes(written: list[_Written], table_offset: int) -> bytes:
    """Build the region table: descriptors, then each region's bitmap and chunk table."""
    descriptors = []
    tail = []
    cursor = table_offset + _REGION.size * len(written)
    for region in written:
        bitmap = struct.pack(f"<{len(region.words)}Q", *region.words)
        bitmap_offset = cursor
        cursor += len(bitmap)
        chunk_table = b"".join(_CHUNK.pack(off, n, 0, digest) for off, n, digest in region.chunks)
        chunk_offset = cursor
        cursor += len(chunk_table)
        tail += [bitmap, chunk_table]
        descriptors.append(
            _REGION.pack(
                len(region.name),
                region.name,
                region.length,
                region.present,
                region.data_offset,
                bitmap_offset,
                chunk_offset,
                len(region.chunks),
                0,
            )
        )
    return b"".join(descriptors + tail)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(
    path: str | os.PathLike[str],
    regions: Mapping[str, object],
    *,
    page_size: int = mmap.PAGESIZE,
    chunk_pages: int = 256,
) -> SnapshotInfo:
    """Write ``regions`` (name -> buffer) to a snapshot file at ``path``, atomically.

    Each value is any contiguous buffer (bytes, bytearray, memoryview, mmap)
    whose length is a multiple of ``page_size``; all-zero pages are not
    stored. The file is streamed page by page (memory use does not grow with
    the snapshot) to a temporary file in the same directory, fsynced, renamed
    over ``path`` and the directory fsynced. On any exception the temporary
    file is removed and ``path`` is left as it was (a previous file of that
    name survives). The new file has mode 0600: it holds memory contents.

    Calling context: any thread; the buffers must not change while writing.

    Raises:
        ValueError: a bad page size, chunk size, region name or region length.
        TypeError: a region value without a contiguous buffer.
        OSError: writing failed (ENOSPC, EIO...); nothing was replaced. An
            error from the final directory fsync comes after the rename.
    """
    _check_page_size(page_size)
    if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
        raise ValueError(f"chunk_pages {chunk_pages} must be between 1 and {MAX_CHUNK_PAGES}")
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"{len(regions)} regions; a snapshot holds at most {MAX_REGIONS}")
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    with contextlib.ExitStack() as stack:
        views = []
        for name, value in regions.items():
            entry = _region_view(name, value, page_size)
            stack.callback(entry[2].release)
            views.append(entry)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=directory
        )
        try:
            try:
                out = _FileWriter(fd)
                out.write(bytes(_HEADER.size))
                written = [
                    _write_region(out, encoded, view, page_size, chunk_pages)
                    for _, encoded, view in views
                ]
                table_offset = out.pos
                table = _table_bytes(written, table_offset)
                out.write(table)
                out.flush()
                head = _HEADER.pack(
                    MAGIC,
                    FORMAT_VERSION,
                    _HEADER.size,
                    page_size,
                    chunk_pages,
                    len(written),
                    0,
                    table_offset,
                    len(table),
                    bytes(_DIGEST_SIZE),
                )[:_CHECKSUM_OFFSET]
                digest = hashlib.blake2b(head + table, digest_size=_DIGEST_SIZE).digest()
                os.pwrite(fd, head + digest, 0)
                os.fsync(fd)
                file_size = out.pos
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(directory)
    infos = [
        RegionInfo(name, w.length, w.present)
        for (name, _, _), w in zip(views, written, strict=True)
    ]
    return SnapshotInfo(target, page_size, infos, file_size)


# -- reading -----------------------------------------------------------------


class _Region:
    """A parsed region: the bitmap, its per-word rank prefix sums and the chunk table."""

    __slots__ = (
        "chunk_digests",
        "data_offset",
        "info",
        "npages",
        "prefix",
        "verified",
        "words",
    )

    def __init__(
        self,
        info: RegionInfo,
        npages: int,
        data_offset: int,
        words: array[int],
        chunk_digests: list[bytes],
    ) -> None:
        self.info = info
        self.npages = npages
        self.data_offset = data_offset
        self.words = words
        prefix = array("Q", bytes(8 * (len(words) + 1)))
        total = 0
        for i, word in enumerate(words):
            prefix[i] = total
            total += word.bit_count()
        prefix[len(words)] = total
        self.prefix = prefix
        self.chunk_digests = chunk_digests
        self.verified = bytearray(len(chunk_digests))

    def bit(self, page: int) -> bool:
        return bool(self.words[page >> 6] >> (page & 63) & 1)

    def rank(self, page: int) -> int:
        """The number of present pages before ``page``."""
        w = page >> 6
        return self.prefix[w] + (self.words[w] & ((1 << (page & 63)) - 1)).bit_count()

    def next_change(self, page: int, value: bool, end: int) -> int:
        """The first page >= ``page`` whose bit is not ``value`` (or ``end``)."""
        words = self.words
        w = page >> 6
        flip = _WORD_MASK if value else 0
        x = ((words[w] ^ flip) >> (page & 63)) << (page & 63)
        while not x:
            w += 1
            if w << 6 >= end:
                return end
            x = words[w] ^ flip
        return min(end, (w << 6) + (x & -x).bit_length() - 1)

    def runs(self, first: int, last: int) -> list[tuple[int, int, bool]]:
        """(page, count, present) runs covering pages [first, last)."""
        out = []
        page = first
        while page < last:
            value = self.bit(page)
            nxt = self.next_change(page, value, last)
            out.append((page, nxt - page, value))
            page = nxt
        return out


_F = TypeVar("_F", bound="_ReadOnlyFile")


class _ReadOnlyFile:
    """The fd lifecycle Snapshot and RawMemoryFile share: one owned read-only fd.

    ``close()`` is idempotent and ``__del__`` only a backstop; once closed,
    every read raises ValueError naming the file.
    """

    _KIND: ClassVar[str]  # how error messages name the file
    path: str
    _fd: int = -1

    @contextlib.contextmanager
    def _opening(self, path: str | os.PathLike[str]) -> Iterator[None]:
        """Open ``path`` as this object's fd; closed again if the body raises."""
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield
        except BaseException:
            self.close()
            raise

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"{self._KIND} {self.path} is closed")

    def __enter__(self: _F) -> _F:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A backstop only: close() is the way to release the fd.
        if self._fd >= 0:
            self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the file; later reads raise ValueError. A second close is a no-op."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def fileno(self) -> int:
        """The read-only fd (owned by this object: do not close it).

        Raises:
            ValueError: the file is closed.
        """
        self._check_open()
        return self._fd


class Snapshot(_ReadOnlyFile):
    """A snapshot file opened for reading (see the module docstring for the format).

    Owns one read-only fd, closed by :meth:`close` (idempotent) or by leaving
    the ``with`` block. Every method may be called from any thread
    concurrently: reads are ``os.pread`` calls and the verified-chunk cache
    only ever goes from "unverified" to "verified".

    Raises (on open): SnapshotError for a malformed, truncated or newer-version
    file; OSError when the file cannot be opened.
    """

    path: str
    page_size: int
    chunk_pages: int
    file_size: int
    regions: list[RegionInfo]
    _KIND = "snapshot"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with self._opening(path):
            self._parse()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Open and validate the snapshot at ``path`` (see the class docstring for Raises)."""
        return cls(path)

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"{len(self.regions)} regions"
        return f"<Snapshot {self.path!r} page_size={self.page_size} {state}>"

    # -- parsing -------------------------------------------------------------

    def _error(self, offset: int | None, problem: str, hint: str = _REWRITE_HINT) -> SnapshotError:
        return SnapshotError(self.path, offset, problem, hint)

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, _HEADER.size, 0)
        if head[:8] != MAGIC[: len(head[:8])] or not head:
            raise self._error(
                0,
                f"bad magic {head[:8]!r} (expected {MAGIC!r}): not a pyuffd snapshot",
                "open raw memory images with RawMemoryFile or open_source()",
            )
        if len(head) < _HEADER.size:
            raise self._error(
                len(head),
                f"the file is {size} bytes, shorter than the {_HEADER.size}-byte header",
                _TRUNCATED_HINT,
            )
        (_, version, header_size, page_size, chunk_pages, count, flags, table_offset,
         table_size, checksum) = _HEADER.unpack(head)  # fmt: skip
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(map(str, SUPPORTED_VERSIONS))
            raise self._error(
                8,
                f"format version {version} is not supported (this pyuffd reads version "
                f"{supported})",
                "upgrade pyuffd, or re-create the snapshot with this version"
                if version > FORMAT_VERSION
                else _REWRITE_HINT,
            )
        if header_size != _HEADER.size:
            raise self._error(12, f"header size {header_size} (expected {_HEADER.size})")
        try:
            _check_page_size(page_size)
        except ValueError:
            raise self._error(16, f"invalid page size {page_size}") from None
        if not 1 <= chunk_pages <= MAX_CHUNK_PAGES:
            raise self._error(20, f"invalid chunk size of {chunk_pages} pages")
        if count > MAX_REGIONS:
            raise self._error(24, f"region count {count} is over the limit of {MAX_REGIONS}")
        if flags:
            raise self._error(28, f"unknown flags {flags:#x}")
        if table_offset < _HEADER.size:
            raise self._error(32, f"region table offset {table_offset} is inside the header")
        if table_offset + table_size > size:
            raise self._error(
                32,
                f"the region table [{table_offset}, +{table_size}) ends past the end of the "
                f"file ({size} bytes)",
                _TRUNCATED_HINT,
            )
        if count * _REGION.size > table_size:
            raise self._error(
                40, f"the region table ({table_size} bytes) is too small for {count} regions"
            )
        if table_size > MAX_TABLE_BYTES:
            raise self._error(
                40,
                f"the region table claims {table_size} bytes, over the format's limit of "
                f"{MAX_TABLE_BYTES}",
            )
        digest = hashlib.blake2b(head[:_CHECKSUM_OFFSET], digest_size=_DIGEST_SIZE)
        self._hash_file(digest, table_offset, table_size, "the region table")
        if digest.digest() != checksum:
            raise self._error(
                table_offset, "the header and region table do not match their checksum"
            )
        self.page_size = page_size
        self.chunk_pages = chunk_pages
        self.file_size = size
        self._table_offset = table_offset
        self._table_size = table_size
        # What the bitmaps and chunk tables may claim in all: each lies in the
        # table, so together they cannot need more memory than the table holds.
        self._table_budget = table_size - count * _REGION.size
        descriptors = self._read_exact(table_offset, count * _REGION.size, "the region table")
        self._by_name: dict[str, _Region] = {}
        for index in range(count):
            region = self._parse_region(index, descriptors)
            self._by_name[region.info.name] = region
        self.regions = [r.info for r in self._by_name.values()]

    def _read_exact(self, offset: int, length: int, what: str) -> bytes:
        data = _pread_exact(self._fd, length, offset)
        if data is None:
            raise self._error(offset, f"{what} is cut short", _TRUNCATED_HINT)
        return data

    def _hash_file(self, digest: hashlib.blake2b, offset: int, length: int, what: str) -> None:
        """Feed ``length`` file bytes at ``offset`` to ``digest`` in bounded pieces."""
        end = offset + length
        while offset < end:
            n = min(_IO_PIECE, end - offset)
            digest.update(self._read_exact(offset, n, what))
            offset += n

    def _in_table(self, field_offset: int, start: int, length: int, what: str) -> bytes:
        lo = start - self._table_offset
        if lo < 0 or lo + length > self._table_size:
            raise self._error(
                field_offset,
                f"{what} [{start}, +{length}) lies outside the region table "
                f"[{self._table_offset}, +{self._table_size})",
            )
        if length > self._table_budget:
            raise self._error(
                field_offset,
                f"{what} of {length} bytes and the regions before it need more than the "
                f"region table's {self._table_size} bytes",
            )
        self._table_budget -= length
        return self._read_exact(start, length, what)

    def _parse_region(self, index: int, descriptors: bytes) -> _Region:
        ps, cp = self.page_size, self.chunk_pages
        at = self._table_offset + index * _REGION.size
        (name_len, raw_name, length, present, data_offset, bitmap_offset, chunk_offset,
         nchunks, reserved) = _REGION.unpack_from(descriptors, index * _REGION.size)  # fmt: skip
        try:
            if raw_name[name_len:].strip(b"\0"):
                raise UnicodeError
            name = raw_name[:name_len].decode("utf-8")
        except UnicodeError:
            raise self._error(at, f"region {index}: the name is not zero-padded UTF-8") from None
        if not name or name in self._by_name:
            raise self._error(at, f"region {index}: empty or duplicate name {name!r}")
        label = f"region {name!r}"
        if length % ps:
            raise self._error(
                at + 256, f"{label}: length {length} is not a multiple of the page size {ps}"
            )
        npages = length // ps
        if present > npages:
            raise self._error(at + 264, f"{label}: {present} present pages of {npages}")
        if reserved:
            raise self._error(at + 300, f"{label}: reserved field is {reserved}, not 0")
        if data_offset < _HEADER.size or data_offset + present * ps > self.file_size:
            raise self._error(
                at + 272,
                f"{label}: page data [{data_offset}, +{present * ps}) is outside the file "
                f"({self.file_size} bytes)",
                _TRUNCATED_HINT,
            )
        nwords = (npages + 63) // 64
        raw_bitmap = self._in_table(at + 280, bitmap_offset, nwords * 8, f"{label}: bitmap")
        words = array("Q")
        words.frombytes(raw_bitmap)
        if sys.byteorder == "big":
            words.byteswap()
        if npages & 63 and words[-1] >> (npages & 63):
            raise self._error(bitmap_offset, f"{label}: bitmap bits set past the last page")
        if sum(w.bit_count() for w in words) != present:
            raise self._error(
                bitmap_offset, f"{label}: the bitmap does not count {present} present pages"
            )
        expected_chunks = (present + cp - 1) // cp
        if nchunks != expected_chunks:
            raise self._error(at + 296, f"{label}: {nchunks} chunks, expected {expected_chunks}")
        raw_chunks = self._in_table(
            at + 288, chunk_offset, nchunks * _CHUNK.size, f"{label}: chunk table"
        )
        digests = []
        for k, (off, n, res, digest) in enumerate(_CHUNK.iter_unpack(raw_chunks)):
            if off != data_offset + k * cp * ps or n != min(cp, present - k * cp) or res:
                raise self._error(
                    chunk_offset + k * _CHUNK.size,
                    f"{label}: chunk {k} says {n} pages at {off}, expected "
                    f"{min(cp, present - k * cp)} at {data_offset + k * cp * ps}",
                )
            digests.append(digest)
        return _Region(RegionInfo(name, length, present), npages, data_offset, words, digests)

    # -- reading -------------------------------------------------------------

    def _get(self, name: str) -> _Region:
        self._check_open()
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownRegionError(self.path, name, list(self._by_name)) from None

    def region(self, name: str) -> RegionInfo:
        """The RegionInfo of ``name``.

        Raises:
            UnknownRegionError: (a SnapshotError and KeyError) no such region.
        """
        return self._get(name).info

    def _read_ranks(self, region: _Region, first: int, last: int) -> bytes:
        """Stored pages of rank [first, last), verifying each chunk on first touch."""
        self._verify_ranks(region, first, last)
        return self._read_exact(
            region.data_offset + first * self.page_size,
            (last - first) * self.page_size,
            f"region {region.info.name!r}: page data",
        )

    def _verify_ranks(self, region: _Region, first: int, last: int) -> None:
        """Verify every chunk holding a stored page of rank [first, last) not verified yet."""
        cp = self.chunk_pages
        verified = region.verified
        for chunk in range(first // cp, (last - 1) // cp + 1):
            if not verified[chunk]:
                self._verify_chunk(region, chunk)

    def _verify_chunk(self, region: _Region, chunk: int) -> None:
        """Checksum one chunk, read from the file in bounded pieces, and mark it verified."""
        ps, cp = self.page_size, self.chunk_pages
        pages = min(cp, region.info.present_pages - chunk * cp)
        offset = region.data_offset + chunk * cp * ps
        digest = hashlib.blake2b(digest_size=_DIGEST_SIZE)
        self._hash_file(digest, offset, pages * ps, f"region {region.info.name!r}: page data")
        if digest.digest() != region.chunk_digests[chunk]:
            raise self._error(
                offset,
                f"region {region.info.name!r}, chunk {chunk} fails its checksum",
                "the page data is corrupted; restore the file from a good copy",
            )
        region.verified[chunk] = 1

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of region ``name`` at ``offset`` (absent pages are zeros).

        ``offset`` and ``length`` must be page-aligned and inside the region.
        Every chunk touched is checksum-verified the first time.

        Raises:
            UnknownRegionError: no such region.
            ValueError: a misaligned or out-of-range request, or a closed snapshot.
            SnapshotError: a chunk fails its checksum or the file was truncated.
        """
        region = self._get(name)
        ps = self.page_size
        _check_range("read", name, region.info.length, ps, offset, length)
        first = offset // ps
        runs = region.runs(first, first + length // ps)
        if len(runs) == 1 and runs[0][2]:
            rank = region.rank(first)
            return self._read_ranks(region, rank, rank + runs[0][1])
        out = bytearray(length)
        for page, count, present in runs:
            if present:
                rank = region.rank(page)
                start = (page - first) * ps
                out[start : start + count * ps] = self._read_ranks(region, rank, rank + count)
        return bytes(out)

    def read_cached(self, name: str, offset: int, length: int) -> bytes | None:
        """Like :meth:`read`, but None unless the data is cached and its chunks verified.

        For an event loop: this never waits for the disk (preadv2 RWF_NOWAIT),
        so a page server can answer from the loop and send the rest to a thread.

        Raises:
            UnknownRegionError, ValueError: as :meth:`read`.
        """
        region = self._get(name)
        ps, cp = self.page_size, self.chunk_pages
        _check_range("read", name, region.info.length, ps, offset, length)
        first = offset // ps
        out = bytearray(length)
        for page, count, present in region.runs(first, first + length // ps):
            if present:
                rank = region.rank(page)
                if not all(region.verified[rank // cp : (rank + count - 1) // cp + 1]):
                    return None
                data = _pread_cached(self._fd, count * ps, region.data_offset + rank * ps)
                if data is None:
                    return None
                start = (page - first) * ps
                out[start : start + count * ps] = data
        return bytes(out)

    def extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, bool]]:
        """Runs of ``(offset, length, present)`` in bytes covering the range (default: all).

        Raises:
            UnknownRegionError: no such region.
            ValueError: a misaligned or out-of-range range, or a closed snapshot.
        """
        region = self._get(name)
        ps = self.page_size
        length = _check_range("extents", name, region.info.length, ps, offset, length)
        first = offset // ps
        return [
            (page * ps, count * ps, present)
            for page, count, present in region.runs(first, first + length // ps)
        ]

    def file_extents(
        self, name: str, offset: int, length: int
    ) -> list[tuple[int, int, int | None]]:
        """Runs of ``(offset, length, file offset)`` covering the range; None for zero runs.

        Every chunk the present runs touch is checksum-verified first (read
        whole, once), so the caller may then send those file bytes as they
        are, for example with ``os.sendfile`` from :meth:`fileno`. May wait
        for the disk: for a thread pool, not an event loop.

        Raises:
            UnknownRegionError: no such region.
            ValueError: a misaligned or out-of-range range, or a closed snapshot.
            SnapshotError: a chunk fails its checksum or the file was truncated.
        """
        region = self._get(name)
        ps, cp = self.page_size, self.chunk_pages
        _check_range("read", name, region.info.length, ps, offset, length)
        first = offset // ps
        out: list[tuple[int, int, int | None]] = []
        for page, count, present in region.runs(first, first + length // ps):
            if not present:
                out.append((page * ps, count * ps, None))
                continue
            rank = region.rank(page)
            c0, c1 = rank // cp, (rank + count - 1) // cp
            if not all(region.verified[c0 : c1 + 1]):
                self._verify_ranks(region, rank, rank + count)
            out.append((page * ps, count * ps, region.data_offset + rank * ps))
        return out

    def is_present(self, name: str, offset: int) -> bool:
        """True if the page holding byte ``offset`` of region ``name`` is stored (not zero).

        Raises:
            UnknownRegionError: no such region.
            ValueError: ``offset`` outside the region, or a closed snapshot.
        """
        region = self._get(name)
        if not 0 <= offset < region.info.length:
            raise ValueError(
                f"offset {offset} is outside region {name!r} [0, {region.info.length})"
            )
        return region.bit(offset // self.page_size)

    def verify(self, failures: list[SnapshotError] | None = None) -> int:
        """Checksum every chunk of every region; return the number of pages verified.

        With ``failures`` (a list), every chunk is checked and each one that
        fails is appended to it instead of raised; reads of those chunks then
        raise SnapshotError as usual (a page server starts anyway and answers
        them with a request-level error).

        Raises:
            SnapshotError: the first chunk that fails (names region, chunk and
                offset), unless ``failures`` is given.
            ValueError: the snapshot is closed.
        """
        pages = 0
        cp = self.chunk_pages
        for info in self.regions:
            region = self._get(info.name)
            for chunk in range(len(region.chunk_digests)):
                try:
                    self._verify_chunk(region, chunk)
                except SnapshotError as err:
                    if failures is None:
                        raise
                    failures.append(err)
                    continue
                pages += min(cp, info.present_pages - chunk * cp)
        return pages


class RawMemoryFile(_ReadOnlyFile):
    """A raw memory image (Firecracker's memory snapshot file) with the Snapshot reader API.

    Guest memory is stored as is: region ``name`` is ``length`` bytes at
    ``file_offset``. ``regions`` is a sequence of ``(name, file_offset,
    length)``; the default is one region "mem" covering the whole file. Holes
    in a sparse file (found with SEEK_DATA/SEEK_HOLE) are reported by
    :meth:`extents` as absent pages, so a page server sends them as zero
    ranges; a file system without SEEK_DATA makes every page present.

    Owns one read-only fd (see :meth:`close`); thread-safe like Snapshot.

    Raises (on open): ValueError for a bad page size or region layout,
    SnapshotError when a region lies past the end of the file, OSError when
    the file cannot be opened.
    """

    page_size: int
    regions: list[RegionInfo]
    _KIND = "memory file"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        page_size: int = mmap.PAGESIZE,
        regions: Sequence[tuple[str, int, int]] | None = None,
    ) -> None:
        _check_page_size(page_size)
        self.page_size = page_size
        with self._opening(path):
            size = os.fstat(self._fd).st_size
            if regions is None:
                if size % page_size:
                    raise SnapshotError(
                        self.path,
                        size - size % page_size,
                        f"the file is {size} bytes, not a multiple of the page size {page_size}",
                        "pass regions=[(name, file_offset, length)] to select whole pages",
                    )
                regions = [("mem", 0, size)]
            self._layout: dict[str, tuple[int, int]] = {}
            for name, file_offset, length in regions:
                if name in self._layout or not name:
                    raise ValueError(f"region name {name!r} is empty or given twice")
                if length % page_size or length < 0 or file_offset < 0:
                    raise ValueError(
                        f"region {name!r}: length {length} must be a non-negative multiple "
                        f"of the page size {page_size}, offset {file_offset} non-negative"
                    )
                if file_offset + length > size:
                    raise SnapshotError(
                        self.path,
                        file_offset,
                        f"region {name!r} [{file_offset}, +{length}) ends past the end of the "
                        f"file ({size} bytes)",
                        _TRUNCATED_HINT,
                    )
                self._layout[name] = (file_offset, length)
            self.regions = [
                RegionInfo(name, length, self._present_bytes(off, length) // page_size)
                for name, (off, length) in self._layout.items()
            ]
        self._info = {r.name: r for r in self.regions}

    def __repr__(self) -> str:
        return f"<RawMemoryFile {self.path!r} page_size={self.page_size}>"

    def _get(self, name: str) -> tuple[int, int]:
        self._check_open()
        try:
            return self._layout[name]
        except KeyError:
            raise UnknownRegionError(self.path, name, list(self._layout)) from None

    def _present_bytes(self, base: int, length: int) -> int:
        return sum(n for _, n, present in self._runs(base, length) if present)

    def _runs(self, base: int, length: int) -> list[tuple[int, int, bool]]:
        """(relative offset, length, present) runs of the file range [base, base+length).

        A page is absent only when it lies wholly inside a hole.
        """
        if not length:
            return []
        ps = self.page_size
        end = base + length
        data: list[tuple[int, int]] = []
        pos = base
        try:
            while pos < end:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as err:
                    if err.errno != errno.ENXIO:
                        raise
                    break
                if start >= end:
                    break
                stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
                lo = base + (start - base) // ps * ps
                hi = min(end, base + -(-(stop - base) // ps) * ps)
                if data and lo <= data[-1][1]:
                    data[-1] = (data[-1][0], hi)
                else:
                    data.append((lo, hi))
                pos = stop
        except (OSError, AttributeError):
            # No SEEK_DATA support here: treat the whole range as data.
            data = [(base, end)]
        out: list[tuple[int, int, bool]] = []
        cursor = base
        for lo, hi in data:
            if lo > cursor:
                out.append((cursor - base, lo - cursor, False))
            out.append((lo - base, hi - lo, True))
            cursor = hi
        if cursor < end:
            out.append((cursor - base, end - cursor, False))
        return out

    def region(self, name: str) -> RegionInfo:
        """The RegionInfo of ``name``.

        Raises:
            UnknownRegionError: no such region.
        """
        self._get(name)
        return self._info[name]

    def read(self, name: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of region ``name`` at ``offset`` (page-aligned, in range).

        Raises:
            UnknownRegionError: no such region.
            ValueError: a misaligned or out-of-range request, or a closed file.
            SnapshotError: the file was truncated since it was opened.
        """
        base, size = self._get(name)
        _check_range("read", name, size, self.page_size, offset, length)
        data = _pread_exact(self._fd, length, base + offset)
        if data is None:
            raise SnapshotError(
                self.path, base + offset, "the file was truncated while open", _TRUNCATED_HINT
            )
        return data

    def read_cached(self, name: str, offset: int, length: int) -> bytes | None:
        """Like :meth:`read`, but None when the data is not in the page cache (never blocks).

        Raises:
            UnknownRegionError, ValueError: as :meth:`read`.
        """
        base, size = self._get(name)
        _check_range("read", name, size, self.page_size, offset, length)
        return _pread_cached(self._fd, length, base + offset)

    def extents(
        self, name: str, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, bool]]:
        """Runs of ``(offset, length, present)``; holes of a sparse file are absent.

        Raises:
            UnknownRegionError: no such region.
            ValueError: a misaligned or out-of-range range, or a closed file.
        """
        base, size = self._get(name)
        length = _check_range("extents", name, size, self.page_size, offset, length)
        return [(off + offset, n, p) for off, n, p in self._runs(base + offset, length)]

    def file_extents(
        self, name: str, offset: int, length: int
    ) -> list[tuple[int, int, int | None]]:
        """Runs of ``(offset, length, file offset)`` covering the range; None for holes.

        A raw file has no checksums: the file bytes may be sent as they are
        (``os.sendfile`` from :meth:`fileno`).

        Raises:
            UnknownRegionError: no such region.
            ValueError: a misaligned or out-of-range range, or a closed file.
            SnapshotError: the file is now shorter than the range (truncated while open).
        """
        base, size = self._get(name)
        _check_range("read", name, size, self.page_size, offset, length)
        if os.fstat(self._fd).st_size < base + offset + length:
            raise SnapshotError(
                self.path, base + offset, "the file was truncated while open", _TRUNCATED_HINT
            )
        return [
            (off + offset, n, base + offset + off if present else None)
            for off, n, present in self._runs(base + offset, length)
        ]

    def is_present(self, name: str, offset: int) -> bool:
        """True unless the page holding ``offset`` lies wholly in a hole of the file.

        Raises:
            UnknownRegionError: no such region.
            ValueError: ``offset`` outside the region, or a closed file.
        """
        base, size = self._get(name)
        if not 0 <= offset < size:
            raise ValueError(f"offset {offset} is outside region {name!r} [0, {size})")
        page = offset // self.page_size * self.page_size
        return self._runs(base + page, self.page_size)[0][2]


def open_source(path: str | os.PathLike[str]) -> Snapshot | RawMemoryFile:
    """Open ``path`` as a Snapshot if it starts with the snapshot magic, else as raw memory.

    Raises:
        SnapshotError: a malformed snapshot, or a raw file that is not whole pages.
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
    if magic == MAGIC:
        return Snapshot.open(path)
    return RawMemoryFile(path)
