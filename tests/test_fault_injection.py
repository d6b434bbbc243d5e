"""Faults injected into the fault path, the page server, snapshot files and the disk.

Handlers that raise or stall, a page server killed mid-restore and restarted,
snapshots truncated or bit-flipped on disk, a disk that fills while a
snapshot is written, the userfaultfd closed under a busy handler. The
property checked every time: nothing hangs (every wait is bounded), the
error is clear and counted, and no wrong data is ever installed or returned.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.rel_common import ROOT, page_identity, page_pattern, pattern, wait_until

import uffd
from uffd import Mode, Resolution, mem

PS = mem.PAGE_SIZE
WAIT = 30.0


# -- handlers that raise or stall ---------------------------------------------------------------


class FlakyOps(uffd.UffdOps):
    """Raise for a random 10% of faults, sleep past the deadline for 5%, else copy the pattern."""

    def __init__(self, seed: int, stall: float) -> None:
        self.rng = random.Random(seed)
        self.stall = stall
        self.lock = threading.Lock()
        self.raised: set[int] = set()
        self.stalled: set[int] = set()
        self.served = 0

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """The pattern page, unless this fault drew an injected failure."""
        page = fault.offset // PS
        roll = self.rng.random()
        if roll < 0.10:
            self.raised.add(page)
            raise RuntimeError(f"injected failure for page {page}")
        if roll < 0.15:
            self.stalled.add(page)
            time.sleep(self.stall)  # past the deadline: the watchdog answers first
        self.served += 1
        return Resolution.copy(page_pattern(page, PS))


def flaky_run(npages: int, threads: int, seed: int) -> dict[str, int]:
    """``threads`` threads read all pages of one region each while FlakyOps fails some faults."""
    deadline = 0.2
    handler = uffd.FaultHandler(deadline=deadline, fallback="zero")
    regions = [mem.anon(npages * PS) for _ in range(threads)]
    ops = [FlakyOps(seed + k, stall=deadline * 2.5) for k in range(threads)]
    results: dict[int, bytes] = {}

    def reader(k: int) -> None:
        order = list(range(npages))
        random.Random(seed * 7 + k).shuffle(order)
        data = bytearray(npages * PS)
        for i in order:
            data[i * PS : (i + 1) * PS] = regions[k].read(i * PS, PS)
        results[k] = bytes(data)

    error: BaseException | None = None
    try:
        handler.start()
        for region, o in zip(regions, ops, strict=True):
            handler.register(region, Mode.MISSING, o)
        workers = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        for w in workers:
            w.join(WAIT)
            assert not w.is_alive(), "a faulting thread was never released"
        elapsed = time.monotonic() - t0
    finally:
        try:
            handler.stop()
        except Exception as err:  # the injected failures, re-raised as documented
            error = err
        for region in regions:
            region.close()
    stats = handler.stats  # after stop(): every expiry notice has been counted
    zero_pages = 0
    for k in range(threads):
        data = results[k]
        for i in range(npages):
            who = page_identity(data[i * PS : (i + 1) * PS])
            # Never another page's data: the right page, or the fallback's zeros.
            assert who in (i, -1), f"thread {k} page {i} holds {who}"
            if i in ops[k].raised or i in ops[k].stalled:
                assert who == -1, f"thread {k} page {i} failed yet holds data"
            zero_pages += who == -1
    raised = sum(len(o.raised) for o in ops)
    stalled = sum(len(o.stalled) for o in ops)
    assert raised and stalled
    assert error is not None, "stop() must re-raise the recorded handler errors"
    recorded = 1 + int(("".join(getattr(error, "__notes__", [])) or "(0 ").split("(")[1].split()[0])
    assert recorded >= raised + stalled
    assert stats.total.errors >= zero_pages >= raised + stalled
    assert stats.expired >= stalled
    return {
        "faults": npages * threads,
        "raised": raised,
        "stalled": stalled,
        "zero_pages": zero_pages,
        "errors_counted": stats.total.errors,
        "expired": stats.expired,
        "elapsed_s": round(elapsed, 2),
    }


def test_handler_exceptions_and_stalls_release_every_thread() -> None:
    """10% of faults raise, 5% stall past the deadline: all threads released, errors counted,
    every page right or zero."""
    figures = flaky_run(npages=64, threads=4, seed=1)
    print(f"\nflaky handler: {figures}")
    assert figures["faults"] == 64 * 4 and figures["zero_pages"] <= figures["errors_counted"]


@pytest.mark.stress
def test_handler_exceptions_and_stalls_release_every_thread_long() -> None:
    """The same over 6x the faults and twice the threads."""
    figures = flaky_run(npages=200, threads=8, seed=2)
    print(f"\nflaky handler: {figures}")
    assert figures["faults"] == 200 * 8 and figures["zero_pages"] <= figures["errors_counted"]


# -- the page server killed and restarted mid-restore --------------------------------------------


@pytest.fixture(scope="module")
def snapshot_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 2 MiB snapshot of pattern pages."""
    from uffd.pagestore.snapshot import write_snapshot

    data = pattern(512, PS)
    path = tmp_path_factory.mktemp("inject") / "mem.snap"
    write_snapshot(path, {"mem": data})
    return path, data


class ServeProcess:
    """``python -m uffd serve SNAPSHOT --port PORT`` as a real process."""

    def __init__(self, path: Path, port: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uffd", "serve", str(path), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(ROOT),
        )
        assert self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + WAIT
        while b"listening on" not in line and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        assert b"listening on" in line, f"server did not start: {self.proc.stderr.read()!r}"
        self.url = line.decode().split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)


def test_page_server_killed_mid_restore_then_restarted(snapshot_file: tuple[Path, bytes]) -> None:
    """SIGKILL the server mid-restore: the client fails cleanly and fast; a new client
    against the restarted server restores every page."""
    from uffd.pagestore.client import PeerGoneError, ThreadedPageClient

    path, data = snapshot_file
    npages = len(data) // PS
    server = ServeProcess(path)
    try:
        client = ThreadedPageClient(server.url, request_timeout=10.0)
        try:
            for i in range(64):
                assert client.read("mem", i * PS, PS) == data[i * PS : (i + 1) * PS]
            pending = [client.fetch("mem", i * PS, PS) for i in range(64, npages)]
            server.kill()
            t0 = time.monotonic()
            outcomes = {"ok": 0, "gone": 0}
            for i, future in zip(range(64, npages), pending, strict=True):
                try:
                    assert future.result(WAIT) == data[i * PS : (i + 1) * PS]
                    outcomes["ok"] += 1
                except PeerGoneError as err:
                    assert "127.0.0.1" in str(err)
                    outcomes["gone"] += 1
            with pytest.raises(PeerGoneError):
                client.read("mem", 0, PS)
            assert time.monotonic() - t0 < 10.0, "pending reads did not fail fast"
            assert outcomes["gone"] > 0 or outcomes["ok"] == npages - 64
        finally:
            client.close()
        restarted = ServeProcess(path, port=server.port)
        try:
            assert restarted.url == server.url
            with ThreadedPageClient(restarted.url) as again:
                futures = [again.fetch("mem", i * PS, PS) for i in range(npages)]
                got = b"".join(f.result(WAIT) for f in futures)
            assert got == data
        finally:
            restarted.close()
    finally:
        server.close()
    print(f"\nserver killed mid-restore: {outcomes}, restarted server served {npages} pages")


class RemoteOps(uffd.UffdOps):
    """MISSING faults deferred and fetched from a page server, as the daemon does."""

    def __init__(self, client: object, handler: uffd.FaultHandler) -> None:
        self.client = client
        self.handler = handler

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """Fetch the page; answer when the reply (or the error) arrives."""
        future = self.client.fetch("mem", fault.offset, PS)  # type: ignore[attr-defined]

        def done(f: object) -> None:
            err = f.exception()  # type: ignore[attr-defined]
            r = Resolution.refuse(str(err)) if err else Resolution.copy(f.result())  # type: ignore[attr-defined]
            self.handler.resolve(fault, r)

        future.add_done_callback(done)
        return Resolution.defer()


def test_faults_fetched_from_a_killed_server_take_the_fallback(
    snapshot_file: tuple[Path, bytes],
) -> None:
    """Faults deferred to a page server that is killed mid-restore: every thread is released
    within the deadline, pages are right or zero, and stop() reports the failures."""
    from uffd.pagestore.client import ThreadedPageClient

    path, data = snapshot_file
    npages = len(data) // PS
    server = ServeProcess(path)
    handler = uffd.FaultHandler(deadline=2.0, fallback="zero")
    region = mem.anon(npages * PS)
    client = ThreadedPageClient(server.url, request_timeout=5.0)
    got: dict[int, bytes] = {}
    try:
        handler.start()
        handler.register(region, Mode.MISSING, RemoteOps(client, handler))

        def reader(k: int) -> None:
            for i in range(k, npages, 4):
                got[i] = region.read(i * PS, PS)

        workers = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for w in workers:
            w.start()
        wait_until(lambda: len(got) > npages // 4, WAIT, "a quarter of the restore")
        server.kill()
        t0 = time.monotonic()
        for w in workers:
            w.join(WAIT)
            assert not w.is_alive(), "a thread stayed blocked after the server died"
        released = time.monotonic() - t0
    finally:
        client.close()
        server.close()
        try:
            handler.stop()
            stopped_with = None
        except Exception as err:
            stopped_with = err
        region.close()
    right = sum(got[i] == data[i * PS : (i + 1) * PS] for i in range(npages))
    zero = sum(got[i] == bytes(PS) for i in range(npages))
    assert right + zero == npages, "a page holds neither its data nor the fallback zeros"
    assert zero > 0 and stopped_with is not None
    assert released < 10.0
    print(
        f"\nkilled server under faults: {right} pages restored, {zero} zero-filled, "
        f"threads released in {released:.2f} s"
    )


# -- snapshots damaged on disk ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Three regions with zero pages and small chunks (so damage lands in many places)."""
    from uffd.pagestore.snapshot import write_snapshot

    rng = random.Random(3)
    regions = {}
    for name, n in (("a", 9), ("bb", 5), ("zeros", 3)):
        buf = bytearray(n * PS)
        for i in range(n):
            if name != "zeros" and rng.random() > 0.25:
                buf[i * PS : (i + 1) * PS] = rng.randbytes(PS)
        regions[name] = bytes(buf)
    path = tmp_path_factory.mktemp("damage") / "small.snap"
    write_snapshot(path, regions, chunk_pages=2)
    return path, regions


def read_everything(path: Path) -> dict[str, bytes]:
    from uffd.pagestore.snapshot import Snapshot

    with Snapshot.open(path) as snap:
        snap.verify()
        return {r.name: snap.read(r.name, 0, r.length) for r in snap.regions}


def check_damage(path: Path, size: int, regions: dict[str, bytes]) -> str:
    """Reading a damaged copy raises SnapshotError naming the file and an offset inside it."""
    from uffd.pagestore.snapshot import SnapshotError

    try:
        got = read_everything(path)
    except SnapshotError as err:
        assert err.path == str(path) and str(path) in str(err)
        assert err.offset is not None and 0 <= err.offset <= size, err
        assert f"offset {err.offset}" in str(err)
        return "error"
    # Undetected damage must at least not change the contents.
    assert got == regions, f"{path}: damaged contents returned without an error"
    return "harmless"


def flip_bits(
    small_snapshot: tuple[Path, dict[str, bytes]], tmp_path: Path, count: int | None
) -> dict[str, int]:
    """Flip one bit at ``count`` random offsets (every offset when None), one fresh copy each."""
    original, regions = small_snapshot
    blob = original.read_bytes()
    offsets = (
        list(range(len(blob)))
        if count is None
        else random.Random(4).sample(range(len(blob)), count)
    )
    outcomes = {"error": 0, "harmless": 0}
    copy = tmp_path / "flipped.snap"
    for n, offset in enumerate(offsets):
        damaged = bytearray(blob)
        damaged[offset] ^= 1 << (n % 8)
        copy.write_bytes(damaged)
        outcomes[check_damage(copy, len(blob), regions)] += 1
    assert outcomes["harmless"] == 0, "every byte of a snapshot is covered by a checksum"
    return outcomes | {"file_bytes": len(blob)}


def test_bit_flips_raise_snapshot_error_with_file_and_offset(
    small_snapshot: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """300 single-bit flips anywhere in a snapshot: each a SnapshotError naming file and offset."""
    outcomes = flip_bits(small_snapshot, tmp_path, 300)
    print(f"\nbit flips: {outcomes}")
    assert outcomes["error"] == 300


@pytest.mark.stress
def test_every_bit_flip_position_is_detected(
    small_snapshot: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """A flip at every byte offset of the snapshot is detected."""
    outcomes = flip_bits(small_snapshot, tmp_path, None)
    print(f"\nbit flips: {outcomes}")
    assert outcomes["error"] == outcomes["file_bytes"]


def test_truncations_raise_snapshot_error_with_file_and_offset(
    small_snapshot: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """A snapshot cut at 200 random lengths: each is a SnapshotError naming file and offset."""
    original, regions = small_snapshot
    blob = original.read_bytes()
    copy = tmp_path / "cut.snap"
    for length in random.Random(5).sample(range(1, len(blob)), 200):
        copy.write_bytes(blob[:length])
        assert check_damage(copy, length, regions) == "error"


def test_snapshot_truncated_while_open_raises(
    small_snapshot: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    """A snapshot truncated under an open reader: reads raise SnapshotError, never short data."""
    from uffd.pagestore.snapshot import Snapshot, SnapshotError

    original, _ = small_snapshot
    copy = tmp_path / "shrinking.snap"
    shutil.copyfile(original, copy)
    with Snapshot.open(copy) as snap:
        os.truncate(copy, 64 + PS)
        with pytest.raises(SnapshotError) as info:
            for r in snap.regions:
                snap.read(r.name, 0, r.length)
        assert info.value.path == str(copy) and info.value.offset is not None


# -- the disk fills while a snapshot is written ----------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (root only), unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("no mount(8) on PATH")
    path = Path(tempfile.mkdtemp(prefix="uffd-full-"))
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True, timeout=30
    )
    if done.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
        path.rmdir()


def test_disk_full_while_writing_a_snapshot(small_disk: Path) -> None:
    """ENOSPC mid-write: OSError(ENOSPC), nothing under the final name, the previous file intact."""
    from uffd.pagestore.snapshot import Snapshot, write_snapshot

    old = {"mem": pattern(8, PS)}
    target = small_disk / "vm.snap"
    write_snapshot(target, old)
    before = target.read_bytes()
    big = {"mem": random.Random(6).randbytes(2 << 20)}  # twice the disk, nothing compressible
    with pytest.raises(OSError) as info:
        write_snapshot(target, big)
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(small_disk)) == ["vm.snap"], "a temporary file was left behind"
    assert target.read_bytes() == before
    with Snapshot.open(target) as snap:
        assert snap.read("mem", 0, 8 * PS) == old["mem"]
    fresh = small_disk / "new.snap"
    with pytest.raises(OSError) as info:
        write_snapshot(fresh, big)
    assert info.value.errno == errno.ENOSPC
    assert not fresh.exists() and sorted(os.listdir(small_disk)) == ["vm.snap"]


# -- the userfaultfd closed under a busy handler ---------------------------------------------------


class SlowPattern(uffd.UffdOps):
    """The pattern page, after a millisecond (so faults queue up)."""

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """Sleep, then copy."""
        time.sleep(0.001)
        return Resolution.copy(page_pattern(fault.offset // PS, PS))


@pytest.mark.parametrize("how", ["os.close", "Userfaultfd.close"])
def test_uffd_closed_under_busy_handler(how: str) -> None:
    """Closing the fd while 4 threads fault: all released at once, pages right or zero,
    stop() raises a clear error."""
    handler = uffd.FaultHandler(deadline=5.0, fallback="zero")
    regions = [mem.anon(256 * PS) for _ in range(4)]
    out: dict[int, bytes] = {}
    try:
        handler.start()
        for region in regions:
            handler.register(region, Mode.MISSING, SlowPattern())
        workers = [
            threading.Thread(target=lambda k=k: out.__setitem__(k, regions[k].read(0, 256 * PS)))
            for k in range(4)
        ]
        for w in workers:
            w.start()
        wait_until(lambda: handler.stats.total.faults["missing"] >= 8, WAIT, "some faults served")
        t0 = time.monotonic()
        if how == "os.close":
            os.close(handler.uffd.fileno())
        else:
            handler.uffd.close()
        for w in workers:
            w.join(WAIT)
            assert not w.is_alive(), "a faulting thread stayed blocked after the close"
        released = time.monotonic() - t0
        with pytest.raises(uffd.UffdError, match="closed under the running handler"):
            handler.stop()
    finally:
        handler.stop()
        for region in regions:
            region.close()
    assert released < 2.0
    for data in out.values():
        for i in range(256):
            assert page_identity(data[i * PS : (i + 1) * PS]) in (i, -1)
