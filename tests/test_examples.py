"""Every example runs as a script, prints what it did and exits 0 (small sizes)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 120


def run_example(name: str, *args: str) -> str:
    """Run ``examples/NAME`` with ``args``; assert exit 0; return its stdout."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_page_server_example() -> None:
    """page_server.py serves a snapshot and reads every byte back through a client."""
    out = run_example("page_server.py", "--size", "1M")
    assert "serving " in out and "tcp://127.0.0.1:" in out
    assert "every byte read back matches the snapshot" in out


@pytest.mark.parametrize(
    "args",
    [("--size", "2M"), ("--size", "1M", "--daemon", "process", "--order", "sequential")],
    ids=["thread-random", "process-sequential"],
)
def test_lazy_restore_example(args: tuple[str, ...]) -> None:
    """lazy_restore.py restores a worker process from a page server and verifies every page."""
    out = run_example("lazy_restore.py", *args)
    pages = int(args[1].rstrip("M")) * 256
    assert f"verified {pages} pages against the snapshot" in out and "all match" in out
    assert re.search(r"daemon: \d+ pages faulted, \d+ prefetched", out)


def test_firecracker_handler_example() -> None:
    """firecracker_handler.py serves the stand-in twice, the second time with the working set."""
    out = run_example("firecracker_handler.py", "--size", "4M", "--regions", "2")
    assert '"page_size":4096,"page_size_kib":4096' in out
    assert out.count("memory matches the file") == 2
    second = re.search(r"run 2: .* \((\d+) from the working set\)", out)
    assert second and int(second.group(1)) > 0


def test_postcopy_migration_example() -> None:
    """postcopy_migration.py: the destination's memory hashes equal to the source's final memory."""
    out = run_example("postcopy_migration.py", "--size", "4M", "--rounds", "3")
    assert re.search(r"pre-copy round 1: \d+ dirty pages copied", out)
    assert "source stopped; stop-and-copy of" in out
    assert re.search(
        r"destination memory == source's final memory: 1024 pages, hash [0-9a-f]{32}", out
    )


def test_demo() -> None:
    """demo.py (what `make demo` runs) prints its figures and verifies every page (16 MiB here)."""
    out = run_example("demo.py", "--size", "16M")
    for label in (
        "time to first access:",
        "pages faulted:",
        "pages prefetched:",
        "restore throughput:",
    ):
        assert label in out
    assert "verified 4096 pages: every page matches the snapshot" in out


def test_guest_memfd_example() -> None:
    """guest_memfd.py serves a forked guest's memfd by pwrite + CONTINUE without mapping it."""
    out = run_example("guest_memfd.py", "--size", "1M", "--prefetch", "16")
    assert "240 filled with pwrite then continued (MISSING), 16 continued" in out
    assert "handler process maps the memfd: no" in out
    assert "guest memory == snapshot: yes" in out
