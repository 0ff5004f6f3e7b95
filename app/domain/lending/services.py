"""Library loans and park entries, each bound to one accepted verification.

A book lent in one region may come back at any library of the network: the lending library's
province, or one an agreement covering libraries joins it to (Chengdu ↔ Chongqing).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import Entitlement, LibraryLoan, ParkEntry, VerifierOrganisation
from app.domain import errors
from app.domain.agreements.rules import AcceptanceRules, province
from app.domain.ledger.services import Verified
from app.domain.verification.disclosure import PARK_ANNUAL_PASS
from crypto.credential import Purpose


async def lend(session: AsyncSession, verification: Verified, item_id: str, days: int) -> LibraryLoan:
    """Lend item on the verification (flushes); 409 if the item is out or the verification already lent one."""
    active = await session.scalar(
        select(LibraryLoan.id).where(LibraryLoan.item_id == item_id, LibraryLoan.returned_at.is_(None))
    )
    if active is not None:
        raise errors.Conflict(f"item {item_id} is on loan; return it first")
    now = utcnow()
    loan = LibraryLoan(
        ecard_id=verification.ecard.id,
        item_id=item_id,
        verification_id=verification.event.id,
        lent_by=verification.organisation.id,
        lent_at=now,
        due_at=now + timedelta(days=days),
    )
    session.add(loan)
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise errors.Conflict("this verification has already been used for a loan") from None
    return loan


async def take_back(
    session: AsyncSession, rules: AcceptanceRules, organisation: VerifierOrganisation, item_id: str
) -> tuple[LibraryLoan, VerifierOrganisation]:
    """Close the item's loan at organisation, if it belongs to the lending library's network (flushes)."""
    row = (
        await session.execute(
            select(LibraryLoan, VerifierOrganisation)
            .join(VerifierOrganisation, VerifierOrganisation.id == LibraryLoan.lent_by)
            .where(LibraryLoan.item_id == item_id, LibraryLoan.returned_at.is_(None))
        )
    ).first()
    if row is None:
        raise errors.NotFound(f"item {item_id} is not on loan")
    loan, lender = row
    if not rules.accepts(organisation.region_code, lender.region_code, Purpose.LIBRARY):
        raise errors.Forbidden(
            f"item {item_id} was lent in region {lender.region_code}, outside this library's network"
        )
    closed = await session.execute(
        update(LibraryLoan)
        .where(LibraryLoan.id == loan.id, LibraryLoan.returned_at.is_(None))
        .values(returned_at=utcnow(), returned_to=organisation.id)
        .execution_options(synchronize_session=False)
    )
    if closed.rowcount != 1:  # type: ignore[attr-defined]
        raise errors.Conflict(f"item {item_id} was returned meanwhile")
    await session.refresh(loan)
    return loan, lender


@dataclass(frozen=True, slots=True)
class Entry:
    """A park entry on an annual pass and how often the pass has been used."""

    entry: ParkEntry
    pass_valid_until: datetime
    entries_on_pass: int


async def enter_park(session: AsyncSession, verification: Verified) -> Entry:
    """Count an entry against the card's annual pass valid in the park's province (flushes); 409 without one."""
    now = utcnow()
    park_province = province(verification.organisation.region_code)
    passes = (
        await session.scalars(
            select(Entitlement)
            .where(
                Entitlement.ecard_id == verification.ecard.id,
                Entitlement.kind == PARK_ANNUAL_PASS,
                Entitlement.revoked_at.is_(None),
                Entitlement.valid_from <= now,
                Entitlement.valid_until >= now,
            )
            .order_by(Entitlement.valid_until.desc())
        )
    ).all()
    annual_pass = next((p for p in passes if province(p.region_code) == park_province), None)
    if annual_pass is None:
        raise errors.Conflict("the card holds no annual pass valid here; sell a ticket instead")
    entry = ParkEntry(
        entitlement_id=annual_pass.id,
        verification_id=verification.event.id,
        organisation_id=verification.organisation.id,
        entered_at=now,
    )
    session.add(entry)
    try:
        await session.flush()
    except IntegrityError:
        await session.rollback()
        raise errors.Conflict("this verification has already been counted as an entry") from None
    count = await session.scalar(
        select(func.count()).select_from(ParkEntry).where(ParkEntry.entitlement_id == annual_pass.id)
    )
    return Entry(entry, annual_pass.valid_until, int(count or 0))


async def card_loans(session: AsyncSession, ecard_id: uuid.UUID, limit: int) -> list[tuple[LibraryLoan, str]]:
    """The card's loans, newest first, with the lending library's name."""
    rows = await session.execute(
        select(LibraryLoan, VerifierOrganisation.name)
        .join(VerifierOrganisation, VerifierOrganisation.id == LibraryLoan.lent_by)
        .where(LibraryLoan.ecard_id == ecard_id)
        .order_by(LibraryLoan.lent_at.desc())
        .limit(limit)
    )
    return [(loan, name) for loan, name in rows]
