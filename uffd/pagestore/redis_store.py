"""Chunks and manifests in Redis or Redis Cluster (redis-py): the store, push and pull.

A store URL is ``redis://[USER:PASSWORD@]HOST:PORT[/PREFIX][?OPTIONS]``
(``rediss://`` for TLS). OPTIONS are redis-py's (``ssl_ca_certs``...) and
the restore's chunk cache: ``cache=256M`` (the memory bound), ``cache_dir=``
(a directory shared by the processes of a host) and ``cache_scope=host``
(every session of a source shares its cache) or ``session``.
PREFIX is ``[NAMESPACE/]NAME``: the snapshot is the manifest at key
``NAMESPACE:manifest:NAME`` and its chunks are ``NAMESPACE:chunk:ID`` (the
namespace defaults to ``uffd``), so snapshots in one namespace share their
identical chunks. Chunk keys carry no hash tag, so Redis Cluster spreads
them over its slots and the load over its masters. Whether the server is a
cluster is asked once (``INFO cluster``); a cluster gets redis-py's
``RedisCluster``, which follows MOVED replies and re-reads the slot map
after a failover.

:func:`push` stores a snapshot: chunks first, pipelined EXISTS then SET for
the missing ones only (so pushing again, or after an interruption, uploads
only what is missing), the manifest last (a manifest in the store means its
chunks are there). :func:`pull` reads it back into a snapshot file, every
chunk checked against its id. Key layout and manifest: docs/chunkstore.md.

Transient failures (a refused or reset connection, a cluster still electing
a new master: CLUSTERDOWN, TRYAGAIN, a read-only former master) are retried
for up to ``retry_for`` seconds with a growing pause; other replies are not.

Requires the ``redis`` package: ``pip install 'pyuffd[redis]'``.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from uffd.pagestore.chunkstore import (
    DEFAULT_CHUNK_SIZE,
    Chunk,
    Manifest,
    ManifestError,
    cut,
    verify_chunk,
)
from uffd.pagestore.snapshot import open_source, write_snapshot

__all__ = [
    "MissingChunkError",
    "PullReport",
    "PushReport",
    "RedisChunkStore",
    "StoreError",
    "StoreURL",
    "parse_store_url",
    "pull",
    "push",
]

DEFAULT_NAMESPACE = "uffd"
DEFAULT_CACHE_BYTES = 256 << 20
# URL options that configure a restore's chunk cache, not redis-py.
_CACHE_OPTIONS = ("cache", "cache_dir", "cache_scope")
_BATCH_BYTES = 8 << 20  # data per pipeline: big enough to hide round trips, small for memory
_EXISTS_BATCH = 1024
_T = TypeVar("_T")


class StoreError(ConnectionError):
    """The store cannot be reached, or failed for longer than the retry budget."""


class MissingChunkError(StoreError):
    """A chunk or manifest the store should hold is not there (evicted, flushed, never pushed)."""


@dataclasses.dataclass(frozen=True)
class StoreURL:
    """A parsed store URL: where to connect, which keys, and the restore's chunk cache.

    ``connect`` is the URL redis-py gets (no path, our options removed);
    ``label`` is the URL without credentials or options, for messages.
    """

    connect: str
    namespace: str
    name: str | None
    label: str
    cache_bytes: int = 0
    cache_dir: str | None = None
    shared_cache: bool = True

    def chunk_key(self, cid: str) -> str:
        """The key of chunk ``cid``."""
        return f"{self.namespace}:chunk:{cid}"

    def manifest_key(self, name: str | None = None) -> str:
        """The key of the manifest of ``name`` (default: the URL's).

        Raises:
            ValueError: neither names a snapshot.
        """
        name = name or self.name
        if not name:
            raise ValueError(
                f"{self.label} names no snapshot: add it to the URL, e.g. {self.label}/NAME"
            )
        return f"{self.namespace}:manifest:{name}"

    def with_name(self, name: str) -> StoreURL:
        """The same store and namespace, snapshot ``name``."""
        return dataclasses.replace(self, name=name)


def parse_store_url(url: str) -> StoreURL:
    """Parse ``redis[s]://[USER:PASSWORD@]HOST:PORT[/[NAMESPACE/]NAME][?OPTIONS]``.

    Raises:
        ValueError: another scheme, no host, or an empty namespace or name.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(
            f"{url!r} is not a Redis store URL: use redis://HOST:PORT[/PREFIX] (rediss:// for TLS)"
        )
    path = parts.path.strip("/")
    if path and "" in path.split("/"):
        raise ValueError(f"{url!r}: the PREFIX is [NAMESPACE/]NAME, with no empty part")
    namespace, _, name = path.rpartition("/")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _CACHE_OPTIONS}
    theirs = urllib.parse.urlencode([(k, v) for k, v in query if k not in _CACHE_OPTIONS])
    connect = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "", theirs, ""))
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    label = f"{parts.scheme}://{host}" + (f"/{path}" if path else "")
    return StoreURL(
        connect,
        namespace or DEFAULT_NAMESPACE,
        name or None,
        label,
        cache_bytes=_size(ours.get("cache", str(DEFAULT_CACHE_BYTES)), url),
        cache_dir=ours.get("cache_dir") or None,
        shared_cache=_scope(ours.get("cache_scope", "host"), url),
    )


def _size(text: str, url: str) -> int:
    """``256M``, ``1G``, ``65536`` -> bytes (a cache bound in a URL).

    Raises:
        ValueError: not a non-negative size.
    """
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{url!r}: cache={text!r} is not a size such as 256M or 1G")
    return value


def _scope(text: str, url: str) -> bool:
    """``host`` (one cache for every session of the source) -> True, ``session`` -> False."""
    if text not in ("host", "session"):
        raise ValueError(f"{url!r}: cache_scope={text!r} must be 'host' or 'session'")
    return text == "host"


def _redis() -> Any:
    """The redis-py package.

    Raises:
        StoreError: it is not installed.
    """
    try:
        import redis
    except ImportError:
        raise StoreError("a Redis store needs redis-py: pip install 'pyuffd[redis]'") from None
    return redis


def _transient() -> tuple[type[BaseException], ...]:
    """The redis-py errors worth retrying: connections and a cluster in failover."""
    ex = _redis().exceptions
    return (
        ex.ConnectionError,
        ex.TimeoutError,
        ex.ClusterDownError,
        ex.TryAgainError,
        ex.ReadOnlyError,
        ex.ClusterError,
        ex.MasterDownError,
        ConnectionError,
        TimeoutError,
    )


class RedisChunkStore:
    """One client (its own connections) to a Redis or Redis Cluster chunk store.

    Each thread gets its own connection from redis-py's pool; two stores
    never share connections, which is how a restore keeps its faults' GETs
    off the connections bulk prefetch is using.

    Calling context: any thread.

    Raises (constructor):
        StoreError: redis-py missing, or the server cannot be reached.
        ValueError: a malformed URL.
    """

    def __init__(
        self, url: str | StoreURL, *, timeout: float = 5.0, retry_for: float = 10.0
    ) -> None:
        self.url = url if isinstance(url, StoreURL) else parse_store_url(url)
        self.retry_for = retry_for
        redis = _redis()
        self._transient = _transient()
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        try:
            probe = redis.Redis.from_url(self.url.connect, **options)
            try:
                cluster = bool(probe.info("cluster").get("cluster_enabled"))
            finally:
                probe.close()
            if cluster:
                self.client: Any = redis.RedisCluster.from_url(self.url.connect, **options)
            else:
                self.client = redis.Redis.from_url(self.url.connect, **options)
        except redis.exceptions.RedisError as err:
            raise StoreError(f"{self.url.label}: {type(err).__name__}: {err}") from err
        self.cluster = cluster
        self.retries = 0

    def _retrying(self, what: str, call: Callable[[], _T]) -> _T:
        """``call()``, retried on transient errors for up to ``retry_for`` seconds.

        Raises:
            StoreError: still failing at the end, or a reply that is an error.
        """
        give_up = time.monotonic() + self.retry_for
        pause = 0.02
        while True:
            try:
                return call()
            except self._transient as err:
                if time.monotonic() + pause > give_up:
                    raise StoreError(
                        f"{self.url.label}: {what} failed for {self.retry_for:g} s: "
                        f"{type(err).__name__}: {err}"
                    ) from err
                self.retries += 1
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
            except _redis().exceptions.RedisError as err:
                raise StoreError(f"{self.url.label}: {what}: {type(err).__name__}: {err}") from err

    def _pipelined(self, what: str, fill: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``fill(pipeline)`` queues in one pipeline (retried as a whole)."""

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            fill(pipe)
            return list(pipe.execute())

        return self._retrying(what, run)

    def get_manifest(self, name: str | None = None) -> Manifest:
        """The manifest of snapshot ``name`` (default: the URL's).

        Raises:
            MissingChunkError: no such snapshot in the store.
            ManifestError: it is malformed or of another version.
            StoreError, ValueError: as for the other calls; no name given.
        """
        key = self.url.manifest_key(name)
        data = self._retrying("GET manifest", lambda: self.client.get(key))
        if data is None:
            raise MissingChunkError(
                f"{self.url.label}: no snapshot manifest at key {key!r}; push one with "
                "'uffd snapshot push SNAPSHOT URL'"
            )
        return Manifest.from_json(data, f"{self.url.label} key {key!r}")

    def put_manifest(self, manifest: Manifest, name: str | None = None) -> None:
        """Store the manifest of snapshot ``name`` (default: the URL's), replacing an old one."""
        key = self.url.manifest_key(name)
        data = manifest.to_json()
        self._retrying("SET manifest", lambda: self.client.set(key, data))

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids among ``ids`` that the store does not hold (pipelined EXISTS)."""
        out: list[str] = []
        for start in range(0, len(ids), _EXISTS_BATCH):
            batch = ids[start : start + _EXISTS_BATCH]

            def fill(pipe: Any, batch: Sequence[str] = batch) -> None:
                for cid in batch:
                    pipe.exists(self.url.chunk_key(cid))

            found = self._pipelined("EXISTS", fill)
            out.extend(cid for cid, n in zip(batch, found, strict=True) if not n)
        return out

    def put(self, chunks: Sequence[tuple[str, bytes]]) -> None:
        """Store chunks ``(id, bytes)`` in one pipeline of SETs."""

        def fill(pipe: Any) -> None:
            for cid, data in chunks:
                pipe.set(self.url.chunk_key(cid), data)

        self._pipelined("SET", fill)

    def get(self, cid: str) -> bytes:
        """The bytes stored for chunk ``cid`` (one GET; not verified here).

        Raises:
            MissingChunkError: the store has no such chunk.
            StoreError: as for the other calls.
        """
        key = self.url.chunk_key(cid)
        data: bytes | None = self._retrying("GET", lambda: self.client.get(key))
        if data is None:
            raise self._missing(cid)
        return data

    def get_many(self, ids: Sequence[str]) -> list[bytes]:
        """The bytes stored for each of ``ids``, in one pipeline of GETs (not verified here).

        Raises:
            MissingChunkError: the store lacks one of them.
            StoreError: as for the other calls.
        """

        def fill(pipe: Any) -> None:
            for cid in ids:
                pipe.get(self.url.chunk_key(cid))

        got = self._pipelined("GET", fill)
        for cid, data in zip(ids, got, strict=True):
            if data is None:
                raise self._missing(cid)
        return got

    def _missing(self, cid: str) -> MissingChunkError:
        return MissingChunkError(
            f"{self.url.label}: chunk {cid[:16]}... ({self.url.chunk_key(cid)}) is not in the "
            "store (evicted or flushed?); push the snapshot again"
        )

    def close(self) -> None:
        """Close the connections (idempotent)."""
        self.client.close()


@dataclasses.dataclass
class PushReport:
    """What :func:`push` did: chunks in the image, stored, uploaded now, bytes and time."""

    name: str
    manifest_key: str
    image_bytes: int
    chunks: int
    zero_chunks: int
    distinct_chunks: int
    uploaded_chunks: int
    uploaded_bytes: int
    elapsed: float


@dataclasses.dataclass
class PullReport:
    """What :func:`pull` did: the file written, chunks fetched and verified, bytes, time."""

    path: str
    chunks: int
    fetched_bytes: int
    elapsed: float


def _default_name(path: str) -> str:
    base = os.path.basename(path)
    stem, _, _ = base.partition(".")
    return stem or base


def push(
    path: str | os.PathLike[str],
    url: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_bytes: int = _BATCH_BYTES,
    timeout: float = 5.0,
) -> PushReport:
    """Store the snapshot (or raw memory file) at ``path`` in the store at ``url``.

    The snapshot name is the URL's, or the file's name up to its first dot.
    Idempotent and resumable: only chunks the store lacks are uploaded, and
    the manifest is written last.

    Calling context: any thread; blocks for the upload.

    Raises:
        SnapshotError, OSError: the file cannot be read.
        ManifestError: ``chunk_size`` is not whole pages in range.
        StoreError: the store cannot be reached or failed.
        ValueError: a malformed URL.
    """
    t0 = time.monotonic()
    target = parse_store_url(url)
    name = target.name or _default_name(os.fspath(path))
    target = target.with_name(name)
    store = RedisChunkStore(target, timeout=timeout)
    reader = open_source(path)
    try:
        ids: list[list[str | None]] = [[] for _ in reader.regions]
        seen: set[str] = set()
        batch: dict[str, bytes] = {}
        held = 0
        uploaded = [0, 0]

        def flush() -> None:
            nonlocal held
            todo = store.missing(list(batch))
            if todo:
                store.put([(cid, batch[cid]) for cid in todo])
            uploaded[0] += len(todo)
            uploaded[1] += sum(len(batch[cid]) for cid in todo)
            batch.clear()
            held = 0

        for region, cid, data in cut(reader, chunk_size):
            ids[region].append(cid)
            if cid is None or data is None or cid in seen:
                continue
            seen.add(cid)
            batch[cid] = data
            held += len(data)
            if held >= batch_bytes:
                flush()
        if batch:
            flush()
        manifest = Manifest.build(reader, chunk_size, ids)
        store.put_manifest(manifest)
    finally:
        reader.close()
        store.close()
    chunks = len(manifest.chunks)
    return PushReport(
        name=name,
        manifest_key=target.manifest_key(),
        image_bytes=manifest.length,
        chunks=chunks,
        zero_chunks=sum(1 for c in manifest.chunks if c.id is None),
        distinct_chunks=len(seen),
        uploaded_chunks=uploaded[0],
        uploaded_bytes=uploaded[1],
        elapsed=time.monotonic() - t0,
    )


def pull(
    url: str,
    path: str | os.PathLike[str],
    *,
    batch_bytes: int = _BATCH_BYTES,
    timeout: float = 5.0,
) -> PullReport:
    """Write the snapshot stored at ``url`` to a snapshot file at ``path``, every chunk verified.

    The file is written atomically (``write_snapshot``); memory use is the
    image's present bytes (zero chunks are never fetched nor touched).

    Raises:
        ChunkError: a chunk does not hash to its id (nothing is written).
        MissingChunkError: the manifest or a chunk is not in the store.
        ManifestError: the manifest is malformed.
        StoreError: the store cannot be reached or failed.
        OSError: the file cannot be written.
        ValueError: a malformed URL, or one without a snapshot name.
    """
    t0 = time.monotonic()
    store = RedisChunkStore(url, timeout=timeout)
    try:
        manifest = store.get_manifest()
        # The flat image (regions end to end), where the manifest's chunks lie.
        image = mmap.mmap(-1, max(manifest.length, 1))
        places: dict[str, list[Chunk]] = {}
        for chunk in manifest.chunks:
            if chunk.id is not None:
                places.setdefault(chunk.id, []).append(chunk)
        ids = list(places)
        per_batch = max(1, batch_bytes // manifest.chunk_size)
        fetched = 0
        for start in range(0, len(ids), per_batch):
            batch = ids[start : start + per_batch]
            for cid, data in zip(batch, store.get_many(batch), strict=True):
                verify_chunk(cid, data, store.url.label)
                fetched += len(data)
                for chunk in places[cid]:
                    if len(data) != chunk.length:
                        raise ManifestError(
                            f"{store.url.label}: chunk {cid[:16]}... is {len(data)} bytes where "
                            f"the manifest places {chunk.length} at image offset {chunk.flat}"
                        )
                    image[chunk.flat : chunk.flat + chunk.length] = data
        flat = memoryview(image)
        regions: dict[str, memoryview] = {}
        at = 0
        for region in manifest.regions:
            regions[region.name] = flat[at : at + region.length]
            at += region.length
        try:
            write_snapshot(path, regions, page_size=manifest.page_size)
        finally:
            for view in regions.values():
                view.release()
            flat.release()
            image.close()
    finally:
        store.close()
    return PullReport(os.fspath(path), len(ids), fetched, time.monotonic() - t0)
