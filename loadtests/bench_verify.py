"""Benchmark `POST /v1/verify` beside a no-op Litestar POST served the same way.

    python -m loadtests.bench_verify --duration 10
    python -m loadtests.bench_verify --profile both     # Ed25519 and SM2 issuer keys, side by side

Starts the eCard service and loadtests/noop_app.py under uvicorn on free loopback ports, prepares
a region, a transit gate and activated cards through the public API, pre-issues one fresh
single-use credential per verify request, then drives both targets with C keep-alive connections
for D seconds and prints requests, req/s, p50/p99 latency, errors and CPU per request, and for
verify the p99 of the service's own handler histogram (from /metrics, scraped before and after each
run). After the rounds it measures what a 20-credential bundle costs the server. Everything it
creates (temporary directory, Redis keys under its own prefix, its own PostgreSQL database when
given a PostgreSQL server, its own throwaway Redis Cluster with --redis-cluster) is removed at the
end. With `--profile national` the region's key is SM2 (issue 17); with `--profile both` a second
region with an SM2 key runs beside the Ed25519 one, every verify round and issuance measured for
each, and the summary puts the SM2/Ed25519 CPU ratios side by side. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import math
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
import msgspec
import redis

from loadtests.bench import HOST, BenchError
from loadtests.bench.calibration import calibration_line
from loadtests.bench.client import Measurement, Target
from loadtests.bench.histograms import METRICS_PATH, VERIFY_HISTOGRAM, scrape_histogram
from loadtests.bench.preparation import (
    EXPIRY_MARGIN,
    GATES,
    REGION,
    REGION_NAME,
    VERIFY_PATH,
    Holder,
    Issued,
    classify_verify,
    issue_bundles,
    issue_credentials,
    prepare_ecard,
    refresh_holders,
    sanity_check,
)
from loadtests.bench.processes import ECARD_FACTORY, ServerProcess, Workspace, run_cli, run_interruptible, uvicorn_flags
from loadtests.bench.reporting import (
    BUNDLE_REQUESTS,
    BUNDLE_SECONDS,
    BUNDLE_SIZE,
    Report,
    Row,
)
from loadtests.redis_cluster import ClusterError

# What loadtests/scale.py (and scripts written against the one-file bench) import from here; the
# harness itself lives in loadtests/bench/.
__all__ = [
    "HOST",
    "REGION",
    "VERIFY_HISTOGRAM",
    "VERIFY_PATH",
    "BenchError",
    "Holder",
    "ServerProcess",
    "Target",
    "Workspace",
    "issue_credentials",
    "main",
    "prepare_ecard",
    "run_cli",
    "scrape_histogram",
]

NOOP_FACTORY = "loadtests.noop_app:create_app"
NOOP_PATH = "/noop"
NAIVE_FACTORY = "loadtests.naive_app:create_app"
NAIVE_PATH = "/naive"
# Validity a credential must have left, beyond warm-up + duration, when a round starts.
VALIDITY_HEADROOM = 3.0
# Pause between issuing a round's credentials and verifying them, for the server and Redis to settle.
SETTLE = 0.5
PILOT_SECONDS = 2.0
TARGETS = ("noop", "verify", "naive")
PROFILES = ("international", "national", "both")
# --profile national / both: the SM2 region, beside the Ed25519 one (REGION) with both.
SM2_REGION = "500000"
SM2_REGION_NAME = "重庆市"
# --redis-cluster: masters of the throwaway Redis Cluster the bench starts (loadtests/redis_cluster.py).
REDIS_CLUSTER_MASTERS = 3


@dataclass
class Lane:
    """One issuer-key algorithm under test: its region, gates, cards, verify target and row label.

    The label is the target name the rows carry: "verify" for Ed25519 (as before profiles existed),
    "sm2" for SM2.
    """

    label: str
    algorithm: str
    region: str
    region_name: str
    target: Target | None = None
    holders: list[Holder] = field(default_factory=list)
    rate_estimate: float = 0.0


@dataclass
class Options:
    """Command-line options."""

    duration: float
    warmup: float
    connections: int
    workers: int
    rounds: int
    holders: int
    credential_lifetime: int
    client: str
    targets: tuple[str, ...]
    redis_url: str
    database_url: str | None
    redis_cluster: bool = False
    profile: str = "international"


def parse_args(argv: Sequence[str] | None) -> Options:
    """Options from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_verify",
        description="Benchmark POST /v1/verify (a fresh credential per request) beside a no-op Litestar POST.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run (default 1)")
    parser.add_argument("--connections", "-c", type=int, default=50, help="concurrent connections (default 50)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server (default 1)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every target (default 1)")
    parser.add_argument("--holders", type=int, default=20, help="activated cards to issue credentials for (default 20)")
    parser.add_argument(
        "--credential-lifetime",
        type=int,
        default=60,
        help="ECARD_CREDENTIAL_LIFETIME for the service (default 60, its default). Every credential is issued "
        "before the run and must outlive it; raise this when issuing is slower than verifying",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw asyncio HTTP/1.1 (default, a few µs/request) or httpx.AsyncClient",
    )
    parser.add_argument(
        "--targets",
        default=None,
        help="comma-separated, from: noop, verify, naive (the naive reference verify) (default: all three; "
        "without naive for --profile national, as the naive reference verifies Ed25519 only)",
    )
    parser.add_argument(
        "--profile",
        choices=PROFILES,
        default="international",
        help="issuer keys: international = Ed25519 (default); national = SM2 with SM3, the service run with "
        "ECARD_CRYPTO_PROFILE=national; both = an Ed25519 region and an SM2 region in one service, every verify "
        "round, the issuance and the bundles measured for each, and their SM2/Ed25519 ratios",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="Redis for nonces and statuses (default $REDIS_URL or redis://127.0.0.1:6379/0); keys get a prefix "
        "of this run's own and are deleted at the end",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help=f"start a throwaway {REDIS_CLUSTER_MASTERS}-master Redis Cluster on loopback (the installed "
        "redis-server) and run the service (ECARD_REDIS_CLUSTER=1) and the naive reference against it; it is "
        "stopped and removed at the end. Not with --redis-url ($REDIS_URL is ignored)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="default: a SQLite file in a temporary directory. A PostgreSQL URL names a server: the run creates "
        "and drops a database of its own there",
    )
    args = parser.parse_args(argv)
    if args.redis_cluster and args.redis_url is not None:
        parser.error("--redis-cluster starts a Redis Cluster of its own: leave out --redis-url")
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    default_targets = "noop,verify" if args.profile == "national" else "noop,verify,naive"
    targets = tuple(name.strip() for name in (args.targets or default_targets).split(",") if name.strip())
    if not targets or any(name not in TARGETS for name in targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if args.profile == "national" and "naive" in targets:
        parser.error("--profile national: the naive reference verifies Ed25519 only (use --profile both)")
    if args.duration <= 0 or args.warmup < 0 or args.connections < 1 or args.workers < 1:
        parser.error("--duration > 0, --warmup >= 0, --connections >= 1 and --workers >= 1")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds between 1 and 20")
    if not 1 <= args.holders <= 1000:
        parser.error("--holders between 1 and 1000")
    if args.warmup + args.duration + 15 > args.credential_lifetime:
        parser.error(
            "--warmup + --duration must stay 15 s under --credential-lifetime: every credential is issued before "
            "the run (use more --rounds, or a longer --credential-lifetime)"
        )
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        workers=args.workers,
        rounds=args.rounds,
        holders=args.holders,
        credential_lifetime=args.credential_lifetime,
        client=args.client,
        targets=targets,
        redis_url=redis_url,
        database_url=args.database_url,
        redis_cluster=args.redis_cluster,
        profile=args.profile,
    )


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _qr_version(text: str) -> str:
    try:
        import segno
    except ImportError:
        return "?"
    return f"{segno.make(text, error='m', micro=False, boost_error=False).version}-M"


class Bench:
    """The runs, in order, and the report."""

    def __init__(self, options: Options, workspace: Workspace) -> None:
        self.options = options
        self.workspace = workspace
        self.report = Report(options.connections, options.workers, options.rounds)
        self.sample = ""
        ed25519 = Lane("verify", "Ed25519", REGION, REGION_NAME)
        sm2 = Lane("sm2", "SM2", SM2_REGION, SM2_REGION_NAME)
        self.lanes = {"international": [ed25519], "national": [sm2], "both": [ed25519, sm2]}[options.profile]

    async def run(self) -> int:
        """Set up, measure, report; the exit status (1 when something must be looked at)."""
        options, workspace = self.options, self.workspace
        self._print_header()
        await workspace.create_database()
        env = workspace.env(options.workers, options.credential_lifetime)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if options.profile == "national":
            env["ECARD_CRYPTO_PROFILE"] = "national"
        run_cli(env, "ecard", "db", "upgrade")
        username, password = f"bench-{workspace.tag}", f"bench-pw-{secrets.token_urlsafe(12)}"
        admin = ("--username", username, "--role", "admin", "--region", "*", "--password", password)
        run_cli(env, "ecard", "operator", "create", *admin)
        # Multiprocess mode, whatever the worker count (one code path): every worker writes its metrics
        # to this empty directory and /metrics, answered by any of them, sums them all.
        metrics_dir = workspace.directory / "prometheus"
        metrics_dir.mkdir()
        ecard_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        ecard = ServerProcess.start("ecard", ECARD_FACTORY, options.workers, ecard_env, workspace.directory)
        workspace.servers.append(ecard)
        noop = ServerProcess.start("noop", NOOP_FACTORY, options.workers, env, workspace.directory)
        workspace.servers.append(noop)
        await asyncio.gather(ecard.wait_ready(), noop.wait_ready())
        naive_env = {**env, "NAIVE_JWKS_URL": f"http://{HOST}:{ecard.port}/.well-known/jwks.json"}
        if workspace.redis_cluster is not None:
            naive_env["NAIVE_REDIS_CLUSTER"] = "1"
        naive = ServerProcess.start("naive", NAIVE_FACTORY, options.workers, naive_env, workspace.directory)
        workspace.servers.append(naive)

        async with httpx.AsyncClient(base_url=f"http://{HOST}:{ecard.port}", timeout=30.0) as client:
            for lane in self.lanes:
                started = time.perf_counter()
                api_keys, lane.holders = await prepare_ecard(
                    client,
                    username,
                    password,
                    options.holders,
                    region=lane.region,
                    region_name=lane.region_name,
                    key_algorithm=lane.algorithm,
                )
                sample = await sanity_check(client, api_keys, lane.holders[0], 2 * options.workers + 1)
                self.sample = self.sample or sample
                print(
                    f"setup ({lane.algorithm}): region {lane.region}, {GATES} transit gates, {len(lane.holders)} "
                    f"activated cards in {time.perf_counter() - started:.1f} s; sanity check: accepted once, "
                    "then replayed"
                )
                print(f"credential ({lane.algorithm}): {len(sample)} characters, QR version {_qr_version(sample)}")
                headers = [{"X-Api-Key": api_key} for api_key in api_keys]
                lane.target = Target(lane.label, ecard, VERIFY_PATH, headers, options.client)
            print()
            # The naive reference and the no-op POST take the Ed25519 lane's gates (the first lane).
            first = self.lanes[0]
            assert first.target is not None
            reference = Target("noop", noop, NOOP_PATH, first.target.headers, options.client)
            naive_target = Target("naive", naive, NAIVE_PATH, first.target.headers, options.client)
            # It reads the JWKS at start-up: the region's key exists now.
            await naive.wait_ready()
            noop_body = msgspec.json.encode({"credential": self.sample})

            if "verify" in options.targets:
                for lane in self.lanes:
                    await self._pilot(lane)
            for number in range(1, options.rounds + 1):
                for lane in self.lanes:
                    await refresh_holders(client, lane.holders)
                # Alternate the order, so a drift of the machine does not always favour one target.
                # Every lane's verify; the no-op and the naive reference once (on the Ed25519 lane's gates).
                runs = [
                    (name, lane) for name in options.targets for lane in (self.lanes if name == "verify" else [first])
                ]
                order = runs if number % 2 else list(reversed(runs))
                for name, lane in order:
                    if name == "noop":
                        await self._run_noop(number, reference, noop_body)
                    elif name == "naive":
                        await self._run_verify(number, naive_target, lane, target_name="naive")
                    else:
                        assert lane.target is not None
                        await self._run_verify(number, lane.target, lane)
            if {"verify", "naive"} & set(options.targets):
                for lane in self.lanes:
                    await refresh_holders(client, lane.holders)
                    await self._measure_bundles(ecard, lane)
        for server in workspace.servers:
            trouble = server.log_trouble()
            if trouble:
                self.report.flags.append(f"the {server.name} server logged errors:\n{trouble}")
        self.report.summary()
        return 1 if self.report.flags else 0

    def _print_header(self) -> None:
        options = self.options
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        flags = " ".join(uvicorn_flags())
        raw = "raw asyncio HTTP/1.1 keep-alive (loadtests/bench/client.py)"
        client = raw if options.client == "raw" else f"httpx {_version('httpx')}"
        loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
        print(f"eCard verify benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC")
        print(f"machine: {os.cpu_count()} cores ({affinity} usable), load average {load} (before)")
        print(
            f"servers: uvicorn {_version('uvicorn')} {flags}, litestar {_version('litestar')}, "
            f"{options.workers} worker(s) each; "
            f"database {self.workspace.database_kind}; "
            f"Redis {self.workspace.redis_description} prefix {self.workspace.redis_prefix}"
        )
        print(
            f"client: {client} on {loop}, {options.connections} connections, {options.warmup:g} s warm-up + "
            f"{options.duration:g} s per run, {options.rounds} round(s), one process beside the servers"
        )

    def _supply_size(self, lane: Lane) -> int:
        seconds = self.options.warmup + self.options.duration
        return math.ceil(lane.rate_estimate * seconds * 1.3) + 4 * self.options.connections

    def _expect_rate(self, lane: Lane, measured: Measurement) -> None:
        """Raise the lane's verify rate estimate from a run: what it reached, or what its CPU cost allows.

        On a busy machine a run may get less than its cores; the CPU per request says how fast
        the server could have gone with them, so the next supply is sized for that.
        """
        cores = self.report.cores_for_server
        capacity = cores * measured.requests / measured.server_cpu if measured.server_cpu > 0 else 0.0
        lane.rate_estimate = max(lane.rate_estimate, measured.rate, capacity)

    async def _issue(self, lane: Lane, count: int, run_seconds: float) -> Issued:
        """Issue up to count credentials, stopping in time for all of them to outlive a run of run_seconds."""
        assert lane.target is not None
        budget = self.options.credential_lifetime - EXPIRY_MARGIN - SETTLE - VALIDITY_HEADROOM - run_seconds
        issued = await issue_credentials(lane.target.server, lane.holders, count, self.options.connections, budget)
        self.report.issuance.setdefault(lane.label, []).append(issued.measurement)
        if len(issued.bodies) < count:
            print(
                f"  note: issuing stopped after {budget:.0f} s with {len(issued.bodies):,} of {count:,} credentials "
                "(issuing is slower than verifying); the run may end early: --credential-lifetime raises the budget"
            )
        await asyncio.sleep(SETTLE)
        return issued

    async def _pilot(self, lane: Lane) -> None:
        """Warm the lane's verify path and estimate its rate, to size each round's credential supply."""
        assert lane.target is not None
        count = max(2000, 40 * self.options.connections)
        issued = await self._issue(lane, count, PILOT_SECONDS)
        supply = lane.target.supply(issued.bodies, issued.valid_until)
        measured = await lane.target.run(supply, self.options.connections, PILOT_SECONDS, keep_answers=True)
        outcomes = classify_verify(measured)
        if set(outcomes) != {"accepted"}:
            self.report.flags.append(
                f"pilot ({lane.algorithm}): fresh credentials were not all accepted: {dict(outcomes)}"
            )
        # A supply that runs out ends the run early (noted); _supply_size adds a margin.
        self._expect_rate(lane, measured)
        print(
            f"pilot ({lane.algorithm}; warm-up, sizes the credential supply): {measured.requests:,} verifications at "
            f"{measured.rate:,.0f} req/s; issued {count:,} credentials at {issued.measurement.rate:,.0f} req/s"
        )

    async def _run_verify(self, number: int, verify: Target, lane: Lane, target_name: str = "") -> None:
        """One round of verify (the lane's own target) or of the naive reference, on the lane's fresh credentials."""
        options = self.options
        target_name = target_name or lane.label
        measured_by_service = target_name == lane.label
        issued = await self._issue(lane, self._supply_size(lane), options.warmup + options.duration)
        # Warm-up and measured run draw from one supply: no credential is sent twice.
        supply = verify.supply(issued.bodies, issued.valid_until)
        if options.warmup > 0:
            warmup = await verify.run(supply, options.connections, options.warmup, keep_answers=True)
            rejected = {key: n for key, n in classify_verify(warmup).items() if key != "accepted"}
            if rejected:
                self.report.flags.append(
                    f"round {number} {target_name} warm-up: fresh credentials not accepted: {rejected}"
                )
        supplied, stale_before = supply.remaining, supply.stale
        if not supplied:
            self.report.flags.append(f"round {number}: the warm-up used up all {len(issued.bodies)} credentials")
            return
        # The service's own histogram, scraped right before and after the measured run (not the warm-up).
        scraped = await scrape_histogram(verify.server, VERIFY_HISTOGRAM) if measured_by_service else None
        measured = await verify.run(supply, options.connections, options.duration, keep_answers=True)
        row = Row(number, target_name, measured, classify_verify(measured), supply.stale - stale_before, supplied)
        if measured_by_service:
            after = await scrape_histogram(verify.server, VERIFY_HISTOGRAM)
            if scraped is None or after is None:
                self.report.flags.append(f"round {number}: {VERIFY_HISTOGRAM} could not be read from {METRICS_PATH}")
            else:
                row.server_histogram = after.since(scraped)
        self._expect_rate(lane, measured)
        self.report.add(row)

    async def _measure_bundles(self, ecard: ServerProcess, lane: Lane) -> None:
        """Issue BUNDLE_SIZE-credential bundles for a short while: the server CPU one bundle costs."""
        connections = self.report.bundle_connections
        self.report.bundles[lane.label] = await issue_bundles(
            ecard, lane.holders, BUNDLE_SIZE, BUNDLE_REQUESTS, connections, BUNDLE_SECONDS
        )

    async def _run_noop(self, number: int, reference: Target, body: bytes) -> None:
        options = self.options
        supply = reference.supply([body], repeat=True)
        if options.warmup > 0:
            await reference.run(supply, options.connections, options.warmup)
        measured = await reference.run(supply, options.connections, options.duration)
        row = Row(number, "noop", measured)
        self.report.add(row)


async def _main(options: Options) -> int:
    if not options.redis_cluster:
        try:
            client = redis.Redis.from_url(options.redis_url, socket_connect_timeout=2.0)
            try:
                client.ping()
            finally:
                client.close()
        except (redis.RedisError, OSError) as exc:
            print(f"Redis at {options.redis_url} is unreachable ({exc}); start it or pass --redis-url", file=sys.stderr)
            return 2
    workspace = Workspace(options.redis_url, options.database_url)
    status = 1
    try:
        if options.redis_cluster:
            workspace.start_redis_cluster(REDIS_CLUSTER_MASTERS)
        status = await Bench(options, workspace).run()
    except ClusterError as exc:
        print(f"could not start a Redis Cluster: {exc}", file=sys.stderr)
        status = 2
    except BenchError as exc:
        print(f"\nbenchmark failed: {exc}", file=sys.stderr)
        for server in workspace.servers:
            print(f"--- {server.name} server log (tail) ---\n{server.log_tail()}", file=sys.stderr)
        status = 2
    finally:
        problems = await workspace.close()
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    options = parse_args(argv)
    # First, so that every figure below can be read against this machine's speed (docs/performance.md).
    print(calibration_line(), flush=True)
    status = run_interruptible(_main(options))
    if status is None:
        redis_gone = "the Redis Cluster" if options.redis_cluster else "Redis keys"
        print(f"\ninterrupted; servers stopped, {redis_gone} and temporary files removed", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
