"""Wire format of the operator entitlement API."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Literal

import msgspec

from app.http.schema import WireModel


class EntitlementGrant(WireModel):
    """Grant an entitlement valid in a region (its province's parks) through valid_until (inclusive)."""

    kind: Literal["park_annual_pass"]
    region: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{5}$")]
    valid_until: date


class EntitlementOut(WireModel):
    """An entitlement of a card."""

    id: uuid.UUID
    kind: str
    region: str
    valid_from: datetime
    valid_until: datetime
    revoked_at: datetime | None
