"""The README's examples run as written and its set-up commands are the Makefile's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


EXPECTED_OUTPUT = {
    "quickstart.py": [
        r"served 16 faults, pages \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15\]: "
        r"the region holds the random pages",
    ],
    "custom_ops.py": [
        r"first write to page 1 by thread \d+",
        r"first write to page 5 by thread \d+",
        r"faults \{'missing': 2, 'wp': 2\}, resolutions \{'copy': 2, 'unprotect': 2\}",
    ],
}
"""What each example prints, line by line (regular expressions)."""


@pytest.mark.parametrize("script", sorted(EXPECTED_OUTPUT))
def test_readme_example_runs_and_prints_what_it_shows(script: str) -> None:
    """Each README example is the file in examples/, runs, and prints exactly what it claims."""
    source = (ROOT / "examples" / script).read_text()
    body = source.split('"""', 2)[2].strip()
    assert body in README, f"README does not show examples/{script} as written"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(EXPECTED_OUTPUT[script]), done.stdout
    for line, pattern in zip(lines, EXPECTED_OUTPUT[script], strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"


def test_readme_shows_the_custom_ops_output() -> None:
    """The output the README prints under the custom-ops example is what the example prints."""
    shown = README.split("It prints (the thread id varies):", 1)[1].split("```", 2)[1]
    lines = shown.strip().splitlines()
    assert len(lines) == len(EXPECTED_OUTPUT["custom_ops.py"])
    for line, pattern in zip(lines, EXPECTED_OUTPUT["custom_ops.py"], strict=True):
        assert re.fullmatch(pattern, line), f"README shows {line!r}, not {pattern!r}"


def test_user_mode_only_refuses_kernel_accesses_as_the_readme_says() -> None:
    """With user_mode_only=True, read(2) into a missing registered page fails EFAULT at once."""
    import ctypes
    import errno
    import os
    import threading

    import uffd

    if not uffd.probe().user_mode_only.works:
        pytest.skip(f"user_mode_only fails here: {uffd.probe().user_mode_only.reason}")
    libc = ctypes.CDLL(None, use_errno=True)
    region = uffd.mem.anon(4096)
    rfd, wfd = os.pipe()
    result: list[tuple[int, int]] = []
    with uffd.Userfaultfd(user_mode_only=True) as fd:
        fd.register(region.addr, region.length, uffd.Mode.MISSING)
        os.write(wfd, b"x" * 16)

        def kernel_write() -> None:  # the kernel copies the pipe's bytes into the region
            rc = libc.read(rfd, ctypes.c_void_p(region.addr), 16)
            result.append((rc, ctypes.get_errno()))

        reader = threading.Thread(target=kernel_write, daemon=True)
        reader.start()
        reader.join(10)
        pending = fd.read_events(timeout=0)
    os.close(rfd)
    os.close(wfd)
    region.close()
    assert result == [(-1, errno.EFAULT)], f"read(2) gave {result}, events {pending}"
    assert pending == []


def test_readme_names_the_two_setup_commands() -> None:
    """The set-up block is exactly `make demo` and `make test`, both Makefile targets."""
    makefile = (ROOT / "Makefile").read_text()
    block = README.split("## Set up", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M)


def _shape(text: str) -> list[str]:
    """A probe report's line labels (the first word; a feature row's name), host values dropped."""
    return [
        line.split()[-1] if line.split()[0] in ("yes", "no") else line.split()[0]
        for line in text.strip().splitlines()
    ]


def test_readme_probe_output_is_what_probe_prints() -> None:
    """The README's probe block has the lines `python -m uffd probe` prints today, in order."""
    block = README.split("## This machine (`python -m uffd probe`)", 1)[1]
    block = block.split("```", 2)[1]
    live = subprocess.run(
        [sys.executable, "-m", "uffd", "probe"], capture_output=True, text=True, timeout=60
    )
    assert live.returncode == 0, live.stderr
    assert _shape(block) == _shape(live.stdout)


def test_readme_plugin_example_passes_under_pytest(tmp_path: Path) -> None:
    """The README's pytest-plugin example, run by pytest with only the installed plugin, passes."""
    section = README.split("## Testing code that uses userfaultfd", 1)[1]
    source = section.split("```python", 1)[1].split("```", 1)[0]
    (tmp_path / "test_readme_plugin.py").write_text(source)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--strict-markers"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
