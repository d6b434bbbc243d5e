"""TLS over a blocking socket for a client whose reader and writers are different threads.

``ssl.SSLSocket`` must not be read in one thread while another writes to it
(one OpenSSL object, no locking), which is exactly how ThreadedPageClient
works: a reader thread receives while callers send READ frames. So TLS runs
on an ``ssl.SSLObject`` over memory BIOs, with the socket I/O done here: one
lock guards the TLS state, another keeps records in order on the wire, and
no lock is held while waiting on the socket for incoming bytes.

:class:`TLSStream` offers the few socket methods the client uses (``recv``,
``recv_into``, ``sendall``, ``settimeout``, ``shutdown``, ``close``).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import cast

__all__ = ["TLSStream", "describe_tls_error"]

_RECV = 1 << 18


def describe_tls_error(err: BaseException) -> str:
    """A sentence for a failed TLS handshake: what went wrong and what to check."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return (
            f"the server's certificate was refused: {err.verify_message} (check the CA given "
            "to the client and the name the certificate is for)"
        )
    reason = getattr(err, "reason", None) or str(err)
    if reason == "WRONG_VERSION_NUMBER":
        return "the server does not speak TLS here (a plaintext port? use tcp://)"
    return f"the TLS handshake failed: {reason}"


class TLSStream:
    """A TLS client connection over the connected blocking ``sock`` (see the module docstring).

    The handshake runs in the constructor, bounded by ``timeout`` seconds.

    Raises (on construction):
        ssl.SSLError: the handshake failed (a certificate refused, no common
            protocol, a plaintext server).
        TimeoutError: no handshake within ``timeout``.
        ConnectionError: the server closed the connection during the handshake.
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str, timeout: float
    ) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._state = threading.Lock()  # the SSLObject and its BIOs
        self._wire = threading.Lock()  # taken before _state: records leave in order
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no TLS handshake in time") from None
                sock.settimeout(left)
                self._pull()
        self._flush()

    @property
    def version(self) -> str | None:
        """The TLS version negotiated ("TLSv1.3")."""
        return self._tls.version()

    def _flush(self) -> None:
        """Send what the TLS layer produced, in order."""
        with self._wire:
            with self._state:
                data = self._outgoing.read()
            if data:
                self._sock.sendall(data)

    def _pull(self) -> None:
        """Receive bytes from the socket into the TLS layer (EOF included)."""
        data = self._sock.recv(_RECV)
        with self._state:
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()

    def recv_into(self, view: memoryview | bytearray) -> int:
        """Decrypted bytes into ``view``; 0 at EOF. Raises TimeoutError as the socket does."""
        while True:
            with self._state:
                try:
                    # With a buffer, read() returns a count (typeshed says bytes).
                    n = cast(int, self._tls.read(len(view), view))
                except ssl.SSLWantReadError:
                    n = -1
                except ssl.SSLZeroReturnError:
                    n = 0
                pending = self._outgoing.pending
            if pending:
                self._flush()  # a key update or session ticket answer
            if n >= 0:
                return n
            self._pull()

    def recv(self, size: int) -> bytes:
        """Up to ``size`` decrypted bytes; b"" at EOF."""
        buffer = bytearray(size)
        return bytes(buffer[: self.recv_into(buffer)])

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``."""
        with self._wire:
            with self._state:
                self._tls.write(data)
                out = self._outgoing.read()
            self._sock.sendall(out)

    def settimeout(self, timeout: float | None) -> None:
        """The socket's timeout (for receiving and sending)."""
        self._sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        """Shut the socket down (wakes a reader blocked in recv)."""
        self._sock.shutdown(how)

    def close(self) -> None:
        """Close the socket (no TLS close_notify: the peer sees the TCP close)."""
        self._sock.close()
