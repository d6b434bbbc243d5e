"""What this copy of uffd was built as: its version, and whether its C extension exists.

Imported first by ``uffd/__init__.py``, and importing it checks the
extension: a checkout used without building it (``git clone`` then
``import uffd``) gets a message that says what to run, instead of a bare
``ModuleNotFoundError: No module named 'uffd._native'`` from deep inside.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

__all__ = ["DISTRIBUTION", "version"]

DISTRIBUTION = "pyuffd"
"""The name on the package index (``uffd`` there is an unrelated project)."""

_TREE = Path(__file__).resolve().parent.parent
"""The directory holding the ``uffd`` package: a checkout, or site-packages."""


def version() -> str:
    """The version, written only in pyproject.toml.

    Read from the installed distribution's metadata; a source tree put on
    ``sys.path`` without installing has none, so its pyproject.toml is read
    instead. ``"0+unknown"`` when neither exists (a copied package directory).
    """
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        pyproject = (_TREE / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    found = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    return found.group(1) if found else "0+unknown"


def _missing_native_message() -> str:
    if (_TREE / "csrc" / "build_native.py").is_file():
        return (
            f"uffd's C extension (uffd._native) is not built in the checkout {_TREE}: "
            "run `make all` there (it creates .venv with the package installed and "
            "built; then use .venv/bin/python), or `pip install -e .` in your own venv"
        )
    return (
        f"the uffd package in {_TREE} lacks its C extension (uffd._native): "
        f"reinstall it with `pip install --force-reinstall {DISTRIBUTION}`"
    )


try:
    # Not `from uffd import _native`: inside the half-imported package that
    # raises a plain ImportError ("partially initialized module") instead.
    import uffd._native  # noqa: F401  (imported for the check only)
except ModuleNotFoundError as err:
    if err.name != "uffd._native":
        raise
    raise ModuleNotFoundError(_missing_native_message(), name="uffd._native") from None
