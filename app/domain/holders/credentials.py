"""Issuing QR credentials to a holder's device, singly or as a bundle, and rendering them."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import segno

from app.domain import errors
from app.domain.issuers.services import IssuerKeys
from app.security.tokens import HolderSession
from app.settings import Settings
from app.stores.status_mirror import MirroredStatus
from crypto.credential import (
    NONCE_LENGTH,
    Claims,
    CredentialRejected,
    Purpose,
    issue_credential,
    open_credential,
)
from crypto.keys import PrivateKey, SigningUnavailable
from crypto.seal import CardRefSeal

# Money-moving and medical-data purposes come one at a time, after the PIN step-up.
STEP_UP_PURPOSES = frozenset({Purpose.MEDICAL})


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    """One credential and its window."""

    text: str
    not_before: int
    expires_at: int
    refresh_at: int


def plan_windows(now: int, count: int, lifetime: int, refresh: int) -> list[tuple[int, int, int]]:
    """(not_before, expires_at, refresh_at) for count consecutive credentials.

    Credential i becomes valid when credential i-1 should be replaced, so a phone that shows
    each one from its not_before to its refresh_at always shows a valid code, offline too.
    """
    return [(now + i * refresh, now + i * refresh + lifetime, now + (i + 1) * refresh) for i in range(count)]


# Credentials signed in one event-loop turn (~50 µs each): a 20-credential bundle then holds the
# loop for ~0.2 ms at a time rather than 1 ms, so the scans arriving meanwhile do not wait behind it.
SIGNING_SLICE = 4


def _sign_all(key: PrivateKey, seal: CardRefSeal, claims: list[Claims]) -> list[str]:
    return [issue_credential(key, item, seal) for item in claims]


async def _sign(key: PrivateKey, seal: CardRefSeal, claims: list[Claims]) -> list[str]:
    """The credentials' texts: in-process keys on the loop, in slices; a key in a module (each signature a
    blocking PKCS#11 call) in one worker thread for the whole bundle, so the loop serves scans meanwhile."""
    if key.blocking:
        return await asyncio.to_thread(_sign_all, key, seal, claims)
    texts: list[str] = []
    for start in range(0, len(claims), SIGNING_SLICE):
        if start:
            await asyncio.sleep(0)
        texts.extend(_sign_all(key, seal, claims[start : start + SIGNING_SLICE]))
    return texts


async def issue_credentials(
    holder: HolderSession,
    card_status: str | None,
    signing_keys: Mapping[str, PrivateKey],
    seals: Mapping[bytes, CardRefSeal],
    settings: Settings,
    purpose: Purpose,
    count: int,
    stepped_up: bool,
    store_epoch_ms: int = 0,
) -> tuple[bytes, list[IssuedCredential]]:
    """Sign count credentials for the holder's card (whose mirrored status is card_status); (kid, credentials).

    The card reference is sealed with the key's seal from `seals` (the issuer's, by kid), so the signer
    is asked for signatures only, never for its secret. A signer that cannot sign now (its PKCS#11 token
    failed) is a 503 `signing_unavailable`; nothing was issued.

    Windows start once the store's epoch lies behind them, clock skew included: a verifier refuses a
    credential that could have been shown before the epoch (the store may have lost its use since),
    so one issued just after a store reset starts a few seconds ahead instead.
    """
    if count < 1 or count > settings.credential_bundle_max:
        raise errors.Invalid(f"count must be between 1 and {settings.credential_bundle_max}")
    if purpose in STEP_UP_PURPOSES:
        if count != 1:
            raise errors.Invalid(f"{purpose.label} credentials are issued one at a time")
        if not stepped_up:
            raise errors.Forbidden(
                f"{purpose.label} credentials need a fresh PIN step-up (step_up_token)", code="step_up_required"
            )
    if card_status != MirroredStatus.ACTIVE.value:
        raise errors.Conflict("the eCard is not active; no credentials can be issued")
    key = signing_keys.get(holder.region)
    seal = seals.get(key.kid) if key is not None else None
    if key is None or seal is None:
        raise errors.Unavailable(f"no signing key is loaded for region {holder.region}")
    now = max(int(time.time()), -(-store_epoch_ms // 1000) + settings.clock_skew)
    windows = plan_windows(now, count, settings.credential_lifetime, settings.credential_refresh)
    claims = [
        Claims(
            card_ref=holder.card_ref,
            nonce=os.urandom(NONCE_LENGTH),
            region=holder.region,
            purpose=purpose,
            not_before=not_before,
            expires_at=expires_at,
        )
        for not_before, expires_at, _refresh_at in windows
    ]
    try:
        texts = await _sign(key, seal, claims)
    except SigningUnavailable as exc:
        raise errors.Unavailable(
            f"the issuer key of region {holder.region} cannot sign just now: {exc}", code="signing_unavailable"
        ) from None
    issued = [
        IssuedCredential(text, not_before, expires_at, refresh_at)
        for text, (not_before, expires_at, refresh_at) in zip(texts, windows, strict=True)
    ]
    return key.kid, issued


def render_qr(holder: HolderSession, keys: IssuerKeys, text: str, image_format: str, scale: int) -> bytes:
    """PNG or SVG of one of the holder's own credentials (error level M, 4-module quiet zone).

    Only credentials we issued to this card are rendered: this is not a general QR service.
    """
    try:
        verified = open_credential(text, keys.verify_keys, keys.seals)
    except CredentialRejected as exc:
        raise errors.Invalid(f"not a credential of this service: {exc.detail}") from None
    if verified.claims.card_ref != holder.card_ref:
        raise errors.Forbidden("the credential belongs to another card")
    qr = segno.make(text, error="m", micro=False, boost_error=False)
    out = io.BytesIO()
    if image_format == "svg":
        qr.save(out, kind="svg", scale=scale, border=4, xmldecl=False)
    else:
        qr.save(out, kind="png", scale=scale, border=4)
    return out.getvalue()
