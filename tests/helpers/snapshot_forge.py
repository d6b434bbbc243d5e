"""Forge snapshot files whose checksums are right but whose claims are hostile.

The snapshot's checksums are unkeyed (BLAKE2b): anyone who can write a file can
make every checksum match. These helpers build such files for the reader's
tests and fuzzers: ``reseal`` recomputes the table checksum and every chunk
checksum of a (mutated) file, ``forge`` writes a header and a region table
claiming whatever sizes the caller likes, optionally inside a sparse file of
any size (no disk space used). Nothing here imports pytest or uffd.
"""

from __future__ import annotations

import hashlib
import os
import struct

HEADER = struct.Struct("<8sIIIIIIQQ16s")
REGION = struct.Struct("<B255sQQQQQII")
CHUNK = struct.Struct("<QII16s")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def reseal(data: bytearray) -> bool:
    """Recompute every chunk checksum (where the chunk lies in ``data``) and the table checksum.

    Returns False when the header's table does not lie in ``data`` (nothing resealed).
    """
    if len(data) < HEADER.size:
        return False
    page_size, count = struct.unpack_from("<I", data, 16)[0], struct.unpack_from("<I", data, 24)[0]
    table_offset, table_size = struct.unpack_from("<QQ", data, 32)
    if table_offset + table_size > len(data) or count * REGION.size > table_size:
        return False
    for index in range(count):
        fields = REGION.unpack_from(data, table_offset + index * REGION.size)
        chunk_offset, nchunks = fields[6], fields[7]
        for k in range(min(nchunks, 4096)):
            at = chunk_offset + k * CHUNK.size
            if not table_offset <= at <= table_offset + table_size - CHUNK.size:
                break
            offset, pages, reserved, _ = CHUNK.unpack_from(data, at)
            end = offset + pages * page_size
            if end <= len(data):
                CHUNK.pack_into(data, at, offset, pages, reserved, _digest(bytes(data[offset:end])))
    table = bytes(data[table_offset : table_offset + table_size])
    data[48:64] = _digest(bytes(data[:48]) + table)
    return True


def region_entry(
    name: bytes,
    length: int,
    present: int,
    data_offset: int,
    bitmap_offset: int,
    chunk_offset: int,
    nchunks: int,
) -> bytes:
    """One 304-byte region descriptor (fields wrapped to their widths)."""
    return REGION.pack(
        len(name),
        name,
        length % (1 << 64),
        present % (1 << 64),
        data_offset % (1 << 64),
        bitmap_offset % (1 << 64),
        chunk_offset % (1 << 64),
        nchunks % (1 << 32),
        0,
    )


def forge(
    path: str | os.PathLike[str],
    *,
    table: bytes,
    table_offset: int,
    region_count: int,
    file_size: int,
    page_size: int = 4096,
    chunk_pages: int = 256,
    table_size: int | None = None,
    data: tuple[int, bytes] | None = None,
) -> None:
    """Write a sparse file of ``file_size`` bytes: a sealed header, ``table`` at ``table_offset``.

    ``table_size`` defaults to ``len(table)`` (claim more to make the reader
    hash a sparse tail); ``data`` is (offset, bytes) written as well. A claimed
    table over 1 GiB is not hashed (its checksum is left zero): the reader must
    refuse such a claim from the header alone, before hashing anything.
    """
    size = len(table) if table_size is None else table_size
    head = HEADER.pack(
        b"PYUFFDSN", 1, 64, page_size, chunk_pages, region_count, 0, table_offset, size, bytes(16)
    )[:48]
    with open(path, "wb") as f:
        f.truncate(file_size)
        if data is not None:
            f.seek(data[0])
            f.write(data[1])
        f.seek(table_offset)
        f.write(table)
        # The checksum covers the claimed table: a sparse tail hashes as zeros.
        digest = hashlib.blake2b(head, digest_size=16)
        digest.update(table)
        remaining = size - len(table) if size <= 1 << 30 else 0
        zeros = bytes(1 << 20)
        while remaining > 0:
            digest.update(zeros[: min(remaining, len(zeros))])
            remaining -= len(zeros)
        f.seek(0)
        f.write(head + (digest.digest() if size <= 1 << 30 else bytes(16)))
