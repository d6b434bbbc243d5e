"""A host's cache of verified chunks: memory (bounded, LRU) and optionally a directory.

Every restore session a source serves shares its memory cache, so one
daemon restoring N processes of one image fetches each chunk about once.
Separate processes (several daemons, or restores through the Python API)
share a chunk directory instead; that is the simple honest answer for
processes that share nothing else: each chunk is a file named by its id,
written to a temporary name and renamed into place (a reader sees a whole
chunk or none), and read back verified against its id. To fetch a chunk
about once across processes, the first one to want it creates a marker
file (``O_EXCL``) and fetches; the others wait for the chunk file, for a
bounded time, then fetch it themselves (a marker left by a dead process
is ignored once it is older than ``stale_after``).

Calling context: any thread; one lock guards the memory part, and the
directory part relies on atomic rename and ``O_EXCL``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import tempfile
import threading
import time

from uffd.pagestore.chunkstore import ChunkError, verify_chunk

__all__ = ["CacheStats", "ChunkCache"]

_POLL = 0.002  # seconds between looks for a chunk another process is fetching


@dataclasses.dataclass
class CacheStats:
    """Lookups served from memory, from the directory, missed; chunks that failed their id."""

    memory_hits: int = 0
    directory_hits: int = 0
    misses: int = 0
    corrupt: int = 0
    evicted: int = 0


class ChunkCache:
    """Chunks by id: at most ``max_bytes`` in memory, and all of them in ``directory`` if given.

    Only verified chunks are put in; chunks read from the directory are
    verified again (a file may have been damaged) and dropped if they fail.

    Raises (constructor):
        OSError: the directory cannot be created.
    """

    def __init__(
        self, max_bytes: int, directory: str | None = None, *, stale_after: float = 10.0
    ) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self.stale_after = stale_after
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._memory: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._held = 0
        if directory is not None:
            os.makedirs(directory, mode=0o700, exist_ok=True)

    def in_memory(self, cid: str) -> bytes | None:
        """The chunk if it is in memory (no I/O: fit for a fault's dispatch thread)."""
        with self._lock:
            data = self._memory.get(cid)
            if data is not None:
                self._memory.move_to_end(cid)
                self.stats.memory_hits += 1
            return data

    def get(self, cid: str) -> bytes | None:
        """The chunk from memory or the directory (verified), or None."""
        data = self.in_memory(cid)
        if data is not None or self.directory is None:
            if data is None:
                self._count_miss()
            return data
        data = self._read_file(cid)
        if data is None:
            self._count_miss()
            return None
        with self._lock:
            self.stats.directory_hits += 1
        self._remember(cid, data)
        return data

    def put(self, cid: str, data: bytes) -> None:
        """Keep a verified chunk: in memory (evicting the least recently used) and the directory.

        A failure to write the directory only loses the sharing, so it is
        not raised.
        """
        self._remember(cid, data)
        if self.directory is not None and not os.path.exists(self._path(cid)):
            with contextlib.suppress(OSError):
                self._write_file(cid, data)

    def claim(self, cid: str) -> bool:
        """True when this process should fetch ``cid``; False while another one is fetching it.

        Always True without a directory. A True claim must be ended with
        :meth:`release`.
        """
        if self.directory is None:
            return True
        marker = self._path(cid) + ".fetching"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - os.stat(marker).st_mtime > self.stale_after:
                    os.unlink(marker)  # its fetcher died: take over
                    return self.claim(cid)
            return False
        except OSError:
            return True

    def release(self, cid: str) -> None:
        """End a claim (the chunk was put, or the fetch failed)."""
        if self.directory is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path(cid) + ".fetching")

    def wait(self, cid: str, timeout: float) -> bytes | None:
        """The chunk once another process has put it in the directory, or None after ``timeout``."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            data = self._read_file(cid)
            if data is not None:
                self._remember(cid, data)
                return data
            if not os.path.exists(self._path(cid) + ".fetching"):
                return self._read_file(cid)  # the fetcher finished or gave up
            time.sleep(_POLL)
        return None

    def _count_miss(self) -> None:
        with self._lock:
            self.stats.misses += 1

    def _remember(self, cid: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if cid in self._memory:
                self._memory.move_to_end(cid)
                return
            self._memory[cid] = data
            self._held += len(data)
            while self._held > self.max_bytes:
                _, old = self._memory.popitem(last=False)
                self._held -= len(old)
                self.stats.evicted += 1

    def _path(self, cid: str) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, cid)

    def _read_file(self, cid: str) -> bytes | None:
        try:
            with open(self._path(cid), "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            verify_chunk(cid, data, f"the chunk cache {self.directory}")
        except ChunkError:
            with self._lock:
                self.stats.corrupt += 1
            with contextlib.suppress(OSError):
                os.unlink(self._path(cid))
            return None
        return data

    def _write_file(self, cid: str, data: bytes) -> None:
        assert self.directory is not None
        fd, tmp = tempfile.mkstemp(prefix=f".{cid[:16]}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(cid))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
