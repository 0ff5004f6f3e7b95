"""Every change the verify path must see reaches the status mirror, or the change does not happen.

A change is staged in its own database transaction (`stage_card`, `stage_device`): the eCard's mirror
version goes up and a `mirror_changes` row is written beside it, so the commit holds both or neither.
After the commit the request publishes it (`publish`): the eCard's current state is read again and
written to the mirror under its version, and the rows are deleted. When the store does not answer,
the rows stay and `MirrorOutbox.run` (in every worker) applies them as soon as it answers again: a
committed suspension is never lost, and verification, which needs the same store, fails closed
meanwhile. Versions make every order of these writes safe: the mirror never takes an older state
over a newer one (a slow applier, a repair, two workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.clock import utcnow
from app.db.models import Card, ECard, ECardState, MirrorChange, Person
from app.domain.cards.services import MIRRORED, entitlements_of, profile_record
from app.security.pii import PiiCipher
from app.stores.status_mirror import CardRecord, StatusMirror, StoreUnavailable

logger = logging.getLogger(__name__)

# How often the applier looks for changes a request could not publish, and how soon it retries
# while the store does not answer: the bound on how long verification may lag a committed change
# once the store answers again.
APPLY_INTERVAL = 1.0
RETRY_INTERVAL = 0.2
# Rows younger than this are left to the request that wrote them (it publishes right after its commit).
GRACE = timedelta(seconds=0.5)
BATCH = 200


async def stage_card(session: AsyncSession, ecard: ECard) -> None:
    """In the change's transaction: the eCard's state, records or entitlements changed (caller commits)."""
    await session.execute(update(ECard).where(ECard.id == ecard.id).values(mirror_version=ECard.mirror_version + 1))
    session.add(MirrorChange(ecard_id=ecard.id, created_at=utcnow()))


def stage_device(session: AsyncSession, ecard_id: uuid.UUID, device_id: uuid.UUID, ttl: int) -> None:
    """In the change's transaction: the device's access tokens must be refused for ttl seconds (caller commits)."""
    now = utcnow()
    until = now + timedelta(seconds=ttl)
    session.add(MirrorChange(ecard_id=ecard_id, device_id=device_id, until=until, created_at=now))


class MirrorOutbox:
    """Publishes staged changes to the status mirror, now or, when the store is away, as soon as it is back."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], mirror: StatusMirror, pii: PiiCipher) -> None:
        self._sessions = sessions
        self._mirror = mirror
        self._pii = pii
        self._wake = asyncio.Event()

    async def publish(self, ecard_ids: Iterable[uuid.UUID]) -> bool:
        """Apply the committed changes of these eCards; False when the store did not take them (they stay queued)."""
        try:
            for ecard_id in set(ecard_ids):
                await self._apply(ecard_id)
        except StoreUnavailable as exc:
            logger.warning("status store unavailable; a committed change waits in the outbox (%s)", exc)
            self._wake.set()
            return False
        return True

    async def _apply(self, ecard_id: uuid.UUID) -> None:
        """Mirror the eCard's current state and its pending device revocations; delete what was applied."""
        async with self._sessions() as session:
            changes = list(await session.scalars(select(MirrorChange).where(MirrorChange.ecard_id == ecard_id)))
            if not changes:
                return
            row = (
                await session.execute(
                    select(ECard, Person)
                    .join(Card, Card.id == ECard.card_id)
                    .join(Person, Person.id == Card.person_id)
                    .where(ECard.id == ecard_id)
                )
            ).first()
            if row is not None:
                ecard, person = row
                if ecard.sealed_profile is None:
                    # Kept with the eCard from now on (committed with the deletion below): a refill reads it.
                    ecard.sealed_profile = profile_record(self._pii, ecard.card_ref, person)
                records = {
                    CardRecord.PROFILE: ecard.sealed_profile,
                    CardRecord.ENTITLEMENTS: await entitlements_of(session, ecard.id),
                }
                status = MIRRORED[ECardState(ecard.state)]
                await self._mirror.mirror_card(ecard.card_ref, ecard.mirror_version, status, records)
                now = utcnow()
                for change in changes:
                    if change.device_id is not None and change.until is not None and change.until > now:
                        ttl = int((change.until - now).total_seconds()) + 1
                        await self._mirror.revoke_device(ecard.card_ref, change.device_id, ttl)
            await session.execute(delete(MirrorChange).where(MirrorChange.id.in_([change.id for change in changes])))
            await session.commit()

    async def apply_pending(self) -> int:
        """Apply changes older than the grace period, oldest first; how many eCards (raises StoreUnavailable)."""
        async with self._sessions() as session:
            ecard_ids = list(
                await session.scalars(
                    select(MirrorChange.ecard_id)
                    .where(MirrorChange.created_at < utcnow() - GRACE)
                    .group_by(MirrorChange.ecard_id)
                    .order_by(func.min(MirrorChange.id))
                    .limit(BATCH)
                )
            )
        for ecard_id in ecard_ids:
            await self._apply(ecard_id)
        return len(ecard_ids)

    async def run(self) -> None:
        """Apply what requests could not publish, until cancelled: every second, faster while the store is away."""
        interval = APPLY_INTERVAL
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                while await self.apply_pending() == BATCH:
                    pass
                interval = APPLY_INTERVAL
            except StoreUnavailable:
                interval = RETRY_INTERVAL
            except Exception:
                logger.exception("applying staged mirror changes failed; retrying")
                interval = RETRY_INTERVAL
