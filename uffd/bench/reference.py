"""Build and run the C reference handler, ``csrc/bench/ref_handler.c``.

The reference is the textbook userfaultfd(2) handler (blocking ``read()``
of one ``struct uffd_msg``, one page-sized UFFDIO_COPY per fault; see
ioctl_userfaultfd(2)) running whole workloads in one process, so the suite
compares pyuffd against C measured in the same run on the same machine.
The same build step produces ``libtouch.so`` for
:mod:`uffd.bench.naive_ctypes`.

The sources are read from the source tree (``csrc/bench``), so this works
from a checkout or an editable install, not from a wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "WORKLOADS",
    "build_reference",
    "default_build_dir",
    "run_reference",
    "touch_library",
]

WORKLOADS = ("random", "sequential", "threads", "notouch", "bulkcopy", "pagemap_scan")

_REPO = Path(__file__).resolve().parents[2]
_SRC_DIR = _REPO / "csrc" / "bench"
_CFLAGS = ("-O2", "-Wall", "-Wextra", "-pthread")


def default_build_dir() -> Path:
    """Return ``$UFFD_BUILD_DIR`` if set, else ``build/bench`` in the repository."""
    env = os.environ.get("UFFD_BUILD_DIR")
    return Path(env) if env else _REPO / "build" / "bench"


def _compile(src: Path, out: Path, extra: tuple[str, ...]) -> None:
    """Compile src into out with gcc unless out is at least as new as src.

    The output is written under a temporary name and renamed into place, so
    two processes building at once never run a half-written file.

    Raises:
        RuntimeError: gcc is missing or failed; the message carries its stderr.
    """
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    cmd = ["gcc", *_CFLAGS, *extra, "-o", str(tmp), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise RuntimeError(f"cannot build {out.name}: gcc is not installed") from err
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"gcc failed building {out.name} from {src} "
            f"(exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    os.replace(tmp, out)


def build_reference(out_dir: Path) -> Path:
    """Compile ``ref_handler`` and ``libtouch.so`` into out_dir if stale; return ``ref_handler``.

    Each is rebuilt when missing or older than its source.

    Raises:
        RuntimeError: gcc is missing or failed; the message carries its stderr.
    """
    out_dir = Path(out_dir)
    binary = out_dir / "ref_handler"
    _compile(_SRC_DIR / "ref_handler.c", binary, ())
    _compile(_SRC_DIR / "touch.c", out_dir / "libtouch.so", ("-shared", "-fPIC"))
    return binary


def touch_library(out_dir: Path) -> Path:
    """Build if stale and return the path of ``libtouch.so`` in out_dir.

    Raises:
        RuntimeError: gcc is missing or failed.
    """
    build_reference(out_dir)
    return Path(out_dir) / "libtouch.so"


def run_reference(
    workload: str,
    pages: int,
    *,
    threads: int = 1,
    handler_cpu: int = -1,
    toucher_cpu: int = -1,
    repeat: int = 3,
    stride: int = 4,
    seed: int = 1,
    build_dir: Path | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Run one workload in the C reference and return its parsed JSON report.

    Builds the binary first if needed (into build_dir, default
    :func:`default_build_dir`).  A cpu of -1 leaves that side unpinned.
    ``threads`` applies to the ``threads`` workload only, ``stride`` to
    ``pagemap_scan`` only.  The report holds one list per figure (one value
    per repeat) and their medians under ``"median"``; see ref_handler.c.
    The default timeout allows 1 ms per page per repeat plus a minute.
    ``pagemap_scan`` requires Linux 6.7 (PAGEMAP_SCAN, UFFD_FEATURE_WP_ASYNC).

    Raises:
        ValueError: unknown workload, or threads != 1 for another workload.
        RuntimeError: the build failed, the run timed out, or it exited
            non-zero (including a failed content check); the message carries
            the command line and its stderr.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if threads != 1 and workload != "threads":
        raise ValueError(f"threads={threads} only applies to the 'threads' workload")
    binary = build_reference(build_dir if build_dir is not None else default_build_dir())
    cmd = [
        str(binary),
        workload,
        f"--pages={pages}",
        f"--threads={threads}",
        f"--handler-cpu={handler_cpu}",
        f"--toucher-cpu={toucher_cpu}",
        f"--repeat={repeat}",
        f"--seed={seed}",
        f"--stride={stride}",
    ]
    if timeout is None:
        timeout = 60.0 + 0.001 * pages * repeat
    shown = " ".join(cmd[1:])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"ref_handler {shown} timed out after {timeout:.0f} s") from err
    if proc.returncode != 0:
        raise RuntimeError(
            f"ref_handler {shown} exited with status {proc.returncode}: "
            f"{proc.stderr.strip() or '(no stderr)'}"
        )
    lines = proc.stdout.strip().splitlines()
    try:
        report: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise RuntimeError(f"ref_handler {shown} printed no JSON report: {proc.stdout!r}") from err
    return report
