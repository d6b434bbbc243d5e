"""A snapshot in a Redis (Cluster) chunk store as a flat restore source: :class:`RedisSource`.

The same interface as :mod:`uffd.restore.sources` (``fetch``, ``read``,
``session``, ``remote``, ``label``, ``page_size``, ``length``, ``close``)
over the chunks and manifest :func:`uffd.pagestore.redis_store.push` wrote.

- A fault's read needs one chunk: from the host cache when it is there
  (answered at once, on the dispatch thread), else one GET on the *urgent*
  store connections, run by a small pool of threads that bulk prefetch
  never uses, so a fault never queues behind megabytes of prefetch.
- Prefetch reads (``urgent=False``) fetch their missing chunks with one
  pipeline of GETs on the *bulk* connections.
- Every chunk is hashed and compared with its id before it is used; a
  corrupt or substituted chunk is refused (the read fails with
  :class:`ChunkRefusedError`, so the fault gets the session's fallback and
  the error is in its report) and counted in ``stats.refused``.
- All-zero chunks are never fetched: the manifest says which they are
  (``zero_runs``, which prefetch maps the zero page over).
- Chunks fetched once are kept in the host cache
  (:class:`uffd.pagestore.chunkcache.ChunkCache`) that every session of the
  source shares, and optionally in a directory that other processes share.
- Reads in flight are shared: a second read of a chunk being fetched waits
  for that fetch (a fault only for an urgent one).

Store failures (a killed master while its replica is promoted) are retried
by :class:`uffd.pagestore.redis_store.RedisChunkStore` for up to
``timeout`` seconds; a faulting thread waits at most the FaultHandler's
deadline, then gets the fallback.

Calling context: any thread. Futures complete on the source's worker threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from collections.abc import Sequence

from uffd.pagestore.chunkcache import ChunkCache
from uffd.pagestore.chunkstore import Chunk, ChunkError, verify_chunk
from uffd.pagestore.redis_store import RedisChunkStore, StoreError, StoreURL, parse_store_url
from uffd.restore.sources import SourceError

__all__ = ["ChunkRefusedError", "RedisSource", "RedisSourceStats"]

log = logging.getLogger("uffd.restore.daemon")

_URGENT_WORKERS = 4  # GETs for faults in flight at once (one connection each)
_BULK_WORKERS = 2  # prefetch pipelines in flight at once
_PEER_WAIT_URGENT = 0.05  # seconds a fault waits for another process fetching its chunk
_PEER_WAIT_BULK = 2.0


class ChunkRefusedError(SourceError):
    """A chunk from the store did not hash to its id and was refused."""


@dataclasses.dataclass
class RedisSourceStats:
    """What a source fetched: chunks and bytes from the store, GETs, pipelines, refusals."""

    fetched_chunks: int = 0
    fetched_bytes: int = 0
    urgent_gets: int = 0
    pipelines: int = 0
    refused: int = 0
    peer_waits: int = 0


class RedisSource:
    """A snapshot stored in Redis or Redis Cluster, as one flat image.

    ``url``: ``redis[s]://HOST:PORT/[NAMESPACE/]NAME[?cache=..&cache_dir=..&cache_scope=..]``
    (see :mod:`uffd.pagestore.redis_store`). ``timeout``: seconds a read may
    take, store retries included. ``cache``: a ChunkCache to use (and share)
    instead of the one the URL describes.

    Raises (constructor):
        SourceError: the store cannot be reached, or holds no such snapshot
            or a malformed manifest.
        ValueError: a malformed URL, or one without a snapshot name.
    """

    remote = True

    def __init__(
        self, url: str | StoreURL, *, timeout: float = 10.0, cache: ChunkCache | None = None
    ) -> None:
        self.url = url if isinstance(url, StoreURL) else parse_store_url(url)
        self.url.manifest_key()  # a URL without a snapshot name fails here, before connecting
        self.label = self.url.label
        self.timeout = timeout
        self.stats = RedisSourceStats()
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, bool], concurrent.futures.Future[bytes]] = {}
        self._closed = False
        self._stores: list[RedisChunkStore] = []
        try:
            self._urgent = self._connect()
            self._bulk = self._connect()
            self.manifest = self._urgent.get_manifest()
            self.cache = cache or ChunkCache(self.url.cache_bytes, self.url.cache_dir)
        except (StoreError, ValueError, OSError) as err:
            # Only connections exist yet: close() is for a source that was built.
            for store in self._stores:
                store.close()
            raise SourceError(f"{self.label}: {err}") from err
        self.page_size = self.manifest.page_size
        self.length = self.manifest.length
        self._urgent_pool = concurrent.futures.ThreadPoolExecutor(
            _URGENT_WORKERS, thread_name_prefix="uffd-redis-urgent"
        )
        self._bulk_pool = concurrent.futures.ThreadPoolExecutor(
            _BULK_WORKERS, thread_name_prefix="uffd-redis-bulk"
        )

    def _connect(self) -> RedisChunkStore:
        store = RedisChunkStore(self.url, timeout=min(self.timeout, 5.0), retry_for=self.timeout)
        self._stores.append(store)
        return store

    def session(self) -> RedisSource:
        """The source one session reads through: this one (its cache shared by every session).

        With ``cache_scope=session`` in the URL, a new source with its own
        connections and cache, which the caller closes.

        Raises:
            SourceError: a new source could not connect.
        """
        if self.url.shared_cache:
            return self
        return RedisSource(self.url, timeout=self.timeout)

    def fetch(
        self, offset: int, length: int, *, urgent: bool = True
    ) -> concurrent.futures.Future[bytes]:
        """Start reading the flat range; the future gets the bytes or a SourceError.

        Done at once when every chunk it needs is zero or in memory, or when
        the source is closed (then with the error).

        Calling context: any thread; never blocks on the store (the fault
        path's dispatch thread calls it, the pools do the GETs).
        """
        chunks = self.manifest.covering(offset, length)
        parts: list[bytes | concurrent.futures.Future[bytes] | None] = []
        wanted: list[str] = []
        for chunk in chunks:
            if chunk.id is None:
                parts.append(None)
                continue
            data = self.cache.in_memory(chunk.id)
            if data is None:
                wanted.append(chunk.id)
            parts.append(data)
        if wanted:
            try:
                flights = self._flights_for(list(dict.fromkeys(wanted)), urgent)
            except SourceError as err:
                failed: concurrent.futures.Future[bytes] = concurrent.futures.Future()
                failed.set_exception(err)
                return failed
            parts = [
                flights[c.id] if part is None and c.id is not None else part
                for c, part in zip(chunks, parts, strict=True)
            ]
        return _assemble(chunks, parts, offset, length)

    def zero_runs(self) -> list[tuple[int, int]]:
        """The flat runs ``(offset, length)`` of the all-zero chunks (from the manifest).

        Prefetch maps the zero page over them in bulk at session start, so
        they cost neither a fault nor memory of their own.
        """
        runs: list[tuple[int, int]] = []
        for chunk in self.manifest.chunks:
            if chunk.id is not None:
                continue
            if runs and runs[-1][0] + runs[-1][1] == chunk.flat:
                runs[-1] = (runs[-1][0], runs[-1][1] + chunk.length)
            else:
                runs.append((chunk.flat, chunk.length))
        return runs

    def read(self, offset: int, length: int) -> bytes:
        """The bytes of the flat range, waiting at most ``timeout``.

        Raises:
            SourceError: the store failed, a chunk was refused, or no reply in time.
        """
        try:
            return self.fetch(offset, length).result(self.timeout)
        except concurrent.futures.TimeoutError:
            raise SourceError(f"{self.label}: no reply in {self.timeout} s") from None

    def _flights_for(
        self, ids: Sequence[str], urgent: bool
    ) -> dict[str, concurrent.futures.Future[bytes]]:
        """A future per chunk id: a fetch in flight already, or a new one started here.

        An urgent read joins only urgent fetches (a prefetch pipeline may
        hold megabytes ahead of it); a prefetch read joins any.

        Raises:
            SourceError: the source is closed.
        """
        out: dict[str, concurrent.futures.Future[bytes]] = {}
        new: list[str] = []
        with self._lock:
            if self._closed:
                raise SourceError(f"{self.label}: the source is closed")
            for cid in ids:
                flight = self._flights.get((cid, True))
                if flight is None and not urgent:
                    flight = self._flights.get((cid, False))
                if flight is None:
                    flight = concurrent.futures.Future()
                    self._flights[(cid, urgent)] = flight
                    new.append(cid)
                out[cid] = flight
        try:
            if urgent:
                for cid in new:
                    self._urgent_pool.submit(self._fetch_urgent, cid, out[cid])
            elif new:
                self._bulk_pool.submit(self._fetch_bulk, new, {cid: out[cid] for cid in new})
        except RuntimeError:  # close() shut the pools after the check above
            for cid in new:
                self._finish(cid, urgent, out[cid], SourceError(f"{self.label}: closed"))
        return out

    def _fetch_urgent(self, cid: str, flight: concurrent.futures.Future[bytes]) -> None:
        """One chunk for a fault: the cache, another process's fetch, or one GET."""
        claimed = False
        try:
            data, claimed = self._cached(cid, _PEER_WAIT_URGENT)
            if data is None:
                with self._lock:
                    self.stats.urgent_gets += 1
                data = self._verified(cid, self._urgent.get(cid))
            self._finish(cid, True, flight, data)
        except BaseException as err:
            self._finish(cid, True, flight, err)
        finally:
            if claimed:
                self.cache.release(cid)

    def _fetch_bulk(
        self, ids: list[str], flights: dict[str, concurrent.futures.Future[bytes]]
    ) -> None:
        """Chunks for prefetch: the cache, other processes' fetches, then one pipeline of GETs."""
        todo: list[str] = []
        mine: list[str] = []
        try:
            for cid in ids:
                try:
                    data, claimed = self._cached(cid, _PEER_WAIT_BULK)
                except BaseException as err:
                    self._finish(cid, False, flights[cid], err)
                    continue
                if data is None:
                    todo.append(cid)
                    if claimed:
                        mine.append(cid)
                else:
                    self._finish(cid, False, flights[cid], data)
            if todo:
                self._pipeline(todo, flights)
        finally:
            for cid in mine:
                self.cache.release(cid)

    def _pipeline(
        self, ids: list[str], flights: dict[str, concurrent.futures.Future[bytes]]
    ) -> None:
        """Fetch ``ids`` in one pipeline of GETs, verify each, complete their flights."""
        try:
            with self._lock:
                self.stats.pipelines += 1
            got = self._bulk.get_many(ids)
        except BaseException as err:
            for cid in ids:
                self._finish(cid, False, flights[cid], err)
            return
        for cid, raw in zip(ids, got, strict=True):
            try:
                self._finish(cid, False, flights[cid], self._verified(cid, raw))
            except BaseException as err:
                self._finish(cid, False, flights[cid], err)

    def _cached(self, cid: str, peer_wait: float) -> tuple[bytes | None, bool]:
        """The chunk from the cache or from a process fetching it now, and whether we claimed it.

        ``(None, True)``: fetch it, then ``cache.release`` the claim.
        """
        data = self.cache.get(cid)
        if data is not None:
            return data, False
        if self.cache.claim(cid):
            return None, True
        with self._lock:
            self.stats.peer_waits += 1
        data = self.cache.wait(cid, peer_wait)
        if data is not None:
            return data, False
        return None, self.cache.claim(cid)  # the peer is slow or gone: fetch it ourselves

    def _verified(self, cid: str, data: bytes) -> bytes:
        """``data`` if it is chunk ``cid``; counted in ``stats`` either way.

        Raises:
            ChunkRefusedError: it hashes to another id.
        """
        try:
            verify_chunk(cid, data, self.label)
        except ChunkError as err:
            with self._lock:
                self.stats.refused += 1
            raise ChunkRefusedError(str(err)) from err
        with self._lock:
            self.stats.fetched_chunks += 1
            self.stats.fetched_bytes += len(data)
        self.cache.put(cid, data)
        return data

    def _finish(
        self,
        cid: str,
        urgent: bool,
        flight: concurrent.futures.Future[bytes],
        outcome: bytes | BaseException,
    ) -> None:
        """Complete a fetch: forget the flight and set its future (unless close() failed it)."""
        with self._lock:
            if self._flights.get((cid, urgent)) is flight:
                del self._flights[(cid, urgent)]
        if isinstance(outcome, BaseException) and not isinstance(outcome, SourceError):
            outcome = SourceError(f"{self.label}: {type(outcome).__name__}: {outcome}")
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if isinstance(outcome, BaseException):
                flight.set_exception(outcome)
            else:
                flight.set_result(outcome)

    def summary(self) -> str:
        """One line: what this source fetched, from where, and what it refused or retried."""
        st, cache = self.stats, self.cache.stats
        return (
            f"{self.label}: {st.fetched_chunks} chunks ({st.fetched_bytes / 1e6:.1f} MB) "
            f"fetched by {st.urgent_gets} urgent GETs and {st.pipelines} pipelines, "
            f"{st.refused} refused, {st.peer_waits} waits for another process, "
            f"cache hits {cache.memory_hits} in memory and {cache.directory_hits} in the "
            f"directory ({cache.evicted} evicted), "
            f"{sum(s.retries for s in self._stores)} store retries"
        )

    def close(self) -> None:
        """Fail the reads in flight, stop the workers, close the connections (idempotent).

        Logs :meth:`summary` (INFO, logger ``uffd.restore.daemon``) the first time.
        """
        with self._lock:
            if not self._closed:
                log.info("%s", self.summary())
            self._closed = True
            flights, self._flights = list(self._flights.values()), {}
        for flight in flights:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                flight.set_exception(SourceError(f"{self.label}: the source was closed"))
        for pool in (self._urgent_pool, self._bulk_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        for store in self._stores:
            store.close()


def _assemble(
    chunks: Sequence[Chunk],
    parts: Sequence[bytes | concurrent.futures.Future[bytes] | None],
    offset: int,
    length: int,
) -> concurrent.futures.Future[bytes]:
    """A future of the flat range's bytes once every chunk's part is there (None: zeros)."""
    out: concurrent.futures.Future[bytes] = concurrent.futures.Future()
    pending = [p for p in parts if isinstance(p, concurrent.futures.Future)]
    left = [len(pending)]
    lock = threading.Lock()

    def build() -> None:
        pieces: list[bytes] = []
        end = offset + length
        for chunk, part in zip(chunks, parts, strict=True):
            lo = max(offset, chunk.flat) - chunk.flat
            hi = min(end, chunk.flat + chunk.length) - chunk.flat
            if part is None:
                pieces.append(bytes(hi - lo))
                continue
            data = part.result() if isinstance(part, concurrent.futures.Future) else part
            pieces.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
        out.set_result(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def done(future: concurrent.futures.Future[bytes]) -> None:
        with lock:
            left[0] -= 1
            if out.done():
                return
            err = future.exception()
            if err is not None:
                out.set_exception(err)
                return
            if left[0]:
                return
        build()

    if not pending:
        build()
    for future in pending:
        future.add_done_callback(done)
    return out
