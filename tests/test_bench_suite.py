"""Smoke run of the benchmark suite at tiny sizes: JSON shape, ratios, outputs and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_syscall

from uffd.bench import cpucost, report
from uffd.bench.suite import ALL_WORKLOADS, quick_config, run_suite, write_outputs
from uffd.cli import build_parser
from uffd.cli import main as cli_main

pytestmark = [
    pytest.mark.skipif(os.uname().machine != "x86_64", reason="the naive handler is x86_64-only"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the C reference needs gcc"),
    requires_syscall,
]

_ENTRY_KEYS = {
    "workload",
    "placement",
    "handler",
    "params",
    "runs",
    "error",
    "skipped",
    "median",
    "min",
    "max",
}
_RATIO_KEYS = {
    "name",
    "workload",
    "placement",
    "handler",
    "baseline",
    "metric",
    "value",
    "spread",
    "target",
    "unit",
    "better",
    "status",
}


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    """One quick suite run, shared by the tests of this module."""
    config = quick_config(pages=64, restore_pages=1024, dirty_pages=1024)
    return run_suite(config, progress=lambda line: None)


def test_results_have_the_documented_shape(results: dict[str, Any]) -> None:
    """Results hold host, config, placements, an entry per workload/placement/handler, no error."""
    assert results["schema"] == 1
    assert set(results) >= {
        "created",
        "host",
        "config",
        "placements",
        "results",
        "ratios",
        "errors",
        "runtime_s",
    }
    assert results["errors"] == 0, [e["error"] for e in results["results"] if e["error"]]
    assert results["config"]["workloads"] == list(ALL_WORKLOADS)
    assert (
        results["placements"]["same"]["handler_cpu"] == results["placements"]["same"]["toucher_cpu"]
    )
    seen = {(e["workload"], e["placement"], e["handler"]) for e in results["results"]}
    assert ("random", "same", "c-ref") in seen
    assert ("sequential", "same", "bulkcopy") in seen
    assert ("restore", "unpinned", "python") in seen
    assert ("dirty", "same", "python") in seen
    for e in results["results"]:
        assert set(e) == _ENTRY_KEYS
        if e["skipped"]:
            continue
        assert len(e["runs"]) == 2, (e["workload"], e["handler"])
        assert e["median"]["pages_per_s"] > 0
        for name, value in e["median"].items():
            assert e["min"][name] <= value <= e["max"][name]


def test_random_fault_times_are_per_fault_medians(results: dict[str, Any]) -> None:
    """Every handler of the random workload reports a per-fault median no larger than its p90."""
    for e in results["results"]:
        if e["workload"] == "random" and not e["skipped"]:
            for run in e["runs"]:
                assert 0 < run["fault_ns_median"] <= run["fault_ns_p90"]


def test_ratios_are_computed_against_the_same_run(results: dict[str, Any]) -> None:
    """Each target ratio exists (same CPU), equals the ratio of the medians, and has a status."""
    ratios = results["ratios"]
    assert all(set(r) == _RATIO_KEYS for r in ratios)
    by_key = {(r["name"], r["placement"]): r for r in ratios}
    found = {(e["workload"], e["placement"], e["handler"]): e for e in results["results"]}
    for spec in report.RATIOS:
        placement = "unpinned" if spec.workload.startswith("restore") else "same"
        r = by_key[(spec.name, placement)]
        mine = found[(spec.workload, placement, spec.handler)]["median"][spec.metric]
        if spec.baseline is None:
            assert r["value"] == pytest.approx(mine)
        else:
            base = found[(spec.workload, placement, spec.baseline)]["median"][spec.metric]
            assert r["value"] == pytest.approx(mine / base)
        assert r["spread"][0] <= r["spread"][1]
        if spec.target is None:
            assert r["status"] is None
        else:
            met = r["value"] <= spec.target if spec.better == "lower" else r["value"] >= spec.target
            assert r["status"] == ("PASS" if met else "MISS")


_LIMIT_HANDLERS = {"notouch", "bulkcopy"}


def test_every_touch_handler_reports_its_cpu_per_fault(results: dict[str, Any]) -> None:
    """Each handler of random/sequential/threads/sparse has a positive CPU µs per fault, and each
    one but the C reference a ratio to the C reference's at its placement, shown in the table."""
    ratios = {
        (r["workload"], r["placement"], r["handler"]): r
        for r in results["ratios"]
        if r["metric"] == "cpu_us_per_fault"
    }
    checked = 0
    for e in results["results"]:
        if e["workload"] not in (*report.CPU_WORKLOADS, "sparse") or e["skipped"]:
            continue
        if e["handler"] in _LIMIT_HANDLERS:
            continue
        for run in e["runs"]:
            assert run["handler_cpu_ns"] > 0 and run["cpu_us_per_fault"] > 0, e["handler"]
        checked += 1
        if e["workload"] in report.CPU_WORKLOADS and e["handler"] != "c-ref":
            r = ratios[(e["workload"], e["placement"], e["handler"])]
            assert r["baseline"] == "c-ref" and r["value"] > 0
    assert checked >= 4 + 6 + 5 + 3
    text = report.format_report(results)
    assert "CPU µs/fault" in text and "x C" in text


def test_sparse_faults_report_the_handlers_cpu_share(results: dict[str, Any]) -> None:
    """sparse paces faults at the configured rate and reports the handler's CPU % of one CPU,
    with and without the pump's spin."""
    rate = results["config"]["sparse_rate"]
    for e in results["results"]:
        if e["workload"] != "sparse" or e["skipped"]:
            continue
        for run in e["runs"]:
            assert run["cpu_percent"] > 0
            # Paced by sleeps: never faster than asked (a slow host only lowers the rate).
            assert 0 < run["pages_per_s"] <= rate * 1.05
    by_name = {(r["name"], r["placement"]): r for r in results["ratios"]}
    target = by_name[("sparse: native handler CPU at 100 faults/s", "same")]
    assert target["unit"] == "% of a CPU" and target["status"] in ("PASS", "MISS")
    # The spin's own cost: the same handler with spin=0, measured beside it.
    assert by_name[("sparse: native / native with spin=0, CPU", "same")]["value"] > 0


def test_thread_cpu_clock_counts_a_running_thread_only() -> None:
    """threads_cpu_ns grows while a listed thread burns CPU and counts it 0 once it has exited."""
    started, done = threading.Event(), threading.Event()

    def burn() -> None:
        until = time.thread_time_ns() + 20_000_000
        while time.thread_time_ns() < until:
            pass
        started.set()
        done.wait(10)

    thread = threading.Thread(target=burn)
    thread.start()
    assert started.wait(10)
    assert thread.native_id in cpucost.thread_ids()
    assert cpucost.threads_cpu_ns([thread.native_id]) >= 20_000_000
    done.set()
    thread.join(10)
    assert not thread.is_alive()
    # join() returns as Python lets go of the thread, a moment before the kernel's thread exits.
    deadline = time.monotonic() + 5
    while cpucost.threads_cpu_ns([thread.native_id]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cpucost.threads_cpu_ns([thread.native_id]) == 0


def test_restore_daemon_runs_the_product_path(results: dict[str, Any]) -> None:
    """restore-daemon restores through uffd serve + uffd handler, from the server and the file."""
    found = {(e["workload"], e["handler"]): e for e in results["results"]}
    for handler in ("daemon-tcp", "daemon-file"):
        for run in found[("restore-daemon", handler)]["runs"]:
            assert run["restore_gbps"] > 0 and run["first_access_ms"] > 0
            assert run["fault_us_p50"] <= run["fault_us_p99"]
            assert run["touches"] >= 1 and {"handler_cpu_s", "server_cpu_s"} <= run.keys()
    assert found[("restore-daemon", "bulkcopy")]["median"]["pages_per_s"] > 0


def test_outputs_are_written_and_the_table_shows_targets(
    results: dict[str, Any], tmp_path: Path
) -> None:
    """results.json round-trips, a chart exists iff matplotlib does, the table shows PASS/MISS."""
    written = write_outputs(results, tmp_path, progress=lambda line: None)
    assert written["json"] == str(tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["ratios"] == results["ratios"]
    if report.chart_unavailable() is None:
        assert written["chart"] is not None
        assert Path(written["chart"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert written["chart"] is None
    text = report.format_report(results)
    assert "random: python / C per-fault time" in text
    assert "PASS" in text or "MISS" in text


def test_cli_runs_a_chosen_workload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``uffd bench --quick --workloads random --repeat 1 --out DIR`` exits 0, writes the JSON."""
    rc = cli_main(
        [
            "bench",
            "--quick",
            "--workloads",
            "random",
            "--repeat",
            "1",
            "--pages",
            "32",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"]["workloads"] == ["random"]
    assert {e["workload"] for e in data["results"]} == {"random"}
    assert "Ratios" in capsys.readouterr().out


def test_cli_rejects_an_unknown_workload(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown workload name is a usage error (exit 2), caught before anything runs."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "--workloads", "nosuch"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_fanout_compares_the_stores_with_the_page_server(results: dict[str, Any]) -> None:
    """fanout restores at once from uffd serve, a single Redis and the cluster (every page
    checked by the workers), with ratios to the page server of the same run."""
    fan = results["fanout"]
    if "skipped" in fan:
        pytest.skip(fan["skipped"])
    assert "error" not in fan, fan["error"]
    stores = ("serve", "redis", "redis-nocache", "cluster", "cluster-nocache")
    assert {(r["source"], r["count"]) for r in fan["runs"]} == {(s, 2) for s in stores}
    assert all(r["gbps"] > 0 and r["fault_us_p50"] <= r["fault_us_p99"] for r in fan["runs"])
    by = {r["source"]: r for r in fan["runs"]}
    # The host cache: two restores through one daemon fetch each chunk about once between them.
    assert (
        by["redis"]["fetched_mb_per_restore"] < 0.75 * by["redis-nocache"]["fetched_mb_per_restore"]
    )
    assert {r["source"] for r in fan["ratios"]} == set(stores[1:])
    assert 0 <= fan["dedup"]["512k"]["second_reused"] <= 1
