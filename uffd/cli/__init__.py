"""``python -m uffd`` / ``uffd``: the command line.

Arguments are parsed here and only here; each subcommand module turns its
parsed arguments into typed options for a tool (the page server, the handler
daemon, the bench suite) and maps the tool's errors to exit codes. The tools
never import this package.

Exit codes: 0 success, 1 a runtime failure (the message says what and why),
2 a usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from uffd import _build
from uffd._constants import Feature
from uffd.cli import bench, handler, serve, snapshot
from uffd.probe import parse_features


def _probe(args: argparse.Namespace) -> int:
    from uffd.probe import main

    return main(as_json=args.json, require=args.require)


def _features(text: str) -> Feature:
    """argparse type of ``--require``: a comma-separated list of feature names."""
    try:
        return parse_features(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="uffd",
        description="Linux userfaultfd tools: probe the host, serve snapshots, restore lazily.",
        epilog="exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted",
    )
    parser.add_argument(
        "--version", action="version", version=f"uffd ({_build.DISTRIBUTION}) {_build.version()}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe = sub.add_parser("probe", help="show what this host's kernel and permissions allow")
    probe.add_argument("--json", action="store_true", help="print as JSON")
    probe.add_argument(
        "--require",
        type=_features,
        metavar="FEATURE,...",
        help="exit 1, saying why, unless userfaultfd opens and offers these features "
        "(e.g. MOVE,WP_ASYNC; names as in the report): a gate for shell CI",
    )
    probe.set_defaults(func=_probe)
    serve.add_parser(sub)
    snapshot.add_parser(sub)
    handler.add_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
