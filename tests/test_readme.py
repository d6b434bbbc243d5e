"""The README's examples run as written and its set-up commands are the Makefile's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("script", ["quickstart.py", "custom_ops.py"])
def test_readme_example_runs(script: str) -> None:
    """Each example embedded in the README is the file in examples/ and runs to completion."""
    source = (ROOT / "examples" / script).read_text()
    body = source.split('"""', 2)[2].strip()
    assert body in README, f"README does not show examples/{script} as written"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)], capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()


def test_readme_names_the_two_setup_commands() -> None:
    """The README gives `make demo` and `make test`, and both are Makefile targets."""
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in README
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
