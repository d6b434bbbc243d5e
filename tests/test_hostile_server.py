"""A hostile page server against both clients: bounded memory, bounded time, a clear error.

Each case runs in a child process (tests/helpers/hostile_page_server.py): a fake
server thread that misbehaves one way, and a ThreadedPageClient then a
PageClient fetching one page from it. The child's RSS is sampled with psutil
while it runs and its peak (VmHWM) reported at the end; both must stay
under ``RSS_BOUND`` whatever sizes the server claims (4 GiB frames, 2^62-byte
zero ranges, 32 MiB of replies to requests nobody made).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

CHILD = Path(__file__).parent / "helpers" / "hostile_page_server.py"
# A fresh interpreter with uffd imported peaks around 27 MiB; the late-reply
# flood adds the fake server's own 1 MiB frames and the asyncio client's
# per-frame copies. A client that buffered what a header claims would be at 4 GiB.
RSS_BOUND = 96 << 20
TIMEOUT = 1.0  # the child's request_timeout

# case -> (outcome type, a phrase of the ThreadedPageClient's message)
CASES = {
    "hello_4g_frames": ("PeerGoneError", "over this client's limit"),
    "hello_zero_pending": ("PeerGoneError", "make no sense"),
    "silent_handshake": ("TimeoutError", "no handshake"),
    "garbage": ("PeerGoneError", "sent garbage"),
    "regions_page_size_0": ("PeerGoneError", "page size 0"),
    "regions_misaligned": ("PeerGoneError", "not a multiple of the page size"),
    "data_header_4g": ("PeerGoneError", "over the limit"),
    "error_1mib": ("PeerGoneError", "over the limit of 65536"),
    "data_outside": ("PeerGoneError", "outside request"),
    "zero_huge": ("PeerGoneError", "outside request"),
    "end_too_much": ("PeerGoneError", "END says"),
    "silent_after_read": ("TimeoutError", "no reply to READ"),
    "late_flood_then_reply": ("ok", ""),
}


def run_case(case: str) -> tuple[dict[str, object], int]:
    """The child's JSON result and the largest RSS psutil saw while it ran."""
    child = subprocess.Popen(
        [sys.executable, str(CHILD), case], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc = psutil.Process(child.pid)
    sampled = 0
    deadline = time.monotonic() + 30
    while child.poll() is None and time.monotonic() < deadline:
        try:
            sampled = max(sampled, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    out, err = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
    assert child.returncode == 0, err.decode()
    return json.loads(out), sampled


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_server_bounded(case: str) -> None:
    """Each hostile-server behaviour ends in the expected error (or a correct page) for both
    clients within 2x the request timeout, with the client's RSS under 96 MiB."""
    kind, phrase = CASES[case]
    result, sampled = run_case(case)
    for client in ("threaded", "asyncio"):
        got = result[client]
        assert isinstance(got, dict)
        assert got["type"] == kind, (client, got)
        assert float(got["seconds"]) < 2 * TIMEOUT + 0.5, (client, got)
        if kind == "ok":
            assert got["correct"] is True, (client, got)
    threaded = result["threaded"]
    assert isinstance(threaded, dict)
    assert phrase in str(threaded.get("message", "")), threaded
    maxrss = int(str(result["maxrss"]))
    print(f"\n{case}: peak RSS {maxrss >> 20} MiB, sampled {sampled >> 20} MiB")
    assert maxrss < RSS_BOUND and sampled < RSS_BOUND
