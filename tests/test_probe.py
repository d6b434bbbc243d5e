"""``uffd.probe()`` and ``python -m uffd probe`` describe this host correctly."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CAPS, requires_kernel

import uffd
from uffd import Feature, Ioctl

ALL_FEATURES = [f.name for f in Feature]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m uffd ARGS`` with a bounded runtime."""
    return subprocess.run(
        [sys.executable, "-m", "uffd", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_probe_reports_this_host():
    """probe() reports the running kernel, the page size, the uid and vm.nr_hugepages."""
    caps = uffd.probe()
    assert caps.kernel == os.uname().release
    assert caps.page_size == mmap.PAGESIZE
    assert caps.uid == os.getuid()
    assert caps.nr_hugepages == int(Path("/proc/sys/vm/nr_hugepages").read_text())
    assert caps.ioctls == Ioctl.REGISTER | Ioctl.UNREGISTER | Ioctl.API


def test_probe_agrees_with_a_real_handshake():
    """``available`` is what a fresh UFFDIO_API handshake reports; missing_features the rest."""
    caps = uffd.probe()
    with uffd.Userfaultfd() as ufd:
        assert caps.available == ufd.available
    assert caps.missing_features == [f.name for f in Feature if f not in caps.available]
    assert caps.has(caps.available)
    assert caps.has(Feature(0))


@requires_kernel(6, 8, "UFFD_FEATURE_MOVE, the newest of the 17 features")
def test_probe_lists_all_17_features():
    """On Linux >= 6.8 every one of the 17 features is available and none is missing."""
    caps = uffd.probe()
    assert [f.name for f in Feature if f in caps.available] == ALL_FEATURES
    assert len(ALL_FEATURES) == 17
    assert caps.missing_features == []


@pytest.mark.skipif(os.geteuid() != 0, reason="as non-root, the open paths depend on sysctls")
@requires_kernel(6, 1, "/dev/userfaultfd")
def test_both_open_paths_work_as_root():
    """As root the syscall, /dev/userfaultfd and user-mode-only opens all work, with no errno."""
    caps = uffd.probe()
    for path in (caps.syscall, caps.device, caps.user_mode_only):
        assert path.works, path
        assert path.errno is None


def test_huge_page_sizes_are_reported():
    """The default huge page size is among ``huge_page_sizes`` with a free count."""
    caps = uffd.probe()
    if not caps.huge_page_sizes:
        pytest.skip(f"no hugetlb support on Linux {caps.kernel}")
    assert uffd.mem.huge_page_size() in caps.huge_page_sizes
    assert set(caps.free_huge_pages) == set(caps.huge_page_sizes)
    assert all(n >= 0 for n in caps.free_huge_pages.values())


def test_as_dict_is_json_serialisable():
    """``as_dict()`` survives a JSON round trip, with features and ioctls as names."""
    data = json.loads(json.dumps(CAPS.as_dict()))
    assert data["kernel"] == CAPS.kernel
    assert data["available"] == [f.name for f in Feature if f in CAPS.available]
    assert data["available_mask"] == int(CAPS.available)
    assert data["ioctls"] == ["REGISTER", "UNREGISTER", "API"]
    assert data["syscall"]["works"] == CAPS.syscall.works


def test_str_is_a_readable_report():
    """``str(probe())`` names the kernel and every feature, each marked yes or no."""
    text = str(CAPS)
    assert CAPS.kernel in text
    for name in ALL_FEATURES:
        assert name in text


def test_cli_probe_prints_the_report():
    """``python -m uffd probe`` exits 0 and prints the kernel and the 17 feature names."""
    proc = run_cli("probe")
    assert proc.returncode == 0, proc.stderr
    assert CAPS.kernel in proc.stdout
    for name in ALL_FEATURES:
        assert name in proc.stdout


def test_cli_probe_json():
    """``python -m uffd probe --json`` exits 0 and prints JSON listing the available features."""
    proc = run_cli("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["kernel"] == CAPS.kernel
    assert data["available"] == [f.name for f in Feature if f in CAPS.available]
    assert set(data) >= {"page_size", "syscall", "device", "user_mode_only", "missing_features"}


@requires_kernel(6, 8, "all 17 features")
def test_cli_probe_json_lists_all_17_features():
    """On this kernel the JSON lists exactly the 17 feature names."""
    data = json.loads(run_cli("probe", "--json").stdout)
    assert data["available"] == ALL_FEATURES


def test_cli_usage_error_exits_2():
    """An unknown subcommand is a usage error: exit status 2."""
    assert run_cli("no-such-command").returncode == 2
