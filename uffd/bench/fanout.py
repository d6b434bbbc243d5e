"""The ``fanout`` workload: many hosts' worth of lazy restores of one image, by store.

N processes (1, 4, 16) restore one image at once through one handler daemon
(``uffd handler``, as one per host is deployed), each a
:mod:`uffd.bench.fanout_worker` touching random pages while prefetch runs,
from (a) one ``uffd serve`` page server (the baseline every ratio is
against, measured in the same run), (b) a single Redis and (c) a 3-master +
3-replica Redis Cluster (the chunk store, :mod:`uffd.restore.redis_source`),
the latter two with the host cache shared by the daemon's sessions
(``cache_scope=host``, the default) and without it (``cache_scope=session``).

Figures per run: aggregate GB/s (N images / wall time from the start signal
to the last process complete), time to first access (median and worst over
the processes), urgent-fault p50/p99 (accesses to pages missing just before,
timed in the faulting process), bytes the daemon read from its store per
restore (its ``rchar``), and daemon CPU seconds. Then: the chunk-size sweep
(256 KiB, 512 KiB, 1 MiB on the single Redis), push throughput and the dedup
ratio of two snapshots of a live Python worker taken 3 s apart, and the
restore time with a cluster master killed at 50 % against the same restore
without the kill. Servers are real ``redis-server`` processes
(:mod:`uffd.bench.redis_servers`); unpinned: everything shares the CPUs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from uffd.bench import fanout_worker
from uffd.bench.redis_servers import MISSING, RedisServers
from uffd.bench.restore_daemon import HandlerDaemonProcess
from uffd.bench.workloads import serve_process

__all__ = ["FanoutConfig", "run_fanout", "summary_lines"]

Progress = Callable[[str], None]
_DEADLINE = "10"  # seconds a fault may wait: longer than a cluster failover here


@dataclasses.dataclass
class FanoutConfig:
    """Sizes of one fan-out run (the defaults are the full run)."""

    size: int = 256 << 20
    counts: tuple[int, ...] = (1, 4, 16)
    chunk_sizes: tuple[int, ...] = (256 << 10, 512 << 10, 1 << 20)
    pace_us: int = 1000
    worker_mb: int = 200  # the live worker snapshotted twice for the dedup figure
    gap: float = 3.0  # seconds between its two snapshots
    failover: bool = True
    timeout: float = 240.0

    @classmethod
    def quick(cls) -> FanoutConfig:
        """Tiny sizes for a smoke run (``uffd bench --quick``, the tests): seconds."""
        return cls(
            size=4 << 20,
            counts=(2,),
            chunk_sizes=(),
            worker_mb=8,
            gap=0.2,
            failover=False,  # tests/test_redis_store.py kills a master mid-restore already
            timeout=60,
        )


def _percentile(ordered: Sequence[float], q: float) -> float:
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


class _PageServer:
    """``python -m uffd serve FILE`` in a child process; ``url`` once it listens."""

    def __init__(self, path: str) -> None:
        self.proc, self.url = serve_process(path)

    def sent(self) -> int:
        """Bytes the server has sent so far: its page data goes out by sendfile(2), which
        /proc/PID/io counts in ``wchar`` (frame headers are small and not counted)."""
        return int(psutil.Process(self.proc.pid).io_counters().write_chars)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _redis_sent(servers: RedisServers) -> Callable[[], int]:
    """Bytes the Redis nodes have sent so far (INFO stats total_net_output_bytes, summed)."""

    def sent() -> int:
        return sum(
            int(n.info("INFO", "stats").get("total_net_output_bytes", "0"))
            for n in servers.nodes
            if n.proc.poll() is None
        )

    return sent


def restore_many(
    daemon: HandlerDaemonProcess,
    count: int,
    size: int,
    *,
    pace_us: int,
    timeout: float,
    sent: Callable[[], int],
    at_half: Callable[[], None] | None = None,
    half_after: float = 0.0,
) -> dict[str, float]:
    """``count`` workers restored at once through ``daemon``; the figures of the run.

    ``sent()`` counts the bytes the store has sent; ``at_half`` runs
    ``half_after`` seconds after the start (the failover's kill).

    Raises:
        RuntimeError: a worker failed or has wrong pages, did not complete in
            ``timeout``, or the daemon reported errors.
    """
    ps = psutil.Process(daemon.proc.pid)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uffd.bench.fanout_worker",
                daemon.socket,
                str(size),
                str(k + 1),
                str(pace_us),
                str(timeout),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in range(count)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("a fan-out worker did not start")
        sent0, cpu0 = sent(), sum(ps.cpu_times()[:2])
        start = time.monotonic()
        timer = None
        if at_half is not None:
            timer = threading.Timer(half_after, at_half)
            timer.start()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        outs = [w.communicate(timeout=timeout + 120)[0] for w in workers]
        if timer is not None:
            timer.join()
        reports = _reports(daemon, count, timeout=60.0)
        sent1, cpu1 = sent(), sum(ps.cpu_times()[:2])
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    got = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    if any(not g["complete_at"] for g in got):
        raise RuntimeError(f"a restore did not complete in {timeout} s")
    if any(g["bad_pages"] for g in got):
        raise RuntimeError(f"{sum(g['bad_pages'] for g in got)} restored pages are wrong")
    errors = [e for r in reports for e in r["errors"]]
    if errors:
        raise RuntimeError(f"the daemon reported errors: {errors[:3]}")
    wall = max(g["complete_at"] for g in got) - start
    faults = sorted(f for g in got for f in g["fault_us"])
    first = sorted(g["first_access_ms"] for g in got)
    return {
        "restores": float(count),
        "wall_s": wall,
        "gbps": count * size / wall / 1e9,
        "first_access_ms_p50": _percentile(first, 0.5),
        "first_access_ms_max": first[-1],
        "fault_us_p50": _percentile(faults, 0.5),
        "fault_us_p99": _percentile(faults, 0.99),
        "faults": float(len(faults)),
        "fetched_mb_per_restore": (sent1 - sent0) / count / 1e6,
        "daemon_cpu_s": cpu1 - cpu0,
    }


def _reports(daemon: HandlerDaemonProcess, count: int, timeout: float) -> list[dict[str, Any]]:
    """The next ``count`` session reports of ``daemon``, waiting at most ``timeout`` for each.

    Read with a blocking readline on a helper thread: sessions ending together
    write their lines at once, and a select(2) on the pipe would not see the
    second line once the first readline has buffered it.

    Raises:
        RuntimeError: a report did not come in time, or the daemon exited.
    """
    assert daemon.proc.stdout is not None
    out = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for _ in range(count):
            try:
                line = pool.submit(daemon.proc.stdout.readline).result(timeout)
            except concurrent.futures.TimeoutError:
                daemon.close()  # unblocks the readline
                raise RuntimeError(f"no session report from the daemon in {timeout} s") from None
            if not line:
                raise RuntimeError("the handler daemon exited before reporting")
            out.append(json.loads(line)["session"])
    return out


def _push(path: str, url: str, chunk_size: int) -> dict[str, float]:
    from uffd.pagestore.redis_store import push

    report = push(path, url, chunk_size=chunk_size)
    return {
        "seconds": report.elapsed,
        "image_mb": report.image_bytes / 1e6,
        "uploaded_mb": report.uploaded_bytes / 1e6,
        "chunks": float(report.distinct_chunks),
        "uploaded_chunks": float(report.uploaded_chunks),
    }


def _kill_busiest_master(servers: RedisServers, url: str) -> Callable[[], None]:
    """A callable that SIGKILLs the master holding the most of the image's chunks."""
    from redis.crc import key_slot

    from uffd.pagestore.redis_store import RedisChunkStore

    store = RedisChunkStore(url)
    keys = [store.url.chunk_key(c) for c in store.get_manifest().stored_ids()]
    store.close()
    slots = servers.slots()
    owner = {
        p: sum(any(a <= key_slot(k.encode()) <= b for a, b in r) for k in keys)
        for p, r in slots.items()
    }
    victim = max(owner, key=lambda p: owner[p])
    return lambda: servers.node(victim).kill()


def _live_worker_snapshots(directory: str, megabytes: int, gap: float) -> tuple[str, str, float]:
    """Two snapshots of a live Python worker (``uffd snapshot create``'s capture, the process
    frozen while read), ``gap`` seconds apart; and the seconds the first capture took (the
    push baseline)."""
    from uffd.pagestore.capture import capture_process

    code = (
        "import random, sys, time\n"
        f"items = [random.randbytes(4000) for _ in range({megabytes * 250})]\n"
        "index = {i: items[i] for i in range(len(items))}\n"
        "log = []\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    batch = [index[random.randrange(len(items))] for _ in range(64)]\n"
        "    log.append(sum(len(b) for b in batch))\n"
        "    del log[:-10000]\n"
        "    time.sleep(0.001)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        paths = []
        capture_s = 0.0
        for n in range(2):
            if n:
                time.sleep(gap)
            path = os.path.join(directory, f"worker{n}.snap")
            t0 = time.monotonic()
            capture_process(path, proc.pid, freeze=True)
            capture_s = capture_s or time.monotonic() - t0
            paths.append(path)
    finally:
        proc.kill()
        proc.wait()
    return paths[0], paths[1], capture_s


def run_fanout(config: FanoutConfig, progress: Progress) -> dict[str, Any]:
    """The whole fan-out workload (see the module docstring); JSON-ready results.

    Raises:
        RuntimeError: redis-server or redis-py is missing (``skipped`` names it
            in the results instead), or a run failed.
    """
    try:
        import redis  # noqa: F401
    except ImportError:
        return {"skipped": "redis-py is not installed (pip install 'pyuffd[redis]')"}
    if MISSING:
        return {"skipped": MISSING}
    from uffd.pagestore.snapshot import write_snapshot

    out: dict[str, Any] = {"config": dataclasses.asdict(config), "runs": []}
    started: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="uffd-fanout-") as tmp:
        try:
            path = os.path.join(tmp, "image.snap")
            write_snapshot(path, {"mem": fanout_worker.image(config.size)})
            server = _PageServer(path)
            started.append(server)
            single = RedisServers(cluster=False)
            started.append(single)
            cluster = RedisServers(cluster=True)
            started.append(cluster)
            chunk = 512 << 10
            urls = {}
            for name, servers in (("redis", single), ("cluster", cluster)):
                urls[name] = f"{servers.url}/bench/image"
                out[f"push_{name}"] = _push(path, urls[name], chunk)
                progress(f"  push to {name}: {out[f'push_{name}']['seconds']:.2f} s")
            cluster.wait_replicated()
            single_sent, cluster_sent = _redis_sent(single), _redis_sent(cluster)
            sources = {
                "serve": (server.url, server.sent),
                "redis": (urls["redis"], single_sent),
                "redis-nocache": (urls["redis"] + "?cache_scope=session", single_sent),
                "cluster": (urls["cluster"], cluster_sent),
                "cluster-nocache": (urls["cluster"] + "?cache_scope=session", cluster_sent),
            }
            for count in config.counts:
                for name, (source, sent) in sources.items():
                    out["runs"].append(_one(name, source, sent, count, config, progress))
            for size in config.chunk_sizes:
                url = f"{single.url}/bench/image-{size >> 10}k"
                _push(path, url, size)
                for count in config.counts[:2]:
                    run = _one(f"redis-{size >> 10}k", url, single_sent, count, config, progress)
                    run["chunk_size"] = size
                    out["runs"].append(run)
            out["dedup"] = _dedup(tmp, cluster, config, progress)
            if config.failover:
                out["failover"] = _failover(cluster, urls["cluster"], config, progress)
        finally:
            for thing in reversed(started):
                thing.close()
    out["ratios"] = _ratios(out["runs"])
    return out


def _one(
    name: str,
    source: str,
    sent: Callable[[], int],
    count: int,
    config: FanoutConfig,
    progress: Progress,
) -> dict[str, Any]:
    daemon = HandlerDaemonProcess(source, extra=("--deadline", _DEADLINE))
    try:
        figures = restore_many(
            daemon, count, config.size, sent=sent, pace_us=config.pace_us, timeout=config.timeout
        )
    finally:
        daemon.close()
    progress(
        f"  {name} x{count}: {figures['gbps']:.2f} GB/s, fault p50 "
        f"{figures['fault_us_p50']:.0f} us p99 {figures['fault_us_p99']:.0f} us, "
        f"{figures['fetched_mb_per_restore']:.0f} MB fetched per restore"
    )
    return {"source": name, "count": count, **figures}


def _dedup(
    tmp: str, cluster: RedisServers, config: FanoutConfig, progress: Progress
) -> dict[str, Any]:
    """Push two snapshots of a live worker ``gap`` apart: throughput and what the second reuses."""
    first, second, capture_s = _live_worker_snapshots(tmp, config.worker_mb, config.gap)
    out: dict[str, Any] = {"capture_s": capture_s, "gap_s": config.gap}
    for size in config.chunk_sizes or (512 << 10,):
        base = f"{cluster.url}/dedup-{size >> 10}k"
        one = _push(first, f"{base}/one", size)
        two = _push(second, f"{base}/two", size)
        out[f"{size >> 10}k"] = {
            "first": one,
            "second": two,
            "push_vs_capture": one["seconds"] / capture_s,
            "second_reused": 1.0 - two["uploaded_chunks"] / two["chunks"],
        }
        progress(
            f"  dedup {size >> 10}k: first push {one['image_mb'] / one['seconds']:.0f} MB/s, "
            f"second push reuses {out[f'{size >> 10}k']['second_reused']:.0%} of its chunks"
        )
    return out


def _failover(
    cluster: RedisServers, url: str, config: FanoutConfig, progress: Progress
) -> dict[str, float]:
    """One restore from the cluster, then the same with the busiest master killed at 50 %.

    Each restore has a daemon of its own, so the second one's chunks come
    from the cluster, not from the first one's host cache.
    """
    sent = _redis_sent(cluster)
    runs: list[dict[str, float]] = []
    for kill in (None, _kill_busiest_master(cluster, url)):
        daemon = HandlerDaemonProcess(url, extra=("--deadline", _DEADLINE))
        try:
            runs.append(
                restore_many(
                    daemon,
                    1,
                    config.size,
                    sent=sent,
                    pace_us=config.pace_us,
                    timeout=60,
                    at_half=kill,
                    half_after=runs[0]["wall_s"] / 2 if runs else 0.0,
                )
            )
        finally:
            daemon.close()
    plain, killed = runs
    out = {
        "plain_s": plain["wall_s"],
        "killed_s": killed["wall_s"],
        "ratio": killed["wall_s"] / plain["wall_s"],
        "killed_fault_us_p99": killed["fault_us_p99"],
    }
    progress(
        f"  failover: a master killed at 50 %: the restore took {out['ratio']:.2f}x "
        "the time of the same restore without the kill; every page right"
    )
    return out


def _ratios(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each store's figures over the page server's at the same fan-out, same run."""
    base = {r["count"]: r for r in runs if r["source"] == "serve"}
    out = []
    for r in runs:
        b = base.get(r["count"])
        if b is None or r["source"] == "serve":
            continue
        out.append(
            {
                "source": r["source"],
                "count": r["count"],
                "gbps": r["gbps"] / b["gbps"],
                "first_access": r["first_access_ms_p50"] / b["first_access_ms_p50"],
                "fault_p50": r["fault_us_p50"] / b["fault_us_p50"] if b["fault_us_p50"] else 0.0,
                "fault_p99": r["fault_us_p99"] / b["fault_us_p99"] if b["fault_us_p99"] else 0.0,
                "fetched": r["fetched_mb_per_restore"] / b["fetched_mb_per_restore"],
            }
        )
    return out


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The fan-out table: absolute figures, and ratios to the page server."""
    if "skipped" in results:
        return [f"fanout: skipped: {results['skipped']}"]
    lines = [
        "source            N   GB/s  x serve  first ms  fault p50/p99 us   MB fetched/restore",
    ]
    ratios = {(r["source"], r["count"]): r for r in results["ratios"]}
    for r in results["runs"]:
        x = ratios.get((r["source"], r["count"]), {}).get("gbps", 1.0)
        lines.append(
            f"{r['source']:<16} {r['count']:>2} {r['gbps']:>6.2f} {x:>7.2f}x "
            f"{r['first_access_ms_p50']:>8.1f}  {r['fault_us_p50']:>6.0f} / "
            f"{r['fault_us_p99']:<7.0f}  {r['fetched_mb_per_restore']:>8.1f}"
        )
    return lines


def main() -> None:
    """``python -m uffd.bench.fanout [--quick] [--out FILE]``: run it alone."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m uffd.bench.fanout")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = FanoutConfig()
    if args.quick:
        config = FanoutConfig.quick()

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run_fanout(config, progress)
    print("\n".join(summary_lines(results)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
