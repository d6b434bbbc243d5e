"""``uffd bench``: the benchmark suite from the shell (``make bench``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uffd.bench import report, suite
from uffd.cli._types import positive_int


def _cmd_bench(args: argparse.Namespace) -> int:
    config = suite.quick_config() if args.quick else suite.Config()
    if args.workloads:
        config.workloads = tuple(args.workloads)
    if args.repeat is not None:
        config.repeat = args.repeat
    if args.pages is not None:
        config.pages = args.pages
    out = Path(args.out) if args.out else suite.DEFAULT_OUT
    results = suite.run_suite(config)
    written = suite.write_outputs(results, out)
    print(report.format_report(results))
    print(
        f"\nWrote {written['json']}"
        + (f" and {written['chart']}" if written["chart"] else " (no chart)")
    )
    if results["errors"]:
        print(f"{results['errors']} handler runs failed; see the ERROR rows", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bench [--quick] [--out DIR] [--workloads ...] [--repeat N] [--pages N]``."""
    bench = subparsers.add_parser(
        "bench",
        help="run the benchmark suite against the C reference",
        description="Run pyuffd's handlers side by side with the C reference handler, the naive "
        "ctypes handler and the kernel limits; print a table with each ratio against its "
        "target, and write results.json and chart.png (the chart needs matplotlib: "
        "pip install 'pyuffd[bench]'). Needs gcc and permission to use userfaultfd. "
        "Exit 1 if a handler failed (targets missed do not fail).",
    )
    bench.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    bench.add_argument(
        "--out", metavar="DIR", help="output directory (default: docs/bench of the source tree)"
    )
    bench.add_argument(
        "--workloads",
        nargs="+",
        choices=suite.ALL_WORKLOADS,
        metavar="W",
        help=f"workloads to run (default all: {' '.join(suite.ALL_WORKLOADS)})",
    )
    bench.add_argument(
        "--repeat", type=positive_int, metavar="N", help="repeats per handler (default 3; quick 2)"
    )
    bench.add_argument(
        "--pages",
        type=positive_int,
        metavar="N",
        help="pages for random/sequential/threads (default 16384)",
    )
    bench.set_defaults(func=_cmd_bench)
