"""Wire format of `/v1/verify` and `/v1/verify/batch`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from app.domain.verification.service import MAX_BATCH
from app.http.schema import WireModel
from crypto.credential import MAX_TEXT_LENGTH

Credential = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT_LENGTH)]


class VerifyRequest(WireModel):
    """A scanned QR code's text, exactly as the scanner read it."""

    credential: Credential


class VerifyResponse(WireModel):
    """The decision. `reason` is set when rejected; `claims` holds only what the terminal's business type may see.

    `first_used_at` comes with `replayed`; `repeated` is true when this repeats an earlier
    answer to the same terminal (same verification id).
    """

    result: Literal["accepted", "rejected"]
    verification_id: str
    reason: str | None = None
    purpose: str | None = None
    claims: dict[str, str | None] | None = None
    first_used_at: datetime | None = None
    repeated: bool = False


class BatchScanItem(WireModel):
    """One queued scan: the code's text and when the gate scanned it (with its time zone)."""

    credential: Credential
    scanned_at: Annotated[datetime, msgspec.Meta(tz=True)]


class BatchVerifyRequest(WireModel):
    """Scans a gate queued while its uplink was down, oldest first (at most 500)."""

    scans: Annotated[list[BatchScanItem], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class BatchItemResult(WireModel):
    """The answer to one queued scan (same fields as `/v1/verify`), or `rate_limited`: send it again later."""

    result: Literal["accepted", "rejected", "rate_limited"]
    verification_id: str | None = None
    reason: str | None = None
    purpose: str | None = None
    claims: dict[str, str | None] | None = None
    first_used_at: datetime | None = None
    repeated: bool = False
    retry_after_ms: int | None = None


class BatchVerifyResponse(WireModel):
    """One result per scan, in the order sent, and how many were copies used elsewhere first."""

    results: list[BatchItemResult]
    double_uses: int
