"""Issuer keys in the database, and the in-process key directory built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.clock import utcnow
from app.db.models import IssuerKey, KeyState
from app.pii import PiiCipher
from crypto.keys import SigningKey, VerifyKey, private_raw

PRIVATE_KEY_FIELD = "issuer_keys.private_key"


async def create_issuer_key(session: AsyncSession, pii: PiiCipher, region_code: str) -> IssuerKey:
    """Generate a region's signing key and store it, private half encrypted (caller commits)."""
    key = SigningKey.generate()
    row = IssuerKey(
        kid=key.kid,
        region_code=region_code,
        public_key=key.public,
        private_key_encrypted=pii.encrypt_bytes(private_raw(key.private), PRIVATE_KEY_FIELD),
        state=KeyState.ACTIVE.value,
        created_at=utcnow(),
    )
    session.add(row)
    return row


@dataclass(slots=True)
class IssuerKeys:
    """Every published key by kid, and the newest active signing key of each region."""

    verify_keys: dict[bytes, VerifyKey] = field(default_factory=dict)
    signing_keys: dict[str, SigningKey] = field(default_factory=dict)


async def load_issuer_keys(session: AsyncSession, pii: PiiCipher) -> IssuerKeys:
    """Read and decrypt all issuer keys."""
    keys = IssuerKeys()
    rows = (await session.scalars(select(IssuerKey).order_by(IssuerKey.created_at))).all()
    for row in rows:
        verify_key = VerifyKey(public=row.public_key, region=row.region_code)
        keys.verify_keys[verify_key.kid] = verify_key
        if row.state == KeyState.ACTIVE.value:
            seed = pii.decrypt_bytes(row.private_key_encrypted, PRIVATE_KEY_FIELD)
            keys.signing_keys[row.region_code] = SigningKey.from_seed(seed)
    return keys
