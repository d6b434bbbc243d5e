"""The ``uffd`` console script: every subcommand's --help, and the documented exit codes.

Runs the installed entry point (next to this interpreter) in a subprocess, as a
user types it: 0 success, 1 a runtime failure with a one-line message, 2 a
usage error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

UFFD = str(Path(sys.executable).with_name("uffd"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([UFFD, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "command", ["probe", "serve", "handler", "snapshot info", "bench"], ids=lambda c: c
)
def test_every_subcommand_has_help(command: str) -> None:
    """``uffd COMMAND --help`` prints that command's usage and exits 0."""
    out = run(*command.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: uffd {command}")


def test_top_level_help_documents_the_exit_codes() -> None:
    """``uffd --help`` lists every subcommand and the exit codes."""
    out = run("--help")
    assert out.returncode == 0
    for command in ("probe", "serve", "handler", "snapshot", "bench"):
        assert command in out.stdout
    assert "exit codes: 0 ok, 1 runtime error, 2 usage error" in out.stdout


def test_probe_json_exits_0_with_the_features() -> None:
    """``uffd probe --json`` is valid JSON naming the kernel and the available features."""
    import uffd

    out = run("probe", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    caps = uffd.probe()
    assert report["kernel"] == caps.kernel
    assert set(report["available"]) == {f.name for f in uffd.Feature if f in caps.available}


def test_usage_error_exits_2() -> None:
    """An unknown command is a usage error: exit 2 and argparse's message."""
    out = run("nosuch")
    assert out.returncode == 2
    assert "invalid choice: 'nosuch'" in out.stderr


def test_runtime_failure_exits_1_with_one_line(tmp_path: Path) -> None:
    """A file that is not a snapshot: exit 1, one line naming the file and the offset, no
    traceback."""
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"garbage\n")
    out = run("snapshot", "info", str(bad))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert str(bad) in out.stderr and "file offset 0" in out.stderr
    missing = run("snapshot", "info", str(tmp_path / "missing.snap"))
    assert missing.returncode == 1 and "No such file" in missing.stderr


def test_version_prints_the_distribution_version() -> None:
    """``uffd --version`` prints the installed distribution's version and exits 0."""
    from importlib import metadata

    out = run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"uffd (pyuffd) {metadata.version('pyuffd')}"


# -- snapshot create / info ------------------------------------------------------

PAGE = 4096


def _raw_image(path: Path, pages: int, filled: list[int]) -> bytes:
    """A raw image of ``pages`` pages, random where listed, zero elsewhere."""
    data = bytearray(pages * PAGE)
    for i in filled:
        data[i * PAGE : (i + 1) * PAGE] = os.urandom(PAGE)
    path.write_bytes(data)
    return bytes(data)


def test_snapshot_create_from_raw_stores_only_nonzero_pages(tmp_path: Path) -> None:
    """``create --from-raw`` writes region 'mem' with the image's bytes; zero pages not stored."""
    from uffd.pagestore.snapshot import Snapshot

    image = _raw_image(tmp_path / "mem.raw", 64, [0, 7, 8, 63])
    out = run(
        "snapshot", "create", str(tmp_path / "s.pyuffd"), "--from-raw", str(tmp_path / "mem.raw")
    )
    assert out.returncode == 0, out.stderr
    assert "1 region, 4 of 64 pages stored" in out.stdout
    with Snapshot.open(tmp_path / "s.pyuffd") as snap:
        assert [(r.name, r.length, r.present_pages) for r in snap.regions] == [
            ("mem", len(image), 4)
        ]
        assert snap.read("mem", 0, len(image)) == image
    info = run("snapshot", "info", str(tmp_path / "s.pyuffd"), "--json")
    assert json.loads(info.stdout)["regions"][0]["present_pages"] == 4


def test_snapshot_create_from_raw_with_a_page_size(tmp_path: Path) -> None:
    """``--page-size 8192`` counts pages of that size; a size that is no power of two exits 2."""
    _raw_image(tmp_path / "mem.raw", 8, [3])
    snap = str(tmp_path / "s.pyuffd")
    out = run(
        "snapshot", "create", snap, "--from-raw", str(tmp_path / "mem.raw"), "--page-size", "8192"
    )
    assert out.returncode == 0, out.stderr
    assert "1 of 4 pages stored" in out.stdout
    assert json.loads(run("snapshot", "info", snap, "--json").stdout)["page_size"] == 8192
    bad = run(
        "snapshot", "create", snap, "--from-raw", str(tmp_path / "mem.raw"), "--page-size", "3000"
    )
    assert bad.returncode == 2 and "--page-size: must be a power of two" in bad.stderr


def test_snapshot_create_refuses_bad_inputs_with_the_reason(tmp_path: Path) -> None:
    """A partial-page image, a snapshot given as raw, a missing process: exit 1, no traceback."""
    (tmp_path / "odd.raw").write_bytes(b"x" * 100)
    odd = run("snapshot", "create", str(tmp_path / "o"), "--from-raw", str(tmp_path / "odd.raw"))
    assert odd.returncode == 1 and "100 bytes, not a positive multiple" in odd.stderr
    _raw_image(tmp_path / "mem.raw", 2, [1])
    assert (
        run(
            "snapshot", "create", str(tmp_path / "s"), "--from-raw", str(tmp_path / "mem.raw")
        ).returncode
        == 0
    )
    again = run("snapshot", "create", str(tmp_path / "t"), "--from-raw", str(tmp_path / "s"))
    assert again.returncode == 1 and "already a pyuffd snapshot" in again.stderr
    gone = run("snapshot", "create", str(tmp_path / "p"), "--pid", "999999999")
    assert gone.returncode == 1 and "no process 999999999" in gone.stderr
    mixed = run("snapshot", "create", str(tmp_path / "p"), "--from-raw", "x", "--freeze")
    assert mixed.returncode == 2 and "need --pid" in mixed.stderr
    badrange = run("snapshot", "create", str(tmp_path / "p"), "--pid", "1", "--range", "0x1000")
    assert badrange.returncode == 2 and "must be ADDR:LEN" in badrange.stderr
    for path in ("o", "t", "p"):
        assert not (tmp_path / path).exists()


_TARGET = """
import mmap, os, sys
PAGE = 4096
buf = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in (2, 3, 40):
    buf[i * PAGE : (i + 1) * PAGE] = bytes([i]) * PAGE
buf[10 * PAGE : 11 * PAGE] = bytes(PAGE)  # touched, but all zeros
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print(hex(addr), flush=True)
for line in sys.stdin:  # "w": write a new page 5; anything else: report and go on
    if line.strip() == "w":
        buf[5 * PAGE : 6 * PAGE] = b"w" * PAGE
    print("alive", flush=True)
"""


@pytest.fixture
def target() -> Any:
    """A child process with a 64-page anonymous mapping: pages 2, 3, 40 filled; its address."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _TARGET], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    addr = int(proc.stdout.readline(), 16)
    yield proc, addr
    proc.kill()
    proc.wait(timeout=10)


def _expected_target_pages() -> bytes:
    data = bytearray(64 * PAGE)
    for i in (2, 3, 40):
        data[i * PAGE : (i + 1) * PAGE] = bytes([i]) * PAGE
    return bytes(data)


def test_snapshot_create_from_a_live_process_range(target: Any, tmp_path: Path) -> None:
    """``create --pid --range`` captures that range's bytes; zero and untouched pages not stored."""
    from uffd.pagestore.snapshot import Snapshot

    proc, addr = target
    out_path = tmp_path / "proc.pyuffd"
    out = run(
        "snapshot",
        "create",
        str(out_path),
        "--pid",
        str(proc.pid),
        "--range",
        f"{addr:#x}:{64 * PAGE:#x}",
    )
    assert out.returncode == 0, out.stderr
    assert "3 of 64 pages stored" in out.stdout
    with Snapshot.open(out_path) as snap:
        (region,) = snap.regions
        assert region.name == f"{addr:#x} +{64 * PAGE:#x}"
        assert snap.read(region.name, 0, region.length) == _expected_target_pages()


def test_snapshot_create_from_a_live_process_frozen(target: Any, tmp_path: Path) -> None:
    """Without --range every private writable mapping is captured; --freeze resumes the process."""
    from uffd.pagestore.snapshot import Snapshot

    proc, addr = target
    out_path = tmp_path / "proc.pyuffd"
    out = run("snapshot", "create", str(out_path), "--pid", str(proc.pid), "--freeze")
    assert out.returncode == 0, out.stderr
    with Snapshot.open(out_path) as snap:
        names = [r.name for r in snap.regions]
        assert any(n.endswith("[heap]") or n.endswith("[stack]") for n in names), names
        # The test's mapping may have been merged with a neighbour: find the one holding it.
        holder = [r for r in snap.regions if _start(r.name) <= addr < _start(r.name) + r.length]
        assert len(holder) == 1, names
        at = addr - _start(holder[0].name)
        assert snap.read(holder[0].name, at, 64 * PAGE) == _expected_target_pages()
    proc.stdin.write("w\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "alive"  # continued after SIGSTOP
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert state not in "Tt"


def _start(name: str) -> int:
    return int(name.split()[0], 16)


def test_snapshot_info_reads_a_raw_image_as_serve_does(tmp_path: Path) -> None:
    """``snapshot info`` on a raw image: one region 'mem', holes absent; --verify exits 2."""
    raw = tmp_path / "sparse.raw"
    with open(raw, "wb") as f:
        f.write(os.urandom(PAGE))
        f.truncate(16 * PAGE)  # pages 1..15: a hole
    out = run("snapshot", "info", str(raw), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["format"] == "raw memory image"
    assert [(r["name"], r["pages"]) for r in info["regions"]] == [("mem", 16)]
    assert info["regions"][0]["present_pages"] in (1, 16)  # 16 where no SEEK_DATA
    verify = run("snapshot", "info", str(raw), "--verify")
    assert verify.returncode == 2 and "raw memory image, which has no checksums" in verify.stderr


def test_snapshot_verify_shows_progress(tmp_path: Path) -> None:
    """``info --verify --progress`` draws tqdm's bar; without tqdm it warns and counts instead."""
    _raw_image(tmp_path / "mem.raw", 32, list(range(0, 32, 2)))
    snap = str(tmp_path / "s.pyuffd")
    assert run("snapshot", "create", snap, "--from-raw", str(tmp_path / "mem.raw")).returncode == 0
    bar = run("snapshot", "info", snap, "--verify", "--progress")
    assert bar.returncode == 0, bar.stderr
    assert "verified:    16 pages" in bar.stdout
    if importlib.util.find_spec("tqdm") is not None:  # the progress extra is installed
        assert "16/16" in bar.stderr
    else:
        assert "verified 16 of 16 pages" in bar.stderr
    quiet = run("snapshot", "info", snap, "--verify")  # stderr is a pipe: no display
    assert quiet.returncode == 0 and quiet.stderr == ""
    # A tqdm that cannot be imported, ahead of the real one on the path.
    fake = tmp_path / "fake" / "tqdm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('tqdm hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    plain = subprocess.run(
        [UFFD, "snapshot", "info", snap, "--verify", "--progress"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert plain.returncode == 0, plain.stderr
    assert "warning: --progress: tqdm is not installed" in plain.stderr
    assert "verified 16 of 16 pages" in plain.stderr


# -- probe --require ---------------------------------------------------------------

NO_UFFD = str(Path(__file__).resolve().parent / "helpers" / "no_userfaultfd.py")


def test_probe_require_passes_when_the_host_has_the_features() -> None:
    """``probe --require`` with features this host offers exits 0; the JSON says nothing unmet."""
    import uffd

    have = [f.name or "" for f in uffd.Feature if f in uffd.probe().available]
    if not have:
        pytest.skip("this host offers no userfaultfd feature to require")
    out = run("probe", "--json", "--require", ",".join(n.lower() for n in have[:3]))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["unmet"] is None


@pytest.mark.parametrize(
    "command", [[UFFD], [sys.executable, "-m", "uffd"]], ids=["uffd", "python -m uffd"]
)
def test_probe_require_fails_with_the_reason_where_userfaultfd_is_blocked(
    command: list[str],
) -> None:
    """Under a seccomp filter like Docker's, ``probe --require MOVE`` exits 1 saying why."""
    out = subprocess.run(
        [sys.executable, NO_UFFD, *command, "probe", "--require", "MOVE"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("uffd probe: no way to open a userfaultfd works")
    assert "seccomp filter is active" in line and "EPERM" in line


def test_probe_require_rejects_an_unknown_feature_name() -> None:
    """An unknown feature name is a usage error (exit 2) that lists the known names."""
    out = run("probe", "--require", "MOVE,NOPE")
    assert out.returncode == 2
    assert "unknown userfaultfd feature 'NOPE'" in out.stderr and "WP_ASYNC" in out.stderr
