"""Offline kits: a region's public keys and its signed status list, for gates that lose their uplink.

The status list (IETF Token Status List, 2 bits per eCard at the index its credentials carry)
is built from the database and signed with the region's active key. Each worker keeps the
signed list for a short while, so gates polling every `ttl` seconds cost one query per
region and interval, not one per gate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import problems
from app.db.models import ECard, ECardState, Region
from app.domain.issuers.services import IssuerKeys
from crypto.offline import kit_document
from crypto.status_list import CardStatusCode, StatusList, sign_status_list

STATUS_CODES = {
    ECardState.ACTIVE.value: CardStatusCode.VALID,
    ECardState.SUSPENDED.value: CardStatusCode.SUSPENDED,
    ECardState.REVOKED.value: CardStatusCode.INVALID,
    ECardState.PENDING_ACTIVATION.value: CardStatusCode.PENDING_ACTIVATION,
}

# How long a worker reuses a signed list before reading the database again.
REBUILD_AFTER = 30.0


def status_list_subject(region: str) -> str:
    """The status list's `sub`: where gates fetch it."""
    return f"/v1/offline-kits/{region}"


async def region_statuses(session: AsyncSession, region: str) -> StatusList:
    """Every index the region has handed out, with its eCard's status (unused ones: not yet usable)."""
    size = await session.scalar(select(Region.next_status_index).where(Region.code == region))
    if size is None:
        raise problems.not_found(f"region {region} is not registered")
    statuses = [int(CardStatusCode.PENDING_ACTIVATION)] * int(size)
    rows = await session.execute(select(ECard.status_index, ECard.state).where(ECard.region_code == region))
    for index, state in rows:
        statuses[index] = STATUS_CODES[state]
    return StatusList.from_statuses(statuses)


@dataclass(slots=True)
class OfflineKits:
    """Signed kits per region, rebuilt when older than REBUILD_AFTER seconds."""

    ttl: int
    lifetime: int
    _built: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    async def kit(self, session: AsyncSession, keys: IssuerKeys, region: str) -> dict[str, Any]:
        """The region's kit document (see `crypto.offline.OfflineKit`)."""
        cached = self._built.get(region)
        now = time.time()
        if cached is not None and now - cached[0] < min(REBUILD_AFTER, self.ttl):
            return cached[1]
        signing_key = keys.signing_keys.get(region)
        if signing_key is None:
            raise problems.not_found(f"region {region} has no active signing key")
        statuses = await region_statuses(session, region)
        issued_at = int(now)
        token = sign_status_list(
            signing_key,
            region=region,
            subject=status_list_subject(region),
            status_list=statuses,
            issued_at=issued_at,
            expires_at=issued_at + self.lifetime,
            ttl=self.ttl,
        )
        # Every key of the region, retired ones too: credentials they signed may still be shown.
        region_keys = [key for key in keys.verify_keys.values() if key.region == region]
        document = kit_document(region, region_keys, token)
        self._built[region] = (now, document)
        return document
