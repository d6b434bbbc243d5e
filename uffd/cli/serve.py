"""``uffd serve`` and ``uffd snapshot``: the page server and snapshot files from the shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from uffd.cli._token import UsageError, read_token
from uffd.pagestore.server import PageServer
from uffd.pagestore.snapshot import Snapshot, SnapshotError, open_source


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


def _cmd_snapshot_info(args: argparse.Namespace) -> int:
    try:
        with Snapshot.open(args.path) as snap:
            verified = snap.verify() if args.verify else None
            size = snap.file_size
            regions: list[dict[str, Any]] = [
                {
                    "name": r.name,
                    "length": r.length,
                    "pages": r.length // snap.page_size,
                    "present_pages": r.present_pages,
                }
                for r in snap.regions
            ]
            page_size, chunk_pages = snap.page_size, snap.chunk_pages
    except (SnapshotError, OSError) as err:
        print(f"uffd snapshot info: {err}", file=sys.stderr)
        return 1
    if args.json:
        info = {
            "path": args.path,
            "page_size": page_size,
            "chunk_pages": chunk_pages,
            "file_size": size,
            "regions": regions,
            "verified_pages": verified,
        }
        print(json.dumps(info, indent=2))
        return 0
    print(f"path:        {args.path}")
    print(f"page size:   {page_size}")
    print(f"chunk pages: {chunk_pages}")
    print(f"file size:   {size} bytes")
    print(f"regions:     {len(regions)}")
    for r in regions:
        share = 100.0 * r["present_pages"] / r["pages"] if r["pages"] else 0.0
        print(
            f"  {r['name']}: {r['length']} bytes, {r['pages']} pages, "
            f"{r['present_pages']} present ({share:.1f}%)"
        )
    if verified is not None:
        print(f"verified:    {verified} pages, all checksums match")
    return 0


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``snapshot info`` to the ``uffd`` parser.

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
    serve.add_argument("--port", type=int, default=0, help="port (default 0: any free port)")
    serve.add_argument("--token-file", metavar="F", help="file holding the shared token")
    serve.set_defaults(func=_cmd_serve)

    snapshot = subparsers.add_parser("snapshot", help="inspect snapshot files")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="print page size, regions, present pages and size")
    info.add_argument("path", metavar="PATH")
    info.add_argument("--verify", action="store_true", help="check every chunk's checksum")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_cmd_snapshot_info)
