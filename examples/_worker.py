"""The worker process restored by the UFFD handler daemon (examples and tests run it).

Modes (``python examples/_worker.py MODE --socket PATH ...``):

``restore``
    Map ``--size`` bytes (``--regions`` separate anonymous mappings), open a
    userfaultfd (EVENT_REMOVE, plus POISON when the kernel has it, so the
    "sigbus" fallback can poison), register everything MISSING, send the fd
    and the regions (at ``--offset`` in the source) to ``--socket`` with the
    Firecracker handshake, then read every page once in ``--order`` (random
    or sequential) and hash it. ``--balloon OFF:LEN`` drops that range
    (MADV_DONTNEED, a balloon inflating) after the reads, or before them with
    ``--balloon-first``, and reads it again. ``--pause-after N`` stops after N
    pages until a line arrives on stdin; ``--wait-go`` waits for one before
    the handover. Prints one JSON line; ``--digests FILE`` receives the
    8-byte BLAKE2b of every page, in order.

``firecracker``
    A stand-in for Firecracker's restore: guest memory mapped anonymous,
    a userfaultfd opened like Firecracker's (EVENT_REMOVE, O_NONBLOCK,
    O_CLOEXEC), every region registered MISSING, then the handshake built
    byte for byte as serde_json writes it, sent in one sendmsg with the fd,
    and the connection dropped. Then it "boots": reads guest memory.

``writer``
    The live source of the post-copy example: sends its own userfaultfd
    (WP_ASYNC | WP_UNPOPULATED) to the controller over ``--socket``, waits
    for a line on stdin, then keeps writing pages until stopped (SIGSTOP,
    SIGKILL).

A worker that is not served dies by SIGALRM after ``--timeout`` seconds
instead of hanging.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import mmap
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from _helpers import DIGEST, PAGE, page_digest, parse_size, pattern

import uffd
from uffd import Feature, Mode, mem
from uffd.restore.firecracker import GuestRegionUffdMapping, connect_and_send

# -- the worker process side -----------------------------------------------------


def _features(extra: Feature) -> Feature:
    with uffd.Userfaultfd() as probe:
        available = probe.available
    return Feature(extra | (Feature.POISON & available))


def _map_regions(size: int, count: int) -> list[mem.Region]:
    pages = size // PAGE
    sizes = [pages // count + (1 if i < pages % count else 0) for i in range(count)]
    return [mem.anon(n * PAGE) for n in sizes if n]


def _order(npages: int, how: str, seed: int) -> Iterable[int]:
    if how == "sequential":
        return range(npages)
    order = list(range(npages))
    random.Random(seed).shuffle(order)
    return order


def _read_pages(
    regions: list[mem.Region],
    order: Iterable[int],
    digests: bytearray,
    pause_after: int | None = None,
) -> tuple[int, float | None]:
    """Read and hash pages in ``order`` (flat page indices); returns (SIGBUS count, first ms).

    With ``pause_after``, after that many pages print ``{"paused": N}`` and
    wait for a line on stdin (the parent breaks something meanwhile).
    """
    starts = []
    total = 0
    for region in regions:
        starts.append(total)
        total += region.length // PAGE
    sigbus = 0
    first: float | None = None
    for done, index in enumerate(order):
        if done == pause_after:
            print(json.dumps({"paused": done}), flush=True)
            sys.stdin.readline()
        r = bisect.bisect_right(starts, index) - 1
        region = regions[r]
        t = time.perf_counter()
        try:
            data = region.read((index - starts[r]) * PAGE, PAGE)
        except uffd.PageAccessError:
            sigbus += 1
            data = b"SIGBUS"
        if first is None:
            first = (time.perf_counter() - t) * 1e3
        digests[index * DIGEST : (index + 1) * DIGEST] = page_digest(data)
    return sigbus, first


def restore(args: argparse.Namespace) -> int:
    """The restore worker: register, hand the fd to the daemon, read everything, report."""
    regions = _map_regions(args.size, args.regions)
    ufd = uffd.Userfaultfd(_features(Feature.EVENT_REMOVE))
    mappings = []
    offset = args.offset
    for region in regions:
        ufd.register(region.addr, region.length, Mode.MISSING)
        mappings.append(GuestRegionUffdMapping(region.addr, region.length, offset, PAGE))
        offset += region.length
    balloon = None
    if args.balloon:
        balloon = tuple(int(x, 0) for x in args.balloon.split(":"))
    npages = sum(r.length for r in regions) // PAGE
    digests = bytearray(npages * DIGEST)
    order = _order(npages, args.order, args.seed)
    if args.wait_go:
        sys.stdin.readline()
    handover = time.monotonic()
    t0 = time.perf_counter()
    connect_and_send(args.socket, ufd, mappings)
    if balloon and args.balloon_first:
        # Inflate before anything was read: the prefetcher must not fill the range.
        regions[0].madvise(mmap.MADV_DONTNEED, *balloon)
    sigbus, first = _read_pages(regions, order, digests, args.pause_after)
    elapsed = time.perf_counter() - t0
    result: dict[str, object] = {
        "handover_monotonic": handover,
        "pid": os.getpid(),
        "pages": npages,
        "sigbus": sigbus,
        "first_access_ms": first,
        "elapsed_s": elapsed,
        "digest": hashlib.blake2b(digests, digest_size=16).hexdigest(),
    }
    if balloon:
        # Inflate a balloon: the pages go away (a REMOVE event), later reads must see zeros.
        start, length = balloon
        if not args.balloon_first:
            regions[0].madvise(mmap.MADV_DONTNEED, start, length)
        zero = bytes(PAGE)
        result["balloon_pages"] = length // PAGE
        result["balloon_zero_pages"] = sum(
            regions[0].read(o, PAGE) == zero for o in range(start, start + length, PAGE)
        )
    if args.digests:
        Path(args.digests).write_bytes(digests)
    print(json.dumps(result), flush=True)
    return 0


def firecracker(args: argparse.Namespace) -> int:
    """Stand in for Firecracker: its uffd, its registration, its handshake bytes; then boot."""
    regions = _map_regions(args.size, args.regions)
    # UffdBuilder: require EVENT_REMOVE, close_on_exec, non_blocking, not user-mode-only.
    ufd = uffd.Userfaultfd(Feature.EVENT_REMOVE, nonblock=True, cloexec=True)
    parts = []
    offset = 0
    for region in regions:
        ufd.register(region.addr, region.length, Mode.MISSING)
        # serde_json::to_string(&Vec<GuestRegionUffdMapping>): compact, declaration order.
        parts.append(
            f'{{"base_host_virt_addr":{region.addr},"size":{region.length},"offset":{offset},'
            f'"page_size":{PAGE},"page_size_kib":{PAGE}}}'
        )
        offset += region.length
    body = ("[" + ",".join(parts) + "]").encode()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(args.socket)
    # UnixStream::send_with_fd: one sendmsg, SCM_RIGHTS with the one fd.
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", ufd.fileno()))])
    sock.close()  # Firecracker drops the stream at once; it keeps its copy of the uffd.
    if args.handshake_out:
        Path(args.handshake_out).write_bytes(body)
    npages = sum(r.length for r in regions) // PAGE
    digests = bytearray(npages * DIGEST)
    t0 = time.perf_counter()
    sigbus, first = _read_pages(regions, _order(npages, args.order, args.seed), digests)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "pages": npages,
                "sigbus": sigbus,
                "first_access_ms": first,
                "elapsed_s": time.perf_counter() - t0,
                "handshake": body.decode(),
                "digest": hashlib.blake2b(digests, digest_size=16).hexdigest(),
            }
        ),
        flush=True,
    )
    if args.digests:
        Path(args.digests).write_bytes(digests)
    return 0


def writer(args: argparse.Namespace) -> int:
    """The post-copy source: memory of a known start, written at random until stopped.

    Nine writes in ten go to a hot sixteenth of the memory, so pre-copy
    rounds converge on it; each write stores a counter, 8 bytes.
    """
    region = mem.anon(args.size)
    region.write(0, pattern(args.size, args.seed))
    ufd = uffd.Userfaultfd(Feature.WP_ASYNC | Feature.WP_UNPOPULATED)
    mapping = GuestRegionUffdMapping(region.addr, region.length, 0, PAGE)
    connect_and_send(args.socket, ufd, [mapping])
    rng = random.Random(args.seed)
    npages = args.size // PAGE
    hot = max(1, npages // 16)
    # Wait until the controller has armed the tracker.
    sys.stdin.readline()
    counter = 0
    while True:
        counter += 1
        index = rng.randrange(hot) if rng.random() < 0.9 else rng.randrange(npages)
        region.write(index * PAGE + (counter % (PAGE // 8)) * 8, struct.pack("<Q", counter))
        if counter % 32 == 0:
            time.sleep(0.001)


def main(argv: list[str] | None = None) -> int:
    """Parse the mode and its options, arm the timeout, run it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("restore", "firecracker", "writer"):
        p = sub.add_parser(name)
        p.add_argument("--socket", required=True)
        p.add_argument("--size", type=parse_size, default=4 << 20)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--timeout", type=int, default=60)
        if name != "writer":
            p.add_argument("--regions", type=int, default=1)
            p.add_argument("--order", choices=("random", "sequential"), default="random")
            p.add_argument("--digests")
        if name == "restore":
            p.add_argument("--offset", type=lambda s: int(s, 0), default=0)
            p.add_argument("--balloon", metavar="OFF:LEN")
            p.add_argument("--balloon-first", action="store_true")
            p.add_argument("--pause-after", type=int, metavar="PAGES")
            p.add_argument("--wait-go", action="store_true", help="hand over after a stdin line")
        if name == "firecracker":
            p.add_argument("--handshake-out")
    args = parser.parse_args(argv)
    # Never hang: an unserved fault is interrupted by SIGALRM's default action.
    signal.alarm(args.timeout)
    return {"restore": restore, "firecracker": firecracker, "writer": writer}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
