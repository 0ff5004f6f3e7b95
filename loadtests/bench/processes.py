"""The processes of a run: uvicorn servers on free loopback ports, the run's workspace, the CLI.

A `Workspace` is one run's temporary directory, Redis key prefix (or throwaway Redis Cluster)
and database, and removes all of them at the end, also after Ctrl-C or SIGTERM
(`run_interruptible`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, cast

import httpx
import psutil  # type: ignore[import-untyped]  # comes with locust
import redis

from loadtests.bench import HOST, REPO_ROOT, BenchError
from loadtests.redis_cluster import RedisCluster, free_port

ECARD_FACTORY = "app.asgi:create_app"
# A server is ready when GET /health answers 200; asked this often at most.
READY_ATTEMPTS = 300
READY_INTERVAL = 0.1


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
