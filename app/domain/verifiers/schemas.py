"""Wire format of the operator verifier API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from app.schema import WireModel

BusinessTypeName = Literal["transit", "park", "library", "hospital", "hrss_office", "other"]
PurposeName = Literal["transit", "medical", "park", "library", "general"]


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


class TerminalCreate(WireModel):
    """A terminal of an organisation and the purposes it may accept."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    allowed_purposes: Annotated[list[PurposeName], msgspec.Meta(min_length=1, max_length=5)]


class TerminalUpdate(WireModel):
    """Enable or disable a terminal."""

    enabled: bool


class TerminalOut(WireModel):
    """A terminal (never its key)."""

    id: uuid.UUID
    organisation_id: uuid.UUID
    name: str
    allowed_purposes: list[str]
    enabled: bool
    created_at: datetime


class TerminalWithKey(WireModel):
    """A terminal and its API key. The key is shown this once; only its hash is stored."""

    terminal: TerminalOut
    api_key: str
