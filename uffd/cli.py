"""``python -m uffd`` / ``uffd``: the command line.

Exit codes: 0 success, 1 a runtime failure (the message says what and why),
2 a usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# Modules that add their own subcommands through add_cli(subparsers).
_COMMAND_MODULES = ("uffd.server", "uffd.daemon", "uffd.bench.suite")


def _probe(args: argparse.Namespace) -> int:
    from uffd.probe import main

    return main(as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="uffd",
        description="Linux userfaultfd tools: probe the host, serve snapshots, restore lazily.",
        epilog="exit codes: 0 ok, 1 runtime error, 2 usage error, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe = sub.add_parser("probe", help="show what this host's kernel and permissions allow")
    probe.add_argument("--json", action="store_true", help="print as JSON")
    probe.set_defaults(func=_probe)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.add_cli(sub)
    return parser


def run_module(
    add_cli: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None],
    argv: Sequence[str] | None,
) -> int:
    """The ``main`` of a module run on its own (``python -m uffd.server``): its subcommands only.

    ``add_cli`` is the module's; returns the subcommand's exit code.
    """
    parser = argparse.ArgumentParser(prog="uffd")
    add_cli(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
