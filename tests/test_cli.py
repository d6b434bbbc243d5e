"""The ``uffd`` console script: every subcommand's --help, and the documented exit codes.

Runs the installed entry point (next to this interpreter) in a subprocess, as a
user types it: 0 success, 1 a runtime failure with a one-line message, 2 a
usage error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
