"""The ``uffd.testing`` pytest plugin, loaded by its entry point in a real pytest run.

Each test writes a small test file into a temporary directory and runs
pytest on it in a subprocess (no project conftest there), as a project that
installed pyuffd would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from uffd.testing._hugepages import HugePages

NO_UFFD = Path(__file__).resolve().parent / "helpers" / "no_userfaultfd.py"


def run_pytest(
    tmp_path: Path, source: str, *args: str, blocked: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``source`` as test_it.py (``blocked``: under a Docker-like seccomp filter)."""
    (tmp_path / "test_it.py").write_text(textwrap.dedent(source))
    command = [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", *args, "test_it.py"]
    if blocked:
        command = [sys.executable, str(NO_UFFD), *command]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_entry_point_names_the_plugin() -> None:
    """The distribution registers uffd.testing under pytest11, so pytest loads it by itself."""
    found = [e.value for e in metadata.entry_points(group="pytest11") if e.name == "uffd"]
    assert found == ["uffd.testing"]


MARKED = """
    import pytest
    from uffd import Feature

    @pytest.mark.requires_uffd(features="MOVE,wp_async")
    def test_by_name():
        assert True

    @pytest.mark.requires_uffd(features=Feature.EVENT_FORK, memory="shmem")
    def test_by_flag():
        assert True
"""


def test_marker_runs_tests_the_host_can_run(tmp_path: Path) -> None:
    """On a host with the features, marked tests run (and --strict-markers knows the marker)."""
    from uffd import Feature, probe

    if not probe().has(
        Feature.MOVE | Feature.WP_ASYNC | Feature.EVENT_FORK | Feature.MISSING_SHMEM
    ):
        pytest.skip("this host lacks a feature the inner tests require")
    out = run_pytest(tmp_path, MARKED, "--strict-markers")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


def test_marker_skips_with_the_probes_reason_where_userfaultfd_is_blocked(tmp_path: Path) -> None:
    """Under Docker-like seccomp, marked tests skip, saying no way to open a userfaultfd works."""
    out = run_pytest(tmp_path, MARKED, blocked=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 skipped" in out.stdout
    assert "no way to open a userfaultfd works" in out.stdout
    assert "seccomp filter is active" in out.stdout


def test_marker_with_an_unknown_feature_is_an_error(tmp_path: Path) -> None:
    """A misspelt feature name errors the test (naming the known ones) instead of skipping it."""
    out = run_pytest(
        tmp_path,
        """
        import pytest

        @pytest.mark.requires_uffd(features="MOVEE")
        def test_typo():
            pass
        """,
    )
    assert out.returncode == 1
    assert "unknown userfaultfd feature 'MOVEE'" in out.stdout and "1 error" in out.stdout


def test_hugetlb_marker_reserves_pages_and_gives_them_back(tmp_path: Path) -> None:
    """memory="hugetlb" makes 2 huge pages free for the test and restores vm.nr_hugepages."""
    pages = HugePages()
    if not pages.size:
        pytest.skip("no hugetlb support on this kernel")
    before = Path("/proc/sys/vm/nr_hugepages").read_text()
    out = run_pytest(
        tmp_path,
        """
        import pytest
        from uffd.testing._hugepages import HugePages

        @pytest.mark.requires_uffd(memory="hugetlb", hugepages=2)
        def test_pages_free():
            assert HugePages().available() >= 2
        """,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # Root on a host with memory to spare reserves them; elsewhere the skip says why.
    assert ("1 passed" in out.stdout) != ("could not reserve 2 huge pages" in out.stdout)
    assert Path("/proc/sys/vm/nr_hugepages").read_text() == before


def test_fixtures_serve_regions_of_each_kind(tmp_path: Path) -> None:
    """Served regions fault in from their data; every memory kind; the marked handler features."""
    before = Path("/proc/sys/vm/nr_hugepages").read_text()
    out = run_pytest(
        tmp_path,
        """
        import os

        import pytest
        from uffd import Feature

        def test_served(uffd_served_region):
            data = os.urandom(8 * 4096)
            region = uffd_served_region(data)
            assert region.read(0, len(data)) == data

        @pytest.mark.requires_uffd(features="THREAD_ID")
        def test_handler_has_the_marked_features(uffd_handler):
            assert uffd_handler.uffd.features & Feature.THREAD_ID

        def test_each_kind(uffd_region, uffd_handler):
            uffd_handler.register(uffd_region)
            assert uffd_region.read(0, uffd_region.length) == bytes(uffd_region.length)
            assert uffd_handler.stats.total.faults["missing"] >= 1
        """,
        "-v",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    passing = ("test_served", "test_handler_has_the_marked_features")
    for test in (*passing, "test_each_kind[anon]", "test_each_kind[shmem]"):
        assert f"test_it.py::{test} PASSED" in out.stdout, out.stdout
    hugetlb = "test_it.py::test_each_kind[hugetlb]"
    assert f"{hugetlb} PASSED" in out.stdout or (
        f"{hugetlb} SKIPPED" in out.stdout and "huge pages" in out.stdout
    ), out.stdout
    assert Path("/proc/sys/vm/nr_hugepages").read_text() == before
