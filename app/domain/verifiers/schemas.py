"""Wire format of the operator verifier API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from app.domain.verification.disclosure import BusinessTypeName
from app.http.schema import WireModel
from crypto.credential import PurposeName


class OrganisationCreate(WireModel):
    """A verifier organisation in a region."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    business_type: BusinessTypeName
    region: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{5}$")]


class OrganisationOut(WireModel):
    """A verifier organisation."""

    id: uuid.UUID
    name: str
    business_type: str
    region: str
    created_at: datetime
    enabled: bool


class OrganisationUpdate(WireModel):
    """Enable or disable an organisation: a disabled one's terminals are all refused."""

    enabled: bool


RatePerMinute = Annotated[int, msgspec.Meta(ge=1, le=60_000)]
RateBurst = Annotated[int, msgspec.Meta(ge=1, le=1_000)]
Purposes = Annotated[list[PurposeName], msgspec.Meta(min_length=1, max_length=5)]


class TerminalCreate(WireModel):
    """A terminal of an organisation and the purposes it may accept."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    allowed_purposes: Purposes
    # Verifications per minute on average, and how many may arrive at once (a gate's rush).
    rate_per_minute: RatePerMinute = 120
    rate_burst: RateBurst = 30


class TerminalUpdate(WireModel):
    """Change a terminal: enable or disable it, its purposes or its rate. Omitted fields stay."""

    enabled: bool | None = None
    allowed_purposes: Purposes | None = None
    rate_per_minute: RatePerMinute | None = None
    rate_burst: RateBurst | None = None


class SigningKeyIn(WireModel):
    """A terminal's public key, unpadded base64url: from now on it must sign its requests with it.

    Ed25519 (32 bytes) or, for the national profile, SM2 with SM3 and the default signer ID (GM/T 0009):
    the 65-byte uncompressed point 04 ‖ x ‖ y. `algorithm` may be left out (the key's length says which);
    given, it must agree.
    """

    public_key: Annotated[str, msgspec.Meta(pattern=r"^(?:[A-Za-z0-9_-]{43}|[A-Za-z0-9_-]{87})$")]
    algorithm: Literal["Ed25519", "SM2"] | None = None


class TerminalCounts(WireModel):
    """A terminal's verifications in the period, by result."""

    terminal_id: uuid.UUID
    name: str
    accepted: int
    rejected: int
    by_result: dict[str, int]


class VerificationCounts(WireModel):
    """Per-terminal verification counts of an organisation in [since, until)."""

    organisation_id: uuid.UUID
    since: datetime
    until: datetime
    terminals: list[TerminalCounts]


class TerminalOut(WireModel):
    """A terminal (never its key)."""

    id: uuid.UUID
    organisation_id: uuid.UUID
    name: str
    allowed_purposes: list[str]
    enabled: bool
    created_at: datetime
    rate_per_minute: int
    rate_burst: int
    # True once the terminal registered a key: it must sign its requests, API keys are refused.
    signs_requests: bool
    # Until when the key replaced by the last rotation still works, if it does.
    previous_key_expires_at: datetime | None


class TerminalWithKey(WireModel):
    """A terminal and its API key. The key is shown this once; only its hash is stored."""

    terminal: TerminalOut
    api_key: str
