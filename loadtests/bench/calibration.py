"""The calibration line every bench command prints first, so figures from two machines can be compared.

    python -m loadtests.bench.calibration

Two costs that the service's own figures are made of, measured in this process in about a second:
a no-op Litestar POST (loadtests/noop_app.py) called as an ASGI app, without a server or a socket,
and one libsodium Ed25519 verify of a credential-sized message. Each is the CPU time (of this
thread, like the bench's server CPU per request) of the fastest of a few batches: CPU time leaves
out the waits for a core on a shared machine, and the fastest batch is the one least disturbed by
other work (caches), which is what a core costs. Divide a figure by the matching calibration
figure (verify µs per scan / no-op µs) to compare runs on different machines; the load average
says how shared the machine was.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec
import nacl.bindings
import nacl.signing

from loadtests.bench import REPO_ROOT, BenchError

BATCHES = 5
CALIBRATION_TIMEOUT = 60.0
POSTS_PER_BATCH = 400
VERIFIES_PER_BATCH = 1_000
# About the size of a credential's signed COSE structure (DESIGN.md: 142 bytes in all).
MESSAGE = bytes(range(120))
NOOP_BODY = msgspec.json.encode({"credential": "EC1:" + "A" * 213})

Message = MutableMapping[str, Any]
# Litestar's own ASGI types are unions of TypedDicts; plain mappings are enough to drive it here.
Asgi = Callable[..., Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Calibration:
    """What this machine costs, right now."""

    noop_post_us: float
    ed25519_verify_us: float
    load_average: float
    cores: int

    @property
    def line(self) -> str:
        """The one line the bench commands print first."""
        return (
            f"calibration: no-op POST {self.noop_post_us:.0f} µs/req (in-process ASGI, 1 worker), "
            f"Ed25519 verify {self.ed25519_verify_us:.0f} µs (libsodium), "
            f"loadavg {self.load_average:.1f} / {self.cores} cores"
        )


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def ed25519_verify_us() -> float:
    """µs for one libsodium Ed25519 verify (crypto_sign_open, as crypto/keys.py calls it)."""
    key = nacl.signing.SigningKey.generate()
    signed = bytes(key.sign(MESSAGE))
    public = bytes(key.verify_key)
    best = float("inf")
    for _ in range(BATCHES):
        start = time.thread_time()
        for _ in range(VERIFIES_PER_BATCH):
            nacl.bindings.crypto_sign_open(signed, public)
        best = min(best, time.thread_time() - start)
    return best / VERIFIES_PER_BATCH * 1e6


async def _lifespan_startup(app: Asgi) -> None:
    """Run the app's start-up (Litestar builds its routes' handlers there); shutdown is not needed."""
    events: asyncio.Queue[Message] = asyncio.Queue()
    await events.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def receive() -> Message:
        return await events.get()

    async def send(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()
        elif message["type"] == "lifespan.startup.failed":
            raise BenchError(f"the no-op app did not start: {message.get('message')}")

    task: asyncio.Task[None] = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    )
    await asyncio.wait_for(started.wait(), 10.0)
    task.cancel()


async def _noop_post_us() -> float:
    from loadtests.noop_app import create_app

    app: Asgi = create_app()
    await _lifespan_startup(app)
    scope: Message = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/noop",
        "raw_path": b"/noop",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(NOOP_BODY)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    request: Message = {"type": "http.request", "body": NOOP_BODY, "more_body": False}
    statuses: list[int] = []

    async def receive() -> Message:
        return request

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    best = float("inf")
    for batch in range(BATCHES + 1):
        start = time.thread_time()
        for _ in range(POSTS_PER_BATCH):
            await app(dict(scope), receive, send)
        if batch == 0:  # warms the app's caches; not counted
            continue
        best = min(best, time.thread_time() - start)
    if set(statuses) != {200}:
        raise BenchError(f"the no-op POST answered {sorted(set(statuses))}, not 200: calibration is meaningless")
    return best / POSTS_PER_BATCH * 1e6


def _in_own_loop(work: Callable[[], Awaitable[float]]) -> float:
    """Run `work` on an event loop of its own in a thread, so callers inside a running loop can ask too."""
    result: list[float] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(work()))  # type: ignore[arg-type]
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    thread = threading.Thread(target=target, name="calibration")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def calibrate() -> Calibration:
    """Measure both costs now (about a second), with the load average and the cores."""
    return Calibration(
        noop_post_us=_in_own_loop(_noop_post_us),
        ed25519_verify_us=ed25519_verify_us(),
        load_average=os.getloadavg()[0],
        cores=usable_cores(),
    )


def calibration_line() -> str:
    """The calibration line (see `Calibration.line`), measured in a process of its own.

    Its own process, because building a Litestar app configures the logging of the process that
    builds it (the bench's httpx calls would then be logged), and so that the caller's imports, heap
    and threads do not weigh on the figures.
    """
    command = [sys.executable, "-m", "loadtests.bench.calibration"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CALIBRATION_TIMEOUT, check=False
    )
    line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not line.startswith("calibration: "):
        return f"calibration: (failed: {result.stderr.strip().splitlines()[-1:] or result.returncode})"
    return line


if __name__ == "__main__":
    print(calibrate().line)
