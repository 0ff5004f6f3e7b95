"""The benchmark harness (loadtests/bench/): calibration, histograms, the lag probe, CPU shares, the report."""

from __future__ import annotations

import asyncio
import gc
import math
import re
import subprocess
import sys
import time
from array import array
from collections import Counter
from pathlib import Path

import pytest

from loadtests.bench import BenchError, calibration, loop_lag
from loadtests.bench.client import Measurement
from loadtests.bench.cpu_shares import CpuShares
from loadtests.bench.histograms import HistogramCounts, parse_histogram
from loadtests.bench.reporting import Report, Row

LINE = re.compile(
    r"^calibration: no-op POST \d+ µs/req \(in-process ASGI, 1 worker\), Ed25519 verify \d+ µs \(libsodium\), "
    r"loadavg \d+\.\d / \d+ cores$"
)


def test_calibration_measures_both_costs_and_prints_one_line() -> None:
    measured = calibration.calibrate()
    assert measured.noop_post_us > 0
    assert measured.ed25519_verify_us > 0
    assert measured.cores >= 1
    assert LINE.match(measured.line), measured.line


def test_calibration_line_comes_from_a_process_of_its_own() -> None:
    line = calibration.calibration_line()
    assert LINE.match(line), line


def test_calibration_refuses_a_noop_post_that_is_not_answered_200(monkeypatch: pytest.MonkeyPatch) -> None:
    # A body the no-op app rejects (400): timing a refusal would calibrate nothing.
    monkeypatch.setattr(calibration, "NOOP_BODY", b'{"credential": ""}')
    with pytest.raises(BenchError, match="not 200"):
        calibration.calibrate()


def test_the_one_file_bench_still_exports_what_scale_imports() -> None:
    from loadtests import bench_verify

    for name in (
        "HOST", "REGION", "VERIFY_HISTOGRAM", "VERIFY_PATH", "BenchError", "Holder", "ServerProcess", "Target",
        "Workspace", "issue_credentials", "prepare_ecard", "run_cli", "scrape_histogram",
    ):  # fmt: skip
        assert hasattr(bench_verify, name), name


def test_bench_verify_help_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtests.bench_verify", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--duration", "--rounds", "--credential-lifetime", "--redis-cluster", "--database-url"):
        assert flag in result.stdout


METRICS = """# TYPE ecard_verify_duration_seconds histogram
ecard_verify_duration_seconds_bucket{le="0.001"} 90.0
ecard_verify_duration_seconds_bucket{le="0.005"} 99.0
ecard_verify_duration_seconds_bucket{le="0.01"} 100.0
ecard_verify_duration_seconds_bucket{le="+Inf"} 100.0
ecard_verify_duration_seconds_count 100.0
"""


def test_histogram_quantile_interpolates_inside_its_bucket_like_prometheus() -> None:
    counts = parse_histogram(METRICS, "ecard_verify_duration_seconds")
    assert counts.observations == 100
    # Rank 99 is the last of the (0.001, 0.005] bucket.
    assert counts.quantile(0.99) == pytest.approx(0.005)
    # Rank 50 lies in the first bucket, interpolated from 0.
    assert counts.quantile(0.5) == pytest.approx(0.001 * 50 / 90)


def test_histogram_since_keeps_only_later_observations() -> None:
    before = HistogramCounts(((0.001, 10.0), (0.01, 10.0), (math.inf, 10.0)))
    after = HistogramCounts(((0.001, 10.0), (0.01, 20.0), (math.inf, 20.0)))
    later = after.since(before)
    assert later.observations == 10
    assert later.quantile(0.99) > 0.001


def test_loop_lag_probe_sees_a_blocked_loop_and_the_collectors_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop_lag, "GC_PASS_SECONDS", 0.0)  # every pass is kept, however short

    async def scenario() -> None:
        probe = loop_lag.LoopLagProbe(tmp_path / "loop-lag-1.json")
        await probe.start()
        await asyncio.sleep(0.05)
        time.sleep(0.04)  # noqa: ASYNC251  # holds the loop on purpose, as a long callback would
        await asyncio.sleep(0.05)
        gc.collect()
        await asyncio.sleep(0.02)
        await probe.stop()

    asyncio.run(scenario())
    (record,) = loop_lag.read_records(tmp_path)
    assert record["samples"] >= 3
    assert max(ms for _at, ms in record["stalls"]) >= 30
    assert any(generation == 2 for _at, generation, _ms, _cpu in record["gc_passes"])
    assert len(record["old_objects"]) == 2
    lines = loop_lag.summarise([record])
    assert "stalls ≥ 5 ms" in lines[1]
    assert "gen 2:" in lines[2]


def test_loop_lag_summary_leaves_out_what_came_before_the_run() -> None:
    record = loop_lag.LagRecord(pid=7)
    record.add(0.0001)
    record.stalls.append((100.0, 40.0))
    lines = loop_lag.summarise([record.to_json()], since=200.0)
    assert "no stall" in lines[1]


def test_cpu_shares_attribute_a_busy_process_to_the_load_generator() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    shares = CpuShares(service_pid=lambda: None, load_pid=lambda: busy.pid)
    try:
        shares.start()
        time.sleep(2.5)
    finally:
        shares.stop()
        busy.kill()
        busy.wait()
    assert shares.samples
    assert all(sample[1] == 0 for sample in shares.samples)  # no service: nothing counted for it
    assert max(sample[2] for sample in shares.samples) > 0.05
    assert "load generator" in shares.summary(10)


def _measured(requests: int, seconds: float, server_cpu: float) -> Measurement:
    out = Measurement(latencies=array("d", [0.002] * requests), statuses=Counter({200: requests}))
    out.elapsed, out.server_cpu = seconds, server_cpu
    return out


def test_report_prints_the_ratios_and_flags_rejections(capsys: pytest.CaptureFixture[str]) -> None:
    report = Report(connections=50, workers=1, rounds=1)
    report.add(Row(1, "noop", _measured(1000, 1.0, 0.09)))
    report.add(Row(1, "verify", _measured(500, 1.0, 0.09), outcomes=Counter({"accepted": 499, "rejected:x": 1})))
    report.summary()
    out = capsys.readouterr().out
    assert "verify / no-op POST throughput: 50%" in out
    assert "verify 180 µs, no-op 90 µs" in out
    assert report.flags and "rejected:x" in report.flags[0]


def test_cpu_shares_say_when_the_run_waited_for_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loadtests.bench.cpu_shares.psutil.cpu_count", lambda: 2)
    busy = CpuShares(service_pid=lambda: None, load_pid=lambda: None)
    busy.samples = [(1.0, 0.3, 0.3, 0.1, 1.2)] * 5  # 1.9 of 2 cores
    quiet = CpuShares(service_pid=lambda: None, load_pid=lambda: None)
    quiet.samples = [(1.0, 0.3, 0.3, 0.1, 0.1)] * 5
    assert "everything else 120%" in busy.summary(5)
    assert "waited for a core" in busy.summary(5)
    assert "waited for a core" not in quiet.summary(5)


def test_headless_refuses_to_pin_a_service_it_did_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtests import headless

    monkeypatch.setenv("ECARD_LOADTEST_PASSWORD", "x")
    monkeypatch.setattr(headless, "usable_cores", lambda: [0, 1])  # whatever this machine has
    with pytest.raises(SystemExit) as exited:
        headless.parse_args(["--host", "http://127.0.0.1:8000", "--username", "admin", "--pin-load"])
    assert exited.value.code == 2
    options = headless.parse_args(["--loop-lag", "--pin-load"])
    assert options.loop_lag and options.pin_load


def test_report_puts_sm2_beside_ed25519_and_judges_the_2x_target(capsys: pytest.CaptureFixture[str]) -> None:
    report = Report(connections=50, workers=1, rounds=1)
    report.add(Row(1, "verify", _measured(1000, 1.0, 0.2), outcomes=Counter({"accepted": 1000})))
    report.add(Row(1, "sm2", _measured(1000, 1.0, 0.5), outcomes=Counter({"accepted": 1000})))
    report.issuance = {"verify": [_measured(1000, 1.0, 0.15)], "sm2": [_measured(1000, 1.0, 0.25)]}
    report.bundles = {"verify": _measured(100, 1.0, 0.09), "sm2": _measured(100, 1.0, 0.26)}
    report.summary()
    out = capsys.readouterr().out
    assert "issuance (Ed25519 keys) (POST /v1/holder/credentials" in out
    assert "issuance (SM2 keys) (POST /v1/holder/credentials" in out and "server 250 µs CPU per request" in out
    assert "  Ed25519 verify 200 µs, issue count=1 150 µs, bundle per credential 45 µs" in out
    assert "  SM2     verify 500 µs, issue count=1 250 µs, bundle per credential 130 µs" in out
    assert "  SM2 / Ed25519: verify 2.50x, issue count=1 1.67x, bundle per credential 2.89x" in out
    assert "SM2 / Ed25519 verify CPU per request 2.50x (asks <= 2x): NOT met" in out
    assert "sm2 results: accepted 1,000" in out
    assert not report.flags


def test_report_of_one_profile_has_no_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    report = Report(connections=50, workers=1, rounds=1)
    report.add(Row(1, "verify", _measured(1000, 1.0, 0.2), outcomes=Counter({"accepted": 1000})))
    report.issuance = {"verify": [_measured(1000, 1.0, 0.15)]}
    report.summary()
    out = capsys.readouterr().out
    assert "issuance (POST /v1/holder/credentials, count=1" in out
    assert "SM2" not in out and "issue 17" not in out


def test_bench_profile_options() -> None:
    from loadtests.bench_verify import parse_args

    assert parse_args([]).profile == "international"
    assert parse_args([]).targets == ("noop", "verify", "naive")
    national = parse_args(["--profile", "national"])
    assert (national.profile, national.targets) == ("national", ("noop", "verify"))
    assert parse_args(["--profile", "both"]).targets == ("noop", "verify", "naive")
    with pytest.raises(SystemExit):
        parse_args(["--profile", "national", "--targets", "verify,naive"])
