"""Real-kernel checks of the benchmark baselines: C reference, naive ctypes handler, placements."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import pytest
from conftest import requires_kernel, requires_syscall

from uffd.bench import reference
from uffd.bench.naive_ctypes import run_naive
from uffd.bench.placement import (
    Placement,
    cross_cpu,
    cross_cpu_unavailable,
    describe,
    same_cpu,
)
from uffd.bench.reference import build_reference, run_reference

PAGES = 256
UFFD_TOUCH_WORKLOADS = ("random", "sequential", "threads")
# A CPU number no test machine has online: pinning to it fails with EINVAL.
NO_SUCH_CPU = 1023

pytestmark = [
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="the naive handler is x86_64-only"),
    requires_syscall,
]


@pytest.mark.parametrize("workload", ["random", "sequential", "threads", "notouch", "bulkcopy"])
def test_reference_workload_reports_sane_figures(workload: str) -> None:
    """Each C reference workload fills N pages correctly and reports positive per-repeat figures."""
    threads = 2 if workload == "threads" else 1
    report = run_reference(workload, PAGES, threads=threads, repeat=2)

    assert report["workload"] == workload
    assert report["pages"] == PAGES
    assert report["threads"] == threads
    assert report["verified"] is True
    assert len(report["pages_per_s"]) == 2
    assert all(rate > 0 for rate in report["pages_per_s"])
    assert report["median"]["pages_per_s"] == pytest.approx(
        statistics.median(report["pages_per_s"])
    )
    if workload in UFFD_TOUCH_WORKLOADS:
        assert all(faults >= PAGES for faults in report["faults"])
    if workload == "random":
        for rep in range(2):
            assert 0 < report["fault_ns_median"][rep] <= report["fault_ns_p90"][rep]
            assert report["fault_ns_mean"][rep] > 0
    if workload == "bulkcopy":
        assert report["ioctl_calls"] == [1, 1]  # 1 MiB fits one 2 MiB call


@requires_kernel(6, 7, "PAGEMAP_SCAN")
@pytest.mark.parametrize(
    ("pages", "stride", "ranges", "calls"),
    [(PAGES, 4, 64, 1), (3000, 2, 1500, 2), (2048, 1, 1, 1)],
)
def test_reference_pagemap_scan_finds_every_written_page(
    pages: int, stride: int, ranges: int, calls: int
) -> None:
    """The PAGEMAP_SCAN harvest finds exactly the written pages, looping past a full vec."""
    report = run_reference("pagemap_scan", pages, stride=stride, repeat=2)

    assert report["pages"] == pages
    assert report["stride"] == stride
    assert report["pages_found"] == [-(-pages // stride)] * 2
    assert report["ranges"] == [ranges] * 2
    assert report["ioctl_calls"] == [calls] * 2
    assert all(ns > 0 for ns in report["harvest_ns"])


def test_reference_failure_is_a_clear_error() -> None:
    """A reference run that exits non-zero raises RuntimeError with the status and stderr."""
    with pytest.raises(RuntimeError, match=r"exited with status 1: .*pthread_setaffinity_np"):
        run_reference("random", PAGES, handler_cpu=NO_SUCH_CPU, repeat=1)


def test_reference_rejects_bad_arguments() -> None:
    """Unknown workloads and threads for a single-toucher workload are ValueErrors."""
    with pytest.raises(ValueError, match="unknown workload"):
        run_reference("nosuch", PAGES)
    with pytest.raises(ValueError, match="threads"):
        run_reference("random", PAGES, threads=2)


def test_build_is_skipped_when_fresh(tmp_path: Path) -> None:
    """build_reference builds both artifacts into the given directory and skips fresh ones."""
    binary = build_reference(tmp_path)
    first = binary.stat().st_mtime_ns

    assert binary == tmp_path / "ref_handler"
    assert os.access(binary, os.X_OK)
    assert (tmp_path / "libtouch.so").is_file()
    assert build_reference(tmp_path).stat().st_mtime_ns == first


def test_build_failure_carries_gcc_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gcc failure raises RuntimeError carrying gcc's own error message."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "ref_handler.c").write_text("int main(void) { return undeclared_name; }\n")
    monkeypatch.setattr(reference, "_SRC_DIR", src)

    with pytest.raises(RuntimeError, match=r"(?s)gcc failed building ref_handler.*undeclared_name"):
        build_reference(tmp_path / "out")
    assert not (tmp_path / "out" / "ref_handler").exists()


@pytest.mark.parametrize("workload", UFFD_TOUCH_WORKLOADS)
def test_naive_handler_serves_real_faults(workload: str) -> None:
    """The hand-rolled ctypes handler fills every page correctly; its report is shaped like C's."""
    threads = 2 if workload == "threads" else 1
    naive = run_naive(workload, PAGES, threads=threads, repeat=2)
    ref = run_reference(workload, PAGES, threads=threads, repeat=1)

    assert naive["verified"] is True
    assert naive["pages"] == PAGES
    assert all(faults >= PAGES for faults in naive["faults"])
    assert all(rate > 0 for rate in naive["pages_per_s"])
    assert set(naive) == set(ref)
    assert set(naive["median"]) == set(ref["median"])


def test_naive_handler_failure_releases_the_toucher() -> None:
    """A handler thread that fails closes the fd, so the toucher returns and the error is raised."""
    with pytest.raises(RuntimeError, match="handler thread failed"):
        run_naive("random", PAGES, handler_cpu=NO_SUCH_CPU, repeat=1)


def test_naive_handler_keeps_caller_affinity() -> None:
    """Pinning the toucher leaves the calling thread's CPU affinity as it was."""
    before = os.sched_getaffinity(0)
    run_naive("random", 64, toucher_cpu=same_cpu().toucher_cpu, repeat=1)

    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("kind", ["same", "cross"])
def test_placements_run_in_both_baselines(kind: str) -> None:
    """Same-CPU and cross-CPU placements both run in the C reference and the naive handler."""
    placement = same_cpu() if kind == "same" else cross_cpu()
    if placement is None:
        pytest.skip(str(cross_cpu_unavailable()))
    cpus = {"handler_cpu": placement.handler_cpu, "toucher_cpu": placement.toucher_cpu}

    for report in (
        run_reference("random", PAGES, repeat=1, **cpus),
        run_naive("random", PAGES, repeat=1, **cpus),
    ):
        assert report["handler_cpu"] == placement.handler_cpu
        assert report["toucher_cpu"] == placement.toucher_cpu
        assert report["verified"] is True
        assert report["median"]["fault_ns_median"] > 0


def test_placement_helpers_follow_affinity() -> None:
    """same_cpu/cross_cpu pick the lowest allowed CPUs and describe() names them."""
    cpus = sorted(os.sched_getaffinity(0))

    assert same_cpu() == Placement(cpus[0], cpus[0])
    assert describe(same_cpu()) == f"same CPU (handler and toucher on CPU {cpus[0]})"
    assert describe((-1, -1)).startswith("unpinned")
    if len(cpus) >= 2:
        assert cross_cpu() == Placement(cpus[0], cpus[1])
        assert cross_cpu_unavailable() is None
        assert describe(cross_cpu()) == (
            f"cross CPU (handler on CPU {cpus[0]}, toucher on CPU {cpus[1]})"
        )


def test_cross_cpu_is_none_on_one_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one allowed CPU, cross_cpu() is None and the reason names that CPU."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})

    assert cross_cpu() is None
    assert "only CPU 3" in str(cross_cpu_unavailable())
    assert describe(None).startswith("cross-CPU unavailable: only CPU 3")
    assert same_cpu() == Placement(3, 3)
