"""The catalogue files under app/data/catalog/: their shape, the rules they must keep, and reading them.

Two files, each with its own version: `services.json` (the services, their sources, categories,
application types and usage groups) and `regions.json` (which services each region offers).
Nothing here touches the database; `services.load_catalog` stores what this module accepts.

The rules, from what public reporting confirms (../shared/data/README.md): exactly 95 HR & social
security services; their four uses (identity credential, contribution payment, work-injury
settlement, subsidies and benefits paid to the card) each present; benefit payouts go to the
physical card's bank account only; an entry marked confirmed names the source it comes from.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from app.domain.verification.disclosure import BusinessTypeName
from crypto.credential import PurposeName

HRSS_TOTAL = 95

Domain = Literal["hrss", "livelihood"]
ApplicationType = Literal[
    "identity_credential",
    "contribution_payment",
    "benefit_payout",
    "medical_settlement",
    "information_record",
    "self_service_query",
    "financial_payment",
]
CardForm = Literal["physical", "electronic"]
ProvenanceStatus = Literal["confirmed", "illustrative"]
# The credential purposes (crypto.credential.Purpose labels) and verifier business types
# (app.domain.verification.disclosure.BusinessType); a unit test keeps them equal.

DOMAIN_PREFIXES: dict[str, str] = {"hrss": "HRSS", "livelihood": "LIVE"}
# The four uses of the 95 services (xinhua-2024-10) and the application type each stands for.
USAGE_GROUPS: dict[str, str] = {
    "identity_credential": "identity_credential",
    "contribution_payment": "contribution_payment",
    "work_injury_settlement": "medical_settlement",
    "benefits_to_card": "benefit_payout",
}
BENEFIT_PAYOUT_FORMS = ("physical",)
ALL_REGIONS = "*"

Version = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")]
ServiceCode = Annotated[str, msgspec.Meta(pattern=r"^(HRSS|LIVE)-[A-Z]{2,4}-[0-9]{3}$")]
Identifier = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=500)]

CODE_PARTS = re.compile(r"^(?P<domain>[A-Z]+)-(?P<prefix>[A-Z]+)-[0-9]{3}$")
MAX_REPORTED = 10


class CatalogFileError(ValueError):
    """A catalogue file is unreadable or breaks a rule; the message lists what is wrong."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    """A part of a catalogue file: unknown fields are an error, so a typo is not ignored."""


class Source(_Strict):
    """A public source entries cite by id."""

    id: Identifier
    url: Text
    date: str | None
    cited_for: Text
    publisher: str | None = None


class ApplicationTypeInfo(_Strict):
    """One of the application types (应用类型) the catalogue uses."""

    code: ApplicationType
    name_zh: Text
    name_en: Text
    source: Identifier


class UsageGroup(_Strict):
    """One of the four uses of the HR & social security services."""

    code: Identifier
    name_zh: Text
    name_en: Text
    application_type: ApplicationType
    source: Identifier


class Category(_Strict):
    """A group of services; `prefix` is the middle part of its services' codes."""

    code: Identifier
    prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2,4}$")]
    domain: Domain
    name_zh: Text
    name_en: Text
    status: ProvenanceStatus
    source: Identifier | None = None
    note: str = ""


class Provenance(_Strict):
    """Where an entry comes from: confirmed (with its source's id) or illustrative (with why)."""

    status: ProvenanceStatus
    source: Identifier | None
    note: Text


class CatalogEntry(_Strict):
    """One service the card gives access to."""

    code: ServiceCode
    name_zh: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    name_en: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    domain: Domain
    category: Identifier
    application_type: ApplicationType
    forms: list[CardForm]
    # The credential purposes through which the electronic card reaches it (none if it cannot).
    purposes: list[PurposeName]
    business_types: list[BusinessTypeName]
    provenance: Provenance


class CatalogDocument(_Strict):
    """The content of services.json."""

    version: Version
    title: Text
    note: str
    sources: list[Source]
    application_types: list[ApplicationTypeInfo]
    usage_groups: list[UsageGroup]
    categories: list[Category]
    services: list[CatalogEntry]


class RegionEntry(_Strict):
    """The services one region offers (or every region, for '*')."""

    region: Annotated[str, msgspec.Meta(pattern=r"^(\*|[1-9][0-9]{5})$")]
    name: Text
    include: list[str]
    provenance: Provenance
    exclude: list[str] = []


class RegionsDocument(_Strict):
    """The content of regions.json."""

    version: Version
    note: str
    regions: list[RegionEntry]


@dataclass(frozen=True, slots=True)
class Catalog:
    """A checked catalogue file and the SHA-256 of its bytes."""

    document: CatalogDocument
    sha256: str

    @property
    def version(self) -> str:
        """The file's version."""
        return self.document.version

    @property
    def services(self) -> list[CatalogEntry]:
        """Every entry, in file order."""
        return self.document.services


@dataclass(frozen=True, slots=True)
class RegionAvailability:
    """A checked regions file resolved against a catalogue: region ('*' = every region) → service codes."""

    version: str
    sha256: str
    services_by_region: dict[str, frozenset[str]]

    def pairs(self) -> set[tuple[str, str]]:
        """Every (region, service code) the file makes available."""
        return {(region, code) for region, codes in self.services_by_region.items() for code in codes}


def _duplicates(values: Sequence[str]) -> list[str]:
    return sorted(value for value, count in Counter(values).items() if count > 1)


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise CatalogFileError(f"{what}: " + "; ".join(problems[:MAX_REPORTED]) + more)


def _entry_problems(entry: CatalogEntry, categories: dict[str, Category], sources: set[str]) -> list[str]:
    problems: list[str] = []
    code = entry.code
    category = categories.get(entry.category)
    if category is None:
        problems.append(f"{code}: unknown category {entry.category!r}")
    elif category.domain != entry.domain:
        problems.append(f"{code}: category {category.code!r} belongs to domain {category.domain!r}")
    parts = CODE_PARTS.match(code)
    if parts is not None and parts["domain"] != DOMAIN_PREFIXES[entry.domain]:
        problems.append(f"{code}: a {entry.domain} code starts with {DOMAIN_PREFIXES[entry.domain]}-")
    if parts is not None and category is not None and parts["prefix"] != category.prefix:
        problems.append(
            f"{code}: codes of category {category.code!r} read {DOMAIN_PREFIXES[entry.domain]}-{category.prefix}-NNN"
        )
    for field, values in (
        ("forms", entry.forms),
        ("purposes", entry.purposes),
        ("business_types", entry.business_types),
    ):
        if len(set(values)) != len(values):
            problems.append(f"{code}: {field} repeat a value")
    if not entry.forms:
        problems.append(f"{code}: needs at least one form (physical, electronic)")
    if not entry.business_types:
        problems.append(f"{code}: needs at least one business type")
    if entry.application_type == "benefit_payout" and tuple(entry.forms) != BENEFIT_PAYOUT_FORMS:
        problems.append(
            f"{code}: benefit payouts go to the physical card's bank account only (forms must be ['physical'])"
        )
    electronic = "electronic" in entry.forms
    if electronic and not entry.purposes:
        problems.append(f"{code}: usable with the electronic card, so it needs the credential purposes that reach it")
    if not electronic and entry.purposes:
        problems.append(f"{code}: credentials are the electronic card; a physical-only service has no purposes")
    provenance = entry.provenance
    if provenance.status == "confirmed" and provenance.source is None:
        problems.append(f"{code}: a confirmed entry names its source")
    if provenance.source is not None and provenance.source not in sources:
        problems.append(f"{code}: unknown source {provenance.source!r}")
    return problems


def check_catalog(document: CatalogDocument) -> None:
    """Raise CatalogFileError listing every rule the document breaks."""
    problems: list[str] = []
    sources = {source.id for source in document.sources}
    categories = {category.code: category for category in document.categories}
    named: tuple[tuple[str, Sequence[str]], ...] = (
        ("source ids", [source.id for source in document.sources]),
        ("category codes", [category.code for category in document.categories]),
        ("category prefixes", [f"{category.domain}:{category.prefix}" for category in document.categories]),
        ("service codes", [entry.code for entry in document.services]),
        ("service names", [f"{entry.domain}:{entry.name_zh}" for entry in document.services]),
        ("application types", [info.code for info in document.application_types]),
        ("usage groups", [group.code for group in document.usage_groups]),
    )
    for what, values in named:
        if repeated := _duplicates(values):
            problems.append(f"repeated {what}: {', '.join(repeated)}")
    cited = [info.source for info in document.application_types] + [group.source for group in document.usage_groups]
    cited += [category.source for category in document.categories if category.source is not None]
    if unknown := sorted(set(cited) - sources):
        problems.append(f"unknown sources cited: {', '.join(unknown)}")
    for entry in document.services:
        problems.extend(_entry_problems(entry, categories, sources))

    hrss = [entry for entry in document.services if entry.domain == "hrss"]
    if len(hrss) != HRSS_TOTAL:
        problems.append(
            f"the card gives access to {HRSS_TOTAL} HR & social security services; the file lists {len(hrss)}"
        )
    groups = {group.code: group.application_type for group in document.usage_groups}
    if groups != USAGE_GROUPS:
        problems.append(f"usage groups must be exactly {USAGE_GROUPS} (code: application type)")
    hrss_types = {entry.application_type for entry in hrss}
    for group, application_type in USAGE_GROUPS.items():
        if application_type not in hrss_types:
            problems.append(f"usage group {group!r} has no HR & social security service of type {application_type!r}")
    _raise_if(problems, "the catalogue breaks its rules")


def parse_catalog(raw: bytes) -> Catalog:
    """A catalogue from the bytes of services.json, checked."""
    try:
        document = msgspec.json.decode(raw, type=CatalogDocument)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
        raise CatalogFileError(f"the catalogue is malformed: {exc}") from None
    check_catalog(document)
    return Catalog(document, hashlib.sha256(raw).hexdigest())


def _select(selector: str, catalog: CatalogDocument) -> frozenset[str] | None:
    """The service codes a selector names ('*', 'domain:…', 'category:…' or a code); None if it names nothing known."""
    entries = catalog.services
    if selector == "*":
        return frozenset(entry.code for entry in entries)
    kind, _, value = selector.partition(":")
    if kind == "domain" and value in DOMAIN_PREFIXES:
        return frozenset(entry.code for entry in entries if entry.domain == value)
    if kind == "category" and any(category.code == value for category in catalog.categories):
        return frozenset(entry.code for entry in entries if entry.category == value)
    if any(entry.code == selector for entry in entries):
        return frozenset({selector})
    return None


def resolve_regions(document: RegionsDocument, catalog: Catalog, raw_sha256: str) -> RegionAvailability:
    """Check a regions document against a catalogue and expand its shorthands."""
    problems: list[str] = []
    sources = {source.id for source in catalog.document.sources}
    if repeated := _duplicates([entry.region for entry in document.regions]):
        problems.append(f"regions listed twice: {', '.join(repeated)}")
    services_by_region: dict[str, frozenset[str]] = {}
    for entry in document.regions:
        chosen: dict[str, set[str]] = {"include": set(), "exclude": set()}
        for field, selectors in (("include", entry.include), ("exclude", entry.exclude)):
            for selector in selectors:
                codes = _select(selector, catalog.document)
                if codes is None:
                    problems.append(f"region {entry.region}: {field} names no service: {selector!r}")
                else:
                    chosen[field] |= codes
        if entry.provenance.status == "confirmed" and entry.provenance.source is None:
            problems.append(f"region {entry.region}: a confirmed entry names its source")
        if entry.provenance.source is not None and entry.provenance.source not in sources:
            problems.append(f"region {entry.region}: unknown source {entry.provenance.source!r}")
        services_by_region[entry.region] = frozenset(chosen["include"] - chosen["exclude"])
    _raise_if(problems, "the regions file breaks its rules")
    return RegionAvailability(document.version, raw_sha256, services_by_region)


def parse_regions(raw: bytes, catalog: Catalog) -> RegionAvailability:
    """Region availability from the bytes of regions.json, checked against catalog."""
    try:
        document = msgspec.json.decode(raw, type=RegionsDocument)
    except msgspec.DecodeError as exc:
        raise CatalogFileError(f"the regions file is malformed: {exc}") from None
    return resolve_regions(document, catalog, hashlib.sha256(raw).hexdigest())


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CatalogFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_catalog(path: Path) -> Catalog:
    """Read and check services.json."""
    return parse_catalog(_read(path))


def read_regions(path: Path, catalog: Catalog) -> RegionAvailability:
    """Read regions.json and check it against catalog."""
    return parse_regions(_read(path), catalog)
