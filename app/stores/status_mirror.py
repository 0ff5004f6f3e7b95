"""Single-use nonces and the card-status mirror that `/v1/verify` consults in one round trip.

Two implementations behind one interface: Redis (production, any number of workers) and
process memory (the embedded default, one worker only). Redis keys of one card share a hash
tag, so the one Lua call per verification stays within one Redis Cluster slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from enum import StrEnum
from typing import Any, Protocol

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError


class MirroredStatus(StrEnum):
    """An eCard's status as the verify path sees it (one letter, to keep Redis values small)."""

    PENDING_ACTIVATION = "P"
    ACTIVE = "A"
    SUSPENDED = "S"
    REVOKED = "R"


class StoreUnavailable(Exception):
    """The store cannot be reached; the verify path must fail closed."""


class StatusMirror(Protocol):
    """What the verify and issuance paths need from the fast store."""

    async def present(self, card_ref: bytes, nonce: bytes, ttl: int) -> tuple[bool, str | None]:
        """Consume nonce for card_ref (kept ttl seconds) and read the card's status, atomically.

        Returns (first_use, status letter or None when the card is not mirrored).
        """
        ...

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """Mirror a card's status (after the database commit)."""
        ...

    async def holder_state(self, card_ref: bytes, device_id: uuid.UUID) -> tuple[str | None, bool]:
        """The card's status and whether this device was unbound, in one round trip."""
        ...

    async def get_statuses(self, card_refs: list[bytes]) -> list[str | None]:
        """Mirrored statuses of many cards (for reconciliation), in order."""
        ...

    async def revoke_device(self, card_ref: bytes, device_id: uuid.UUID, ttl: int) -> None:
        """Refuse the device's access tokens from now on (for ttl seconds: their longest life)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# KEYS[1] nonce key, KEYS[2] status key; ARGV[1] nonce lifetime in seconds.
# A Lua nil would end the returned array, so a missing status comes back as "".
_PRESENT_LUA = """
local first = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1])
local status = redis.call('GET', KEYS[2])
return {first and 1 or 0, status or ''}
"""


_PRESENT_SHA = hashlib.sha1(_PRESENT_LUA.encode()).hexdigest()  # noqa: S324 (Redis names scripts by SHA-1)

Presentation = tuple[str, str, int, "asyncio.Future[tuple[bool, str | None]]"]


class RedisStatusMirror:
    """Nonces and statuses in Redis.

    Verifications arriving in the same event-loop turn share one pipeline of EVALSHA calls:
    each stays atomic for its own card, and a burst of scans costs one round trip and one
    read timeout instead of one per scan.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._queue: list[Presentation] = []
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, prefix: str) -> RedisStatusMirror:
        """Connect lazily; short timeouts so an outage turns into a quick 503, not a hang."""
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, prefix)

    def _card_key(self, card_ref: bytes) -> str:
        return f"{self._prefix}{{{card_ref.hex()}}}"

    async def present(self, card_ref: bytes, nonce: bytes, ttl: int) -> tuple[bool, str | None]:
        """See `StatusMirror.present`; queued for this event-loop turn's pipeline."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[bool, str | None]] = loop.create_future()
        card_key = self._card_key(card_ref)
        self._queue.append((f"{card_key}:n:{nonce.hex()}", f"{card_key}:s", ttl, future))
        if len(self._queue) == 1:
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._present_batch(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _present_batch(self, batch: list[Presentation]) -> None:
        try:
            results = await self._evalsha(batch)
        except (RedisError, OSError) as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(StoreUnavailable(str(exc)))
            return
        for (*_, future), (first, status) in zip(batch, results, strict=True):
            if not future.done():
                future.set_result((bool(first), status.decode() if status else None))

    async def _evalsha(self, batch: list[Presentation]) -> list[Any]:
        """Run the script for every presentation; load it first if the server lost it."""
        results = await self._pipeline(batch)
        # A NOSCRIPT reply means that call did nothing, so those (and only those) run again.
        lost = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
        if lost:
            await self._client.script_load(_PRESENT_LUA)
            for index, result in zip(lost, await self._pipeline([batch[i] for i in lost]), strict=True):
                results[index] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _pipeline(self, batch: list[Presentation]) -> list[Any]:
        async with self._client.pipeline(transaction=False) as pipe:
            for nonce_key, status_key, ttl, _ in batch:
                pipe.evalsha(_PRESENT_SHA, 2, nonce_key, status_key, ttl)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """See `StatusMirror.set_status`."""
        try:
            await self._client.set(f"{self._card_key(card_ref)}:s", status.value)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def holder_state(self, card_ref: bytes, device_id: uuid.UUID) -> tuple[str | None, bool]:
        """See `StatusMirror.holder_state`; both keys carry the card's hash tag (one slot)."""
        card_key = self._card_key(card_ref)
        try:
            status, revoked = await self._client.mget([f"{card_key}:s", f"{card_key}:d:{device_id.hex}"])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return (status.decode() if isinstance(status, bytes) else status), revoked is not None

    async def get_statuses(self, card_refs: list[bytes]) -> list[str | None]:
        """See `StatusMirror.get_statuses`; a pipeline of GETs, since the keys lie in many cluster slots."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for card_ref in card_refs:
                    pipe.get(f"{self._card_key(card_ref)}:s")
                values = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return [value.decode() if isinstance(value, bytes) else value for value in values]

    async def revoke_device(self, card_ref: bytes, device_id: uuid.UUID, ttl: int) -> None:
        """See `StatusMirror.revoke_device`."""
        try:
            await self._client.set(f"{self._card_key(card_ref)}:d:{device_id.hex}", "1", ex=max(ttl, 1))
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def ping(self) -> None:
        """See `StatusMirror.ping`."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc

    async def close(self) -> None:
        """See `StatusMirror.close`."""
        await self._client.aclose()


class MemoryStatusMirror:
    """Nonces and statuses in this process: correct only while the service runs one worker."""

    def __init__(self) -> None:
        self._nonces: dict[tuple[bytes, bytes], float] = {}
        self._statuses: dict[bytes, str] = {}
        self._revoked_devices: dict[uuid.UUID, float] = {}
        self._next_purge = 0.0

    def _purge(self, now: float) -> None:
        if now >= self._next_purge:
            self._nonces = {key: until for key, until in self._nonces.items() if until > now}
            self._revoked_devices = {key: until for key, until in self._revoked_devices.items() if until > now}
            self._next_purge = now + 10.0

    async def present(self, card_ref: bytes, nonce: bytes, ttl: int) -> tuple[bool, str | None]:
        """See `StatusMirror.present`; atomic because nothing here awaits."""
        now = time.monotonic()
        self._purge(now)
        key = (card_ref, nonce)
        until = self._nonces.get(key)
        first = until is None or until <= now
        if first:
            self._nonces[key] = now + ttl
        return first, self._statuses.get(card_ref)

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """See `StatusMirror.set_status`."""
        self._statuses[card_ref] = status.value

    async def holder_state(self, card_ref: bytes, device_id: uuid.UUID) -> tuple[str | None, bool]:
        """See `StatusMirror.holder_state`."""
        until = self._revoked_devices.get(device_id)
        return self._statuses.get(card_ref), until is not None and until > time.monotonic()

    async def get_statuses(self, card_refs: list[bytes]) -> list[str | None]:
        """See `StatusMirror.get_statuses`."""
        return [self._statuses.get(card_ref) for card_ref in card_refs]

    async def revoke_device(self, card_ref: bytes, device_id: uuid.UUID, ttl: int) -> None:
        """See `StatusMirror.revoke_device`."""
        self._revoked_devices[device_id] = time.monotonic() + ttl

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""
