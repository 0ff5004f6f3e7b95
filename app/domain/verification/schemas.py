"""Wire format of `/v1/verify`."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from app.schema import WireModel
from crypto.credential import MAX_TEXT_LENGTH


class VerifyRequest(WireModel):
    """A scanned QR code's text, exactly as the scanner read it."""

    credential: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]


class VerifyResponse(WireModel):
    """The decision. `reason` is set when rejected; `claims` holds only what the terminal's business type may see."""

    result: Literal["accepted", "rejected"]
    verification_id: str
    reason: str | None = None
    purpose: str | None = None
    claims: dict[str, str] | None = None
