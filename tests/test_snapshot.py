"""Snapshot files: round trips, atomic writes, damaged files and raw memory images."""

from __future__ import annotations

import array
import errno
import mmap
import os
import random
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uffd.pagestore import snapshot as sn
from uffd.pagestore.snapshot import (
    RawMemoryFile,
    RegionInfo,
    Snapshot,
    SnapshotError,
    UnknownRegionError,
    open_source,
    write_snapshot,
)

PS = 4096
HEADER = 64
REGION_DESC = 304
CHUNK_ENTRY = 32


def mixed_pages(npages: int, seed: int, zero_share: float = 0.5) -> bytearray:
    """``npages`` pages, about ``zero_share`` of them all-zero, the rest random."""
    rng = random.Random(seed)
    buf = bytearray(npages * PS)
    for i in range(npages):
        if rng.random() >= zero_share:
            buf[i * PS : (i + 1) * PS] = rng.randbytes(PS)
            buf[i * PS] = 1  # a random page is never all zero
    return buf


def present_count(buf: bytes | bytearray) -> int:
    """Pages of ``buf`` that are not all zero."""
    zero = bytes(PS)
    return sum(buf[i : i + PS] != zero for i in range(0, len(buf), PS))


def expected_size(regions: dict[str, bytes | bytearray], chunk_pages: int) -> int:
    """The file size the format implies: header, stored pages, region table."""
    size = HEADER
    for buf in regions.values():
        pages = len(buf) // PS
        present = present_count(buf)
        chunks = -(-present // chunk_pages)
        size += present * PS + REGION_DESC + 8 * -(-pages // 64) + CHUNK_ENTRY * chunks
    return size


def tmp_files(directory: Path) -> list[str]:
    """Leftover temporary files of write_snapshot in ``directory``."""
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, dict[str, bytearray]]:
    """A snapshot of two mixed regions and an all-zero one, 7-page chunks."""
    regions = {
        "ram": mixed_pages(300, seed=1),
        "rom": mixed_pages(70, seed=2, zero_share=0.1),
        "zeros": bytearray(16 * PS),
    }
    path = tmp_path / "sample.snap"
    write_snapshot(path, regions, page_size=PS, chunk_pages=7)
    return path, regions


@pytest.fixture
def sparse_raw(tmp_path: Path) -> Path:
    """A sparse 64-page raw memory file: all hole but page 40, which is 0xaa bytes."""
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(64 * PS)
        f.seek(40 * PS)
        f.write(b"\xaa" * PS)
    return path


def test_round_trip_stores_only_nonzero_pages(tmp_path: Path) -> None:
    """Every page reads back; zero pages take no space (file size matches the format)."""
    regions = {"a": mixed_pages(257, seed=3), "b": mixed_pages(64, seed=4), "c": bytearray(0)}
    path = tmp_path / "s.snap"
    info = write_snapshot(path, regions, page_size=PS, chunk_pages=16)
    assert info.path == str(path)
    assert info.page_size == PS
    assert info.file_size == os.path.getsize(path) == expected_size(regions, 16)
    assert info.regions == [
        RegionInfo(name, len(buf), present_count(buf)) for name, buf in regions.items()
    ]
    assert info.file_size < HEADER + sum(len(b) for b in regions.values())
    with Snapshot.open(path) as snap:
        assert snap.regions == info.regions
        assert snap.page_size == PS
        for name, buf in regions.items():
            assert snap.read(name, 0, len(buf)) == buf
            for i in range(len(buf) // PS):
                page = buf[i * PS : (i + 1) * PS]
                assert snap.read(name, i * PS, PS) == page
                assert snap.is_present(name, i * PS) == any(page)


def test_reads_across_chunks_and_runs(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """Ranges of every start and size up to three chunks read back exactly."""
    path, regions = sample
    buf = regions["ram"]
    rng = random.Random(5)
    with Snapshot.open(path) as snap:
        for _ in range(300):
            first = rng.randrange(300)
            count = rng.randrange(0, min(22, 300 - first) + 1)
            got = snap.read("ram", first * PS, count * PS)
            assert got == buf[first * PS : (first + count) * PS]


def test_extents_describe_runs(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """extents() tiles the range with alternating runs that match the page contents."""
    path, regions = sample
    with Snapshot.open(path) as snap:
        for name, buf in regions.items():
            runs = snap.extents(name)
            pos = 0
            for i, (offset, length, present) in enumerate(runs):
                assert offset == pos and length > 0 and length % PS == 0
                if i:
                    assert present != runs[i - 1][2]
                for page in range(offset, offset + length, PS):
                    assert any(buf[page : page + PS]) == present
                pos += length
            assert pos == len(buf)
        sub = snap.extents("ram", 10 * PS, 5 * PS)
        assert sub[0][0] == 10 * PS and sum(n for _, n, _ in sub) == 5 * PS
        assert snap.extents("zeros") == [(0, 16 * PS, False)]


def test_verify_counts_stored_pages(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """verify() checks every chunk and returns the number of stored pages."""
    path, regions = sample
    with Snapshot.open(path) as snap:
        assert snap.verify() == sum(present_count(b) for b in regions.values())


def test_buffer_types_accepted(tmp_path: Path) -> None:
    """bytes, bytearray, memoryview, mmap and array regions all round-trip."""
    data = mixed_pages(8, seed=6)
    anon = mmap.mmap(-1, len(data))
    anon.write(bytes(data))
    words = array.array("Q", bytes(data))
    regions = {
        "bytes": bytes(data),
        "bytearray": data,
        "view": memoryview(data),
        "mmap": anon,
        "array": words,
    }
    path = tmp_path / "types.snap"
    write_snapshot(path, regions, page_size=PS)
    anon.close()  # the writer released its views: closing works
    with Snapshot.open(path) as snap:
        for name in regions:
            assert snap.read(name, 0, len(data)) == data


def test_huge_page_size(tmp_path: Path) -> None:
    """A 2 MiB page size works: one zero and one data page."""
    big = 2 << 20
    data = bytearray(2 * big)
    data[big + 7] = 9
    path = tmp_path / "huge.snap"
    info = write_snapshot(path, {"h": data}, page_size=big)
    assert info.regions[0].present_pages == 1
    with Snapshot.open(path) as snap:
        assert snap.page_size == big
        assert snap.read("h", 0, 2 * big) == data
        assert snap.extents("h") == [(0, big, False), (big, big, True)]


def test_bad_arguments_rejected_before_writing(tmp_path: Path) -> None:
    """Bad page size, length or name raise ValueError/TypeError and leave no file."""
    path = tmp_path / "bad.snap"
    with pytest.raises(ValueError, match="page size 4096"):
        write_snapshot(path, {"a": bytes(PS + 1)}, page_size=PS)
    with pytest.raises(ValueError, match="power of two"):
        write_snapshot(path, {"a": bytes(PS)}, page_size=3000)
    with pytest.raises(ValueError, match="255"):
        write_snapshot(path, {"é" * 200: bytes(PS)}, page_size=PS)
    with pytest.raises(TypeError, match="contiguous buffer"):
        write_snapshot(path, {"a": [0] * PS}, page_size=PS)
    with pytest.raises(ValueError, match="chunk_pages"):
        write_snapshot(path, {"a": bytes(PS)}, page_size=PS, chunk_pages=0)
    assert os.listdir(tmp_path) == []


def test_failed_fsync_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from fsync: the previous snapshot survives and no temp file is left."""
    path = tmp_path / "s.snap"
    write_snapshot(path, {"a": mixed_pages(4, seed=7)}, page_size=PS)
    before = path.read_bytes()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as info:
        write_snapshot(path, {"a": mixed_pages(4, seed=8)}, page_size=PS)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert tmp_files(tmp_path) == []


def test_failure_mid_stream_leaves_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that fills up halfway through the data: old file intact, temp file gone."""
    path = tmp_path / "s.snap"
    write_snapshot(path, {"a": mixed_pages(4, seed=9)}, page_size=PS)
    before = path.read_bytes()
    real_write = os.write
    calls = []

    def filling_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", filling_write)
    big = mixed_pages(1200, seed=10, zero_share=0.0)  # ~4.7 MiB: several 1 MiB flushes
    with pytest.raises(OSError, match="No space"):
        write_snapshot(path, {"a": big}, page_size=PS)
    assert len(calls) == 3
    assert path.read_bytes() == before
    assert tmp_files(tmp_path) == []


def test_new_file_is_private(tmp_path: Path) -> None:
    """The snapshot holds memory contents: mode 0600."""
    path = tmp_path / "s.snap"
    write_snapshot(path, {"a": bytes(PS)}, page_size=PS)
    assert path.stat().st_mode & 0o777 == 0o600


def test_unknown_region_is_keyerror(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """An unknown name raises UnknownRegionError, both a SnapshotError and a KeyError."""
    path, _ = sample
    with Snapshot.open(path) as snap:
        with pytest.raises(KeyError) as info:
            snap.read("nope", 0, PS)
        assert isinstance(info.value, SnapshotError)
        assert isinstance(info.value, UnknownRegionError)
        assert "'ram'" in str(info.value) and "nope" in str(info.value)
        with pytest.raises(UnknownRegionError):
            snap.region("nope")
        assert snap.region("rom").length == 70 * PS


def test_misaligned_and_out_of_range_reads(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """Misaligned or out-of-range reads raise ValueError that names the region."""
    path, _ = sample
    with Snapshot.open(path) as snap:
        with pytest.raises(ValueError, match="multiples of the page size"):
            snap.read("ram", 1, PS)
        with pytest.raises(ValueError, match="outside the region"):
            snap.read("ram", 299 * PS, 2 * PS)
        with pytest.raises(ValueError, match="outside"):
            snap.extents("ram", 301 * PS)
        with pytest.raises(ValueError, match="outside"):
            snap.is_present("ram", 300 * PS)


def test_close_is_idempotent(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """close() twice is fine; reads after close raise ValueError."""
    path, _ = sample
    snap = Snapshot.open(path)
    snap.close()
    snap.close()
    assert snap.closed
    with pytest.raises(ValueError, match="closed"):
        snap.read("ram", 0, PS)


def test_concurrent_readers(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """Eight threads reading random pages of one Snapshot all get the right bytes."""
    path, regions = sample
    buf = regions["ram"]
    errors: list[BaseException] = []

    with Snapshot.open(path) as snap:

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(200):
                    page = rng.randrange(300)
                    assert snap.read("ram", page * PS, PS) == buf[page * PS : (page + 1) * PS]
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert errors == []


# -- damaged files -------------------------------------------------------------


def reseal(data: bytearray) -> None:
    """Recompute the metadata checksum, so a mutation reaches the structural checks."""
    import hashlib

    table_offset, table_size = struct.unpack_from("<QQ", data, 32)
    table = bytes(data[table_offset : table_offset + table_size])
    digest = hashlib.blake2b(bytes(data[:48]) + table, digest_size=16).digest()
    data[48:64] = digest


def expect_error(path: Path, offset: int | None = None, match: str | None = None) -> SnapshotError:
    """Open ``path`` and return the SnapshotError, checking that it names path and offset."""
    with pytest.raises(SnapshotError, match=match) as info:
        Snapshot.open(path)
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    if offset is not None:
        assert err.offset == offset
        assert f"file offset {offset}" in str(err)
    return err


def test_wrong_magic(tmp_path: Path) -> None:
    """A file without the magic is refused at offset 0 with a pointer to RawMemoryFile."""
    path = tmp_path / "raw.bin"
    path.write_bytes(b"\x7fELF" + bytes(PS - 4))
    err = expect_error(path, 0, "bad magic")
    assert "RawMemoryFile" in str(err)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    expect_error(empty, 0, "bad magic")


def test_newer_version_names_supported(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """Version 2 is refused at offset 8, naming the supported version and the fix."""
    path, _ = sample
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, 2)
    path.write_bytes(data)
    err = expect_error(path, 8, "version 2 is not supported")
    assert "version 1" in str(err) and "upgrade pyuffd" in str(err)


def test_truncation_at_every_boundary(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """Cutting the file at any section boundary (and inside each) gives a SnapshotError."""
    path, _ = sample
    full = path.read_bytes()
    table_offset, table_size = struct.unpack_from("<QQ", full, 32)
    cuts = {4, 8, 20, 63, 64, 65, 64 + PS, table_offset - 1, table_offset, table_offset + 1}
    cuts |= {table_offset + REGION_DESC, table_offset + table_size - 1}
    for cut in sorted(cuts):
        path.write_bytes(full[:cut])
        err = expect_error(path)
        assert err.offset is not None, f"cut at {cut}: {err}"
        assert "offset" in str(err)


def test_corrupt_page_data_fails_checksum(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """A flipped data byte: reads of that chunk fail naming region, chunk and offset."""
    path, regions = sample
    data = bytearray(path.read_bytes())
    data[HEADER + 8 * PS + 5] ^= 0xFF  # stored page 8 of "ram": chunk 1 (7-page chunks)
    path.write_bytes(data)
    chunk_offset = HEADER + 7 * PS
    with Snapshot.open(path) as snap:
        ram = regions["ram"]
        first = next(i for i in range(300) if snap.is_present("ram", i * PS))
        assert snap.read("ram", first * PS, PS) == ram[first * PS : (first + 1) * PS]
        runs = [(o, n) for o, n, present in snap.extents("ram") if present]
        ranks = [o for o, n in runs for o in range(o, o + n, PS)]
        bad_page = ranks[8]
        with pytest.raises(SnapshotError, match="'ram', chunk 1 fails its checksum") as info:
            snap.read("ram", bad_page, PS)
        assert info.value.offset == chunk_offset
        assert f"file offset {chunk_offset}" in str(info.value)
        with pytest.raises(SnapshotError, match="chunk 1"):
            snap.verify()
        assert snap.read("rom", 0, 70 * PS) == regions["rom"]


def test_corrupt_table_fails_metadata_checksum(
    sample: tuple[Path, dict[str, bytearray]],
) -> None:
    """A flipped byte in the region table is caught by the metadata checksum."""
    path, _ = sample
    data = bytearray(path.read_bytes())
    table_offset = struct.unpack_from("<Q", data, 32)[0]
    data[table_offset + 260] ^= 1
    path.write_bytes(data)
    expect_error(path, table_offset, "checksum")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (256, PS * 300 + 1, "not a multiple of the page size"),  # length
        (264, 301, "present pages"),  # present pages
        (264, 100, "does not count"),  # present pages vs bitmap
        (272, 1 << 40, "outside the file"),  # data offset
        (280, 1 << 40, "bitmap"),  # bitmap offset
        (288, 0, "chunk table"),  # chunk table offset
        (296, 3, "chunks, expected"),  # chunk count
    ],
)
def test_inconsistent_tables_rejected(
    sample: tuple[Path, dict[str, bytearray]], field: int, value: int, match: str
) -> None:
    """A resealed table whose fields disagree is refused, naming the field's offset."""
    path, _ = sample
    data = bytearray(path.read_bytes())
    table_offset = struct.unpack_from("<Q", data, 32)[0]
    fmt = "<I" if field == 296 else "<Q"
    struct.pack_into(fmt, data, table_offset + field, value)
    reseal(data)
    path.write_bytes(data)
    err = expect_error(path, match=match)
    assert err.offset is not None


def _fuzz_base() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "base.snap")
        regions = {"a": mixed_pages(9, seed=11), "bb": mixed_pages(3, seed=12, zero_share=0)}
        write_snapshot(path, regions, page_size=PS, chunk_pages=2)
        with open(path, "rb") as f:
            return f.read()


FUZZ_BASE = _fuzz_base()


def _open_and_read_all(path: str) -> str | None:
    """Open and read every region: None if all went through, else the path the SnapshotError
    named. Any other exception escapes and fails the test."""
    try:
        with Snapshot.open(path) as snap:
            for info in snap.regions:
                snap.read(info.name, 0, info.length)
                snap.extents(info.name)
            snap.verify()
    except SnapshotError as err:
        return err.path
    return None


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(FUZZ_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(0, len(FUZZ_BASE))),
    sealed=st.booleans(),
    table_edit=st.one_of(
        st.none(),
        st.tuples(st.integers(0, 2 * REGION_DESC // 8 - 1), st.integers(0, (1 << 64) - 1)),
    ),
)
def test_fuzz_mutated_files_only_raise_snapshot_error(
    edits: list[tuple[int, int]],
    cut: int | None,
    sealed: bool,
    table_edit: tuple[int, int] | None,
) -> None:
    """Random byte edits, truncations and resealed table edits never escape SnapshotError."""
    data = bytearray(FUZZ_BASE)
    table_offset = struct.unpack_from("<Q", data, 32)[0]
    for pos, value in edits:
        data[pos] = value
    if table_edit is not None:
        # Overwrite one u64 of the region descriptors with an arbitrary value.
        pos = table_offset + table_edit[0] * 8
        if pos + 8 <= len(data):
            struct.pack_into("<Q", data, pos, table_edit[1])
    if sealed and len(data) >= 64:
        table_offset, table_size = struct.unpack_from("<QQ", data, 32)
        if table_offset + table_size <= len(data):
            reseal(data)
    if cut is not None:
        del data[cut:]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.snap")
        with open(path, "wb") as f:
            f.write(data)
        assert _open_and_read_all(path) in (None, path)


@settings(max_examples=100, deadline=None)
@given(header=st.binary(min_size=64, max_size=64))
def test_fuzz_random_headers(header: bytes) -> None:
    """A random header (with the magic kept half the time) never escapes SnapshotError."""
    data = bytearray(FUZZ_BASE)
    data[:64] = header
    if header[0] & 1:
        data[:8] = sn.MAGIC
        struct.pack_into("<I", data, 8, 1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "fuzz.snap")
        with open(path, "wb") as f:
            f.write(data)
        assert _open_and_read_all(path) in (None, path)


# -- raw memory files -------------------------------------------------------------


def test_raw_memory_file_default_region(tmp_path: Path) -> None:
    """A raw image is one region "mem" covering the file, read like a snapshot."""
    data = mixed_pages(16, seed=13, zero_share=0)
    path = tmp_path / "mem.raw"
    path.write_bytes(data)
    with RawMemoryFile(path, page_size=PS) as raw:
        assert [r.name for r in raw.regions] == ["mem"]
        assert raw.region("mem").length == len(data)
        assert raw.read("mem", 3 * PS, 2 * PS) == data[3 * PS : 5 * PS]
        assert raw.extents("mem") == [(0, len(data), True)]
        assert raw.is_present("mem", 0)
        with pytest.raises(UnknownRegionError):
            raw.read("nope", 0, PS)


def test_raw_memory_file_regions_and_holes(sparse_raw: Path) -> None:
    """Explicit (name, offset, length) regions; holes of a sparse file read as absent."""
    path = sparse_raw
    with RawMemoryFile(
        path, page_size=PS, regions=[("low", 0, 32 * PS), ("high", 32 * PS, 32 * PS)]
    ) as raw:
        assert raw.read("high", 8 * PS, PS) == b"\xaa" * PS
        assert raw.read("low", 0, PS) == bytes(PS)
        runs = raw.extents("high")
        assert sum(n for _, n, _ in runs) == 32 * PS
        assert any(present and o <= 8 * PS < o + n for o, n, present in runs)
        fd = os.open(path, os.O_RDONLY)
        try:
            holes_reported = os.lseek(fd, 0, os.SEEK_DATA) > 0
        except OSError:
            holes_reported = False
        finally:
            os.close(fd)
        if holes_reported:
            assert raw.extents("low") == [(0, 32 * PS, False)]
            assert not raw.is_present("high", 0)
            assert raw.is_present("high", 8 * PS)
            assert raw.region("high").present_pages < 32


def test_raw_memory_file_past_end(tmp_path: Path) -> None:
    """A region past the end of the file is a SnapshotError naming its offset."""
    path = tmp_path / "short.raw"
    path.write_bytes(bytes(4 * PS))
    with pytest.raises(SnapshotError, match="past the end") as info:
        RawMemoryFile(path, page_size=PS, regions=[("r", 2 * PS, 4 * PS)])
    assert info.value.offset == 2 * PS
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(PS + 1))
    with pytest.raises(SnapshotError, match="not a multiple of the page size"):
        RawMemoryFile(odd, page_size=PS)


def test_open_source_picks_by_magic(
    sample: tuple[Path, dict[str, bytearray]], tmp_path: Path
) -> None:
    """open_source returns a Snapshot for the magic and a RawMemoryFile otherwise."""
    path, _ = sample
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(2 * mmap.PAGESIZE))
    with open_source(path) as snap:
        assert isinstance(snap, Snapshot)
    with open_source(raw) as mem_file:
        assert isinstance(mem_file, RawMemoryFile)
        assert mem_file.region("mem").length == 2 * mmap.PAGESIZE


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="os.RWF_NOWAIT needs Linux 4.14+")
def test_read_cached_needs_verified_chunks(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """read_cached is None until a chunk is verified, then returns the same bytes as read."""
    path, regions = sample
    with Snapshot.open(path) as snap:
        assert snap.read_cached("rom", 0, 7 * PS) is None
        assert snap.read_cached("zeros", 0, 16 * PS) == bytes(16 * PS)  # nothing to read
        assert snap.read("rom", 0, 7 * PS) == regions["rom"][: 7 * PS]
        assert snap.read_cached("rom", 0, 7 * PS) == regions["rom"][: 7 * PS]
    raw_path = path.with_suffix(".raw")
    raw_path.write_bytes(regions["rom"])
    with RawMemoryFile(raw_path, page_size=PS) as raw:
        assert raw.read("mem", 0, 70 * PS) == regions["rom"]
        assert raw.read_cached("mem", PS, 3 * PS) == regions["rom"][PS : 4 * PS]


def test_file_extents_verify_then_point_at_the_bytes(
    sample: tuple[Path, dict[str, bytearray]],
) -> None:
    """file_extents verifies the chunks it covers; each run's file bytes are the region's bytes."""
    path, regions = sample
    ram = regions["ram"]
    with Snapshot.open(path) as snap, open(path, "rb") as f:
        runs = snap.file_extents("ram", 4 * PS, 200 * PS)
        assert sum(n for _, n, _ in runs) == 200 * PS
        assert runs[0][0] == 4 * PS
        for offset, length, file_offset in runs:
            if file_offset is None:
                assert ram[offset : offset + length] == bytes(length)
            else:
                f.seek(file_offset)
                assert f.read(length) == ram[offset : offset + length]
        # Verified now: a page-cache read (which needs verified chunks) may answer.
        offset, length, _ = next(run for run in runs if run[2] is not None)
        cached = snap.read_cached("ram", offset, length)
        assert cached is None or cached == ram[offset : offset + length]
        assert os.fstat(snap.fileno()).st_size == snap.file_size
    with pytest.raises(ValueError, match="closed"):
        snap.fileno()


def test_file_extents_refuse_a_corrupt_chunk(sample: tuple[Path, dict[str, bytearray]]) -> None:
    """file_extents over a chunk that fails its checksum raises before pointing at its bytes."""
    path, _ = sample
    data = bytearray(path.read_bytes())
    data[HEADER + 8 * PS + 5] ^= 0xFF  # stored page 8 of "ram": chunk 1
    path.write_bytes(data)
    with (
        Snapshot.open(path) as snap,
        pytest.raises(SnapshotError, match="chunk 1 fails its checksum"),
    ):
        snap.file_extents("ram", 0, 300 * PS)


def test_raw_memory_file_file_extents(sparse_raw: Path) -> None:
    """A raw file's runs point at region base + offset; holes have no file offset."""
    with RawMemoryFile(sparse_raw, page_size=PS, regions=[("high", 32 * PS, 32 * PS)]) as raw:
        runs = raw.file_extents("high", 4 * PS, 8 * PS)
        assert sum(n for _, n, _ in runs) == 8 * PS
        page = next(
            fo + (8 * PS - o) for o, n, fo in runs if fo is not None and o <= 8 * PS < o + n
        )
        assert page == 40 * PS
        assert os.pread(raw.fileno(), PS, page) == b"\xaa" * PS


def test_raw_memory_file_file_extents_notice_truncation(tmp_path: Path) -> None:
    """file_extents of a raw file cut short since it was opened raises SnapshotError."""
    path = tmp_path / "mem.raw"
    path.write_bytes(b"\x01" * (8 * PS))
    with RawMemoryFile(path, page_size=PS) as raw:
        os.truncate(path, 4 * PS)
        assert raw.file_extents("mem", 0, 4 * PS)[0][2] == 0
        with pytest.raises(SnapshotError, match="truncated while open"):
            raw.file_extents("mem", 0, 8 * PS)


# -- forged files: right checksums, hostile sizes ------------------------------------------------

OPEN_IN_CHILD = """
import json, sys, time
from uffd.pagestore.snapshot import Snapshot, SnapshotError
start = time.monotonic()
try:
    with Snapshot.open(sys.argv[1]) as snap:
        for info in snap.regions:
            snap.read(info.name, 0, snap.page_size)
        snap.verify()
    error = None
except SnapshotError as err:
    error = str(err)
# VmHWM, not ru_maxrss: the latter includes the forking parent's size.
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"error": error, "seconds": time.monotonic() - start, "maxrss": peak}))
"""
# A fresh interpreter with uffd imported peaks around 25 MiB; a reader that
# allocated what the file claims would be at gigabytes.
RSS_BOUND = 96 << 20


def open_in_child(path: Path) -> dict[str, object]:
    """Open, read a page of every region and verify ``path`` in a fresh interpreter."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", OPEN_IN_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_sparse_64_gib_table_claim_refused_from_the_header(tmp_path: Path) -> None:
    """A 64 GiB sparse file whose table claims 64 GiB: SnapshotError at once, no MemoryError,
    peak RSS under 96 MiB."""
    from helpers.snapshot_forge import forge

    path = tmp_path / "huge.snap"
    forge(
        path,
        table=b"",
        table_offset=64,
        region_count=1,
        file_size=64 << 30,
        table_size=(64 << 30) - 64,
    )
    result = open_in_child(path)
    assert "over the format's limit" in str(result["error"]), result
    assert int(str(result["maxrss"])) < RSS_BOUND and float(str(result["seconds"])) < 5, result


def test_bitmap_claim_larger_than_the_table_refused(tmp_path: Path) -> None:
    """A sealed table whose region claims 2^62 bytes (a 128 TiB bitmap): SnapshotError before
    any bitmap is read."""
    from helpers.snapshot_forge import forge, region_entry

    entry = region_entry(b"big", 1 << 62, 0, 64, 64 + REGION_DESC, 64 + REGION_DESC, 0)
    path = tmp_path / "bitmap.snap"
    forge(path, table=entry + bytes(64), table_offset=64, region_count=1, file_size=4096)
    result = open_in_child(path)
    assert "lies outside the region table" in str(result["error"]), result
    assert int(str(result["maxrss"])) < RSS_BOUND, result


def test_regions_sharing_one_bitmap_cannot_multiply_it(tmp_path: Path) -> None:
    """200 sealed regions all pointing at one 1 MiB bitmap: refused once their bitmaps add up
    to more than the table, so a file cannot make the reader hold 200 copies."""
    from helpers.snapshot_forge import forge, region_entry

    count, bitmap = 200, 1 << 20
    length = bitmap * 8 * PS
    table_offset = 64
    bitmap_at = table_offset + count * REGION_DESC
    table = b"".join(
        region_entry(f"r{i}".encode(), length, 0, 64, bitmap_at, bitmap_at + bitmap, 0)
        for i in range(count)
    )
    path = tmp_path / "shared.snap"
    forge(
        path,
        table=table + bytes(bitmap),
        table_offset=table_offset,
        region_count=count,
        file_size=table_offset + len(table) + bitmap,
    )
    result = open_in_child(path)
    assert "need more than the region table" in str(result["error"]), result
    assert int(str(result["maxrss"])) < RSS_BOUND, result


def test_one_gib_chunk_is_verified_in_bounded_pieces(tmp_path: Path) -> None:
    """A sealed table with one 1 GiB chunk (sparse data, a wrong digest): reading one page
    fails the chunk's checksum with peak RSS under 96 MiB (the chunk is hashed in pieces)."""
    from helpers.snapshot_forge import forge, region_entry

    page, pages = 1 << 20, 1024
    data_offset = 64
    table_offset = data_offset + page * pages
    words = pages // 64
    entry = region_entry(
        b"mem",
        page * pages,
        pages,
        data_offset,
        table_offset + REGION_DESC,
        table_offset + REGION_DESC + 8 * words,
        1,
    )
    chunk = struct.pack("<QII16s", data_offset, pages, 0, b"\x01" * 16)
    table = entry + b"\xff" * (8 * words) + chunk
    path = tmp_path / "chunk.snap"
    forge(
        path,
        table=table,
        table_offset=table_offset,
        region_count=1,
        file_size=table_offset + len(table),
        page_size=page,
        chunk_pages=pages,
    )
    result = open_in_child(path)
    assert "chunk 0 fails its checksum" in str(result["error"]), result
    assert int(str(result["maxrss"])) < RSS_BOUND, result
