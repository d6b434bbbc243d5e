"""Parent-side helpers shared by the examples and tests/test_examples.py.

- the known memory pattern and per-page digests (what the workers report);
- ``spawn_worker`` / ``spawn_restore`` / ``finish_worker``: run
  ``_worker.py`` (the restored process) and collect its JSON line;
- ``DaemonProcess`` / ``ServerProcess``: ``python -m uffd handler`` and
  ``python -m uffd serve`` as subprocesses, with bounded waits for their
  "listening on" line and their reports;
- ``DaemonThread``: the same daemon in this process (``uffd.restore.daemon.HandlerDaemon``).

Every wait here is bounded; a child that does not answer in time is killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAGE = mmap.PAGESIZE
HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"
DIGEST = 8


def parse_size(text: str) -> int:
    """``16M``, ``256MiB``, ``4096``, ``0x1000`` -> bytes (whole pages)."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = int(text[:-1] if scale > 1 else text, 0) * scale
    if number <= 0 or number % PAGE:
        raise ValueError(f"{text}: not a positive multiple of the {PAGE}-byte page size")
    return number


# -- the known pattern and digests --------------------------------------------------


def pattern_page(index: int, seed: int = 0, page_size: int = PAGE) -> bytes:
    """Page ``index`` of the pattern: its index and the seed, repeated; every 16th page zero."""
    if index % 16 == 15:
        return bytes(page_size)
    return struct.pack("<QQ", index, seed ^ 0x5AFEC0DE) * (page_size // 16)


def pattern(size: int, seed: int = 0, page_size: int = PAGE) -> bytearray:
    """``size`` bytes of the pattern."""
    out = bytearray(size)
    for index in range(size // page_size):
        if index % 16 != 15:
            out[index * page_size : (index + 1) * page_size] = pattern_page(index, seed, page_size)
    return out


def page_digest(data: bytes | memoryview) -> bytes:
    """The per-page checksum the workers report: BLAKE2b, 8 bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST).digest()


def digests_of(buffer: bytes | bytearray | memoryview, page_size: int = PAGE) -> bytes:
    """Per-page digests of a buffer, concatenated."""
    view = memoryview(buffer)
    return b"".join(page_digest(view[i : i + page_size]) for i in range(0, len(view), page_size))


def digests_of_source(path: str | os.PathLike[str], length: int, offset: int = 0) -> bytes:
    """Per-page digests of ``length`` bytes at ``offset`` of a snapshot's (or raw file's) image."""
    from uffd.restore.daemon import FileSource

    source = FileSource(os.fspath(path))
    try:
        out = []
        step = 4 << 20
        for start in range(offset, offset + length, step):
            out.append(digests_of(source.read(start, min(step, offset + length - start))))
        return b"".join(out)
    finally:
        source.close()


def combined(digests: bytes) -> str:
    """The digest of a whole memory image: BLAKE2b-128 of its page digests (what workers print)."""
    return hashlib.blake2b(digests, digest_size=16).hexdigest()


def wrong_pages(
    digests: str | os.PathLike[str], source: str | os.PathLike[str], size: int, offset: int = 0
) -> list[int]:
    """Pages whose digest in a worker's ``digests`` file differs from the source's image."""
    return bad_pages(read_digests(digests), digests_of_source(source, size, offset))


def bad_pages(got: bytes, want: bytes) -> list[int]:
    """Indices of the pages whose digests differ (every page if the lengths differ)."""
    if len(got) != len(want):
        return list(range(max(len(got), len(want)) // DIGEST))
    return [
        i // DIGEST
        for i in range(0, len(got), DIGEST)
        if got[i : i + DIGEST] != want[i : i + DIGEST]
    ]


# -- child processes ------------------------------------------------------------------


class _Lines:
    """Read lines from a pipe with a deadline (no thread, no blocking past it)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buf = b""
        self.eof = False

    def readline(self, timeout: float) -> str | None:
        """The next line, or None at EOF. Raises TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                if not self.buf:
                    return None
                line, self.buf = self.buf, b""
                return line.decode()
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"no line from the child within {timeout} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def spawn_worker(*args: str, stdin: bool = False) -> subprocess.Popen[bytes]:
    """Start ``_worker.py`` with ``args``; stdout piped (and stdin when asked)."""
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else None,
    )


def spawn_restore(
    socket_path: str | os.PathLike[str],
    size: int,
    *args: str,
    digests: str | os.PathLike[str] | None = None,
    stdin: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a ``restore`` worker: ``size`` bytes restored by the daemon at ``socket_path``.

    ``args`` are more worker options (``--order``, ``--seed``, ...); the page
    digests go to ``digests`` when given.
    """
    extra = ("--digests", os.fspath(digests)) if digests is not None else ()
    return spawn_worker(
        "restore",
        "--socket",
        os.fspath(socket_path),
        "--size",
        str(size),
        *args,
        *extra,
        stdin=stdin,
    )


def finish_worker(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> dict[str, Any]:
    """Wait for a worker (bounded), check it exited 0, return its last JSON line."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the worker exited with {proc.returncode}; its output: {out!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class ServerProcess:
    """``python -m uffd serve SNAPSHOT`` on loopback; ``url`` once it listens."""

    def __init__(
        self, snapshot: str | os.PathLike[str], *extra: str, timeout: float = 20.0
    ) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uffd", "serve", os.fspath(snapshot), *extra],
            stdout=subprocess.PIPE,
        )
        try:
            assert self.proc.stdout is not None
            line = _Lines(self.proc.stdout).readline(timeout) or ""
            if not line.startswith("listening on "):
                raise RuntimeError(f"the page server did not start: {line!r}")
        except BaseException:
            self.close()
            raise
        self.url = line.removeprefix("listening on ").strip()

    def kill(self) -> None:
        """SIGKILL the server (a crash) and reap it."""
        self.proc.kill()
        self.proc.wait(10.0)

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL), bounded."""
        _stop(self.proc)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaemonProcess:
    """``python -m uffd handler --json`` as a subprocess; stderr goes to ``log_path``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        source: str | os.PathLike[str],
        *extra: str,
        log_path: str | os.PathLike[str] | None = None,
        timeout: float = 20.0,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self.log_path = os.fspath(log_path) if log_path else None
        self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uffd",
                "handler",
                "--socket",
                self.socket_path,
                "--source",
                os.fspath(source),
                "--json",
                "--no-progress",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        assert self.proc.stdout is not None
        self._lines = _Lines(self.proc.stdout)
        try:
            line = self._lines.readline(timeout) or ""
            if not line.startswith("listening on "):
                raise RuntimeError(f"the daemon did not start: {line!r} {self.log()}")
        except BaseException:
            self.close()
            raise

    def reports(self, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The next ``count`` session reports (JSON lines), waiting at most ``timeout`` s."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            line = self._lines.readline(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise RuntimeError(f"the daemon exited before reporting: {self.log()}")
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(line)
                if "session" in doc:
                    out.append(doc["session"])
        return out

    def log(self) -> str:
        """What the daemon wrote on stderr so far."""
        if self.log_path is None:
            return ""
        if self._log is not None:
            self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the daemon to exit by itself (``--once``); its exit code."""
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL), bounded."""
        _stop(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaemonThread:
    """``uffd.restore.daemon.HandlerDaemon`` in this process, with DaemonProcess's ``reports``."""

    def __init__(self, socket_path: str | os.PathLike[str], source: str, **kwargs: Any) -> None:
        from uffd.restore.daemon import HandlerDaemon

        kwargs.setdefault("progress", False)
        self.daemon = HandlerDaemon(socket_path, source, **kwargs).start()
        self.socket_path = os.fspath(socket_path)
        self._seen = 0

    def reports(self, count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The next ``count`` session reports, as dicts."""
        got = self.daemon.wait_reports(self._seen + count, timeout)[self._seen :]
        self._seen += count
        return [r.to_json() for r in got]

    def close(self) -> None:
        """Stop the daemon and every session."""
        self.daemon.close()

    def __enter__(self) -> DaemonThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_digests(path: str | os.PathLike[str]) -> bytes:
    """The digests file a worker wrote."""
    return Path(path).read_bytes()
