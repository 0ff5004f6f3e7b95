"""Run the Locust scenarios headless and write CSV and HTML reports (see loadtests/README.md).

    python -m loadtests.headless --users 24 --spawn-rate 10 --run-time 60s --out loadtests/reports/run1

Starts the eCard service the way loadtests/bench_verify.py does (loadtests/bench/processes.py: uvicorn
on a free loopback port, a temporary SQLite database or a database of its own on a PostgreSQL
server, a Redis key prefix of its own, an admin made with the CLI), with the event drain in the
service process so that medical bills can be settled. Or, with --host, uses a running service and
an admin operator of it. Prepares terminals and cards through the public API (loadtests/prepare.py),
runs Locust headless on loadtests/locustfile.py, and removes everything it made (for a service it
started).

Exit status: Locust's (0 passed; 1 failures, an exception in a task, or the p99 of /v1/verify over
--max-p99-ms), 1 also when the server logged errors, 2 when the run could not be set up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # comes with locust

from loadtests.bench import HOST, REPO_ROOT, BenchError
from loadtests.bench.calibration import calibration_line
from loadtests.bench.cpu_shares import CpuShares
from loadtests.bench.histograms import SERVER_QUANTILE, VERIFY_HISTOGRAM, parse_histogram
from loadtests.bench.loop_lag import LAG_DIR_ENV, read_records, summarise
from loadtests.bench.processes import ECARD_FACTORY, ServerProcess, Workspace, run_cli, run_interruptible
from loadtests.prepare import PrepareSpec, add_spec_arguments, check_spec, describe, prepare_fixture, spec_from

LOOP_LAG_FACTORY = "loadtests.bench.loop_lag:create_app"
LOCUSTFILE = "loadtests/locustfile.py"
RUSH_HOUR = "loadtests/scenarios/rush_hour.py"
CSV_PREFIX = "ecard"
# How long Locust may take beyond its run time (start-up, prefill, stopping users) before it is stopped.
LOCUST_GRACE = 120.0
# The prefill issues `--prefill` seconds of scans at the service's issuing rate, which a busy machine
# cuts by several times (535/s instead of ~4,900/s at load 9 to 14): it may take this many times longer.
PREFILL_SLACK = 4.0
_TIMESPAN = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_seconds(text: str) -> int:
    """Seconds of a Locust time span: 90, 90s, 2m, 1h30m."""
    if text.isdigit():
        return int(text)
    match = _TIMESPAN.fullmatch(text.strip().lower())
    if not text or match is None or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"not a time span: {text!r} (e.g. 30s, 5m, 1h30m)")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


@dataclass
class Options:
    """Command-line options."""

    users: int
    spawn_rate: float
    run_time: int
    shape: str
    spec: PrepareSpec
    out: Path
    max_p99_ms: float
    max_server_p99_ms: float
    prefill: float
    token_max_age: float
    workers: int
    credential_lifetime: int
    host: str | None
    username: str | None
    password: str | None
    redis_url: str
    redis_prefix: str | None
    database_url: str | None
    loop_lag: bool = False
    pin_load: bool = False
    locust_args: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None) -> Options:
    """Options from the command line; what follows `--` goes to Locust as it is."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.headless",
        description="Run the eCard Locust scenarios headless against a service started here (or --host).",
        epilog="Arguments after `--` are passed to Locust unchanged.",
    )
    parser.add_argument("--users", "-u", type=int, default=24, help="peak users: gates + holders + hospitals (24)")
    parser.add_argument("--spawn-rate", "-r", type=float, default=10.0, help="users started per second (10)")
    parser.add_argument("--run-time", "-t", type=parse_seconds, default=60, help="how long, e.g. 30s, 5m (60s)")
    parser.add_argument(
        "--shape", choices=("steady", "rush-hour"), default="steady", help="steady (-u at -r) or rush-hour"
    )
    add_spec_arguments(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report directory (default loadtests/reports/<UTC time>): ecard_stats.csv, ecard_failures.csv, "
        "ecard_stats_history.csv, ecard_exceptions.csv, report.html, summary.json, run.json, server.log",
    )
    parser.add_argument(
        "--max-p99-ms", type=float, default=50.0, help="fail when the p99 of /v1/verify exceeds this (ms; 0: off; 50)"
    )
    parser.add_argument(
        "--max-server-p99-ms",
        type=float,
        default=0.0,
        help="fail when the server's own verify p99 (its /metrics histogram, interpolated) exceeds this (ms; 0: off)",
    )
    parser.add_argument(
        "--prefill", type=float, default=0.0, help="issue credentials for this many seconds of all gates first (0)"
    )
    parser.add_argument(
        "--token-max-age", type=float, default=600.0, help="refresh holders' access tokens older than this (600 s)"
    )
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the service started here (1)")
    parser.add_argument(
        "--credential-lifetime", type=int, default=60, help="ECARD_CREDENTIAL_LIFETIME of the service started here"
    )
    parser.add_argument("--host", default=None, help="a running service instead (needs --username)")
    parser.add_argument("--username", default=None, help="with --host: an admin operator ($ECARD_LOADTEST_PASSWORD)")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="Redis of the service started here (default $REDIS_URL or redis://127.0.0.1:6379/0)",
    )
    parser.add_argument(
        "--redis-prefix", default=None, help="its key prefix (default ecard-bench-<random>:); deleted at the end"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="default: SQLite in a temporary directory; PostgreSQL: a database of its own",
    )
    parser.add_argument(
        "--loop-lag",
        action="store_true",
        help="serve through loadtests/bench/loop_lag.py: every worker samples its event loop's lag every 10 ms and "
        "times the collector's passes; the report lists the stalls of the run",
    )
    parser.add_argument(
        "--pin-load",
        action="store_true",
        help="pin Locust to the last core and the service started here to the others (taskset); Redis, shared, "
        "is not pinned",
    )
    args = parser.parse_args(argv)
    if args.pin_load and (args.host or len(usable_cores()) < 2):
        parser.error("--pin-load needs a service started here and at least 2 usable cores")
    gates = args.users - args.holders - args.hospitals
    if gates < 1:
        parser.error(f"--users ({args.users}) must exceed --holders + --hospitals ({args.holders + args.hospitals})")
    spec = spec_from(args, gates)
    check_spec(parser, spec)
    if args.spawn_rate <= 0 or args.run_time < 1 or args.workers < 1:
        parser.error("--spawn-rate > 0, --run-time >= 1 s and --workers >= 1")
    if args.prefill < 0 or args.prefill > args.credential_lifetime - 10:
        parser.error("--prefill must stay 10 s under --credential-lifetime (the credentials must outlive it)")
    password = os.environ.get("ECARD_LOADTEST_PASSWORD")
    if args.host and not (args.username and password):
        parser.error("--host needs --username and the password in $ECARD_LOADTEST_PASSWORD")
    out = args.out or REPO_ROOT / "loadtests" / "reports" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Options(
        users=args.users,
        spawn_rate=args.spawn_rate,
        run_time=args.run_time,
        shape=args.shape,
        spec=spec,
        out=out.resolve(),
        max_p99_ms=args.max_p99_ms,
        max_server_p99_ms=args.max_server_p99_ms,
        prefill=args.prefill,
        token_max_age=args.token_max_age,
        workers=args.workers,
        credential_lifetime=args.credential_lifetime,
        host=args.host.rstrip("/") if args.host else None,
        username=args.username,
        password=password,
        redis_url=args.redis_url,
        redis_prefix=args.redis_prefix,
        database_url=args.database_url,
        loop_lag=args.loop_lag,
        pin_load=args.pin_load,
        locust_args=extra,
    )


def locust_command(options: Options, base_url: str, fixture: Path) -> list[str]:
    """The Locust command line of the run."""
    files = LOCUSTFILE if options.shape == "steady" else f"{LOCUSTFILE},{RUSH_HOUR}"
    out = options.out
    return [
        sys.executable, "-m", "locust", "-f", files, "--headless", "--host", base_url,
        "--users", str(options.users), "--spawn-rate", f"{options.spawn_rate:g}", "--run-time", f"{options.run_time}s",
        "--csv", str(out / CSV_PREFIX), "--html", str(out / "report.html"), "--only-summary",
        "--fixture", str(fixture), "--summary-json", str(out / "summary.json"),
        "--max-p99-ms", f"{options.max_p99_ms:g}", "--prefill", f"{options.prefill:g}",
        "--token-max-age", f"{options.token_max_age:g}",
        *options.locust_args,
    ]  # fmt: skip


def usable_cores() -> list[int]:
    """The cores this process may run on, in order."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def pin(pid: int, cores: list[int]) -> None:
    """Run a process and its children on these cores only (children started later inherit it)."""
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.cpu_affinity(cores)


async def run_locust(command: list[str], limit: float, started: Callable[[int], None] | None = None) -> int:
    """Run Locust with our stdout and stderr; its exit status (stopped after limit seconds).

    `started` is told Locust's process id as soon as it runs.
    """
    process = await asyncio.create_subprocess_exec(*command, cwd=REPO_ROOT)
    if started is not None:
        started(process.pid)
    try:
        return await asyncio.wait_for(process.wait(), limit)
    except TimeoutError:
        print(f"locust still running after {limit:.0f} s: stopping it", file=sys.stderr)
        return 2
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


_RESULT = re.compile(r'^ecard_verifications_total\{result="([^"]+)"\} (\S+)$')


def server_verify_figures(text: str) -> dict[str, Any]:
    """From the service's /metrics: verifications by result, and the p99 of its verify handler.

    The p99 is interpolated within its bucket as Prometheus's histogram_quantile does (`p99_ms`,
    None above the largest bucket), and given as the bucket's bound too (`p99_ms_at_most`).
    """
    results: dict[str, int] = {}
    for line in text.splitlines():
        match = _RESULT.match(line)
        if match is not None:
            results[match.group(1)] = int(float(match.group(2)))
    histogram = parse_histogram(text, VERIFY_HISTOGRAM)
    handled = histogram.observations
    estimate = histogram.quantile(SERVER_QUANTILE) if handled else math.nan
    bound = next((le for le, count in histogram.buckets if count >= SERVER_QUANTILE * handled), math.inf)
    return {
        "results": results,
        "handled": handled,
        "p99_ms": round(estimate * 1000, 2) if math.isfinite(estimate) else None,
        "p99_ms_at_most": bound * 1000 if handled and bound != math.inf else None,
    }


def read_summary(path: Path) -> dict[str, Any]:
    """The locustfile's summary (verdict, figures by request name), or {} when the run did not write one."""
    try:
        summary: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary


def print_figures(summary: dict[str, Any], server: dict[str, Any] | None) -> None:
    """The figures a report quotes: requests/s, p50/p99, failures, for everything and for verify."""
    print("\nfigures (Locust; its percentiles are rounded: 2 significant digits above 100 ms):")
    rows = summary.get("requests", {})
    names = ("POST /v1/verify", "POST /v1/verify [hospital]", "POST /v1/holder/credentials [supply]")
    for name, row in [*((name, rows.get(name)) for name in names), ("all requests", summary.get("total"))]:
        if row is None:
            continue
        print(
            f"  {name:<38} {row['requests']:>9,} requests {row['rps']:>9,.1f}/s"
            f"  p50 {row['p50_ms']:>5} ms  p99 {row['p99_ms']:>5} ms  failures {row['failures']:,}"
        )
    if server and server.get("handled"):
        bound, estimate = server["p99_ms_at_most"], server["p99_ms"]
        p99 = f"p99 {estimate:g} ms (bucket <= {bound:g} ms)" if bound is not None else "p99 over the largest bucket"
        print(
            f"  server verify handler (its /metrics): {server['handled']:,} scans, {p99}; results {server['results']}"
        )
    if summary:
        print(f"  verdict: {summary.get('verdict')}" + "".join(f"\n    - {p}" for p in summary.get("problems", [])))


async def fetch_metrics(base_url: str) -> dict[str, Any] | None:
    """The service's verify figures, or None when /metrics is not there."""
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=10.0) as client:
            response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return server_verify_figures(response.text) if response.status_code == 200 else None


class Run:
    """One headless run: the service (unless --host), the fixture, Locust, the reports."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.workspace: Workspace | None = None
        self.server: ServerProcess | None = None
        self.lag_directory: Path | None = None
        self.locust_pid: int | None = None
        self.private = Path(tempfile.mkdtemp(prefix="ecard-locust-"))
        self.record: dict[str, Any] = {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "fixture_directory": str(self.private),
        }

    async def start_service(self) -> tuple[str, str, str]:
        """Start the service with its own database and Redis prefix; (base URL, admin, password)."""
        options = self.options
        workspace = self.workspace = Workspace(options.redis_url, options.database_url)
        if options.redis_prefix:
            workspace.redis_prefix = options.redis_prefix
        await workspace.create_database()
        env = workspace.env(options.workers, options.credential_lifetime)
        # Medical settlements need the verifications in the database, so with hospital desks the service
        # drains them itself; without, the stream just grows (like bench_verify) and goes with the prefix.
        drain = options.spec.hospitals > 0
        env["ECARD_DRAIN_EVENTS"] = "true" if drain else "false"
        if options.workers > 1:
            metrics = workspace.directory / "prometheus"
            metrics.mkdir()
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
        run_cli(env, "ecard", "db", "upgrade")
        username, password = f"loadtest-{workspace.tag}", f"bench-pw-{secrets.token_urlsafe(12)}"
        run_cli(env, "ecard", "operator", "create", "--username", username, "--role", "admin",
                "--region", "*", "--password", password)  # fmt: skip
        factory = ECARD_FACTORY
        if options.loop_lag:
            factory = LOOP_LAG_FACTORY
            self.lag_directory = workspace.directory / "loop-lag"
            self.lag_directory.mkdir()
            env[LAG_DIR_ENV] = str(self.lag_directory)
        self.server = ServerProcess.start("ecard", factory, options.workers, env, workspace.directory)
        workspace.servers.append(self.server)
        if options.pin_load:
            pin(self.server.process.pid, usable_cores()[:-1])
        await self.server.wait_ready()
        base_url = f"http://{HOST}:{self.server.port}"
        self.record.update(
            workspace=str(workspace.directory),
            redis_prefix=workspace.redis_prefix,
            database=workspace.database_kind,
            server_pid=self.server.process.pid,
            server_port=self.server.port,
            workers=options.workers,
            event_drain=drain,
        )
        print(
            f"service: {base_url}, {options.workers} worker(s), database {workspace.database_kind}, "
            f"Redis prefix {workspace.redis_prefix}, event drain {'in the service' if drain else 'off'}",
            flush=True,
        )
        return base_url, username, password

    async def run(self) -> int:
        """Set up, run Locust, collect; the exit status."""
        options = self.options
        options.out.mkdir(parents=True, exist_ok=True)
        if options.host:
            base_url, username, password = options.host, str(options.username), str(options.password)
        else:
            base_url, username, password = await self.start_service()
        fixture_path = self.private / "fixture.json"
        started = time.perf_counter()
        fixture = await prepare_fixture(base_url, username, password, options.spec, fixture_path)
        print(describe(fixture, time.perf_counter() - started), flush=True)
        command = locust_command(options, base_url, fixture_path)
        print("locust: " + " ".join(command[2:]), flush=True)
        server = self.server
        shares = CpuShares(lambda: server.process.pid if server is not None else None, lambda: self.locust_pid)
        shares.start()
        try:
            limit = options.run_time + PREFILL_SLACK * options.prefill + LOCUST_GRACE
            status = await run_locust(command, limit, self._locust_started)
        finally:
            shares.stop()
        run_ended = time.time()
        self.record.update(host=base_url, locust_exit_code=status, out=str(options.out))
        server_figures = await fetch_metrics(base_url)
        self.record["server_verify"] = server_figures
        print_figures(read_summary(options.out / "summary.json"), server_figures)
        limit = options.max_server_p99_ms
        if limit and server_figures and server_figures.get("handled"):
            estimate = server_figures["p99_ms"]
            if estimate is None or estimate > limit:
                shown = "over the largest bucket" if estimate is None else f"{estimate:g} ms"
                print(f"    - the server's own verify p99 is {shown}, over the limit of {limit:g} ms")
                status = max(status, 1)
        if self.server is not None:
            trouble = self.server.log_trouble()
            if trouble:
                print(f"\nthe server logged errors:\n{trouble}", file=sys.stderr)
                self.record["server_errors"] = trouble
                status = max(status, 1)
        # Locust's last run_time seconds are the run (before them: start-up and the prefill).
        print(f"  {shares.summary(options.run_time)}")
        self.record["cpu_shares"] = shares.summary(options.run_time)
        if self.lag_directory is not None and self.server is not None:
            self.server.stop()  # each worker writes its record at shutdown
            lines = summarise(read_records(self.lag_directory), since=run_ended - options.run_time)
            print("  event-loop lag (loadtests/bench/loop_lag.py):\n" + "\n".join(f"    {line}" for line in lines))
            self.record["loop_lag"] = lines
        return status

    def _locust_started(self, pid: int) -> None:
        self.locust_pid = pid
        if self.options.pin_load:
            pin(pid, usable_cores()[-1:])
            print(f"pinned: Locust on core {usable_cores()[-1]}, the service on {usable_cores()[:-1]}", flush=True)

    async def close(self) -> list[str]:
        """Stop the service, delete its keys and database, remove temporary files; what went wrong."""
        problems: list[str] = []
        if self.server is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.server.log, self.options.out / "server.log")
        if self.workspace is not None:
            problems = await self.workspace.close()
        shutil.rmtree(self.private, ignore_errors=True)
        return problems

    def write_record(self, status: int, problems: list[str]) -> None:
        """run.json in the report directory: where things were, and how it ended."""
        self.record.update(exit_code=status, cleanup_problems=problems)
        with contextlib.suppress(OSError):
            path = self.options.out / "run.json"
            path.write_text(json.dumps(self.record, indent=2, ensure_ascii=False) + "\n")


async def _main(options: Options) -> int:
    run = Run(options)
    status = 2
    try:
        status = await run.run()
    except asyncio.CancelledError:
        status = 130  # Ctrl-C or SIGTERM: clean up, then main() says so
        raise
    except (BenchError, httpx.HTTPError, subprocess.SubprocessError, OSError) as exc:
        print(f"\nload test could not run: {exc}", file=sys.stderr)
        if run.server is not None:
            print(f"--- server log (tail) ---\n{run.server.log_tail()}", file=sys.stderr)
        status = 2
    finally:
        problems = await run.close()
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
        run.write_record(status, problems)
    print(f"\nreports in {options.out}; exit status {status}", flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    options = parse_args(argv)
    # First, so that every figure below can be read against this machine's speed (docs/performance.md).
    print(calibration_line(), flush=True)
    status = run_interruptible(_main(options))
    if status is None:
        print("\ninterrupted; service stopped, Redis keys and temporary files removed", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
