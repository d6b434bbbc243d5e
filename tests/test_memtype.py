"""The memory-type layer on the live kernel: shmem memfds standing in for guest_memfd.

docs/dispatch.md: the shipped kernel's five callbacks decide what a memory
type may be registered for, ``__do_userfault`` classifies faults with
``get_folio_noalloc``, and a guest_memfd handler fills the memory's file
with pwrite and resolves with UFFDIO_CONTINUE, never mapping the memory.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import resource
import signal
import socket
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from _dispatch_helpers import ChildError, fork_child, page_pattern, stop_raises, uffd_vmflags
from conftest import CAPS, PAGE, WAIT
from test_ops import _kernel_answer, _make

import uffd
from uffd import Feature, FileMemory, Mode, Resolution, ShmemOps, UffdOps, mem
from uffd._mapping import Fault, Mapping
from uffd._memtype import MEMORY_TYPES, AnonMemory, classify, mfill_copy
from uffd.modules import GuestMemfdOps

BOTH = Mode.MISSING | Mode.MINOR
# The seven registration modes: every non-empty combination of MISSING, WP, MINOR.
SEVEN = [Mode(m) for m in range(1, 8)]


def fill(offset: int, size: int) -> bytes:
    """The page a snapshot holds at ``offset``: distinct per page, never zeros."""
    return page_pattern(offset // size, size, salt=0x6D)


def fault_at(mapping: Mapping, index: int) -> Fault:
    """A MISSING fault on page ``index`` of ``mapping``, as the dispatch layer builds one."""
    return Fault(mapping.start + index * mapping.page_size, mapping, "missing", False, None)


# -- registration: derived from the callbacks ---------------------------------


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        pytest.param(k, m, id=f"{k}-mode{int(m)}")
        for k, m in itertools.product(("anon", "shmem", "hugetlb"), SEVEN)
    ],
)
def test_memory_types_decide_as_the_kernel(
    kind: str,
    mode: Mode,
    uffd_factory: Callable[..., uffd.Userfaultfd],
    reserve_hugepages: Callable[[int], int],
) -> None:
    """Each built-in kind's memory type refuses exactly the modes 6.18's UFFDIO_REGISTER refuses."""
    ufd = uffd_factory(CAPS.available)
    with _make(kind, False, reserve_hugepages) as region:
        real = _kernel_answer(ufd, region, mode)
    reason = MEMORY_TYPES[kind].refusal(None, mode)
    assert (reason is None) == (real is not None), f"{kind} {mode!r}: type says {reason!r}"


def test_built_in_types_provide_the_kernels_callbacks() -> None:
    """anon provides alloc_folio only, shmem all four, hugetlb none; modes follow from them."""
    assert MEMORY_TYPES["anon"].provides == {"alloc_folio"}
    assert MEMORY_TYPES["anon"].modes == Mode.MISSING | Mode.WP
    assert MEMORY_TYPES["shmem"].provides == {
        "get_folio_noalloc",
        "alloc_folio",
        "filemap_add",
        "filemap_remove",
    }
    assert MEMORY_TYPES["shmem"].modes == Mode.MISSING | Mode.WP | Mode.MINOR
    assert MEMORY_TYPES["hugetlb"].provides == frozenset()
    assert MEMORY_TYPES["hugetlb"].modes == Mode.MISSING | Mode.WP | Mode.MINOR


class NoLookupMemory(uffd.MemoryType):
    """A file type that can allocate pages but cannot look one up: no get_folio_noalloc."""

    name = "nolookup"
    anonymous = True  # exempt from the PTE-level file rule, so only MINOR is refused

    def alloc_folio(self, mapping: Mapping, addr: int) -> uffd.Folio:
        return AnonMemory().alloc_folio(mapping, addr)


class NoLookupOps(ShmemOps):
    """Shmem policy (all handlers) over a memory type without get_folio_noalloc."""

    def memory_type(self, mapping: Mapping | None) -> uffd.MemoryType:
        return NoLookupMemory()


def test_type_without_get_folio_noalloc_refuses_minor() -> None:
    """A type lacking get_folio_noalloc refuses MINOR before the kernel is asked; MISSING passes."""
    assert NoLookupMemory.modes == Mode.MISSING | Mode.WP
    with uffd.FaultHandler() as handler, mem.shmem(PAGE) as region:
        for mode in (Mode.MINOR, Mode.MISSING | Mode.MINOR):
            with pytest.raises(uffd.UnsupportedError, match="provides no get_folio_noalloc"):
                handler.register(region, mode, NoLookupOps())
            assert uffd_vmflags(region.addr) == set(), "the kernel was asked anyway"
        mapping = handler.register(region, Mode.MISSING, NoLookupOps())
        assert uffd_vmflags(region.addr) == {"um"}
        handler.unregister(mapping)


def test_file_type_without_get_folio_noalloc_refuses_every_mode() -> None:
    """File-backed memory mapped at PTE level needs get_folio_noalloc for MISSING too (v2 12/15)."""

    class NoLookupFile(uffd.MemoryType):
        name = "nolookupfile"

    for mode in SEVEN:
        reason = NoLookupFile().refusal(None, mode)
        assert reason is not None and "needs for every mode" in reason, mode


def test_filemap_add_without_filemap_remove_is_a_type_error() -> None:
    """A type that can add a page to its cache but not take it out is refused at class creation."""
    with pytest.raises(TypeError, match="filemap_add but not filemap_remove"):
        type("AddOnly", (uffd.MemoryType,), {"filemap_add": lambda self, f, m, a: None})


def test_guest_memfd_ops_needs_missing_and_minor() -> None:
    """GuestMemfdOps refuses MISSING alone and MINOR alone, saying why both are needed."""
    with uffd.FaultHandler() as handler, mem.shmem(PAGE) as region:
        ops = GuestMemfdOps(region.memfd, fill)  # type: ignore[arg-type]
        for mode in (Mode.MISSING, Mode.MINOR, Mode.MINOR | Mode.WP):
            with pytest.raises(uffd.UnsupportedError, match=r"needs Mode\.MISSING"):
                handler.register(region, mode, ops)
        assert handler.register(region, BOTH, ops).mode == BOTH


# -- classification: __do_userfault -------------------------------------------


def test_classification_equals_the_kernels() -> None:
    """classify() predicts, page by page, the fault the kernel raises: hole, written, fallocated."""
    seen: list[tuple[int, str, str | None]] = []

    class Recorder(UffdOps):
        kind = "shmem"

        def __init__(self, memory: FileMemory) -> None:
            self.memory = memory

        def _record(self, fault: Fault) -> Resolution:
            pgoff = fault.offset // PAGE
            seen.append((pgoff, fault.kind, classify(self.memory, fault.mapping.mode, pgoff)))
            if fault.kind == "missing":
                os.pwrite(self.memory.fd, fill(fault.offset, PAGE), fault.offset)  # type: ignore[arg-type]
            return Resolution.continue_()

        handle_missing = handle_continue = _record

    with mem.shmem(4 * PAGE) as region, uffd.FaultHandler() as handler:
        memfd = region.memfd
        assert memfd is not None
        os.pwrite(memfd, fill(PAGE, PAGE), PAGE)  # page 1: written
        os.posix_fallocate(memfd, 2 * PAGE, PAGE)  # page 2: allocated, never written
        handler.register(region, BOTH, Recorder(FileMemory(memfd)))
        for i in range(4):
            region.read(i * PAGE, 8)
    assert sorted(seen) == [
        (0, "missing", "missing"),
        (1, "minor", "minor"),
        (2, "minor", "minor"),
        (3, "missing", "missing"),
    ]


def test_seek_data_calls_a_fallocated_page_a_hole() -> None:
    """Why lookups use cachestat: SEEK_DATA misses a fallocated page the fault path finds."""
    with mem.shmem(2 * PAGE) as region:
        memfd = region.memfd
        assert memfd is not None
        os.posix_fallocate(memfd, 0, PAGE)
        with pytest.raises(OSError) as info:
            os.lseek(memfd, 0, os.SEEK_DATA)
        assert info.value.errno == errno.ENXIO
        assert FileMemory(memfd).get_folio_noalloc(0) is not None
        assert FileMemory(memfd).get_folio_noalloc(1) is None


def test_missing_fault_on_a_page_filled_since_is_continued() -> None:
    """A MISSING fault whose page is in the file by now is continued, the page not written again."""
    with mem.shmem(2 * PAGE) as region, uffd.FaultHandler() as handler:
        memfd = region.memfd
        assert memfd is not None
        ops = GuestMemfdOps(memfd, fill)
        mapping = handler.register(region, BOTH, ops)
        mine = b"\x11" * PAGE
        os.pwrite(memfd, mine, PAGE)  # e.g. a prefetch, after the fault was raised
        assert ops.handle_missing(fault_at(mapping, 1)).kind == Resolution.CONTINUE
        assert (ops.filled, ops.continued) == (0, 1)
        assert os.pread(memfd, PAGE, PAGE) == mine
        assert ops.handle_missing(fault_at(mapping, 0)).kind == Resolution.CONTINUE
        assert (ops.filled, ops.continued) == (1, 1)
        assert os.pread(memfd, PAGE, 0) == fill(0, PAGE)
        assert region.read(0, 2 * PAGE) == fill(0, PAGE) + mine


# -- serving without mapping ---------------------------------------------------


def _vm(sock: socket.socket, pages: int) -> None:  # pragma: no cover - the child
    """The forked "VM": its memory is a shmem memfd; hands (uffd, memfd) over, then reads it."""
    code = 1
    try:
        signal.alarm(int(WAIT * 2) + 1)
        region = mem.shmem(pages * PAGE)
        ufd = uffd.Userfaultfd(Feature.MISSING_SHMEM | Feature.MINOR_SHMEM)
        ufd.register(region.addr, region.length, BOTH)
        head = struct.pack("=QQ", region.addr, region.length)
        socket.send_fds(sock, [head], [ufd.fileno(), region.memfd])  # type: ignore[list-item]
        if sock.recv(1) == b"g":
            sock.sendall(hashlib.sha256(region.read(0, region.length)).digest())
            code = 0
    finally:
        os._exit(code)


def _reap(pid: int) -> int:
    """The child's exit status, waited for at most WAIT seconds (then it is killed)."""
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise ChildError(f"child {pid} did not exit; killed")


def test_handler_never_maps_the_memfd() -> None:
    """A forked process's memfd memory is served by pwrite + CONTINUE; the handler never maps it."""
    pages = 16
    ours, theirs = socket.socketpair()
    ours.settimeout(WAIT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a multi-threaded fork, on purpose
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ours.close()
        _vm(theirs, pages)
    theirs.close()
    try:
        head, fds, _, _ = socket.recv_fds(ours, 64, 2)
        addr, length = struct.unpack("=QQ", head)
        ufd, memfd = uffd.Userfaultfd.from_fd(fds[0]), fds[1]
        ops = GuestMemfdOps(memfd, fill)
        with uffd.FaultHandler(uffd=ufd) as handler:
            handler.register((addr, length), BOTH, ops, registered=True, kind="shmem")
            ours.sendall(b"g")
            with ours.makefile("rb") as replies:
                digest = replies.read(32)  # each recv bounded by the socket timeout
            maps = Path("/proc/self/maps").read_text().splitlines()
        inode = str(os.fstat(memfd).st_ino)
        mapped = [line for line in maps if len(line.split()) > 4 and line.split()[4] == inode]
        assert mapped == [], f"the handler process maps the memfd: {mapped}"
        expect = b"".join(fill(i * PAGE, PAGE) for i in range(pages))
        assert digest == hashlib.sha256(expect).digest(), "the child read other bytes"
        assert os.pread(memfd, length, 0) == expect
        assert (ops.filled, ops.continued) == (pages, 0)
        os.close(memfd)
    finally:
        ours.close()
        assert _reap(pid) == 0


# -- failures ------------------------------------------------------------------


def test_pwrite_failure_is_a_clear_error_and_takes_the_fallback() -> None:
    """pwrite refused (EBADF: a read-only fd): the error says so, the fault gets the fallback."""
    with mem.shmem(2 * PAGE) as region:
        readonly = os.open(f"/proc/self/fd/{region.memfd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            handler = uffd.FaultHandler(fallback="sigbus").start()
            handler.register(region, BOTH, GuestMemfdOps(readonly, fill))
            with pytest.raises(uffd.PageAccessError):
                region.read(0, 8)  # poisoned by the fallback: SIGBUS, caught
            err = stop_raises(handler, uffd.UffdError, "filemap_add of page 0", "fallback")
            assert err.errno == errno.EBADF
            assert FileMemory(readonly).get_folio_noalloc(0) is None, "the page stayed in the file"
        finally:
            os.close(readonly)


def test_short_pwrite_is_punched_out_again() -> None:
    """A pwrite cut short (RLIMIT_FSIZE mid-page) leaves no half page: filemap_remove punches it."""

    def child() -> bytes:  # runs in a forked child: the limit must not reach pytest
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        region = mem.shmem(2 * PAGE)
        memfd = region.memfd
        assert memfd is not None
        resource.setrlimit(resource.RLIMIT_FSIZE, (PAGE + PAGE // 2, resource.RLIM_INFINITY))
        memory, mapping = FileMemory(memfd), fake_mapping(region)
        # Control: a plain pwrite past the limit leaves half a page in the file.
        assert os.pwrite(memfd, b"\x22" * PAGE, PAGE) == PAGE // 2
        half = memory.get_folio_noalloc(1) is not None
        memory.filemap_remove(uffd.Folio(1), mapping)
        try:
            mfill_copy(memory, mapping, region.addr + PAGE, fill(PAGE, PAGE))
        except uffd.UffdError as err:
            return struct.pack("=i??", err.errno, half, memory.get_folio_noalloc(1) is None)
        return b"no error"

    out = fork_child(child)
    assert len(out) == 6, out
    err, half_written, punched = struct.unpack("=i??", out)
    assert half_written, "the control pwrite did not leave a half page behind"
    assert err == errno.ENOSPC
    assert punched, "the half page stayed in the file"


def fake_mapping(region: mem.Region) -> Mapping:
    """A Mapping object for ``region`` (never registered): what the callbacks get as ``vma``."""
    return Mapping(
        region.addr,
        region.addr + region.length,
        "shmem",
        BOTH,
        ShmemOps(),
        PAGE,
        None,  # type: ignore[arg-type]
    )


def test_alloc_folio_past_the_end_of_the_file() -> None:
    """alloc_folio gives no page past EOF (kvm_gmem_folio_alloc); mfill_copy says ENOMEM."""
    with mem.shmem(2 * PAGE) as region:
        memfd = region.memfd
        assert memfd is not None
        os.ftruncate(memfd, PAGE)
        memory = FileMemory(memfd)
        mapping = fake_mapping(region)
        assert memory.alloc_folio(mapping, region.addr) is not None
        assert memory.alloc_folio(mapping, region.addr + PAGE) is None
        with pytest.raises(uffd.UffdError, match="past the end") as info:
            mfill_copy(memory, mapping, region.addr + PAGE, fill(0, PAGE))
        assert info.value.errno == errno.ENOMEM


def test_unbound_file_memory_says_how_to_bind_it() -> None:
    """The shmem kind's type has no file: a page lookup on it is a clear ValueError."""
    with pytest.raises(ValueError, match=r"FileMemory\(memfd\)"):
        MEMORY_TYPES["shmem"].get_folio_noalloc(0)


def test_mfill_copy_into_anonymous_memory_copies() -> None:
    """For a type without a cache (anon) mfill_copy hands the filled page to the core as a copy."""

    class Filler(UffdOps):
        kind = "anon"

        def handle_missing(self, fault: Fault) -> Resolution:
            data = fill(fault.offset, PAGE)
            return mfill_copy(MEMORY_TYPES["anon"], fault.mapping, fault.address, data)

    with mem.anon(3 * PAGE) as region, uffd.FaultHandler() as handler:
        handler.register(region, Mode.MISSING, Filler())
        assert region.read(0, 3 * PAGE) == b"".join(fill(i * PAGE, PAGE) for i in range(3))


def test_cachestat_is_exact_per_page() -> None:
    """get_folio_noalloc sees exactly the written pages, and a punched one as gone."""
    with mem.shmem(4 * PAGE) as region:
        memfd = region.memfd
        assert memfd is not None
        memory = FileMemory(memfd)
        os.pwrite(memfd, b"x", 2 * PAGE + 5)
        assert [memory.get_folio_noalloc(i) is not None for i in range(4)] == [
            False,
            False,
            True,
            False,
        ]
        memory.filemap_remove(uffd.Folio(2), fake_mapping(region))
        assert memory.get_folio_noalloc(2) is None
