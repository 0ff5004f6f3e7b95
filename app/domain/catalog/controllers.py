"""The service catalogue (public), and what a card may do in a region: for anyone, the holder, a terminal."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath, PathParameter, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import CatalogService
from app.domain.agreements.rules import AcceptanceRules
from app.domain.catalog.document import ApplicationType, Domain
from app.domain.catalog.schemas import (
    ApplicationTypeOut,
    CardReachOut,
    CatalogCounts,
    CatalogOut,
    CategoryOut,
    ServiceOut,
    SourceOut,
    UsageGroupOut,
)
from app.domain.catalog.services import (
    CardReach,
    card_reach,
    catalog_counts,
    current_version,
    get_service,
    list_services,
)
from app.domain.regions.services import REGION_CODE
from app.domain.verification.directory import TerminalEntry
from app.http.auth import HOLDER_SECURITY, TERMINAL_SECURITY, AuthenticatedHolder
from app.http.problems import problem_responses
from crypto.credential import Purpose, PurposeName

# The document states what a region code is, so a client (and schemathesis) knows which codes are well formed.
RegionPath = Annotated[str, PathParameter(pattern=REGION_CODE.pattern)]
RegionQuery = Annotated[str | None, QueryParameter(pattern=REGION_CODE.pattern, max_length=6)]
PurposeQuery = Annotated[PurposeName | None, QueryParameter()]


def _service_fields(row: CatalogService) -> dict[str, Any]:
    return {
        "code": row.code,
        "name_zh": row.name_zh,
        "name_en": row.name_en,
        "domain": row.domain,
        "category": row.category,
        "application_type": row.application_type,
        "forms": list(row.forms),
        "purposes": list(row.purposes),
        "business_types": list(row.business_types),
        "provenance": {"status": row.provenance_status, "source": row.provenance_source, "note": row.provenance_note},
    }


def _service_out(row: CatalogService) -> ServiceOut:
    # Converted, not just built: a stored value outside the documented enums fails here, not in a client.
    return msgspec.convert(_service_fields(row), ServiceOut)


def _reach_out(reach: CardReach, business_type: str | None = None) -> CardReachOut:
    answer = {
        "region": reach.region,
        "card_region": reach.card_region,
        "catalog_version": reach.catalog_version,
        "purposes": list(reach.purposes),
        "services": [
            {**_service_fields(item.service), "usable_purposes": list(item.purposes)} for item in reach.services
        ],
        "business_type": business_type,
    }
    return msgspec.convert(answer, CardReachOut)


def _purposes(purpose: str | None) -> set[Purpose] | None:
    return None if purpose is None else {Purpose.from_label(purpose)}


class CatalogController(Controller):
    """The catalogue of services the card gives access to, and where a card may use them."""

    path = "/v1"
    tags = ["catalog"]

    @get("/catalog", summary="The service catalogue in force")
    async def catalog(self, session: NamedDependency[AsyncSession]) -> CatalogOut:
        """Its version and file digests, counts, and the sources, categories, application types and usage groups."""
        version = await current_version(session)
        counts = CatalogCounts(**await catalog_counts(session))
        if version is None:
            return CatalogOut(
                loaded=False, counts=counts, sources=[], categories=[], application_types=[], usage_groups=[]
            )
        details = version.details
        return CatalogOut(
            loaded=True,
            counts=counts,
            sources=msgspec.convert(details.get("sources", []), list[SourceOut]),
            categories=msgspec.convert(details.get("categories", []), list[CategoryOut]),
            application_types=msgspec.convert(details.get("application_types", []), list[ApplicationTypeOut]),
            usage_groups=msgspec.convert(details.get("usage_groups", []), list[UsageGroupOut]),
            version=version.version,
            sha256=version.sha256,
            regions_version=version.regions_version,
            loaded_at=version.loaded_at,
        )

    @get("/catalog/services", summary="List catalogue services")
    async def services(
        self,
        session: NamedDependency[AsyncSession],
        domain: Annotated[Domain | None, QueryParameter()] = None,
        category: Annotated[str | None, QueryParameter(max_length=48)] = None,
        application_type: Annotated[ApplicationType | None, QueryParameter()] = None,
    ) -> list[ServiceOut]:
        """Services in force, by code, each with its provenance; empty until a catalogue is loaded."""
        rows = await list_services(session, domain=domain, category=category, application_type=application_type)
        return [_service_out(row) for row in rows]

    @get("/catalog/services/{code:str}", summary="A catalogue service", responses=problem_responses(404))
    async def service(self, session: NamedDependency[AsyncSession], code: FromPath[str]) -> ServiceOut:
        """One service by its code; 404 if there is none or it was withdrawn."""
        return _service_out(await get_service(session, code))

    @get(
        "/regions/{region:str}/services",
        summary="What a card may do in a region",
        responses=problem_responses(404),
    )
    async def region_services(
        self,
        rules: NamedDependency[AcceptanceRules],
        session: NamedDependency[AsyncSession],
        region: RegionPath,
        card_region: RegionQuery = None,
        purpose: PurposeQuery = None,
    ) -> CardReachOut:
        """The region's services that a card of `card_region` (default: this region) reaches with its credentials.

        Across provinces only the purposes a cooperation agreement covers count; `purpose` narrows
        the answer to one. 400 for a malformed region code, 404 for one not registered.
        """
        reach = await card_reach(session, rules, region, card_region or region, purposes=_purposes(purpose))
        return _reach_out(reach)

    @get(
        "/holder/services",
        summary="What my card may do in a region",
        tags=["holder"],
        security=HOLDER_SECURITY,
        responses=problem_responses(401, 404),
    )
    async def holder_services(
        self,
        rules: NamedDependency[AcceptanceRules],
        session: NamedDependency[AsyncSession],
        holder: NamedDependency[AuthenticatedHolder],
        region: RegionQuery = None,
        purpose: PurposeQuery = None,
    ) -> CardReachOut:
        """The services of `region` (default: the card's own) that this card reaches with its credentials."""
        card_region = holder.session.region
        reach = await card_reach(session, rules, region or card_region, card_region, purposes=_purposes(purpose))
        return _reach_out(reach)

    @get(
        "/terminal/services",
        summary="What a card may do at this terminal",
        security=TERMINAL_SECURITY,
        responses=problem_responses(401, 404),
    )
    async def terminal_services(
        self,
        rules: NamedDependency[AcceptanceRules],
        terminal: NamedDependency[TerminalEntry],
        session: NamedDependency[AsyncSession],
        card_region: RegionQuery = None,
    ) -> CardReachOut:
        """The services of the terminal's region that its kind of verifier offers, through the purposes it
        accepts, for a card of `card_region` (default: the terminal's region). Authenticated like `/v1/verify`.
        """
        reach = await card_reach(
            session,
            rules,
            terminal.region,
            card_region or terminal.region,
            purposes=terminal.purposes,
            business_type=terminal.business_type,
        )
        return _reach_out(reach, terminal.business_type)
