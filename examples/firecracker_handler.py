"""Firecracker UFFD handler: the daemon serving a stand-in that speaks Firecracker's handshake.

Firecracker restores a microVM snapshot with ``"mem_backend": {"backend_type":
"Uffd", "backend_path": SOCKET}``: it maps guest memory anonymous, opens a
userfaultfd (EVENT_REMOVE), registers each region MISSING, connects to SOCKET
and sends one message: the serde_json list of GuestRegionUffdMapping with
the fd attached (SCM_RIGHTS). The memory snapshot file is raw guest memory.

Here:

1. a raw memory file of ``--size`` bytes is written (the "memory snapshot");
2. ``python -m uffd handler --source mem.raw --once`` listens on a socket
   (the first time with ``--no-prefetch``: a record run, in which every page
   the guest touches is a fault);
3. a stand-in process does exactly what Firecracker does, byte for byte,
   with ``--regions`` guest regions, then "boots": reads guest memory;
4. the stand-in's page hashes are checked against the memory file, and the
   bytes it sent are parsed back with ``uffd.restore.firecracker.parse_mappings``;
5. the same restore runs a second time, with prefetch: the daemon recorded
   the pages the first run faulted on (``mem.raw.ws.json``) and installs them first.

Run: ``python examples/firecracker_handler.py [--size 8M] [--regions 2]``.
Point a real Firecracker at ``python -m uffd handler --socket S --source
MEMORY_FILE`` the same way. Exits 0 when guest memory matches the file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _helpers import (
    DaemonProcess,
    finish_worker,
    parse_size,
    pattern,
    spawn_worker,
    wrong_pages,
)

from uffd.restore.firecracker import parse_mappings


def _boot(tmp: str, memory: str, args: argparse.Namespace, run: int) -> tuple[bool, dict, dict]:
    sock = os.path.join(tmp, f"uffd-{run}.sock")
    digests = os.path.join(tmp, f"digests-{run}")
    handshake = os.path.join(tmp, f"handshake-{run}.json")
    # Run 1 records: with prefetch racing the guest, which pages end up faulted
    # (and so recorded) would be down to timing.
    record = ("--no-prefetch",) if run == 1 else ()
    log = os.path.join(tmp, "daemon.log")
    with DaemonProcess(sock, memory, "--once", *record, log_path=log) as daemon:
        worker = spawn_worker(
            "firecracker",
            "--socket",
            sock,
            "--size",
            str(args.size),
            "--regions",
            str(args.regions),
            "--digests",
            digests,
            "--handshake-out",
            handshake,
        )
        result = finish_worker(worker)
        (report,) = daemon.reports(1)
        code = daemon.wait()
    sent = Path(handshake).read_bytes()
    mappings = parse_mappings(sent)
    if run == 1:
        print(f"the stand-in sent {len(sent)} bytes with its userfaultfd attached:")
        print(f"  {sent.decode()}")
        for i, m in enumerate(mappings):
            print(
                f"  region {i}: host {m.base_host_virt_addr:#x} +{m.size:#x} <- file offset "
                f"{m.offset:#x}, page size {m.page_size}"
            )
    wrong = wrong_pages(digests, memory, args.size)
    ok = not wrong and code == 0 and not report["errors"]
    print(
        f"run {run}: guest read {result['pages']} pages, {report['faulted']} faulted, "
        f"{report['prefetched']} prefetched ({report['working_set']} from the working set); "
        f"first access {result['first_access_ms']:.2f} ms; daemon exit {code}; "
        f"{'memory matches the file' if not wrong else f'{len(wrong)} pages DIFFER'}"
    )
    return ok, result, report


def main(argv: list[str] | None = None) -> int:
    """Write the memory file, boot the stand-in twice through the daemon, verify."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("8M"))
    parser.add_argument("--regions", type=int, default=2, help="guest memory regions")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="uffd-fc-") as tmp:
        memory = os.path.join(tmp, "mem.raw")
        Path(memory).write_bytes(pattern(args.size, seed=7))
        print(f"memory snapshot file: {memory}, {args.size >> 10} KiB of raw guest memory")
        ok1, _, _ = _boot(tmp, memory, args, 1)
        recorded = Path(memory + ".ws.json")
        print(f"working set recorded: {recorded.name} ({recorded.stat().st_size} bytes)")
        ok2, _, report = _boot(tmp, memory, args, 2)
        ok = ok1 and ok2 and report["working_set"] > 0
    if not ok:
        print("FAILED")
        return 1
    print("both boots restored guest memory exactly; the second installed the working set first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
