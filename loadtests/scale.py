"""One region at provincial scale, measured in one run: import, activation, mirror, terminals, kits, verify.

    python -m loadtests.scale --cards 1000000 [--terminals 100000] [--baseline 10000]

Starts a redis-server of its own (nothing on disk, so `INFO memory` counts only this run) and
creates a PostgreSQL database of its own on $DATABASE_URL's server (default the local `test`
one), then, for the baseline and then for all --cards cards of region 510000:

- writes a valid import file (loadtests/card_csv.py) and imports it with `ecard card import`;
- activates the eCards the fastest correct way there is for a harness: one UPDATE (an activation
  through the API binds a device; the verify path only needs the eCard's state and the mirror),
  1 % of them suspended or revoked, as the offline kit's status list sees in the field;
- fills the mirror with `ecard status rebuild` (the import sealed every new card's profile: the
  first one seals none), empties Redis and refills it (what a lost Redis costs), reads Redis's used_memory, and
  times `ecard status reconcile` (the drift check);
- registers the terminals (one INSERT … SELECT) and starts the service: time until /ready,
  memory per worker;
- fetches `GET /v1/offline-kits/510000` twice (the build, then the kit kept);
- activates --holders cards through the API and measures verify (server CPU per scan, the
  service's own p99) with a fresh credential per request, as `make bench` does;
- kills its redis-server (SIGKILL) and starts it again empty under the running service: the seconds
  until the workers have refilled the mirror by themselves.

The service runs on the development keys of one profile (international: keys_dev/ without the
national pair), as a deployment does outside a profile switch; with both pairs every imported row would
pay the dual-index period's second index and its adoption (docs/national-crypto.md).

It prints a Markdown table of every figure (docs/scale.md keeps the ones measured here) and a
calibration line. Everything it made is removed at the end (--keep leaves the database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx
import psutil  # type: ignore[import-untyped]
import redis
from sqlalchemy.engine import make_url

from app.security.keyring import PAIR_FILES
from app.security.pii import NATIONAL
from app.settings import DEV_KEYS_DIR
from loadtests.bench_verify import (
    HOST,
    REGION,
    VERIFY_HISTOGRAM,
    VERIFY_PATH,
    BenchError,
    Holder,
    ServerProcess,
    Target,
    Workspace,
    issue_credentials,
    prepare_ecard,
    run_cli,
    scrape_histogram,
)
from loadtests.redis_cluster import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
ECARD_FACTORY = "app.asgi:create_app"
# Share of eCards the harness suspends and revokes (each): the status list's realistic size.
NON_ACTIVE_SHARE = 0.005
CLI_TIMEOUT = 6 * 3600


@dataclass
class Stage:
    """One measured figure for the table."""

    what: str
    value: str
    seconds: float | None = None


@dataclass
class Point:
    """Every figure at one number of cards."""

    cards: int
    stages: list[Stage] = field(default_factory=list)

    def add(self, what: str, value: str, seconds: float | None = None) -> None:
        """Record a figure and print it at once (long runs show their progress)."""
        self.stages.append(Stage(what, value, seconds))
        print(f"  [{self.cards:,} cards] {what}: {value}", flush=True)


class OwnRedis:
    """A redis-server of this run's own, nothing on disk."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self._start()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, socket_timeout=30)
        for _ in range(200):
            with contextlib.suppress(redis.RedisError):
                if self.client.ping():
                    return
            time.sleep(0.05)
        raise BenchError("the harness's redis-server did not start")

    def _start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def restart_empty(self) -> None:
        """SIGKILL the server and start it again with nothing (no persistence): a lost Redis."""
        self.process.kill()
        self.process.wait(10)
        self._start()
        for _ in range(200):
            with contextlib.suppress(redis.RedisError):
                if self.client.ping():
                    return
            time.sleep(0.05)
        raise BenchError("the harness's redis-server did not come back")

    def used_memory(self) -> int:
        """INFO memory's used_memory, bytes."""
        return int(self.client.info("memory")["used_memory"])

    def stop(self) -> None:
        """Stop the server."""
        self.client.close()
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def _cli(env: dict[str, str], *args: str) -> tuple[str, float]:
    """Run an `ecard …` command (no time limit but the harness's own); its output and seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "litestar", "--app", ECARD_FACTORY, "ecard", *args]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"`ecard {' '.join(args)}` failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout, time.perf_counter() - started


def _dsn(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


def write_cards(path: Path, cards: int, seed: int) -> float:
    """A valid import file of `cards` rows (loadtests/card_csv.py); seconds taken."""
    started = time.perf_counter()
    with path.open("wb") as out:
        subprocess.run(
            [sys.executable, "-m", "loadtests.card_csv", "--cards", str(cards), "--region", REGION,
             "--seed", str(seed)],
            cwd=REPO_ROOT, stdout=out, check=True, timeout=CLI_TIMEOUT,
        )  # fmt: skip
    return time.perf_counter() - started


async def activate(dsn: str) -> tuple[int, int, float]:
    """Every pending eCard active, 0.5 % of all suspended and 0.5 % revoked; (activated, non-active, s).

    One statement each, raising every mirror version: what the activations and the operators' state
    changes would have left in the database (their mirror writes are the rebuild's to redo).
    """
    started = time.perf_counter()
    connection = await asyncpg.connect(dsn)
    try:
        activated = await connection.execute(
            "UPDATE ecards SET state = 'active', activated_at = now(), updated_at = now(),"
            " mirror_version = mirror_version + 1 WHERE state = 'pending_activation'"
        )
        await connection.execute("UPDATE cards SET state = 'active' WHERE state = 'issued'")
        modulus = round(1 / NON_ACTIVE_SHARE)
        # Scattered as in the field (a hash of the id, not every n-th index: a regular pattern would
        # compress the status list to nothing): one in `modulus` suspended, another one revoked.
        scatter = "('x' || substr(md5(id::text), 1, 8))::bit(32)::bigint"
        suspended = await connection.execute(
            "UPDATE ecards SET state = 'suspended', suspension_cause = 'operator', updated_at = now(),"
            f" mirror_version = mirror_version + 1 WHERE state = 'active' AND {scatter} % {modulus} = 0"
        )
        revoked = await connection.execute(
            "UPDATE ecards SET state = 'revoked', updated_at = now(),"
            f" mirror_version = mirror_version + 1 WHERE state = 'active' AND {scatter} % {modulus} = 1"
        )
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    count = int(activated.split()[-1])
    return count, int(suspended.split()[-1]) + int(revoked.split()[-1]), time.perf_counter() - started


async def add_terminals(dsn: str, terminals: int) -> float:
    """`terminals` enabled transit gates in one organisation (random key hashes: nobody calls with them)."""
    started = time.perf_counter()
    connection = await asyncpg.connect(dsn)
    try:
        organisation = await connection.fetchval(
            "INSERT INTO verifier_organisations (id, name, business_type, region_code, created_at, enabled)"
            " VALUES (gen_random_uuid(), 'Scale Metro', 'transit', $1, now(), true) RETURNING id",
            REGION,
        )
        existing = await connection.fetchval("SELECT count(*) FROM terminals WHERE organisation_id = $1", organisation)
        await connection.execute(
            "INSERT INTO terminals (id, organisation_id, name, allowed_purposes, api_key_hash, enabled, created_at,"
            " rate_per_minute, rate_burst)"
            " SELECT gen_random_uuid(), $1, 'gate-' || n, '[\"transit\"]', sha256(n::text::bytea), true, now(), 120, 30"
            " FROM generate_series($2::bigint, $3::bigint) AS n",
            organisation, existing, existing + terminals - 1,
        )  # fmt: skip
        # Whatever the directory keeps as its change marks, a change made behind its back must be seen.
        with contextlib.suppress(asyncpg.PostgresError):
            await connection.execute("UPDATE change_counters SET value = value + 1 WHERE name = 'directory'")
    finally:
        await connection.close()
    return time.perf_counter() - started


async def database_bytes(dsn: str) -> int:
    """pg_database_size of this run's database."""
    connection = await asyncpg.connect(dsn)
    try:
        size: int = await connection.fetchval("SELECT pg_database_size(current_database())")
        return size
    finally:
        await connection.close()


def _worker_rss(server: ServerProcess) -> list[int]:
    """Resident memory of each worker process (the uvicorn supervisor's children), bytes."""
    root = psutil.Process(server.process.pid)
    children = root.children(recursive=True) or [root]
    # multiprocessing's resource tracker is a child too, and no worker.
    workers = [child for child in children if "resource_tracker" not in " ".join(child.cmdline())]
    return [worker.memory_info().rss for worker in workers if worker.is_running()]


async def wait_ready(server: ServerProcess, limit: float) -> float:
    """Seconds until GET /ready answers 200 (database, Redis, keys, directory loaded)."""
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}", timeout=5.0) as client:
        while time.perf_counter() - started < limit:
            if server.process.poll() is not None:
                raise BenchError(f"the service exited:\n{server.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/ready")).status_code == 200:
                    return time.perf_counter() - started
            await asyncio.sleep(0.05)
    raise BenchError(f"the service was not ready after {limit:.0f} s:\n{server.log_tail()}")


async def fetch_kit(client: httpx.AsyncClient, api_key: str) -> tuple[float, int, float]:
    """(seconds of the first GET, its size in bytes, seconds of the second) of the region's offline kit."""
    timings, size = [], 0
    for _ in range(2):
        started = time.perf_counter()
        response = await client.get(f"/v1/offline-kits/{REGION}", headers={"X-Api-Key": api_key}, timeout=600)
        timings.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise BenchError(f"offline kit: {response.status_code} {response.text[:300]}")
        size = len(response.content)
    return timings[0], size, timings[1]


async def measure_verify(
    server: ServerProcess,
    api_keys: list[str],
    holders: list[Holder],
    seconds: float,
) -> tuple[float, float, int]:
    """(server CPU µs per scan, the service's p99 ms, scans) over `seconds` of fresh credentials."""
    issued = await issue_credentials(server, holders, int(seconds * 4000), 20, max(seconds, 10.0))
    target = Target("verify", server, VERIFY_PATH, [{"X-Api-Key": key} for key in api_keys], "raw")
    before = await scrape_histogram(server, VERIFY_HISTOGRAM)
    measured = await target.run(target.supply(issued.bodies, issued.valid_until), 20, seconds)
    after = await scrape_histogram(server, VERIFY_HISTOGRAM)
    p99 = after.since(before).quantile(0.99) * 1000 if before and after else float("nan")
    if measured.errors:
        raise BenchError(f"verify: {measured.errors} errors of {measured.requests} ({dict(measured.statuses)})")
    return measured.server_cpu / max(measured.requests, 1) * 1e6, p99, measured.requests


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.1f} {unit}" if unit != "B" else f"{size:,.0f} B"
        size /= 1024
    return f"{size:,.1f} GB"


class Harness:
    """The run: workspace, own Redis, the two points, the report."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        database_url = options.database_url or os.environ.get("DATABASE_URL") or "postgresql://127.0.0.1:5432/test"
        self.workspace = Workspace("redis://unused", database_url)
        self.redis = OwnRedis(self.workspace.directory)
        self.workspace.redis_url = self.redis.url
        self.points: list[Point] = []
        self.calibration = ""
        self.keys = self.workspace.directory / "keys"
        national = set(PAIR_FILES[NATIONAL][:2])
        shutil.copytree(DEV_KEYS_DIR, self.keys, ignore=lambda _, names: [name for name in names if name in national])

    @property
    def env(self) -> dict[str, str]:
        env = self.workspace.env(self.options.workers, 300)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        # The mirror's bucket hashes are sized for the deployment's cards (a deployment sets it once).
        env["ECARD_MIRROR_CAPACITY"] = str(self.options.cards)
        env["ECARD_KEYS_DIR"] = str(self.keys)
        return env

    async def run(self) -> None:
        """Set up, measure both points, print the table."""
        workspace, options = self.workspace, self.options
        await workspace.create_database()
        self.dsn = _dsn(workspace.database_url)
        _cli(self.env, "db", "upgrade")
        _cli(self.env, "region", "add", REGION, "四川省")
        self.username, self.password = f"scale-{workspace.tag}", f"bench-pw-{workspace.tag}x"
        run_cli(self.env, "ecard", "operator", "create", "--username", self.username, "--role", "admin",
                "--region", "*", "--password", self.password)  # fmt: skip
        baseline = min(options.baseline, options.cards)
        done = 0
        for target in sorted({baseline, options.cards}):
            point = Point(target)
            self.points.append(point)
            await self._grow(point, target - done, seed=len(self.points))
            done = target
            await self._serve(point, options.terminals if target == options.cards else options.terminals_baseline)
        self._report()

    async def _grow(self, point: Point, cards: int, seed: int) -> None:
        """Import `cards` more, activate, refill the mirror; record each step."""
        path = self.workspace.directory / f"cards-{seed}.csv"
        generated = write_cards(path, cards, seed)
        point.add("import file", f"{cards:,} rows, {_human(path.stat().st_size)} written in {generated:.1f} s")
        output, seconds = _cli(self.env, "card", "import", str(path), "--region", REGION)
        own = re.search(r"\(([\d,.]+) rows/s\)", output)
        point.add(
            "`ecard card import`",
            f"{own.group(1) if own else '?'} rows/s by its own count; {cards / seconds:,.0f} rows/s wall "
            f"({cards:,} rows in {seconds:.1f} s)",
            seconds,
        )
        path.unlink()
        activated, non_active, seconds = await activate(self.dsn)
        point.add(
            "activation (one UPDATE)", f"{activated:,} eCards, {non_active:,} suspended or revoked, {seconds:.1f} s"
        )
        total = point.cards
        for what in ("`ecard status rebuild`, first after the import",
                     "`ecard status rebuild` into an empty Redis (a lost store)"):  # fmt: skip
            self.redis.client.flushdb()
            empty = self.redis.used_memory()
            output, seconds = _cli(self.env, "status", "rebuild", "--restart", "--quiet")
            own = re.search(r"([\d,]+) eCards/s", output)
            sealed = re.search(r"(\d+) profiles sealed", output)
            point.add(
                what,
                f"{own.group(1) if own else '?'} eCards/s by its own count ({total:,} in {seconds:.1f} s wall; "
                f"{sealed.group(1) if sealed else '?'} profiles sealed)",
            )
        used = self.redis.used_memory() - empty
        point.add("Redis used_memory per card (INFO memory)", f"{used / total:,.0f} B ({_human(used)} in all)")
        output, seconds = _cli(self.env, "status", "reconcile", "--quiet")
        point.add("`ecard status reconcile` (drift check, nothing to repair)", f"{total / seconds:,.0f} cards/s wall")
        print(f"    reconcile said: {output.strip()[-300:]}")
        point.add("PostgreSQL database size", _human(await database_bytes(self.dsn)))

    async def _serve(self, point: Point, terminals: int) -> None:
        """Register terminals, start the service, and measure start-up, the kit and verify."""
        seconds = await add_terminals(self.dsn, terminals)
        point.add("terminals registered (one INSERT)", f"{terminals:,} in {seconds:.1f} s")
        metrics = self.workspace.directory / f"prometheus-{point.cards}"
        metrics.mkdir()
        server = ServerProcess.start(
            f"ecard-{point.cards}", ECARD_FACTORY, self.options.workers,
            {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics)}, self.workspace.directory,
        )  # fmt: skip
        self.workspace.servers.append(server)
        try:
            ready = await wait_ready(server, 600)
            rss = _worker_rss(server)
            point.add("service start-up until /ready", f"{ready:.1f} s ({self.options.workers} workers)")
            point.add("memory per worker (RSS)", ", ".join(_human(size) for size in rss))
            async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}", timeout=60.0) as client:
                api_keys, holders = await prepare_ecard(client, self.username, self.password, self.options.holders)
                first, size, second = await fetch_kit(client, api_keys[0])
                kit = f"{first * 1000:,.0f} ms, then {second * 1000:,.0f} ms; {_human(size)}"
                point.add("offline kit GET (first, then kept)", kit)
            # The machine's speed drifts between the points (minutes apart): its calibration beside each.
            point.add("calibration just before the verify", calibration().removeprefix("calibration: "))
            cpu, p99, scans = await measure_verify(server, api_keys, holders, self.options.verify_seconds)
            point.add("verify: server CPU per scan", f"{cpu:,.0f} µs ({scans:,} scans)")
            point.add("verify: service p99", f"{p99:.2f} ms")
            point.add("Redis lost (SIGKILL, back empty) until the mirror is full again", await self._lose_redis())
        finally:
            server.stop()

    async def _lose_redis(self, limit: float = 1800.0) -> str:
        """Kill Redis under the running service and time the workers' own refill (the refilling flag's life)."""
        flag = self.workspace.redis_prefix + "refilling"
        self.redis.restart_empty()
        started = time.perf_counter()
        seen = None
        while time.perf_counter() - started < limit:
            up = bool(self.redis.client.exists(flag))
            if up and seen is None:
                seen = time.perf_counter() - started
            if seen is not None and not up:
                return f"{time.perf_counter() - started:.1f} s (refill began after {seen:.1f} s)"
            await asyncio.sleep(0.1)
        return f"not refilled within {limit:.0f} s"

    def _report(self) -> None:
        """The Markdown table: one row per figure, one column per number of cards."""
        print(f"\n{self.calibration or calibration()}")
        print(f"machine: {os.cpu_count()} cores, loadavg {' '.join(f'{load:.2f}' for load in os.getloadavg())}\n")
        whats: list[str] = []
        for point in self.points:
            whats += [stage.what for stage in point.stages if stage.what not in whats]
        print("| figure | " + " | ".join(f"{point.cards:,} cards" for point in self.points) + " |")
        print("|---|" + "---|" * len(self.points))
        for what in whats:
            cells = [next((stage.value for stage in point.stages if stage.what == what), "") for point in self.points]
            print(f"| {what} | " + " | ".join(cells) + " |")

    async def close(self) -> None:
        """Remove what the run made."""
        if self.options.keep:
            print(f"kept: database {self.workspace.database_url}")
            self.workspace._postgres_server = None  # the workspace would drop it
        for problem in await self.workspace.close():
            print(f"cleanup: {problem}", file=sys.stderr)
        self.redis.stop()
        shutil.rmtree(self.workspace.directory, ignore_errors=True)


def calibration() -> str:
    """The machine's calibration line (loadtests' own, where it exists)."""
    try:
        from loadtests.bench.calibration import calibration_line  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "calibration: (not measured)"
    return str(calibration_line())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Options from the command line."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.scale", description=__doc__.split("\n")[0])
    parser.add_argument("--cards", type=int, required=True, help="cards of region 510000 at the largest point")
    parser.add_argument("--baseline", type=int, default=10_000, help="cards at the first point (default 10,000)")
    parser.add_argument(
        "--terminals", type=int, default=100_000, help="terminals at the largest point (default 100,000)"
    )
    parser.add_argument("--terminals-baseline", type=int, default=1_000, help="terminals at the first point")
    parser.add_argument("--holders", type=int, default=200, help="cards activated through the API for verify")
    parser.add_argument("--verify-seconds", type=float, default=5.0, help="seconds of verify per point (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="service workers (default 2)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server (default $DATABASE_URL or local test)")
    parser.add_argument("--keep", action="store_true", help="leave the database for a look afterwards")
    return parser.parse_args(argv)


async def _main(options: argparse.Namespace) -> int:
    harness = Harness(options)
    try:
        await harness.run()
    except BenchError as exc:
        print(f"scale: {exc}", file=sys.stderr)
        return 1
    finally:
        await harness.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness; its exit status."""
    return asyncio.run(_main(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
