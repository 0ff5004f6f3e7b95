"""Benchmark `POST /v1/verify` beside a no-op Litestar POST served the same way.

    python -m loadtests.bench_verify --duration 10

Starts the eCard service and loadtests/noop_app.py under uvicorn on free loopback ports, prepares
a region, a transit gate and activated cards through the public API, pre-issues one fresh
single-use credential per verify request, then drives both targets with C keep-alive connections
for D seconds and prints requests, req/s, p50/p99 latency, errors and CPU per request, and for
verify the p99 of the service's own handler histogram (from /metrics, scraped before and after each
run). After the rounds it measures what a 20-credential bundle costs the server. Everything it
creates (temporary directory, Redis keys under its own prefix, its own PostgreSQL database when
given a PostgreSQL server, its own throwaway Redis Cluster with --redis-cluster) is removed at the
end. See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import httpx
import msgspec
import psutil  # type: ignore[import-untyped]  # comes with locust
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from loadtests.redis_cluster import ClusterError, RedisCluster, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REGION = "510000"
REGION_NAME = "四川省"
PURPOSE = "transit"
# Terminals the load is spread over (each allows 1,000 verifications/s: far above one real gate).
GATES = 16
ECARD_FACTORY = "app.asgi:create_app"
NOOP_FACTORY = "loadtests.noop_app:create_app"
VERIFY_PATH = "/v1/verify"
NOOP_PATH = "/noop"
NAIVE_FACTORY = "loadtests.naive_app:create_app"
NAIVE_PATH = "/naive"
# A credential is not sent in the last second of its life (its expiry, without the skew allowance).
EXPIRY_MARGIN = 1.0
# Bounds for every loop that waits or repeats.
MAX_REQUESTS_PER_CONNECTION = 50_000_000
READY_ATTEMPTS = 300
READY_INTERVAL = 0.1
# How long after a run's deadline in-flight requests may take before they count as timed out.
RUN_GRACE = 15.0
ISSUE_TIMEOUT = 120.0
# Holder access tokens live 15 min; refresh them when older than this.
TOKEN_REFRESH_AGE = 600.0
# Validity a credential must have left, beyond warm-up + duration, when a round starts.
VALIDITY_HEADROOM = 3.0
# Pause between issuing a round's credentials and verifying them, for the server and Redis to settle.
SETTLE = 0.5
PILOT_SECONDS = 2.0
TARGETS = ("noop", "verify", "naive")
# The service's verify-handler histogram (app/metrics.py) and the quantile the rows show from it.
METRICS_PATH = "/metrics"
VERIFY_HISTOGRAM = "ecard_verify_duration_seconds"
SERVER_QUANTILE = 0.99
METRICS_TIMEOUT = 10.0
# The bundle measurement after the rounds: this many credentials per request (the service's default
# ECARD_CREDENTIAL_BUNDLE_MAX), up to BUNDLE_REQUESTS requests for at most BUNDLE_SECONDS.
BUNDLE_SIZE = 20
BUNDLE_REQUESTS = 2_000
BUNDLE_SECONDS = 2.0
BUNDLE_CONNECTIONS = 10
# Issue 6's targets, quoted beside the figures in the summary.
TARGET_VERIFY_VS_NOOP = 0.40
TARGET_VERIFY_VS_NAIVE = 1.5
TARGET_ISSUE_RATE_PER_WORKER = 4_000
TARGET_BUNDLE_SERVER_MS = 2.0
# --redis-cluster: masters of the throwaway Redis Cluster the bench starts (loadtests/redis_cluster.py).
REDIS_CLUSTER_MASTERS = 3


class BenchError(RuntimeError):
    """The benchmark cannot go on; the message says why."""


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client: one request in flight per connection, responses with
# Content-Length only (all Litestar answers here have one). Its CPU per request is mostly the two
# socket syscalls, a small fraction of httpx's (see README), so on a 2-core machine the server,
# not the client, is what gets measured.
# ---------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The server's answer was not an HTTP/1.1 response this client understands."""


def encode_post(host: str, path: str, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """A complete HTTP/1.1 POST request."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class RawConnection(asyncio.Protocol):
    """One keep-alive connection; `request` sends a pre-encoded request and awaits (status, body)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Complete the waiting request once its whole response is buffered."""
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = self._parse()
        except (ProtocolError, ValueError) as exc:
            self._waiter = None
            waiter.set_exception(ProtocolError(str(exc)))
            return
        if parsed is not None:
            self._waiter = None
            waiter.set_result(parsed)

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the waiting request."""
        self._lost = ConnectionError(f"connection lost: {exc}")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)
        self._waiter = None

    def _parse(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = bytes(buffer[:head_end]).lower()
        if not head.startswith(b"http/1.1 "):
            raise ProtocolError(f"not an HTTP/1.1 response: {head[:40]!r}")
        status = int(head[9:12])
        start = head.find(b"\r\ncontent-length:")
        if start < 0:
            raise ProtocolError("response without Content-Length")
        end = head.find(b"\r\n", start + 2)
        length = int(head[start + 17 : end if end >= 0 else len(head)])
        total = head_end + 4 + length
        if len(buffer) < total:
            return None
        body = bytes(buffer[head_end + 4 : total])
        del buffer[:total]
        return status, body

    def request(self, payload: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send payload; the future completes with the response."""
        if self._lost is not None or self._transport is None:
            raise ConnectionError("connection is closed")
        waiter: asyncio.Future[tuple[int, bytes]] = self._loop.create_future()
        self._waiter = waiter
        self._transport.write(payload)
        return waiter

    def close(self) -> None:
        """Close the connection."""
        if self._transport is not None:
            self._transport.close()


async def open_raw(port: int) -> RawConnection:
    """A connected RawConnection to HOST:port."""
    loop = asyncio.get_running_loop()
    _transport, protocol = await loop.create_connection(lambda: RawConnection(loop), HOST, port)
    return protocol


# ---------------------------------------------------------------------------------------------
# Load driving
# ---------------------------------------------------------------------------------------------


class Supply:
    """Requests handed to connections in order, each at most once (or one request, repeated).

    Items are complete requests for the raw client, bodies for httpx. `valid_until` (epoch
    seconds) skips items that would no longer be valid when sent: a credential is never sent
    stale, and the skipped ones are counted.
    """

    def __init__(
        self, items: Sequence[bytes], valid_until: Sequence[float] | None = None, repeat: bool = False
    ) -> None:
        if not items:
            raise ValueError("a supply needs at least one item")
        self._items = items
        self._valid_until = valid_until
        self._repeat = repeat
        self._next = 0
        self.stale = 0

    def take(self) -> bytes | None:
        """The next request, or None when the supply is used up."""
        if self._repeat:
            return self._items[0]
        valid_until = self._valid_until
        now = time.time() if valid_until is not None else 0.0
        for _ in range(len(self._items) - self._next):
            index = self._next
            self._next += 1
            if valid_until is None or valid_until[index] > now:
                return self._items[index]
            self.stale += 1
        return None

    @property
    def remaining(self) -> int:
        """Items not handed out yet."""
        return len(self._items) - self._next


@dataclass
class Measurement:
    """What one run of one target recorded."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    statuses: Counter[int] = field(default_factory=Counter)
    # (status, body) of every response, when the run keeps them.
    answers: list[tuple[int, bytes]] = field(default_factory=list)
    transport_errors: int = 0
    timeouts: int = 0
    exhausted: bool = False
    elapsed: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0

    @property
    def requests(self) -> int:
        """Completed requests (any status)."""
        return len(self.latencies)

    @property
    def errors(self) -> int:
        """Non-200 answers, transport errors and timeouts."""
        return self.requests - self.statuses.get(200, 0) + self.transport_errors + self.timeouts

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Latency percentile (nearest rank), in milliseconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index] * 1000


async def _raw_worker(
    port: int, connection: RawConnection, supply: Supply, deadline: float, keep: bool, out: Measurement
) -> None:
    perf = time.perf_counter
    latencies, statuses, answers = out.latencies, out.statuses, out.answers
    for _ in range(MAX_REQUESTS_PER_CONNECTION):
        if perf() >= deadline:
            return
        payload = supply.take()
        if payload is None:
            out.exhausted = True
            return
        start = perf()
        try:
            status, body = await connection.request(payload)
        except (ConnectionError, ProtocolError, OSError):
            out.transport_errors += 1
            connection.close()
            try:
                connection = await open_raw(port)
            except OSError:
                return
            continue
        latencies.append(perf() - start)
        statuses[status] += 1
        if keep:
            answers.append((status, body))


async def _httpx_worker(
    client: httpx.AsyncClient,
    path: str,
    headers: dict[str, str],
    supply: Supply,
    deadline: float,
    keep: bool,
    out: Measurement,
) -> None:
    perf = time.perf_counter
    for _ in range(MAX_REQUESTS_PER_CONNECTION):
        if perf() >= deadline:
            return
        body = supply.take()
        if body is None:
            out.exhausted = True
            return
        start = perf()
        try:
            response = await client.post(path, content=body, headers=headers)
        except httpx.HTTPError:
            out.transport_errors += 1
            continue
        out.latencies.append(perf() - start)
        out.statuses[response.status_code] += 1
        if keep:
            out.answers.append((response.status_code, response.content))


async def _gather_bounded(workers: list[Coroutine[Any, Any, None]], limit: float, out: Measurement) -> None:
    """Run the workers; those still busy after `limit` seconds are cancelled and count as timeouts."""
    tasks = [asyncio.create_task(worker) for worker in workers]
    done, pending = await asyncio.wait(tasks, timeout=limit)
    for task in pending:
        task.cancel()
    out.timeouts += len(pending)
    for task in done:
        task.result()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def drive_raw(
    port: int,
    supply: Supply,
    connections: int,
    duration: float | None,
    keep_answers: bool,
    cpu: Callable[[], float],
) -> Measurement:
    """Drive `connections` raw keep-alive connections until `duration` passes or the supply ends."""
    opened = await asyncio.gather(*(open_raw(port) for _ in range(connections)))
    out = Measurement()
    try:
        server_cpu, client_cpu = cpu(), time.process_time()
        start = time.perf_counter()
        deadline = start + duration if duration is not None else math.inf
        limit = (duration + RUN_GRACE) if duration is not None else ISSUE_TIMEOUT
        workers = [_raw_worker(port, conn, supply, deadline, keep_answers, out) for conn in opened]
        await _gather_bounded(workers, limit, out)
        out.elapsed = time.perf_counter() - start
        out.server_cpu, out.client_cpu = cpu() - server_cpu, time.process_time() - client_cpu
    finally:
        for conn in opened:
            conn.close()
    return out


async def drive_httpx(
    port: int,
    path: str,
    headers: dict[str, str],
    supply: Supply,
    connections: int,
    duration: float | None,
    keep_answers: bool,
    cpu: Callable[[], float],
) -> Measurement:
    """The same with httpx.AsyncClient (a pool of `connections` keep-alive connections)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    out = Measurement()
    # The bodies are JSON and say so, as the raw client's requests do (the service refuses other media types).
    json_type = {"content-type": "application/json"}
    async with httpx.AsyncClient(
        base_url=f"http://{HOST}:{port}", limits=limits, timeout=RUN_GRACE, headers=json_type
    ) as client:
        server_cpu, client_cpu = cpu(), time.process_time()
        start = time.perf_counter()
        deadline = start + duration if duration is not None else math.inf
        limit = (duration + RUN_GRACE) if duration is not None else ISSUE_TIMEOUT
        workers = [
            _httpx_worker(client, path, headers, supply, deadline, keep_answers, out) for _ in range(connections)
        ]
        await _gather_bounded(workers, limit, out)
        out.elapsed = time.perf_counter() - start
        out.server_cpu, out.client_cpu = cpu() - server_cpu, time.process_time() - client_cpu
    return out


class Target:
    """One server endpoint and the client that drives it."""

    def __init__(self, name: str, server: ServerProcess, path: str, headers: list[dict[str, str]], client: str) -> None:
        self.name = name
        self.server = server
        self.path = path
        # One header set per gate; requests take them in turn (the httpx client uses the first).
        self.headers = headers
        self.client = client
        self.host = f"{HOST}:{server.port}"

    def supply(
        self, bodies: Sequence[bytes], valid_until: Sequence[float] | None = None, repeat: bool = False
    ) -> Supply:
        """These request bodies, encoded for the client, ready to be handed out."""
        if self.client == "raw":
            gates = [list(headers.items()) for headers in self.headers]
            return Supply(
                [encode_post(self.host, self.path, gates[i % len(gates)], body) for i, body in enumerate(bodies)],
                valid_until,
                repeat,
            )
        return Supply(bodies, valid_until, repeat)

    async def run(self, supply: Supply, connections: int, duration: float, keep_answers: bool = False) -> Measurement:
        """Drive the target from the supply for `duration` seconds (or until the supply ends)."""
        port, cpu = self.server.port, self.server.cpu_seconds
        if self.client == "raw":
            return await drive_raw(port, supply, connections, duration, keep_answers, cpu)
        return await drive_httpx(port, self.path, self.headers[0], supply, connections, duration, keep_answers, cpu)


# ---------------------------------------------------------------------------------------------
# Servers and the workspace
# ---------------------------------------------------------------------------------------------


def uvicorn_flags() -> list[str]:
    """The fastest event loop and HTTP parser installed."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return ["--loop", loop, "--http", http]


@dataclass
class ServerProcess:
    """A uvicorn process (and its workers) started by this script."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, name: str, factory: str, workers: int, env: dict[str, str], log_dir: Path) -> ServerProcess:
        """Start uvicorn serving factory on a free loopback port."""
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            factory,
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--no-access-log",
            "--log-level",
            "warning",
            *uvicorn_flags(),
        ]
        log = log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(name, process, port, log)

    async def wait_ready(self) -> None:
        """Wait until GET /health answers 200 (bounded)."""
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{self.port}", timeout=2.0) as client:
            for _ in range(READY_ATTEMPTS):
                if self.process.poll() is not None:
                    raise BenchError(f"{self.name} server exited with {self.process.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        return
                await asyncio.sleep(READY_INTERVAL)
        raise BenchError(
            f"{self.name} server not ready after {READY_ATTEMPTS * READY_INTERVAL:.0f} s:\n{self.log_tail()}"
        )

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process and its workers so far."""
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's output."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_trouble(self, lines: int = 12) -> str:
        """The first error lines of the server's output ('' when there are none)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        found = [line for line in text.splitlines() if "Traceback" in line or "ERROR" in line or "Error:" in line]
        return "\n".join(f"    {line}" for line in found[:lines])

    def stop(self) -> None:
        """SIGTERM (uvicorn stops its workers), then SIGKILL if it does not exit."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _is_postgres(url: str) -> bool:
    return url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def _with_database(url: str, database: str) -> str:
    """The URL of another database on the same server, with the service's async driver."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql+asyncpg", database=database)
    return parsed.render_as_string(hide_password=False)


async def _postgres_admin(url: str, statement: str) -> None:
    import asyncpg  # type: ignore[import-untyped]
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


class Workspace:
    """Temporary directory, Redis key prefix and database of one benchmark run, and their removal.

    With `start_redis_cluster`, Redis is a throwaway cluster of the run's own instead of `redis_url`.
    """

    def __init__(self, redis_url: str, database_url: str | None) -> None:
        self.tag = secrets.token_hex(5)
        self.directory = Path(tempfile.mkdtemp(prefix=f"ecard-bench-{self.tag}-"))
        self.redis_url = redis_url
        self.redis_prefix = f"ecard-bench-{self.tag}:"
        self._postgres_server: str | None = None
        self._postgres_database = f"ecard_bench_{self.tag}"
        if database_url is None:
            self.database_url = f"sqlite+aiosqlite:///{self.directory / 'bench.sqlite3'}"
        elif _is_postgres(database_url):
            self._postgres_server = database_url
            self.database_url = _with_database(database_url, self._postgres_database)
        else:
            self.database_url = database_url
        self.servers: list[ServerProcess] = []
        self.redis_cluster: RedisCluster | None = None

    def start_redis_cluster(self, masters: int) -> None:
        """Start a throwaway Redis Cluster (loadtests/redis_cluster.py) and use it; `close` stops it.

        Blocks for the couple of seconds the nodes take; raises ClusterError when they do not come up
        (the nodes started so far are stopped then).
        """
        self.redis_cluster = RedisCluster(masters=masters).start()
        self.redis_url = self.redis_cluster.url

    @property
    def redis_description(self) -> str:
        """The Redis URL for the report, and what it is when the run started its own cluster."""
        cluster = self.redis_cluster
        if cluster is None:
            return self.redis_url
        ports = ", ".join(map(str, cluster.ports))
        return f"{self.redis_url} (a {cluster.masters}-master Redis Cluster of this run's own, ports {ports})"

    @property
    def database_kind(self) -> str:
        """sqlite, postgresql, … for the report."""
        return self.database_url.split(":", 1)[0].split("+", 1)[0]

    async def create_database(self) -> None:
        """Create this run's own PostgreSQL database (nothing to do for SQLite)."""
        if self._postgres_server is not None:
            await _postgres_admin(self._postgres_server, f'CREATE DATABASE "{self._postgres_database}"')

    def env(self, workers: int, credential_lifetime: int) -> dict[str, str]:
        """The service's environment: our database, Redis and prefix; every other ECARD_* at its default."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("ECARD_") and key not in ("DATABASE_URL", "REDIS_URL", "WEB_CONCURRENCY")
        }
        env.update(
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            ECARD_REDIS_PREFIX=self.redis_prefix,
            WEB_CONCURRENCY=str(workers),
            ECARD_CREDENTIAL_LIFETIME=str(credential_lifetime),
            PYTHONUNBUFFERED="1",
        )
        if self.redis_cluster is not None:
            # REDIS_URL names one node; the service's cluster client learns the others from it.
            env["ECARD_REDIS_CLUSTER"] = "1"
        return env

    def delete_redis_keys(self) -> int:
        """Delete every key under this run's prefix (nonces expire anyway; statuses do not).

        Nothing to do with a cluster of the run's own: it goes as a whole (and a plain client's SCAN
        would only see the node it is connected to).
        """
        if self.redis_cluster is not None:
            return 0
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5.0)
        try:
            keys = list(client.scan_iter(match=f"{self.redis_prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.unlink(*keys[start : start + 500])
            return len(keys)
        finally:
            client.close()

    async def close(self) -> list[str]:
        """Stop servers, delete keys (or stop the run's own Redis Cluster), drop the database, remove files.

        Returns what went wrong, if anything.
        """
        problems: list[str] = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:
                problems.append(f"stopping {server.name}: {exc}")
        if self.redis_cluster is not None:
            try:
                self.redis_cluster.stop()
            except Exception as exc:
                problems.append(f"stopping the Redis Cluster on ports {self.redis_cluster.ports}: {exc}")
        try:
            self.delete_redis_keys()
        except Exception as exc:
            problems.append(f"deleting Redis keys {self.redis_prefix}*: {exc}")
        if self._postgres_server is not None:
            try:
                await _postgres_admin(
                    self._postgres_server, f'DROP DATABASE IF EXISTS "{self._postgres_database}" WITH (FORCE)'
                )
            except Exception as exc:
                problems.append(f"dropping database {self._postgres_database}: {exc}")
        shutil.rmtree(self.directory, ignore_errors=True)
        return problems


def run_cli(env: dict[str, str], *args: str) -> str:
    """Run `litestar --app app.asgi:create_app …` with the service's environment; its output."""
    command = [sys.executable, "-m", "litestar", "--app", ECARD_FACTORY, *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        shown = [arg if not arg.startswith("bench-pw-") else "***" for arg in args]
        raise BenchError(f"`litestar {' '.join(shown)}` failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


# ---------------------------------------------------------------------------------------------
# The service's own latency histogram (Prometheus text format at /metrics)
# ---------------------------------------------------------------------------------------------

_LE_LABEL = re.compile(r'(?:^|,)le="([^"]+)"')


@dataclass(frozen=True)
class HistogramCounts:
    """Cumulative bucket counts of one Prometheus histogram: (upper bound in s, count), ascending, +Inf last."""

    buckets: tuple[tuple[float, float], ...]

    @property
    def observations(self) -> int:
        """Observations counted (the +Inf bucket)."""
        return int(self.buckets[-1][1]) if self.buckets else 0

    @property
    def top(self) -> float:
        """The largest finite bucket bound, seconds (NaN without one)."""
        finite = [bound for bound, _count in self.buckets if bound != math.inf]
        return finite[-1] if finite else math.nan

    def since(self, earlier: HistogramCounts) -> HistogramCounts:
        """The observations made after `earlier` was scraped (kept cumulative, like Prometheus keeps them)."""
        before = dict(earlier.buckets)
        buckets, running = [], 0.0
        for bound, count in self.buckets:
            running = max(running, count - before.get(bound, 0.0))
            buckets.append((bound, running))
        return HistogramCounts(tuple(buckets))

    def quantile(self, q: float) -> float:
        """The q-quantile in seconds as Prometheus's histogram_quantile computes it.

        Linear interpolation inside the bucket holding rank q·observations (from 0 in the first
        bucket); math.inf when the rank lies in the +Inf bucket (above `top`), NaN when nothing
        was observed.
        """
        buckets = self.buckets
        if len(buckets) < 2 or buckets[-1][0] != math.inf or buckets[-1][1] <= 0:
            return math.nan
        rank = q * buckets[-1][1]
        start, below = 0.0, 0.0
        for bound, count in buckets[:-1]:
            if count >= rank:
                if bound <= 0:
                    return bound
                return start + (bound - start) * (rank - below) / (count - below)
            start, below = bound, count
        return math.inf


def parse_histogram(text: str, name: str) -> HistogramCounts:
    """The `name` histogram's cumulative bucket counts from a /metrics page (no buckets: it is not there)."""
    prefix = f"{name}_bucket{{"
    counts: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, _, rest = line[len(prefix) :].partition("} ")
        match = _LE_LABEL.search(labels)
        fields = rest.split()
        if match is None or not fields:
            continue
        bound = math.inf if match.group(1) == "+Inf" else float(match.group(1))
        # Several series (other labels) add up; the bench's histogram has none.
        counts[bound] = counts.get(bound, 0.0) + float(fields[0])
    return HistogramCounts(tuple(sorted(counts.items())))


async def scrape_histogram(server: ServerProcess, name: str) -> HistogramCounts | None:
    """The histogram from the server's /metrics now, or None when it cannot be read."""
    try:
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{server.port}", timeout=METRICS_TIMEOUT) as client:
            response = await client.get(METRICS_PATH)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    counts = parse_histogram(response.text, name)
    return counts if counts.buckets else None


# ---------------------------------------------------------------------------------------------
# Test data through the public API
# ---------------------------------------------------------------------------------------------

_CITIZEN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CARD_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def citizen_id(region: str) -> str:
    """A random citizen identity number with a valid GB 11643 check character."""
    first17 = f"{region}{1950 + secrets.randbelow(60)}{1 + secrets.randbelow(12):02d}"
    first17 += f"{1 + secrets.randbelow(28):02d}{secrets.randbelow(1000):03d}"
    total = sum(int(digit) * weight for digit, weight in zip(first17, _CITIZEN_ID_WEIGHTS, strict=True))
    return first17 + "10X98765432"[total % 11]


def device_public_key() -> str:
    """A real Ed25519 public key, unpadded base64url."""
    import base64

    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass
class Holder:
    """An activated card's session."""

    card_number: str
    access_token: str
    refresh_token: str
    since: float = field(default_factory=time.monotonic)


def _expect(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    if response.status_code not in statuses:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    body: dict[str, Any] = response.json() if response.content else {}
    return body


async def prepare_ecard(
    client: httpx.AsyncClient, username: str, password: str, holders: int
) -> tuple[list[str], list[Holder]]:
    """Region, a transit organisation and its gates, and activated cards; (gate API keys, holders)."""
    signed_in = _expect(
        await client.post("/v1/operator/session", json={"username": username, "password": password}), 200
    )
    auth = {"Authorization": f"Bearer {signed_in['access_token']}"}
    _expect(
        await client.post("/v1/operator/regions", json={"code": REGION, "name": REGION_NAME}, headers=auth), 201, 409
    )
    organisation = _expect(
        await client.post(
            "/v1/operator/verifier-organisations",
            json={"name": "Bench Metro", "business_type": "transit", "region": REGION},
            headers=auth,
        ),
        201,
    )
    # Like a metro line: many gates, each well within its own rate limit at the bench's load.
    api_keys = []
    for number in range(GATES):
        terminal = _expect(
            await client.post(
                f"/v1/operator/verifier-organisations/{organisation['id']}/terminals",
                json={
                    "name": f"bench-gate-{number}-{secrets.token_hex(3)}",
                    "allowed_purposes": [PURPOSE],
                    "rate_per_minute": 60_000,
                    "rate_burst": 1_000,
                },
                headers=auth,
            ),
            201,
        )
        api_keys.append(str(terminal["api_key"]))
    result: list[Holder] = []
    for _ in range(holders):
        card_number = "B" + "".join(secrets.choice(_CARD_ALPHABET) for _ in range(8))
        issued = _expect(
            await client.post(
                "/v1/operator/cards",
                json={"region": REGION, "citizen_id": citizen_id(REGION), "name": "张三", "card_number": card_number},
                headers=auth,
            ),
            201,
        )
        session = _expect(
            await client.post(
                "/v1/holder/activation",
                json={
                    "card_number": issued["card"]["card_number"],
                    "activation_code": issued["activation_code"],
                    "device_public_key": device_public_key(),
                },
            ),
            201,
        )
        result.append(Holder(issued["card"]["card_number"], session["access_token"], session["refresh_token"]))
    return api_keys, result


async def refresh_holders(client: httpx.AsyncClient, holders: list[Holder]) -> None:
    """Rotate the sessions of holders whose access token is getting old."""
    for holder in holders:
        if time.monotonic() - holder.since < TOKEN_REFRESH_AGE:
            continue
        body = _expect(await client.post("/v1/holder/token", json={"refresh_token": holder.refresh_token}), 200)
        holder.access_token, holder.refresh_token = body["access_token"], body["refresh_token"]
        holder.since = time.monotonic()


class _IssuedItem(msgspec.Struct):
    credential: str
    expires_at: datetime


class _Bundle(msgspec.Struct):
    credentials: list[_IssuedItem]


class _VerifyAnswer(msgspec.Struct):
    result: str
    reason: str | None = None


_bundle_decoder = msgspec.json.Decoder(_Bundle)
_verify_decoder = msgspec.json.Decoder(_VerifyAnswer)


@dataclass
class Issued:
    """A supply of fresh credentials, earliest expiry first."""

    bodies: list[bytes]
    valid_until: list[float]
    measurement: Measurement
    sample: str


async def issue_credentials(
    ecard: ServerProcess, holders: list[Holder], count: int, connections: int, budget: float
) -> Issued:
    """Up to `count` single credentials (POST /v1/holder/credentials, count=1) spread over the holders.

    Bundle item i becomes valid 30·i s after issue, so only item 0 is usable at once: one request
    per credential keeps every one of them valid from now until its `expires_at`. Issuing stops
    after `budget` seconds, so the first credentials still have the life the run needs.
    """
    supply = Supply(_issue_requests(ecard, holders, 1, count))
    measured = await drive_raw(ecard.port, supply, connections, budget, True, ecard.cpu_seconds)
    _check_issuance(measured, "credential issuance")
    items: list[tuple[float, str]] = []
    for _status, raw in measured.answers:
        for item in _bundle_decoder.decode(raw).credentials:
            items.append((item.expires_at.timestamp() - EXPIRY_MARGIN, item.credential))
    if not items:
        raise BenchError(f"no credential was issued within {budget:.0f} s")
    items.sort()
    return Issued(
        bodies=[msgspec.json.encode({"credential": text}) for _, text in items],
        valid_until=[until for until, _ in items],
        measurement=measured,
        sample=items[0][1],
    )


async def issue_bundles(
    ecard: ServerProcess, holders: list[Holder], size: int, requests: int, connections: int, seconds: float
) -> Measurement:
    """Up to `requests` bundles of `size` credentials for at most `seconds`: what a bundle costs the server.

    Every answer must hold `size` credentials; they are dropped (never verified), so the supplies
    of the verify runs are untouched.
    """
    supply = Supply(_issue_requests(ecard, holders, size, requests))
    measured = await drive_raw(ecard.port, supply, connections, seconds, True, ecard.cpu_seconds)
    _check_issuance(measured, f"issuing {size}-credential bundles")
    short = sum(1 for _status, raw in measured.answers if len(_bundle_decoder.decode(raw).credentials) != size)
    if short:
        raise BenchError(f"{short:,} of {measured.requests:,} bundle answers did not hold {size} credentials")
    if not measured.requests:
        raise BenchError(f"no {size}-credential bundle was issued within {seconds:g} s")
    measured.answers.clear()
    return measured


def _issue_requests(ecard: ServerProcess, holders: list[Holder], size: int, requests: int) -> list[bytes]:
    """`requests` encoded POST /v1/holder/credentials asking for `size` credentials each, the holders in turn."""
    host = f"{HOST}:{ecard.port}"
    body = msgspec.json.encode({"purpose": PURPOSE, "count": size})
    per_holder = [
        encode_post(host, "/v1/holder/credentials", [("Authorization", f"Bearer {holder.access_token}")], body)
        for holder in holders
    ]
    return [per_holder[index % len(per_holder)] for index in range(requests)]


def _check_issuance(measured: Measurement, what: str) -> None:
    """Raise BenchError when an issuing run had any error (the first error body says why)."""
    if measured.errors:
        statuses = {status: n for status, n in measured.statuses.items() if status != 200}
        first = next((body for status, body in measured.answers if status != 200), b"")
        raise BenchError(
            f"{what} failed: HTTP {statuses}, {measured.transport_errors} transport errors, "
            f"{measured.timeouts} timeouts; first error body: {first[:300]!r}"
        )


def classify_verify(measured: Measurement) -> Counter[str]:
    """accepted / rejected:<reason> / http <status> for every verify answer kept."""
    outcomes: Counter[str] = Counter()
    for status, raw in measured.answers:
        if status != 200:
            outcomes[f"http {status}"] += 1
            continue
        try:
            answer = _verify_decoder.decode(raw)
        except msgspec.DecodeError:
            outcomes["undecodable"] += 1
            continue
        outcomes["accepted" if answer.result == "accepted" else f"rejected:{answer.reason}"] += 1
    return outcomes


async def sanity_check(client: httpx.AsyncClient, api_keys: list[str], holder: Holder, passes: int) -> str:
    """A fresh credential is accepted once at one gate, then `replayed` at another, `passes` times on new connections.

    New connections may land on other workers; a 401 means one has not reloaded its terminal
    cache yet, so wait a little (bounded) and try again. Returns a credential text (used up).
    """
    verify_headers = {"X-Api-Key": api_keys[0], "Connection": "close"}
    other_gate = {"X-Api-Key": api_keys[1], "Connection": "close"}
    issue_headers = {"Authorization": f"Bearer {holder.access_token}"}
    passed, text = 0, ""
    for _ in range(passes + 40):
        issued = _expect(
            await client.post("/v1/holder/credentials", json={"purpose": PURPOSE, "count": 1}, headers=issue_headers),
            200,
        )
        text = str(issued["credentials"][0]["credential"])
        first = await client.post(VERIFY_PATH, json={"credential": text}, headers=verify_headers)
        if first.status_code == 401:
            await asyncio.sleep(0.25)
            continue
        second = await client.post(VERIFY_PATH, json={"credential": text}, headers=other_gate)
        if second.status_code == 401:
            await asyncio.sleep(0.25)
            continue
        answers = (_expect(first, 200), _expect(second, 200))
        outcome = [f"{answer.get('result')}:{answer.get('reason')}" for answer in answers]
        if outcome != ["accepted:None", "rejected:replayed"]:
            raise BenchError(f"sanity check failed: a fresh credential, verified twice, gave {outcome}")
        passed += 1
        if passed == passes:
            return text
    raise BenchError(f"sanity check: the gate stayed unknown (401) to a worker; {passed}/{passes} passes")


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured run."""

    round: int
    target: str
    measured: Measurement
    outcomes: Counter[str] = field(default_factory=Counter)
    stale: int = 0
    supplied: int = 0
    # The service's verify-handler histogram over the measured run (verify only: the others have none).
    server_histogram: HistogramCounts | None = None

    @property
    def server_quantile(self) -> float:
        """SERVER_QUANTILE of the server's histogram, seconds (inf: above its top bucket; NaN: none)."""
        return self.server_histogram.quantile(SERVER_QUANTILE) if self.server_histogram else math.nan


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
        default="noop,verify,naive",
        help="comma-separated, from: noop, verify, naive (the naive reference verify) (default: all three)",
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
    targets = tuple(name.strip() for name in args.targets.split(",") if name.strip())
    if not targets or any(name not in TARGETS for name in targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
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


def _cpu_per_request(measured: Measurement) -> float:
    """Server CPU per response, µs."""
    return measured.server_cpu / measured.requests * 1e6 if measured.requests else math.nan


def _fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _fmt_server_ms(seconds: float, top: float) -> str:
    """A histogram quantile in ms: '-' when nothing was observed, '>1000' when above the top bucket."""
    if math.isnan(seconds):
        return "-"
    if math.isinf(seconds):
        return f">{top * 1000:g}"
    return f"{seconds * 1000:.2f}"


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


class Bench:
    """The runs, in order, and the report."""

    def __init__(self, options: Options, workspace: Workspace) -> None:
        self.options = options
        self.workspace = workspace
        self.rows: list[Row] = []
        self.issuance: list[Measurement] = []
        self.bundles: Measurement | None = None
        self.flags: list[str] = []
        self.sample = ""
        self.rate_estimate = 0.0
        self.ecard_target: Target | None = None
        self._printed_columns = False

    async def run(self) -> int:
        """Set up, measure, report; the exit status (1 when something must be looked at)."""
        options, workspace = self.options, self.workspace
        self._print_header()
        await workspace.create_database()
        env = workspace.env(options.workers, options.credential_lifetime)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
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
            started = time.perf_counter()
            api_keys, holders = await prepare_ecard(client, username, password, options.holders)
            self.sample = await sanity_check(client, api_keys, holders[0], 2 * options.workers + 1)
            print(
                f"setup: region {REGION}, {GATES} transit gates, {len(holders)} activated cards in "
                f"{time.perf_counter() - started:.1f} s; sanity check: accepted once, then replayed"
            )
            print(f"credential: {len(self.sample)} characters, QR version {_qr_version(self.sample)}\n")
            headers = [{"X-Api-Key": api_key} for api_key in api_keys]
            verify = Target("verify", ecard, VERIFY_PATH, headers, options.client)
            self.ecard_target = verify  # credentials are issued by the service, whichever target uses them
            reference = Target("noop", noop, NOOP_PATH, headers, options.client)
            naive_target = Target("naive", naive, NAIVE_PATH, headers, options.client)
            # It reads the JWKS at start-up: the region's key exists now.
            await naive.wait_ready()
            noop_body = msgspec.json.encode({"credential": self.sample})

            if "verify" in options.targets:
                await self._pilot(verify, holders)
            for number in range(1, options.rounds + 1):
                await refresh_holders(client, holders)
                # Alternate the order, so a drift of the machine does not always favour one target.
                order = options.targets if number % 2 else tuple(reversed(options.targets))
                for name in order:
                    if name == "noop":
                        await self._run_noop(number, reference, noop_body)
                    elif name == "naive":
                        await self._run_verify(number, naive_target, holders, target_name="naive")
                    else:
                        await self._run_verify(number, verify, holders)
            if {"verify", "naive"} & set(options.targets):
                await refresh_holders(client, holders)
                await self._measure_bundles(ecard, holders)
        for server in workspace.servers:
            trouble = server.log_trouble()
            if trouble:
                self.flags.append(f"the {server.name} server logged errors:\n{trouble}")
        self._report()
        return 1 if self.flags else 0

    def _print_header(self) -> None:
        options = self.options
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        flags = " ".join(uvicorn_flags())
        client = (
            "raw asyncio HTTP/1.1 keep-alive (this file)" if options.client == "raw" else f"httpx {_version('httpx')}"
        )
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

    def _supply_size(self) -> int:
        seconds = self.options.warmup + self.options.duration
        return math.ceil(self.rate_estimate * seconds * 1.3) + 4 * self.options.connections

    def _expect_rate(self, measured: Measurement) -> None:
        """Raise the verify rate estimate from a run: what it reached, or what its CPU cost allows.

        On a busy machine a run may get less than its cores; the CPU per request says how fast
        the server could have gone with them, so the next supply is sized for that.
        """
        cores = self._cores_for_server()
        capacity = cores * measured.requests / measured.server_cpu if measured.server_cpu > 0 else 0.0
        self.rate_estimate = max(self.rate_estimate, measured.rate, capacity)

    def _cores_for_server(self) -> int:
        return min(self.options.workers, os.cpu_count() or 1)

    async def _issue(self, verify: Target, holders: list[Holder], count: int, run_seconds: float) -> Issued:
        """Issue up to count credentials, stopping in time for all of them to outlive a run of run_seconds."""
        budget = self.options.credential_lifetime - EXPIRY_MARGIN - SETTLE - VALIDITY_HEADROOM - run_seconds
        issued = await issue_credentials(verify.server, holders, count, self.options.connections, budget)
        self.issuance.append(issued.measurement)
        if len(issued.bodies) < count:
            print(
                f"  note: issuing stopped after {budget:.0f} s with {len(issued.bodies):,} of {count:,} credentials "
                "(issuing is slower than verifying); the run may end early: --credential-lifetime raises the budget"
            )
        await asyncio.sleep(SETTLE)
        return issued

    async def _pilot(self, verify: Target, holders: list[Holder]) -> None:
        """Warm the verify path and estimate its rate, to size each round's credential supply."""
        count = max(2000, 40 * self.options.connections)
        issued = await self._issue(verify, holders, count, PILOT_SECONDS)
        supply = verify.supply(issued.bodies, issued.valid_until)
        measured = await verify.run(supply, self.options.connections, PILOT_SECONDS, keep_answers=True)
        outcomes = classify_verify(measured)
        if set(outcomes) != {"accepted"}:
            self.flags.append(f"pilot: fresh credentials were not all accepted: {dict(outcomes)}")
        # A supply that runs out ends the run early (noted); _supply_size adds a margin.
        self._expect_rate(measured)
        print(
            f"pilot (warm-up, sizes the credential supply): {measured.requests:,} verifications at "
            f"{measured.rate:,.0f} req/s; issued {count:,} credentials at {issued.measurement.rate:,.0f} req/s"
        )

    async def _run_verify(
        self, number: int, verify: Target, holders: list[Holder], target_name: str = "verify"
    ) -> None:
        options = self.options
        assert self.ecard_target is not None
        issued = await self._issue(self.ecard_target, holders, self._supply_size(), options.warmup + options.duration)
        # Warm-up and measured run draw from one supply: no credential is sent twice.
        supply = verify.supply(issued.bodies, issued.valid_until)
        if options.warmup > 0:
            warmup = await verify.run(supply, options.connections, options.warmup, keep_answers=True)
            rejected = {key: n for key, n in classify_verify(warmup).items() if key != "accepted"}
            if rejected:
                self.flags.append(f"round {number} warm-up: fresh credentials not accepted: {rejected}")
        supplied, stale_before = supply.remaining, supply.stale
        if not supplied:
            self.flags.append(f"round {number}: the warm-up used up all {len(issued.bodies)} credentials")
            return
        # The service's own histogram, scraped right before and after the measured run (not the warm-up).
        scraped = await scrape_histogram(verify.server, VERIFY_HISTOGRAM) if target_name == "verify" else None
        measured = await verify.run(supply, options.connections, options.duration, keep_answers=True)
        row = Row(number, target_name, measured, classify_verify(measured), supply.stale - stale_before, supplied)
        if target_name == "verify":
            after = await scrape_histogram(verify.server, VERIFY_HISTOGRAM)
            if scraped is None or after is None:
                self.flags.append(f"round {number}: {VERIFY_HISTOGRAM} could not be read from {METRICS_PATH}")
            else:
                row.server_histogram = after.since(scraped)
        self.rows.append(row)
        self._expect_rate(measured)
        self._print_row(row)

    async def _measure_bundles(self, ecard: ServerProcess, holders: list[Holder]) -> None:
        """Issue BUNDLE_SIZE-credential bundles for a short while: the server CPU one bundle costs."""
        connections = self._bundle_connections()
        self.bundles = await issue_bundles(ecard, holders, BUNDLE_SIZE, BUNDLE_REQUESTS, connections, BUNDLE_SECONDS)

    def _bundle_connections(self) -> int:
        return min(self.options.connections, BUNDLE_CONNECTIONS)

    async def _run_noop(self, number: int, reference: Target, body: bytes) -> None:
        options = self.options
        supply = reference.supply([body], repeat=True)
        if options.warmup > 0:
            await reference.run(supply, options.connections, options.warmup)
        measured = await reference.run(supply, options.connections, options.duration)
        row = Row(number, "noop", measured)
        self.rows.append(row)
        self._print_row(row)

    @staticmethod
    def _columns() -> str:
        return (
            f"{'round':>5}  {'target':<7} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv p99':>7}"
            f" {'errors':>6}"
            f" {'srv µs/req':>10} {'srv CPU':>7} {'cli µs/req':>10}"
        )

    def _print_row(self, row: Row) -> None:
        if not self._printed_columns:
            self._printed_columns = True
            print(self._columns())
        m = row.measured
        client_per = m.client_cpu / m.requests * 1e6 if m.requests else math.nan
        histogram = row.server_histogram
        server_p99 = _fmt_server_ms(row.server_quantile, histogram.top) if histogram is not None else ""
        print(
            f"{row.round:>5}  {row.target:<7} {m.requests:>9,} {m.rate:>8,.0f} {_fmt_ms(m.percentile_ms(0.50)):>7}"
            f" {_fmt_ms(m.percentile_ms(0.99)):>7} {server_p99:>7} {m.errors:>6} {_cpu_per_request(m):>10.0f}"
            f" {m.server_cpu / m.elapsed:>6.0%} {client_per:>10.0f}"
        )
        cores = self._cores_for_server()
        if m.server_cpu < 0.8 * cores * m.elapsed:
            print(
                f"{'':>7}note: the server got {m.server_cpu / m.elapsed:.0%} CPU of {cores} core(s): the machine "
                "was busy or the client held it back; compare srv µs/req"
            )
        if histogram is not None and histogram.observations != m.requests:
            print(
                f"{'':>7}note: the server's histogram counted {histogram.observations:,} scans in this run, "
                f"the client {m.requests:,} answers"
            )
        if row.target in ("verify", "naive"):
            breakdown = ", ".join(f"{key} {n:,}" for key, n in sorted(row.outcomes.items()))
            extra = []
            if m.exhausted:
                extra.append(f"credential supply ({row.supplied:,}) ran out after {m.elapsed:.1f} s")
            if row.stale:
                extra.append(f"{row.stale:,} stale credentials skipped")
            print(f"{'':>7}{row.target} results: {breakdown or 'none'}" + (f" ({'; '.join(extra)})" if extra else ""))
            rejected = {key: n for key, n in row.outcomes.items() if key != "accepted"}
            if rejected:
                self.flags.append(f"round {row.round}: fresh credentials not accepted: {rejected}")
        if m.errors:
            self.flags.append(
                f"round {row.round} {row.target}: {m.errors} errors (statuses {dict(m.statuses)}, "
                f"{m.transport_errors} transport, {m.timeouts} timed out)"
            )

    @staticmethod
    def _server_summary(rows: list[Row]) -> str:
        """'; srv p99 median [min, max]' of the rows' server histograms ('' when they have none)."""
        histograms = [row.server_histogram for row in rows if row.server_histogram is not None]
        values = [value for value in (row.server_quantile for row in rows) if not math.isnan(value)]
        if not histograms or not values:
            return ""
        top = histograms[0].top
        median, low, high = (_fmt_server_ms(v, top) for v in (statistics.median(values), min(values), max(values)))
        return f"; srv p99 {median} ms [{low}, {high}]"

    def _report(self) -> None:
        options = self.options
        print()
        # Issue 6's figures, printed beside its targets at the end (None: not measured in this run).
        issue_per_worker: float | None = None
        bundle_ms: float | None = None
        noop_ratio: float | None = None
        naive_ratio: float | None = None
        if self.issuance:
            total = sum(m.requests for m in self.issuance)
            seconds = sum(m.elapsed for m in self.issuance)
            cpu = sum(m.server_cpu for m in self.issuance)
            print(
                f"issuance (POST /v1/holder/credentials, count=1, {options.connections} connections, raw client): "
                f"{total:,} credentials in {seconds:.1f} s = {total / seconds:,.0f} req/s, "
                f"server {cpu / total * 1e6:.0f} µs CPU per request"
            )
            issue_per_worker = total / seconds / options.workers
        if self.bundles is not None:
            bundles = self.bundles
            per_bundle = _cpu_per_request(bundles)
            print(
                f"issuance, {BUNDLE_SIZE}-credential bundles ({self._bundle_connections()} connections, raw client): "
                f"{bundles.requests:,} requests at {bundles.rate:,.0f} req/s, server {per_bundle:.0f} µs CPU per "
                f"bundle ({per_bundle / BUNDLE_SIZE:.0f} µs per credential), "
                f"p50 {_fmt_ms(bundles.percentile_ms(0.50))} ms, p99 {_fmt_ms(bundles.percentile_ms(0.99))} ms"
            )
            bundle_ms = per_bundle / 1000
        by_target: dict[str, list[Row]] = {}
        for row in self.rows:
            by_target.setdefault(row.target, []).append(row)
        if options.rounds > 1:
            print(f"over {options.rounds} rounds (median [min, max]):")
            for target, rows in by_target.items():
                rates = [row.measured.rate for row in rows]
                p50 = [row.measured.percentile_ms(0.5) for row in rows]
                p99 = [row.measured.percentile_ms(0.99) for row in rows]
                spread = (max(rates) - min(rates)) / statistics.median(rates) if rates else math.nan
                print(
                    f"  {target:<7} req/s {statistics.median(rates):>8,.0f} [{min(rates):,.0f}, {max(rates):,.0f}] "
                    f"spread {spread:.0%}; p50 {statistics.median(p50):.2f} ms; "
                    f"p99 {statistics.median(p99):.2f} ms [{min(p99):.2f}, {max(p99):.2f}]" + self._server_summary(rows)
                )
        if "noop" in by_target and "verify" in by_target:
            noop_rate = statistics.median(row.measured.rate for row in by_target["noop"])
            verify_rate = statistics.median(row.measured.rate for row in by_target["verify"])
            noop_ratio = verify_rate / noop_rate
            print(f"verify / no-op POST throughput: {noop_ratio:.0%}")
            noop_cpu = statistics.median(_cpu_per_request(row.measured) for row in by_target["noop"])
            verify_cpu = statistics.median(_cpu_per_request(row.measured) for row in by_target["verify"])
            print(
                f"server CPU per request: verify {verify_cpu:.0f} µs, no-op {noop_cpu:.0f} µs; at equal CPU, "
                f"verify would run at {noop_cpu / verify_cpu:.0%} of the no-op rate"
            )
        if "naive" in by_target and "verify" in by_target:
            naive_rate = statistics.median(row.measured.rate for row in by_target["naive"])
            verify_rate = statistics.median(row.measured.rate for row in by_target["verify"])
            naive_ratio = verify_rate / naive_rate
            naive_cpu = statistics.median(_cpu_per_request(row.measured) for row in by_target["naive"])
            print(
                f"verify / naive reference throughput: {naive_ratio:.2f}x "
                f"(naive: cryptography + one redis-py SET NX per request, {naive_cpu:.0f} µs CPU)"
            )
        targets = [
            (f"verify / no-op POST throughput {noop_ratio:.0%}", f">= {TARGET_VERIFY_VS_NOOP:.0%}",
             noop_ratio >= TARGET_VERIFY_VS_NOOP) if noop_ratio is not None else None,
            (f"verify / naive reference {naive_ratio:.2f}x", f">= {TARGET_VERIFY_VS_NAIVE:g}x",
             naive_ratio >= TARGET_VERIFY_VS_NAIVE) if naive_ratio is not None else None,
            (f"issuance, count=1: {issue_per_worker:,.0f} req/s per worker",
             f">= {TARGET_ISSUE_RATE_PER_WORKER:,}", issue_per_worker >= TARGET_ISSUE_RATE_PER_WORKER)
            if issue_per_worker is not None else None,
            (f"{BUNDLE_SIZE}-credential bundle: {bundle_ms:.2f} ms server CPU", f"<= {TARGET_BUNDLE_SERVER_MS:g} ms",
             bundle_ms <= TARGET_BUNDLE_SERVER_MS) if bundle_ms is not None else None,
        ]  # fmt: skip
        shown = [target for target in targets if target is not None]
        if shown:
            print("issue 6 targets (this run):")
            for figure, target, met in shown:
                print(f"  {figure} (asks {target}): {_met(met)}")
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        print(f"load average {load} (after)")
        if self.flags:
            print("\nFLAGGED:")
            for flag in self.flags:
                print(f"  - {flag}")


def _terminate(signum: int, frame: FrameType | None) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def run_interruptible(main: Coroutine[Any, Any, int]) -> int | None:
    """Run main on uvloop (when installed) to its end; None when Ctrl-C or SIGTERM stopped it.

    Once the loop runs, SIGTERM cancels main's task like Ctrl-C does, so its clean-up runs. (A
    KeyboardInterrupt raised by a signal handler inside a uvloop callback is caught and logged by
    uvloop as a transport error, and the run went on.)
    """

    async def cancellable() -> int:
        task = asyncio.current_task()
        if task is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await main

    signal.signal(signal.SIGTERM, _terminate)  # until the loop runs
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(cancellable())
    except (KeyboardInterrupt, asyncio.CancelledError):
        return None


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    if importlib.util.find_spec("uvloop") is None:
        return None
    import uvloop

    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


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
    status = run_interruptible(_main(options))
    if status is None:
        redis_gone = "the Redis Cluster" if options.redis_cluster else "Redis keys"
        print(f"\ninterrupted; servers stopped, {redis_gone} and temporary files removed", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
