"""``uffd snapshot``: inspect snapshot files."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from uffd.pagestore.snapshot import Snapshot, SnapshotError


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


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``snapshot ACTION`` to the ``uffd`` parser (``args.func(args)`` -> exit code)."""
    snapshot = subparsers.add_parser("snapshot", help="inspect snapshot files")
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="print page size, regions, present pages and size")
    info.add_argument("path", metavar="PATH")
    info.add_argument("--verify", action="store_true", help="check every chunk's checksum")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_cmd_snapshot_info)
