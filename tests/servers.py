"""Throwaway Redis and PostgreSQL servers for tests, started from the installed binaries.

Used when REDIS_URL / DATABASE_URL name no server. A missing binary is an error that says what
to install, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


class MissingServerBinary(RuntimeError):
    """A server binary the tests need is not installed."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _find(binary: str, package: str, extra_dirs: list[Path] | None = None) -> str:
    for directory in extra_dirs or []:
        candidate = directory / binary
        if candidate.exists():
            return str(candidate)
    found = shutil.which(binary)
    if found is None:
        raise MissingServerBinary(
            f"'{binary}' is not installed: install it (Debian: apt-get install {package}) "
            f"or point the tests at a running server with the environment variable"
        )
    return found


@dataclass
class RedisServer:
    """A redis-server on a free loopback port, keeping nothing on disk."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # More redis-server options, e.g. ["--requirepass", "secret"].
    options: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Its redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it and wait until it accepts connections."""
        binary = _find("redis-server", "redis-server")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, 10)
        return self

    def stop(self) -> None:
        """Stop it (and wait)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@dataclass
class PostgresServer:
    """A PostgreSQL cluster in a temporary directory on a free loopback port."""

    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ecard-pg-")))
    _user: str | None = None

    @property
    def url(self) -> str:
        """Its SQLAlchemy asyncpg URL, database 'postgres'."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *args: str) -> list[str]:
        # initdb and postgres refuse to run as root: run them as the 'postgres' system user.
        if os.geteuid() == 0:
            self._user = "postgres"
            shutil.chown(self.directory, "postgres")
            return ["runuser", "-u", "postgres", "--", *args]
        return list(args)

    def start(self) -> PostgresServer:
        """initdb, start, and wait until it accepts connections."""
        initdb = _find("initdb", "postgresql", POSTGRES_BIN_DIRS)
        pg_ctl = _find("pg_ctl", "postgresql", POSTGRES_BIN_DIRS)
        data = self.directory / "data"
        subprocess.run(
            self._command(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        options = f"-p {self.port} -h 127.0.0.1 -k {self.directory} -F"
        subprocess.run(
            self._command(pg_ctl, "-D", str(data), "-o", options, "-l", str(self.directory / "log"), "-w", "start"),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, 30)
        return self

    def stop(self) -> None:
        """Stop the cluster and delete its files."""
        pg_ctl = _find("pg_ctl", "postgresql", POSTGRES_BIN_DIRS)
        subprocess.run(
            self._command(pg_ctl, "-D", str(self.directory / "data"), "-m", "immediate", "stop"),
            check=False,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(self.directory, ignore_errors=True)
