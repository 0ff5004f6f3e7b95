"""Wire format of the holder API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from app.http.schema import WireModel
from crypto.credential import MAX_TEXT_LENGTH, PurposeName


class ActivationRequest(WireModel):
    """Bind this device to the eCard of a physical card, with the one-time code from the card office.

    Sent with a `DPoP` proof signed by `device_public_key`'s private key (RFC 9449).
    """

    card_number: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    activation_code: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    # Raw 32-byte Ed25519 public key, unpadded base64url (43 characters).
    device_public_key: Annotated[str, msgspec.Meta(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_-]{43}$")]
    device_name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "phone"


class RefreshRequest(WireModel):
    """Trade a refresh token for a new access and refresh token, with a `DPoP` proof by the device's key."""

    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class SessionResponse(WireModel):
    """Tokens for a holder's device, bound to its key (`cnf.jkt`): send `Authorization: DPoP <access_token>`
    with a `DPoP` proof by that key. The refresh token works once, with a proof by the same key."""

    access_token: str
    refresh_token: str
    token_type: Literal["DPoP"]
    expires_in: int
    ecard_id: uuid.UUID
    device_id: uuid.UUID


class CredentialRequest(WireModel):
    """Ask for credentials for one purpose; up to the bundle limit for consecutive windows.

    Medical credentials come one at a time and need `step_up_token` from a PIN verification.
    """

    purpose: PurposeName
    count: Annotated[int, msgspec.Meta(ge=1, le=100)] = 1
    step_up_token: Annotated[str, msgspec.Meta(max_length=2048)] | None = None


class CredentialOut(WireModel):
    """One QR credential: show it from `not_before` until `refresh_at`; it is void after `expires_at`."""

    credential: str
    not_before: datetime
    expires_at: datetime
    refresh_at: datetime


class CredentialBundle(WireModel):
    """Credentials with consecutive validity windows, signed by key `kid`."""

    kid: str
    purpose: PurposeName
    server_time: datetime
    credentials: list[CredentialOut]


class QrRequest(WireModel):
    """Render one of your credentials as a QR image."""

    credential: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]
    format: Literal["png", "svg"] = "svg"
    scale: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4


Pin = Annotated[str, msgspec.Meta(min_length=1, max_length=16)]


class PinChange(WireModel):
    """Set the PIN (6 digits), or change it: then `current_pin` is needed."""

    pin: Pin
    current_pin: Pin | None = None


class PinVerification(WireModel):
    """Enter the PIN to step up."""

    pin: Pin


class StepUp(WireModel):
    """Proof of a fresh PIN entry on this device, for medical credentials and undoing a loss."""

    step_up_token: str
    expires_in: int


class LossReport(WireModel):
    """Report the physical card lost (or stolen); the eCard stops working at once."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)] = "reported lost by the holder"


class LossUndo(WireModel):
    """The card was found. Needs a step-up when a PIN is set."""

    step_up_token: Annotated[str, msgspec.Meta(max_length=2048)] | None = None


class HolderCardOut(WireModel):
    """The holder's own card, personal data masked."""

    ecard_id: uuid.UUID
    ecard_state: str
    card_number: str
    card_state: str
    region: str
    holder_name: str
    citizen_id: str
    pin_set: bool
    pin_locked: bool


class DeviceOut(WireModel):
    """A device bound to the card."""

    id: uuid.UUID
    name: str
    created_at: datetime
    current: bool


class DeviceRename(WireModel):
    """A new name for a device."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class UsageOut(WireModel):
    """One use of the card: when, where (organisation and kind), for what, and the answer."""

    verification_id: str
    occurred_at: datetime
    organisation: str
    business_type: str
    purpose: str | None
    result: str
    # For scans a gate uploaded later: when it scanned the code.
    scanned_at: datetime | None = None
