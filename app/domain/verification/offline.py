"""Offline kits: a region's public keys and a signed validity period, for gates that lose their uplink.

Codes are unlinkable and carry no status index (crypto/seal.py, crypto/offline.py), so a kit names
no eCard: its token is the region's Token Status List with no entries, signed for the kit's period
(iat, exp = iat + lifetime, ttl). A gate offline accepts what a current key signed within its short
window; the card's status is enforced by issuing (no code is signed for an eCard that is not
active) and by the server when the gate uploads its scans (README, "Offline gates").

A kit is signed once per interval for the whole deployment, not per worker: the first worker to
find the stored kit due takes a lease on its row (`offline_kits`), builds, and stores it; every
worker serves the stored one meanwhile (and after), reading its ETag from the database at most
once a second and its body only when the ETag moved.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import OfflineKitBuild, Region
from app.domain import errors
from app.domain.issuers.services import IssuerKeys
from crypto.keys import SigningUnavailable
from crypto.offline import kit_document
from crypto.status_list import StatusList, sign_status_list

# How old the stored kit may be before a worker builds the next one.
REBUILD_AFTER = 30.0
# A build in flight holds the lease at most this long: a builder that died frees it then.
LEASE = timedelta(seconds=120)
# How long a worker serves the kit it last read before asking the database for the ETag again.
RECHECK_AFTER = 1.0
# How long a request for a region that has no kit yet waits for another worker's first build.
WAIT_FOR_FIRST_BUILD = 10.0
POLL = 0.2


def status_list_subject(region: str) -> str:
    """The status list's `sub`: where gates fetch it."""
    return f"/v1/offline-kits/{region}"


@dataclass(frozen=True, slots=True)
class SignedKit:
    """A stored kit as a worker serves it."""

    etag: str
    document: dict[str, Any]


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@dataclass(slots=True)
class OfflineKits:
    """The deployment's signed kits per region, in the database; this worker's copy of the ones it served."""

    ttl: int
    lifetime: int
    rebuild_after: float = REBUILD_AFTER
    _held: dict[str, tuple[float, SignedKit]] = field(default_factory=dict)

    async def kit(self, session: AsyncSession, keys: IssuerKeys, region: str) -> SignedKit:
        """The region's current kit (see `crypto.offline.OfflineKit`), built here if it is due and no one else is."""
        held = self._held.get(region)
        if held is not None and time.monotonic() - held[0] < RECHECK_AFTER:
            return held[1]
        give_up = time.monotonic() + WAIT_FOR_FIRST_BUILD
        while True:
            row = (
                await session.execute(
                    select(
                        OfflineKitBuild.etag,
                        OfflineKitBuild.generation,
                        OfflineKitBuild.built_at,
                        OfflineKitBuild.expires_at,
                        OfflineKitBuild.lease_until,
                    ).where(OfflineKitBuild.region_code == region)
                )
            ).first()
            await session.commit()  # no transaction held open while building or waiting
            now = utcnow()
            etag = row.etag if row is not None else None
            built_at = row.built_at if row is not None and etag is not None else None
            if etag and built_at and now - built_at < timedelta(seconds=min(self.rebuild_after, self.ttl)):
                return await self._serve(session, region, etag)
            if await self._take_lease(session, keys, region, row, now):
                try:
                    return await self._build(session, keys, region)
                except errors.Unavailable:
                    # The region's key could not sign (its token failed): gates keep the kit still valid.
                    if etag and row is not None and row.expires_at and now < row.expires_at:
                        return await self._serve(session, region, etag)
                    raise
            if etag and row is not None and row.expires_at and now < row.expires_at:
                return await self._serve(session, region, etag)  # another worker is building the next one
            if time.monotonic() > give_up:
                raise errors.Unavailable(f"the offline kit of region {region} is being built; retry shortly")
            await asyncio.sleep(POLL)

    async def mark_due(self, session: AsyncSession, region: str) -> None:
        """Make the stored kit due now: the next request builds a new one (after a mass change; tests). Commits."""
        await session.execute(
            update(OfflineKitBuild)
            .where(OfflineKitBuild.region_code == region)
            .values(built_at=datetime.fromtimestamp(0, UTC))
        )
        await session.commit()
        self._held.pop(region, None)

    async def _serve(self, session: AsyncSession, region: str, etag: str) -> SignedKit:
        """The stored kit with this ETag: this worker's copy, or its body read once."""
        held = self._held.get(region)
        if held is None or held[1].etag != etag:
            body = await session.scalar(
                select(OfflineKitBuild.document).where(
                    OfflineKitBuild.region_code == region, OfflineKitBuild.etag == etag
                )
            )
            await session.commit()
            if body is None:  # replaced between the two reads: serve the newer one
                body = await session.scalar(
                    select(OfflineKitBuild.document).where(OfflineKitBuild.region_code == region)
                )
                await session.commit()
                if body is None:
                    raise errors.Unavailable(f"the offline kit of region {region} is being replaced; retry shortly")
            kit = SignedKit(_etag(body), json.loads(body))
        else:
            kit = held[1]
        self._held[region] = (time.monotonic(), kit)
        return kit

    async def _take_lease(self, session: AsyncSession, keys: IssuerKeys, region: str, row: Any, now: datetime) -> bool:
        """Become the one builder of the region's next kit; False when another worker holds the lease."""
        if region not in keys.signing_keys:
            if await session.get(Region, region) is None:
                raise errors.NotFound(f"region {region} is not registered")
            raise errors.NotFound(f"region {region} has no active signing key")
        if row is None:
            session.add(OfflineKitBuild(region_code=region, lease_until=now + LEASE))
            try:
                await session.commit()
            except IntegrityError:  # another worker created the row first: it builds
                await session.rollback()
                return False
            return True
        if row.lease_until is not None and row.lease_until > now:
            return False
        taken = await session.execute(
            update(OfflineKitBuild)
            .where(
                OfflineKitBuild.region_code == region,
                OfflineKitBuild.generation == row.generation,
                (OfflineKitBuild.lease_until.is_(None)) | (OfflineKitBuild.lease_until < now),
            )
            .values(lease_until=now + LEASE)
        )
        await session.commit()
        return bool(taken.rowcount)  # type: ignore[attr-defined]

    async def _build(self, session: AsyncSession, keys: IssuerKeys, region: str) -> SignedKit:
        """Sign the kit's period, store the kit and free the lease (the lease is ours)."""
        started = time.perf_counter()
        try:
            issued_at = int(time.time())
            key = keys.signing_keys[region]
            sign = functools.partial(
                sign_status_list,
                key,
                region=region,
                subject=status_list_subject(region),
                status_list=StatusList.from_statuses({}, size=0),
                issued_at=issued_at,
                expires_at=issued_at + self.lifetime,
                ttl=self.ttl,
            )
            try:
                # A key in a module signs by a blocking PKCS#11 call: off the loop.
                token = await asyncio.to_thread(sign) if key.blocking else sign()
            except SigningUnavailable as exc:
                raise errors.Unavailable(
                    f"the issuer key of region {region} cannot sign the kit just now: {exc}", code="signing_unavailable"
                ) from None
            # Every key of the region, retired ones too: credentials they signed may still be shown.
            region_keys = [key for key in keys.verify_keys.values() if key.region == region]
            document = kit_document(region, region_keys, token)
            body = json.dumps(document, separators=(",", ":")).encode()
            await session.execute(
                update(OfflineKitBuild)
                .where(OfflineKitBuild.region_code == region)
                .values(
                    document=body,
                    etag=_etag(body),
                    generation=OfflineKitBuild.generation + 1,
                    built_at=utcnow(),
                    expires_at=datetime.fromtimestamp(issued_at + self.lifetime, UTC),
                    lease_until=None,
                    entries=0,
                    build_ms=int((time.perf_counter() - started) * 1000),
                )
            )
            await session.commit()
        except Exception:  # free the lease at once (a cancelled build leaves it to lapse)
            await session.rollback()
            await session.execute(
                update(OfflineKitBuild).where(OfflineKitBuild.region_code == region).values(lease_until=None)
            )
            await session.commit()
            raise
        kit = SignedKit(_etag(body), document)
        self._held[region] = (time.monotonic(), kit)
        return kit
