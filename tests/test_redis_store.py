"""The chunk store on real Redis: push/pull, dedup, verification, restores, cluster failover.

The servers are real ``redis-server`` processes on loopback ports, each in a
temporary directory (:mod:`uffd.bench.redis_servers`): one single node and
one 3-master + 3-replica cluster for the session, and a cluster of its own
for the failover test. Restored processes are real worker processes
(examples/_worker.py) served by the handler daemon, checked page by page.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffd.bench.redis_servers import MISSING, NODE_TIMEOUT_MS, RedisServers, redis_servers
from uffd.pagestore.chunkstore import ChunkError, Manifest, ManifestError, ManifestRegion, cut
from uffd.pagestore.snapshot import Snapshot, write_snapshot

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from _helpers import (  # noqa: E402
    DIGEST,
    PAGE,
    DaemonProcess,
    DaemonThread,
    _Lines,
    bad_pages,
    digests_of,
    finish_worker,
    pattern,
    read_digests,
    spawn_restore,
)

WAIT = 60.0
CHUNK = 256 << 10

try:
    import redis
except ImportError:
    redis = None

# Why the Redis tests cannot run here, or None.
NO_REDIS = MISSING or (
    "redis-py is not installed (pip install 'pyuffd[redis]')" if redis is None else None
)
needs_redis = pytest.mark.skipif(NO_REDIS is not None, reason=NO_REDIS or "")


def _servers(cluster: bool) -> Iterator[RedisServers]:
    if NO_REDIS:
        pytest.skip(NO_REDIS)
    with redis_servers(cluster=cluster) as servers:
        yield servers


@pytest.fixture(scope="session")
def single() -> Iterator[RedisServers]:
    """One redis-server for the session."""
    yield from _servers(cluster=False)


@pytest.fixture(scope="session")
def cluster() -> Iterator[RedisServers]:
    """A 3-master + 3-replica Redis Cluster for the session."""
    yield from _servers(cluster=True)


@pytest.fixture(params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> RedisServers:
    """Each test that takes it runs on the single node and on the cluster."""
    servers: RedisServers = request.getfixturevalue(request.param)
    return servers


def image(size: int, seed: int = 0, hole: tuple[int, int] | None = None) -> bytearray:
    """The pattern (every 16th page zero) with an optional all-zero ``(offset, length)`` hole."""
    data = pattern(size, seed)
    if hole is not None:
        data[hole[0] : hole[0] + hole[1]] = bytes(hole[1])
    return data


def unique(request: pytest.FixtureRequest) -> str:
    """A namespace of its own for one test (the servers are shared by the session)."""
    return hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]


def client(servers: RedisServers) -> redis.Redis:
    """A redis-py client to the servers (a cluster client for the cluster)."""
    if servers.cluster:
        return redis.RedisCluster.from_url(servers.url)
    return redis.Redis.from_url(servers.url)


def chunk_keys(servers: RedisServers, namespace: str) -> int:
    """How many chunk keys the namespace has (over every master)."""
    return len(list(client(servers).scan_iter(match=f"{namespace}:chunk:*", count=1000)))


def gets_served(servers: RedisServers) -> int:
    """GETs that found their key, summed over the masters (keyspace_hits)."""
    return sum(
        int(n.info("INFO", "stats").get("keyspace_hits", "0"))
        for n in servers.nodes
        if n.proc.poll() is None
    )


# -- pure parts: URL, manifest, cutting -------------------------------------------------------


def test_store_url_parts() -> None:
    """A store URL gives namespace and name, strips our cache options and the credentials."""
    from uffd.pagestore.redis_store import parse_store_url

    url = parse_store_url("rediss://u:secret@h:7000/fleet/a/w1?cache=64M&cache_scope=session&x=1")
    assert (url.namespace, url.name, url.cache_bytes, url.shared_cache) == (
        "fleet/a",
        "w1",
        64 << 20,
        False,
    )
    assert url.connect == "rediss://u:secret@h:7000?x=1"
    assert "secret" not in url.label and url.label == "rediss://h:7000/fleet/a/w1"
    assert url.chunk_key("ab") == "fleet/a:chunk:ab"
    assert url.manifest_key() == "fleet/a:manifest:w1"
    bare = parse_store_url("redis://h:1")
    assert bare.namespace == "uffd" and bare.name is None
    with pytest.raises(ValueError, match="names no snapshot"):
        bare.manifest_key()
    for bad in ("http://h:1/x", "redis:///x", "redis://h:1/a//b", "redis://h:1/x?cache=lots"):
        with pytest.raises(ValueError):
            parse_store_url(bad)


def test_manifest_round_trip_and_rejects() -> None:
    """A manifest survives JSON; wrong counts, ids, versions and sizes are refused by name."""
    ids = ("a" * 64, None, "b" * 64)
    m = Manifest(4096, 8192, (ManifestRegion("mem", 5 * 4096, ids),))
    back = Manifest.from_json(m.to_json(), "test")
    assert back == m and [c.length for c in back.chunks] == [8192, 8192, 4096]
    assert back.stored_ids() == ["a" * 64, "b" * 64]
    assert [c.flat for c in back.covering(8192, 8192)] == [8192]
    assert [c.flat for c in back.covering(4096, 16384)] == [0, 8192, 16384]
    with pytest.raises(ManifestError, match="chunk ids"):
        Manifest(4096, 8192, (ManifestRegion("mem", 5 * 4096, ids[:2]),))
    with pytest.raises(ManifestError, match="bad chunk id"):
        Manifest(4096, 8192, (ManifestRegion("mem", 4096, ("xyz",)),))
    with pytest.raises(ManifestError, match="multiple of the page size"):
        Manifest(4096, 6000, ())
    doc = json.loads(m.to_json())
    doc["version"] = 99
    with pytest.raises(ManifestError, match="version 99"):
        Manifest.from_json(json.dumps(doc).encode(), "test")
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.from_json(b'{"format": "pyuffd-chunks", "version": 1, "hash": "sha256"}', "t")


def test_cut_skips_zero_chunks(tmp_path: Path) -> None:
    """Cutting a snapshot: zero chunks (absent or zero pages) get no id, the rest hash right."""
    data = image(2 << 20, hole=(CHUNK, 2 * CHUNK))
    path = tmp_path / "s.snap"
    write_snapshot(path, {"a": bytes(data[: 1 << 20]), "b": bytes(data[1 << 20 :])})
    with Snapshot.open(path) as snap:
        out = list(cut(snap, CHUNK))
    assert [r for r, _, _ in out] == [0] * 4 + [1] * 4
    assert [cid is None for _, cid, _ in out] == [False, True, True] + [False] * 5
    for index, (_, cid, chunk) in enumerate(out):
        if cid is not None:
            assert chunk == data[index * CHUNK : (index + 1) * CHUNK]
            assert cid == hashlib.sha256(chunk).hexdigest()


# -- push and pull --------------------------------------------------------------------------


@needs_redis
def test_push_pull_round_trip(
    store: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Push then pull gives the same regions byte for byte; zero chunks are never stored."""
    from uffd.pagestore.redis_store import pull, push

    ns = unique(request)
    data = image(3 << 20, hole=(1 << 20, 1 << 20))
    src = tmp_path / "w.snap"
    # Region lengths that are not whole chunks: the last chunk of each is short.
    write_snapshot(
        src, {"a": bytes(data[: 1 << 20 | 12 << 10]), "b": bytes(data[1 << 20 | 12 << 10 :])}
    )
    report = push(src, f"{store.url}/{ns}/w", chunk_size=CHUNK)
    assert report.name == "w" and report.image_bytes == len(data)
    # a: 5 chunks, the short last one in the hole; b: 8 chunks, its first 3 in the hole.
    assert (report.chunks, report.zero_chunks) == (13, 4)
    assert report.uploaded_chunks == report.distinct_chunks == 9
    assert chunk_keys(store, ns) == report.distinct_chunks
    out = tmp_path / "back.snap"
    got = pull(f"{store.url}/{ns}/w", out)
    assert got.chunks == report.distinct_chunks
    with Snapshot.open(out) as back, Snapshot.open(src) as orig:
        assert [(r.name, r.length) for r in back.regions] == [
            (r.name, r.length) for r in orig.regions
        ]
        for r in orig.regions:
            assert back.read(r.name, 0, r.length) == orig.read(r.name, 0, r.length)


@needs_redis
def test_push_is_resumable_and_dedups(
    store: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Pushing again uploads nothing; lost chunks are re-uploaded alone; a second snapshot
    of the same worker with a few pages changed uploads only the chunks holding them."""
    from uffd.pagestore.redis_store import push

    ns = unique(request)
    data = image(2 << 20)
    first = tmp_path / "one.snap"
    write_snapshot(first, {"mem": bytes(data)})
    url = f"{store.url}/{ns}/one"
    report = push(first, url, chunk_size=CHUNK)
    assert report.uploaded_chunks == 8
    assert push(first, url, chunk_size=CHUNK).uploaded_chunks == 0
    r = client(store)
    lost = [k for k in r.scan_iter(match=f"{ns}:chunk:*")][:3]
    r.delete(*lost) if not store.cluster else [r.delete(k) for k in lost]
    again = push(first, url, chunk_size=CHUNK)
    assert (again.uploaded_chunks, again.uploaded_bytes) == (3, 3 * CHUNK)
    for page in (3, 200):  # pages in chunks 0 and 3
        data[page * PAGE] ^= 0xFF
    second = tmp_path / "two.snap"
    write_snapshot(second, {"mem": bytes(data)})
    two = push(second, f"{store.url}/{ns}/two", chunk_size=CHUNK)
    assert two.uploaded_chunks == 2 and chunk_keys(store, ns) == 10


@needs_redis
def test_cluster_spreads_chunks_over_masters(
    cluster: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On the cluster, a snapshot's chunks land on every master, none holding most of them."""
    from uffd.pagestore.redis_store import push

    ns = unique(request)
    path = tmp_path / "s.snap"
    write_snapshot(path, {"mem": bytes(image(8 << 20, seed=7))})
    push(path, f"{cluster.url}/{ns}/s", chunk_size=64 << 10)
    per_master = []
    for port in cluster.masters():
        node = redis.Redis(port=port)
        per_master.append(len(list(node.scan_iter(match=f"{ns}:chunk:*", count=1000))))
        node.close()
    assert sum(per_master) == 128
    assert all(8 <= n <= 96 for n in per_master), per_master


@needs_redis
def test_corrupt_chunk_is_refused(
    single: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A chunk substituted in the store is refused by pull (nothing written) and by a
    restore source (the read fails, the refusal counted); other chunks still read."""
    from uffd.pagestore.redis_store import pull, push
    from uffd.restore.redis_source import ChunkRefusedError, RedisSource

    ns = unique(request)
    data = image(1 << 20)
    path = tmp_path / "s.snap"
    write_snapshot(path, {"mem": bytes(data)})
    url = f"{single.url}/{ns}/s"
    push(path, url, chunk_size=CHUNK)
    with Snapshot.open(path) as snap:
        victim = hashlib.sha256(snap.read("mem", CHUNK, CHUNK)).hexdigest()
    client(single).set(f"{ns}:chunk:{victim}", bytes(image(CHUNK, seed=9)))
    out = tmp_path / "out.snap"
    with pytest.raises(ChunkError, match="corrupt or was substituted"):
        pull(url, out)
    assert not out.exists()
    source = RedisSource(url)
    try:
        with pytest.raises(ChunkRefusedError, match="refused"):
            source.read(CHUNK + PAGE, PAGE)
        assert source.stats.refused == 1
        assert source.read(0, PAGE) == data[:PAGE]
        assert source.read(3 * CHUNK, CHUNK) == data[3 * CHUNK : 4 * CHUNK]
    finally:
        source.close()


@needs_redis
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found (for a cert)")
def test_tls_push_pull_and_restore_source(tmp_path: Path) -> None:
    """Over rediss:// (TLS, the server's certificate trusted by ssl_ca_certs): push, pull,
    and a restore source reading with a cache option beside the TLS one."""
    from uffd.pagestore.redis_store import pull, push
    from uffd.restore.redis_source import RedisSource

    data = image(1 << 20)
    path = tmp_path / "s.snap"
    write_snapshot(path, {"mem": bytes(data)})
    with redis_servers(cluster=False, tls=True) as servers:
        assert servers.tls_url is not None
        base, _, query = servers.tls_url.partition("?")
        url = f"{base}/tls/s?{query}"
        assert push(path, url, chunk_size=CHUNK).uploaded_chunks == 4
        pull(url, tmp_path / "back.snap")
        source = RedisSource(f"{url}&cache=1M")
        try:
            assert source.read(0, len(data)) == data and source.cache.max_bytes == 1 << 20
        finally:
            source.close()
    with Snapshot.open(tmp_path / "back.snap") as back:
        assert back.read("mem", 0, len(data)) == data


@needs_redis
def test_missing_snapshot_says_what_to_do(single: RedisServers) -> None:
    """Opening a snapshot the store lacks fails with an error that says to push it."""
    from uffd.restore.sources import SourceError, open_flat_source

    with pytest.raises(SourceError, match="uffd snapshot push"):
        open_flat_source(f"{single.url}/nobody/none")


@needs_redis
def test_cli_push_and_pull(
    single: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``uffd snapshot push`` and ``pull`` through the console script; exit codes 0 and 1."""
    ns = unique(request)
    data = image(1 << 20)
    path = tmp_path / "s.snap"
    write_snapshot(path, {"mem": bytes(data)})
    url = f"{single.url}/{ns}/s"

    def uffd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "uffd", "snapshot", *args],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )

    done = uffd("push", str(path), url, "--chunk-size", "128K", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["uploaded_chunks"] == 8
    assert "0 of 8 chunks uploaded" in uffd("push", str(path), url, "--chunk-size", "128K").stdout
    out = tmp_path / "back.snap"
    assert uffd("pull", url, str(out)).returncode == 0
    with Snapshot.open(out) as back:
        assert back.read("mem", 0, len(data)) == data
    failed = uffd("pull", f"{single.url}/{ns}/nope", str(tmp_path / "x.snap"))
    assert failed.returncode == 1 and "no snapshot manifest" in failed.stderr


# -- restores ------------------------------------------------------------------------------


def pushed(servers: RedisServers, tmp_path: Path, ns: str, size: int) -> tuple[str, bytes]:
    """A pattern snapshot with a zero hole pushed under ``ns``; its URL and digests."""
    from uffd.pagestore.redis_store import push

    data = image(size, seed=3, hole=(size // 4, size // 8))
    path = tmp_path / "img.snap"
    write_snapshot(path, {"mem": bytes(data)})
    push(path, f"{servers.url}/{ns}/img", chunk_size=CHUNK)
    return f"{servers.url}/{ns}/img", digests_of(data)


@needs_redis
def test_daemon_restores_processes_from_the_cluster(
    cluster: RedisServers, tmp_path: Path, short_tmp: str, request: pytest.FixtureRequest
) -> None:
    """Four processes restored at once by one daemon from the cluster: every page right, and
    each stored chunk fetched from the cluster about once (the host cache)."""
    size = 4 << 20
    url, want = pushed(cluster, tmp_path, unique(request), size)
    sock = os.path.join(short_tmp, "h.sock")
    before = gets_served(cluster)
    with DaemonThread(sock, url, working_set=None, deadline=10.0) as daemon:
        procs = [
            spawn_restore(sock, size, "--seed", str(k), digests=tmp_path / f"d{k}")
            for k in range(4)
        ]
        results = [finish_worker(p, WAIT) for p in procs]
        reports = daemon.reports(4, WAIT)
        source = daemon.daemon.source
        stats, hits = source.stats, source.cache.stats.memory_hits
        summary = source.summary()
    for k, result in enumerate(results):
        assert result["sigbus"] == 0
        assert bad_pages(read_digests(tmp_path / f"d{k}"), want) == []
    assert all(r["errors"] == [] for r in reports)
    # The hole's zero chunks got the zero page in bulk, not a fetch nor a copy.
    assert all(r["zeroed"] > 0 for r in reports)
    stored = 14  # 16 chunks of 256 KiB, 2 of them in the zero hole
    # A fault does not wait behind a prefetch pipeline holding its chunk: it may GET it again.
    assert stored <= stats.fetched_chunks <= stored + stats.urgent_gets and stats.refused == 0
    assert gets_served(cluster) - before == stats.fetched_chunks + 1  # + the manifest
    assert hits > stats.fetched_chunks  # the other sessions' reads came from the host cache
    assert f"{stats.fetched_chunks} chunks" in summary and "0 refused" in summary


@needs_redis
def test_restore_refuses_a_substituted_chunk(
    single: RedisServers, tmp_path: Path, short_tmp: str, request: pytest.FixtureRequest
) -> None:
    """A restored process whose second chunk was substituted in the store: the pages before it
    are right, its pages get the fallback (zero), the refusal is counted and reported."""
    from uffd.pagestore.redis_store import RedisChunkStore

    size = 1 << 20
    url, want = pushed(single, tmp_path, unique(request), size)
    store = RedisChunkStore(url)
    victim = store.get_manifest().chunks[1].id
    assert victim is not None
    store.client.set(store.url.chunk_key(victim), bytes(image(CHUNK, seed=5)))
    store.close()
    sock = os.path.join(short_tmp, "h.sock")
    with DaemonThread(sock, url, working_set=None, prefetch=False, fallback="zero") as daemon:
        proc = spawn_restore(sock, size, "--order", "sequential", digests=tmp_path / "d")
        result = finish_worker(proc, WAIT)
        (report,) = daemon.reports(1, WAIT)
        refused = daemon.daemon.source.stats.refused
    got = read_digests(tmp_path / "d")
    split = CHUNK // PAGE * DIGEST
    assert bad_pages(got[:split], want[:split]) == []
    assert got[split : split + DIGEST] == digests_of(bytes(PAGE))
    assert result["sigbus"] == 0 and refused >= 1
    assert any("corrupt or was substituted" in e for e in report["errors"])


@needs_redis
def test_handler_command_serves_a_redis_source(
    single: RedisServers, tmp_path: Path, short_tmp: str, request: pytest.FixtureRequest
) -> None:
    """``uffd handler --source redis://...`` restores a process with every page right, and
    says on exit what it fetched."""
    size = 2 << 20
    url, want = pushed(single, tmp_path, unique(request), size)
    sock = os.path.join(short_tmp, "h.sock")
    with DaemonProcess(sock, url, "--no-working-set", log_path=tmp_path / "log") as daemon:
        result = finish_worker(spawn_restore(sock, size, digests=tmp_path / "d"), WAIT)
        (report,) = daemon.reports(1, WAIT)
    assert result["sigbus"] == 0 and report["errors"] == []
    assert bad_pages(read_digests(tmp_path / "d"), want) == []
    # On exit the daemon logs what the source fetched: the image's 7 stored chunks (one is
    # in the zero hole), plus those a fault fetched again beside a prefetch pipeline.
    log = (tmp_path / "log").read_text()
    got = re.search(r"redis://\S+: (\d+) chunks \(.* by (\d+) urgent GETs.* 0 refused", log)
    assert got is not None and 7 <= int(got.group(1)) <= 7 + int(got.group(2)), log


@needs_redis
def test_directory_cache_shares_chunks_between_processes(
    single: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Four processes reading one image through a shared cache directory fetch each chunk
    from Redis about once in total, and every byte they read is right."""
    size = 4 << 20
    url, _ = pushed(single, tmp_path, unique(request), size)
    cache = tmp_path / "cache"
    code = (
        "import sys, hashlib\n"
        "from uffd.restore.redis_source import RedisSource\n"
        "s = RedisSource(sys.argv[1])\n"
        "futs = [s.fetch(o, 1 << 20, urgent=False) for o in range(0, s.length, 1 << 20)]\n"
        "data = b''.join(f.result(30) for f in futs)\n"
        "print(hashlib.sha256(data).hexdigest(), s.stats.fetched_chunks)\n"
        "s.close()\n"
    )
    before = gets_served(single)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"{url}?cache_dir={cache}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=WAIT)[0].split() for p in procs]
    with Snapshot.open(tmp_path / "img.snap") as snap:
        digest = hashlib.sha256(snap.read("mem", 0, size)).hexdigest()
    assert [o[0] for o in outs] == [digest] * 4
    fetched = sum(int(o[1]) for o in outs)
    assert 14 <= fetched <= 14 + 4, fetched  # about once: a late peer may fetch a few again
    assert gets_served(single) - before <= fetched + 4  # + the four manifests


@needs_redis
def test_failover_mid_restore(tmp_path: Path, short_tmp: str) -> None:
    """A master is killed half way through a restore: its replica takes over, the faults
    waiting on its chunks are retried, and every page of the process is right."""
    from redis.crc import key_slot

    from uffd.pagestore.redis_store import RedisChunkStore

    size = 4 << 20
    with redis_servers(cluster=True) as servers:
        url, want = pushed(servers, tmp_path, "fo", size)
        servers.wait_replicated()
        store = RedisChunkStore(url)
        manifest = store.get_manifest()
        store.close()
        second_half = [
            store.url.chunk_key(c.id) for c in manifest.chunks if c.id and c.flat >= size // 2
        ]
        sock = os.path.join(short_tmp, "h.sock")
        pause = size // PAGE // 2
        with DaemonThread(sock, url, working_set=None, prefetch=False, deadline=10.0) as daemon:
            proc = spawn_restore(
                sock,
                size,
                "--order",
                "sequential",
                "--pause-after",
                str(pause),
                digests=tmp_path / "d",
                stdin=True,
            )
            assert proc.stdout is not None and proc.stdin is not None
            assert _Lines(proc.stdout).readline(WAIT) == f'{{"paused": {pause}}}'
            # Kill the master holding the most chunks of the half not read yet.
            slots = servers.slots()
            owners = [
                port
                for key in second_half
                for port, ranges in slots.items()
                if any(lo <= key_slot(key.encode()) <= hi for lo, hi in ranges)
            ]
            victim = max(set(owners), key=owners.count)
            servers.node(victim).kill()
            proc.stdin.write(b"\n")
            proc.stdin.flush()
            result = finish_worker(proc, WAIT)
            (report,) = daemon.reports(1, WAIT)
        assert result["sigbus"] == 0 and report["errors"] == []
        assert bad_pages(read_digests(tmp_path / "d"), want) == []
        assert victim not in servers.masters() and len(servers.masters()) == 3
        # The faults on the victim's chunks waited for the election, within the deadline.
        assert NODE_TIMEOUT_MS / 1000 <= report["complete"] < 10.0


@needs_redis
def test_faults_do_not_queue_behind_prefetch(
    single: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A fault's read of a chunk a prefetch pipeline is fetching does its own GET, not wait."""
    from uffd.restore.redis_source import RedisSource

    size = 16 << 20
    url, _ = pushed(single, tmp_path, unique(request), size)
    source = RedisSource(f"{url}?cache=0")
    try:
        bulk = [source.fetch(o, 4 << 20, urgent=False) for o in range(0, size, 4 << 20)]
        urgent = source.fetch(size - PAGE, PAGE)
        urgent.result(WAIT)
        assert source.stats.urgent_gets == 1
        concurrent.futures.wait(bulk, WAIT)
        assert all(f.exception() is None for f in bulk)
    finally:
        source.close()


@needs_redis
@pytest.mark.stress
def test_sixteen_processes_through_a_failover_long(tmp_path: Path, short_tmp: str) -> None:
    """16 processes restore 32 MiB each from the cluster while a master is killed: every
    page of every process right, each chunk fetched from the cluster about once."""
    size = 32 << 20
    with redis_servers(cluster=True) as servers:
        url, want = pushed(servers, tmp_path, "long", size)
        servers.wait_replicated()
        sock = os.path.join(short_tmp, "h.sock")
        with DaemonThread(sock, url, working_set=None, deadline=10.0) as daemon:
            procs = [
                spawn_restore(sock, size, "--seed", str(k), digests=tmp_path / f"d{k}")
                for k in range(16)
            ]
            servers.node(servers.masters()[0]).kill()
            results = [finish_worker(p, 300) for p in procs]
            reports = daemon.reports(16, 120)
            stats = daemon.daemon.source.stats
        for k, result in enumerate(results):
            assert result["sigbus"] == 0
            assert bad_pages(read_digests(tmp_path / f"d{k}"), want) == []
        assert all(r["errors"] == [] for r in reports)
        stored = size // CHUNK - 16  # the zero hole: an eighth of the image
        assert stored <= stats.fetched_chunks <= stored + stats.urgent_gets


@needs_redis
def test_reads_after_close_fail_without_raising(
    single: RedisServers, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """After close(), a fetch returns a future holding a SourceError (a late fault's read on
    the dispatch thread must not raise); cached chunks are still answered."""
    from uffd.restore.redis_source import RedisSource
    from uffd.restore.sources import SourceError

    url, _ = pushed(single, tmp_path, unique(request), 1 << 20)
    source = RedisSource(url)
    cached = source.read(0, PAGE)
    source.close()
    source.close()
    late = source.fetch(3 * CHUNK, PAGE)
    assert isinstance(late.exception(WAIT), SourceError)
    assert source.fetch(0, PAGE).result(WAIT) == cached
