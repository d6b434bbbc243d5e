"""``uffd serve``: the page server from the shell."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from uffd.cli._token import UsageError, read_token
from uffd.cli._types import port
from uffd.pagestore.server import PageServer
from uffd.pagestore.snapshot import SnapshotError, open_source


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        token = read_token(args.token_file)
    except UsageError as err:
        print(f"uffd serve: {err}", file=sys.stderr)
        return 2
    try:
        source = open_source(args.snapshot)
    except (SnapshotError, OSError) as err:
        print(f"uffd serve: {err}", file=sys.stderr)
        return 1
    try:
        try:
            server = PageServer(source, host=args.host, port=args.port, token=token)
        except ValueError as err:
            print(f"uffd serve: {err}", file=sys.stderr)
            return 2
        return asyncio.run(_serve_until_signal(server))
    except OSError as err:
        print(f"uffd serve: cannot listen on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 1
    finally:
        source.close()


async def _serve_until_signal(server: PageServer) -> int:
    await server.start()
    print(f"listening on {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``uffd`` parser.

    Each subcommand sets ``func``: ``args.func(args)`` returns the exit code
    (0 ok, 1 runtime error, 2 usage).
    """
    serve = subparsers.add_parser(
        "serve",
        help="serve a snapshot or raw memory file to page clients over TCP",
        description="Serve SNAPSHOT (a pyuffd snapshot or a raw memory file) until "
        "SIGINT/SIGTERM. Prints 'listening on tcp://HOST:PORT' once bound. The token, "
        "required off loopback, comes from --token-file or the UFFD_TOKEN environment "
        "variable, never from the command line.",
    )
    serve.add_argument("snapshot", metavar="SNAPSHOT", help="the file to serve")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=port, default=0, help="port (default 0: any free port)")
    serve.add_argument("--token-file", metavar="F", help="file holding the shared token")
    serve.set_defaults(func=_cmd_serve)
