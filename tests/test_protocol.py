"""The page-server wire protocol: encoding, decoding, limits and fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uffd.pagestore import protocol as p

SAMPLES: list[p.Frame] = [
    p.Hello(bytes(range(32)), True, 1 << 20, 64),
    p.Hello(b"\xff" * 32, False, 4096 + 8, 1, 1, 3, request_id=0),
    p.Auth(b"m" * 32),
    p.List(request_id=7),
    p.Regions(4096, (p.RegionEntry("mem", 1 << 30), p.RegionEntry("ñ" * 100, 0)), 7),
    p.Regions(2 << 20, ()),
    p.Read(0, 0, 4096, urgent=True, request_id=1),
    p.Read(65535, (1 << 64) - 4096, 1 << 40, urgent=False, request_id=(1 << 32) - 1),
    p.Data(8192, b"\x01" * 4096, 3),
    p.Data(0, b"", 3),
    p.Zero(4096, 1 << 20, 4),
    p.End(12288, 5),
    p.Error(p.ErrorCode.OUT_OF_RANGE, "outside region 'mem' ✗", 6),
    p.Error(p.ErrorCode.TIMEOUT, ""),
]


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: type(f).__name__)
def test_round_trip(frame: p.Frame) -> None:
    """encode then decode gives back an equal frame."""
    assert p.FrameDecoder().feed(p.encode(frame)) == [frame]


def test_header_is_big_endian() -> None:
    """The header is magic 'UF', version, type, flags, reserved, id, length, big-endian."""
    wire = p.encode(p.Read(2, 4096, 8192, urgent=True, request_id=0x01020304))
    assert wire[:2] == b"UF"
    assert struct.unpack(">HBBHHII", wire[:16]) == (0x5546, p.VERSION, 5, 1, 0, 0x01020304, 20)
    assert wire[16:] == struct.pack(">IQQ", 2, 4096, 8192)


def test_byte_by_byte_and_batched_feeds() -> None:
    """Frames come out whole whether fed one byte at a time or all at once."""
    stream = b"".join(p.encode(f) for f in SAMPLES)
    decoder = p.FrameDecoder()
    out: list[p.Frame] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == SAMPLES
    assert decoder.buffered == 0
    assert p.FrameDecoder().feed(stream) == SAMPLES


def test_error_codes_decode_to_enum() -> None:
    """A known code decodes to ErrorCode; an unknown one stays an int."""
    known = p.FrameDecoder().feed(p.encode(p.Error(3, "x")))[0]
    assert isinstance(known, p.Error) and known.code is p.ErrorCode.OUT_OF_RANGE
    unknown = p.FrameDecoder().feed(p.encode(p.Error(999, "x")))[0]
    assert isinstance(unknown, p.Error) and unknown.code == 999


def test_error_messages_name_known_codes_and_number_unknown_ones() -> None:
    """ProtocolError and RemoteError name a known code and print an unknown one's number."""
    from uffd.pagestore.client import RemoteError

    assert str(p.ProtocolError(3, "m")) == "OUT_OF_RANGE: m"
    assert str(p.ProtocolError(999, "m")) == "999: m"
    assert str(RemoteError(p.ErrorCode.BUSY, "m", "h:1")) == "page server h:1: BUSY: m"
    assert str(RemoteError(999, "m")) == "999: m"


def header(
    kind: int, length: int, *, magic: int = 0x5546, version: int = 1, flags: int = 0
) -> bytes:
    """A raw frame header."""
    return struct.pack(">HBBHHII", magic, version, kind, flags, 0, 1, length)


@pytest.mark.parametrize(
    ("wire", "code", "match"),
    [
        (header(5, 20, magic=0x4142), p.ErrorCode.BAD_FRAME, "bad magic"),
        (header(5, 20, version=4), p.ErrorCode.VERSION, "version 4"),
        (header(99, 0), p.ErrorCode.BAD_FRAME, "unknown frame type 99"),
        (header(3, 0, flags=1), p.ErrorCode.BAD_FRAME, "flags"),
        (header(5, 20, flags=2), p.ErrorCode.BAD_FRAME, "flags"),
        (header(5, 21), p.ErrorCode.BAD_FRAME, "READ: payload of 21"),
        (header(6, 4), p.ErrorCode.BAD_FRAME, "DATA: payload of 4"),
        (header(1, 39), p.ErrorCode.BAD_FRAME, "HELLO"),
        (header(9, 2) + b"\x00\x01", None, ""),
        (header(9, 4) + b"\x00\x01\xff\xfe", p.ErrorCode.BAD_FRAME, "not UTF-8"),
        (header(4, 7) + struct.pack(">IHB", 4096, 1, 3), p.ErrorCode.BAD_FRAME, "entry 0"),
        (header(4, 6) + struct.pack(">IH", 4096, 1), p.ErrorCode.BAD_FRAME, "missing"),
        (
            header(4, 7) + struct.pack(">IH", 4096, 0) + b"x",
            p.ErrorCode.BAD_FRAME,
            "extra bytes",
        ),
        (header(4, 6 + 1 + 0 + 8) + struct.pack(">IHBQ", 4096, 1, 0, 1), p.ErrorCode.BAD_FRAME, ""),
    ],
)
def test_malformed_frames_raise_protocol_error(
    wire: bytes, code: p.ErrorCode | None, match: str
) -> None:
    """Each malformation raises ProtocolError with the code to answer with."""
    decoder = p.FrameDecoder()
    if code is None:
        assert decoder.feed(wire) == [p.Error(1, "", 1)]
        return
    with pytest.raises(p.ProtocolError, match=match or None) as info:
        decoder.feed(wire)
    assert info.value.code is code
    with pytest.raises(p.ProtocolError):
        decoder.feed(p.encode(p.List()))  # stays broken


def test_oversized_length_rejected_from_header_alone() -> None:
    """A 4 GiB length field is refused as TOO_LARGE before any payload arrives."""
    decoder = p.FrameDecoder(max_payload=1 << 20)
    with pytest.raises(p.ProtocolError, match="over the limit") as info:
        decoder.feed(header(6, 0xFFFFFFFF))
    assert info.value.code is p.ErrorCode.TOO_LARGE
    ok = p.FrameDecoder(max_payload=8 + 4096)
    assert ok.feed(p.encode(p.Data(0, bytes(4096)))) == [p.Data(0, bytes(4096))]
    with pytest.raises(p.ProtocolError, match="over the limit"):
        ok.feed(p.encode(p.Data(0, bytes(4097))))


def test_encode_rejects_unfit_fields() -> None:
    """Values that do not fit their wire type raise ValueError, not struct.error."""
    with pytest.raises(ValueError, match="nonce"):
        p.encode(p.Hello(b"short", False))
    with pytest.raises(ValueError, match="fit"):
        p.encode(p.Read(0, -1, 4096))
    with pytest.raises(ValueError, match="request id"):
        p.encode(p.End(0, 1 << 32))
    with pytest.raises(ValueError, match=r"1\.\.255"):
        p.encode(p.Regions(4096, (p.RegionEntry("x" * 256, 0),)))
    with pytest.raises(TypeError, match="not a frame"):
        p.encode("READ")  # type: ignore[arg-type]


def test_auth_mac_is_hmac_sha256() -> None:
    """auth_mac is HMAC-SHA256(token, nonce || context); check_auth compares it."""
    import hashlib
    import hmac

    nonce = bytes(range(32))
    mac = p.auth_mac(b"secret", nonce)
    assert mac == hmac.new(b"secret", nonce + b"pyuffd-auth-v1", hashlib.sha256).digest()
    assert p.check_auth(b"secret", nonce, mac)
    assert not p.check_auth(b"Secret", nonce, mac)
    assert not p.check_auth(b"secret", nonce, mac[:-1])


def _drain(
    decoder: p.FrameDecoder, data: bytes, step: int
) -> tuple[list[p.Frame], p.ProtocolError | None]:
    """Feed ``data`` in ``step``-sized pieces: the frames decoded, and the ProtocolError that
    ended the stream (None if none did). Any other exception escapes and fails the test."""
    frames: list[p.Frame] = []
    try:
        for i in range(0, len(data), step):
            frames += decoder.feed(data[i : i + step])
    except p.ProtocolError as err:
        return frames, err
    return frames, None


def _contained(frames: list[p.Frame], err: p.ProtocolError | None) -> bool:
    """Every decoded frame re-encodes to itself, and an error carries a protocol error code."""
    round_trips = all(p.FrameDecoder().feed(p.encode(f)) == [f] for f in frames)
    return round_trips and (err is None or isinstance(err.code, p.ErrorCode))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), step=st.integers(1, 64))
def test_fuzz_random_bytes(data: bytes, step: int) -> None:
    """Random bytes either decode to frames that re-encode identically or raise ProtocolError."""
    assert _contained(*_drain(p.FrameDecoder(max_payload=256), data, step))


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.sampled_from(SAMPLES), min_size=1, max_size=4),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    cut=st.integers(0, 10_000),
    step=st.integers(1, 4096),
)
def test_fuzz_mutated_frames(
    frames: list[p.Frame], edits: list[tuple[int, int]], cut: int, step: int
) -> None:
    """Valid streams with flipped bytes and cut ends never raise anything but ProtocolError."""
    wire = bytearray(b"".join(p.encode(f) for f in frames))
    for pos, value in edits:
        wire[pos % len(wire)] = value
    stream = bytes(wire[: cut % (len(wire) + 1)])
    assert _contained(*_drain(p.FrameDecoder(max_payload=1 << 16), stream, step))


@settings(max_examples=300, deadline=None)
@given(
    kind=st.integers(0, 12),
    flags=st.sampled_from([0, 0, 1, 2, 0x8000]),
    payload=st.binary(max_size=80),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, 1000]),
)
def test_fuzz_valid_headers_random_payloads(
    kind: int, flags: int, payload: bytes, length_delta: int
) -> None:
    """A well-formed header over a random payload (of any claimed length) stays contained."""
    length = max(0, len(payload) + length_delta)
    wire = struct.pack(">HBBHHII", 0x5546, 1, kind, flags, 0, 9, length) + payload
    assert _contained(*_drain(p.FrameDecoder(max_payload=512), wire, 7))


def test_data_header_matches_encode() -> None:
    """data_header + the bytes is exactly encode(Data): a server may send them apart."""
    data = bytes(range(256)) * 32
    assert p.data_header(7, 4096, len(data)) + data == p.encode(p.Data(4096, data, 7))
    assert len(p.data_header(1, 0, 0)) == p.DATA_PREFIX
    with pytest.raises(ValueError, match="request id"):
        p.data_header(1 << 32, 0, 4096)
    with pytest.raises(ValueError, match="payload length"):
        p.data_header(1, 0, 1 << 32)


def test_parse_header_checks_like_the_decoder() -> None:
    """parse_header returns the fields of a good header and refuses what the decoder refuses."""
    frame = p.encode(p.Read(2, 4096, 8192, True, 9))
    assert p.parse_header(frame[: p.HEADER.size]) == (p.FrameType.READ, 1, 9, 20)
    with pytest.raises(p.ProtocolError, match="bad magic"):
        p.parse_header(b"\x00" * p.HEADER.size)
    with pytest.raises(p.ProtocolError, match="over the limit") as info:
        p.parse_header(header(6, 1 << 20 + 1), max_payload=1 << 20)
    assert info.value.code is p.ErrorCode.TOO_LARGE
    with pytest.raises(p.ProtocolError) as info:
        p.parse_header(p.encode(p.Read(2, 4096, 8192, True, 9), 1)[: p.HEADER.size], versions=(2,))
    assert info.value.code is p.ErrorCode.VERSION
