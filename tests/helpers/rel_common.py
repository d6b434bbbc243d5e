"""Shared pieces of the reliability and security tests (test_stress, test_fault_injection,
test_fuzz, test_security, test_unprivileged) and of their child scripts (rel_*.py).

Importable both from the tests (``from helpers.rel_common import ...``) and from a
child script started as ``python tests/helpers/rel_x.py`` (its directory is on
sys.path). Nothing here imports pytest, so children stay light.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parent.parent
NOBODY = 65534
SEED = 0x5EED

_PAGE_HEAD = struct.Struct("<QQ")


def page_pattern(index: int, page_size: int, seed: int = SEED) -> bytes:
    """The known contents of page ``index``: (seed, index) repeated, so every page differs."""
    return _PAGE_HEAD.pack(seed, index) * (page_size // _PAGE_HEAD.size)


def pattern(npages: int, page_size: int, seed: int = SEED) -> bytes:
    """``npages`` pages of :func:`page_pattern`."""
    return b"".join(page_pattern(i, page_size, seed) for i in range(npages))


def page_identity(page: bytes, seed: int = SEED) -> int | None:
    """Which pattern page this is (its index), -1 for an all-zero page, None for anything else."""
    if not any(page):
        return -1
    head_seed, index = _PAGE_HEAD.unpack_from(page)
    if head_seed == seed and page == page_pattern(index, len(page), seed):
        return int(index)
    return None


def build_counters(out_dir: str | os.PathLike[str]) -> ctypes.CDLL:
    """Compile tests/helpers/rel_counters.c into ``out_dir`` and load it with ctypes."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise FileNotFoundError("no C compiler (gcc/cc) on PATH to build rel_counters.c")
    so = Path(out_dir) / "rel_counters.so"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-pthread", "-o", str(so),
         str(HELPERS / "rel_counters.c")],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    lib = ctypes.CDLL(str(so))
    u64, vp, sz = ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t
    lib.counters_new.restype = vp
    lib.counters_new.argtypes = [sz, sz]
    lib.counters_free.argtypes = [vp]
    lib.counters_init_pages.argtypes = [vp, u64]
    lib.counters_run.restype = u64
    lib.counters_run.argtypes = [vp, u64, u64, ctypes.c_uint]
    lib.counters_check.restype = u64
    lib.counters_check.argtypes = [vp, u64]
    lib.counters_expected.restype = u64
    lib.counters_expected.argtypes = [vp, sz]
    lib.counters_stats.argtypes = [vp, ctypes.POINTER(u64 * 4)]
    lib.kernel_read.restype = ctypes.c_long
    lib.kernel_read.argtypes = [ctypes.c_int, u64, sz]
    return lib


def drop_privileges(uid: int = NOBODY, gid: int = NOBODY) -> None:
    """Become ``uid``/``gid`` for good (no supplementary groups, no capabilities left)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    assert os.getuid() == uid and os.geteuid() == uid


def spawn(script: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """Start ``tests/helpers/<script>`` with this interpreter; stdout (its JSON) is a pipe."""
    return subprocess.Popen(
        [sys.executable, str(HELPERS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        cwd=str(ROOT),
    )


def finish(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait (bounded) for a child started by :func:`spawn`; its last stdout line as JSON.

    A child still running after ``timeout`` is killed and the failure names it.
    """
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        raise AssertionError(
            f"{proc.args[1]} still running after {timeout} s; stderr: {err.decode()[-2000:]}"
        ) from None
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 0 and lines, (
        f"{proc.args[1]} exited {proc.returncode}; stdout {out.decode()[-1000:]!r}; "
        f"stderr {err.decode()[-3000:]}"
    )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def send_json(sock: socket.socket, obj: Any, fds: list[int] | None = None) -> None:
    """One JSON message (length-prefixed), with fds as SCM_RIGHTS when given."""
    data = json.dumps(obj).encode()
    msg = struct.pack("=I", len(data)) + data
    if fds:
        socket.send_fds(sock, [msg], fds)
    else:
        sock.sendall(msg)


def recv_json(sock: socket.socket) -> tuple[Any, list[int]]:
    """The next :func:`send_json` message and the fds that came with it."""
    head, fds, _, _ = socket.recv_fds(sock, 4, 4)
    if len(head) < 4:
        raise ConnectionError(f"peer closed the socket (got {head!r})")
    (n,) = struct.unpack("=I", head)
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed the socket mid-message")
        data += chunk
    return json.loads(data), list(fds)


def arm_alarm(seconds: int) -> None:
    """In a child script: die by SIGALRM after ``seconds`` whatever happens (never hang a test)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(seconds)


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.005) -> None:
    """Poll ``predicate`` until true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
