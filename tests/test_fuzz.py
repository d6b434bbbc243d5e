"""Property-based fuzzing of every parser and every public argument check (hypothesis).

Each target gets ``N`` generated inputs in ``make test`` and ``10 * N`` in
``make stress``: the page-server frame decoder, the snapshot reader, the
Firecracker handshake parser, the Userfaultfd range methods, ``uffd.mem``
sizes, ``FaultHandler.register`` targets and ``Resolution`` inputs as the
handler applies them. The property is always the same: no crash, no hang,
and only the documented exceptions.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.rel_common import page_identity, page_pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import uffd
from uffd import Mode, Resolution, mem
from uffd.pagestore import protocol as p

PS = mem.PAGE_SIZE
STRESS = 10


def budget(n: int) -> Callable[[Callable[..., Any]], list[Any]]:
    """Parametrise a fuzz test: ``n`` examples by default, ``10 * n`` under ``-m stress``."""
    return pytest.mark.parametrize(
        "examples",
        [
            pytest.param(n, id=f"{n}"),
            pytest.param(n * STRESS, id=f"{n * STRESS}", marks=pytest.mark.stress),
        ],
    )  # type: ignore[return-value]


def run(examples: int, strategy: Any, check: Callable[[Any], None]) -> None:
    """Run ``check`` on ``examples`` inputs drawn from ``strategy``."""
    fuzz = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )(given(strategy)(check))
    fuzz()


# -- the page-server protocol decoder ------------------------------------------------------------

FRAMES = [
    p.Hello(bytes(range(32)), True, 1 << 20, 64),
    p.Auth(b"m" * 32),
    p.List(request_id=7),
    p.Regions(4096, (p.RegionEntry("mem", 1 << 30), p.RegionEntry("z" * 255, 0)), 7),
    p.Read(3, 4096, 8192, urgent=True, request_id=9),
    p.Data(8192, b"\x01" * 512, 3),
    p.Zero(4096, 1 << 20, 4),
    p.End(12288, 5),
    p.Error(p.ErrorCode.BUSY, "busy", 6),
    p.Map(0, 0, 1 << 30, request_id=8),
    p.Presence(1 << 20, b"\xa5" * 64, 8),
]

stream = st.one_of(
    st.binary(max_size=512),
    st.builds(
        lambda frames, edits: _mutate(b"".join(p.encode(f) for f in frames), edits),
        st.lists(st.sampled_from(FRAMES), min_size=1, max_size=5),
        st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4),
    ),
    st.builds(
        lambda kind, flags, rid, length, payload: (
            struct.pack(">HBBHHII", 0x5546, 1, kind, flags, 0, rid, length) + payload
        ),
        st.integers(0, 255),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFFFFFF),
        st.one_of(st.integers(0, 128), st.integers(0, 0xFFFFFFFF)),
        st.binary(max_size=160),
    ),
)


def _mutate(wire: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(wire)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


def check_decoder(case: tuple[bytes, list[int], int]) -> None:
    """Frames decoded from any split of any bytes re-encode identically; else ProtocolError."""
    data, cuts, max_payload = case
    decoder = p.FrameDecoder(max_payload=max_payload)
    pieces, last = [], 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        pieces.append(data[last:cut])
        last = cut
    try:
        for piece in pieces:
            for frame in decoder.feed(piece):
                assert p.FrameDecoder().feed(p.encode(frame)) == [frame]
            # What waits for the rest of a frame never exceeds the payload limit.
            assert decoder.buffered <= max(max_payload, p.HEADER.size)
    except p.ProtocolError as err:
        assert isinstance(err.code, p.ErrorCode) and err.message
        # Broken for good: the stream cannot be resynchronised.
        with pytest.raises(p.ProtocolError):
            decoder.feed(p.encode(p.List()))


@budget(2000)
def test_fuzz_frame_decoder(examples: int) -> None:
    """Random, mutated and header-valid streams, fed in random pieces: frames or ProtocolError."""
    run(
        examples,
        st.tuples(
            stream,
            st.lists(st.integers(0, 1 << 16), max_size=6),
            st.sampled_from([64, 600, 1 << 20]),
        ),
        check_decoder,
    )


# -- the snapshot reader -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot_blob(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, bytes], Path]:
    """A small valid snapshot (two regions, zero pages, 2-page chunks) and its contents."""
    from uffd.pagestore.snapshot import write_snapshot

    rng = random.Random(11)
    regions = {
        "a": b"".join(rng.randbytes(PS) if i % 3 else bytes(PS) for i in range(6)),
        "b": rng.randbytes(2 * PS),
    }
    path = tmp_path_factory.mktemp("fuzz") / "base.snap"
    write_snapshot(path, regions, chunk_pages=2)
    return path.read_bytes(), regions, path.parent


def test_fuzz_snapshot_reader_targets(snapshot_blob: tuple[bytes, dict[str, bytes], Path]) -> None:
    """The base snapshot used by the reader fuzz reads back exactly (the oracle is sound)."""
    from uffd.pagestore.snapshot import Snapshot

    blob, regions, directory = snapshot_blob
    path = directory / "oracle.snap"
    path.write_bytes(blob)
    with Snapshot.open(path) as snap:
        assert {r.name: snap.read(r.name, 0, r.length) for r in snap.regions} == regions


@budget(2000)
def test_fuzz_snapshot_reader(
    examples: int, snapshot_blob: tuple[bytes, dict[str, bytes], Path]
) -> None:
    """Mutated, cut, extended or random files: SnapshotError (file, offset) or exact contents."""
    from uffd.pagestore.snapshot import Snapshot, SnapshotError, open_source

    blob, regions, directory = snapshot_blob
    counter = iter(range(1 << 30))

    def check(case: tuple[str, list[tuple[int, int]], int, bytes]) -> None:
        how, edits, cut, extra = case
        if how == "random":
            data = extra
        else:
            data = _mutate(blob, edits) if edits else blob
            data = data[: cut % (len(data) + 1)] if how == "cut" else data + extra
        path = directory / f"f{next(counter) % 8}.snap"
        path.write_bytes(data)
        try:
            with Snapshot.open(path) as snap:
                snap.verify()
                got = {r.name: snap.read(r.name, 0, r.length) for r in snap.regions}
                for r in snap.regions:
                    snap.extents(r.name)
        except SnapshotError as err:
            assert err.path == str(path)
            assert err.offset is None or 0 <= err.offset <= len(data)
            return
        assert got == regions, "damage went undetected and changed the contents"
        # Raw-image fallback: whatever open_source picks, it only raises documented errors.
        with contextlib.suppress(SnapshotError, ValueError):
            open_source(path).close()

    run(
        examples,
        st.tuples(
            st.sampled_from(["mutate", "cut", "extend", "random"]),
            st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4),
            st.integers(0, 1 << 20),
            st.binary(max_size=200),
        ),
        check,
    )


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS and return that."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


FIELD_VALUES = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.sampled_from([0, 1, PS, 1 << 30, 1 << 32, (1 << 32) - 1, 1 << 62, (1 << 64) - 1]),
    st.integers(-4, 4),
)


@budget(500)
def test_fuzz_snapshot_reader_past_checksums(
    examples: int, snapshot_blob: tuple[bytes, dict[str, bytes], Path]
) -> None:
    """Header, descriptor and chunk fields set to any value, then every checksum recomputed
    (and sometimes a sparse tail up to 64 GiB): SnapshotError or a readable snapshot, peak RSS
    growth under 256 MiB."""
    from helpers.snapshot_forge import reseal

    from uffd.pagestore.snapshot import Snapshot, SnapshotError

    blob, _, directory = snapshot_blob
    table_offset = struct.unpack_from("<Q", blob, 32)[0]
    fields = [(16, "<I"), (20, "<I"), (24, "<I"), (32, "<Q"), (40, "<Q")]
    for index in range(2):
        at = table_offset + index * 304
        fields += [(at + off, "<Q") for off in (256, 264, 272, 280, 288)]
        fields += [(at + 296, "<I")]
    fields += [(len(blob) - 32 + off, fmt) for off, fmt in ((0, "<Q"), (8, "<I"))]
    counter = iter(range(1 << 30))
    outcome = {"past_checksums": 0, "opened": 0, "refused": 0}
    before = reset_peak_rss()

    def check(case: tuple[list[tuple[int, int]], int, bool]) -> None:
        edits, sparse, seal = case
        data = bytearray(blob)
        for which, value in edits:
            at, fmt = fields[which % len(fields)]
            struct.pack_into(fmt, data, at, value % (1 << (8 * struct.calcsize(fmt))))
        if seal:
            reseal(data)
        path = directory / f"c{next(counter) % 8}.snap"
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(len(data) + sparse)
        try:
            with Snapshot.open(path) as snap:
                for info in snap.regions:
                    assert len(snap.read(info.name, 0, min(info.length, 4 * snap.page_size))) == (
                        min(info.length, 4 * snap.page_size)
                    )
                    snap.extents(info.name)
                snap.verify()
            outcome["opened"] += 1
        except SnapshotError as err:
            assert err.path == str(path)
            outcome["refused"] += 1
            if "do not match their checksum" in str(err):
                return
        outcome["past_checksums"] += 1

    run(
        examples,
        st.tuples(
            st.lists(st.tuples(st.integers(0, 63), FIELD_VALUES), min_size=1, max_size=4),
            st.sampled_from([0, 0, PS, 1 << 30, 64 << 30]),
            st.booleans(),
        ),
        check,
    )
    growth = status_bytes("VmHWM") - before
    print(f"\nsnapshot fuzz past checksums: {outcome}, peak RSS growth {growth >> 20} MiB")
    assert outcome["past_checksums"] >= examples // 4
    assert growth < 256 << 20


# -- the Firecracker handshake parser --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
NUMBERS = st.one_of(
    st.integers(-(1 << 65), 1 << 65),
    st.sampled_from([0, PS, 2 << 20, (1 << 64) - PS, 1 << 64, -PS, 4095]),
    st.integers(0, 64).map(lambda k: k * PS),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=4),
    st.none(),
)
mapping_objects = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "base_host_virt_addr": NUMBERS,
            "size": NUMBERS,
            "offset": NUMBERS,
            "page_size": NUMBERS,
            "page_size_kib": NUMBERS,
            "gpa_start": NUMBERS,
        },
    ),
    max_size=5,
)
handshakes = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    mapping_objects.map(lambda v: json.dumps(v).encode()),
    mapping_objects.map(lambda v: json.dumps(v).encode()[: len(json.dumps(v)) // 2]),
)


def check_handshake(data: bytes) -> None:
    """parse_mappings returns checked mappings or raises HandshakeError naming a field."""
    from uffd.restore.firecracker import HandshakeError, parse_mappings

    try:
        mappings = parse_mappings(data)
    except HandshakeError as err:
        assert err.field and str(err).startswith("handshake: ")
        return
    assert mappings
    spans = []
    for m in mappings:
        assert m.size > 0 and m.page_size >= PS and m.page_size & (m.page_size - 1) == 0
        assert m.base_host_virt_addr % m.page_size == 0 and m.offset % m.page_size == 0
        assert m.end <= 1 << 64
        spans.append((m.base_host_virt_addr, m.end))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


@budget(2000)
def test_fuzz_firecracker_handshake(examples: int) -> None:
    """Random bytes, random JSON and near-valid mapping lists: mappings or HandshakeError."""
    run(examples, handshakes, check_handshake)


nested = st.integers(1, 100_000).map(lambda depth: b"[" * depth + b"]" * depth)
handshake_streams = st.tuples(
    st.one_of(handshakes, nested, st.binary(min_size=60_000, max_size=70_000)),
    st.integers(0, 2),  # fds sent along with the first piece
    st.integers(1, 4),  # pieces the bytes are split into
)


def check_recv_handshake(case: tuple[bytes, int, int]) -> None:
    """recv_handshake on a real socket: a result, or HandshakeError and every fd closed."""
    import array
    import socket

    from uffd.restore.firecracker import HandshakeError, recv_handshake

    data, nfds, pieces = case
    before = len(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sent = [os.eventfd(0) for _ in range(nfds)]
    try:
        step = max(1, -(-len(data) // pieces))
        chunks = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", sent))] if sent else []
        theirs.setblocking(False)
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            theirs.sendmsg([chunks[0]], rights)
            for chunk in chunks[1:]:
                theirs.send(chunk)
        theirs.shutdown(socket.SHUT_WR)
        try:
            fd, mappings, _ = recv_handshake(ours, timeout=0.5)
        except HandshakeError as err:
            assert err.field and str(err).startswith("handshake: ")
        else:
            os.close(fd)
            assert mappings and nfds == 1
    finally:
        for fd in sent:
            os.close(fd)
        ours.close()
        theirs.close()
    assert len(os.listdir("/proc/self/fd")) == before, "recv_handshake leaked an fd"


@budget(500)
def test_fuzz_recv_handshake_over_a_socket(examples: int) -> None:
    """Hostile streams (random bytes, JSON, 100,000-deep nesting, 64 KiB floods, split sends,
    0-2 fds) through recv_handshake itself: only HandshakeError, no fd left open."""
    run(examples, handshake_streams, check_recv_handshake)


# -- the public argument checks --------------------------------------------------------------------


def addresses() -> st.SearchStrategy[Any]:
    """Addresses a fuzzer may hand to register(): none can hold this process's memory.

    Aligned ones lie below vm.mmap_min_addr (never mapped) or above the 47-bit
    user address space; an address that was merely unmapped once could be
    reused by the allocator meanwhile, and registering live memory would hang.
    """
    return st.one_of(
        st.integers(-(1 << 70), -1),
        st.integers(0, 1 << 70).filter(lambda a: a % PS),
        st.integers(1 << 47, 1 << 70).map(lambda a: a & ~(PS - 1)),
        st.integers(0, 15).map(lambda k: k * PS),
        st.sampled_from([0, PS, (1 << 64) - PS, 1 << 64, 1 << 63]),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.none(),
        st.binary(max_size=3),
        st.booleans(),
    )


LENGTHS = st.one_of(
    st.integers(-(1 << 70), 1 << 70),
    st.integers(0, 64).map(lambda k: k * PS),
    st.sampled_from([0, PS, 1 << 64, (1 << 64) - PS]),
    st.floats(allow_nan=True),
    st.text(max_size=3),
    st.none(),
)
ANY = st.one_of(
    st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True), st.text(max_size=3), st.none(),
    st.booleans(), st.binary(max_size=8),
)  # fmt: skip
ALLOWED = (ValueError, TypeError, uffd.UffdError)


@pytest.fixture
def bare_uffd() -> Iterator[uffd.Userfaultfd]:
    """A Userfaultfd with nothing registered: every valid-looking call fails in the kernel."""
    with uffd.Userfaultfd() as ufd:
        yield ufd


@budget(2000)
def test_fuzz_userfaultfd_range_methods(examples: int, bare_uffd: uffd.Userfaultfd) -> None:
    """Random ints and types to every range method: ValueError, TypeError or a UffdError only."""
    ufd = bare_uffd

    def call(case: tuple[str, Any, Any, Any, bool, Any]) -> None:
        name, addr, length, extra, flag, timeout = case
        methods: dict[str, Callable[[], Any]] = {
            "register": lambda: ufd.register(addr, length, extra),
            "unregister": lambda: ufd.unregister(addr, length),
            "copy": lambda: ufd.copy(addr, extra, length, wake=flag, wp=not flag),
            "zeropage": lambda: ufd.zeropage(addr, length, wake=flag),
            "continue_": lambda: ufd.continue_(addr, length, wake=flag),
            "poison": lambda: ufd.poison(addr, length, wake=flag),
            "move": lambda: ufd.move(addr, extra, length, allow_src_holes=flag),
            "writeprotect": lambda: ufd.writeprotect(addr, length, flag),
            "wake": lambda: ufd.wake(addr, length),
            "read_events": lambda: ufd.read_events(extra, timeout=timeout),
        }
        try:
            methods[name]()
        except ALLOWED:
            return
        if name == "register":
            ufd.unregister(addr, length)
            pytest.fail(f"register({addr!r}, {length!r}, {extra!r}) succeeded on unmapped memory")

    run(
        examples,
        st.tuples(
            st.sampled_from(
                [
                    "register",
                    "unregister",
                    "copy",
                    "zeropage",
                    "continue_",
                    "poison",
                    "move",
                    "writeprotect",
                    "wake",
                    "read_events",
                ]
            ),
            addresses(),
            LENGTHS,
            st.one_of(
                ANY, st.sampled_from([1, 2, 3, 4, 7, 8, 0, 1 << 40]), st.binary(max_size=PS * 2)
            ),
            st.booleans(),
            # Never a long wait: nothing is pending, so a real timeout would just sleep.
            st.one_of(
                st.floats(0, 0.002),
                st.floats(max_value=-1e-9),
                st.sampled_from([0, -1, float("nan"), None if False else 0]),
                st.text(max_size=2),
                st.binary(max_size=2),
            ),
        ),
        call,
    )


@budget(2000)
def test_fuzz_mem_sizes(examples: int) -> None:
    """mem.anon/shmem with random sizes and aligns: a Region, or ValueError/TypeError/OSError."""

    def check(case: tuple[str, Any, Any]) -> None:
        kind, length, align = case
        make = mem.anon if kind == "anon" else mem.shmem
        try:
            region = make(length, align=align)
        except (ValueError, TypeError, OSError):
            return
        try:
            assert region.length == length and region.addr % PS == 0
            if align:
                assert region.addr % align == 0
        finally:
            region.close()

    run(
        examples,
        st.tuples(
            st.sampled_from(["anon", "shmem"]),
            st.one_of(
                st.integers(-(1 << 70), 1 << 70),
                st.integers(-2, 64).map(lambda k: k * PS),
                st.sampled_from([1 << 40, 1 << 47, 1 << 63, 1 << 64, (1 << 64) - PS]),
                st.floats(allow_nan=True),
                st.text(max_size=2),
                st.none(),
            ),
            st.one_of(
                st.none(),
                st.sampled_from([PS, 2 << 20, 3, 0, -PS, 1 << 40, 1 << 64]),
                st.floats(allow_nan=True),
                st.text(max_size=2),
            ),
        ),
        check,
    )


@pytest.fixture
def idle_handler() -> Iterator[uffd.FaultHandler]:
    """A FaultHandler (started) for register() fuzzing."""
    handler = uffd.FaultHandler().start()
    yield handler
    handler.stop()


@budget(2000)
def test_fuzz_fault_handler_register_targets(
    examples: int, idle_handler: uffd.FaultHandler
) -> None:
    """Random targets, modes and ops to FaultHandler.register: ValueError/TypeError/UffdError."""
    closed = mem.anon(PS)
    closed.close()

    class NoOps:
        pass

    targets = st.one_of(
        st.tuples(addresses(), LENGTHS),
        st.tuples(addresses()),
        st.tuples(addresses(), LENGTHS, LENGTHS),
        st.just(closed),
        ANY,
        st.lists(ANY, max_size=3),
    )
    modes = st.one_of(st.integers(-4, 16), st.sampled_from(list(Mode)), ANY)
    ops = st.one_of(
        st.none(), st.just(uffd.AnonOps()), st.just(uffd.ShmemOps()), st.just(NoOps()), ANY
    )

    def check(case: tuple[Any, Any, Any]) -> None:
        target, mode, o = case
        try:
            mapping = idle_handler.register(target, mode, o)
        except ALLOWED:
            return
        idle_handler.unregister(mapping)
        pytest.fail(f"register({target!r}, {mode!r}, {o!r}) succeeded on memory nobody mapped")

    run(examples, st.tuples(targets, modes, ops), check)


class Scripted(uffd.UffdOps):
    """Answers each fault with the next scripted Resolution (or raises what the script says)."""

    def __init__(self) -> None:
        self.answer: Any = None

    def handle_missing(self, fault: uffd.Fault) -> Resolution:
        """The scripted answer."""
        return self.answer  # type: ignore[no-any-return]


@budget(1000)
def test_fuzz_resolution_inputs_through_the_handler(examples: int) -> None:
    """Resolution factories with random inputs, applied to real faults: the page is right or
    zero, the thread is released, and only documented errors are recorded."""
    npages = examples + 8
    handler = uffd.FaultHandler(deadline=5.0, fallback="zero")
    region = mem.anon(npages * PS)
    ops = Scripted()
    page_counter = iter(range(npages))
    outcome = {"installed": 0, "fallback": 0, "refused_at_build": 0}
    data_values = st.one_of(
        st.binary(max_size=8),
        st.integers(0, PS * 2).map(lambda n: bytes(random.Random(n).randbytes(n))),
        st.just(None),
        ANY,
        st.integers(1, 3).map(lambda k: memoryview(bytearray(PS * k))[: PS * k - 1]),
        st.just(bytearray(PS)),
        st.just(memoryview(page_pattern(7, PS))),
    )

    def check(case: tuple[str, Any, Any]) -> None:
        how, data, keep_wp = case
        try:
            if how == "copy":
                r = Resolution.copy(data, keep_wp=keep_wp)
            elif how == "refuse":
                r = Resolution.refuse(data)
            else:
                r = getattr(Resolution, how)()
        except (TypeError, ValueError):
            outcome["refused_at_build"] += 1
            return
        ops.answer = r
        page = next(page_counter)
        got: list[Any] = []

        def read() -> None:
            try:
                got.append(region.read(page * PS, PS))
            except uffd.PageAccessError as err:  # a poison marker: SIGBUS, caught
                got.append(err)

        reader = threading.Thread(target=read)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), f"{r!r}: the faulting thread was never released"
        content = got[0]
        if isinstance(content, uffd.PageAccessError):
            assert how == "poison" and content.address == region.addr + page * PS
            outcome["installed"] += 1
            return
        # keep_wp needs Mode.WP, which this mapping was not registered with.
        valid_copy = how == "copy" and _is_page_buffer(data) and not keep_wp
        if valid_copy:
            assert content == bytes(memoryview(data).cast("B")[:PS])
            outcome["installed"] += 1
        elif how == "zero":
            assert content == bytes(PS)
            outcome["installed"] += 1
        else:
            assert page_identity(content) == -1, f"{r!r} installed {content[:16]!r}"
            outcome["fallback"] += 1

    try:
        handler.start()
        handler.register(region, Mode.MISSING, ops)
        run(
            examples,
            st.tuples(
                st.sampled_from(
                    ["copy", "copy", "copy", "refuse", "zero", "poison", "continue_", "unprotect"]
                ),
                data_values,
                st.one_of(st.booleans(), ANY),
            ),
            check,
        )
    finally:
        try:
            handler.stop()
            errors: list[BaseException] = []
        except Exception as err:
            errors = [err]
        region.close()
    for err in errors:
        assert isinstance(err, (TypeError, ValueError, uffd.UffdError)), repr(err)
    assert outcome["installed"] and outcome["fallback"]
    print(f"\nresolution fuzz: {outcome}")


def _is_page_buffer(data: Any) -> bool:
    try:
        return memoryview(data).nbytes >= PS
    except TypeError:
        return False


# -- the protocol in both directions, live -------------------------------------------------------

hostile_streams = st.lists(
    st.one_of(
        st.sampled_from(FRAMES).map(p.encode),
        st.builds(
            lambda kind, flags, rid, length, tail: (
                p.HEADER.pack(p.MAGIC, p.VERSION, kind, flags, 0, rid, length) + tail
            ),
            st.integers(0, 12),
            st.sampled_from([0, 1, 2, 0xFFFF]),
            st.integers(0, 0xFFFFFFFF),
            st.sampled_from([0, 8, 16, 20, 44, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF]),
            st.binary(max_size=64),
        ),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=6,
).map(b"".join)


@budget(150)
def test_fuzz_server_with_hostile_streams(examples: int, snapshot_blob: Any) -> None:
    """Any byte stream after the HELLO: the server answers or drops that connection only, and
    a fresh client still reads exactly after each one."""
    import socket

    from uffd.pagestore.client import ThreadedPageClient
    from uffd.pagestore.server import ServerThread
    from uffd.pagestore.snapshot import Snapshot

    blob, regions, directory = snapshot_blob
    (directory / "served.snap").write_bytes(blob)
    with (
        Snapshot.open(directory / "served.snap") as snap,
        ServerThread(snap, handshake_timeout=0.2, send_timeout=0.5) as srv,
    ):

        def check(stream: bytes) -> None:
            with socket.create_connection(srv.address, timeout=5) as sock:
                sock.recv(1 << 16)  # HELLO
                with contextlib.suppress(OSError):
                    sock.sendall(stream)
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(2)
                    while sock.recv(1 << 16):
                        pass
            with ThreadedPageClient(srv.url, request_timeout=5) as client:
                assert client.read("b", 0, 2 * PS) == regions["b"]

        run(examples, hostile_streams, check)
        assert srv.stats.active <= 1


def _fake_server(listener: Any, stream: bytes) -> None:
    """Accept one client: a valid HELLO and REGIONS, then ``stream`` after its first READ."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(2)
        try:
            conn.sendall(p.encode(p.Hello(bytes(32), False)))
            conn.recv(1 << 16)
            conn.sendall(p.encode(p.Regions(PS, (p.RegionEntry("mem", 16 * PS),))))
            conn.recv(1 << 16)
            conn.sendall(stream)
            conn.recv(1 << 16)
        except OSError:
            pass


@budget(150)
def test_fuzz_client_with_hostile_streams(examples: int) -> None:
    """Any byte stream in answer to a READ: the ThreadedPageClient fails that read with
    PeerGoneError, RemoteError or TimeoutError (or returns 4096 bytes), never hangs."""
    import socket

    from uffd.pagestore.client import PeerGoneError, RemoteError, ThreadedPageClient

    listener = socket.create_server(("127.0.0.1", 0))
    url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    outcomes: dict[str, int] = {}

    def check(stream: bytes) -> None:
        server = threading.Thread(target=_fake_server, args=(listener, stream), daemon=True)
        server.start()
        try:
            with ThreadedPageClient(url, request_timeout=0.3) as client:
                try:
                    data = client.fetch("mem", 0, PS).result(5)
                    assert len(data) == PS
                    kind = "ok"
                except (PeerGoneError, RemoteError, TimeoutError) as err:
                    kind = type(err).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1
        finally:
            server.join(5)

    try:
        run(examples, hostile_streams, check)
    finally:
        listener.close()
    print(f"\nclient fuzz outcomes: {outcomes}")
    assert sum(outcomes.values()) >= examples
