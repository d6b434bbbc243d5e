"""Make snapshots: from a raw memory image, or from a live process's memory.

:func:`capture_process` is a memory-only checkpoint of a running process:
its private writable mappings (heap, stack, anonymous mmaps, the written
data of its libraries), or the address ranges given, read through
``/proc/PID/mem`` (proc(5)). It is what a lazy restore starts from: serve the
file (``uffd serve``) and fault it into a new process. Registers, fds and the
rest of the process state are not captured.

All-zero pages are detected and not stored; anonymous pages that were never
touched (neither present nor swapped in ``/proc/PID/pagemap``) are not even
read, so sparse reservations cost nothing and a range registered with
userfaultfd in the target is not faulted in by the capture. ``freeze=True``
stops the process (SIGSTOP) while it is read, for a consistent image, and
continues it (SIGCONT) afterwards, also on error.

:func:`snapshot_from_raw` turns a raw image (Firecracker's memory file:
memory at its file offset) into a snapshot with one region, ``"mem"``: the
name :class:`~uffd.pagestore.snapshot.RawMemoryFile` gives it, so a client
asks for the same region from either file.

Both write through :func:`~uffd.pagestore.snapshot.write_snapshot`
(atomically, mode 0600). Pure Python, no userfaultfd needed.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import signal
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from uffd.pagestore.snapshot import MAGIC, SnapshotInfo, write_snapshot

__all__ = ["MemoryRange", "capture_process", "private_writable_ranges", "snapshot_from_raw"]

_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_READ_CHUNK = 1 << 20
_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class MemoryRange:
    """One address range of a process: ``[start, end)``, and what it maps."""

    start: int
    end: int
    label: str
    """The mapped file's path, a kernel name such as ``[heap]``, or ``[anon]``."""
    anonymous: bool
    """No file behind it: a page never touched reads as zeros."""

    @property
    def name(self) -> str:
        """The region's name in the snapshot: the start address, then the label."""
        return f"{self.start:#x} {self.label}".encode()[:255].decode("utf-8", "ignore")


def private_writable_ranges(pid: int) -> list[MemoryRange]:
    """The private, writable mappings of ``pid`` from ``/proc/PID/maps``, in address order.

    Raises:
        ProcessLookupError: no process ``pid``.
        PermissionError: this user may not read the process's maps.
    """
    ranges = []
    for line in _read_maps(pid):
        fields = line.split(maxsplit=5)
        perms = fields[1]
        if perms[1] != "w" or perms[3] != "p":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        path = fields[5].strip() if len(fields) > 5 else ""
        # [heap], [stack], [anon:...] or nothing: no file supplies untouched pages.
        anonymous = not path.startswith("/")
        ranges.append(MemoryRange(start, end, path or "[anon]", anonymous))
    return ranges


def _read_maps(pid: int) -> list[str]:
    with os.fdopen(_open_proc(pid, "maps")) as maps:
        return maps.read().splitlines()


def capture_process(
    out: str | os.PathLike[str],
    pid: int,
    ranges: Sequence[tuple[int, int]] | None = None,
    *,
    freeze: bool = False,
    chunk_pages: int = 256,
) -> SnapshotInfo:
    """Write a snapshot of process ``pid``'s memory to ``out``; one region per range.

    ``ranges`` are ``(address, length)`` pairs, page-aligned; the default is
    every private writable mapping (:func:`private_writable_ranges`). Memory
    use grows with the non-zero pages captured, not with the ranges' size.

    Calling context: any thread. Needs ptrace access to ``pid`` (the same
    user under ``kernel.yama.ptrace_scope`` 0, or root / CAP_SYS_PTRACE).

    Raises:
        ValueError: a misaligned, empty or overlapping range.
        ProcessLookupError: no process ``pid`` (or it exited while read).
        PermissionError: no ptrace access to ``pid``: the message says what is needed.
        OSError: a range could not be read (EIO: not mapped in the process).
    """
    page = mmap.PAGESIZE
    with contextlib.ExitStack() as stack:
        if freeze:
            stack.enter_context(_frozen(pid))
        chosen = _check_ranges(pid, ranges, page)
        memfd = _open_proc(pid, "mem")
        stack.callback(os.close, memfd)
        pagemap = _open_proc(pid, "pagemap")
        stack.callback(os.close, pagemap)
        buffers = {
            rng.name: stack.enter_context(_read_range(memfd, pagemap, rng, page)) for rng in chosen
        }
        info = write_snapshot(out, buffers, page_size=page, chunk_pages=chunk_pages)
    return info


def _check_ranges(
    pid: int, ranges: Sequence[tuple[int, int]] | None, page: int
) -> list[MemoryRange]:
    maps = private_writable_ranges(pid)
    if ranges is None:
        return maps
    chosen: list[MemoryRange] = []
    for addr, length in sorted(ranges):
        if addr % page or length % page or length <= 0:
            raise ValueError(
                f"range {addr:#x}:{length:#x} must be a positive length at a "
                f"page-aligned address, both multiples of the page size {page}"
            )
        if chosen and addr < chosen[-1].end:
            raise ValueError(f"range {addr:#x}:{length:#x} overlaps {chosen[-1].name}")
        # A range inside an anonymous mapping may skip its untouched pages.
        anonymous = any(m.anonymous and m.start <= addr and addr + length <= m.end for m in maps)
        chosen.append(MemoryRange(addr, addr + length, f"+{length:#x}", anonymous))
    return chosen


def _open_proc(pid: int, what: str) -> int:
    path = f"/proc/{pid}/{what}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    except PermissionError:
        raise PermissionError(
            errno.EACCES,
            f"cannot open {path}: reading another process's memory needs ptrace access "
            "(root or CAP_SYS_PTRACE, or the same user with kernel.yama.ptrace_scope=0)",
        ) from None


@contextlib.contextmanager
def _read_range(memfd: int, pagemap: int, rng: MemoryRange, page: int) -> Iterator[mmap.mmap]:
    """An anonymous mapping holding the range's contents; only non-zero pages are written."""
    length = rng.end - rng.start
    buffer = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        zero = bytes(page)
        for offset in range(0, length, _READ_CHUNK):
            n = min(_READ_CHUNK, length - offset)
            for at, run in _populated_runs(pagemap, rng, rng.start + offset, n, page):
                data = _pread_memory(memfd, rng, rng.start + offset + at, run)
                for i in range(0, run, page):
                    if data[i : i + page] != zero:
                        dst = offset + at + i
                        buffer[dst : dst + page] = data[i : i + page]
        yield buffer
    finally:
        buffer.close()


def _populated_runs(
    pagemap: int, rng: MemoryRange, addr: int, length: int, page: int
) -> list[tuple[int, int]]:
    """``(offset, length)`` runs of ``[addr, addr+length)`` worth reading.

    In an anonymous range, only pages present or swapped (pagemap(5)): an
    untouched page is zero, and reading it would fault it in (or wait on the
    target's userfaultfd). A file-backed range is read whole.
    """
    if not rng.anonymous:
        return [(0, length)]
    entries = os.pread(pagemap, length // page * 8, addr // page * 8)
    runs: list[tuple[int, int]] = []
    for index, (entry,) in enumerate(struct.iter_unpack("=Q", entries)):
        if entry & (_PM_PRESENT | _PM_SWAPPED):
            if runs and runs[-1][0] + runs[-1][1] == index * page:
                runs[-1] = (runs[-1][0], runs[-1][1] + page)
            else:
                runs.append((index * page, page))
    return runs


def _pread_memory(memfd: int, rng: MemoryRange, addr: int, length: int) -> bytes:
    try:
        data = os.pread(memfd, length, addr)
    except OSError as err:
        raise OSError(
            err.errno,
            f"cannot read {length} bytes at {addr:#x} ({rng.name}) of the process: "
            f"{err.strerror} (unmapped, or not readable through /proc/PID/mem)",
        ) from None
    if len(data) != length:
        # The process exited (or unmapped the range) while it was being read.
        raise ProcessLookupError(
            errno.ESRCH, f"short read at {addr:#x} ({rng.name}): the process changed or exited"
        )
    return data


@contextlib.contextmanager
def _frozen(pid: int) -> Iterator[None]:
    """Stop ``pid`` (SIGSTOP) until the block ends, then continue it (SIGCONT), always."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        raise ProcessLookupError(errno.ESRCH, f"no process {pid}") from None
    try:
        _wait_stopped(pid)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _wait_stopped(pid: int) -> None:
    """Return once every thread of ``pid`` is stopped; SIGSTOP is delivered asynchronously."""
    deadline = time.monotonic() + _STOP_TIMEOUT
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{tid}/stat") as stat,
            ):
                states.append(stat.read().rsplit(")", 1)[1].split()[0])
        if all(s in "Tt" for s in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                errno.ETIMEDOUT,
                f"process {pid} did not stop within {_STOP_TIMEOUT:.0f} s of SIGSTOP "
                f"(thread states {''.join(states)}): a thread blocked in the kernel "
                "(state D)? Retry, or capture without --freeze",
            )
        time.sleep(0.001)


def snapshot_from_raw(
    out: str | os.PathLike[str],
    raw: str | os.PathLike[str],
    *,
    page_size: int = mmap.PAGESIZE,
    chunk_pages: int = 256,
) -> SnapshotInfo:
    """Write the raw memory image ``raw`` to the snapshot ``out`` as one region, ``"mem"``.

    The image is mapped read-only and streamed, so memory use does not grow
    with its size; its zero pages (and the holes of a sparse file) are not
    stored.

    Raises:
        ValueError: the image is empty, already a snapshot, or not a multiple
            of ``page_size`` (the message names the file and the sizes).
        OSError: the image cannot be opened or read, or ``out`` cannot be written.
    """
    with open(raw, "rb") as image:
        size = os.fstat(image.fileno()).st_size
        if image.read(len(MAGIC)) == MAGIC:
            raise ValueError(f"{os.fspath(raw)} is already a pyuffd snapshot, not a raw image")
        if size == 0 or size % page_size:
            raise ValueError(
                f"{os.fspath(raw)} is {size} bytes, not a positive multiple of the page "
                f"size {page_size}: a raw image holds whole pages (see --page-size)"
            )
        with mmap.mmap(image.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return write_snapshot(out, {"mem": view}, page_size=page_size, chunk_pages=chunk_pages)
