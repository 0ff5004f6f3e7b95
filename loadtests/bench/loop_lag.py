"""An event-loop lag probe for the served service: where a scan's tail comes from, seen from its worker.

    uvicorn --factory loadtests.bench.loop_lag:create_app …      (headless.py --loop-lag does this)

The service's own app (app.asgi:create_app), plus a start-up hook that samples the worker's event
loop every PROBE_INTERVAL: a sleep that wakes late by L means every callback ready then (a scan's
decision, its Redis reply, its answer) waited up to L behind whatever held the loop. It also times
the collector's passes (gc.callbacks). Each worker writes what it saw to a JSON file of its own in
$ECARD_LOOP_LAG_DIR, every FLUSH_INTERVAL and at shutdown. Nothing is added to a request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from litestar import Litestar

LAG_DIR_ENV = "ECARD_LOOP_LAG_DIR"
PROBE_INTERVAL = 0.010
FLUSH_INTERVAL = 2.0
# Lags and collector passes longer than these are kept one by one (with their time); the rest only counted.
STALL_SECONDS = 0.005
GC_PASS_SECONDS = 0.001
# Lag histogram bounds, milliseconds.
BOUNDS_MS = (0.5, 1, 2, 3, 5, 10, 25, 50, 100, 250, math.inf)


@dataclass
class LagRecord:
    """What one worker's probe saw."""

    pid: int
    started: float = field(default_factory=time.time)
    samples: int = 0
    counts: list[int] = field(default_factory=lambda: [0] * len(BOUNDS_MS))
    # (epoch seconds, lag ms) of every sample over STALL_SECONDS.
    stalls: list[tuple[float, float]] = field(default_factory=list)
    # (epoch seconds, generation, wall ms, CPU ms) of every collector pass over GC_PASS_SECONDS of wall time:
    # a pass whose wall time is far above its CPU time was descheduled (the machine was busy), not long.
    gc_passes: list[tuple[float, int, float, float]] = field(default_factory=list)
    # Objects the collector's full passes walk (the oldest generation, without the frozen ones), at start
    # and at shutdown: what the worker kept since it started.
    old_objects: list[int] = field(default_factory=list)

    def add(self, lag: float) -> None:
        """Count one sample's lag (seconds)."""
        self.samples += 1
        lag_ms = lag * 1000
        for index, bound in enumerate(BOUNDS_MS):
            if lag_ms <= bound:
                self.counts[index] += 1
                break
        if lag >= STALL_SECONDS:
            self.stalls.append((time.time(), round(lag_ms, 2)))

    def to_json(self) -> dict[str, Any]:
        """The record as written to its file."""
        return {
            "pid": self.pid,
            "started": self.started,
            "samples": self.samples,
            "bounds_ms": [bound if bound != math.inf else None for bound in BOUNDS_MS],
            "counts": self.counts,
            "stalls": self.stalls,
            "gc_passes": self.gc_passes,
            "old_objects": self.old_objects,
        }


class LoopLagProbe:
    """Samples the running loop's lag and the collector's passes until stopped; writes them to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record = LagRecord(os.getpid())
        self._task: asyncio.Task[None] | None = None
        self._gc_started = (0.0, 0.0)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = (time.perf_counter(), time.thread_time())
            return
        took = time.perf_counter() - self._gc_started[0]
        if took >= GC_PASS_SECONDS:
            cpu = time.thread_time() - self._gc_started[1]
            generation = int(info.get("generation", -1))
            self.record.gc_passes.append((time.time(), generation, round(took * 1000, 2), round(cpu * 1000, 2)))

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + FLUSH_INTERVAL
        while True:
            before = loop.time()
            await asyncio.sleep(PROBE_INTERVAL)
            now = loop.time()
            self.record.add(max(0.0, now - before - PROBE_INTERVAL))
            if now >= next_flush:
                next_flush = now + FLUSH_INTERVAL
                self.write()

    def write(self) -> None:
        """Replace the file with the record so far (atomically: a reader never sees half of it)."""
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.record.to_json()))
        partial.replace(self.path)

    async def start(self) -> None:
        """Begin sampling (a start-up hook)."""
        self.record.old_objects.append(len(gc.get_objects(generation=2)))
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._sample(), name="loop-lag-probe")

    async def stop(self) -> None:
        """Stop sampling and write the record (a shutdown hook)."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.record.old_objects.append(len(gc.get_objects(generation=2)))
        self.write()


def create_app() -> Litestar:
    """The service's app with a lag probe per worker (uvicorn --factory)."""
    from app.asgi import create_app as create_service

    app = create_service()
    directory = Path(os.environ[LAG_DIR_ENV])
    probe = LoopLagProbe(directory / f"loop-lag-{os.getpid()}.json")
    app.on_startup.append(probe.start)
    app.on_shutdown.append(probe.stop)
    return app


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every worker's record written to directory."""
    records = []
    for path in sorted(directory.glob("loop-lag-*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def _quantile_ms(bounds: list[float | None], counts: list[int], q: float) -> str:
    """The bucket bound holding the q-quantile ('≤ 2 ms'), from the histogram."""
    total = sum(counts)
    if not total:
        return "-"
    running = 0
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        if running >= q * total:
            return f"≤ {bound:g} ms" if bound is not None else f"> {bounds[-2]:g} ms"
    return "-"


def summarise(records: list[dict[str, Any]], since: float = 0.0) -> list[str]:
    """Lines for the report: lag quantiles, stalls (how many, how long, at which phase of the second), GC.

    `since` (epoch seconds) leaves out the stalls and passes before it (start-up, preparation, prefill);
    the histogram counts the whole life of each worker.
    """
    lines = []
    for record in records:
        bounds, counts = record["bounds_ms"], record["counts"]
        stalls = [(at, ms) for at, ms in record["stalls"] if at >= since]
        passes = [(gen, ms, cpu) for at, gen, ms, cpu in record["gc_passes"] if at >= since]
        lines.append(
            f"worker {record['pid']}: {record['samples']:,} samples every {PROBE_INTERVAL * 1000:g} ms; lag p99 "
            f"{_quantile_ms(bounds, counts, 0.99)}, p99.9 {_quantile_ms(bounds, counts, 0.999)}"
        )
        if stalls:
            longest = sorted((ms for _, ms in stalls), reverse=True)
            # A periodic task shows as stalls at one phase of the second (its timer's).
            phases = [0] * 10
            for at, _ms in stalls:
                phases[int((at % 1.0) * 10)] += 1
            lines.append(
                f"  during the run: {len(stalls)} stalls ≥ {STALL_SECONDS * 1000:g} ms, longest "
                f"{', '.join(f'{ms:g}' for ms in longest[:5])} ms; by tenth of the second {phases}"
            )
        else:
            lines.append(f"  during the run: no stall ≥ {STALL_SECONDS * 1000:g} ms")
        by_generation: dict[int, list[tuple[float, float]]] = {}
        for generation, ms, cpu in passes:
            by_generation.setdefault(generation, []).append((ms, cpu))
        shown = "; ".join(
            f"gen {generation}: {len(values)}, longest {max(ms for ms, _ in values):g} ms "
            f"(its CPU {max(values)[1]:g} ms), most CPU {max(cpu for _, cpu in values):g} ms"
            for generation, values in sorted(by_generation.items())
        )
        lines.append(f"  collector passes ≥ {GC_PASS_SECONDS * 1000:g} ms: {shown or 'none'}")
        if len(record.get("old_objects", [])) == 2:
            start, end = record["old_objects"]
            lines.append(f"  objects a full pass walks (not frozen): {start:,} at start, {end:,} at shutdown")
    return lines
