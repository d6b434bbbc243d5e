"""The workloads of the benchmark suite, one run of one handler at a time.

Every function here runs one workload once (one repeat) for one handler and
returns a flat dict of figures (floats); :mod:`uffd.bench.suite` repeats and
interleaves them. The handlers:

- ``c-ref``: the textbook C handler (``csrc/bench/ref_handler.c``, one
  ``read()`` and one page-sized UFFDIO_COPY per fault);
- ``naive``: the hand-rolled ctypes handler (:mod:`uffd.bench.naive_ctypes`);
- ``python``: :class:`uffd.FaultHandler` with ``BufferOps(buf, native=False)``:
  every fault goes through the Python dispatch (``_run`` → ``_dispatch`` →
  ``handle_missing`` → ``_apply``);
- ``native``: the same with ``BufferOps(buf, native=True, prefetch=PAGE)``:
  the C pump serves each fault without entering Python, one page per fault
  (the pump's own cost, comparable with the C handler's);
- ``native-prefetch``: ``BufferOps(buf, native=True)`` as users get it: the
  pump installs a run of pages from the faulting one on, doubling up to
  1 MiB while faults are sequential (one UFFDIO_COPY per run);
- ``prefetch``: the Python path with an ops that, on each fault, installs a
  window of pages ahead of it (``handler.install(..., wake=False)`` and one
  ``handler.wake``), doubling the window while the faults run on in order.

Faults are always raised by C code that does not hold the GIL: the touch
loops of ``libtouch.so`` (``csrc/bench/touch.c``, called through ctypes,
which releases the GIL), the same loops the naive handler is driven with, so
the per-fault timing is identical across handlers. CPU placement: the
toucher pins itself (libtouch); the FaultHandler's dispatch and watchdog
threads are created while the creating thread is pinned to the handler CPU,
so they inherit it (Linux threads inherit the affinity of their creator).

Pages hold the pattern of ``ref_handler.c`` (page i is all ``1 + i % 251``)
and every run checks a sample of pages afterwards.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from uffd import mem
from uffd._handler import FaultHandler
from uffd._mapping import Fault, Mapping
from uffd._ops import UffdOps
from uffd._resolution import Resolution
from uffd._stats import HandlerStats
from uffd.bench import cpucost
from uffd.bench.naive_ctypes import _figures, _libtouch, _pattern, _touch, run_naive
from uffd.bench.placement import Placement
from uffd.bench.reference import default_build_dir, run_reference
from uffd.modules.sources import BufferOps

__all__ = [
    "HANDLERS",
    "PAGE",
    "TOUCH_WORKLOADS",
    "PatternSource",
    "RestoreServer",
    "run_dirty",
    "run_dirty_reference",
    "run_fetch_only",
    "run_limit",
    "run_restore",
    "run_sparse",
    "run_touch",
    "serve_process",
]

PAGE = mmap.PAGESIZE
DIRTY_WARMUP = 3  # untimed harvest rounds, as HARVEST_WARMUP in ref_handler.c
TOUCH_WORKLOADS = ("random", "sequential", "threads")
_PYUFFD_HANDLERS = ("python", "native", "prefetch", "native-prefetch")
HANDLERS = ("c-ref", "naive", *_PYUFFD_HANDLERS)
_VERIFY_SAMPLES = 256
_NO_CPU = -1


def _pattern_block() -> bytes:
    """251 pages of the pattern: the whole source is this block repeated."""
    return b"".join(bytes([_pattern(i)]) * PAGE for i in range(251))


class PatternSource:
    """A buffer of ``pages`` pattern pages, built once and shared by the handlers."""

    def __init__(self, pages: int) -> None:
        block = _pattern_block()
        whole, rest = divmod(pages, 251)
        self.pages = pages
        self.buffer = bytearray(block * whole + block[: rest * PAGE])


def _verify(region: mem.Region, pages: int, what: str) -> None:
    """Compare a sample of pages with the pattern (Region.read: GIL released, SIGBUS-safe)."""
    samples = min(pages, _VERIFY_SAMPLES)
    for k in range(samples + 1):
        i = k * pages // samples if k < samples else pages - 1
        got = region.read(i * PAGE, PAGE)
        if got != bytes([_pattern(i)]) * PAGE:
            raise RuntimeError(f"{what}: page {i} has the wrong contents (first byte {got[0]:#x})")


@contextlib.contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    """Pin the calling thread to ``cpu`` (-1: leave it) for the block.

    Threads created inside the block inherit the pinning.
    """
    if cpu < 0:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _anon(pages: int) -> mem.Region:
    """An anonymous region without THP: 4 KiB faults, as in ref_handler.c."""
    region = mem.anon(pages * PAGE)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    return region


def _rc(rc: int, what: str) -> None:
    if rc:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")


class PrefetchOps(UffdOps):
    """MISSING faults from a buffer; each fault also installs a window of pages ahead of it.

    The window starts at ``min_pages`` and doubles up to ``max_pages`` while
    each fault lands where the previous window ended (a sequential scan);
    a fault elsewhere starts over. The window goes in with one UFFDIO_COPY
    with DONTWAKE and one UFFDIO_WAKE (another thread may wait in it); the
    faulting page itself is the handler's answer. Runs on the dispatch thread
    (``bind`` first).
    """

    def __init__(self, buffer: Any, *, min_pages: int = 16, max_pages: int = 512) -> None:
        self._view = memoryview(buffer).cast("B")
        self._min = min_pages
        self._max = max_pages
        self._window = 0
        self._next = -1
        self._handler: FaultHandler | None = None
        self.installed = 0

    def bind(self, handler: FaultHandler) -> None:
        """The handler whose ``install``/``wake`` the window goes through."""
        self._handler = handler

    def handle_missing(self, fault: Fault) -> Resolution:
        """Install the window after the faulting page, then copy the page itself."""
        m = fault.mapping
        ps = m.page_size
        ahead = fault.offset + ps
        sequential = fault.offset == self._next
        window = min(self._max, self._window * 2) if sequential else self._min
        end = min(ahead + window * ps, m.length)
        if end > ahead and self._handler is not None:
            self.installed += self._handler.install(m, ahead, self._view[ahead:end], wake=False)
            self._handler.wake(m, ahead, end - ahead)
        self._window, self._next = window, end
        return Resolution.copy(self._view[fault.offset : fault.offset + ps])


def _pyuffd_ops(handler: str, source: PatternSource) -> UffdOps:
    """The ops of a FaultHandler-based handler (python, native, prefetch, native-prefetch)."""
    if handler == "prefetch":
        return PrefetchOps(source.buffer)
    if handler == "native":
        # One page per fault: the pump's own cost, comparable with the C handler's.
        return BufferOps(source.buffer, native=True, prefetch=PAGE)
    if handler == "native-prefetch":
        return BufferOps(source.buffer, native=True)
    return BufferOps(source.buffer, native=False)


def _start_handler(
    region: mem.Region, ops: UffdOps, cpu: int, spin: float | None = None
) -> tuple[FaultHandler, set[int]]:
    """A started FaultHandler serving ``region``, its threads pinned to ``cpu``.

    ``spin`` is its ``spin`` (None: FaultHandler's default).
    Returns it with the ids of the threads that appeared while it started
    (its dispatch thread and the pump's watchdog): the handler's CPU time is
    theirs (:mod:`uffd.bench.cpucost`), not the process's, which counts the
    toucher too.
    """
    before = cpucost.thread_ids()
    with _pinned(cpu):
        fh = (
            FaultHandler(fallback="zero")
            if spin is None
            else FaultHandler(fallback="zero", spin=spin)
        )
        try:
            fh.register(region, ops=ops)
            fh.start()
        except BaseException:
            fh.stop()
            raise
    if isinstance(ops, PrefetchOps):
        ops.bind(fh)
    return fh, cpucost.thread_ids() - before


def _cpu_figures(cpu_ns: int, stats: HandlerStats) -> dict[str, float]:
    """Fault counts and the handler's CPU time per fault served."""
    python = float(sum(stats.total.faults.values()))
    native = float(stats.native_faults)
    return {
        "faults_python": python,
        "faults_native": native,
        "handler_cpu_ns": float(cpu_ns),
        "cpu_us_per_fault": cpu_ns / 1e3 / max(1.0, python + native),
    }


def _run_pyuffd(
    workload: str,
    handler: str,
    source: PatternSource,
    threads: int,
    placement: Placement,
    seed: int,
    build_dir: Path,
) -> dict[str, float]:
    """One run of a FaultHandler-based handler (python, native, prefetch)."""
    lib = _libtouch(build_dir)
    pages = source.pages
    region = _anon(pages)
    try:
        ops = _pyuffd_ops(handler, source)
        fh, tids = _start_handler(region, ops, placement.handler_cpu)
        try:
            cpu0 = cpucost.threads_cpu_ns(tids)
            rc, elapsed_ns, fault_ns = _touch(
                lib, workload, region.addr, pages, threads, placement.toucher_cpu, seed
            )
            cpu_ns = cpucost.threads_cpu_ns(tids) - cpu0
            _rc(rc, f"libtouch ({workload})")
            figures = _figures(pages, elapsed_ns, fault_ns)
            stats = fh.stats
        finally:
            fh.stop()  # re-raises what the handler recorded
        _verify(region, pages, f"{handler} handler, {workload}")
    finally:
        region.close()
    figures.update(_cpu_figures(cpu_ns, stats))
    if stats.expired:
        raise RuntimeError(
            f"{handler} handler, {workload}: {stats.expired} faults missed the deadline"
        )
    if isinstance(ops, PrefetchOps):
        figures["pages_prefetched"] = ops.installed / PAGE
    return figures


def run_sparse(
    handler: str,
    placement: Placement,
    *,
    rate: float = 100.0,
    seconds: float = 3.0,
    spin: float | None = None,
    build_dir: Path | None = None,
) -> dict[str, float]:
    """The handler's CPU cost while faults are sparse: one fault every 1/``rate`` s.

    The pump polls for a while after each fault before it sleeps; this
    measures what that costs when faults come seldom. The toucher touches
    ``rate * seconds`` pages in order, one libtouch call per page, sleeping
    until each one's due time. ``spin`` is the FaultHandler's (None: its
    default; 0 turns the polling off, the baseline of what it costs).
    Figures: cpu_percent (the handler threads' CPU time over the wall time,
    in % of one CPU), cpu_us_per_fault, pages_per_s (the fault rate
    achieved), fault_us_median.

    Raises:
        ValueError: an unknown handler, or rate/seconds not positive.
        RuntimeError, OSError: the handler failed or a page is wrong.
    """
    if handler not in _PYUFFD_HANDLERS:
        raise ValueError(f"unknown handler {handler!r}; choose from {', '.join(_PYUFFD_HANDLERS)}")
    if rate <= 0 or seconds <= 0:
        raise ValueError(f"rate and seconds must be positive, got {rate!r}, {seconds!r}")
    lib = _libtouch(build_dir if build_dir is not None else default_build_dir())
    pages = max(1, round(rate * seconds))
    source = PatternSource(pages)
    region = _anon(pages)
    one = ctypes.c_uint64()
    fault_ns = []
    try:
        ops = _pyuffd_ops(handler, source)
        fh, tids = _start_handler(region, ops, placement.handler_cpu, spin)
        try:
            cpu0 = cpucost.threads_cpu_ns(tids)
            t0 = time.perf_counter_ns()
            for i in range(pages):
                due = t0 + round(i * 1e9 / rate)
                wait = due - time.perf_counter_ns()
                if wait > 0:
                    time.sleep(wait / 1e9)
                rc = lib.touch_pages(
                    region.addr + i * PAGE, 1, PAGE, None, None, placement.toucher_cpu, one
                )
                _rc(rc, "libtouch (sparse)")
                fault_ns.append(one.value)
            # The last fault's spin is part of its cost: wait one interval before reading.
            time.sleep(1 / rate)
            wall_ns = time.perf_counter_ns() - t0
            cpu_ns = cpucost.threads_cpu_ns(tids) - cpu0
            stats = fh.stats
        finally:
            fh.stop()
        _verify(region, pages, f"{handler} handler, sparse")
    finally:
        region.close()
    figures = _cpu_figures(cpu_ns, stats)
    figures["cpu_percent"] = 100.0 * cpu_ns / wall_ns
    figures["pages_per_s"] = pages * 1e9 / wall_ns
    figures["fault_us_median"] = statistics.median(fault_ns) / 1e3
    return figures


def run_touch(
    workload: str,
    handler: str,
    source: PatternSource,
    placement: Placement,
    *,
    threads: int = 4,
    seed: int = 1,
    build_dir: Path | None = None,
) -> dict[str, float]:
    """One repeat of ``workload`` (random, sequential, threads) with ``handler``.

    Returns pages_per_s and elapsed_ns, plus fault_ns_median/p90/mean for
    ``random``, and the fault counts. ``threads`` applies to ``threads`` only.

    Raises:
        ValueError: an unknown workload or handler.
        RuntimeError, OSError: a handler failed or a page is wrong.
    """
    if workload not in TOUCH_WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}")
    build_dir = build_dir if build_dir is not None else default_build_dir()
    nthreads = threads if workload == "threads" else 1
    if handler in ("c-ref", "naive"):
        run = run_reference if handler == "c-ref" else run_naive
        report = run(
            workload,
            source.pages,
            threads=nthreads,
            handler_cpu=placement.handler_cpu,
            toucher_cpu=placement.toucher_cpu,
            repeat=1,
            seed=seed,
            build_dir=build_dir,
        )
        return {k: float(v) for k, v in report["median"].items()}
    if handler in _PYUFFD_HANDLERS:
        return _run_pyuffd(workload, handler, source, nthreads, placement, seed, build_dir)
    raise ValueError(f"unknown handler {handler!r}; choose from {', '.join(HANDLERS)}")


def run_limit(
    limit: str, pages: int, placement: Placement, *, build_dir: Path | None = None
) -> dict[str, float]:
    """One repeat of a limit in the C reference: ``notouch`` or ``bulkcopy``."""
    report = run_reference(
        limit,
        pages,
        handler_cpu=placement.handler_cpu,
        toucher_cpu=placement.toucher_cpu,
        repeat=1,
        build_dir=build_dir,
    )
    return {k: float(v) for k, v in report["median"].items()}


# -- dirty tracking --------------------------------------------------------------


def run_dirty_reference(
    pages: int, cpu: int, *, repeat: int, stride: int = 4, build_dir: Path | None = None
) -> list[dict[str, float]]:
    """The C PAGEMAP_SCAN loop of ref_handler.c: one harvest of every stride-th page per repeat."""
    report = run_reference(
        "pagemap_scan", pages, handler_cpu=cpu, repeat=repeat, stride=stride, build_dir=build_dir
    )
    runs = []
    for rep in range(repeat):
        harvest = float(report["harvest_ns"][rep])
        runs.append(
            {
                "harvest_ns": harvest,
                "harvest_cpu_ns": float(report["harvest_cpu_ns"][rep]),
                "pages_found": float(report["pages_found"][rep]),
                "ranges": float(report["ranges"][rep]),
                "pages_per_s": pages * 1e9 / harvest,
            }
        )
    return runs


def run_dirty(
    pages: int, cpu: int, *, repeat: int, stride: int = 4, into: bool = False
) -> list[dict[str, float]]:
    """``DirtyTracker.collect()`` over ``pages`` pages, every stride-th one written, per repeat.

    The same steps as the C loop: populate every page, start tracking,
    harvest once (all of them), then per repeat write every stride-th page
    and time one harvest; check that it found exactly those pages, and that
    a second harvest finds nothing. The first ``DIRTY_WARMUP`` rounds, as
    in C, are not timed: the allocator settles over the first few 1 MiB
    results (the first harvests each fault in up to 512 fresh pages). With
    ``into`` each harvest is ``collect_into`` one reused ``DirtyRanges``.
    ``pages_per_s`` is pages scanned per second; ``harvest_cpu_ns`` is the
    thread's CPU time, which other processes on a shared host do not inflate.
    """
    from uffd.dirty import DirtyRanges, DirtyTracker

    region = _anon(pages)
    runs = []
    try:
        length = pages * PAGE
        memory = (ctypes.c_char * length).from_address(region.addr)
        view = memoryview(memory).cast("B")
        # Populate with the pattern's first byte of each page (no userfaultfd yet).
        view[::PAGE] = bytes(_pattern(i) for i in range(pages))
        written = bytes(_pattern(i) for i in range(0, pages, stride))
        # What the harvest must hold, word for word: one range per written
        # page, or the whole region as one range when every page is written.
        if stride == 1:
            want = array("Q", (region.addr, length))
        else:
            starts = range(region.addr, region.addr + length, stride * PAGE)
            want = array("Q", [word for start in starts for word in (start, PAGE)])
        out = DirtyRanges()
        with DirtyTracker(region) as tracker, _pinned(cpu):
            tracker.collect()
            for rep in range(-DIRTY_WARMUP, repeat):
                # WP_ASYNC: the kernel resolves these write faults itself, no handler needed.
                view[:: PAGE * stride] = written
                cpu0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                ranges = tracker.collect_into(out) if into else tracker.collect()
                elapsed = time.perf_counter_ns() - t0
                cpu = time.thread_time_ns() - cpu0
                if ranges.array != want:
                    raise RuntimeError(
                        f"DirtyTracker found {ranges.bytes // PAGE} pages in {len(ranges)} "
                        f"ranges, want {len(written)} pages in {len(want) // 2}"
                    )
                if tracker.collect():
                    raise RuntimeError("DirtyTracker reported pages again after a harvest")
                if rep < 0:
                    continue
                runs.append(
                    {
                        "harvest_ns": float(elapsed),
                        "harvest_cpu_ns": float(cpu),
                        "pages_found": float(ranges.bytes // PAGE),
                        "ranges": float(len(ranges)),
                        "pages_per_s": pages * 1e9 / elapsed,
                    }
                )
        view.release()
    finally:
        region.close()
    return runs


# -- lazy restore over loopback ------------------------------------------------------


def serve_process(path: str) -> tuple[subprocess.Popen[str], str]:
    """``python -m uffd serve PATH`` in a child process, and its URL once it listens.

    Raises:
        RuntimeError: it did not say it is listening (its stderr is in the message).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "uffd", "serve", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"the page server did not start: {(line + err).strip()}")
    return proc, line.split()[-1]


class RestoreServer:
    """A raw memory file of ``pages`` pattern pages, served by a page server on loopback.

    ``mode="thread"`` runs :class:`uffd.pagestore.server.ServerThread` in this process
    (it shares the GIL with the handler); ``mode="process"`` runs the same
    server as ``python -m uffd serve`` in a child process, as a page server
    on another host would be. ``close()`` stops it and removes the file.
    """

    def __init__(self, pages: int, *, mode: str = "process") -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', not {mode!r}")
        self.pages = pages
        self.mode = mode
        self._dir = tempfile.TemporaryDirectory(prefix="uffd-bench-")
        self.path = os.path.join(self._dir.name, "memory.raw")
        block = _pattern_block()
        with open(self.path, "wb") as f:
            left = pages * PAGE
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
        self._thread: Any = None
        self._source: Any = None
        self._proc: subprocess.Popen[str] | None = None
        try:
            self.url = self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> str:
        if self.mode == "thread":
            from uffd.pagestore.server import ServerThread
            from uffd.pagestore.snapshot import RawMemoryFile

            self._source = RawMemoryFile(self.path)
            self._thread = ServerThread(self._source)
            return str(self._thread.url)
        self._proc, url = serve_process(self.path)
        return url

    @property
    def pid(self) -> int:
        """The page server's process id (this process's in ``thread`` mode)."""
        return self._proc.pid if self._proc is not None else os.getpid()

    def close(self) -> None:
        """Stop the server and delete the file (idempotent)."""
        if self._thread is not None:
            self._thread.close()
            self._thread = None
        if self._source is not None:
            self._source.close()
            self._source = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.communicate()
            self._proc = None
        self._dir.cleanup()


class _RestoreOps(UffdOps):
    """Faults fetch their page from the page server (urgent) and are resolved when it arrives.

    ``drain()`` waits until every fetch started for a fault has been answered.
    """

    def __init__(self, client: Any, handler: FaultHandler) -> None:
        self._client = client
        self._handler = handler
        self._cond = threading.Condition()
        self._outstanding = 0

    def handle_missing(self, fault: Fault) -> Resolution:
        """Start an urgent fetch of the page; answer from the client's thread (maybe at once)."""
        with self._cond:
            self._outstanding += 1
        future = self._client.fetch("mem", fault.offset, fault.mapping.page_size, urgent=True)
        future.add_done_callback(lambda f: self._arrived(fault, f))
        return Resolution.defer()

    def _arrived(self, fault: Fault, future: concurrent.futures.Future[bytes]) -> None:
        err = future.exception()
        answer = (
            Resolution.refuse(f"fetch failed: {err}") if err else Resolution.copy(future.result())
        )
        self._handler.resolve(fault, answer)  # an early answer is kept until defer() returns
        with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Wait until every fault's fetch has been answered."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._outstanding == 0, timeout):
                raise RuntimeError(
                    f"{self._outstanding} fault fetches unanswered after {timeout} s"
                )


def _prefetch(client: Any, handler: FaultHandler, mapping: Mapping, chunk: int, window: int) -> int:
    """Fetch the whole mapping in ``chunk``-byte reads, ``window`` in flight; install each.

    Each read lands in one of ``window`` reused buffers (``fetch_into``: the
    client receives into it, no bytes object per read), is installed from
    there, and the buffer is reused for a later read. The buffers are
    anonymous mmaps: a bytearray would be zeroed (16 MiB of memset) while
    holding the GIL, just as the worker's first fault needs it.

    Returns the bytes installed (pages a fault installed first are skipped).
    """
    length = mapping.length
    free = [mmap.mmap(-1, chunk) for _ in range(window)]
    pending: collections.deque[tuple[int, mmap.mmap, memoryview, Any]] = collections.deque()
    offset = installed = 0
    while offset < length or pending:
        while offset < length and free:
            buf = free.pop()
            view = memoryview(buf)[: min(chunk, length - offset)]
            pending.append(
                (offset, buf, view, client.fetch_into("mem", offset, view, urgent=False))
            )
            offset += len(view)
        at, buf, view, future = pending.popleft()
        future.result()
        installed += handler.install(mapping, at, view, wake=False)
        handler.wake(mapping, at, len(view))
        view.release()
        free.append(buf)
    return installed


def run_fetch_only(
    server: RestoreServer, *, chunk: int = 4 << 20, window: int = 4
) -> dict[str, float]:
    """The page server and client alone, no userfaultfd: the ceiling of the restore workload.

    Figures: fetch_gbps (the whole image in ``chunk``-byte reads, ``window``
    in flight, into ``window`` reused buffers, as the prefetcher reads it)
    and idle_fetch_ms (the median of 20 urgent single-page reads on an idle
    connection, the floor of a fault's round trip to the server).
    """
    from uffd.pagestore.client import ThreadedPageClient

    length = server.pages * PAGE
    with ThreadedPageClient(server.url) as client:
        singles = []
        for k in range(20):
            t = time.perf_counter_ns()
            client.read("mem", (k * 7919 % server.pages) * PAGE, PAGE, urgent=True)
            singles.append(time.perf_counter_ns() - t)
        free = [bytearray(chunk) for _ in range(window)]
        pending: collections.deque[tuple[bytearray, concurrent.futures.Future[int]]] = (
            collections.deque()
        )
        offset = 0
        t0 = time.perf_counter_ns()
        while offset < length or pending:
            while offset < length and free:
                buf = free.pop()
                view = memoryview(buf)[: min(chunk, length - offset)]
                pending.append((buf, client.fetch_into("mem", offset, view, urgent=False)))
                offset += len(view)
            buf, future = pending.popleft()
            future.result()
            free.append(buf)
        elapsed = time.perf_counter_ns() - t0
    return {
        "fetch_gbps": length / elapsed,
        "pages_per_s": server.pages * 1e9 / elapsed,
        "idle_fetch_ms": statistics.median(singles) / 1e6,
    }


def run_restore(
    server: RestoreServer,
    *,
    seed: int = 1,
    chunk: int = 4 << 20,
    window: int = 4,
    worker_pages: int = 256,
    separate_urgent: bool = True,
    build_dir: Path | None = None,
) -> dict[str, float]:
    """One lazy restore of the server's memory into a fresh region, with a worker running.

    The minimal restore driver: a :class:`uffd.pagestore.client.ThreadedPageClient`, a
    FaultHandler whose ops defer each fault to an urgent fetch, and a
    background prefetcher thread that installs the whole image in order. At
    t0 the prefetcher and the worker (a C thread touching ``worker_pages``
    random pages, each access timed) start together. Figures: restore_s
    (t0 until every page is installed), restore_gbps (10^9 bytes/s),
    first_access_ms (the worker's first access, from its start),
    worker_fault_us_median, connect_ms, faults (served on demand).
    """
    from uffd.pagestore.client import ThreadedPageClient

    lib = _libtouch(build_dir if build_dir is not None else default_build_dir())
    pages = server.pages
    length = pages * PAGE
    region = _anon(pages)
    rng = random.Random(seed)
    order = array("Q", rng.sample(range(pages), min(worker_pages, pages)))
    fault_ns = array("Q", bytes(8 * len(order)))
    elapsed = ctypes.c_uint64()
    worker_rc: list[int] = []

    def worker() -> None:
        worker_rc.append(
            lib.touch_pages(
                region.addr,
                len(order),
                PAGE,
                order.buffer_info()[0],
                fault_ns.buffer_info()[0],
                _NO_CPU,
                ctypes.byref(elapsed),
            )
        )

    try:
        t_connect = time.perf_counter_ns()
        client = ThreadedPageClient(server.url)
        connect_ns = time.perf_counter_ns() - t_connect
        # Faults fetch on a connection of their own: on the prefetch connection a
        # reply would wait behind the megabytes of prefetch data already queued.
        urgent = ThreadedPageClient(server.url) if separate_urgent else client
        try:
            fh = FaultHandler(fallback="zero", deadline=10.0)
            ops = _RestoreOps(urgent, fh)
            try:
                mapping = fh.register(region, ops=ops)
                fh.start()
                thread = threading.Thread(target=worker, name="restore-worker", daemon=True)
                t0 = time.perf_counter_ns()
                thread.start()
                installed = _prefetch(client, fh, mapping, chunk, window)
                restore_ns = time.perf_counter_ns() - t0
                thread.join()
                ops.drain(fh.deadline)
                stats = fh.stats
            finally:
                fh.stop()
        finally:
            if urgent is not client:
                urgent.close()
            client.close()
        if not worker_rc:
            raise RuntimeError("the restore worker did not finish")
        _rc(worker_rc[0], "restore worker")
        _verify(region, pages, "restore")
    finally:
        region.close()
    ordered = sorted(fault_ns)
    return {
        "restore_s": restore_ns / 1e9,
        "restore_gbps": length / restore_ns,
        "pages_per_s": pages * 1e9 / restore_ns,
        "first_access_ms": fault_ns[0] / 1e6,
        "worker_fault_us_median": statistics.median(ordered) / 1e3,
        "connect_ms": connect_ns / 1e6,
        "faults": float(sum(stats.total.faults.values())),
        "bytes_prefetched": float(installed),
    }
