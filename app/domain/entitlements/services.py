"""Granting and revoking entitlements; each change is mirrored for the verify path after its commit."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import ECard, Entitlement, Region
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.cards.mirroring import MirrorOutbox, stage_card


def _end_of(day: date) -> datetime:
    return datetime.combine(day, time(23, 59, 59), UTC)


async def grant_entitlement(
    session: AsyncSession,
    outbox: MirrorOutbox,
    actor: Actor,
    ecard: ECard,
    *,
    kind: str,
    region: str,
    valid_until: date,
) -> tuple[Entitlement, bool]:
    """Grant kind in region until the end of valid_until (UTC); commits, then mirrors (False: not yet, queued)."""
    now = utcnow()
    if _end_of(valid_until) <= now:
        raise errors.Invalid("valid_until must not be in the past")
    if await session.get(Region, region) is None:
        raise errors.NotFound(f"region {region} is not registered")
    entitlement = Entitlement(
        ecard_id=ecard.id,
        kind=kind,
        region_code=region,
        valid_from=now,
        valid_until=_end_of(valid_until),
        created_at=now,
    )
    session.add(entitlement)
    await session.flush()
    record(
        session, actor, "entitlement.granted", subject_type="entitlement", subject_id=entitlement.id,
        region=ecard.region_code, after={"ecard_id": str(ecard.id), "kind": kind, "region": region,
                                         "valid_until": valid_until.isoformat()},
    )  # fmt: skip
    await stage_card(session, ecard)
    await session.commit()
    return entitlement, await outbox.publish([ecard.id])


async def list_entitlements(session: AsyncSession, ecard: ECard) -> list[Entitlement]:
    """The card's entitlements, newest first, revoked and expired ones included."""
    query = select(Entitlement).where(Entitlement.ecard_id == ecard.id).order_by(Entitlement.created_at.desc())
    return list((await session.scalars(query)).all())


async def revoke_entitlement(
    session: AsyncSession, outbox: MirrorOutbox, actor: Actor, ecard: ECard, entitlement_id: uuid.UUID
) -> tuple[Entitlement, bool]:
    """End an entitlement now (commits, then mirrors; False: not yet, queued); 404 if it is not this card's."""
    entitlement = await session.get(Entitlement, entitlement_id)
    if entitlement is None or entitlement.ecard_id != ecard.id:
        raise errors.NotFound("no such entitlement")
    if entitlement.revoked_at is not None:
        raise errors.Conflict("the entitlement is already revoked")
    entitlement.revoked_at = utcnow()
    record(
        session, actor, "entitlement.revoked", subject_type="entitlement", subject_id=entitlement.id,
        region=ecard.region_code, after={"ecard_id": str(ecard.id), "kind": entitlement.kind},
    )  # fmt: skip
    await stage_card(session, ecard)
    await session.commit()
    return entitlement, await outbox.publish([ecard.id])
