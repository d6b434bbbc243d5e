"""The ``restore-daemon`` workload: lazy restore as users run it, measured in the faulting process.

The product path, every piece a separate process: ``uffd serve FILE`` (the
page server), ``uffd handler --source tcp://...`` (the handler daemon, or
``--source FILE`` for the local-file variant) and ``restore_vmm``
(``csrc/bench/restore_vmm.c``), a stand-in VMM that maps the memory, opens
a userfaultfd, registers it MISSING and hands fd + Firecracker JSON to the
daemon, then touches a random page every ``pace_us`` while prefetch runs,
timing each access in C, until mincore(2) says every page is present; it
then checks every byte of every page.

Figures of one run (:func:`run_daemon_restore`): ``fault_us_p50``/``p99``
(accesses to pages that were not present just before: the urgent faults),
``restore_gbps`` and ``pages_per_s`` (handshake → every page present),
``first_access_ms`` (handshake → the first access, made at once, done),
and the CPU seconds the handler daemon and the page server burnt over the
run (psutil). Unpinned: three processes share the host's CPUs.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from uffd.bench.reference import _SRC_DIR, _compile, default_build_dir

__all__ = ["HandlerDaemonProcess", "PipeLines", "run_daemon_restore", "vmm_binary"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def vmm_binary(build_dir: Path | None = None) -> Path:
    """Build ``restore_vmm`` if stale; its path.

    Raises:
        RuntimeError: gcc is missing or failed.
    """
    out = Path(build_dir if build_dir is not None else default_build_dir()) / "restore_vmm"
    _compile(_SRC_DIR / "restore_vmm.c", out, ())
    return out


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


class PipeLines:
    """The lines a child writes to the pipe ``fd``, each wait bounded.

    Reads the fd itself and splits the lines here: a buffered file's
    ``readline`` after ``select`` keeps a second line that came in the same
    read in its buffer, where ``select`` never sees it (two session reports
    at once), and blocks on a line that has not ended yet.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = b""
        self._eof = False

    def readline(self, timeout: float) -> str:
        """The next line with its newline; "" at EOF (the last line may lack its newline).

        Raises:
            TimeoutError: no whole line (nor EOF) came in ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer and not self._eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                raise TimeoutError(f"no line in {timeout} s")
            chunk = os.read(self._fd, 1 << 16)
            self._eof = not chunk
            self._buffer += chunk
        line, newline, self._buffer = self._buffer.partition(b"\n")
        return (line + newline).decode()


class HandlerDaemonProcess:
    """``python -m uffd handler --socket ... --source SOURCE --json`` in a child process.

    No working set is loaded or recorded, so every session restores from
    scratch; ``extra`` are more ``uffd handler`` options (the fan-out
    workload passes its own). ``next_report()`` reads the JSON line of the next ended session.

    Raises (constructor):
        RuntimeError: the daemon did not say it is listening within 30 s.
    """

    def __init__(self, source: str, *, extra: tuple[str, ...] = ()) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="uffd-bench-daemon-")
        self.socket = os.path.join(self._dir.name, "handler.sock")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uffd",
                "handler",
                "--socket",
                self.socket,
                "--source",
                source,
                "--json",
                "--no-working-set",
                "--no-progress",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ps = psutil.Process(self.proc.pid)
        assert self.proc.stdout is not None
        self._lines = PipeLines(self.proc.stdout.fileno())
        line = self._line(30.0)
        if not line.startswith("listening on "):
            self.close()
            raise RuntimeError(f"the handler daemon did not start: {line.strip()!r}")

    def _line(self, timeout: float) -> str:
        try:
            return self._lines.readline(timeout)
        except TimeoutError:
            raise RuntimeError(f"the handler daemon printed no line in {timeout} s") from None

    def next_report(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next session's report (the daemon's ``--json`` line).

        Raises:
            RuntimeError: none in ``timeout`` s, or the daemon exited.
        """
        line = self._line(timeout)
        if not line:
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"the handler daemon exited: {err.strip()[-500:]}")
        report: dict[str, Any] = json.loads(line)["session"]
        return report

    def close(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL after 10 s) and remove its directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        self._dir.cleanup()


def _percentile(ordered: list[int], q: float) -> float:
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else 0.0


def run_daemon_restore(
    daemon: HandlerDaemonProcess,
    pages: int,
    *,
    server_pid: int | None = None,
    seed: int = 1,
    pace_us: int = 1000,
    timeout: float = 60.0,
    build_dir: Path | None = None,
) -> dict[str, float]:
    """One lazy restore of ``pages`` pages through ``daemon`` by a fresh ``restore_vmm``.

    Raises:
        RuntimeError: the VMM failed, the restore did not complete in
            ``timeout`` s, a page has the wrong contents, or the daemon's
            session reported errors.
    """
    vmm = vmm_binary(build_dir)
    server = psutil.Process(server_pid) if server_pid is not None else None
    cpu0 = _cpu_s(daemon.ps), _cpu_s(server) if server else 0.0
    cmd = [str(vmm), daemon.socket, str(pages), str(seed), str(pace_us), str(timeout)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60, check=False)
    if proc.returncode:
        raise RuntimeError(f"restore_vmm exited {proc.returncode}: {proc.stderr.strip()}")
    got = json.loads(proc.stdout)
    session = daemon.next_report()
    cpu1 = _cpu_s(daemon.ps), _cpu_s(server) if server else 0.0
    if not got["complete_ns"]:
        raise RuntimeError(
            f"the restore did not complete in {timeout} s (daemon: {session.get('errors')})"
        )
    if got["bad_pages"]:
        raise RuntimeError(f"{got['bad_pages']} restored pages have the wrong contents")
    if session["errors"]:
        raise RuntimeError(f"the daemon's session reported errors: {session['errors'][:3]}")
    faults = sorted(access for _, access, missing in got["touches"] if missing == 1)
    complete = got["complete_ns"]
    return {
        "fault_us_p50": _percentile(faults, 0.5) / 1e3,
        "fault_us_p99": _percentile(faults, 0.99) / 1e3,
        "faults": float(len(faults)),
        "touches": float(len(got["touches"])),
        "restore_s": complete / 1e9,
        "restore_gbps": pages * _PAGE / complete,
        "pages_per_s": pages * 1e9 / complete,
        "first_access_ms": got["first_access_ns"] / 1e6,
        "handshake_ms": got["handshake_ns"] / 1e6,
        "handler_cpu_s": cpu1[0] - cpu0[0],
        "server_cpu_s": cpu1[1] - cpu0[1],
        "daemon_faulted": float(session["faulted"]),
        "session_s": float(session["elapsed"]),
    }
