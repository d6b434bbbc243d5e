"""Background prefetch planning for lazy restore, and the recorded working set.

:class:`AdaptivePrefetcher` decides which pages to fetch next while faults are
served on demand. It is pure logic (no I/O, no threads, no userfaultfd), so
it can be tested alone; the caller serialises calls with a lock. The space
it plans over is a flat range of ``length`` bytes (the daemon lays its
regions end to end); ``boundaries`` are offsets a chunk must not cross.

The plan: chunks start at 64 KiB and double while the prefetch stream runs on
sequentially, up to 4 MiB. A fault far from the stream means the workload is
elsewhere: the next chunk starts just after that fault and the size drops
back to 64 KiB (a fault on or just ahead of the stream keeps the size). A
present-page map (one byte per page) makes every page fetched at most once:
pages installed by a fault, by the working set or by an earlier chunk are
skipped, and a chunk ends at the first page already present. When the
stream reaches the end it wraps round to pick up what it skipped.

:class:`WorkingSet` is the set of pages a previous run faulted on (REAP,
"Benchmarking, Analysis, and Optimization of Serverless Function
Snapshots", ASPLOS'21): installed first, in bulk, before the adaptive
prefetch. It is stored as JSON next to the snapshot (``SNAPSHOT.ws.json``)
and written atomically.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterable

__all__ = [
    "MAX_CHUNK",
    "MAX_WORKING_SET_FILE",
    "MAX_WORKING_SET_PAGES",
    "MIN_CHUNK",
    "AdaptivePrefetcher",
    "WorkingSet",
    "WorkingSetError",
    "working_set_path",
]

MIN_CHUNK = 64 << 10
"""The first chunk, and the size after a fault elsewhere: 64 KiB."""

MAX_CHUNK = 4 << 20
"""The largest chunk: 4 MiB."""

_FORMAT = "pyuffd-working-set"
_VERSION = 1

MAX_WORKING_SET_PAGES = 1 << 24
"""The most pages a working set may claim when nothing else bounds it (64 GiB of 4 KiB pages)."""

MAX_WORKING_SET_FILE = 64 << 20
"""A working-set file larger than this is refused unread (one run takes ~20 bytes)."""


class AdaptivePrefetcher:
    """Plans prefetch chunks over ``length`` bytes of ``page_size`` pages.

    ``min_chunk``/``max_chunk`` bound the chunk size (bytes, whole pages);
    ``boundaries`` are offsets no chunk crosses (region ends). Not
    thread-safe: hold a lock around every call.

    Raises (on construction):
        ValueError: a length, chunk size or boundary that is not whole pages.
    """

    def __init__(
        self,
        length: int,
        *,
        page_size: int = mmap.PAGESIZE,
        min_chunk: int = MIN_CHUNK,
        max_chunk: int = MAX_CHUNK,
        boundaries: Iterable[int] = (),
    ) -> None:
        for name, value in (("length", length), ("min_chunk", min_chunk), ("max_chunk", max_chunk)):
            if value < 0 or value % page_size:
                raise ValueError(f"{name} {value} is not a whole number of {page_size}-byte pages")
        if not page_size <= min_chunk <= max_chunk:
            raise ValueError(
                f"need page_size <= min_chunk <= max_chunk, got {page_size}, {min_chunk}, "
                f"{max_chunk}"
            )
        self.length = length
        self.page_size = page_size
        self.min_pages = min_chunk // page_size
        self.max_pages = max_chunk // page_size
        self.npages = length // page_size
        self._present = bytearray(self.npages)
        self._missing = self.npages
        stops = set()
        for offset in boundaries:
            if offset % page_size or not 0 <= offset <= length:
                raise ValueError(f"boundary {offset} is not a page offset inside [0, {length}]")
            stops.add(offset // page_size)
        stops.add(self.npages)
        self._stops = sorted(stops)
        self._chunk_pages = self.min_pages
        self._cursor = 0
        self._stream_end = 0
        self._last_len = 0
        self._last_fault = -2

    # -- state -----------------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        """The size, in bytes, the next chunk may have."""
        return self._chunk_pages * self.page_size

    @property
    def missing_pages(self) -> int:
        """Pages neither present nor handed out yet."""
        return self._missing

    @property
    def done(self) -> bool:
        """Every page is present or handed out."""
        return self._missing == 0

    def is_present(self, offset: int) -> bool:
        """True if the page holding ``offset`` is present or handed out."""
        return bool(self._present[self._page(offset)])

    def _page(self, offset: int) -> int:
        page = offset // self.page_size
        if not 0 <= page < self.npages:
            raise ValueError(f"offset {offset} is outside [0, {self.length})")
        return page

    def mark_present(self, offset: int, length: int) -> int:
        """Record pages as present (installed by someone else); returns how many were new."""
        first = self._page(offset)
        last = min(self.npages, -(-(offset + length) // self.page_size))
        view = self._present[first:last]
        new = len(view) - sum(view)
        self._present[first:last] = b"\x01" * len(view)
        self._missing -= new
        return new

    def missing_runs(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The runs ``(offset, length)`` of pages not yet present in the range."""
        first = self._page(offset)
        last = min(self.npages, -(-(offset + length) // self.page_size))
        runs: list[tuple[int, int]] = []
        page = self._present.find(0, first, last)
        while page >= 0:
            end = self._present.find(1, page, last)
            end = last if end < 0 else end
            runs.append((page * self.page_size, (end - page) * self.page_size))
            page = self._present.find(0, end, last) if end < last else -1
        return runs

    # -- planning --------------------------------------------------------------

    def on_fault(self, offset: int) -> None:
        """A fault was served at ``offset``: mark its page and steer the stream.

        A fault inside the last chunk, or at most one chunk beyond the stream,
        or right after the previous fault, is the stream's own sequential
        access: the size is kept. Anywhere else the size drops to the
        minimum. Either way the next chunk starts just after the fault.
        """
        page = self._page(offset)
        if not self._present[page]:
            self._present[page] = 1
            self._missing -= 1
        near_stream = (
            self._stream_end - self._last_len <= page < self._stream_end + self._chunk_pages
        )
        if not (near_stream or page == self._last_fault + 1):
            self._chunk_pages = self.min_pages
        self._last_fault = page
        self._cursor = page + 1 if page + 1 < self.npages else 0
        self._stream_end = self._cursor

    def next_chunk(self) -> tuple[int, int] | None:
        """The next run of missing pages to fetch, ``(offset, length)``, now marked present.

        At most ``chunk_size`` bytes, never crossing a boundary, ending at
        the first page already present. None when every page is present.
        """
        if not self._missing:
            return None
        start = self._present.find(0, self._cursor)
        if start < 0:
            start = self._present.find(0)
            # Wrapping round is a jump, not a sequential continuation.
            self._chunk_pages = self.min_pages
        stop = next(s for s in self._stops if s > start)
        limit = min(start + self._chunk_pages, stop)
        end = self._present.find(1, start, limit)
        end = limit if end < 0 else end
        self._present[start:end] = b"\x01" * (end - start)
        self._missing -= end - start
        self._last_len = end - start
        self._cursor = self._stream_end = end
        self._chunk_pages = min(self._chunk_pages * 2, self.max_pages)
        return start * self.page_size, (end - start) * self.page_size


class WorkingSetError(ValueError):
    """A working-set file that cannot be used; the message names the file and the problem."""


def working_set_path(source: str | os.PathLike[str]) -> str:
    """Where the working set of a snapshot file lives: ``SNAPSHOT.ws.json`` next to it."""
    return os.fspath(source) + ".ws.json"


class WorkingSet:
    """Pages (byte offsets in the flat source space) a run faulted on.

    JSON on disk: ``{"format": "pyuffd-working-set", "version": 1,
    "page_size": N, "length": L, "runs": [[first_page, pages], ...]}`` with
    sorted, merged runs. ``length`` is the flat space's size, so a working
    set recorded for a different snapshot layout is refused.
    """

    def __init__(self, page_size: int = mmap.PAGESIZE, length: int | None = None) -> None:
        self.page_size = page_size
        self.length = length
        self._pages: set[int] = set()

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, offset: object) -> bool:
        return isinstance(offset, int) and offset // self.page_size in self._pages

    def add(self, offset: int) -> None:
        """Record the page holding ``offset``."""
        self._pages.add(offset // self.page_size)

    def update(self, offsets: Iterable[int]) -> None:
        """Record every page holding one of ``offsets``."""
        self._pages.update(o // self.page_size for o in offsets)

    def pages(self) -> list[int]:
        """The recorded page offsets (bytes), sorted."""
        return [p * self.page_size for p in sorted(self._pages)]

    def ranges(self, max_length: int | None = None) -> list[tuple[int, int]]:
        """Sorted, merged ``(offset, length)`` runs; each at most ``max_length`` bytes if given."""
        out: list[tuple[int, int]] = []
        limit = None if max_length is None else max(1, max_length // self.page_size)
        for first, count in self._runs():
            while count:
                n = count if limit is None else min(count, limit)
                out.append((first * self.page_size, n * self.page_size))
                first += n
                count -= n
        return out

    def _runs(self) -> list[tuple[int, int]]:
        runs: list[list[int]] = []
        for page in sorted(self._pages):
            if runs and runs[-1][0] + runs[-1][1] == page:
                runs[-1][1] += 1
            else:
                runs.append([page, 1])
        return [(a, b) for a, b in runs]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        page_size: int | None = None,
        length: int | None = None,
    ) -> WorkingSet:
        """Read a working set; ``page_size``/``length``, when given, must match the file's.

        What it may claim is bounded before anything is built: the file's
        size (MAX_WORKING_SET_FILE), every run inside the memory (``length``,
        else the file's own length, else MAX_WORKING_SET_PAGES pages), and
        the pages of all runs together at most the pages of that memory.

        Raises:
            FileNotFoundError: no such file.
            WorkingSetError: malformed, too large, of another format version,
                claiming pages past the memory, or recorded for another page
                size or snapshot length.
        """
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read(MAX_WORKING_SET_FILE + 1)
        if len(raw) > MAX_WORKING_SET_FILE:
            raise WorkingSetError(
                f"{path}: larger than {MAX_WORKING_SET_FILE >> 20} MiB, not a working set "
                "this daemon wrote; delete it to record anew"
            )
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise WorkingSetError(f"{path}: not JSON ({err}); delete it to record anew") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise WorkingSetError(f"{path}: not a {_FORMAT} file; delete it to record anew")
        if doc.get("version") != _VERSION:
            raise WorkingSetError(
                f"{path}: format version {doc.get('version')!r}, this pyuffd reads {_VERSION}"
            )
        file_page, file_length, runs = doc.get("page_size"), doc.get("length"), doc.get("runs")
        if type(file_page) is not int or file_page <= 0 or not isinstance(runs, list):
            raise WorkingSetError(f"{path}: page_size or runs missing or malformed")
        if file_length is not None and (type(file_length) is not int or file_length < 0):
            raise WorkingSetError(f"{path}: length {file_length!r} is not a byte count")
        if page_size is not None and file_page != page_size:
            raise WorkingSetError(
                f"{path}: recorded with {file_page}-byte pages, the source has {page_size}; "
                "delete it to record anew"
            )
        if length is not None and file_length is not None and file_length != length:
            raise WorkingSetError(
                f"{path}: recorded for {file_length} bytes of memory, the source has {length}; "
                "delete it to record anew"
            )
        bound = length if length is not None else file_length
        limit = bound // file_page if bound is not None else MAX_WORKING_SET_PAGES
        total = 0
        for run in runs:
            if (
                not isinstance(run, list)
                or len(run) != 2
                or not all(type(x) is int and x >= 0 for x in run)
                or run[0] + run[1] > limit
            ):
                raise WorkingSetError(
                    f"{path}: bad run {run!r} (runs are [first page, pages] inside the "
                    f"{limit} pages of the memory); delete it to record anew"
                )
            total += run[1]
            if total > limit:
                raise WorkingSetError(
                    f"{path}: its runs claim more than the {limit} pages of the memory; "
                    "delete it to record anew"
                )
        ws = cls(file_page, file_length if file_length is not None else length)
        for first, count in runs:
            ws._pages.update(range(first, first + count))
        return ws

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the working set atomically (temporary file, fsync, rename, directory fsync)."""
        path = os.fspath(path)
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "page_size": self.page_size,
            "length": self.length,
            "runs": [list(run) for run in self._runs()],
        }
        data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
