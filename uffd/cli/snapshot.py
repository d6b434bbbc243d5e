"""``uffd snapshot``: inspect snapshot files, push them to a Redis chunk store and pull them."""

from __future__ import annotations

import argparse
import dataclasses
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


def _size(text: str) -> int:
    """``512K``, ``1M``, ``65536``: a chunk size in bytes (argparse type)."""
    scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:].upper(), 1)
    try:
        return int(text[:-1] if scale > 1 else text, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a size such as 512K or 1M, got {text!r}"
        ) from None


def _cmd_snapshot_push(args: argparse.Namespace) -> int:
    from uffd.pagestore.chunkstore import ManifestError
    from uffd.pagestore.redis_store import StoreError, push

    try:
        report = push(args.snapshot, args.url, chunk_size=args.chunk_size)
    except ManifestError as err:
        print(f"uffd snapshot push: {err}", file=sys.stderr)
        return 2
    except (SnapshotError, StoreError, OSError, ValueError) as err:
        print(f"uffd snapshot push: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return 0
    rate = report.image_bytes / report.elapsed / 1e6 if report.elapsed else 0.0
    print(
        f"pushed {report.name} ({report.manifest_key}): {report.uploaded_chunks} of "
        f"{report.distinct_chunks} chunks uploaded ({report.uploaded_bytes} bytes), "
        f"{report.zero_chunks} of {report.chunks} chunks all zero, "
        f"{report.elapsed:.2f} s ({rate:.0f} MB/s of image)"
    )
    return 0


def _cmd_snapshot_pull(args: argparse.Namespace) -> int:
    from uffd.pagestore.chunkstore import ChunkError, ManifestError
    from uffd.pagestore.redis_store import StoreError, pull

    try:
        report = pull(args.url, args.snapshot)
    except (ChunkError, ManifestError, StoreError, OSError, ValueError) as err:
        print(f"uffd snapshot pull: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return 0
    print(
        f"pulled {args.url} to {report.path}: {report.chunks} chunks verified, "
        f"{report.fetched_bytes} bytes, {report.elapsed:.2f} s"
    )
    return 0


def _add_store_parsers(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    url_help = (
        "redis://HOST:PORT[/[NAMESPACE/]NAME] (rediss:// for TLS); a Redis Cluster node works "
        "too; see docs/chunkstore.md"
    )
    push = actions.add_parser(
        "push",
        help="store a snapshot in Redis (Cluster) as content-addressed chunks",
        description="Store SNAPSHOT (a snapshot or raw memory file) in a Redis or Redis Cluster "
        "store: chunks keyed by their SHA-256 (identical chunks stored once, all-zero chunks "
        "not at all), then a manifest. Pushing again uploads only the chunks the store lacks. "
        "The snapshot's name is the URL's NAME, or the file name up to its first dot.",
        epilog="exit codes: 0 pushed, 1 the file or the store failed, 2 usage",
    )
    push.add_argument("snapshot", metavar="SNAPSHOT")
    push.add_argument("url", metavar="URL", help=url_help)
    push.add_argument(
        "--chunk-size",
        type=_size,
        default=512 << 10,
        metavar="SIZE",
        help="bytes per chunk, whole pages (default 512K)",
    )
    push.add_argument("--json", action="store_true", help="print the report as JSON")
    push.set_defaults(func=_cmd_snapshot_push)
    pull = actions.add_parser(
        "pull",
        help="write a snapshot stored in Redis (Cluster) to a file, every chunk verified",
        epilog="exit codes: 0 pulled, 1 the store failed or a chunk was refused, 2 usage",
    )
    pull.add_argument("url", metavar="URL", help=url_help)
    pull.add_argument("snapshot", metavar="SNAPSHOT", help="the snapshot file to write")
    pull.add_argument("--json", action="store_true", help="print the report as JSON")
    pull.set_defaults(func=_cmd_snapshot_pull)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``snapshot ACTION`` to the ``uffd`` parser (``args.func(args)`` -> exit code)."""
    snapshot = subparsers.add_parser(
        "snapshot", help="inspect snapshot files; push them to Redis and pull them back"
    )
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="print page size, regions, present pages and size")
    info.add_argument("path", metavar="PATH")
    info.add_argument("--verify", action="store_true", help="check every chunk's checksum")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_cmd_snapshot_info)
    _add_store_parsers(actions)
