"""Load: the FaultHandler, the pump and the page server under many threads, processes and events.

Everything runs against the real kernel with real processes and sockets. The
short variants run in ``make test``; the ``stress``-marked ones (``make stress``)
are the same tests with ten times the load. Every wait is bounded.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers.rel_common import (
    finish,
    page_identity,
    page_pattern,
    pattern,
    recv_json,
    send_json,
    spawn,
    wait_until,
)

import uffd
from uffd import Feature, Mode, Resolution, mem
from uffd.modules import BufferOps

PS = mem.PAGE_SIZE
WAIT = 30.0


class CounterOps(BufferOps):
    """MISSING from the previous area's bytes (every third copy write-protected); WP unprotects."""

    def __init__(self, buffer: Any, *, native: bool) -> None:
        super().__init__(buffer, native=native)
        self.copies = 0

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """The page at the fault's offset; every third one stays write-protected."""
        self.copies += 1
        page = self._view[fault.offset : fault.offset + fault.mapping.page_size]
        return Resolution.copy(page, keep_wp=self.copies % 3 == 0)

    def handle_wp(self, fault: uffd.Fault) -> Resolution:
        """Let the write through."""
        return Resolution.unprotect()


class PatternOps(uffd.UffdOps):
    """MISSING faults get ``page_pattern(page index)``, computed in Python."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """The known page for this offset."""
        return Resolution.copy(page_pattern(fault.offset // PS, PS))


@pytest.fixture(scope="module")
def counters(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """tests/helpers/rel_counters.c, compiled for this run."""
    from helpers.rel_common import build_counters

    try:
        return build_counters(tmp_path_factory.mktemp("counters"))
    except FileNotFoundError as err:
        pytest.skip(str(err))


def counter_stats(lib: ctypes.CDLL, handle: int) -> dict[str, int]:
    out = (ctypes.c_uint64 * 4)()
    lib.counters_stats(handle, ctypes.byref(out))
    return dict(zip(("increments", "wrong_page", "torn", "lost"), map(int, out), strict=True))


def run_bounces(
    lib: ctypes.CDLL, *, npages: int, threads: int, increments: int, bounces: int
) -> dict[str, Any]:
    """uffd-stress: per-page counters bumped by C threads while faults and WP toggles are served.

    Each bounce registers a fresh area (anon and shmem in turn, MISSING|WP) served
    from the previous area's final bytes (by the C pump or by Python in turn),
    runs ``threads`` x ``increments`` locked increments of random pages while a
    toggler write-protects and un-protects the whole area, then reads the area
    out. Returns the figures; asserts nothing is lost on the way.
    """
    handle = lib.counters_new(npages, PS)
    assert handle
    src = bytearray(npages * PS)
    view = (ctypes.c_char * len(src)).from_buffer(src)
    lib.counters_init_pages(handle, ctypes.addressof(view))
    del view
    toggles = 0
    handler = uffd.FaultHandler(deadline=10.0)
    try:
        with handler:
            for bounce in range(bounces):
                kind = ("anon", "shmem")[bounce % 2]
                native = bounce % 4 >= 2
                region = getattr(mem, kind)(npages * PS)
                ops = CounterOps(bytes(src), native=native)
                mapping = handler.register(region, Mode.MISSING | Mode.WP, ops)
                stop = threading.Event()
                flips = [0]

                def toggle(
                    region: mem.Region = region,
                    stop: threading.Event = stop,
                    flips: list[int] = flips,
                ) -> None:
                    while not stop.is_set():
                        handler.uffd.writeprotect(region.addr, region.length, True)
                        time.sleep(0.0005)
                        handler.uffd.writeprotect(region.addr, region.length, False)
                        flips[0] += 1
                        time.sleep(0.0005)

                toggler = threading.Thread(target=toggle, name="wp-toggler")
                workers = [
                    threading.Thread(
                        target=lib.counters_run,
                        args=(handle, region.addr, increments, bounce * 1000 + k + 1),
                        name=f"counter-{k}",
                    )
                    for k in range(threads)
                ]
                toggler.start()
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join(WAIT)
                    assert not worker.is_alive(), f"bounce {bounce}: {worker.name} stuck"
                stop.set()
                toggler.join(WAIT)
                assert not toggler.is_alive()
                toggles += flips[0]
                handler.uffd.writeprotect(region.addr, region.length, False)
                # Untouched pages fault here too; the next area starts from these bytes.
                src = bytearray(region.read(0, region.length))
                handler.unregister(mapping)
                region.close()
                assert counter_stats(lib, handle) | {"increments": 0} == {
                    "increments": 0,
                    "wrong_page": 0,
                    "torn": 0,
                    "lost": 0,
                }, f"bounce {bounce} ({kind}, {'native' if native else 'python'})"
            stats = handler.stats
    finally:
        final = (ctypes.c_char * len(src)).from_buffer(src)
        bad = lib.counters_check(handle, ctypes.addressof(final))
        del final
        figures = counter_stats(lib, handle)
        expected = [lib.counters_expected(handle, i) for i in range(npages)]
        lib.counters_free(handle)
    counts = [struct.unpack_from("=Q", src, i * PS + 8)[0] for i in range(npages)]
    assert bad == 0, figures
    assert counts == expected
    assert sum(counts) == threads * increments * bounces == figures["increments"]
    assert stats.expired == 0 and stats.total.errors == 0
    python_missing = stats.total.faults["missing"]
    # Python serves MISSING in half the bounces, one fault per page each.
    assert python_missing >= npages * ((bounces + 3) // 4 + bounces // 4)
    assert stats.native_faults > 0
    assert stats.total.faults["wp"] > 0, "the toggler never caught a writer"
    return {
        "increments": figures["increments"],
        "missing_python": python_missing,
        "missing_native": stats.native_faults,
        "wp_faults": stats.total.faults["wp"],
        "toggles": toggles,
    }


def test_counters_survive_bounces_and_wp_toggling(counters: ctypes.CDLL) -> None:
    """4 C threads x 3M locked increments x 14 bounces under MISSING and toggled WP: all exact."""
    figures = run_bounces(counters, npages=512, threads=4, increments=3_000_000, bounces=14)
    print(f"\ncounters: {figures}")
    assert figures["increments"] == 4 * 3_000_000 * 14


@pytest.mark.stress
def test_counters_survive_bounces_and_wp_toggling_long(counters: ctypes.CDLL) -> None:
    """4 C threads x 2M locked increments x 32 bounces over 1024 pages: every counter exact."""
    figures = run_bounces(counters, npages=1024, threads=4, increments=2_000_000, bounces=32)
    print(f"\ncounters: {figures}")
    assert figures["increments"] == 4 * 2_000_000 * 32


# -- fork storms -----------------------------------------------------------------------------


def adopt(header: dict[str, int], fd: int) -> uffd.Userfaultfd:
    """Wrap a userfaultfd received from a child script."""
    like = SimpleNamespace(
        features=Feature(header["features"]),
        available=Feature(header["available"]),
        ioctls=uffd.Ioctl(header["ioctls"]),
    )
    return uffd.Userfaultfd._adopt(fd, like)  # type: ignore[arg-type]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fork_storm(npages: int, threads: int, children: int, native: bool) -> dict[str, Any]:
    """A child process forks ``children`` while its threads fault; this process serves them all."""
    ours, theirs = socket.socketpair()
    ours.settimeout(WAIT)
    proc = spawn(
        "rel_forkstorm.py",
        str(theirs.fileno()),
        str(npages),
        str(threads),
        str(children),
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    fds_before = open_fds()
    handler = uffd.FaultHandler(deadline=10.0, fallback="zero")
    try:
        header, fds = recv_json(ours)
        ufd = adopt(header, fds[0])
        assert ufd.features & Feature.EVENT_FORK
        handler.start()
        handler.adopt(ufd)
        ops = BufferOps(pattern(npages, PS), native=True) if native else PatternOps()
        handler.register(
            (header["addr"], header["length"]),
            Mode.MISSING,
            ops,
            uffd=ufd,
            registered=True,
            kind="anon",
        )
        t0 = time.monotonic()
        send_json(ours, {"go": True})
        result = finish(proc, timeout=120)
        elapsed = time.monotonic() - t0
        # Exited children's fds are reaped by the running handler within ~1 s.
        wait_until(lambda: open_fds() - fds_before < 8, 5.0, "exited children's fds closed")
        stats = handler.stats
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        handler.stop()
    assert result["children"] == children
    assert result["ok"] == children and result["bad_status"] == 0, result
    assert result["threads_ok"]
    assert stats.expired == 0 and stats.total.errors == 0
    served = stats.total.faults["missing"] + stats.native_faults
    assert served >= npages // 2, "the children's faults never reached the handler"
    assert open_fds() <= fds_before
    return {"children": children, "served": served, "elapsed_s": elapsed, **result}


@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_fork_storm_children_all_served(native: bool) -> None:
    """A process forks 24 children while 4 threads fault; every page of every child is right."""
    figures = fork_storm(npages=128, threads=4, children=24, native=native)
    print(f"\nfork storm: {figures}")
    assert figures["ok"] == figures["children"] == 24


@pytest.mark.stress
@pytest.mark.parametrize("native", [False, True], ids=["python", "native"])
def test_fork_storm_children_all_served_long(native: bool) -> None:
    """300 children (more than the pump's 256 fd slots): served, and exited ones' fds reaped."""
    figures = fork_storm(npages=256, threads=4, children=300, native=native)
    print(f"\nfork storm: {figures}")
    assert figures["ok"] == figures["children"] == 300


def thread_states(pid: int) -> list[str]:
    """``tid wchan`` of every thread of ``pid`` (where each waits in the kernel)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        try:
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            wchan = "?"
        out.append(f"{tid} {wchan}")
    return out


@pytest.mark.parametrize(
    ("mode", "rounds"),
    [
        pytest.param("inflight", 2, id="inflight"),
        pytest.param("children", 2, id="children", marks=pytest.mark.stress),
        pytest.param("inflight", 10, id="inflight-long", marks=pytest.mark.stress),
    ],
)
def test_fork_in_handler_process(mode: str, rounds: int) -> None:
    """os.fork() in the handler's own process (in a child, bounded): pages right, no expiry."""
    proc = spawn("rel_forkself.py", mode, str(rounds))
    try:
        out, err = proc.communicate(timeout=min(15 * rounds, 60))
    except subprocess.TimeoutExpired:
        states = thread_states(proc.pid)
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail(f"fork() never returned (threads: {states})")
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().splitlines()[-1])
    assert result["bad_children"] == 0 and result["expired"] == 0, result


# -- mremap and MADV_DONTNEED racing with faults -----------------------------------------------


@pytest.fixture
def kread(counters: ctypes.CDLL) -> Iterator[Callable[[int, int], tuple[int, bytes]]]:
    """``kread(addr, n)``: read memory through the kernel (pwrite to a memfd): EFAULT, not SEGV."""
    fds: dict[int, int] = {}
    lock = threading.Lock()

    def read(addr: int, n: int) -> tuple[int, bytes]:
        ident = threading.get_ident()
        with lock:
            fd = fds.get(ident)
            if fd is None:
                fd = fds[ident] = os.memfd_create("kread", os.MFD_CLOEXEC)
        rc = counters.kernel_read(fd, addr, n)
        return rc, os.pread(fd, n, 0) if rc == n else b""

    yield read
    for fd in fds.values():
        os.close(fd)


def unregister_range(handler: uffd.FaultHandler, addr: int, length: int) -> None:
    """Unregister every piece of ``[addr, addr+length)`` still in the handler's table."""
    while True:
        inside = [m for m in handler.mappings if m.start < addr + length and addr < m.end]
        if not inside:
            return
        handler.unregister(inside[0])


def race(
    event: str, native: bool, duration: float, kread: Callable[[int, int], tuple[int, bytes]]
) -> dict[str, int]:
    """Readers fault on random pages while a mover mremaps the region or MADV_DONTNEEDs pages.

    The mover works in rounds: a fresh registered region (nothing populated, so
    faults are in flight all the time), eight moves or removals, a check of
    every page, then the region goes. Readers read through the kernel
    (``kread``), so an address moved or unmapped under them gives EFAULT, not
    SIGSEGV; a read that overlapped a move (odd generation) may see anything
    but a crash, every other read must see exactly its page (or, once the page
    was removed, zeros).
    """
    npages = 64
    features = Feature.EVENT_REMAP if event == "remap" else Feature.EVENT_REMOVE
    handler = uffd.FaultHandler(features=features, deadline=10.0, fallback="zero")
    state = [1, 0]  # generation (odd while the region moves or changes), base
    counts = {"reads": 0, "raced": 0, "zero": 0, "moves": 0, "rounds": 0}
    bad: list[str] = []
    stop = threading.Event()
    ops = BufferOps(pattern(npages, PS), native=native)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            reading[seed] = True  # before looking at the generation: see one_round
            gen, base = state
            if gen % 2:
                reading[seed] = False
                time.sleep(0.0002)  # between rounds or mid-move
                continue
            page = rng.randrange(npages)
            rc, data = kread(base + page * PS, PS)
            reading[seed] = False
            counts["reads"] += 1
            if gen % 2 or state[0] != gen:
                counts["raced"] += 1  # moved under the read: anything but a crash is fine
                continue
            if rc != PS:
                bad.append(f"read of page {page} at {base:#x} failed: {rc} with no move")
                continue
            who = page_identity(data)
            if who == -1 and event == "remove":
                counts["zero"] += 1
            elif who != page:
                bad.append(f"page {page} read as {who}")

    retired: list[mem.Region] = []
    reading: dict[int, bool] = {}  # reader seed -> between its generation check and its read

    def one_round(rng: random.Random) -> None:
        # A read still in flight from the last round may use an address that round's
        # region moved away from; if this round's region landed there before it is
        # registered, that read would map the kernel's zero page into it for good.
        # So no region is made until every reader has seen the odd generation.
        wait_until(lambda: not any(reading.values()), WAIT, "readers out of the last round")
        region = mem.anon(npages * PS)
        # The previous round's region is unmapped only now: a reader still blocked in
        # one of its faults retries on it (unregistered: a zero page there).
        while retired:
            retired.pop().close()
        removed: set[int] = set()
        try:
            handler.register(region, Mode.MISSING, ops)
            state[1] = region.addr
            state[0] += 1
            for _ in range(8):
                if event == "remap":
                    state[0] += 1
                    region.mremap()
                    state[1] = region.addr
                    state[0] += 1
                else:
                    page = rng.randrange(npages)
                    removed.add(page)
                    # A read of that page during the zap may see part pattern, part zeros.
                    state[0] += 1
                    region.madvise(mmap.MADV_DONTNEED, page * PS, PS)
                    state[0] += 1
                counts["moves"] += 1
                time.sleep(rng.random() * 0.002)
            final = region.read(0, region.length)
            for page in range(npages):
                who = page_identity(final[page * PS : (page + 1) * PS])
                # A removed page is unregistered: later accesses get the kernel's zero page.
                if who != (-1 if page in removed else page):
                    bad.append(f"round {counts['rounds']}: page {page} ended as {who}")
        finally:
            state[0] += 1
            unregister_range(handler, region.addr, region.length)
            retired.append(region)
        counts["rounds"] += 1

    def mover() -> None:
        rng = random.Random(7)
        try:
            while not stop.is_set():
                one_round(rng)
        except BaseException as err:
            bad.append(f"mover: {type(err).__name__}: {err}")
            raise

    try:
        handler.start()
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(3)]
        threads.append(threading.Thread(target=mover, name="mover"))
        for t in threads:
            t.start()
        time.sleep(duration)
        stop.set()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive(), f"{t.name} stuck"
        stats = handler.stats
    finally:
        stop.set()
        handler.stop()
        for region in retired:
            region.close()
    assert not bad, (
        sorted(bad, key=lambda b: not b.startswith("round"))[:6],
        counts,
        dict(stats.total.resolutions),
        stats.total.errors,
        stats.expired,
    )
    assert stats.total.errors == 0 and stats.expired == 0
    assert counts["rounds"] > 5 and counts["reads"] > 100
    served = stats.total.faults["missing"] + stats.native_faults
    assert served >= counts["rounds"] * npages // 2
    return counts | {"served": served}


RACES = [
    pytest.param("remap", False, id="remap-python"),
    pytest.param("remap", True, id="remap-native"),
    pytest.param("remove", False, id="remove-python"),
    pytest.param("remove", True, id="remove-native"),
]


@pytest.mark.parametrize(("event", "native"), RACES)
def test_remap_and_dontneed_race_faults(
    event: str, native: bool, kread: Callable[[int, int], tuple[int, bytes]]
) -> None:
    """mremap / MADV_DONTNEED under 3 faulting threads: no hang, no error, never a wrong page."""
    counts = race(event, native, 1.5, kread)
    print(f"\n{event} race: {counts}")
    assert counts["rounds"] > 5 and counts["moves"] >= 8 * counts["rounds"]


@pytest.mark.stress
@pytest.mark.parametrize(("event", "native"), RACES)
def test_remap_and_dontneed_race_faults_long(
    event: str, native: bool, kread: Callable[[int, int], tuple[int, bytes]]
) -> None:
    """The same races for 15 s each."""
    counts = race(event, native, 15.0, kread)
    print(f"\n{event} race: {counts}")
    assert counts["rounds"] > 50 and counts["moves"] >= 8 * counts["rounds"]


# -- a faulting process killed mid-fault ----------------------------------------------------------


class DeferChildren(uffd.UffdOps):
    """Defers the faults of forked children (recorded), serves this process's at once."""

    def __init__(self, own: uffd.Userfaultfd) -> None:
        self.own = own
        self.deferred: list[uffd.Fault] = []

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """Defer a child's fault; copy the pattern for ours."""
        if fault.mapping._uffd is not self.own:  # test-only peek: handlers never get the fd
            self.deferred.append(fault)
            return Resolution.defer()
        return Resolution.copy(page_pattern(fault.offset // PS, PS))


@pytest.mark.parametrize("resolve", ["resolved", "deadline"])
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_child_killed_mid_fault(resolve: str) -> None:
    """SIGKILL a child whose fault is deferred; resolving it (or the deadline) is not an error,
    and the handler keeps serving this process."""
    handler = uffd.FaultHandler(features=Feature.EVENT_FORK, deadline=1.0, fallback="zero")
    region = mem.anon(8 * PS)
    ops = DeferChildren(handler.uffd)
    pid = 0
    try:
        handler.start()
        handler.register(region, Mode.MISSING, ops)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child, killed while it waits
            try:
                region.read(0, PS)
            finally:
                os._exit(0)
        wait_until(lambda: ops.deferred, WAIT, "the child's fault")
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if resolve == "resolved":
            assert handler.resolve(ops.deferred[0], Resolution.copy(page_pattern(0, PS))) is False
        else:
            time.sleep(1.5)  # the watchdog's fallback meets the dead mm (ESRCH)
        # A later fault of this process is still served.
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(region.read(3 * PS, PS)))
        reader.start()
        reader.join(WAIT)
        assert got == [page_pattern(3, PS)]
        stats = handler.stats
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        handler.stop()  # raises if the dead child's fault was recorded as an error
        region.close()
    assert stats.total.resolutions["gone"] == 1
    assert stats.total.errors == 0 and stats.expired == 0


# -- the page server under many restoring clients -----------------------------------------------


@pytest.fixture(scope="module")
def served_snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 4 MiB snapshot of pattern pages with every 5th page zero (sent as ZERO ranges)."""
    from uffd.pagestore.snapshot import write_snapshot

    npages = 1024
    data = bytearray(pattern(npages, PS))
    for i in range(0, npages, 5):
        data[i * PS : (i + 1) * PS] = bytes(PS)
    path = tmp_path_factory.mktemp("served") / "mem.snap"
    write_snapshot(path, {"mem": bytes(data)})
    return path, bytes(data)


def restore_clients(
    path: Path, data: bytes, clients: int, timeout: float, repeat: int = 1
) -> dict[str, Any]:
    """``clients`` processes each lazily restore the whole snapshot through userfaultfd (faults
    fetched from the page server), and check every page."""
    from uffd.pagestore.server import ServerThread
    from uffd.pagestore.snapshot import Snapshot

    digest = hashlib.sha256(data).hexdigest()
    with Snapshot.open(path) as snap, ServerThread(snap, max_pending=64) as server:
        procs = [
            spawn("rel_restore_client.py", server.url, "mem", str(k), str(repeat))
            for k in range(clients)
        ]
        results = [finish(proc, timeout) for proc in procs]
        stats = server.stats
    assert [r["sha256"] for r in results] == [digest] * clients
    assert all(r["bad_pages"] == [] for r in results)
    assert all(r["errors"] == 0 for r in results)
    # Every page was faulted in (a page two readers fault at once may be fetched twice).
    assert all(r["faults"] >= len(data) // PS * repeat for r in results)
    assert stats.clients == clients and stats.errors == 0
    return {
        "clients": clients,
        "pages_each": len(data) // PS * repeat,
        "faults": sum(r["faults"] for r in results),
        "bytes_sent": stats.bytes,
        "zero_bytes": stats.zero_bytes,
        "requests": stats.requests,
    }


def test_page_server_sixteen_restoring_processes(served_snapshot: tuple[Path, bytes]) -> None:
    """16 processes are lazily restored from one page server at once, 4 faulting threads each;
    every page of every process right."""
    figures = restore_clients(*served_snapshot, clients=16, timeout=120)
    print(f"\npage server: {figures}")
    assert figures["clients"] == 16 and figures["faults"] >= 16 * figures["pages_each"]


@pytest.mark.stress
def test_page_server_many_restoring_processes_long(served_snapshot: tuple[Path, bytes]) -> None:
    """48 client processes, each restoring the snapshot three times."""
    path, data = served_snapshot
    figures = restore_clients(path, data, clients=48, timeout=600, repeat=3)
    print(f"\npage server: {figures}")
    assert figures["clients"] == 48 and figures["faults"] >= 48 * figures["pages_each"]
