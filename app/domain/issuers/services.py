"""Issuer keys in the database, and the in-process key directory built from them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import IssuerKey, KeyState, Region
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.issuers.key_store import SOFTWARE, SOFTWARE_KEYS, IssuerKeyStore
from app.security.pii import PiiCipher
from crypto import algorithms
from crypto.hsm import HsmConfigurationError
from crypto.keys import PrivateKey, PublicKey, SigningUnavailable
from crypto.seal import CardRefSeal

PRIVATE_KEY_FIELD = "issuer_keys.private_key"


async def create_issuer_key(
    session: AsyncSession,
    pii: PiiCipher,
    region_code: str,
    state: KeyState = KeyState.ACTIVE,
    algorithm: str = algorithms.ED25519,
    key_store: IssuerKeyStore = SOFTWARE_KEYS,
    store: str | None = None,
) -> IssuerKey:
    """Generate a region's signing key of the algorithm in the store (default: the key store's) and keep its
    row (caller commits): a software key's secret encrypted, a module key's reference and seal secret.

    A module key is generated in the token by a blocking call, so off the event loop. Should the commit
    fail, the token keeps an unused key pair labelled with its kid (the operator may delete it).
    """
    try:
        if (store or key_store.default) == SOFTWARE:
            new = key_store.generate(algorithm, region_code, store)
        else:
            new = await asyncio.to_thread(key_store.generate, algorithm, region_code, store)
    except HsmConfigurationError as exc:
        raise errors.Unavailable(f"no key was generated in the token: {exc}", code="key_store_unavailable") from None
    row = IssuerKey(
        kid=new.key.kid,
        region_code=region_code,
        public_key=new.key.public,
        algorithm=algorithm,
        private_key_encrypted=pii.encrypt_bytes(new.secret, PRIVATE_KEY_FIELD),
        key_store=new.store,
        key_token=new.token,
        key_label=new.label,
        state=state.value,
        created_at=utcnow(),
    )
    session.add(row)
    return row


@dataclass(slots=True)
class IssuerKeys:
    """Every published key by kid, and the newest active signing key of each region.

    `seals` has the card-reference seal (crypto/seal.py) of every key in `verify_keys`: the verify
    path opens with it the sealed reference of a code that key signed.
    """

    verify_keys: dict[bytes, PublicKey] = field(default_factory=dict)
    signing_keys: dict[str, PrivateKey] = field(default_factory=dict)
    seals: dict[bytes, CardRefSeal] = field(default_factory=dict)
    # Rotation state and publication time of every published key, by kid (for the trust list).
    states: dict[bytes, tuple[KeyState, datetime]] = field(default_factory=dict)
    # Regions whose active key could not be opened here (its token is not this process's), and why.
    unavailable: dict[str, str] = field(default_factory=dict)


def public_key_of(row: IssuerKey) -> PublicKey:
    """The stored key's public half, of its algorithm."""
    return algorithms.public_key(row.algorithm, row.public_key, row.region_code)


async def load_issuer_keys(
    session: AsyncSession, pii: PiiCipher, key_store: IssuerKeyStore = SOFTWARE_KEYS
) -> IssuerKeys:
    """Read and decrypt all issuer keys that are not revoked (each one's seal comes from its secret); the
    active ones become signers through the key store (software, or a reference into the token)."""
    keys = IssuerKeys()
    rows = (await session.scalars(select(IssuerKey).order_by(IssuerKey.created_at))).all()
    for row in rows:
        if row.state == KeyState.REVOKED.value:
            continue
        verify_key = public_key_of(row)
        keys.verify_keys[verify_key.kid] = verify_key
        keys.states[verify_key.kid] = (KeyState(row.state), row.created_at)
        secret = pii.decrypt_bytes(row.private_key_encrypted, PRIVATE_KEY_FIELD)
        keys.seals[verify_key.kid] = CardRefSeal.derive(secret, row.algorithm, row.region_code, verify_key.kid)
        if row.state == KeyState.ACTIVE.value:
            try:
                keys.signing_keys[row.region_code] = key_store.signing_key(row, secret)
            except SigningUnavailable as exc:
                keys.unavailable[row.region_code] = str(exc)
    return keys


async def region_keys(session: AsyncSession, region: str) -> list[IssuerKey]:
    """The region's keys, oldest first; 404 for an unknown region."""
    if await session.get(Region, region) is None:
        raise errors.NotFound(f"region {region} is not registered")
    return list(
        (
            await session.scalars(
                select(IssuerKey).where(IssuerKey.region_code == region).order_by(IssuerKey.created_at)
            )
        ).all()
    )


async def publish_key(
    session: AsyncSession,
    pii: PiiCipher,
    actor: Actor,
    region: str,
    algorithm: str = algorithms.ED25519,
    key_store: IssuerKeyStore = SOFTWARE_KEYS,
    store: str | None = None,
) -> IssuerKey:
    """Step 1 of a rotation: a new key of the algorithm, published but not signing yet (commits); one
    waiting at a time. A rotation to another algorithm, or from software into the token (`store`), is the
    same drill (codes of both keys verify meanwhile)."""
    keys = await region_keys(session, region)
    if any(key.state == KeyState.PUBLISHED.value for key in keys):
        raise errors.Conflict("a published key is already waiting to be activated", current_state="published")
    row = await create_issuer_key(session, pii, region, KeyState.PUBLISHED, algorithm, key_store, store)
    record(
        session, actor, "issuer_key.published", subject_type="issuer_key", subject_id=row.kid.hex(),
        region=region, after={"state": KeyState.PUBLISHED.value, "algorithm": algorithm, "key_store": row.key_store},
    )  # fmt: skip
    await session.commit()
    return row


async def _key(session: AsyncSession, region: str, kid: bytes) -> IssuerKey:
    row = await session.get(IssuerKey, kid)
    if row is None or row.region_code != region:
        raise errors.NotFound("no such key in this region")
    return row


async def activate_key(session: AsyncSession, actor: Actor, region: str, kid: bytes, lead: int) -> IssuerKey:
    """Step 2: the published key signs from now on, the active one retires (keeps verifying). Commits.

    Refused until the key has been published for `lead` seconds, so gates that refresh their
    keys on that cycle know it before its first credential reaches them.
    """
    row = await _key(session, region, kid)
    if row.state != KeyState.PUBLISHED.value:
        raise errors.Conflict(
            f"only a published key can be activated; this one is {row.state}", current_state=row.state
        )
    ready_at = row.created_at + timedelta(seconds=lead)
    if utcnow() < ready_at:
        raise errors.Conflict(
            f"the key was published less than {lead} s ago: gates may not know it yet; activate after "
            f"{ready_at.isoformat()}",
            current_state=row.state,
        )
    retired = await session.execute(
        update(IssuerKey)
        .where(IssuerKey.region_code == region, IssuerKey.state == KeyState.ACTIVE.value)
        .values(state=KeyState.RETIRED.value)
        .returning(IssuerKey.kid)
    )
    activated = await session.execute(
        update(IssuerKey)
        .where(IssuerKey.kid == kid, IssuerKey.state == KeyState.PUBLISHED.value)
        .values(state=KeyState.ACTIVE.value)
    )
    if activated.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise errors.Conflict("the key changed meanwhile; read it again")
    record(
        session, actor, "issuer_key.activated", subject_type="issuer_key", subject_id=kid.hex(), region=region,
        before={"state": KeyState.PUBLISHED.value},
        after={"state": KeyState.ACTIVE.value, "retired": [old.hex() for old in retired.scalars()]},
    )  # fmt: skip
    await session.commit()
    await session.refresh(row)
    return row


async def revoke_key(session: AsyncSession, actor: Actor, region: str, kid: bytes, reason: str) -> IssuerKey:
    """Withdraw a published or retired key at once (e.g. suspected compromise): credentials it signed fail."""
    row = await _key(session, region, kid)
    if row.state == KeyState.ACTIVE.value:
        raise errors.Conflict("the active key cannot be revoked: activate another one first", current_state=row.state)
    if row.state == KeyState.REVOKED.value:
        raise errors.Conflict("the key is already revoked", current_state=row.state)
    record(
        session, actor, "issuer_key.revoked", subject_type="issuer_key", subject_id=kid.hex(), region=region,
        reason=reason, before={"state": row.state}, after={"state": KeyState.REVOKED.value},
    )  # fmt: skip
    row.state = KeyState.REVOKED.value
    await session.commit()
    return row
