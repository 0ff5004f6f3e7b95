"""A three-master Redis Cluster on loopback, from the installed redis-server (Debian's package).

    python -m loadtests.redis_cluster [--masters 3]

prints the URL of its first node and runs until Ctrl-C (or SIGTERM), then stops every node and
removes their directory. Point the service at it with

    REDIS_URL=redis://127.0.0.1:<port> ECARD_REDIS_CLUSTER=1 make serve

The integration tests (tests/integration/test_redis_cluster.py, and the status-mirror contract
tests) start one the same way. Nodes keep nothing on disk but their cluster configuration, in a
temporary directory; slots are split evenly among the masters; there are no replicas.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis

SLOTS = 16384
READY_TIMEOUT = 20.0


class ClusterError(RuntimeError):
    """The cluster could not be started; the message says why."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(
    condition: object, what: str, processes: list[subprocess.Popen[bytes]], timeout: float = READY_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            raise ClusterError(f"{what}: a redis-server exited (interrupted, or its port was taken)")
        try:
            if condition():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise ClusterError(f"{what} after {timeout:g} s")


def _cluster_ok(node: redis.Redis) -> bool:
    info = node.execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
    if isinstance(info, dict):  # redis-py parses it into a dict on some versions
        return str(info.get("cluster_state")) == "ok"
    return "cluster_state:ok" in (info.decode() if isinstance(info, bytes) else str(info))


@dataclass
class RedisCluster:
    """Masters on free loopback ports (data port and cluster-bus port each), slots split evenly."""

    masters: int = 3
    ports: list[int] = field(default_factory=list)
    directory: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A redis:// URL of one node: the cluster client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self) -> RedisCluster:
        """Start the nodes, assign the slots, join them, and wait until every node says the cluster is ok."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ClusterError("'redis-server' is not installed (Debian: apt-get install redis-server)")
        self.directory = Path(tempfile.mkdtemp(prefix="ecard-redis-cluster-"))
        try:
            bus_ports = []
            for index in range(self.masters):
                port, bus_port = free_port(), free_port()
                self.ports.append(port)
                bus_ports.append(bus_port)
                command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
                command += ["--cluster-enabled", "yes", "--cluster-port", str(bus_port)]
                command += ["--cluster-config-file", f"nodes-{index}.conf", "--dir", str(self.directory)]
                self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            nodes = [redis.Redis(port=port, socket_timeout=2.0) for port in self.ports]
            for node, port in zip(nodes, self.ports, strict=True):
                _wait(node.ping, f"redis-server on port {port} did not answer", self.processes)
            span = SLOTS // self.masters
            for index, node in enumerate(nodes):
                last = SLOTS - 1 if index == self.masters - 1 else (index + 1) * span - 1
                node.execute_command("CLUSTER ADDSLOTSRANGE", index * span, last)  # type: ignore[no-untyped-call]
            for port, bus_port in zip(self.ports[1:], bus_ports[1:], strict=True):
                nodes[0].execute_command("CLUSTER MEET", "127.0.0.1", port, bus_port)  # type: ignore[no-untyped-call]
            for node, port in zip(nodes, self.ports, strict=True):
                _wait(
                    lambda node=node: _cluster_ok(node),
                    f"the node on port {port} never saw the cluster ok",
                    self.processes,
                )
            for node in nodes:
                node.close()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node and remove their directory."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def main(argv: list[str] | None = None) -> int:
    """Start a cluster, print its URL, and keep it until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.redis_cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--masters", type=int, default=3, help="number of masters (default 3)")
    args = parser.parse_args(argv)
    if args.masters < 1:
        parser.error("--masters must be at least 1")
    cluster = RedisCluster(masters=args.masters).start()
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(cluster.url, flush=True)
    print(f"cluster of {args.masters} masters on ports {', '.join(map(str, cluster.ports))}", file=sys.stderr)
    try:
        while not stopping:
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
