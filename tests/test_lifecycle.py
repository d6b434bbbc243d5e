"""Lifecycle: calls racing stop(), forks while events are read, handlers that misbehave.

Each test here failed before the fix it guards (issue 10 lists the defects).
The scenarios that could corrupt the heap or block threads forever when they
regress run in a process of their own (tests/helpers/lifecycle_scenarios.py),
bounded by a timeout; the rest bound every wait themselves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import requires

from uffd import Feature, mem

PS = mem.PAGE_SIZE
HELPERS = Path(__file__).resolve().parent / "helpers"
SCENARIO_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def fork_lib(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/helpers/lifecycle_fork.c built as a shared library (skips without a compiler)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc/cc) on PATH to build lifecycle_fork.c")
    so = tmp_path_factory.mktemp("lifecycle") / "lifecycle_fork.so"
    subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", "-o", str(so),
         str(HELPERS / "lifecycle_fork.c")],
        check=True,
        timeout=60,
    )  # fmt: skip
    return str(so)


def scenario(fork_lib: str, name: str, arg: int) -> str:
    """Run a lifecycle scenario in its own process (bounded); its last line, which says ok."""
    try:
        done = subprocess.run(
            [sys.executable, str(HELPERS / "lifecycle_scenarios.py"), fork_lib, name, str(arg)],
            capture_output=True,
            text=True,
            timeout=SCENARIO_TIMEOUT,
        )
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or ""
        last = out.strip().splitlines()[-1:] or ["before the first round"]
        pytest.fail(f"{name} hung for {SCENARIO_TIMEOUT:.0f} s, at {last[0]}")
    assert done.returncode == 0, f"{name} failed ({done.returncode}): {done.stderr[-2000:]}"
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("ok"), done.stdout[-500:]
    return last


# -- 1, 2: calls racing stop(); forks while a thread reads events ---------------------


def test_install_wake_resolve_racing_stop(fork_lib: str) -> None:
    """install/wake/resolve from three threads while stop() runs: each completes or says stopped."""
    print(scenario(fork_lib, "stop_race", 300))


@requires(Feature.EVENT_FORK)
def test_c_fork_loop_while_a_thread_reads_events(fork_lib: str) -> None:
    """25 C-level forks with EVENT_FORK while read_events polls: no fork waits on the reader."""
    print(scenario(fork_lib, "fork_loop", 25))


@requires(Feature.EVENT_FORK, Feature.PAGEFAULT_FLAG_WP)
@pytest.mark.parametrize("with_event", [0, 1], ids=["no-event", "event"])
def test_kernel_wp_fork(fork_lib: str, with_event: int) -> None:
    """The kernel's wp-fork case: the uffd-wp bit is inherited exactly when EVENT_FORK is on."""
    print(scenario(fork_lib, "wp_fork", with_event))


@requires(Feature.EVENT_FORK, Feature.EVENT_REMAP, Feature.EVENT_REMOVE, Feature.PAGEFAULT_FLAG_WP)
@pytest.mark.parametrize("wp", [0, 1], ids=["missing", "missing+wp"])
def test_kernel_events(fork_lib: str, wp: int) -> None:
    """The kernel's events case: fork, faults, mremap and DONTNEED in a child, all served."""
    print(scenario(fork_lib, "events", wp))
