"""Single-use nonces and the card-status mirror that `/v1/verify` consults in one round trip.

Two implementations behind one interface: Redis (production, any number of workers) and
process memory (the embedded default, one worker only). Redis keys of one card share a hash
tag, so the one Lua call per verification stays within one Redis Cluster slot.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError


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

    async def get_status(self, card_ref: bytes) -> str | None:
        """The mirrored status of one card."""
        ...

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """Mirror a card's status (after the database commit)."""
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


class RedisStatusMirror:
    """Nonces and statuses in Redis; one EVALSHA per verification."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._present = client.register_script(_PRESENT_LUA)

    @classmethod
    def from_url(cls, url: str, prefix: str) -> RedisStatusMirror:
        """Connect lazily; short timeouts so an outage turns into a quick 503, not a hang."""
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, prefix)

    def _card_key(self, card_ref: bytes) -> str:
        return f"{self._prefix}{{{card_ref.hex()}}}"

    async def present(self, card_ref: bytes, nonce: bytes, ttl: int) -> tuple[bool, str | None]:
        """See `StatusMirror.present`."""
        card_key = self._card_key(card_ref)
        try:
            first, status = await self._present(keys=[f"{card_key}:n:{nonce.hex()}", f"{card_key}:s"], args=[ttl])
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return bool(first), status.decode() if status else None

    async def get_status(self, card_ref: bytes) -> str | None:
        """See `StatusMirror.get_status`."""
        try:
            status = await self._client.get(f"{self._card_key(card_ref)}:s")
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return status.decode() if isinstance(status, bytes) else status

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """See `StatusMirror.set_status`."""
        try:
            await self._client.set(f"{self._card_key(card_ref)}:s", status.value)
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
        self._next_purge = 0.0

    def _purge(self, now: float) -> None:
        if now >= self._next_purge:
            self._nonces = {key: until for key, until in self._nonces.items() if until > now}
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

    async def get_status(self, card_ref: bytes) -> str | None:
        """See `StatusMirror.get_status`."""
        return self._statuses.get(card_ref)

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """See `StatusMirror.set_status`."""
        self._statuses[card_ref] = status.value

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""
