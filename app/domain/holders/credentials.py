"""Issuing QR credentials to a holder's device, singly or as a bundle, and rendering them."""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass

import segno

from app import problems
from app.settings import Settings
from app.stores.status_mirror import MirroredStatus, StatusMirror
from app.tokens import HolderSession
from crypto.credential import (
    NONCE_LENGTH,
    Claims,
    CredentialRejected,
    Purpose,
    issue_credential,
    open_credential,
)
from crypto.keys import SigningKey, VerifyKey

# Money-moving and medical-data purposes come one at a time (the PIN step-up comes with card life).
SINGLE_ONLY = frozenset({Purpose.MEDICAL})


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


async def issue_credentials(
    holder: HolderSession,
    mirror: StatusMirror,
    signing_keys: dict[str, SigningKey],
    settings: Settings,
    purpose: Purpose,
    count: int,
) -> tuple[bytes, list[IssuedCredential]]:
    """Sign count credentials for the holder's card; (kid, credentials)."""
    if count < 1 or count > settings.credential_bundle_max:
        raise problems.bad_request(f"count must be between 1 and {settings.credential_bundle_max}")
    if purpose in SINGLE_ONLY and count != 1:
        raise problems.bad_request(f"{purpose.label} credentials are issued one at a time")
    status = await mirror.get_status(holder.card_ref)
    if status != MirroredStatus.ACTIVE.value:
        raise problems.conflict("the eCard is not active; no credentials can be issued")
    key = signing_keys.get(holder.region)
    if key is None:
        raise problems.unavailable(f"no signing key is loaded for region {holder.region}")
    now = int(time.time())
    issued = []
    for not_before, expires_at, refresh_at in plan_windows(
        now, count, settings.credential_lifetime, settings.credential_refresh
    ):
        claims = Claims(
            card_ref=holder.card_ref,
            nonce=os.urandom(NONCE_LENGTH),
            region=holder.region,
            purpose=purpose,
            not_before=not_before,
            expires_at=expires_at,
        )
        issued.append(IssuedCredential(issue_credential(key, claims), not_before, expires_at, refresh_at))
    return key.kid, issued


def render_qr(
    holder: HolderSession, verify_keys: dict[bytes, VerifyKey], text: str, image_format: str, scale: int
) -> bytes:
    """PNG or SVG of one of the holder's own credentials (error level M, 4-module quiet zone).

    Only credentials we issued to this card are rendered: this is not a general QR service.
    """
    try:
        verified = open_credential(text, verify_keys)
    except CredentialRejected as exc:
        raise problems.bad_request(f"not a credential of this service: {exc.detail}") from None
    if verified.claims.card_ref != holder.card_ref:
        raise problems.forbidden("the credential belongs to another card")
    qr = segno.make(text, error="m", micro=False, boost_error=False)
    out = io.BytesIO()
    if image_format == "svg":
        qr.save(out, kind="svg", scale=scale, border=4, xmldecl=False)
    else:
        qr.save(out, kind="png", scale=scale, border=4)
    return out.getvalue()
