"""Wire format of the service catalogue and of what a card may do where."""

from __future__ import annotations

from datetime import datetime

from app.domain.catalog.document import ApplicationType, CardForm, Domain, ProvenanceStatus
from app.domain.verification.disclosure import BusinessTypeName
from app.http.schema import WireModel
from crypto.credential import PurposeName


class ProvenanceOut(WireModel):
    """Where an entry comes from: `confirmed` names its source's id (see `GET /v1/catalog`)."""

    status: ProvenanceStatus
    source: str | None
    note: str


class ServiceOut(WireModel):
    """A service the card gives access to."""

    code: str
    name_zh: str
    name_en: str
    domain: Domain
    category: str
    application_type: ApplicationType
    # "physical" and/or "electronic": benefit payouts go to the physical card's bank account only.
    forms: list[CardForm]
    # The credential purposes through which the electronic card reaches it (none if it cannot).
    purposes: list[PurposeName]
    business_types: list[BusinessTypeName]
    provenance: ProvenanceOut


class ReachableServiceOut(ServiceOut):
    """A service the card may use here, and which of its credential purposes reach it here."""

    usable_purposes: list[PurposeName]


class CardReachOut(WireModel):
    """What a card of `card_region` may do in `region`, with which credential purposes.

    `purposes` are those a terminal of `region` accepts from a card of `card_region` (all of them
    within one province; across provinces, those a cooperation agreement covers), narrowed to a
    terminal's own. Empty `services` when the catalogue was never loaded.
    """

    region: str
    card_region: str
    catalog_version: str | None
    purposes: list[PurposeName]
    services: list[ReachableServiceOut]
    # Set for a terminal: the kind of verifier whose services are listed.
    business_type: BusinessTypeName | None = None


class SourceOut(WireModel):
    """A public source the catalogue cites."""

    id: str
    url: str
    date: str | None
    cited_for: str
    publisher: str | None = None


class CategoryOut(WireModel):
    """A group of services."""

    code: str
    # The middle part of its services' codes (HRSS-<prefix>-001).
    prefix: str
    domain: Domain
    name_zh: str
    name_en: str
    status: ProvenanceStatus
    source: str | None = None
    note: str = ""


class ApplicationTypeOut(WireModel):
    """An application type (应用类型)."""

    code: ApplicationType
    name_zh: str
    name_en: str
    source: str


class UsageGroupOut(WireModel):
    """One of the four uses of the HR & social security services."""

    code: str
    name_zh: str
    name_en: str
    application_type: ApplicationType
    source: str


class CatalogCounts(WireModel):
    """Services in force, by domain and by provenance."""

    hrss: int
    livelihood: int
    confirmed: int
    illustrative: int


class CatalogOut(WireModel):
    """The catalogue in force; `loaded` is false (and the lists empty) until one is loaded."""

    loaded: bool
    counts: CatalogCounts
    sources: list[SourceOut]
    categories: list[CategoryOut]
    application_types: list[ApplicationTypeOut]
    usage_groups: list[UsageGroupOut]
    version: str | None = None
    sha256: str | None = None
    regions_version: str | None = None
    loaded_at: datetime | None = None
