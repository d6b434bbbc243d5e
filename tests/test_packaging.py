"""What users install: the sdist, the abi3 wheel built from it, the version and a fresh clone.

The sdist and wheel are built here offline (``python -m build --no-isolation``
with the backend the dev extra installs); ``.ci/run`` also installs both into
fresh venvs outside the checkout and runs ``tests/smoke_installed.py``.
"""

from __future__ import annotations

import email
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import uffd

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = (ROOT / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)  # type: ignore[union-attr]


def _build_backend_missing() -> str | None:
    if importlib.util.find_spec("build") is None:
        return "the `build` package is not installed (pip install -e '.[dev]')"
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        return f"setuptools {setuptools.__version__} < 77 cannot read the SPDX license"
    return None


def _machine() -> str:
    import platform

    return platform.machine()


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from that sdist (as pip does), in one directory."""
    why = _build_backend_missing()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "-o", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_sdist_carries_what_the_wheel_build_and_users_need(dist: Path) -> None:
    """The sdist has the cffi build script, every C file and header, LICENSE, docs and tests."""
    (sdist,) = dist.glob("pyuffd-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(
        ["git", "ls-files", "csrc", "docs", "tests", "examples"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    assert tracked, "git ls-files listed nothing"
    wanted = {*tracked, "LICENSE", "CHANGELOG.md", "README.md", "setup.py", "pyproject.toml"}
    assert wanted - names == set()
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


def test_wheel_is_abi3_with_license_types_and_script(dist: Path) -> None:
    """One cp310-abi3 wheel: the abi3 module, LICENSE, py.typed and the `uffd` script inside."""
    (wheel,) = dist.glob("pyuffd-*.whl")
    assert wheel.name == f"pyuffd-{VERSION}-cp310-abi3-linux_{_machine()}.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = f"pyuffd-{VERSION}.dist-info"
        tags = whl.read(f"{info}/WHEEL").decode()
        meta = email.message_from_bytes(whl.read(f"{info}/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    assert f"Tag: cp310-abi3-linux_{_machine()}" in tags
    assert {"uffd/_native.abi3.so", "uffd/py.typed", f"{info}/licenses/LICENSE"} <= names
    assert "uffd = uffd.cli:main" in entry_points
    assert "[pytest11]\nuffd = uffd.testing" in entry_points
    classifiers = meta.get_all("Classifier") or []
    assert {"Typing :: Typed", "Framework :: Pytest"} <= set(classifiers)
    assert "Programming Language :: Python :: 3.10" in classifiers
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("Project-URL")


def test_version_is_written_once() -> None:
    """pyproject.toml holds the version; uffd.__version__ and `uffd --version` report it."""
    assert uffd.__version__ == VERSION
    script = Path(sys.executable).with_name("uffd")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"uffd (pyuffd) {VERSION}"
    literal = re.compile(r"""__version__\s*=\s*["']""")
    assert not [p for p in (ROOT / "uffd").rglob("*.py") if literal.search(p.read_text())]


@pytest.mark.parametrize("checkout", [True, False], ids=["checkout", "copied-package"])
def test_import_without_the_extension_says_what_to_run(tmp_path: Path, checkout: bool) -> None:
    """`import uffd` from an unbuilt tree names the missing extension and the command to run."""
    shutil.copytree(ROOT / "uffd", tmp_path / "uffd", ignore=shutil.ignore_patterns("*.so"))
    if checkout:
        shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    # -S: no site-packages, so the editable install cannot supply the extension.
    done = subprocess.run(
        [sys.executable, "-S", "-c", "import uffd"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: ")
    assert "uffd._native" in last and str(tmp_path) in last
    if checkout:
        assert "run `make all`" in last and "pip install -e ." in last
    else:
        assert "pip install --force-reinstall pyuffd" in last


def test_lint_needs_nothing_beyond_the_dev_extra() -> None:
    """mypy --strict passes on uffd/ without the bench extra's matplotlib installed."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed: this checks a venv without the bench extra")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", str(ROOT / "uffd")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:]
