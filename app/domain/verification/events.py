"""Verification events: encoded on the hot path, drained from the stream into the database.

The verify path appends one event per answered verification in the same store round trip
that decides it (see `app.stores.status_mirror`). The drain moves them into
`verification_events` in batches: at-least-once from the stream, insert-once by verification
id in the database, acknowledged only after the commit, and a dead drain's pending entries are
claimed by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.engine import insert_or_ignore
from app.db.models import Terminal, VerificationEvent, VerifierOrganisation
from app.observability import metrics
from app.stores.event_stream import EventStream, StreamEntry, StreamUnavailable
from app.stores.status_mirror import ScanResult

logger = logging.getLogger(__name__)

ONLINE = "online"
BATCH = "batch"
# The results of verifications that reached the card and so used up the credential's nonce.
NONCE_CONSUMING_RESULTS = tuple(
    result.value for result in ScanResult if result not in (ScanResult.REPLAYED, ScanResult.REFRESH_REQUIRED)
)


class EventRecord(msgspec.Struct, array_like=True, frozen=True):
    """One verification as the stream carries it (the result travels beside it)."""

    verification_id: str
    terminal_id: bytes
    organisation_id: bytes
    at_ms: int
    channel: str
    card_ref: bytes | None = None
    nonce: bytes | None = None
    card_region: str | None = None
    purpose: str | None = None
    scanned_ms: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EventRecord)


def encode_event(record: EventRecord) -> bytes:
    """The compact bytes the store appends to the stream."""
    return _encoder.encode(record)


def moment_of(ms: int) -> datetime:
    """A time in milliseconds since the epoch, as aware UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def _row(entry: StreamEntry) -> dict[str, Any] | None:
    try:
        record = _decoder.decode(entry.event)
    except msgspec.DecodeError:
        logger.error("verification event %s cannot be decoded; dropped", entry.entry_id)
        return None
    return {
        "id": record.verification_id,
        "occurred_at": moment_of(record.at_ms),
        "scanned_at": moment_of(record.scanned_ms) if record.scanned_ms is not None else None,
        "terminal_id": uuid.UUID(bytes=record.terminal_id),
        "organisation_id": uuid.UUID(bytes=record.organisation_id),
        "card_ref": record.card_ref,
        "nonce": record.nonce,
        "card_region": record.card_region,
        "purpose": record.purpose,
        "result": entry.result,
        "channel": record.channel,
    }


async def store_events(session: AsyncSession, entries: list[StreamEntry]) -> None:
    """Insert the entries' events, skipping ids already present (redelivery), then apply their markers; commit.

    A marker follows its event in the same stream, so its row is in the database or in this batch.
    """
    rows = [row for entry in entries if not entry.marker and (row := _row(entry)) is not None]
    markers = [(entry.marked_id, entry.marker == "d") for entry in entries if entry.marker]
    if not rows and not markers:
        return
    if rows:
        # One row per id even within a batch (a redelivered entry can sit beside its original).
        unique = list({row["id"]: row for row in rows}.values())
        await session.execute(insert_or_ignore(session, VerificationEvent, ["id"]), unique)
    for verification_id, delivered in markers:
        await session.execute(
            update(VerificationEvent).where(VerificationEvent.id == verification_id).values(answer_delivered=delivered)
        )
    await session.commit()


def consumer_name() -> str:
    """This process's name in the consumer group."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(slots=True)
class EventDrain:
    """Moves events from the stream to the database, batch by batch."""

    stream: EventStream
    sessions: async_sessionmaker[AsyncSession]
    consumer: str
    batch: int = 500
    block_ms: int = 1000
    # Entries delivered to a consumer and unacknowledged this long belong to a dead drain.
    claim_idle_ms: int = 30_000
    # Whether this drain's own delivered, unacknowledged entries are to be read first: at the start, and
    # after a failed call (a read that timed out may have delivered entries whose reply never came).
    own_pending: bool = field(default=True, init=False)

    async def run_once(self) -> int:
        """Drain one batch: this drain's own unacknowledged entries after a failure, then entries of dead
        drains, then new ones. The number of entries handled."""
        try:
            return await self._drain_batch()
        except BaseException:
            self.own_pending = True
            raise

    async def _drain_batch(self) -> int:
        entries: list[StreamEntry] = []
        if self.own_pending:
            entries = await self.stream.read_pending(self.consumer, self.batch)
            self.own_pending = bool(entries)
        if not entries:
            entries = await self.stream.claim_stale(self.consumer, self.claim_idle_ms, self.batch)
        if not entries:
            entries = await self.stream.read(self.consumer, self.batch, self.block_ms)
        if not entries:
            return 0
        async with self.sessions() as session:
            await store_events(session, entries)
        await self.stream.ack(entries)
        metrics.count_drained(len(entries), _oldest_age(entries))
        return len(entries)

    async def run(self, stop: asyncio.Event) -> None:
        """Drain until stop is set (between batches, so no database call is cut off).

        Outages of Redis or the database are waited out; nothing is acknowledged that is not
        committed.
        """
        while not stop.is_set():
            try:
                await self.run_once()
            except (StreamUnavailable, OSError) as exc:
                logger.warning("event stream unavailable (%s); retrying", exc)
                await _pause(stop)
            except Exception:
                logger.exception("draining verification events failed; retrying")
                await _pause(stop)


def _oldest_age(entries: list[StreamEntry]) -> float | None:
    """Seconds since the oldest event of a batch was appended (the drain's lag); None without events."""
    oldest: int | None = None
    for entry in entries:
        if entry.marker:
            continue
        with contextlib.suppress(msgspec.DecodeError):
            at_ms = _decoder.decode(entry.event).at_ms
            oldest = at_ms if oldest is None else min(oldest, at_ms)
    return None if oldest is None else time.time() - oldest / 1000


async def _pause(stop: asyncio.Event) -> None:
    """Wait a second, or less if stop is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), 1.0)


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One use of a card, as its holder sees it."""

    verification_id: str
    occurred_at: datetime
    scanned_at: datetime | None
    organisation: str
    business_type: str
    purpose: str | None
    result: str


async def card_usage(
    session: AsyncSession, card_ref: bytes, *, limit: int, before: datetime | None, before_id: str | None = None
) -> list[UsageEntry]:
    """The card's verifications, newest first (drained ones: a few seconds behind the gates).

    Pages continue from (before, before_id), the last entry seen: scans uploaded in one batch
    share their `occurred_at`, so the time alone would skip some.
    """
    query = (
        select(VerificationEvent, VerifierOrganisation.name, VerifierOrganisation.business_type)
        .join(VerifierOrganisation, VerifierOrganisation.id == VerificationEvent.organisation_id)
        # An answer no gate received (it was told "outcome unknown") is no use the holder made.
        .where(VerificationEvent.card_ref == card_ref, VerificationEvent.answer_delivered.is_(True))
        .order_by(VerificationEvent.occurred_at.desc(), VerificationEvent.id.desc())
        .limit(limit)
    )
    if before is not None and before_id is not None:
        query = query.where(
            or_(
                VerificationEvent.occurred_at < before,
                and_(VerificationEvent.occurred_at == before, VerificationEvent.id < before_id),
            )
        )
    elif before is not None:
        query = query.where(VerificationEvent.occurred_at < before)
    return [
        UsageEntry(
            verification_id=event.id,
            occurred_at=event.occurred_at,
            scanned_at=event.scanned_at,
            organisation=name,
            business_type=business_type,
            purpose=event.purpose,
            result=event.result,
        )
        for event, name, business_type in await session.execute(query)
    ]


@dataclass(frozen=True, slots=True)
class TerminalCounts:
    """Verifications of one terminal in a period, by result."""

    terminal_id: uuid.UUID
    name: str
    accepted: int
    rejected: int
    by_result: dict[str, int]


async def terminal_counts(
    session: AsyncSession, organisation_id: uuid.UUID, since: datetime, until: datetime
) -> list[TerminalCounts]:
    """Per terminal of the organisation (all of them, zero counts included), by result, in [since, until)."""
    terminals = (
        await session.execute(
            select(Terminal.id, Terminal.name)
            .where(Terminal.organisation_id == organisation_id)
            .order_by(Terminal.name)
        )
    ).all()
    counted = await session.execute(
        select(VerificationEvent.terminal_id, VerificationEvent.result, func.count())
        .where(
            VerificationEvent.organisation_id == organisation_id,
            VerificationEvent.occurred_at >= since,
            VerificationEvent.occurred_at < until,
        )
        .group_by(VerificationEvent.terminal_id, VerificationEvent.result)
    )
    results: dict[uuid.UUID, dict[str, int]] = {}
    for terminal_id, result, count in counted:
        results.setdefault(terminal_id, {})[result] = int(count)
    answer = []
    for terminal_id, name in terminals:
        by_result = results.get(terminal_id, {})
        accepted = by_result.get("accepted", 0)
        answer.append(TerminalCounts(terminal_id, name, accepted, sum(by_result.values()) - accepted, by_result))
    return answer


async def earlier_uses(
    session: AsyncSession, uses: list[tuple[bytes, bytes]]
) -> dict[tuple[bytes, bytes], VerificationEvent]:
    """For (card_ref, nonce) pairs: the recorded verification that consumed each nonce, if any."""
    if not uses:
        return {}
    cards = {card_ref for card_ref, _ in uses}
    rows = await session.scalars(
        select(VerificationEvent)
        .where(VerificationEvent.card_ref.in_(cards), VerificationEvent.result.in_(NONCE_CONSUMING_RESULTS))
        .where(VerificationEvent.nonce.in_({nonce for _, nonce in uses}))
        .order_by(VerificationEvent.occurred_at)
    )
    found: dict[tuple[bytes, bytes], VerificationEvent] = {}
    for event in rows:
        assert event.card_ref is not None and event.nonce is not None
        found.setdefault((bytes(event.card_ref), bytes(event.nonce)), event)
    return {use: found[use] for use in uses if use in found}
