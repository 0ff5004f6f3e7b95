"""Wire format of the operator card API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from app.http.schema import WireModel


class CardIssue(WireModel):
    """A person and the physical card issued to them."""

    region: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{5}$", examples=["510000"])]
    citizen_id: Annotated[str, msgspec.Meta(min_length=18, max_length=18, examples=["11010519491231002X"])]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    card_number: Annotated[str, msgspec.Meta(min_length=9, max_length=9, examples=["A12345678"])]
    # The person's basic medical insurance scheme (for a new person; an existing one keeps theirs).
    insurance_scheme: Literal["urban_employee", "urban_rural_resident"] = "urban_employee"


class CardSearch(WireModel):
    """Find cards by exactly one of the card number and the holder's citizen ID (the other left out).

    Both are personal data, so they travel in a request body: never in a URL, where access logs,
    proxies and browser histories keep them.
    """

    card_number: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=16, examples=["A12345678"])] | msgspec.UnsetType
    ) = msgspec.UNSET
    citizen_id: Annotated[str, msgspec.Meta(min_length=1, max_length=18)] | msgspec.UnsetType = msgspec.UNSET

    openapi_extra = {"min_properties": 1, "max_properties": 1}

    def __post_init__(self) -> None:
        """Exactly one criterion: the answer is then one person's cards or one card, never a mix."""
        if (self.card_number is msgspec.UNSET) == (self.citizen_id is msgspec.UNSET):
            raise ValueError("give exactly one of card_number and citizen_id")


class ActivationCodeOut(WireModel):
    """A one-time activation code, shown once; deliver it to the holder."""

    card_id: uuid.UUID
    ecard_id: uuid.UUID
    activation_code: str
    activation_expires_at: datetime


class CardOut(WireModel):
    """A card as an operator sees it: personal data masked."""

    card_id: uuid.UUID
    card_number: str
    region: str
    card_state: str
    ecard_id: uuid.UUID
    ecard_state: str
    holder_name: str
    citizen_id: str


class IssuedCardOut(WireModel):
    """A card just issued, with its activation code (shown once)."""

    card: CardOut
    activation_code: str
    activation_expires_at: datetime


class ECardStateChange(WireModel):
    """Move an eCard to another state, saying why."""

    state: Literal["active", "suspended", "revoked"]
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]


class CardAction(WireModel):
    """An action on a card, with the reason for the audit log."""

    reason: Reason


class CardReplacement(WireModel):
    """Issue a replacement card; the eCard moves to it and needs re-activation."""

    card_number: Annotated[str, msgspec.Meta(min_length=9, max_length=9, examples=["A12345679"])]
    reason: Reason
