"""The double-entry ledger and the money events bound to verifications.

Every movement is a transaction whose postings sum to zero, written in one database
transaction with the request's idempotency answer. A verification pays for one thing of each
kind at most (unique constraint); the verification must be an accepted one of the same
organisation, for the right purpose, already stored from the event stream.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.engine import insert_or_ignore
from app.db.models import (
    Card,
    ECard,
    LedgerAccount,
    LedgerPosting,
    LedgerTransaction,
    Person,
    VerificationEvent,
    VerifierOrganisation,
)
from app.domain import errors
from app.domain.agreements.rules import province


class AccountKind:
    """Kinds of ledger account."""

    CARD = "card"
    ORGANISATION = "organisation"
    INSURANCE_FUND = "insurance_fund"
    SUBSIDY_FUND = "subsidy_fund"


class MovementKind:
    """Kinds of ledger transaction."""

    TRANSIT_FARE = "transit_fare"
    MEDICAL_SETTLEMENT = "medical_settlement"
    SUBSIDY_PAYOUT = "subsidy_payout"


@dataclass(frozen=True, slots=True)
class MedicalCoverage:
    """Insurance shares of a bill in basis points, by region, scheme and whether the bill is out of region."""

    version: str
    default: dict[str, dict[str, int]]
    regions: dict[str, dict[str, dict[str, int]]]

    @classmethod
    def load(cls, path: Path) -> MedicalCoverage:
        """Read the coverage table (app/data/medical_coverage.json)."""
        document = json.loads(path.read_text(encoding="utf-8"))
        return cls(str(document["version"]), document["default"], document.get("regions", {}))

    def share_bp(self, card_region: str, scheme: str, cross_region: bool) -> int:
        """The insurance's share of a bill, in basis points."""
        table = self.regions.get(card_region, {}).get(scheme) or self.default[scheme]
        return int(table["cross_region" if cross_region else "in_region"])


async def account(session: AsyncSession, kind: str, owner_id: str, region: str) -> LedgerAccount:
    """The account of owner, created on first use (safely under concurrency)."""
    await session.execute(
        insert_or_ignore(session, LedgerAccount, ["kind", "owner_id"]).values(
            id=uuid.uuid4(), kind=kind, owner_id=owner_id, region_code=region, created_at=utcnow()
        )
    )
    found = await session.scalar(
        select(LedgerAccount).where(LedgerAccount.kind == kind, LedgerAccount.owner_id == owner_id)
    )
    assert found is not None
    return found


async def post(
    session: AsyncSession,
    kind: str,
    postings: list[tuple[LedgerAccount, int]],
    *,
    amount_fen: int,
    details: dict[str, Any],
    verification_id: str | None = None,
    reference: str | None = None,
    ecard_id: uuid.UUID | None = None,
    organisation_id: uuid.UUID | None = None,
) -> LedgerTransaction:
    """Write a balanced transaction (flushes; the caller commits). 409 if its verification or reference is used."""
    if sum(amount for _, amount in postings) != 0 or len(postings) < 2:
        raise ValueError("a transaction needs two or more postings that sum to zero")
    now = utcnow()
    transaction = LedgerTransaction(
        id=uuid.uuid4(),
        kind=kind,
        verification_id=verification_id,
        reference=reference,
        ecard_id=ecard_id,
        organisation_id=organisation_id,
        amount_fen=amount_fen,
        details=details,
        created_at=now,
    )
    session.add(transaction)
    try:
        # The transaction's row first: the unique constraint on its verification decides here.
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise errors.Conflict(
            f"this verification (or the trip's entry) has already been charged ({kind})",
            verification_id=verification_id,
        ) from None
    session.add_all(
        LedgerPosting(transaction_id=transaction.id, account_id=target.id, amount_fen=amount, created_at=now)
        for target, amount in postings
        if amount != 0
    )
    await session.flush()
    return transaction


@dataclass(frozen=True, slots=True)
class Verified:
    """An accepted verification that money may be bound to, with its card."""

    event: VerificationEvent
    ecard: ECard
    person: Person
    organisation: VerifierOrganisation


async def accepted_verification(
    session: AsyncSession, verification_id: str, organisation_id: uuid.UUID, purpose: str
) -> Verified:
    """The verification, if it is an accepted one of this organisation for purpose; a problem otherwise.

    Verifications reach the database from the event stream within about a second: a fresh one
    not there yet is a 409 with Retry-After, which the terminal retries with the same key.
    """
    event = await session.get(VerificationEvent, verification_id)
    if event is None:
        raise errors.Conflict(
            "no such verification recorded (yet): retry in a second", code="verification_not_recorded", retry_after=1
        )
    if event.organisation_id != organisation_id:
        raise errors.NotFound("no such verification for this organisation")
    if event.result != "accepted" or event.purpose != purpose or event.card_ref is None:
        raise errors.Conflict(
            f"the verification must be an accepted {purpose} one; it was {event.result} ({event.purpose})"
        )
    row = (
        await session.execute(
            select(ECard, Person, VerifierOrganisation)
            .join(Card, Card.id == ECard.card_id)
            .join(Person, Person.id == Card.person_id)
            .join(VerifierOrganisation, VerifierOrganisation.id == organisation_id)
            .where(ECard.card_ref == event.card_ref)
        )
    ).first()
    if row is None:
        raise errors.NotFound("the verification's card is unknown")
    return Verified(event, row[0], row[1], row[2])


async def charge_fare(
    session: AsyncSession,
    verification: Verified,
    amount_fen: int,
    details: dict[str, Any],
    entry: Verified | None = None,
) -> LedgerTransaction:
    """A transit fare: the card pays the transit organisation.

    Flat fares are charged on one verification. Distance fares are charged at the exit gate on
    the exit verification together with the trip's entry verification: same card, same
    operator, entry first, and each entry ends one trip only.
    """
    reference = None
    if entry is not None:
        if entry.event.card_ref != verification.event.card_ref:
            raise errors.Conflict("the entry and exit verifications are of different cards")
        if entry.event.occurred_at >= verification.event.occurred_at or entry.event.id == verification.event.id:
            raise errors.Conflict("the entry verification must come before the exit")
        reference = f"entry:{entry.event.id}"
        details = {**details, "entry_verification_id": entry.event.id}
    card = await account(session, AccountKind.CARD, str(verification.ecard.id), verification.ecard.region_code)
    operator = await account(
        session, AccountKind.ORGANISATION, str(verification.organisation.id), verification.organisation.region_code
    )
    return await post(
        session,
        MovementKind.TRANSIT_FARE,
        [(card, -amount_fen), (operator, amount_fen)],
        amount_fen=amount_fen,
        details=details,
        verification_id=verification.event.id,
        reference=reference,
        ecard_id=verification.ecard.id,
        organisation_id=verification.organisation.id,
    )


@dataclass(frozen=True, slots=True)
class Settlement:
    """A settled medical bill."""

    transaction: LedgerTransaction
    insurance_fen: int
    holder_fen: int


async def settle_medical_bill(
    session: AsyncSession, coverage: MedicalCoverage, verification: Verified, total_fen: int
) -> Settlement:
    """The card's insurance fund pays its share (by scheme, and less out of region), the holder the rest."""
    card_region = verification.ecard.region_code
    cross_region = province(card_region) != province(verification.organisation.region_code)
    share_bp = coverage.share_bp(card_region, verification.person.insurance_scheme, cross_region)
    insurance_fen = total_fen * share_bp // 10_000
    holder_fen = total_fen - insurance_fen
    fund = await account(session, AccountKind.INSURANCE_FUND, card_region, card_region)
    card = await account(session, AccountKind.CARD, str(verification.ecard.id), card_region)
    hospital = await account(
        session, AccountKind.ORGANISATION, str(verification.organisation.id), verification.organisation.region_code
    )
    transaction = await post(
        session,
        MovementKind.MEDICAL_SETTLEMENT,
        [(fund, -insurance_fen), (card, -holder_fen), (hospital, total_fen)],
        amount_fen=total_fen,
        details={
            "insurance_fen": insurance_fen,
            "holder_fen": holder_fen,
            "share_bp": share_bp,
            "scheme": verification.person.insurance_scheme,
            "cross_region": cross_region,
            "coverage_version": coverage.version,
        },
        verification_id=verification.event.id,
        ecard_id=verification.ecard.id,
        organisation_id=verification.organisation.id,
    )
    return Settlement(transaction, insurance_fen, holder_fen)


async def pay_subsidies(
    session: AsyncSession, region: str, batch_id: str, payouts: list[tuple[uuid.UUID, int]], reason: str
) -> list[LedgerTransaction]:
    """The region's subsidy fund pays each card (benefits go to the physical card's account) — all or nothing."""
    fund = await account(session, AccountKind.SUBSIDY_FUND, region, region)
    card_ids = [card_id for card_id, _ in payouts]
    if len(set(card_ids)) != len(card_ids):
        raise errors.Invalid("a card appears twice in the batch")
    ecards = {
        card_id: ecard
        for card_id, ecard in await session.execute(
            select(Card.id, ECard).join(ECard, ECard.card_id == Card.id).where(Card.id.in_(card_ids))
        )
    }
    missing = [str(card_id) for card_id in card_ids if card_id not in ecards or ecards[card_id].region_code != region]
    if missing:
        raise errors.Invalid(f"cards not found in region {region}: {missing[:10]}", missing=missing[:100])
    transactions = []
    for card_id, amount_fen in payouts:
        ecard = ecards[card_id]
        card = await account(session, AccountKind.CARD, str(ecard.id), region)
        transactions.append(
            await post(
                session,
                MovementKind.SUBSIDY_PAYOUT,
                [(fund, -amount_fen), (card, amount_fen)],
                amount_fen=amount_fen,
                details={"batch_id": batch_id, "reason": reason, "card_id": str(card_id)},
                reference=f"{batch_id}:{card_id}",
                ecard_id=ecard.id,
            )
        )
    return transactions


@dataclass(frozen=True, slots=True)
class CardMovement:
    """One movement on a card's account, as its holder sees it."""

    transaction_id: uuid.UUID
    kind: str
    amount_fen: int  # signed: + received, - paid
    at: datetime
    organisation: str | None
    details: dict[str, Any]


async def card_statement(
    session: AsyncSession, ecard_id: uuid.UUID, *, limit: int, before: datetime | None
) -> tuple[int, list[CardMovement]]:
    """The card account's balance and its movements, newest first."""
    card = await session.scalar(
        select(LedgerAccount).where(LedgerAccount.kind == AccountKind.CARD, LedgerAccount.owner_id == str(ecard_id))
    )
    if card is None:
        return 0, []
    balance = await session.scalar(
        select(func.coalesce(func.sum(LedgerPosting.amount_fen), 0)).where(LedgerPosting.account_id == card.id)
    )
    query = (
        select(LedgerPosting.amount_fen, LedgerTransaction, VerifierOrganisation.name)
        .join(LedgerTransaction, LedgerTransaction.id == LedgerPosting.transaction_id)
        .outerjoin(VerifierOrganisation, VerifierOrganisation.id == LedgerTransaction.organisation_id)
        .where(LedgerPosting.account_id == card.id)
        .order_by(LedgerTransaction.created_at.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(LedgerTransaction.created_at < before)
    movements = [
        CardMovement(transaction.id, transaction.kind, int(amount), transaction.created_at, name, transaction.details)
        for amount, transaction, name in await session.execute(query)
    ]
    return int(balance or 0), movements


@dataclass(frozen=True, slots=True)
class Reconciliation:
    """An organisation's day: per movement kind and account kind, the sums; they balance to zero."""

    organisation_id: uuid.UUID
    day: date
    transactions: int
    by_kind: dict[str, dict[str, int]]
    total_fen: int


async def daily_reconciliation(session: AsyncSession, organisation_id: uuid.UUID, day: date) -> Reconciliation:
    """Every posting of the organisation's transactions on day (UTC), summed by kind and account kind."""
    start = datetime.combine(day, time.min, UTC)
    rows = await session.execute(
        select(LedgerTransaction.kind, LedgerAccount.kind, func.sum(LedgerPosting.amount_fen))
        .join(LedgerPosting, LedgerPosting.transaction_id == LedgerTransaction.id)
        .join(LedgerAccount, LedgerAccount.id == LedgerPosting.account_id)
        .where(
            LedgerTransaction.organisation_id == organisation_id,
            LedgerTransaction.created_at >= start,
            LedgerTransaction.created_at < start + timedelta(days=1),
        )
        .group_by(LedgerTransaction.kind, LedgerAccount.kind)
    )
    by_kind: dict[str, dict[str, int]] = defaultdict(dict)
    total = 0
    for movement, account_kind, amount in rows:
        by_kind[movement][account_kind] = int(amount)
        total += int(amount)
    count = await session.scalar(
        select(func.count()).where(
            LedgerTransaction.organisation_id == organisation_id,
            LedgerTransaction.created_at >= start,
            LedgerTransaction.created_at < start + timedelta(days=1),
        )
    )
    return Reconciliation(organisation_id, day, int(count or 0), dict(by_kind), total)
