"""Each error class raised by a real kernel condition, or by the Python-side checks.

Every kernel error is an OSError with the right errno whose message names
the ioctl and the range (``0x...-0x... (N bytes)``).
"""

from __future__ import annotations

import errno

import pytest
from conftest import PAGE, read_one, requires, run_in_thread, wait_readable
from uffd._native import lib

import uffd
from uffd import Feature, Mode
from uffd._errors import describe_range


def assert_names(err: BaseException, op: str, addr: int, length: int) -> None:
    """The message names the operation and the range."""
    text = str(err)
    assert op in text, text
    assert describe_range(addr, length) in text, text


# -- kernel conditions ------------------------------------------------------------------


def test_copy_twice_is_page_exists(uffd_factory, anon_region):
    """A second COPY onto a mapped page is PageExistsError (EEXIST) naming the ioctl and range."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    ufd.copy(anon_region.addr, b"a" * PAGE, PAGE)
    with pytest.raises(uffd.PageExistsError) as info:
        ufd.copy(anon_region.addr, b"b" * PAGE, PAGE)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.EEXIST
    assert_names(err, "UFFDIO_COPY", anon_region.addr, PAGE)
    assert (err.op, err.addr, err.length) == ("UFFDIO_COPY", anon_region.addr, PAGE)
    assert anon_region.read(0, 1) == b"a"


def test_zeropage_over_a_mapped_page_is_page_exists(uffd_factory, anon_region):
    """ZEROPAGE onto a mapped page is PageExistsError too."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    ufd.zeropage(anon_region.addr, PAGE)
    with pytest.raises(uffd.PageExistsError) as info:
        ufd.zeropage(anon_region.addr, PAGE)
    assert_names(info.value, "UFFDIO_ZEROPAGE", anon_region.addr, PAGE)


@requires(Feature.EVENT_REMOVE)
def test_copy_while_an_event_is_unread_is_mapping_changed(uffd_factory, anon_region):
    """COPY while a REMOVE event is unread is MappingChangedError (EAGAIN) with ``done == 0``."""
    ufd = uffd_factory(Feature.EVENT_REMOVE)
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    # MADV_DONTNEED blocks in the kernel until the REMOVE event is read.
    advisor = run_in_thread(anon_region.madvise, lib.MADV_DONTNEED, 0, PAGE)
    assert wait_readable(ufd), "no REMOVE event queued"
    with pytest.raises(uffd.MappingChangedError) as info:
        ufd.copy(anon_region.addr + PAGE, b"c" * PAGE, PAGE)
    err = info.value
    assert err.errno == errno.EAGAIN and err.done == 0
    assert_names(err, "UFFDIO_COPY", anon_region.addr + PAGE, PAGE)
    assert "read the events" in str(err)
    assert read_one(ufd) == uffd.Remove(anon_region.addr, anon_region.addr + PAGE)
    advisor.finish()
    # Once the event is read the same COPY succeeds.
    assert ufd.copy(anon_region.addr + PAGE, b"c" * PAGE, PAGE) == PAGE


@requires(Feature.EVENT_REMOVE)
def test_partial_copy_reports_the_bytes_done(uffd_factory, region_factory):
    """A COPY cut short by a mapping change is MappingChangedError with ``done`` = bytes installed.

    Made deterministic: the source's second page is itself a missing page on
    another uffd, so the COPY copies page one, then blocks reading its source.
    While it is blocked a MADV_DONTNEED on the destination queues a REMOVE;
    serving the source fault lets the COPY retry, see the change, and stop.
    """
    dst, src = region_factory("anon", pages=2), region_factory("anon", pages=2)
    dst_fd = uffd_factory(Feature.EVENT_REMOVE)
    dst_fd.register(dst.addr, dst.length, Mode.MISSING)
    src_fd = uffd_factory()
    src_fd.register(src.addr, src.length, Mode.MISSING)
    src_fd.copy(src.addr, b"1" * PAGE, PAGE)

    copier = run_in_thread(dst_fd.copy, dst.addr, src.addr, 2 * PAGE)
    assert read_one(src_fd).address == src.addr + PAGE  # the COPY reading its source
    advisor = run_in_thread(dst.madvise, lib.MADV_DONTNEED, 0, PAGE)
    assert wait_readable(dst_fd), "no REMOVE event queued"
    src_fd.copy(src.addr + PAGE, b"2" * PAGE, PAGE)
    with pytest.raises(uffd.MappingChangedError) as info:
        copier.finish()
    err = info.value
    assert err.errno == errno.EAGAIN
    assert err.done == PAGE
    assert f"({PAGE} bytes were done" in str(err)
    assert read_one(dst_fd) == uffd.Remove(dst.addr, dst.addr + PAGE)
    advisor.finish()


def test_copy_into_an_unregistered_range_is_no_mapping(uffd_factory, region_factory):
    """COPY into mapped but unregistered memory is NoMappingError (ENOENT)."""
    registered, other = region_factory("anon", pages=1), region_factory("anon", pages=1)
    ufd = uffd_factory()
    ufd.register(registered.addr, registered.length, Mode.MISSING)
    with pytest.raises(uffd.NoMappingError) as info:
        ufd.copy(other.addr, b"x" * PAGE, PAGE)
    err = info.value
    assert err.errno == errno.ENOENT
    assert_names(err, "UFFDIO_COPY", other.addr, PAGE)
    assert other.read(0, 1) == b"\0"


def test_copy_into_an_unmapped_range_is_no_mapping(uffd_factory, anon_region):
    """COPY into a range that was unmapped is NoMappingError (ENOENT)."""
    ufd = uffd_factory()
    ufd.register(anon_region.addr, anon_region.length, Mode.MISSING)
    addr = anon_region.addr
    anon_region.close()
    with pytest.raises(uffd.NoMappingError) as info:
        ufd.copy(addr, b"x" * PAGE, PAGE)
    assert_names(info.value, "UFFDIO_COPY", addr, PAGE)


@requires(Feature.EVENT_FORK)
def test_serving_an_exited_process_is_process_gone(forker):
    """COPY on a forked child's fd after the child exited is ProcessGoneError (ESRCH)."""
    child = forker()
    child.fork()
    fork_fd = read_one(child.uffd).uffd  # type: ignore[union-attr]
    try:
        addr = child.header["addr"]
        assert read_one(fork_fd).address == addr
        fork_fd.copy(addr, bytes(PAGE), PAGE)
        child.grandchild_data()
        child.wait_grandchild_gone()
        with pytest.raises(uffd.ProcessGoneError) as info:
            fork_fd.copy(addr + PAGE, bytes(PAGE), PAGE)
        err = info.value
        assert err.errno == errno.ESRCH
        assert_names(err, "UFFDIO_COPY", addr + PAGE, PAGE)
        assert "exited" in str(err)
    finally:
        fork_fd.close()


def test_unknown_mode_bit_is_unsupported(uffd_factory, anon_region):
    """Registering with an unknown mode bit (Mode(8)) is UnsupportedError with errno EINVAL."""
    ufd = uffd_factory()
    with pytest.raises(uffd.UnsupportedError) as info:
        ufd.register(anon_region.addr, anon_region.length, Mode(8))
    err = info.value
    assert err.errno == errno.EINVAL
    assert_names(err, "UFFDIO_REGISTER", anon_region.addr, anon_region.length)


def test_register_on_two_fds_is_ebusy(uffd_factory, anon_region):
    """Registering a range already registered on another fd is a UffdError with EBUSY."""
    uffd_factory().register(anon_region.addr, anon_region.length, Mode.MISSING)
    with pytest.raises(uffd.UffdError) as info:
        uffd_factory().register(anon_region.addr, anon_region.length, Mode.MISSING)
    assert info.value.errno == errno.EBUSY
    assert_names(info.value, "UFFDIO_REGISTER", anon_region.addr, anon_region.length)


# -- Python-side checks ------------------------------------------------------------------


def test_register_mode_zero_is_a_value_error(uffd_factory, anon_region):
    """``register`` with mode 0 raises ValueError before the kernel is called."""
    with pytest.raises(ValueError, match="mode"):
        uffd_factory().register(anon_region.addr, anon_region.length, Mode(0))


RANGE_CALLS = {
    "register": lambda u, a, n: u.register(a, n, Mode.MISSING),
    "unregister": lambda u, a, n: u.unregister(a, n),
    "copy": lambda u, a, n: u.copy(a, bytes(max(n, 0) + PAGE), n),
    "zeropage": lambda u, a, n: u.zeropage(a, n),
    "continue_": lambda u, a, n: u.continue_(a, n),
    "poison": lambda u, a, n: u.poison(a, n),
    "move": lambda u, a, n: u.move(a, a, n),
    "writeprotect": lambda u, a, n: u.writeprotect(a, n),
    "wake": lambda u, a, n: u.wake(a, n),
}


@pytest.mark.parametrize("method", sorted(RANGE_CALLS))
@pytest.mark.parametrize(
    ("offset", "length"), [(1, PAGE), (0, PAGE + 1), (PAGE // 2, PAGE)], ids=["addr", "len", "both"]
)
def test_unaligned_range_names_the_page_size(uffd_factory, anon_region, method, offset, length):
    """An unaligned address or length is a ValueError naming the page size and the range."""
    with pytest.raises(ValueError) as info:
        RANGE_CALLS[method](uffd_factory(), anon_region.addr + offset, length)
    text = str(info.value)
    assert f"{PAGE}-byte page size" in text
    assert describe_range(anon_region.addr + offset, length) in text


@pytest.mark.parametrize("method", sorted(RANGE_CALLS))
@pytest.mark.parametrize("length", [0, -PAGE])
def test_zero_or_negative_length_is_a_value_error(uffd_factory, anon_region, method, length):
    """A zero or negative length is a ValueError saying the length must be positive."""
    with pytest.raises(ValueError, match="length must be positive"):
        RANGE_CALLS[method](uffd_factory(), anon_region.addr, length)


def test_move_with_unaligned_source_is_a_value_error(uffd_factory, anon_region):
    """MOVE checks the source alignment too."""
    with pytest.raises(ValueError, match=f"{PAGE}-byte page size"):
        uffd_factory().move(anon_region.addr, anon_region.addr + 8, PAGE)


def test_non_integer_range_is_a_type_error(uffd_factory):
    """An address that is not an int is a TypeError naming the argument."""
    with pytest.raises(TypeError, match="addr"):
        uffd_factory().wake("0x1000", PAGE)  # type: ignore[arg-type]


def test_short_source_buffer_is_a_value_error(uffd_factory, anon_region):
    """A ``src`` buffer shorter than ``length`` is a ValueError saying how many bytes it holds."""
    with pytest.raises(ValueError, match=f"holds only {PAGE} bytes, {2 * PAGE} needed"):
        uffd_factory().copy(anon_region.addr, bytes(PAGE), 2 * PAGE)


@pytest.mark.parametrize("src", ["text", 1.5, None, [1, 2]], ids=["str", "float", "None", "list"])
def test_non_buffer_source_is_a_type_error(uffd_factory, anon_region, src):
    """A ``src`` that is neither an int nor a buffer is a TypeError naming its type."""
    with pytest.raises(TypeError, match=type(src).__name__):
        uffd_factory().copy(anon_region.addr, src, PAGE)


def test_strided_source_buffer_is_a_value_error(uffd_factory, anon_region):
    """A non-contiguous ``src`` (a strided memoryview) is a ValueError naming op and range."""
    strided = memoryview(bytes(2 * PAGE))[::2]
    with pytest.raises(ValueError, match=r"UFFDIO_COPY to .*not a contiguous buffer"):
        uffd_factory().copy(anon_region.addr, strided, PAGE)


@pytest.mark.parametrize("features", [-1, 1 << 64])
def test_features_outside_a_64_bit_mask_are_a_value_error(features):
    """Feature masks that cannot reach UFFDIO_API are a ValueError naming it."""
    with pytest.raises(ValueError, match="UFFDIO_API: features must be a mask"):
        uffd.Userfaultfd(features)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch": 0}, "batch must be"),
        ({"batch": -5}, "batch must be"),
        ({"batch": 1.5}, "batch must be"),
        ({"spin": -1.0}, "spin must be"),
        ({"spin": float("nan")}, "spin must be"),
        ({"features": -1}, "features must be"),
        ({"deadline": float("inf")}, "deadline must be"),
        ({"deadline": 0}, "deadline must be"),
        ({"fallback": "hang"}, "fallback must be"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_fault_handler_arguments_out_of_range(kwargs, message):
    """FaultHandler refuses values that would hang or crash its threads, before opening an fd."""
    with pytest.raises(ValueError, match=message):
        uffd.FaultHandler(**kwargs)


def test_closed_fd_is_a_value_error_and_double_close_is_fine(uffd_factory, anon_region):
    """Calls on a closed fd raise ValueError; closing again raises nothing."""
    ufd = uffd_factory()
    ufd.close()
    ufd.close()
    with pytest.raises(ValueError, match="closed"):
        ufd.copy(anon_region.addr, bytes(PAGE), PAGE)


def test_unknown_via_is_a_value_error():
    """An unknown open path is a ValueError listing the valid ones."""
    with pytest.raises(ValueError, match="'auto', 'syscall', 'device'"):
        uffd.Userfaultfd(via="ioctl")


@pytest.mark.parametrize("max_events", [0, -1])
def test_max_events_below_one_is_a_value_error(uffd_factory, max_events):
    """``read_events(max_events=0)`` (or less) is a ValueError."""
    with pytest.raises(ValueError, match="max_events"):
        uffd_factory().read_events(max_events=max_events)


def test_negative_timeout_is_a_value_error(uffd_factory):
    """``read_events(timeout=-1)`` is a ValueError."""
    with pytest.raises(ValueError, match="timeout"):
        uffd_factory().read_events(timeout=-1)


def test_kernel_error_keeps_structured_fields(uffd_factory, anon_region):
    """A kernel error keeps errno/strerror/op/addr/length/done as structured fields."""
    ufd = uffd_factory()
    with pytest.raises(uffd.NoMappingError) as info:
        ufd.zeropage(anon_region.addr, PAGE)
    err = info.value
    assert err.strerror == str(err)
    assert (err.op, err.addr, err.length, err.done) == (
        "UFFDIO_ZEROPAGE",
        anon_region.addr,
        PAGE,
        0,
    )


def test_copy_errors_in_a_reference_cycle_survive_garbage_collection():
    """A COPY error kept in a traceback cycle is collected safely (the source buffer is released).

    Regression: the source memoryview used to keep an export alive in the
    failing frame, and CPython's GC crashed clearing such a cycle.
    """
    import subprocess
    import sys

    script = (
        "import gc, mmap, uffd\n"
        "gc.disable()\n"
        "ufd = uffd.Userfaultfd()\n"
        "m = mmap.mmap(-1, 4096)\n"
        "for src in (bytes(4096), bytearray(4096), memoryview(bytearray(4096)), m):\n"
        "    try:\n"
        "        ufd.copy(0x10000, src, 4096)\n"
        "    except uffd.UffdError as err:\n"
        "        err.cycle = err\n"
        "gc.collect()\n"
        "m.close()\n"
        "print('collected')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "collected"
