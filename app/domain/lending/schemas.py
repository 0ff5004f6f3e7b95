"""Wire format of library loans and park entries."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

import msgspec

from app.domain.ledger.schemas import VerificationId
from app.http.schema import WireModel

ItemId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]


class LoanRequest(WireModel):
    """Lend an item on an accepted library verification of this library."""

    verification_id: VerificationId
    item_id: ItemId
    days: Annotated[int, msgspec.Meta(ge=1, le=90)] = 30


class ReturnRequest(WireModel):
    """Take an item back (at any library of the lending library's network)."""

    item_id: ItemId


class LoanOut(WireModel):
    """A loan."""

    loan_id: uuid.UUID
    item_id: str
    lent_at: datetime
    due_at: datetime
    lent_by: str
    returned_at: datetime | None = None
    returned_to: uuid.UUID | None = None


class ParkEntryRequest(WireModel):
    """Count an entry on an accepted park verification of this park against the card's annual pass."""

    verification_id: VerificationId


class ParkEntryOut(WireModel):
    """The counted entry."""

    entry_id: uuid.UUID
    pass_valid_until: datetime
    entries_on_pass: int
