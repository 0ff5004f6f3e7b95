"""Activation of an eCard on a device, and rotating refresh tokens."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import ActivationCode, Card, CardState, Device, ECard, ECardState, Person, RefreshToken
from app.domain import errors
from app.domain.cards.mirroring import MirrorOutbox, stage_card
from app.domain.cards.services import activation_code_hashes, normalise_activation_code
from app.security.pii import NATIONAL, PiiCipher
from app.security.tokens import HolderSession, SessionTokens
from app.settings import Settings
from crypto.dpop import DpopRefusal, Proof, thumbprint
from crypto.keys import b64url

REFRESH_TOKEN_PREFIX = "rt_"
ACTIVATION_FAILED = "card number or activation code is wrong, expired or used up"


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """Tokens handed to a holder's device."""

    access_token: str
    refresh_token: str
    expires_in: int
    ecard_id: uuid.UUID
    device_id: uuid.UUID


def _refresh_token_hashes(token: str, settings: Settings) -> tuple[bytes, bytes]:
    """The token's hash under the profile (SM3 national, SHA-256 international) to store, then the other
    profile's, which finds a token issued before a profile switch until it expires. The token is 256 bits
    of randomness: no slow hash is needed."""
    sm3, sha256 = hashlib.new("sm3", token.encode()).digest(), hashlib.sha256(token.encode()).digest()
    return (sm3, sha256) if settings.crypto_profile == NATIONAL else (sha256, sm3)


async def _start_session(
    session: AsyncSession,
    tokens: SessionTokens,
    settings: Settings,
    ecard: ECard,
    device: Device,
    family_id: uuid.UUID,
) -> IssuedSession:
    """Add a refresh token to family and sign an access token (caller commits)."""
    refresh = REFRESH_TOKEN_PREFIX + b64url(os.urandom(32))
    now = utcnow()
    session.add(
        RefreshToken(
            family_id=family_id,
            device_id=device.id,
            token_hash=_refresh_token_hashes(refresh, settings)[0],
            expires_at=now + timedelta(seconds=settings.refresh_token_ttl),
            created_at=now,
        )
    )
    access = tokens.issue_holder(
        HolderSession(
            ecard_id=ecard.id,
            device_id=device.id,
            card_ref=ecard.card_ref,
            region=ecard.region_code,
            # Bound to the device's key: every call with it needs a DPoP proof by that key (RFC 9449).
            jkt=thumbprint(device.public_key),
        ),
        settings.access_token_ttl,
    )
    return IssuedSession(access, refresh, settings.access_token_ttl, ecard.id, device.id)


async def activate(
    session: AsyncSession,
    pii: PiiCipher,
    tokens: SessionTokens,
    outbox: MirrorOutbox,
    settings: Settings,
    *,
    card_number: str,
    activation_code: str,
    device_public_key: bytes,
    device_proof: Proof,
    device_name: str,
) -> IssuedSession:
    """Bind a device to the eCard of card_number with a one-time code, and open a session.

    `device_proof` (the request's DPoP proof) must be signed by `device_public_key`: the device holds
    the key it registers. Refused before the code is looked at, so it costs the code no try.
    An unknown card, a wrong code, an expired or used-up code all get the same answer.
    """
    if device_proof.public_key != device_public_key:
        raise errors.DeviceUnproven(
            "the DPoP proof must be signed by the device_public_key being registered",
            reason=DpopRefusal.WRONG_KEY.value,
        )
    failed = errors.Unauthenticated(ACTIVATION_FAILED, code="activation_failed")
    row = (
        await session.execute(
            select(Card, ECard).join(ECard, ECard.card_id == Card.id).where(Card.card_number == card_number)
        )
    ).first()
    if row is None:
        raise failed
    card, ecard = row
    code_row = await session.scalar(
        select(ActivationCode)
        .where(ActivationCode.ecard_id == ecard.id, ActivationCode.used_at.is_(None))
        .order_by(ActivationCode.created_at.desc())
        .limit(1)
    )
    now = utcnow()
    if code_row is None or code_row.expires_at <= now:
        raise failed
    # Take one of the code's tries before comparing, atomically and committed, so guesses sent in
    # parallel cannot all be compared against a counter none of them has raised yet.
    reserved = await session.execute(
        update(ActivationCode)
        .where(
            ActivationCode.id == code_row.id,
            ActivationCode.used_at.is_(None),
            ActivationCode.attempts < settings.activation_max_attempts,
        )
        .values(attempts=ActivationCode.attempts + 1)
    )
    await session.commit()
    if reserved.rowcount != 1:  # type: ignore[attr-defined]
        raise failed
    code = normalise_activation_code(activation_code)
    if not code or code_row.code_hash not in activation_code_hashes(pii, ecard.id, code):
        raise failed
    if ecard.state not in (ECardState.PENDING_ACTIVATION, ECardState.ACTIVE):
        raise errors.Conflict(f"the eCard is {ecard.state}; ask the card office", current_state=ecard.state)
    if card.state not in (CardState.ISSUED, CardState.ACTIVE):
        raise errors.Conflict(f"the card is {card.state}; ask the card office", current_state=card.state)
    # Consume the code exactly once, even when two devices race with it.
    consumed = await session.execute(
        update(ActivationCode)
        .where(ActivationCode.id == code_row.id, ActivationCode.used_at.is_(None))
        .values(used_at=now)
    )
    if consumed.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()
        raise failed
    ecard.state = ECardState.ACTIVE
    ecard.activated_at = now
    ecard.updated_at = now
    if card.state == CardState.ISSUED:
        card.state = CardState.ACTIVE
    device = Device(ecard_id=ecard.id, public_key=device_public_key, name=device_name, created_at=now)
    session.add(device)
    await session.flush()
    issued = await _start_session(session, tokens, settings, ecard, device, uuid.uuid4())
    await stage_card(session, ecard)
    await session.commit()
    # Profile and status together: an active card never lacks the record hospitals are answered from.
    # Not mirrored yet (the store did not answer), the card is active within a second of its return.
    await outbox.publish([ecard.id])
    return issued


async def refresh_session(
    session: AsyncSession, tokens: SessionTokens, settings: Settings, refresh_token: str, device_proof: Proof
) -> IssuedSession:
    """Trade a refresh token for a new pair. Presenting a token twice revokes its whole family.

    The request's DPoP proof must be signed by the key of the device the token was issued to: a copied
    refresh token without that key is refused before anything is rotated or revoked.
    """
    invalid = errors.Unauthenticated("refresh token is invalid, expired or revoked", code="invalid_refresh_token")
    # Either hash: one row at most matches (the other would be a collision of SM3 and SHA-256).
    stored = await session.scalar(
        select(RefreshToken).where(RefreshToken.token_hash.in_(_refresh_token_hashes(refresh_token, settings)))
    )
    if stored is None or stored.revoked_at is not None:
        raise invalid
    # The device first (one query, as it always took): its key decides before anything is rotated or revoked.
    row = (
        await session.execute(
            select(Device, ECard).join(ECard, ECard.id == Device.ecard_id).where(Device.id == stored.device_id)
        )
    ).first()
    if row is None:
        raise invalid
    device, ecard = row
    if device.public_key != device_proof.public_key:
        raise errors.DeviceUnproven(
            "the DPoP proof must be signed by the key of the device this refresh token was issued to",
            reason=DpopRefusal.WRONG_KEY.value,
        )
    now = utcnow()
    rotated = await session.execute(
        update(RefreshToken).where(RefreshToken.id == stored.id, RefreshToken.used_at.is_(None)).values(used_at=now)
    )
    if rotated.rowcount != 1:  # type: ignore[attr-defined]
        # Reuse of a rotated token: someone holds a copy (and the device's key). End every session of the family.
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == stored.family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        await session.commit()
        raise errors.Unauthenticated(
            "refresh token was already used; all sessions of this device sign-in are revoked",
            code="refresh_token_reused",
        )
    if stored.expires_at <= now or device.revoked_at is not None or ecard.state == ECardState.REVOKED:
        await session.rollback()
        raise invalid
    issued = await _start_session(session, tokens, settings, ecard, device, stored.family_id)
    await session.commit()
    return issued


async def own_card(session: AsyncSession, holder: HolderSession) -> tuple[Card, ECard, Person]:
    """The holder's eCard with its current physical card and person (the card may have been replaced)."""
    row = (
        await session.execute(
            select(Card, ECard, Person)
            .join(ECard, ECard.card_id == Card.id)
            .join(Person, Person.id == Card.person_id)
            .where(ECard.id == holder.ecard_id)
        )
    ).first()
    if row is None:
        raise errors.DeviceUnproven("the card of this session no longer exists", refused="token", code="unauthorized")
    return row[0], row[1], row[2]
