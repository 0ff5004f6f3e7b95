"""The verification event stream: appended to by the verify path, drained into the database.

Delivery is at least once: an entry stays pending in the consumer group until the drain has
committed it and acknowledged it; entries of a drain that died are claimed by another after
they have been idle for a while. Acknowledged entries are deleted, so the stream holds only
the backlog.

In Redis the stream is sharded: `EVENT_SHARDS` streams, each under a hash tag of its own, and a
card's keys carry the tag of its shard, so the scan script appends the event in the same Redis
Cluster slot as the nonce and the status it decided on (one atomic call). The tags are chosen
to fall in evenly spaced slot ranges, so a cluster's masters share the shards evenly. The shard
count is part of the key layout: changing it means draining the streams and mirroring the
statuses again (`ecard status reconcile --repair`).
"""

from __future__ import annotations

import asyncio
import collections
import time
import zlib
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import RedisError, ResponseError

EVENT_STREAM_KEY = "verification-events"
GROUP = "drain"
EVENT_SHARDS = 16
# With the streams in a cluster the drain polls them (a blocking read cannot span slots).
CLUSTER_POLL_MS = 100


def _shard_tags() -> tuple[str, ...]:
    """One short hash tag per shard, shard i's in the i-th of EVENT_SHARDS equal slot ranges."""
    span = REDIS_CLUSTER_HASH_SLOTS // EVENT_SHARDS
    tags = []
    for shard in range(EVENT_SHARDS):
        candidate = 0
        while key_slot(str(candidate).encode()) // span != shard:
            candidate += 1
        tags.append(str(candidate))
    return tuple(tags)


SHARD_TAGS = _shard_tags()


def shard_of(data: bytes) -> int:
    """The shard of a card (by its reference) or of a scan without one (by its verification id)."""
    return zlib.crc32(data) % EVENT_SHARDS


def shard_prefix(prefix: str, shard: int) -> str:
    """The start of every key of a shard: the deployment's prefix and the shard's hash tag."""
    return f"{prefix}{{{SHARD_TAGS[shard]}}}"


def stream_keys(prefix: str) -> tuple[str, ...]:
    """The shards' event streams, in shard order."""
    return tuple(shard_prefix(prefix, shard) + EVENT_STREAM_KEY for shard in range(EVENT_SHARDS))


class StreamUnavailable(Exception):
    """The stream cannot be reached."""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One event as delivered: its stream id, the encoded event, the decision's result and its stream.

    A marker entry (`marker` "u" or "d") carries no event: it says that the answer of verification
    `marked_id` did not reach its terminal ("u", the terminal was told "outcome unknown"), or did after
    all ("d", its retry got it). It always follows its event in the same stream.
    """

    entry_id: str
    event: bytes
    result: str
    stream: str = ""
    marker: str = ""
    marked_id: str = ""


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

    async def read_pending(self, consumer: str, count: int) -> list[StreamEntry]:
        """Up to count entries delivered to consumer before and not acknowledged: what a read whose reply
        was lost (a timeout after the command was sent) delivered, or what a failed batch left."""
        ...

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """Take over up to count entries delivered to any consumer and unacknowledged for min_idle_ms."""
        ...

    async def ack(self, entries: list[StreamEntry]) -> None:
        """Acknowledge entries (after their commit) and remove them from the stream."""
        ...

    async def backlog(self) -> Backlog:
        """How much is waiting."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _entry(stream: bytes | str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> StreamEntry:
    key = stream.decode() if isinstance(stream, bytes) else stream
    identifier = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if b"m" in fields:
        return StreamEntry(identifier, b"", "", key, marker=fields[b"m"].decode(), marked_id=fields[b"i"].decode())
    return StreamEntry(identifier, fields[b"e"], fields[b"r"].decode(), key)


class RedisEventStream:
    """The shards' Redis streams with one consumer group (on each) for all drains.

    On one Redis node a drain reads every shard with one blocking XREADGROUP; on a cluster it
    reads them one by one and polls (`CLUSTER_POLL_MS`), since a command cannot span slots.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster, prefix: str, cluster: bool = False) -> None:
        self._client = client
        self.keys = stream_keys(prefix)
        self._cluster = cluster
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        for key in self.keys:
            try:
                await self._client.xgroup_create(key, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    async def _call(self, operation: Any) -> Any:
        """Run operation (a coroutine factory) with the groups in place; recreate them if one vanished."""
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
        """See `EventStream.read`; up to about count entries, a share from each shard."""
        count = -(-count // EVENT_SHARDS)
        if not self._cluster:
            reply = await self._call(
                lambda: self._client.xreadgroup(
                    GROUP, consumer, dict.fromkeys(self.keys, ">"), count=count, block=block_ms or None
                )
            )
            return [_entry(key, entry_id, fields) for key, entries in reply or [] for entry_id, fields in entries]
        entries: list[StreamEntry] = await self._call(lambda: self._read_shards(consumer, count))
        if not entries and block_ms:
            await asyncio.sleep(min(block_ms, CLUSTER_POLL_MS) / 1000)
            entries = await self._call(lambda: self._read_shards(consumer, count))
        return entries

    async def _read_shards(self, consumer: str, count: int) -> list[StreamEntry]:
        entries: list[StreamEntry] = []
        for key in self.keys:
            reply: Any = await self._client.xreadgroup(GROUP, consumer, {key: ">"}, count=count)
            entries.extend(_entry(key, entry_id, fields) for _, items in reply or [] for entry_id, fields in items)
        return entries

    async def read_pending(self, consumer: str, count: int) -> list[StreamEntry]:
        """See `EventStream.read_pending` (XREADGROUP from id 0, shard by shard); entries deleted meanwhile
        are acknowledged and skipped, as in `claim_stale`."""
        found: list[StreamEntry] = []
        for key in self.keys:
            if len(found) >= count:
                break
            reply: Any = await self._call(
                lambda key=key: self._client.xreadgroup(GROUP, consumer, {key: "0"}, count=count - len(found))
            )
            items = [item for _, entries in reply or [] for item in entries]
            found.extend(_entry(key, entry_id, fields) for entry_id, fields in items if fields)
            gone = [entry_id for entry_id, fields in items if not fields]
            if gone:
                await self._call(lambda key=key, gone=gone: self._client.xack(key, GROUP, *gone))
        return found

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """See `EventStream.claim_stale`; entries deleted meanwhile are acknowledged and skipped."""
        claimed: list[StreamEntry] = []
        for key in self.keys:
            if len(claimed) >= count:
                break
            reply = await self._call(
                lambda key=key: self._client.xautoclaim(
                    key, GROUP, consumer, min_idle_ms, start_id="0-0", count=count - len(claimed)
                )
            )
            claimed.extend(_entry(key, entry_id, fields) for entry_id, fields in reply[1] if fields)
            gone = [entry_id for entry_id, fields in reply[1] if not fields] + list(reply[2] if len(reply) > 2 else [])
            if gone:
                await self._call(lambda key=key, gone=gone: self._client.xack(key, GROUP, *gone))
        return claimed

    async def ack(self, entries: list[StreamEntry]) -> None:
        """See `EventStream.ack`.

        Deleted first, then acknowledged: a drain dying in between leaves a pending entry that
        is gone, which the next claim acknowledges and skips (no MULTI, which a cluster would
        need per slot).
        """
        by_stream: dict[str, list[str]] = collections.defaultdict(list)
        for entry in entries:
            by_stream[entry.stream].append(entry.entry_id)
        if not by_stream:
            return

        async def acknowledge() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, entry_ids in by_stream.items():
                    pipe.xdel(key, *entry_ids)
                    pipe.xack(key, GROUP, *entry_ids)
                await pipe.execute()

        await self._call(acknowledge)

    async def backlog(self) -> Backlog:
        """See `EventStream.backlog`; summed over the shards."""

        async def measure() -> Backlog:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in self.keys:
                    pipe.xlen(key)
                    pipe.xpending(key, GROUP)
                replies = await pipe.execute()
            lengths, pending = replies[0::2], replies[1::2]
            return Backlog(sum(int(n) for n in lengths), sum(int(summary["pending"]) for summary in pending))

        backlog: Backlog = await self._call(measure)
        return backlog

    async def close(self) -> None:
        """See `EventStream.close`."""
        await self._client.aclose()


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

    def mark(self, verification_id: str, *, delivered: bool) -> None:
        """Add a marker entry for a verification's answer (see `StreamEntry`)."""
        self._sequence += 1
        marker = "d" if delivered else "u"
        self._new.append(StreamEntry(f"{self._sequence}-0", b"", "", marker=marker, marked_id=verification_id))
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

    async def read_pending(self, consumer: str, count: int) -> list[StreamEntry]:
        """See `EventStream.read_pending`."""
        return [entry for entry, owner, _ in self._pending.values() if owner == consumer][:count]

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[StreamEntry]:
        """See `EventStream.claim_stale`."""
        now = time.monotonic() * 1000
        stale = [entry for entry, _, at in self._pending.values() if now - at >= min_idle_ms][:count]
        for entry in stale:
            self._pending[entry.entry_id] = (entry, consumer, now)
        return stale

    async def ack(self, entries: list[StreamEntry]) -> None:
        """See `EventStream.ack`."""
        for entry in entries:
            self._pending.pop(entry.entry_id, None)

    async def backlog(self) -> Backlog:
        """See `EventStream.backlog`."""
        return Backlog(len(self._new) + len(self._pending), len(self._pending))

    async def close(self) -> None:
        """Nothing to release."""
