"""The Firecracker UFFD handshake: one message of JSON region mappings plus the userfaultfd.

When Firecracker restores a snapshot with ``mem_backend: {"backend_type":
"Uffd", "backend_path": SOCKET}``, it maps guest memory anonymous, opens a
userfaultfd (UFFD_FEATURE_EVENT_REMOVE, O_NONBLOCK|O_CLOEXEC), registers every
guest region with UFFDIO_REGISTER_MODE_MISSING, connects to the Unix stream
socket ``SOCKET`` and sends exactly one ``sendmsg``: the data is a JSON array
of ``GuestRegionUffdMapping`` objects (serde_json, compact) and the ancillary
data is SCM_RIGHTS carrying the one fd. It then drops the connection; the
handler learns Firecracker's pid from SO_PEERCRED (userfaultfd(2),
unix(7)).

Each mapping says: ``size`` bytes of guest memory live at host address
``base_host_virt_addr`` in Firecracker, and their contents are at ``offset``
in the memory snapshot file. The page size field has three historical forms,
all accepted by :func:`parse_mappings`:

- current releases send ``"page_size"`` and ``"page_size_kib"`` with the same
  value, in bytes (the ``_kib`` name is a known misnomer kept for
  compatibility, deprecated upstream);
- earlier releases sent only ``"page_size_kib"``, also in bytes (4096, or
  2097152 for hugetlbfs-backed guests);
- the first releases with the handshake sent neither; the host page size
  is assumed.

Unknown keys are ignored (serde's default), so forks that add fields such as
``gpa_start`` still parse. Everything else is checked strictly: see
:func:`parse_mappings`.

Only :func:`userfaultfd_from_fd`, which wraps a received fd, needs the
compiled extension.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import json
import mmap
import os
import re
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from uffd._userfaultfd import Userfaultfd

__all__ = [
    "MAX_MAPPINGS",
    "GuestRegionUffdMapping",
    "HandshakeError",
    "PeerCred",
    "connect_and_send",
    "encode_mappings",
    "parse_mappings",
    "peer_credentials",
    "peer_pidfd",
    "recv_handshake",
    "send_handshake",
    "userfaultfd_from_fd",
]

MAX_MAPPINGS = 4096
"""More regions than this in one handshake is refused (Firecracker sends a handful)."""

MAX_DEPTH = 16
"""JSON nested deeper than this is refused before it is parsed (Firecracker's is 2 deep)."""

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"?')
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))
_BRACKET_STEP = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")

_U64 = 1 << 64
_UCRED = struct.Struct("=iII")
_REQUIRED = ("base_host_virt_addr", "size", "offset")


class HandshakeError(ValueError):
    """A handshake that cannot be accepted; ``field`` names the culprit.

    ``field`` is a JSON path such as ``"mappings[1].size"``, or one of
    ``"json"`` (not valid JSON), ``"fd"`` (no fd, or more than one),
    ``"message"`` (empty, truncated or too long) and ``"peer"`` (refused
    credentials).
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"handshake: {field}: {problem}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class GuestRegionUffdMapping:
    """One guest memory region: where it is in the peer and where its contents are.

    ``base_host_virt_addr``: start of the region in the peer's address space;
    ``size``: its length in bytes; ``offset``: where its contents start in the
    memory snapshot (the source); ``page_size``: its page size in bytes.
    """

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        """One past the region's last host address."""
        return self.base_host_virt_addr + self.size

    def to_json(self, *, legacy: bool = True) -> dict[str, int]:
        """The object Firecracker serialises (fields in its declaration order).

        ``legacy=True`` adds ``page_size_kib`` (same value, in bytes), as
        current Firecracker releases do.
        """
        obj = {
            "base_host_virt_addr": self.base_host_virt_addr,
            "size": self.size,
            "offset": self.offset,
            "page_size": self.page_size,
        }
        if legacy:
            obj["page_size_kib"] = self.page_size
        return obj


class PeerCred(NamedTuple):
    """SO_PEERCRED of a Unix socket peer, as of its ``connect()``."""

    pid: int
    uid: int
    gid: int


def encode_mappings(mappings: Iterable[GuestRegionUffdMapping], *, legacy: bool = True) -> bytes:
    """The handshake's data bytes, as serde_json writes them (compact, declaration order)."""
    return json.dumps([m.to_json(legacy=legacy) for m in mappings], separators=(",", ":")).encode()


def _int_field(obj: dict[str, Any], key: str, path: str) -> int:
    value = obj[key]
    # bool is an int in Python; serde rejects true/false and floats for u64.
    if type(value) is not int:
        raise HandshakeError(
            f"{path}.{key}", f"must be an integer, not {type(value).__name__} {value!r}"
        )
    if not 0 <= value < _U64:
        raise HandshakeError(f"{path}.{key}", f"{value} is outside 0..2**64-1")
    return value


def _page_size(obj: dict[str, Any], path: str, default: int) -> int:
    sizes = {
        key: _int_field(obj, key, path) for key in ("page_size", "page_size_kib") if key in obj
    }
    if len(set(sizes.values())) > 1:
        raise HandshakeError(
            f"{path}.page_size_kib",
            f"{sizes['page_size_kib']} disagrees with page_size {sizes['page_size']} "
            "(Firecracker sends the same value, in bytes, in both)",
        )
    size = next(iter(sizes.values()), default)
    if size < mmap.PAGESIZE or size & (size - 1):
        key = next(iter(sizes), "page_size")
        raise HandshakeError(
            f"{path}.{key}",
            f"{size} is not a power of two of at least {mmap.PAGESIZE} bytes "
            "(it is in bytes, even under the name page_size_kib)",
        )
    return size


def _check_depth(data: bytes) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH, counting brackets outside strings.

    Done before any parse: Python's json recurses per level, so a deep
    document (even an unfinished one) would raise RecursionError.

    Raises:
        HandshakeError: ``field`` "json".
    """
    steps = _STRING.sub(b"", data).translate(_BRACKET_STEP, _NOT_BRACKETS)
    depth = max(itertools.accumulate(b - 1 for b in steps), default=0)
    if depth > MAX_DEPTH:
        raise HandshakeError(
            "json", f"nested {depth} levels deep; at most {MAX_DEPTH} accepted (Firecracker: 2)"
        )


def parse_mappings(
    data: bytes, *, default_page_size: int = mmap.PAGESIZE
) -> list[GuestRegionUffdMapping]:
    """Parse and check the handshake's JSON; returns the mappings in the order sent.

    Checks: UTF-8 JSON nested at most MAX_DEPTH levels; a non-empty array of at
    most MAX_MAPPINGS objects;
    ``base_host_virt_addr``, ``size``, ``offset`` present; every number an
    integer in 0..2**64-1; ``page_size`` (or ``page_size_kib``, in bytes; both
    equal if both sent; ``default_page_size`` if neither) a power of two of
    at least the host page size; ``size`` positive; address, size and offset
    multiples of the page size; no two regions overlapping in the peer's
    address space or in the snapshot; no region wrapping past 2**64.

    Raises:
        HandshakeError: the first problem found; ``field`` names it.
    """
    _check_depth(data)
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise HandshakeError("json", f"not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise HandshakeError("json", f"not valid JSON ({err.msg} at byte {err.pos})") from None
    return _mappings_of(doc, default_page_size)


def _mappings_of(doc: Any, default_page_size: int) -> list[GuestRegionUffdMapping]:
    """The checked mappings of the parsed handshake ``doc`` (see :func:`parse_mappings`).

    Raises:
        HandshakeError: the first problem found.
    """
    if not isinstance(doc, list):
        raise HandshakeError("mappings", f"must be a JSON array, not {type(doc).__name__}")
    if not doc:
        raise HandshakeError("mappings", "is empty: there is no guest memory to serve")
    if len(doc) > MAX_MAPPINGS:
        raise HandshakeError("mappings", f"{len(doc)} regions; at most {MAX_MAPPINGS} accepted")
    out: list[GuestRegionUffdMapping] = []
    for index, obj in enumerate(doc):
        path = f"mappings[{index}]"
        if not isinstance(obj, dict):
            raise HandshakeError(path, f"must be a JSON object, not {type(obj).__name__}")
        for key in _REQUIRED:
            if key not in obj:
                raise HandshakeError(f"{path}.{key}", "is missing")
        addr = _int_field(obj, "base_host_virt_addr", path)
        size = _int_field(obj, "size", path)
        offset = _int_field(obj, "offset", path)
        page = _page_size(obj, path, default_page_size)
        if size == 0:
            raise HandshakeError(f"{path}.size", "is 0: an empty region")
        for key, value in (("base_host_virt_addr", addr), ("size", size), ("offset", offset)):
            if value % page:
                raise HandshakeError(
                    f"{path}.{key}", f"{value:#x} is not a multiple of the page size {page}"
                )
        for key, value in (("base_host_virt_addr", addr), ("offset", offset)):
            if value + size > _U64:
                raise HandshakeError(f"{path}.{key}", f"{value:#x} + size {size:#x} passes 2**64")
        out.append(GuestRegionUffdMapping(addr, size, offset, page))
    _check_disjoint(out, "base_host_virt_addr", lambda m: m.base_host_virt_addr)
    _check_disjoint(out, "offset", lambda m: m.offset)
    return out


def _check_disjoint(mappings: list[GuestRegionUffdMapping], key: str, start: Any) -> None:
    order = sorted(range(len(mappings)), key=lambda i: start(mappings[i]))
    for before, after in itertools.pairwise(order):
        a, b = mappings[before], mappings[after]
        if start(b) < start(a) + a.size:
            raise HandshakeError(
                f"mappings[{after}].{key}",
                f"[{start(b):#x}, +{b.size:#x}) overlaps mappings[{before}] "
                f"[{start(a):#x}, +{a.size:#x})",
            )


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else int(fd.fileno())


def send_handshake(
    sock: socket.socket,
    uffd_fd: Any,
    mappings: Sequence[GuestRegionUffdMapping] | bytes,
    *,
    legacy: bool = True,
) -> None:
    """Send the handshake as Firecracker does: one sendmsg, JSON data, SCM_RIGHTS of the fd.

    ``uffd_fd`` is an int or an object with ``fileno()`` (a Userfaultfd).
    ``mappings`` may be given as raw bytes (to send exactly those, e.g. in
    tests). The fd stays open here: the kernel passes the receiver a copy.

    Raises:
        OSError: the send failed (the peer closed, EPIPE...).
    """
    data = mappings if isinstance(mappings, bytes) else encode_mappings(mappings, legacy=legacy)
    fds = array.array("i", [_fileno(uffd_fd)])
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    if sent < len(data):
        # A stream socket may take part of a large message; the fd went with it.
        sock.sendall(data[sent:])


def connect_and_send(
    path: str | os.PathLike[str],
    uffd_fd: Any,
    mappings: Sequence[GuestRegionUffdMapping] | bytes,
    *,
    timeout: float = 5.0,
    legacy: bool = True,
) -> None:
    """What Firecracker does: connect to the handler's socket, send the handshake, disconnect."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        send_handshake(sock, uffd_fd, mappings, legacy=legacy)


def peer_credentials(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED of a connected Unix socket: (pid, uid, gid) at the peer's connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5; Python 3.13 names it


def peer_pidfd(sock: socket.socket) -> int:
    """A pidfd of the connected Unix socket's peer process (SO_PEERPIDFD), or -1.

    The pidfd names the process as of its ``connect()``, so a pid reused
    since cannot be mistaken for it (unlike ``pidfd_open`` of the SO_PEERCRED
    pid). -1 where the kernel lacks it (before 6.5); the caller owns the fd.
    """
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
    except OSError:
        return -1


_INCOMPLETE = object()


def _loaded(data: bytes) -> Any:
    """``data`` parsed when it is one whole JSON value, else ``_INCOMPLETE`` (more may come,
    or it is invalid: :func:`parse_mappings` says which once nothing more comes)."""
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _INCOMPLETE


def recv_handshake(
    sock: socket.socket, max_bytes: int = 65536, *, timeout: float = 5.0
) -> tuple[int, list[GuestRegionUffdMapping], PeerCred]:
    """Receive and check one handshake; returns (fd, mappings, peer credentials).

    The JSON normally arrives with the fd in one message; a stream socket may
    split a large one, so data is read until it parses, the peer closes, or
    ``max_bytes`` is passed. The caller owns the returned fd. On any error,
    every fd received is closed before raising.

    Calling context: one thread per connection; waits at most ``timeout``
    seconds for each read.

    Raises:
        HandshakeError: no data, no fd or several fds, data longer than
            ``max_bytes``, truncated or malformed JSON, or bad mappings.
        OSError: the socket failed (other than a timeout, which is a
            HandshakeError: ``message``).
    """
    cred = peer_credentials(sock)
    fds: list[int] = []
    buf = bytearray()
    doc: Any = _INCOMPLETE
    ctrunc = False
    deadline = time.monotonic() + timeout
    try:
        while len(buf) <= max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandshakeError(
                    "message",
                    f"incomplete after {timeout:g} s ({len(buf)} bytes received, not yet "
                    "a whole JSON document)",
                )
            sock.settimeout(remaining)
            try:
                data, ancdata, flags, _ = sock.recvmsg(
                    max_bytes + 1 - len(buf), socket.CMSG_SPACE(4 * 4)
                )
            except TimeoutError:
                continue
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:usable]))
            ctrunc = ctrunc or bool(flags & socket.MSG_CTRUNC)
            if not data:
                break
            buf += data
            _check_depth(bytes(buf))
            # Parsed once, here: on the way to the session's first fault.
            doc = _loaded(bytes(buf))
            if doc is not _INCOMPLETE:
                break
        if len(buf) > max_bytes:
            raise HandshakeError("message", f"longer than {max_bytes} bytes; refused")
        if ctrunc or len(fds) > 1:
            raise HandshakeError(
                "fd", f"{max(len(fds), 2)} or more fds sent; exactly one userfaultfd expected"
            )
        if not buf:
            raise HandshakeError("message", "the peer closed without sending anything")
        if not fds:
            raise HandshakeError(
                "fd", "no file descriptor arrived (SCM_RIGHTS with the userfaultfd is required)"
            )
        # Incomplete or invalid data at EOF is reported by the parser (truncated JSON).
        mappings = (
            parse_mappings(bytes(buf)) if doc is _INCOMPLETE else _mappings_of(doc, mmap.PAGESIZE)
        )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[0], mappings, cred


def userfaultfd_from_fd(fd: int) -> Userfaultfd:
    """``Userfaultfd.from_fd(fd)``, refusing a non-userfaultfd as a handshake error.

    The result owns ``fd``; its ``features`` are what the peer negotiated
    (EVENT_REMOVE for Firecracker). On error ``fd`` is left open: the caller
    still owns it.

    Raises:
        HandshakeError: ``fd`` is not an initialised userfaultfd (``field`` "fd").
    """
    from uffd import Userfaultfd

    try:
        return Userfaultfd.from_fd(fd)
    except ValueError as err:
        raise HandshakeError("fd", str(err).removeprefix("from_fd: ")) from None
