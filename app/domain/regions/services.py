"""Registering issuing regions; each gets its first signing key at once."""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import Region
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.issuers.key_store import SOFTWARE_KEYS, IssuerKeyStore
from app.domain.issuers.services import create_issuer_key
from app.security.pii import PiiCipher
from crypto.algorithms import ED25519

REGION_CODE = re.compile(r"^[1-9][0-9]{5}$")


def check_region_code(code: str) -> str:
    """A GB/T 2260 administrative division code: six digits, not starting with 0."""
    if not REGION_CODE.fullmatch(code):
        raise errors.Invalid(f"region code {code!r} is not a 6-digit GB/T 2260 code")
    return code


async def register_region(
    session: AsyncSession,
    pii: PiiCipher,
    actor: Actor,
    code: str,
    name: str,
    algorithm: str = ED25519,
    key_store: IssuerKeyStore = SOFTWARE_KEYS,
) -> Region:
    """Create a region and its first issuer key (of the algorithm, in the key store's default place), in one
    transaction."""
    check_region_code(code)
    if await session.get(Region, code) is not None:
        raise errors.Conflict(f"region {code} is already registered")
    region = Region(code=code, name=name, created_at=utcnow())
    session.add(region)
    await session.flush()
    key = await create_issuer_key(session, pii, code, algorithm=algorithm, key_store=key_store)
    record(
        session, actor, "region.registered", subject_type="region", subject_id=code, region=code,
        after={"name": name, "kid": key.kid.hex(), "algorithm": algorithm, "key_store": key.key_store},
    )  # fmt: skip
    await session.commit()
    return region


async def list_regions(session: AsyncSession) -> list[Region]:
    """All regions by code."""
    return list((await session.scalars(select(Region).order_by(Region.code))).all())
