"""Idempotency keys with Stripe's semantics, kept in the database.

`claim` records the key (in its own committed transaction) before any work starts, with a hash
of the request. A second request with the same key then gets: the stored answer if the first
finished (same request), 422 if the request differs, 409 while the first is still in flight.
The answer is stored in the same transaction as the work (`complete`), so a process killed
between the commit and the reply leaves an answer to replay, and one killed before the commit
leaves a claim that a retry takes over once it is older than `STALE_AFTER`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.clock import utcnow
from app.db.models import IdempotencyRecord
from app.domain import errors

# A claim this old whose request never completed belongs to a request that died before its commit.
STALE_AFTER = timedelta(seconds=30)
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Claim:
    """The right to perform the request once.

    `claimed_at` fences it: a retry that takes a stale claim over sets a new one, and only the
    holder of the current one may store an answer.
    """

    caller: str
    key: str
    claimed_at: datetime


class ClaimLost(Exception):
    """A retry took the claim over while this attempt was still working; its work must not commit."""


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored answer of the first request with this key."""

    status_code: int
    body: bytes


def request_hash(method: str, path: str, body: bytes) -> bytes:
    """What makes two requests "the same": method, path and exact body."""
    return hashlib.sha256(b"\n".join((method.upper().encode(), path.encode(), body))).digest()


def check_key(key: str | None) -> str:
    """The Idempotency-Key header's value; 400 when it is missing or unusable."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise errors.Invalid(f"send an Idempotency-Key header: 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return key


async def claim(
    sessions: async_sessionmaker[AsyncSession], caller: str, key: str, fingerprint: bytes
) -> Claim | Replay:
    """Claim key for this request, or say what an earlier request with the key got."""
    now = utcnow()
    async with sessions() as session:
        session.add(IdempotencyRecord(caller=caller, key=key, request_hash=fingerprint, created_at=now))
        try:
            await session.commit()
            return Claim(caller, key, now)
        except IntegrityError:
            await session.rollback()
        record = await session.get(IdempotencyRecord, (caller, key))
        if record is None:  # released meanwhile by a failed first attempt: try once more
            session.add(IdempotencyRecord(caller=caller, key=key, request_hash=fingerprint, created_at=now))
            try:
                await session.commit()
                return Claim(caller, key, now)
            except IntegrityError:
                raise errors.Conflict("a request with this Idempotency-Key is in progress; retry shortly") from None
        if record.request_hash != fingerprint:
            raise errors.Reused("this Idempotency-Key was used for a different request")
        if record.completed_at is not None and record.status_code is not None and record.response_body is not None:
            return Replay(record.status_code, record.response_body)
        # In flight: a concurrent duplicate, unless the first attempt died before its commit.
        taken = await session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.caller == caller,
                IdempotencyRecord.key == key,
                IdempotencyRecord.completed_at.is_(None),
                IdempotencyRecord.created_at < now - STALE_AFTER,
            )
            .values(created_at=now)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            await session.commit()
            return Claim(caller, key, now)
        raise errors.Conflict("a request with this Idempotency-Key is in progress; retry shortly")


async def complete(session: AsyncSession, claimed: Claim, status_code: int, body: bytes) -> None:
    """Store the answer, in the caller's transaction (the one that did the work).

    Raises `ClaimLost` when the claim is no longer this attempt's (a retry took it over, or an
    answer is already stored): the caller must roll its work back.
    """
    stored = await session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.caller == claimed.caller,
            IdempotencyRecord.key == claimed.key,
            IdempotencyRecord.completed_at.is_(None),
            IdempotencyRecord.created_at == claimed.claimed_at,
        )
        .values(status_code=status_code, response_body=body, completed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if stored.rowcount != 1:  # type: ignore[attr-defined]
        raise ClaimLost(claimed.key)


async def release(sessions: async_sessionmaker[AsyncSession], claimed: Claim) -> None:
    """Give the key up after a failure that changed nothing (e.g. a transient error), so a retry may run."""
    async with sessions() as session:
        await session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.caller == claimed.caller,
                IdempotencyRecord.key == claimed.key,
                IdempotencyRecord.completed_at.is_(None),
                IdempotencyRecord.created_at == claimed.claimed_at,
            )
        )
        await session.commit()
