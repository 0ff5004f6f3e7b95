"""The verification event stream: appended to by the verify path, drained into the database.

Delivery is at least once: an entry stays pending in the consumer group until the drain has
committed it and acknowledged it; entries of a drain that died are claimed by another after
they have been idle for a while. Acknowledged entries are deleted, so the stream holds only
the backlog.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

EVENT_STREAM_KEY = "verification-events"
GROUP = "drain"


class StreamUnavailable(Exception):
    """The stream cannot be reached."""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One event as delivered: its stream id, the encoded event and the decision's result."""

    entry_id: str
    event: bytes
    result: str


@dataclass(frozen=True, slots=True)
class Backlog:
    """Entries in the stream (not yet drained) and, of those, delivered but not acknowledged."""

    length: int
    pending: int


class EventStream(Protocol):
    """What the drain needs from the stream."""

    async def read(self, consumer: str, count: int, block_ms: int) -> list[StreamEntry]:
        """Up to count new entries for consumer, waiting up to block_ms for the first."""
        ...

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """Take over up to count entries delivered to any consumer and unacknowledged for min_idle_ms."""
        ...

    async def ack(self, entry_ids: list[str]) -> None:
        """Acknowledge entries (after their commit) and remove them from the stream."""
        ...

    async def backlog(self) -> Backlog:
        """How much is waiting."""
        ...


def _entry(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEntry:
    identifier = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return StreamEntry(identifier, fields[b"e"], fields[b"r"].decode())


class RedisEventStream:
    """A Redis stream with one consumer group for all drains."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self.key = prefix + EVENT_STREAM_KEY
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._client.xgroup_create(self.key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _call(self, operation: Any) -> Any:
        """Run operation (a coroutine factory) with the group in place; recreate it if it vanished."""
        try:
            await self._ensure_group()
            try:
                return await operation()
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self._group_ready = False
                await self._ensure_group()
                return await operation()
        except (RedisError, OSError) as exc:
            raise StreamUnavailable(str(exc)) from exc

    async def read(self, consumer: str, count: int, block_ms: int) -> list[StreamEntry]:
        """See `EventStream.read`."""
        reply = await self._call(
            lambda: self._client.xreadgroup(GROUP, consumer, {self.key: ">"}, count=count, block=block_ms or None)
        )
        return [_entry(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries]

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """See `EventStream.claim_stale`; entries deleted meanwhile are acknowledged and skipped."""
        reply = await self._call(
            lambda: self._client.xautoclaim(self.key, GROUP, consumer, min_idle_ms, start_id="0-0", count=count)
        )
        claimed = [_entry(entry_id, fields) for entry_id, fields in reply[1] if fields]
        gone = [entry_id for entry_id, fields in reply[1] if not fields] + list(reply[2] if len(reply) > 2 else [])
        if gone:
            await self._call(lambda: self._client.xack(self.key, GROUP, *gone))
        return claimed

    async def ack(self, entry_ids: list[str]) -> None:
        """See `EventStream.ack`."""
        if not entry_ids:
            return

        async def acknowledge() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xack(self.key, GROUP, *entry_ids)
                pipe.xdel(self.key, *entry_ids)
                await pipe.execute()

        await self._call(acknowledge)

    async def backlog(self) -> Backlog:
        """See `EventStream.backlog`."""
        length = await self._call(lambda: self._client.xlen(self.key))
        summary = await self._call(lambda: self._client.xpending(self.key, GROUP))
        return Backlog(int(length), int(summary["pending"]))


class MemoryEventStream:
    """The stream in process memory, for the embedded default: lost if the process dies."""

    def __init__(self) -> None:
        self._sequence = 0
        self._new: collections.deque[StreamEntry] = collections.deque()
        # entry id → (entry, consumer, delivered at, monotonic ms)
        self._pending: dict[str, tuple[StreamEntry, str, float]] = {}
        self._arrived = asyncio.Event()

    def append(self, event: bytes, result: str) -> None:
        """Add an entry (called by the in-process store, inside its atomic step)."""
        self._sequence += 1
        self._new.append(StreamEntry(f"{self._sequence}-0", event, result))
        self._arrived.set()

    async def read(self, consumer: str, count: int, block_ms: int) -> list[StreamEntry]:
        """See `EventStream.read`."""
        if not self._new and block_ms:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), block_ms / 1000)
            except TimeoutError:
                return []
        taken = [self._new.popleft() for _ in range(min(count, len(self._new)))]
        now = time.monotonic() * 1000
        for entry in taken:
            self._pending[entry.entry_id] = (entry, consumer, now)
        return taken

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """See `EventStream.claim_stale`."""
        now = time.monotonic() * 1000
        stale = [entry for entry, _, at in self._pending.values() if now - at >= min_idle_ms][:count]
        for entry in stale:
            self._pending[entry.entry_id] = (entry, consumer, now)
        return stale

    async def ack(self, entry_ids: list[str]) -> None:
        """See `EventStream.ack`."""
        for entry_id in entry_ids:
            self._pending.pop(entry_id, None)

    async def backlog(self) -> Backlog:
        """See `EventStream.backlog`."""
        return Backlog(len(self._new) + len(self._pending), len(self._pending))
