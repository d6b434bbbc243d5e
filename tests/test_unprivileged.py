"""The basic paths as an unprivileged user (uid 65534, nobody), in a real child process.

Here /dev/userfaultfd is root-only (0600) and vm.unprivileged_userfaultfd is
0, so an unprivileged process has exactly one way in: the syscall with
UFFD_USER_MODE_ONLY. The child (tests/helpers/rel_unpriv.py) drops to
nobody with setgroups/setgid/setuid after importing everything: the venv's
interpreter lives under /root (0700), which nobody cannot read, so a process
started as nobody could not even run Python. It then records what every
path does; these tests check the refusals explain cause and remedy, and that
user_mode_only serves faults (raw and through a FaultHandler).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.rel_common import NOBODY, finish, spawn

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to start a child that drops to uid 65534"
)


def unreadable_for_others() -> Path | None:
    """The first directory on the way to this interpreter that others cannot traverse, if any."""
    path = Path(os.path.realpath(sys.executable))
    for part in [*reversed(path.parents), path]:
        if not os.stat(part).st_mode & stat.S_IXOTH:
            return part
    return None


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    """What the unprivileged child saw (one run for the whole module)."""
    return finish(spawn("rel_unpriv.py"), timeout=60)


def test_child_really_runs_as_nobody(report: dict[str, Any]) -> None:
    """The child dropped every privilege: uid, euid and gid are 65534."""
    assert (report["uid"], report["euid"], report["gid"]) == (NOBODY, NOBODY, NOBODY)


def test_refusals_name_cause_and_remedy(report: dict[str, Any]) -> None:
    """Without user_mode_only each path fails with PermissionError saying why and what to do."""
    auto, syscall, device = report["open_auto"], report["open_syscall"], report["open_device"]
    for result in (auto, syscall, device):
        assert not result["ok"] and result["type"] == "PermissionError"
    assert syscall["errno"] == 1  # EPERM
    assert "vm.unprivileged_userfaultfd is 0" in syscall["message"]
    assert "user_mode_only=True" in syscall["message"]
    assert device["errno"] == 13  # EACCES
    assert "/dev/userfaultfd" in device["message"] and "group" in device["message"]
    # auto tried both and reports both reasons.
    assert "device:" in auto["message"] and "syscall:" in auto["message"]
    fork = report["open_fork"]
    assert fork["type"] == "PermissionError" and "CAP_SYS_PTRACE" in fork["message"]


def test_user_mode_only_serves_faults(report: dict[str, Any]) -> None:
    """user_mode_only: MISSING served by copy from another thread, zeropage, a WP fault
    served by writeprotect, wake, unregister; a kernel-mode access gets EFAULT."""
    umo = report["umo"]
    assert umo["missing_served"] and umo["zero_read"] and umo["wp_served"]
    assert umo["zeropage"] == 4096 and umo["after_unregister"]
    assert umo["ioctls"] & 0x8  # COPY granted
    assert umo["kernel_access"] == "EFAULT"


def test_fault_handler_as_nobody(report: dict[str, Any]) -> None:
    """FaultHandler() is refused with the remedy; FaultHandler(uffd=user-mode-only fd) serves."""
    h = report["handler"]
    assert h["default"]["type"] == "PermissionError"
    assert "FaultHandler(uffd=Userfaultfd(user_mode_only=True))" in h["default"]["message"]
    assert h["served"] and h["faults"] == 8


def test_probe_explains_each_path(report: dict[str, Any]) -> None:
    """probe() as nobody: syscall and device fail with errno and reason; user_mode_only works."""
    caps = report["probe"]
    assert caps["uid"] == NOBODY and caps["unprivileged_userfaultfd"] == 0
    assert not caps["syscall"]["works"] and caps["syscall"]["errno"] == 1
    assert "vm.unprivileged_userfaultfd" in caps["syscall"]["reason"]
    assert not caps["device"]["works"] and caps["device"]["errno"] == 13
    assert "/dev/userfaultfd" in caps["device"]["reason"]
    assert caps["user_mode_only"]["works"]
    text = report["probe_text"]
    assert "syscall           fails:" in text and "user_mode_only    works" in text


def test_why_the_child_imports_before_dropping() -> None:
    """The environment fact the child works around: nobody cannot run this venv's interpreter."""
    blocker = unreadable_for_others()
    if blocker is None:
        pytest.skip("this interpreter is usable by other users: importing first is not needed here")
    assert not os.stat(blocker).st_mode & stat.S_IXOTH
    print(f"\n{blocker} is not traversable by others: the child imports uffd as root, then drops")
