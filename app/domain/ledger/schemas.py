"""Wire format of fares, medical settlements, subsidies, statements and reconciliation."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any

import msgspec

from app.http.schema import WireModel

VerificationId = Annotated[str, msgspec.Meta(pattern=r"^vf_[A-Za-z0-9_-]{16}$")]
# Up to 100,000 CNY in fen: far above any fare or bill a terminal should send in one piece.
Fen = Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]


class FareRequest(WireModel):
    """Charge a transit fare for an accepted transit verification of this terminal's organisation.

    A flat fare needs the one verification; a distance fare is charged at the exit on the exit
    verification with the trip's `entry_verification_id` (each entry pays for one trip).
    """

    verification_id: VerificationId
    amount_fen: Fen
    entry_verification_id: VerificationId | None = None
    # Free text the operator's systems want back (line, station…); no personal data.
    route: Annotated[str, msgspec.Meta(max_length=100)] = ""


class FareOut(WireModel):
    """The charged fare."""

    transaction_id: uuid.UUID
    verification_id: str
    amount_fen: int
    created_at: datetime


class SettlementRequest(WireModel):
    """Settle a medical bill on an accepted medical verification (the holder passed a PIN step-up)."""

    verification_id: VerificationId
    total_fen: Fen


class SettlementOut(WireModel):
    """Who pays what: the insurance fund its share by scheme and region, the holder the rest."""

    transaction_id: uuid.UUID
    verification_id: str
    total_fen: int
    insurance_fen: int
    holder_fen: int
    share_bp: int
    cross_region: bool
    created_at: datetime


class Payout(WireModel):
    """One card's subsidy."""

    card_id: uuid.UUID
    amount_fen: Fen


class SubsidyBatch(WireModel):
    """A batch of subsidy payouts from a region's fund, all or nothing."""

    region: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{5}$")]
    reason: Annotated[str, msgspec.Meta(min_length=3, max_length=200)]
    payouts: Annotated[list[Payout], msgspec.Meta(min_length=1, max_length=1000)]


class SubsidyBatchOut(WireModel):
    """The paid batch."""

    batch_id: str
    region: str
    payouts: int
    total_fen: int


class MovementOut(WireModel):
    """One movement on the card's account: + received, - paid."""

    transaction_id: uuid.UUID
    kind: str
    amount_fen: int
    at: datetime
    organisation: str | None
    details: dict[str, Any]


class StatementOut(WireModel):
    """The card account's balance (fen) and its latest movements."""

    balance_fen: int
    movements: list[MovementOut]


class ReconciliationOut(WireModel):
    """An organisation's day in the ledger: sums by movement kind and account kind; `total_fen` is 0."""

    organisation_id: uuid.UUID
    day: date
    transactions: int
    by_kind: dict[str, dict[str, int]]
    total_fen: int
    balanced: bool
