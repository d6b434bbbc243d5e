"""Opening a userfaultfd: open paths, flags, the handshake, reads, closing."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import time

import pytest
from conftest import CAPS, PAGE, WAIT, read_one, requires_syscall, run_in_thread

import uffd
from uffd import Feature, Ioctl, Mode

BASE_IOCTLS = Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API


# -- open paths ------------------------------------------------------------------


@requires_syscall
def test_open_via_syscall():
    """``via="syscall"`` opens a working, initialised fd."""
    with uffd.Userfaultfd(via="syscall") as ufd:
        assert ufd.fileno() >= 0
        assert ufd.ioctls == BASE_IOCTLS
        assert ufd.available == CAPS.available


@pytest.mark.skipif(
    not CAPS.device.works, reason=f"/dev/userfaultfd fails here: {CAPS.device.reason}"
)
def test_open_via_device():
    """``via="device"`` (/dev/userfaultfd, Linux 6.1) opens a working, initialised fd."""
    with uffd.Userfaultfd(via="device") as ufd:
        assert ufd.fileno() >= 0
        assert ufd.ioctls == BASE_IOCTLS
        assert ufd.available == CAPS.available


def test_open_via_auto():
    """The default ``via="auto"`` opens a fd whose features are exactly those asked for."""
    with uffd.Userfaultfd(Feature.THREAD_ID | Feature.EXACT_ADDRESS) as ufd:
        assert ufd.features == Feature.THREAD_ID | Feature.EXACT_ADDRESS


def test_open_via_bogus_is_a_value_error():
    """An unknown ``via`` raises ValueError naming the choices, before anything is opened."""
    with pytest.raises(ValueError, match="syscall") as info:
        uffd.Userfaultfd(via="bogus")
    assert "bogus" in str(info.value)


@pytest.mark.parametrize(("nonblock", "cloexec"), [(True, True), (False, False), (True, False)])
def test_open_flags_reach_the_fd(nonblock, cloexec):
    """``nonblock`` and ``cloexec`` set O_NONBLOCK and FD_CLOEXEC on the fd itself."""
    with uffd.Userfaultfd(nonblock=nonblock, cloexec=cloexec) as ufd:
        status = fcntl.fcntl(ufd.fileno(), fcntl.F_GETFL)
        fd_flags = fcntl.fcntl(ufd.fileno(), fcntl.F_GETFD)
        assert bool(status & os.O_NONBLOCK) is nonblock
        assert bool(fd_flags & fcntl.FD_CLOEXEC) is cloexec


# -- user_mode_only ----------------------------------------------------------------


def _page_view(addr: int) -> memoryview:
    """A writable memoryview of the page at ``addr`` that does not touch it."""
    return memoryview((ctypes.c_char * PAGE).from_address(addr)).cast("B")


@pytest.fixture
def pipe():
    """A pipe (read_fd, write_fd), closed at teardown."""
    fds = os.pipe()
    yield fds
    for fd in fds:
        os.close(fd)


@pytest.mark.skipif(
    not CAPS.user_mode_only.works,
    reason=f"UFFD_USER_MODE_ONLY fails here: {CAPS.user_mode_only.reason}",
)
def test_user_mode_only_kernel_access_fails_with_efault(uffd_factory, anon_region, pipe):
    """With ``user_mode_only`` a syscall writing into a registered page gets EFAULT, no event."""
    ufd = uffd_factory(user_mode_only=True)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    read_fd, write_fd = pipe
    os.write(write_fd, b"data")
    with pytest.raises(OSError) as info:
        os.readv(read_fd, [_page_view(anon_region.addr)])
    assert info.value.errno == errno.EFAULT
    assert ufd.read_events(timeout=0) == []


def test_kernel_access_is_reported_without_user_mode_only(uffd_factory, anon_region, pipe):
    """Without ``user_mode_only`` the syscall's fault is a PageFault; serving it completes it."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    read_fd, write_fd = pipe
    os.write(write_fd, b"data")
    # os.readv releases the GIL, so it may block in the kernel fault on a helper thread.
    reader = run_in_thread(os.readv, read_fd, [_page_view(anon_region.addr)])
    event = read_one(ufd)
    assert isinstance(event, uffd.PageFault)
    assert event.address == anon_region.addr
    assert event.write
    assert ufd.copy(anon_region.addr, b"\xaa" * PAGE, PAGE) == PAGE
    assert reader.finish() == 4
    assert anon_region.read(0, 8) == b"data" + b"\xaa" * 4


# -- reading events ------------------------------------------------------------------


@pytest.mark.parametrize("nonblock", [True, False])
def test_read_with_nothing_pending_returns_at_once(uffd_factory, nonblock):
    """``read_events()`` (timeout 0) returns [] at once when nothing is pending."""
    ufd = uffd_factory(nonblock=nonblock)
    start = time.monotonic()
    assert ufd.read_events() == []
    assert time.monotonic() - start < 0.5


def test_read_with_timeout_waits_that_long(uffd_factory):
    """``read_events(timeout=0.2)`` returns [] after about 0.2 s."""
    ufd = uffd_factory()
    start = time.monotonic()
    assert ufd.read_events(timeout=0.2) == []
    elapsed = time.monotonic() - start
    assert 0.18 <= elapsed < 2.0, elapsed


def test_read_returns_at_most_max_events(uffd_factory, region_factory):
    """``max_events`` bounds one read; the rest stay pending for the next."""
    ufd = uffd_factory(Feature.EVENT_REMOVE)
    regions = [region_factory("anon", pages=1) for _ in range(2)]
    for region in regions:
        ufd.register(region.addr, region.length, Mode.MISSING)
    from uffd._native import lib

    # MADV_DONTNEED blocks until its REMOVE event is read; two helpers, two events.
    helpers = [run_in_thread(r.madvise, lib.MADV_DONTNEED) for r in regions]
    deadline = time.monotonic() + WAIT
    first = ufd.read_events(max_events=1, timeout=WAIT)
    assert len(first) == 1
    rest: list[uffd.Event] = []
    while not rest and time.monotonic() < deadline:
        rest = ufd.read_events(max_events=64, timeout=0.1)
    assert len(rest) == 1
    starts = {e.start for e in first + rest}  # type: ignore[union-attr]
    assert starts == {r.addr for r in regions}
    for helper in helpers:
        helper.finish()


# -- the handshake ---------------------------------------------------------------------


def test_handshake_with_unknown_feature_is_unsupported():
    """Asking for a bit the kernel lacks raises UnsupportedError (EINVAL) naming the bits."""
    with pytest.raises(uffd.UnsupportedError) as info:
        uffd.Userfaultfd(Feature(1 << 40))
    err = info.value
    assert err.errno == errno.EINVAL
    assert "UFFDIO_API" in str(err)
    assert str(1 << 40) in str(err) or hex(1 << 40) in str(err)


def test_handshake_failure_leaks_no_fd():
    """A refused handshake closes the fd it opened."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(uffd.UnsupportedError):
            uffd.Userfaultfd(Feature(1 << 40))
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(not CAPS.missing_features, reason="this kernel offers every feature")
def test_handshake_with_missing_real_feature_is_unsupported():
    """On an older kernel, asking for a feature it lacks names that feature."""
    name = CAPS.missing_features[-1]
    with pytest.raises(uffd.UnsupportedError, match=name):
        uffd.Userfaultfd(Feature[name])


# -- permissions (as an unprivileged uid in a forked child) -----------------------------


def _as_nobody(attempts: dict[str, dict[str, object]]) -> dict[str, list[object]]:
    """Run each Userfaultfd(**kwargs) as uid 65534 in a forked child; (class, errno, message)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out: dict[str, list[object]] = {}
            for key, kwargs in attempts.items():
                try:
                    uffd.Userfaultfd(**kwargs).close()  # type: ignore[arg-type]
                    out[key] = ["ok", 0, ""]
                except OSError as err:
                    out[key] = [type(err).__name__, err.errno, str(err)]
            os.write(write_fd, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        chunks = []
        deadline = time.monotonic() + WAIT
        while select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return json.loads(b"".join(chunks))
    finally:
        os.close(read_fd)
        for _ in range(int(WAIT * 100)):
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to an unprivileged uid")
@pytest.mark.skipif(
    CAPS.unprivileged_userfaultfd != 0,
    reason=f"vm.unprivileged_userfaultfd={CAPS.unprivileged_userfaultfd}: the syscall would work",
)
def test_unprivileged_open_raises_permission_error_explaining_why():
    """Unprivileged, the syscall and the device raise PermissionError saying why and what to do."""
    got = _as_nobody(
        {
            "syscall": {"via": "syscall"},
            "device": {"via": "device"},
            "user_mode_only": {"via": "syscall", "user_mode_only": True},
            "fork": {"via": "syscall", "user_mode_only": True, "features": int(Feature.EVENT_FORK)},
        }
    )
    kind, err, message = got["syscall"]
    assert kind == "PermissionError" and err == errno.EPERM
    assert "vm.unprivileged_userfaultfd" in message and "user_mode_only" in message
    if CAPS.device.works or CAPS.device.errno != errno.ENOENT:
        kind, err, message = got["device"]
        assert kind == "PermissionError" and err in (errno.EACCES, errno.EPERM)
        assert "/dev/userfaultfd" in message
    # UFFD_USER_MODE_ONLY is what an unprivileged process may open (Linux 5.11) ...
    if CAPS.user_mode_only.works:
        assert got["user_mode_only"][0] == "ok"
    # ... but EVENT_FORK still needs CAP_SYS_PTRACE.
    kind, err, message = got["fork"]
    assert kind == "PermissionError" and err == errno.EPERM
    assert "CAP_SYS_PTRACE" in message


# -- closing --------------------------------------------------------------------------

CLOSED_CALLS = {
    "fileno": (),
    "register": (0x1000, PAGE, Mode.MISSING),
    "unregister": (0x1000, PAGE),
    "copy": (0x1000, b"x" * PAGE, PAGE),
    "zeropage": (0x1000, PAGE),
    "continue_": (0x1000, PAGE),
    "poison": (0x1000, PAGE),
    "move": (0x1000, 0x2000, PAGE),
    "writeprotect": (0x1000, PAGE),
    "wake": (0x1000, PAGE),
    "read_events": (),
}


@pytest.mark.parametrize("method", sorted(CLOSED_CALLS))
def test_closed_fd_methods_raise_value_error(method):
    """Every method of a closed Userfaultfd raises ValueError mentioning "closed"."""
    ufd = uffd.Userfaultfd()
    ufd.close()
    with pytest.raises(ValueError, match="closed"):
        getattr(ufd, method)(*CLOSED_CALLS[method])


def test_close_closes_the_fd_and_twice_is_a_no_op():
    """``close()`` closes the fd (``closed`` turns True); a second close does nothing."""
    ufd = uffd.Userfaultfd()
    fd = ufd.fileno()
    assert not ufd.closed
    ufd.close()
    assert ufd.closed
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    ufd.close()
    assert ufd.closed


def test_context_manager_closes_on_exit_and_on_error():
    """``with Userfaultfd()`` returns the object and closes it, also when the body raises."""
    with uffd.Userfaultfd() as ufd:
        assert isinstance(ufd, uffd.Userfaultfd)
        assert not ufd.closed
    assert ufd.closed
    with pytest.raises(RuntimeError), uffd.Userfaultfd() as other:
        raise RuntimeError("boom")
    assert other.closed


def test_blocking_fd_bounded_read_returns_events_and_stays_blocking(uffd_factory, anon_region):
    """On a ``nonblock=False`` fd a bounded read returns a pending event, and the fd stays blocking.

    Regression: the kernel's poll answers POLLERR on a blocking userfaultfd,
    so a bounded read used to fall through to a read() that blocked forever.
    """
    ufd = uffd_factory(nonblock=False)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    start = time.monotonic()
    assert ufd.read_events(timeout=0.2) == []
    assert 0.18 <= time.monotonic() - start < 2.0
    reader = run_in_thread(anon_region.read, 0, 1)
    fault = read_one(ufd)
    assert fault.address == anon_region.addr
    assert not fcntl.fcntl(ufd.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    ufd.zeropage(anon_region.addr, PAGE)
    assert reader.finish() == b"\0"


def test_blocking_fd_unbounded_read_waits_for_an_event(uffd_factory, anon_region):
    """On a ``nonblock=False`` fd ``read_events(timeout=None)`` blocks until a fault arrives."""
    ufd = uffd_factory(nonblock=False)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    waiter = run_in_thread(ufd.read_events, 1, None)
    waiter.join(0.1)
    assert waiter.is_alive()
    reader = run_in_thread(anon_region.read, PAGE, 1)
    (fault,) = waiter.finish()
    assert fault.address == anon_region.addr + PAGE
    ufd.zeropage(anon_region.addr + PAGE, PAGE)
    assert reader.finish() == b"\0"
