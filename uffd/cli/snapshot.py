"""``uffd snapshot``: make and inspect snapshot files, push them to a Redis chunk store, pull them.

``create`` writes a snapshot from a raw memory image (``--from-raw``) or from
a live process's memory (``--pid``, :mod:`uffd.pagestore.capture`). ``info``
reads what ``uffd serve`` serves, a snapshot or a raw image
(:func:`~uffd.pagestore.snapshot.open_source`); ``--verify`` checks every
chunk's checksum with a progress display. ``push``/``pull`` move snapshots
to and from a Redis (Cluster) chunk store (:mod:`uffd.pagestore.redis_store`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from uffd.cli._types import address_range, page_size, positive_int
from uffd.pagestore.capture import capture_process, snapshot_from_raw
from uffd.pagestore.snapshot import (
    RawMemoryFile,
    Snapshot,
    SnapshotError,
    SnapshotInfo,
    open_source,
)

_VERIFY_BLOCK = 1 << 20


def _cmd_snapshot_info(args: argparse.Namespace) -> int:
    try:
        source = open_source(args.path)
    except SnapshotError as err:
        # open_source reads a file without the magic as a raw image: say both.
        print(f"uffd snapshot info: not a pyuffd snapshot (bad magic); {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"uffd snapshot info: {err}", file=sys.stderr)
        return 1
    with source:
        if args.verify and isinstance(source, RawMemoryFile):
            print(
                f"uffd snapshot info: --verify: {args.path} is a raw memory image, which has "
                "no checksums; only pyuffd snapshots can be verified",
                file=sys.stderr,
            )
            return 2
        try:
            verified = (
                _verify(source, _progress(args))
                if args.verify and isinstance(source, Snapshot)
                else None
            )
        except SnapshotError as err:
            print(f"uffd snapshot info: {err}", file=sys.stderr)
            return 1
        info = _describe(args.path, source)
    info["verified_pages"] = verified
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"path:        {info['path']}")
    print(f"format:      {info['format']}")
    print(f"page size:   {info['page_size']}")
    if info["chunk_pages"] is not None:
        print(f"chunk pages: {info['chunk_pages']}")
    print(f"file size:   {info['file_size']} bytes")
    print(f"regions:     {len(info['regions'])}")
    for r in info["regions"]:
        share = 100.0 * r["present_pages"] / r["pages"] if r["pages"] else 0.0
        print(
            f"  {r['name']}: {r['length']} bytes, {r['pages']} pages, "
            f"{r['present_pages']} present ({share:.1f}%)"
        )
    if verified is not None:
        print(f"verified:    {verified} pages, all checksums match")
    return 0


def _describe(path: str, source: Snapshot | RawMemoryFile) -> dict[str, Any]:
    snapshot = isinstance(source, Snapshot)
    return {
        "path": path,
        "format": "pyuffd snapshot" if snapshot else "raw memory image",
        "page_size": source.page_size,
        "chunk_pages": source.chunk_pages if isinstance(source, Snapshot) else None,
        "file_size": os.fstat(source.fileno()).st_size,
        "regions": [
            {
                "name": r.name,
                "length": r.length,
                "pages": r.length // source.page_size,
                "present_pages": r.present_pages,
            }
            for r in source.regions
        ],
    }


def _verify(snap: Snapshot, advance: Callable[[int, int], None]) -> int:
    """Read every stored page once (each chunk's checksum is checked on its first read).

    Calls ``advance(done, total)`` in pages as it goes; returns the pages verified.
    """
    total = sum(r.present_pages for r in snap.regions)
    done = 0
    advance(done, total)
    for region in snap.regions:
        for offset, length, present in snap.extents(region.name):
            if not present:
                continue
            for at in range(offset, offset + length, _VERIFY_BLOCK):
                n = min(_VERIFY_BLOCK, offset + length - at)
                snap.read(region.name, at, n)
                done += n // snap.page_size
                advance(done, total)
    return done


def _progress(args: argparse.Namespace) -> Callable[[int, int], None]:
    """How --verify shows progress: tqdm, else a counter on a terminal, else nothing.

    ``--progress`` forces a display (and warns when tqdm is missing);
    ``--no-progress`` turns it off; the default shows one on a terminal.
    """
    wanted = sys.stderr.isatty() if args.progress is None else args.progress
    if not wanted:
        return lambda done, total: None
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        if args.progress:
            print(
                "uffd snapshot info: warning: --progress: tqdm is not installed "
                "(pip install 'pyuffd[progress]'); showing a plain counter",
                file=sys.stderr,
            )
        return _counter
    bar: list[Any] = []

    def advance(done: int, total: int) -> None:
        if not bar:
            bar.append(tqdm(total=total, unit="page", desc="verify", file=sys.stderr))
        bar[0].update(done - bar[0].n)
        if done == total:
            bar[0].close()

    return advance


def _counter(done: int, total: int) -> None:
    end = "\n" if done == total else ""
    print(f"\rverified {done} of {total} pages", end=end, file=sys.stderr, flush=True)


def _cmd_snapshot_create(args: argparse.Namespace) -> int:
    if args.from_raw is not None and (args.range or args.freeze):
        print("uffd snapshot create: --range and --freeze need --pid", file=sys.stderr)
        return 2
    if args.pid is not None and args.page_size is not None:
        print(
            "uffd snapshot create: --page-size is for --from-raw; a process is read "
            "in the system page size",
            file=sys.stderr,
        )
        return 2
    try:
        if args.from_raw is not None:
            kwargs = {} if args.page_size is None else {"page_size": args.page_size}
            info = snapshot_from_raw(args.out, args.from_raw, **kwargs)
            source = args.from_raw
        else:
            info = capture_process(args.out, args.pid, args.range or None, freeze=args.freeze)
            source = f"process {args.pid}"
    except (ValueError, OSError) as err:
        print(f"uffd snapshot create: {err}", file=sys.stderr)
        return 1
    _print_created(info, source)
    return 0


def _print_created(info: SnapshotInfo, source: str) -> None:
    pages = sum(r.length for r in info.regions) // info.page_size
    stored = sum(r.present_pages for r in info.regions)
    count = len(info.regions)
    print(
        f"wrote {info.path} from {source}: {count} region{'s' if count != 1 else ''}, "
        f"{stored} of {pages} pages stored (zero pages left out), {info.file_size} bytes"
    )


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
        "snapshot", help="make and inspect snapshot files; push them to Redis and pull them back"
    )
    actions = snapshot.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    create = actions.add_parser(
        "create",
        help="write a snapshot from a raw memory image or a live process",
        description="Write OUT (atomically, mode 0600) from a raw memory image, as one region "
        "'mem', or from process PID's memory read through /proc/PID/mem: every private "
        "writable mapping (one region each, named by start address and what it maps), or "
        "the --range ADDR:LEN given. Zero pages are not stored. Only memory is captured, no "
        "registers or files. Reading another process needs ptrace access (root or "
        "CAP_SYS_PTRACE).",
    )
    create.add_argument("out", metavar="OUT", help="the snapshot file to write")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-raw", metavar="FILE", help="a raw memory image to convert")
    source.add_argument("--pid", type=positive_int, help="the process to capture")
    create.add_argument(
        "--page-size",
        type=page_size,
        metavar="BYTES",
        help="page size of a raw image (default: the system's)",
    )
    create.add_argument(
        "--range",
        type=address_range,
        action="append",
        metavar="ADDR:LEN",
        help="capture this range only (repeatable; page-aligned, e.g. 0x7f12a000:0x4000)",
    )
    create.add_argument(
        "--freeze",
        action="store_true",
        help="stop the process (SIGSTOP) while reading it, then continue it (SIGCONT)",
    )
    create.set_defaults(func=_cmd_snapshot_create)

    info = actions.add_parser(
        "info",
        help="print page size, regions, present pages and size",
        description="Describe PATH, a pyuffd snapshot or a raw memory image (what "
        "`uffd serve` accepts); a raw image is one region 'mem' whose holes are absent pages.",
    )
    info.add_argument("path", metavar="PATH")
    info.add_argument("--verify", action="store_true", help="check every chunk's checksum")
    info.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show --verify's progress (tqdm when installed, else a counter; "
        "default: when stderr is a terminal)",
    )
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_cmd_snapshot_info)
    _add_store_parsers(actions)
