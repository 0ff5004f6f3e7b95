"""Who used the machine's cores during a run: the service, the load generator, Redis, everything else.

On a 2-core machine shared with other work, a latency tail can come from the service's own loop or
from the service waiting for a core; this says which, in shares of one core (200 % = two full cores).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil  # type: ignore[import-untyped]  # comes with locust

SAMPLE_INTERVAL = 1.0
# Above this share of all cores busy, runnable processes queue for a core (the run queue, in the load average).
BUSY_MACHINE = 0.8


def _tree_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process and its children (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _named_cpu(name: str) -> float:
    """CPU seconds of every process called `name` (all redis-servers on the machine, ours or not)."""
    total = 0.0
    for process in psutil.process_iter(["name"]):
        if process.info.get("name") != name:
            continue
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _machine_busy() -> float:
    """CPU seconds all cores spent not idle, since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@dataclass
class CpuShares:
    """Samples, every SAMPLE_INTERVAL in a thread, the CPU of the service's and the load generator's trees.

    `service_pid` and `load_pid` are read at each sample (the load generator starts later).
    """

    service_pid: Callable[[], int | None]
    load_pid: Callable[[], int | None]
    # (seconds, service, load generator, redis-server, the rest) per interval, in cores.
    samples: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _read(self) -> tuple[float, float, float, float, float]:
        return (
            time.monotonic(),
            _tree_cpu(self.service_pid()),
            _tree_cpu(self.load_pid()),
            _named_cpu("redis-server"),
            _machine_busy(),
        )

    def _run(self) -> None:
        last = self._read()
        while not self._stop.wait(SAMPLE_INTERVAL):
            now = self._read()
            seconds = now[0] - last[0]
            # A process that started or ended between samples would show as a jump: never below zero.
            service, load, redis = (max(0.0, (now[i] - last[i]) / seconds) for i in (1, 2, 3))
            busy = max(0.0, (now[4] - last[4]) / seconds)
            self.samples.append((seconds, service, load, redis, max(0.0, busy - service - load - redis)))
            last = now

    def start(self) -> None:
        """Begin sampling."""
        self._thread = threading.Thread(target=self._run, name="cpu-shares", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def summary(self, last: int) -> str:
        """One line: mean shares over the `last` samples (the run, without what came before), and its busiest second."""
        samples = self.samples[-last:] if last > 0 else []
        if not samples:
            return "CPU shares: no sample"
        count = len(samples)
        mean = [sum(sample[i] for sample in samples) / count for i in (1, 2, 3, 4)]
        worst_other = max(sample[4] for sample in samples)
        cores = psutil.cpu_count() or 1
        line = (
            f"CPU over {count} s (one core = 100 %, {cores} cores): service {mean[0]:.0%}, load generator "
            f"{mean[1]:.0%}, redis-server (all) {mean[2]:.0%}, everything else {mean[3]:.0%} "
            f"(busiest second {worst_other:.0%})"
        )
        if sum(mean) > BUSY_MACHINE * cores:
            line += (
                f"\n  note: the cores were {sum(mean) / cores:.0%} busy, {mean[3]:.0%} of a core with other work: "
                "the service waited for a core, and that wait is in the latencies above; measure again on a "
                "quieter machine before reading them as the service's"
            )
        return line
