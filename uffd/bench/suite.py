"""The benchmark suite: pyuffd against the C reference, the naive ctypes handler and the limits.

``python -m uffd bench`` (or ``make bench``) runs every workload of
:mod:`uffd.bench.workloads` with several handlers side by side, on the same
data and the same CPU placement, interleaved repeat by repeat (one repeat of
each handler in turn, so a disturbance spreads over all of them), and
writes ``results.json`` and ``chart.png`` into the output directory
(default: ``docs/bench`` of the source tree). What each workload measures
and how to read the ratios: ``docs/bench/README.md``.

Workloads, handlers and placements:

- ``random``: 16k single-page faults in random order, each access timed
  (c-ref, naive, python, native), same CPU and cross CPU;
- ``sequential``: first touch of 16k pages in order (the same, plus
  prefetch), with the limits measured in the same run: ``notouch`` (first
  touch with no userfaultfd) and ``bulkcopy`` (UFFDIO_COPY in 2 MiB calls);
- ``threads``: 4 threads faulting their own slices at once;
- ``sparse``: one fault every 10 ms for 3 s (python, native, and native
  with ``spin=0``), same CPU and cross CPU: the handler's CPU in % of one
  CPU while faults are sparse (the pump polls after each fault before it
  sleeps: this is what that costs);
- ``restore``: lazy restore of 1 GiB from a page server on loopback by the
  library's own driver, with a worker touching random pages meanwhile
  (unpinned: three threads and a server process share the CPUs): the
  ceiling of what the daemon can reach;
- ``restore-daemon``: the same restore as users run it (``uffd serve`` +
  ``uffd handler`` + a C stand-in VMM, :mod:`uffd.bench.restore_daemon`),
  from the page server and from the local file, beside the fetch-only rate
  and the bulk UFFDIO_COPY limit measured in the same run (unpinned);
- ``dirty``: one DirtyTracker harvest over 1 GiB, every 4th page written
  (``collect()``, and ``collect_into()`` reusing one result), against the C
  PAGEMAP_SCAN loop (pinned to the first CPU);
- ``fanout``: 1, 4, 16 restores at once of one 256 MiB image from ``uffd
  serve``, a single Redis and a 3+3 Redis Cluster (:mod:`uffd.bench.fanout`;
  its figures go to ``results["fanout"]``, ratios to the page server).

Every handler of random, sequential, threads and sparse also reports
``cpu_us_per_fault``: its own threads' CPU time over the run divided by
the faults it served (:mod:`uffd.bench.cpucost` says how), with the ratio
to the C reference's in the same run for the first three.

Targets are reported as ratios with PASS/MISS, never asserted.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uffd.bench import fanout, report, restore_daemon, workloads
from uffd.bench import placement as _placement
from uffd.bench.reference import default_build_dir

__all__ = ["ALL_WORKLOADS", "DEFAULT_OUT", "Config", "quick_config", "run_suite", "write_outputs"]

ALL_WORKLOADS = (
    "random",
    "sequential",
    "threads",
    "sparse",
    "restore",
    "restore-daemon",
    "dirty",
    "fanout",
)
_TOUCH_HANDLERS = {
    "random": ("c-ref", "naive", "python", "native"),
    "sequential": ("c-ref", "naive", "python", "native", "prefetch", "native-prefetch"),
    "threads": ("c-ref", "naive", "python", "native", "native-prefetch"),
}
# sparse handler name: (FaultHandler-based handler, its spin; None: the default).
_SPARSE_HANDLERS: dict[str, tuple[str, float | None]] = {
    "python": ("python", None),
    "native": ("native", None),
    "native-nospin": ("native", 0.0),
}
_LIMITS = ("notouch", "bulkcopy")
# Where `make bench` writes by default: docs/bench of the source tree.
DEFAULT_OUT = Path(__file__).resolve().parents[2] / "docs" / "bench"
_DIRTY = {False: "python", True: "python-into"}  # DirtyTracker.collect(), collect_into()
SCHEMA = 1


@dataclasses.dataclass
class Config:
    """Sizes and choices of one suite run (the defaults are the full run)."""

    pages: int = 16384
    threads: int = 4
    restore_pages: int = (1 << 30) // workloads.PAGE
    dirty_pages: int = (1 << 30) // workloads.PAGE
    dirty_stride: int = 4
    # Timed harvests per dirty handler: each takes about a millisecond, so
    # more of them steady the median on a shared host for little time.
    dirty_repeat: int = 9
    repeat: int = 3
    workloads: tuple[str, ...] = ALL_WORKLOADS
    seed: int = 1
    restore_server: str = "process"
    restore_chunk: int = 4 << 20
    restore_window: int = 4
    restore_pace_us: int = 1000
    sparse_rate: float = 100.0
    sparse_seconds: float = 3.0
    fanout: fanout.FanoutConfig = dataclasses.field(default_factory=fanout.FanoutConfig)
    quick: bool = False


def quick_config(**overrides: Any) -> Config:
    """Tiny sizes for a smoke run (``--quick``, the tests): seconds, not minutes."""
    settings: dict[str, Any] = {
        "pages": 256,
        "restore_pages": 4096,
        "dirty_pages": 4096,
        "dirty_repeat": 2,
        "repeat": 2,
        "restore_chunk": 1 << 20,
        "sparse_seconds": 0.2,
        "fanout": fanout.FanoutConfig.quick(),
        "quick": True,
    }
    settings.update(overrides)
    return Config(**settings)


Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Collector:
    """Results being gathered: one entry per (workload, placement, handler)."""

    def __init__(self, progress: Progress) -> None:
        self.entries: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.progress = progress

    def entry(self, workload: str, placement: str, handler: str, **params: Any) -> dict[str, Any]:
        key = (workload, placement, handler)
        if key not in self.entries:
            self.entries[key] = {
                "workload": workload,
                "placement": placement,
                "handler": handler,
                "params": params,
                "runs": [],
                "error": None,
                "skipped": None,
            }
        return self.entries[key]

    def run(self, entry: dict[str, Any], label: str, fn: Callable[[], Any]) -> bool:
        """Run one repeat (fn returns a dict, or a list of dicts: all repeats); False on error."""
        if entry["error"]:
            return False
        t0 = time.monotonic()
        try:
            got = fn()
        except Exception as err:
            entry["error"] = f"{type(err).__name__}: {err}"
            self.progress(f"  {label}: ERROR {entry['error']}")
            return False
        entry["runs"].extend(got if isinstance(got, list) else [got])
        self.progress(f"  {label}: {time.monotonic() - t0:.2f} s")
        return True

    def skip(self, entry: dict[str, Any], why: str) -> None:
        entry["skipped"] = why
        self.progress(
            f"  {entry['workload']} {entry['placement']} {entry['handler']}: skipped: {why}"
        )

    def finish(self) -> list[dict[str, Any]]:
        out = []
        for e in self.entries.values():
            if e["runs"]:
                names = e["runs"][0].keys()
                e["median"] = {k: statistics.median(r[k] for r in e["runs"]) for k in names}
                e["min"] = {k: min(r[k] for r in e["runs"]) for k in names}
                e["max"] = {k: max(r[k] for r in e["runs"]) for k in names}
            else:
                e["median"], e["min"], e["max"] = {}, {}, {}
            out.append(e)
        return out


def _placements() -> dict[str, Any]:
    same = _placement.same_cpu()
    cross = _placement.cross_cpu()
    out: dict[str, Any] = {
        "same": {
            "handler_cpu": same.handler_cpu,
            "toucher_cpu": same.toucher_cpu,
            "description": _placement.describe(same),
        }
    }
    out["cross"] = (
        {
            "handler_cpu": cross.handler_cpu,
            "toucher_cpu": cross.toucher_cpu,
            "description": _placement.describe(cross),
        }
        if cross is not None
        else {
            "unavailable": _placement.cross_cpu_unavailable(),
            "description": _placement.describe(None),
        }
    )
    out["unpinned"] = {
        "handler_cpu": -1,
        "toucher_cpu": -1,
        "description": _placement.describe(_placement.UNPINNED),
    }
    return out


def _touch_workload(
    workload: str, config: Config, placements: dict[str, Any], col: _Collector, build_dir: Path
) -> None:
    source = workloads.PatternSource(config.pages)
    handlers = _TOUCH_HANDLERS[workload]
    limits = _LIMITS if workload == "sequential" else ()
    for name in ("same", "cross"):
        spec = placements[name]
        entries = {
            h: col.entry(workload, name, h, pages=config.pages) for h in (*handlers, *limits)
        }
        if "unavailable" in spec:
            for e in entries.values():
                col.skip(e, spec["unavailable"])
            continue
        where = _placement.Placement(spec["handler_cpu"], spec["toucher_cpu"])
        if workload == "threads":
            for e in entries.values():
                e["params"]["threads"] = config.threads
        for rep in range(config.repeat):
            for h in handlers:
                seed = config.seed + rep

                def one(
                    h: str = h, seed: int = seed, where: _placement.Placement = where
                ) -> dict[str, float]:
                    return workloads.run_touch(
                        workload,
                        h,
                        source,
                        where,
                        threads=config.threads,
                        seed=seed,
                        build_dir=build_dir,
                    )

                col.run(entries[h], f"{workload} {name} {h} {rep + 1}/{config.repeat}", one)
            for lim in limits:

                def limit(lim: str = lim, where: _placement.Placement = where) -> dict[str, float]:
                    return workloads.run_limit(lim, config.pages, where, build_dir=build_dir)

                col.run(entries[lim], f"{workload} {name} {lim} {rep + 1}/{config.repeat}", limit)


def _sparse_workload(
    config: Config, placements: dict[str, Any], col: _Collector, build_dir: Path
) -> None:
    """The handlers' CPU % while faults come one per 1/sparse_rate s, same CPU and cross CPU."""
    params = {"rate": config.sparse_rate, "seconds": config.sparse_seconds}
    for name in ("same", "cross"):
        spec = placements[name]
        entries = {h: col.entry("sparse", name, h, **params) for h in _SPARSE_HANDLERS}
        if "unavailable" in spec:
            for e in entries.values():
                col.skip(e, spec["unavailable"])
            continue
        where = _placement.Placement(spec["handler_cpu"], spec["toucher_cpu"])
        for rep in range(config.repeat):
            for h, entry in entries.items():
                col.run(
                    entry,
                    f"sparse {name} {h} {rep + 1}/{config.repeat}",
                    functools.partial(
                        workloads.run_sparse,
                        _SPARSE_HANDLERS[h][0],
                        where,
                        rate=config.sparse_rate,
                        seconds=config.sparse_seconds,
                        spin=_SPARSE_HANDLERS[h][1],
                        build_dir=build_dir,
                    ),
                )


def _restore_workload(config: Config, col: _Collector, build_dir: Path) -> None:
    params: dict[str, Any] = {
        "bytes": config.restore_pages * workloads.PAGE,
        "server": config.restore_server,
        "chunk": config.restore_chunk,
        "window": config.restore_window,
    }
    entry = col.entry("restore", "unpinned", "python", **params)
    try:
        server = workloads.RestoreServer(config.restore_pages, mode=config.restore_server)
    except Exception as err:
        entry["error"] = f"page server: {type(err).__name__}: {err}"
        col.progress(f"  restore: ERROR {entry['error']}")
        return
    limit = col.entry("restore", "unpinned", "fetch-only", **params)
    try:
        for rep in range(config.repeat):

            def one(rep: int = rep) -> dict[str, float]:
                return workloads.run_restore(
                    server,
                    seed=config.seed + rep,
                    chunk=config.restore_chunk,
                    window=config.restore_window,
                    build_dir=build_dir,
                )

            def fetch() -> dict[str, float]:
                return workloads.run_fetch_only(
                    server, chunk=config.restore_chunk, window=config.restore_window
                )

            col.run(entry, f"restore unpinned python {rep + 1}/{config.repeat}", one)
            col.run(limit, f"restore unpinned fetch-only {rep + 1}/{config.repeat}", fetch)
    finally:
        server.close()


def _restore_daemon_workload(config: Config, col: _Collector, build_dir: Path) -> None:
    """uffd serve + uffd handler (page server, then local file) + restore_vmm, interleaved
    with the fetch-only rate and the bulk UFFDIO_COPY limit of the same size."""
    pages = config.restore_pages
    params: dict[str, Any] = {"bytes": pages * workloads.PAGE, "pace_us": config.restore_pace_us}
    names = ("daemon-tcp", "daemon-file", "fetch-only", "bulkcopy")
    entries = {h: col.entry("restore-daemon", "unpinned", h, **params) for h in names}
    started: list[Any] = []
    try:
        server = workloads.RestoreServer(pages, mode="process")
        started.append(server)
        daemons = {
            "daemon-tcp": restore_daemon.HandlerDaemonProcess(server.url),
            "daemon-file": restore_daemon.HandlerDaemonProcess(server.path),
        }
        started.extend(daemons.values())
    except Exception as err:
        for e in entries.values():
            e["error"] = f"setup: {type(err).__name__}: {err}"
        col.progress(f"  restore-daemon: ERROR {type(err).__name__}: {err}")
        for thing in reversed(started):
            thing.close()
        return
    try:
        for rep in range(config.repeat):
            label = f"{rep + 1}/{config.repeat}"
            for name, daemon in daemons.items():

                def one(
                    daemon: restore_daemon.HandlerDaemonProcess = daemon, rep: int = rep
                ) -> dict[str, float]:
                    return restore_daemon.run_daemon_restore(
                        daemon,
                        pages,
                        server_pid=server.pid,
                        seed=config.seed + rep,
                        pace_us=config.restore_pace_us,
                        build_dir=build_dir,
                    )

                col.run(entries[name], f"restore-daemon unpinned {name} {label}", one)
            col.run(
                entries["fetch-only"],
                f"restore-daemon unpinned fetch-only {label}",
                lambda: workloads.run_fetch_only(
                    server, chunk=config.restore_chunk, window=config.restore_window
                ),
            )
            col.run(
                entries["bulkcopy"],
                f"restore-daemon unpinned bulkcopy {label}",
                lambda: workloads.run_limit(
                    "bulkcopy", pages, _placement.UNPINNED, build_dir=build_dir
                ),
            )
    finally:
        for thing in reversed(started):
            thing.close()


def _fanout_workload(config: Config, progress: Progress) -> dict[str, Any]:
    """The fan-out figures (:mod:`uffd.bench.fanout`), or ``{"error": ...}`` if it failed."""
    try:
        figures = fanout.run_fanout(config.fanout, progress)
    except Exception as err:
        progress(f"  fanout: ERROR {type(err).__name__}: {err}")
        return {"error": f"{type(err).__name__}: {err}"}
    for line in fanout.summary_lines(figures):
        progress(f"  {line}")
    return figures


def _dirty_workload(
    config: Config, placements: dict[str, Any], col: _Collector, build_dir: Path
) -> None:
    cpu = placements["same"]["handler_cpu"]
    params = {"pages": config.dirty_pages, "stride": config.dirty_stride, "cpu": cpu}
    ref = col.entry("dirty", "same", "c-ref", **params)
    mine = {into: col.entry("dirty", "same", _DIRTY[into], **params) for into in _DIRTY}
    try:
        import uffd.dirty  # noqa: F401
    except ImportError as err:
        for entry in mine.values():
            col.skip(entry, f"uffd.dirty is not available ({err})")
        mine = {}
    col.run(
        ref,
        f"dirty same c-ref x{config.dirty_repeat}",
        lambda: workloads.run_dirty_reference(
            config.dirty_pages,
            cpu,
            repeat=config.dirty_repeat,
            stride=config.dirty_stride,
            build_dir=build_dir,
        ),
    )
    for into, entry in mine.items():
        col.run(
            entry,
            f"dirty same {_DIRTY[into]} x{config.dirty_repeat}",
            functools.partial(
                workloads.run_dirty,
                config.dirty_pages,
                cpu,
                repeat=config.dirty_repeat,
                stride=config.dirty_stride,
                into=into,
            ),
        )


def _host() -> dict[str, Any]:
    from uffd import __version__

    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "online_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyuffd": __version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_suite(
    config: Config, *, progress: Progress = _stderr, build_dir: Path | None = None
) -> dict[str, Any]:
    """Run the workloads of ``config`` and return the results (JSON-ready, with ratios).

    A handler that fails is reported with its error and the suite goes on;
    ``results["errors"]`` counts them.

    Raises:
        ValueError: an unknown workload in ``config``.
    """
    unknown = set(config.workloads) - set(ALL_WORKLOADS)
    if unknown:
        raise ValueError(
            f"unknown workloads {sorted(unknown)}; choose from {', '.join(ALL_WORKLOADS)}"
        )
    build_dir = build_dir if build_dir is not None else default_build_dir()
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc)
    host = _host()
    placements = _placements()
    col = _Collector(progress)
    extra: dict[str, Any] = {}
    for workload in ALL_WORKLOADS:
        if workload not in config.workloads:
            continue
        progress(f"{workload}:")
        if workload in _TOUCH_HANDLERS:
            _touch_workload(workload, config, placements, col, build_dir)
        elif workload == "sparse":
            _sparse_workload(config, placements, col, build_dir)
        elif workload == "restore":
            _restore_workload(config, col, build_dir)
        elif workload == "restore-daemon":
            _restore_daemon_workload(config, col, build_dir)
        elif workload == "fanout":
            extra["fanout"] = _fanout_workload(config, progress)
        else:
            _dirty_workload(config, placements, col, build_dir)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "created": started.isoformat(timespec="seconds"),
        "host": host,
        "config": dataclasses.asdict(config),
        "placements": placements,
        "results": col.finish(),
    }
    results["config"]["workloads"] = list(config.workloads)
    results["ratios"] = report.compute_ratios(results)
    results.update(extra)
    results["errors"] = sum(1 for e in results["results"] if e["error"])
    results["errors"] += sum(1 for doc in extra.values() if "error" in doc)
    results["runtime_s"] = time.monotonic() - t0
    return results


def write_outputs(
    results: dict[str, Any], out: Path, *, progress: Progress = _stderr
) -> dict[str, str | None]:
    """Write results.json and chart.png into ``out``; return their paths (chart None if skipped)."""
    written: dict[str, str | None] = {"json": str(report.write_json(results, out / "results.json"))}
    why = report.chart_unavailable()
    if why:
        progress(f"chart skipped: {why}")
        written["chart"] = None
    else:
        chart = report.write_chart(results, out / "chart.png")
        written["chart"] = str(chart) if chart else None
    return written
