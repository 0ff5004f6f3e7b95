"""Loading the service catalogue into the database, and what a card may do where.

A load is one transaction: services are added, changed or withdrawn (kept, marked, and taken out
of every region), region availability is brought to what the file says, and an audit event
records it. Loading files the database already holds changes nothing.

A card of region B in region A reaches a service when A offers it (directly, through its
province, or everywhere: '*') and one of the service's credential purposes is one a terminal of
A accepts from B (`AcceptanceRules.purposes_between`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

import msgspec
from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from app.db.clock import utcnow
from app.db.models import CatalogService, CatalogVersion, Region, RegionService
from app.domain import errors
from app.domain.agreements.rules import AcceptanceRules
from app.domain.audit.services import Actor, record
from app.domain.catalog.document import ALL_REGIONS, Catalog, CatalogEntry, RegionAvailability
from app.domain.regions.services import check_region_code
from app.settings import DATA_DIR
from crypto.credential import Purpose

CATALOG_DIR = DATA_DIR / "catalog"
DEFAULT_SERVICES_FILE = CATALOG_DIR / "services.json"
DEFAULT_REGIONS_FILE = CATALOG_DIR / "regions.json"


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a load did."""

    changed: bool
    version: str
    sha256: str
    regions_version: str
    load_number: int | None
    counts: dict[str, int]
    added: int = 0
    updated: int = 0
    withdrawn: int = 0
    region_rows_added: int = 0
    region_rows_removed: int = 0

    def summary(self) -> str:
        """One line for the operator."""
        if not self.changed:
            return (
                f"catalogue {self.version} (sha256 {self.sha256[:12]}) with regions {self.regions_version} is "
                "already loaded: nothing changed"
            )
        counts = self.counts
        return (
            f"catalogue {self.version} loaded (load {self.load_number}): {counts['services']} services "
            f"({counts['hrss']} HR & social security, {counts['livelihood']} livelihood; {counts['confirmed']} "
            f"confirmed, {counts['illustrative']} illustrative): {self.added} added, {self.updated} updated, "
            f"{self.withdrawn} withdrawn; regions {self.regions_version}: {self.region_rows_added} availabilities "
            f"added, {self.region_rows_removed} removed"
        )


def _counts(catalog: Catalog) -> dict[str, int]:
    domains = Counter(entry.domain for entry in catalog.services)
    statuses = Counter(entry.provenance.status for entry in catalog.services)
    return {
        "services": len(catalog.services),
        "hrss": domains["hrss"],
        "livelihood": domains["livelihood"],
        "confirmed": statuses["confirmed"],
        "illustrative": statuses["illustrative"],
    }


def _row_values(entry: CatalogEntry) -> dict[str, object]:
    return {
        "domain": entry.domain,
        "category": entry.category,
        "name_zh": entry.name_zh,
        "name_en": entry.name_en,
        "application_type": entry.application_type,
        "forms": list(entry.forms),
        "purposes": list(entry.purposes),
        "business_types": list(entry.business_types),
        "provenance_status": entry.provenance.status,
        "provenance_source": entry.provenance.source,
        "provenance_note": entry.provenance.note,
    }


async def current_version(session: AsyncSession) -> CatalogVersion | None:
    """The catalogue in force: the newest load, or None if none was ever loaded."""
    version: CatalogVersion | None = await session.scalar(
        select(CatalogVersion).order_by(CatalogVersion.id.desc()).limit(1)
    )
    return version


async def _refuse_reused_version(
    session: AsyncSession,
    columns: tuple[InstrumentedAttribute[str], InstrumentedAttribute[str]],
    version: str,
    sha256: str,
    what: str,
) -> None:
    """A version string stays bound to the content it was first loaded with."""
    version_column, digest_column = columns
    clash = await session.scalar(
        select(func.count()).select_from(CatalogVersion).where(version_column == version, digest_column != sha256)
    )
    if clash:
        raise errors.Conflict(
            f"{what} version {version} was loaded before with different content: give the file a new version"
        )


async def load_catalog(
    session: AsyncSession, actor: Actor, catalog: Catalog, availability: RegionAvailability
) -> LoadResult:
    """Bring the database to the catalogue and region availability given, in one transaction (commits)."""
    counts = _counts(catalog)
    current = await current_version(session)
    if current is not None and (current.sha256, current.regions_sha256) == (catalog.sha256, availability.sha256):
        return LoadResult(False, catalog.version, catalog.sha256, availability.version, current.id, counts)
    await _refuse_reused_version(
        session, (CatalogVersion.version, CatalogVersion.sha256), catalog.version, catalog.sha256, "catalogue"
    )
    await _refuse_reused_version(
        session,
        (CatalogVersion.regions_version, CatalogVersion.regions_sha256),
        availability.version,
        availability.sha256,
        "regions file",
    )

    now = utcnow()
    document = catalog.document
    loaded = CatalogVersion(
        version=catalog.version,
        sha256=catalog.sha256,
        regions_version=availability.version,
        regions_sha256=availability.sha256,
        services=counts["services"],
        details=msgspec.to_builtins(
            {
                "title": document.title,
                "sources": document.sources,
                "categories": document.categories,
                "application_types": document.application_types,
                "usage_groups": document.usage_groups,
            }
        ),
        loaded_at=now,
        loaded_by=actor.name[:64],
    )
    session.add(loaded)

    existing = {row.code: row for row in await session.scalars(select(CatalogService))}
    added = updated = withdrawn = 0
    for entry in catalog.services:
        values = _row_values(entry)
        row = existing.get(entry.code)
        if row is None:
            session.add(CatalogService(code=entry.code, version=catalog.version, updated_at=now, **values))
            added += 1
        elif row.withdrawn_at is not None or any(getattr(row, key) != value for key, value in values.items()):
            for key, value in values.items():
                setattr(row, key, value)
            row.version, row.updated_at, row.withdrawn_at = catalog.version, now, None
            updated += 1
    listed = {entry.code for entry in catalog.services}
    for code, row in existing.items():
        if code not in listed and row.withdrawn_at is None:
            row.version, row.updated_at, row.withdrawn_at = catalog.version, now, now
            withdrawn += 1
    await session.flush()

    wanted = availability.pairs()
    rows = await session.execute(select(RegionService.region_code, RegionService.service_code))
    present = {(region, code) for region, code in rows}
    removed = present - wanted
    for chunk in _chunks(sorted(removed), 500):
        await session.execute(
            delete(RegionService).where(tuple_(RegionService.region_code, RegionService.service_code).in_(chunk))
        )
    session.add_all(RegionService(region_code=region, service_code=code) for region, code in sorted(wanted - present))
    await session.flush()

    result = LoadResult(
        True,
        catalog.version,
        catalog.sha256,
        availability.version,
        loaded.id,
        counts,
        added=added,
        updated=updated,
        withdrawn=withdrawn,
        region_rows_added=len(wanted - present),
        region_rows_removed=len(removed),
    )
    record(
        session, actor, "catalog.loaded", subject_type="catalog", subject_id=catalog.version, region=None,
        before=(
            {"version": current.version, "sha256": current.sha256, "regions_version": current.regions_version}
            if current is not None else None
        ),
        after={
            "version": catalog.version, "sha256": catalog.sha256, "regions_version": availability.version,
            "regions_sha256": availability.sha256, **counts, "added": added, "updated": updated,
            "withdrawn": withdrawn, "region_rows_added": result.region_rows_added,
            "region_rows_removed": result.region_rows_removed,
        },
    )  # fmt: skip
    await session.commit()
    return result


def _chunks(items: list[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


async def list_services(
    session: AsyncSession,
    *,
    domain: str | None = None,
    category: str | None = None,
    application_type: str | None = None,
) -> list[CatalogService]:
    """Services in force (not withdrawn), by code; empty if the catalogue was never loaded."""
    query = select(CatalogService).where(CatalogService.withdrawn_at.is_(None)).order_by(CatalogService.code)
    if domain is not None:
        query = query.where(CatalogService.domain == domain)
    if category is not None:
        query = query.where(CatalogService.category == category)
    if application_type is not None:
        query = query.where(CatalogService.application_type == application_type)
    return list((await session.scalars(query)).all())


async def get_service(session: AsyncSession, code: str) -> CatalogService:
    """A service in force by code; 404 if unknown or withdrawn."""
    row = await session.get(CatalogService, code)
    if row is None:
        raise errors.NotFound(f"no service {code!r} in the catalogue")
    if row.withdrawn_at is not None:
        raise errors.NotFound(f"service {code} was withdrawn from the catalogue in version {row.version}")
    return row


async def registered_region(session: AsyncSession, code: str) -> str:
    """code, if it is a well-formed (400 otherwise) and registered (404 otherwise) region."""
    check_region_code(code)
    if await session.get(Region, code) is None:
        raise errors.NotFound(f"region {code} is not registered")
    return code


def covering_regions(region: str) -> tuple[str, ...]:
    """The availability entries that apply in region: its own, its prefecture's, its province's, and '*'."""
    return tuple(dict.fromkeys((region, region[:4] + "00", region[:2] + "0000", ALL_REGIONS)))


@dataclass(frozen=True, slots=True)
class ReachableService:
    """A service a card may use here, and the purposes of the card's credentials that reach it."""

    service: CatalogService
    purposes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CardReach:
    """What a card of card_region may do in region."""

    region: str
    card_region: str
    catalog_version: str | None
    purposes: tuple[str, ...]
    services: list[ReachableService]


async def card_reach(
    session: AsyncSession,
    rules: AcceptanceRules,
    region: str,
    card_region: str,
    *,
    purposes: Collection[Purpose] | None = None,
    business_type: str | None = None,
) -> CardReach:
    """The services region offers that a card of card_region reaches with its credentials.

    Only purposes accepted between the two regions count, narrowed to `purposes` when given (a
    terminal's, or one the caller asks about); with `business_type`, only services that kind of
    verifier offers. Both regions must be registered.
    """
    await registered_region(session, region)
    if card_region != region:
        await registered_region(session, card_region)
    accepted = set(rules.purposes_between(region, card_region))
    if purposes is not None:
        accepted &= set(purposes)
    labels = tuple(sorted(purpose.label for purpose in accepted))
    version = await current_version(session)
    offered = select(RegionService.service_code).where(RegionService.region_code.in_(covering_regions(region)))
    rows = await session.scalars(
        select(CatalogService)
        .where(CatalogService.code.in_(offered), CatalogService.withdrawn_at.is_(None))
        .order_by(CatalogService.code)
    )
    reachable = []
    for row in rows:
        if business_type is not None and business_type not in row.business_types:
            continue
        usable = tuple(label for label in labels if label in row.purposes)
        if usable:
            reachable.append(ReachableService(row, usable))
    return CardReach(region, card_region, version.version if version else None, labels, reachable)


async def catalog_counts(session: AsyncSession) -> dict[str, int]:
    """Services in force by domain and by provenance status (zeros if never loaded)."""
    counts = dict.fromkeys(("hrss", "livelihood", "confirmed", "illustrative"), 0)
    in_force = CatalogService.withdrawn_at.is_(None)
    for column in (CatalogService.domain, CatalogService.provenance_status):
        for key, count in await session.execute(select(column, func.count()).where(in_force).group_by(column)):
            counts[key] = count
    return counts
