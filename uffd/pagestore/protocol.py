"""The page-server wire protocol, sans-IO: frame dataclasses, ``encode`` and a decoder.

Every frame is a 16-byte header followed by a payload, all integers
big-endian (network byte order)::

    magic u16 = 0x5546 ("UF") | version u8 = 1 | type u8 | flags u16 |
    reserved u16 = 0 | request id u32 | payload length u32

The server speaks first (HELLO: versions, a 32-byte nonce, whether a token is
required, the largest payload it accepts and sends, how many requests it
queues per client); the client answers with AUTH when a token is required
(HMAC-SHA256 of the nonce with the token), then LIST/REGIONS and any number
of pipelined READ requests (or, version 3, a LIST flagged FAULTS: a fault
channel, which carries one READ at a time). A READ is answered by DATA and ZERO frames (a
zero range costs no bytes) and one END that says how much was served: a reply
may be split and may be short, in which case the client asks for the rest.
ERROR frames carry a code and a UTF-8 message. docs/protocol.md has the
byte-level layout of every frame.

Nothing here does I/O, so the decoder can be fuzzed: feeding it any bytes
either yields frames or raises :class:`ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import struct
from typing import ClassVar, Union

__all__ = [
    "AUTH_CONTEXT",
    "DATA_PREFIX",
    "FLAG_FAULTS",
    "HEADER",
    "MAGIC",
    "MAX_FRAME",
    "MAX_PAGE_SIZE",
    "MAX_PRESENCE_BYTES",
    "MIN_FRAME",
    "MIN_PAGE_SIZE",
    "NONCE_SIZE",
    "VERSION",
    "VERSIONS",
    "Auth",
    "Data",
    "End",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "Hello",
    "List",
    "Map",
    "Presence",
    "ProtocolError",
    "Read",
    "RegionEntry",
    "Regions",
    "Zero",
    "auth_mac",
    "check_auth",
    "data_header",
    "decode_payload",
    "encode",
    "error_code",
    "error_name",
    "parse_header",
]

MAGIC = 0x5546
VERSION = 3
# Every version this side speaks: 2 adds MAP/PRESENCE (the present-page map), 3 the
# LIST flag FAULTS (a fault channel); the rest of version 1 is unchanged, so an
# older peer is served as before.
VERSIONS = (1, 2, 3)
# A PRESENCE frame carries at most this much bitmap (262,144 pages: 1 GiB of
# 4 KiB pages): it stays under a client's 64 KiB limit for control frames.
MAX_PRESENCE_BYTES = 32 << 10
HEADER = struct.Struct(">HBBHHII")
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_FRAME = 1 << 20
# The smallest max_frame a HELLO may announce: one 512-byte page and its offset.
MIN_FRAME = 512 + 8
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 1 << 30
AUTH_CONTEXT = b"pyuffd-auth-v1"
FLAG_URGENT = 0x0001
# LIST, version 3: this connection carries only READs, one outstanding at a time.
FLAG_FAULTS = 0x0001
MAX_NAME_BYTES = 255


class FrameType(enum.IntEnum):
    """The ``type`` byte of the header."""

    HELLO = 1
    AUTH = 2
    LIST = 3
    REGIONS = 4
    READ = 5
    DATA = 6
    ZERO = 7
    END = 8
    ERROR = 9
    MAP = 10
    PRESENCE = 11


class ErrorCode(enum.IntEnum):
    """The code of an ERROR frame (and of a ProtocolError)."""

    BAD_FRAME = 1
    TOO_LARGE = 2
    OUT_OF_RANGE = 3
    UNKNOWN_REGION = 4
    AUTH_FAILED = 5
    VERSION = 6
    INTERNAL = 7
    BUSY = 8
    TIMEOUT = 9


def error_code(code: int) -> ErrorCode | int:
    """``code`` as an ErrorCode, or the int itself if this side does not know it (newer peer)."""
    try:
        return ErrorCode(code)
    except ValueError:
        return code


def error_name(code: int) -> str:
    """The name of error ``code`` for a message, or its number if this side does not know it."""
    known = error_code(code)
    return known.name if isinstance(known, ErrorCode) else str(known)


class ProtocolError(Exception):
    """Malformed input on the wire; ``code`` is the ErrorCode to answer with.

    After a ProtocolError the byte stream cannot be resynchronised: the
    connection must be closed (after sending an ERROR frame with ``code``).
    """

    def __init__(self, code: ErrorCode | int, message: str) -> None:
        super().__init__(message)
        self.code = error_code(code)
        self.message = message

    def __str__(self) -> str:
        return f"{error_name(self.code)}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Hello:
    """Server -> client, first frame: what the server speaks and requires."""

    nonce: bytes
    auth_required: bool
    max_frame: int = MAX_FRAME
    max_pending: int = 64
    min_version: int = VERSIONS[0]
    max_version: int = VERSIONS[-1]
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.HELLO


@dataclasses.dataclass(frozen=True)
class Auth:
    """Client -> server: ``mac`` = HMAC-SHA256(token, nonce || AUTH_CONTEXT)."""

    mac: bytes
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.AUTH


@dataclasses.dataclass(frozen=True)
class List:
    """Client -> server: ask for the region table (answered by REGIONS).

    ``faults`` (version 3): the connection is a fault channel from now on:
    it carries only READs, each sent after the reply to the one before, and
    nothing between this LIST and its REGIONS.
    """

    request_id: int = 0
    faults: bool = False
    TYPE: ClassVar[FrameType] = FrameType.LIST


@dataclasses.dataclass(frozen=True)
class RegionEntry:
    """One region in a REGIONS frame; its region id is its index in the list."""

    name: str
    length: int


@dataclasses.dataclass(frozen=True)
class Regions:
    """Server -> client: the page size and the regions (id = index)."""

    page_size: int
    regions: tuple[RegionEntry, ...]
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.REGIONS


@dataclasses.dataclass(frozen=True)
class Read:
    """Client -> server: ``length`` bytes of region ``region`` (an id) at ``offset``."""

    region: int
    offset: int
    length: int
    urgent: bool = False
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.READ


@dataclasses.dataclass(frozen=True)
class Data:
    """Server -> client: ``data`` of the request's region at ``offset``."""

    offset: int
    data: bytes
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.DATA


@dataclasses.dataclass(frozen=True)
class Zero:
    """Server -> client: ``length`` zero bytes at ``offset`` (no bytes sent)."""

    offset: int
    length: int
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.ZERO


@dataclasses.dataclass(frozen=True)
class End:
    """Server -> client: the request is complete; ``served`` bytes from its offset were sent."""

    served: int
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.END


@dataclasses.dataclass(frozen=True)
class Error:
    """Either way: ``code`` and a message; request id 0 means the whole connection."""

    code: int
    message: str
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.ERROR


@dataclasses.dataclass(frozen=True)
class Map(Read):
    """Client -> server (version 2): which pages of ``length`` bytes at ``offset`` are stored.

    Answered by PRESENCE frames and END, like a READ; no page bytes move.
    """

    TYPE: ClassVar[FrameType] = FrameType.MAP


@dataclasses.dataclass(frozen=True)
class Presence:
    """Server -> client (version 2): bit ``i`` of ``bitmap`` (LSB first) set = the page at
    ``offset + i * page_size`` is stored; clear = it is all zeros."""

    offset: int
    bitmap: bytes
    request_id: int = 0
    TYPE: ClassVar[FrameType] = FrameType.PRESENCE


Frame = Union[Hello, Auth, List, Regions, Read, Map, Data, Zero, End, Error, Presence]  # noqa: UP007

# The frame types of version 2 only: refused in a version-1 header.
_V2_TYPES = {FrameType.MAP, FrameType.PRESENCE}

_HELLO = struct.Struct(">BBBBII32s")
_READ = struct.Struct(">IQQ")
_DATA = struct.Struct(">Q")
DATA_PREFIX = HEADER.size + _DATA.size
_ZERO = struct.Struct(">QQ")
_END = struct.Struct(">Q")
_ERROR = struct.Struct(">H")
_REGIONS = struct.Struct(">IH")
_ENTRY = struct.Struct(">Q")

# Payload size of the fixed-size frames, checked from the header alone.
_FIXED_SIZE = {
    FrameType.HELLO: _HELLO.size,
    FrameType.AUTH: MAC_SIZE,
    FrameType.LIST: 0,
    FrameType.READ: _READ.size,
    FrameType.MAP: _READ.size,
    FrameType.ZERO: _ZERO.size,
    FrameType.END: _END.size,
}
_MIN_SIZE = {
    FrameType.REGIONS: _REGIONS.size,
    FrameType.DATA: _DATA.size,
    FrameType.ERROR: 2,
    FrameType.PRESENCE: _DATA.size,
}
_FLAGS_ALLOWED = {FrameType.READ: FLAG_URGENT, FrameType.LIST: FLAG_FAULTS}
# Flags of a type that need a newer header version: (type, flag) -> version.
_FLAG_VERSION = {(FrameType.LIST, FLAG_FAULTS): 3}
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


def auth_mac(token: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256(token, nonce || b"pyuffd-auth-v1"): what AUTH carries."""
    return hmac.new(token, nonce + AUTH_CONTEXT, hashlib.sha256).digest()


def check_auth(token: bytes, nonce: bytes, mac: bytes) -> bool:
    """True if ``mac`` is the right AUTH for ``token`` and ``nonce`` (constant time)."""
    return hmac.compare_digest(auth_mac(token, nonce), mac)


def _check_uint(value: int, limit: int, what: str) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} does not fit in {limit.bit_length()} bits")


def _payload(frame: Frame) -> tuple[int, bytes]:
    """(flags, payload) of ``frame``."""
    if isinstance(frame, Hello):
        if len(frame.nonce) != NONCE_SIZE:
            raise ValueError(f"the HELLO nonce must be {NONCE_SIZE} bytes")
        return 0, _HELLO.pack(
            frame.min_version,
            frame.max_version,
            1 if frame.auth_required else 0,
            0,
            frame.max_frame,
            frame.max_pending,
            frame.nonce,
        )
    if isinstance(frame, Auth):
        if len(frame.mac) != MAC_SIZE:
            raise ValueError(f"the AUTH mac must be {MAC_SIZE} bytes")
        return 0, bytes(frame.mac)
    if isinstance(frame, List):
        return (FLAG_FAULTS if frame.faults else 0), b""
    if isinstance(frame, Regions):
        parts = [_REGIONS.pack(frame.page_size, len(frame.regions))]
        for entry in frame.regions:
            name = entry.name.encode("utf-8")
            if not 0 < len(name) <= MAX_NAME_BYTES:
                raise ValueError(f"region name {entry.name!r} must be 1..255 bytes of UTF-8")
            parts += [bytes([len(name)]), name, _ENTRY.pack(entry.length)]
        return 0, b"".join(parts)
    if isinstance(frame, Read):  # and Map
        flags = FLAG_URGENT if frame.urgent and not isinstance(frame, Map) else 0
        return flags, _READ.pack(frame.region, frame.offset, frame.length)
    if isinstance(frame, Presence):
        if len(frame.bitmap) > MAX_PRESENCE_BYTES:
            raise ValueError(f"a PRESENCE bitmap holds at most {MAX_PRESENCE_BYTES} bytes")
        return 0, _DATA.pack(frame.offset) + bytes(frame.bitmap)
    if isinstance(frame, Data):
        return 0, _DATA.pack(frame.offset) + bytes(frame.data)
    if isinstance(frame, Zero):
        return 0, _ZERO.pack(frame.offset, frame.length)
    if isinstance(frame, End):
        return 0, _END.pack(frame.served)
    if isinstance(frame, Error):
        return 0, _ERROR.pack(frame.code) + frame.message.encode("utf-8")
    raise TypeError(f"not a frame: {frame!r}")


def encode(frame: Frame, version: int = VERSION) -> bytes:
    """The wire bytes of ``frame`` (header + payload) in a ``version`` header.

    Raises:
        ValueError: a field does not fit its wire type (a 33-byte nonce, a
            negative offset, a 300-byte region name...).
        TypeError: ``frame`` is not one of the frame classes.
    """
    try:
        flags, payload = _payload(frame)
    except struct.error as err:
        raise ValueError(f"{type(frame).__name__}: a field does not fit: {err}") from None
    _check_uint(frame.request_id, _U32, "request id")
    _check_uint(len(payload), _U32, "payload length")
    if frame.TYPE in _V2_TYPES and version < 2:
        raise ValueError(f"{frame.TYPE.name} needs protocol version 2")
    if flags and version < _FLAG_VERSION.get((frame.TYPE, flags), 0):
        raise ValueError(f"{frame.TYPE.name} flags {flags:#x} need protocol version 3")
    return HEADER.pack(MAGIC, version, frame.TYPE, flags, 0, frame.request_id, len(payload)) + (
        payload
    )


def data_header(request_id: int, offset: int, length: int, version: int = VERSION) -> bytes:
    """The first 24 bytes of a DATA frame carrying ``length`` bytes at ``offset``.

    ``data_header(...) + data`` equals ``encode(Data(offset, data, request_id))``;
    a server sends the data itself from wherever it is (``os.sendfile``, a
    memoryview), without concatenating.

    Raises:
        ValueError: a field does not fit its wire type.
    """
    _check_uint(request_id, _U32, "request id")
    _check_uint(offset, _U64, "offset")
    _check_uint(length + _DATA.size, _U32, "payload length")
    return HEADER.pack(
        MAGIC, version, FrameType.DATA, 0, 0, request_id, length + _DATA.size
    ) + _DATA.pack(offset)


def _decode_regions(payload: memoryview, request_id: int) -> Regions:
    page_size, count = _REGIONS.unpack_from(payload)
    if not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"REGIONS: page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to "
            f"{MAX_PAGE_SIZE}",
        )
    pos = _REGIONS.size
    entries = []
    names = set()
    for index in range(count):
        if pos >= len(payload):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"REGIONS: entry {index} is missing")
        size = payload[pos]
        if not size or pos + 1 + size + _ENTRY.size > len(payload):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"REGIONS: entry {index} is cut short")
        try:
            name = bytes(payload[pos + 1 : pos + 1 + size]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(
                ErrorCode.BAD_FRAME, f"REGIONS: entry {index} name is not UTF-8"
            ) from None
        (length,) = _ENTRY.unpack_from(payload, pos + 1 + size)
        if length % page_size or name in names:
            raise ProtocolError(
                ErrorCode.BAD_FRAME,
                f"REGIONS: entry {index} ({name!r}) is a duplicate or its length {length} is "
                f"not a multiple of the page size {page_size}",
            )
        names.add(name)
        entries.append(RegionEntry(name, length))
        pos += 1 + size + _ENTRY.size
    if pos != len(payload):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"REGIONS: {len(payload) - pos} extra bytes")
    return Regions(page_size, tuple(entries), request_id)


def decode_payload(kind: FrameType, flags: int, request_id: int, payload: memoryview) -> Frame:
    """The frame of a header already checked by :func:`parse_header` and its whole payload.

    Raises:
        ProtocolError: BAD_FRAME (bad fields in the payload).
    """
    if kind is FrameType.HELLO:
        lo, hi, auth, reserved, max_frame, max_pending, nonce = _HELLO.unpack(payload)
        if auth > 1 or reserved:
            raise ProtocolError(ErrorCode.BAD_FRAME, "HELLO: bad auth or reserved byte")
        if lo > hi or max_frame < MIN_FRAME or not max_pending:
            raise ProtocolError(
                ErrorCode.BAD_FRAME,
                f"HELLO: versions {lo}..{hi}, max_frame {max_frame} (at least {MIN_FRAME}) or "
                f"max_pending {max_pending} (at least 1) make no sense",
            )
        return Hello(nonce, bool(auth), max_frame, max_pending, lo, hi, request_id)
    if kind is FrameType.AUTH:
        return Auth(bytes(payload), request_id)
    if kind is FrameType.LIST:
        return List(request_id, bool(flags & FLAG_FAULTS))
    if kind is FrameType.REGIONS:
        return _decode_regions(payload, request_id)
    if kind is FrameType.READ:
        region, offset, length = _READ.unpack(payload)
        return Read(region, offset, length, bool(flags & FLAG_URGENT), request_id)
    if kind is FrameType.MAP:
        region, offset, length = _READ.unpack(payload)
        return Map(region, offset, length, False, request_id)
    if kind is FrameType.PRESENCE:
        if len(payload) - _DATA.size > MAX_PRESENCE_BYTES:
            raise ProtocolError(ErrorCode.TOO_LARGE, "PRESENCE: the bitmap is over 32 KiB")
        (offset,) = _DATA.unpack_from(payload)
        return Presence(offset, bytes(payload[_DATA.size :]), request_id)
    if kind is FrameType.DATA:
        (offset,) = _DATA.unpack_from(payload)
        return Data(offset, bytes(payload[_DATA.size :]), request_id)
    if kind is FrameType.ZERO:
        offset, length = _ZERO.unpack(payload)
        return Zero(offset, length, request_id)
    if kind is FrameType.END:
        (served,) = _END.unpack(payload)
        return End(served, request_id)
    (code,) = _ERROR.unpack_from(payload)
    try:
        message = bytes(payload[_ERROR.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "ERROR: the message is not UTF-8") from None
    return Error(error_code(code), message, request_id)


def parse_header(
    header: bytes | bytearray | memoryview,
    max_payload: int = MAX_FRAME,
    versions: tuple[int, ...] = VERSIONS,
    max_control: int | None = None,
) -> tuple[FrameType, int, int, int]:
    """(type, flags, request id, payload length) of a 16-byte header, all checked.

    Checks the magic, the version, the type, the flags and the payload
    length (against ``max_payload``, against ``max_control`` for every frame
    but DATA when given, and against the size of fixed-size frames), so a
    receiver can refuse a frame before reading its payload.

    Raises:
        ProtocolError: BAD_FRAME, TOO_LARGE or VERSION (see :class:`FrameDecoder`).
    """
    magic, version, kind, flags, reserved, request_id, length = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"bad magic {magic:#06x} (expected {MAGIC:#06x})")
    if version not in versions:
        raise ProtocolError(
            ErrorCode.VERSION,
            f"protocol version {version} is not supported (supported: "
            f"{', '.join(map(str, versions))})",
        )
    if kind not in FrameType._value2member_map_:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"unknown frame type {kind}")
    ftype = FrameType(kind)
    if ftype in _V2_TYPES and version < 2:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{ftype.name} needs protocol version 2")
    if (
        flags & ~_FLAGS_ALLOWED.get(ftype, 0)
        or reserved
        or version < _FLAG_VERSION.get((ftype, flags), 0)
    ):
        raise ProtocolError(
            ErrorCode.BAD_FRAME,
            f"{ftype.name}: unknown flags {flags:#x} (in version {version}) or reserved bits",
        )
    limit = max_payload
    if max_control is not None and ftype is not FrameType.DATA:
        limit = min(limit, max_control)
    if length > limit:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"{ftype.name}: payload of {length} bytes is over the limit of {limit}",
        )
    fixed = _FIXED_SIZE.get(ftype)
    if (fixed is not None and length != fixed) or length < _MIN_SIZE.get(ftype, 0):
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"{ftype.name}: payload of {length} bytes is malformed"
        )
    return ftype, flags, request_id, length


class FrameDecoder:
    """Turns a byte stream into frames: ``feed(data) -> list[Frame]``.

    ``max_payload`` caps the payload length (``max_control``, when set, that
    of every frame but DATA: a client's ERROR or ZERO is small); it is checked from the header,
    before any payload is buffered, as are the magic, the version, the type,
    the flags and the size of fixed-size frames. It may be changed between
    feeds (a client raises it to the server's HELLO ``max_frame``).

    Calling context: one decoder per connection direction, used by one task
    or thread. After a ProtocolError the decoder stays broken: every later
    feed raises the same error.

    Raises (from feed):
        ProtocolError: BAD_FRAME (bad magic, unknown type or flags, a payload
            of the wrong size or with bad fields), TOO_LARGE (payload length
            over ``max_payload``), VERSION (a version this side does not speak).
    """

    def __init__(
        self,
        *,
        max_payload: int = MAX_FRAME,
        versions: tuple[int, ...] = VERSIONS,
        max_control: int | None = None,
    ):
        self.max_payload = max_payload
        self.max_control = max_control
        self.versions = versions
        self._buffer = bytearray()
        self._header: tuple[FrameType, int, int, int] | None = None
        self._broken: ProtocolError | None = None
        # The header version of the last frame started: a server answers in it.
        self.version = VERSION

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` and return every frame now complete (see the class docstring)."""
        if self._broken is not None:
            raise self._broken
        self._buffer += data
        frames: list[Frame] = []
        try:
            while True:
                if self._header is None:
                    if len(self._buffer) < HEADER.size:
                        break
                    self._header = parse_header(
                        self._buffer, self.max_payload, self.versions, self.max_control
                    )
                    self.version = self._buffer[2]
                    del self._buffer[: HEADER.size]
                kind, flags, request_id, length = self._header
                if len(self._buffer) < length:
                    break
                with memoryview(self._buffer) as view:
                    frame = decode_payload(kind, flags, request_id, view[:length])
                del self._buffer[:length]
                self._header = None
                frames.append(frame)
        except ProtocolError as err:
            self._broken = err
            raise
        return frames
