"""A minimal HTTP/1.1 keep-alive load generator (and httpx beside it), and what one run records.

One request in flight per connection, responses with Content-Length only (all Litestar answers
here have one). Its CPU per request is mostly the two socket syscalls, a small fraction of
httpx's (see loadtests/README.md), so on a 2-core machine the server, not the client, is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import httpx

from loadtests.bench import HOST

if TYPE_CHECKING:
    from loadtests.bench.processes import ServerProcess

# A connection's requests are bounded like every loop that repeats.
MAX_REQUESTS_PER_CONNECTION = 50_000_000
# How long after a run's deadline in-flight requests may take before they count as timed out.
RUN_GRACE = 15.0
# A run without a duration (issuing a supply) ends after this at most.
ISSUE_TIMEOUT = 120.0


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
