"""Reporting for the benchmark suite: ratios against targets, a terminal table, JSON, a PNG chart.

The suite's results (see :func:`uffd.bench.suite.run_suite`) are a dict that
this module turns into text (:func:`format_report`), a JSON file
(:func:`write_json`) and a chart of pages/s per handler and workload
(:func:`write_chart`, which needs matplotlib: ``pip install 'pyuffd[bench]'``).

Ratios compare two handlers measured in the same run, with the same data
and the same CPU placement: ``value`` is the ratio of their medians, and
``spread`` the lowest and highest ratio of the per-repeat pairs (the
handlers run interleaved, one repeat of each in turn). A ratio with a
target gets PASS or MISS; targets are measured, never asserted.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CPU_WORKLOADS",
    "RATIOS",
    "Ratio",
    "chart_unavailable",
    "compute_ratios",
    "format_report",
    "write_chart",
    "write_json",
]


@dataclass(frozen=True)
class Ratio:
    """``handler`` against ``baseline`` on ``metric`` of ``workload``.

    ``baseline`` None makes it an absolute value of ``handler``.

    ``better`` says which way is good: "lower" (times) or "higher" (rates);
    ``target`` (None: informational) is the bound the value must meet.
    """

    name: str
    workload: str
    handler: str
    baseline: str | None
    metric: str
    better: str
    target: float | None = None
    unit: str = "x"


RATIOS: tuple[Ratio, ...] = (
    Ratio(
        "random: python / C per-fault time",
        "random",
        "python",
        "c-ref",
        "fault_ns_median",
        "lower",
        1.25,
    ),
    Ratio(
        "random: native / C per-fault time",
        "random",
        "native",
        "c-ref",
        "fault_ns_median",
        "lower",
        1.05,
    ),
    Ratio(
        "random: naive ctypes / C per-fault time",
        "random",
        "naive",
        "c-ref",
        "fault_ns_median",
        "lower",
    ),
    Ratio(
        "sequential: prefetch / C pages/s",
        "sequential",
        "prefetch",
        "c-ref",
        "pages_per_s",
        "higher",
        5.0,
    ),
    Ratio(
        "sequential: prefetch / bulkcopy",
        "sequential",
        "prefetch",
        "bulkcopy",
        "pages_per_s",
        "higher",
        0.5,
    ),
    Ratio(
        "sequential: native-prefetch / C pages/s",
        "sequential",
        "native-prefetch",
        "c-ref",
        "pages_per_s",
        "higher",
        5.0,
    ),
    Ratio(
        "sequential: native-prefetch / bulkcopy",
        "sequential",
        "native-prefetch",
        "bulkcopy",
        "pages_per_s",
        "higher",
        0.5,
    ),
    Ratio(
        "sequential: python / C pages/s", "sequential", "python", "c-ref", "pages_per_s", "higher"
    ),
    Ratio(
        "sequential: native / C pages/s", "sequential", "native", "c-ref", "pages_per_s", "higher"
    ),
    Ratio(
        "sequential: C / notouch pages/s", "sequential", "c-ref", "notouch", "pages_per_s", "higher"
    ),
    Ratio(
        "sparse: native handler CPU at 100 faults/s",
        "sparse",
        "native",
        None,
        "cpu_percent",
        "lower",
        5.0,
        "% of a CPU",
    ),
    Ratio(
        "sparse: native / native with spin=0, CPU",
        "sparse",
        "native",
        "native-nospin",
        "cpu_percent",
        "lower",
    ),
    Ratio(
        "sparse: python handler CPU at 100 faults/s",
        "sparse",
        "python",
        None,
        "cpu_percent",
        "lower",
        unit="% of a CPU",
    ),
    Ratio("threads: python / C pages/s", "threads", "python", "c-ref", "pages_per_s", "higher"),
    Ratio("threads: native / C pages/s", "threads", "native", "c-ref", "pages_per_s", "higher"),
    Ratio(
        "restore: background restore",
        "restore",
        "python",
        None,
        "restore_gbps",
        "higher",
        1.0,
        "GB/s",
    ),
    Ratio(
        "restore: first access", "restore", "python", None, "first_access_ms", "lower", 5.0, "ms"
    ),
    Ratio(
        "restore: restore / fetch-only rate",
        "restore",
        "python",
        "fetch-only",
        "pages_per_s",
        "higher",
    ),
    Ratio(
        "restore-daemon: urgent fault p50",
        "restore-daemon",
        "daemon-tcp",
        None,
        "fault_us_p50",
        "lower",
        100.0,
        "µs",
    ),
    Ratio(
        "restore-daemon: urgent fault p99",
        "restore-daemon",
        "daemon-tcp",
        None,
        "fault_us_p99",
        "lower",
        1000.0,
        "µs",
    ),
    Ratio(
        "restore-daemon: full restore",
        "restore-daemon",
        "daemon-tcp",
        None,
        "restore_gbps",
        "higher",
        1.5,
        "GB/s",
    ),
    Ratio(
        "restore-daemon: restore / fetch-only rate",
        "restore-daemon",
        "daemon-tcp",
        "fetch-only",
        "pages_per_s",
        "higher",
        0.8,
    ),
    Ratio(
        "restore-daemon: first access",
        "restore-daemon",
        "daemon-tcp",
        None,
        "first_access_ms",
        "lower",
        1.0,
        "ms",
    ),
    Ratio(
        "restore-daemon: file restore / bulkcopy",
        "restore-daemon",
        "daemon-file",
        "bulkcopy",
        "pages_per_s",
        "higher",
        0.8,
    ),
    Ratio(
        "restore-daemon: file urgent fault p50",
        "restore-daemon",
        "daemon-file",
        None,
        "fault_us_p50",
        "lower",
        unit="µs",
    ),
    Ratio(
        "restore-daemon: file urgent fault p99",
        "restore-daemon",
        "daemon-file",
        None,
        "fault_us_p99",
        "lower",
        unit="µs",
    ),
    # A harvest is one thread's ~1 ms of CPU: on a shared host the wall clock
    # mostly measures who else ran, so the target is on CPU time (the same
    # figure as the wall clock on an idle host); the wall-clock ratios stay beside it.
    Ratio(
        "dirty: DirtyTracker / C harvest CPU time",
        "dirty",
        "python",
        "c-ref",
        "harvest_cpu_ns",
        "lower",
        1.5,
    ),
    Ratio(
        "dirty: collect_into / C harvest CPU time",
        "dirty",
        "python-into",
        "c-ref",
        "harvest_cpu_ns",
        "lower",
        1.5,
    ),
    Ratio(
        "dirty: DirtyTracker / C harvest time", "dirty", "python", "c-ref", "harvest_ns", "lower"
    ),
    Ratio(
        "dirty: collect_into / C harvest time",
        "dirty",
        "python-into",
        "c-ref",
        "harvest_ns",
        "lower",
    ),
)

# The workloads whose handlers report cpu_us_per_fault beside the C reference's.
CPU_WORKLOADS = ("random", "sequential", "threads")
_CPU_METRIC = "cpu_us_per_fault"

# The figure each workload's table row leads with, and how to show it.
_HEADLINE = {
    "sparse": ("cpu_percent", 1.0, "% CPU"),
    "random": ("fault_ns_median", 1e-3, "µs/fault"),
    "sequential": ("pages_per_s", 1e-3, "kpages/s"),
    "threads": ("pages_per_s", 1e-3, "kpages/s"),
    "restore": ("pages_per_s", mmap.PAGESIZE / 1e9, "GB/s"),
    "restore-daemon": ("pages_per_s", mmap.PAGESIZE / 1e9, "GB/s"),
    "dirty": ("harvest_ns", 1e-6, "ms/harvest"),
}


def _entries(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(e["workload"], e["placement"], e["handler"]): e for e in results["results"]}


def _measured(entry: dict[str, Any], metric: str) -> bool:
    """True if ``entry`` ran (no error, not skipped) and has a median of ``metric``."""
    return not entry.get("error") and not entry.get("skipped") and metric in entry["median"]


def _cpu_ratios(results: dict[str, Any]) -> list[Ratio]:
    """A ratio per handler of :data:`CPU_WORKLOADS`: its CPU µs per fault over the C reference's."""
    handlers = dict.fromkeys(
        (e["workload"], e["handler"])
        for e in results["results"]
        if e["workload"] in CPU_WORKLOADS and e["handler"] != "c-ref"
    )
    return [
        Ratio(f"{w}: {h} / C CPU per fault", w, h, "c-ref", _CPU_METRIC, "lower")
        for w, h in handlers
    ]


def _ratio(
    r: Ratio, placement: str, found: dict[tuple[str, str, str], dict[str, Any]]
) -> dict[str, Any] | None:
    """Ratio ``r`` at ``placement`` as a results dict, or None if either side was not measured."""
    entry = found.get((r.workload, placement, r.handler))
    if entry is None or not _measured(entry, r.metric):
        return None
    runs = [run[r.metric] for run in entry["runs"]]
    if r.baseline is None:
        value = entry["median"][r.metric]
        spread = [min(runs), max(runs)]
    else:
        base = found.get((r.workload, placement, r.baseline))
        if base is None or not _measured(base, r.metric):
            return None
        value = entry["median"][r.metric] / base["median"][r.metric]
        base_runs = [run[r.metric] for run in base["runs"]]
        pairs = [a / b for a, b in zip(runs, base_runs, strict=False)] or [value]
        spread = [min(pairs), max(pairs)]
    status = None
    if r.target is not None:
        met = value <= r.target if r.better == "lower" else value >= r.target
        status = "PASS" if met else "MISS"
    return {
        "name": r.name,
        "workload": r.workload,
        "placement": placement,
        "handler": r.handler,
        "baseline": r.baseline,
        "metric": r.metric,
        "value": value,
        "spread": spread,
        "target": r.target,
        "unit": r.unit,
        "better": r.better,
        "status": status,
    }


def compute_ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio of :data:`RATIOS` that the results hold, per placement, then the CPU ratios.

    Each is a dict: name, workload, placement, handler, baseline, metric,
    value, spread ([low, high] over paired repeats, or over repeats for an
    absolute value), target, unit, better, and status ("PASS", "MISS", or
    None without a target). The CPU ratios (metric ``cpu_us_per_fault``,
    named "WORKLOAD: HANDLER / C CPU per fault") compare every handler of
    :data:`CPU_WORKLOADS` with the C reference.
    """
    found = _entries(results)
    placements = sorted({e["placement"] for e in results["results"]})
    ratios = (_ratio(r, p, found) for r in (*RATIOS, *_cpu_ratios(results)) for p in placements)
    return [r for r in ratios if r is not None]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
        for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return lines


def format_report(results: dict[str, Any]) -> str:
    """The results as text: one row per workload/placement/handler, then the ratios with targets.

    The CPU ratios are shown in the rows (column "x C"), not again among the ratios.
    """
    ratios = results.get("ratios", [])
    cpu_vs_c = {
        (r["workload"], r["placement"], r["handler"]): r["value"]
        for r in ratios
        if r["metric"] == _CPU_METRIC
    }
    rows = []
    for e in results["results"]:
        metric, scale, unit = _HEADLINE.get(e["workload"], ("pages_per_s", 1e-3, "kpages/s"))
        if e.get("skipped") or e.get("error"):
            why = f"skipped: {e['skipped']}" if e.get("skipped") else f"ERROR: {e['error']}"
            rows.append([e["workload"], e["placement"], e["handler"], why[:70], *[""] * 5])
            continue
        if metric not in e["median"]:
            metric, scale, unit = "pages_per_s", 1e-3, "kpages/s"
        runs = [run[metric] * scale for run in e["runs"]]
        pps = e["median"].get("pages_per_s")
        cpu = e["median"].get(_CPU_METRIC)
        vs_c = cpu_vs_c.get((e["workload"], e["placement"], e["handler"]))
        rows.append(
            [
                e["workload"],
                e["placement"],
                e["handler"],
                f"{_fmt(e['median'][metric] * scale)} {unit}",
                f"{_fmt(min(runs))}..{_fmt(max(runs))}",
                f"{pps / 1e3:.1f}" if pps else "",
                _fmt(cpu) if cpu else "",
                f"{_fmt(vs_c)} x" if vs_c else "",
                str(len(e["runs"])),
            ]
        )
    lines = [
        "Results (median of the repeats; spread = lowest..highest repeat;",
        "CPU µs/fault = the handler's threads' CPU time / faults served, x C = over c-ref's)",
        "",
    ]
    header = ["workload", "placement", "handler", "median", "spread", "kpages/s"]
    lines += _table([*header, "CPU µs/fault", "x C", "n"], rows)
    ratio_rows = []
    for r in ratios:
        if r["metric"] == _CPU_METRIC:
            continue
        target = (
            ""
            if r["target"] is None
            else ("<= " if r["better"] == "lower" else ">= ") + _fmt(r["target"])
        )
        ratio_rows.append(
            [
                r["name"],
                r["placement"],
                f"{_fmt(r['value'])} {r['unit']}",
                f"{_fmt(r['spread'][0])}..{_fmt(r['spread'][1])}",
                target,
                r["status"] or "-",
            ]
        )
    lines += ["", "Ratios (same run, same data, same placement)", ""]
    lines += _table(["ratio", "placement", "value", "spread", "target", ""], ratio_rows)
    lines += ["", "Placements:"]
    for name, p in results.get("placements", {}).items():
        lines.append(f"  {name}: {p['description']}")
    meta = results.get("host", {})
    if meta:
        lines.append(
            f"Host: Linux {meta.get('kernel')}, CPUs {meta.get('cpus')}, "
            f"Python {meta.get('python')}, "
            f"load average {meta.get('loadavg_start')} -> {meta.get('loadavg_end')}"
        )
    if "runtime_s" in results:
        lines.append(f"Runtime: {results['runtime_s']:.1f} s")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the results as indented JSON (atomically: a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def chart_unavailable() -> str | None:
    """Why no chart can be drawn (matplotlib missing), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'pyuffd[bench]'); no chart drawn"
    return None


def write_chart(results: dict[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """Draw pages/s per handler, a panel per workload, bars per placement; None without matplotlib.

    Dirty tracking shows pages scanned per second by one harvest; restore,
    pages installed per second by the background restore.
    """
    if chart_unavailable():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["results"] if not e.get("error") and not e.get("skipped")]
    workloads = [
        w for w in results["config"]["workloads"] if any(e["workload"] == w for e in entries)
    ]
    if not workloads:
        return None
    order = ["same", "cross", "unpinned"]
    colours = {"same": "tab:blue", "cross": "tab:orange", "unpinned": "tab:green"}
    counts = [len({e["handler"] for e in entries if e["workload"] == w}) for w in workloads]
    fig, axes = plt.subplots(
        len(workloads),
        1,
        figsize=(9, 1.0 + sum(0.6 + 0.32 * c for c in counts)),
        squeeze=False,
        gridspec_kw={"height_ratios": [0.6 + 0.32 * c for c in counts]},
    )
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        mine = [e for e in entries if e["workload"] == workload and "pages_per_s" in e["median"]]
        handlers = list(dict.fromkeys(e["handler"] for e in mine))
        placements = sorted({e["placement"] for e in mine}, key=order.index)
        height = 0.8 / max(1, len(placements))
        values = [e["min"]["pages_per_s"] for e in mine]
        # Log scale: bars start a decade under the smallest value so each has a visible length.
        left = 10 ** math.floor(math.log10(min(values)) - 0.3) if values else 1
        for k, placement in enumerate(placements):
            for i, handler in enumerate(handlers):
                e = next(
                    (x for x in mine if x["handler"] == handler and x["placement"] == placement),
                    None,
                )
                if e is None:
                    continue
                value = e["median"]["pages_per_s"]
                y = i + (k - (len(placements) - 1) / 2) * height
                ax.barh(
                    y,
                    value - left,
                    left=left,
                    height=height * 0.9,
                    color=colours.get(placement, "grey"),
                    xerr=[[value - e["min"]["pages_per_s"]], [e["max"]["pages_per_s"] - value]],
                    capsize=2,
                    error_kw={"elinewidth": 0.8},
                    label=placement if i == 0 else None,
                )
                ax.text(
                    e["max"]["pages_per_s"] * 1.08,
                    y,
                    f"{value / 1e3:,.0f}k",
                    va="center",
                    fontsize=7,
                )
        ax.set_yticks(range(len(handlers)), handlers)
        ax.set_ylim(len(handlers) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.set_xlim(left, max(e["max"]["pages_per_s"] for e in mine) * 3)
        ax.set_title(
            {
                "random": "random single-page faults",
                "sequential": "sequential first touch",
                "threads": f"{results['config'].get('threads', 4)} faulting threads",
                "sparse": "sparse faults (the rate achieved; the figure is CPU %)",
                "restore": "lazy restore over loopback (background install)",
                "restore-daemon": "lazy restore through uffd serve + uffd handler",
                "dirty": "dirty tracking harvest (pages scanned)",
            }.get(workload, workload),
            fontsize=9,
            loc="left",
        )
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel(
        "pages/s (log scale; bars: median, whiskers: lowest..highest repeat)", fontsize=8
    )
    fig.suptitle(
        f"pyuffd benchmark, Linux {results.get('host', {}).get('kernel', '?')}", fontsize=10
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
