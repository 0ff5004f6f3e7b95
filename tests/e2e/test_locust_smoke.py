"""Issue 6: a short smoke of the Locust scenarios against a freshly started service, for correctness only.

`python -m loadtests.headless` starts the service (SQLite in a temporary directory, the test Redis
under a prefix of this test's own, the event drain in the service), prepares terminals and cards
through the API and runs Locust headless for a few seconds: gates scanning fresh credentials, a
phone fetching bundles (its session refreshed every few seconds), a hospital desk doing PIN
step-up, medical verification and settlement. Asserted: exit status 0, verifications accepted and
nothing else, settlements made and replayed, no failed request, the CSV and HTML reports written;
and the clean-up: server stopped, temporary directories removed, no Redis key of the prefix left.
Nothing about timing is asserted (the p99 limit is set out of reach).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import redis

from app.settings import PROJECT_ROOT

RUN_SECONDS = 8
USERS, HOLDERS, HOSPITALS = 6, 1, 1
GATES = USERS - HOLDERS - HOSPITALS
# Setup (migrations, admin, service start, preparation) and Locust's start and stop come on top.
WALL_LIMIT = 120
REPORTS = (
    "ecard_stats.csv",
    "ecard_stats_history.csv",
    "ecard_failures.csv",
    "ecard_exceptions.csv",
    "report.html",
    "summary.json",
    "run.json",
)


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_locust_scenarios_smoke(redis_url: str, redis_prefix: str) -> None:
    """Gates, a holder and a hospital desk for a few seconds: all accepted, no failure, reports, clean-up."""
    out = Path(tempfile.mkdtemp(prefix="ecard-locust-smoke-"))
    prefix = f"{redis_prefix}locust-{uuid.uuid4().hex[:6]}:"
    command = [
        sys.executable, "-m", "loadtests.headless",
        "--users", str(USERS), "--spawn-rate", str(USERS), "--run-time", f"{RUN_SECONDS}s",
        "--holders", str(HOLDERS), "--hospitals", str(HOSPITALS), "--patients", "2", "--supply-holders", "4",
        "--token-max-age", "4", "--max-p99-ms", "60000",
        "--redis-url", redis_url, "--redis-prefix", prefix, "--out", str(out),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=WALL_LIMIT, check=False
        )
        output = f"{result.stdout}\n{result.stderr}"
        assert result.returncode == 0, output[-8000:]
        for name in REPORTS:
            assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing\n{output[-4000:]}"

        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        assert summary["verdict"] == "passed", summary["problems"]
        assert summary["total"]["failures"] == 0
        outcomes = summary["verify_outcomes"]
        assert set(outcomes["gate"]) == {"accepted"} and outcomes["gate"]["accepted"] > 0, outcomes
        assert set(outcomes["hospital"]) == {"accepted"} and outcomes["hospital"]["accepted"] > 0, outcomes
        settlements = summary["settlements"]
        assert settlements.get("settled", 0) > 0 and settlements.get("failed", 0) == 0, settlements
        requests = summary["requests"]
        for name in ("PUT /v1/holder/pin", "POST /v1/holder/pin/verification", "POST /v1/holder/credentials"):
            assert requests[name]["requests"] > 0, name
        assert summary["token_refreshes"] > 0 and requests["POST /v1/holder/token"]["failures"] == 0
        # Every scanned credential came from the supply once; a gate stopped mid-request took one unanswered.
        supply = summary["supply"]
        accepted = outcomes["gate"]["accepted"]
        assert accepted <= supply["handed_out"] <= accepted + GATES and supply["failed_requests"] == 0, supply

        stats = {row["Name"]: row for row in _csv_rows(out / "ecard_stats.csv")}
        assert int(stats["Aggregated"]["Failure Count"]) == 0
        assert int(stats["/v1/verify"]["Request Count"]) > 0
        assert _csv_rows(out / "ecard_failures.csv") == []
        assert "/v1/verify" in (out / "report.html").read_text()

        record: dict[str, Any] = json.loads((out / "run.json").read_text())
        assert record["exit_code"] == 0 and record["cleanup_problems"] == []
        assert record["redis_prefix"] == prefix
        assert not _alive(record["server_pid"]), "the service is still running"
        assert not _listening(record["server_port"])
        assert not Path(record["workspace"]).exists()
        assert not Path(record["fixture_directory"]).exists()
        client = redis.Redis.from_url(redis_url)
        try:
            assert list(client.scan_iter(match=f"{prefix}*", count=1000)) == []
        finally:
            client.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
