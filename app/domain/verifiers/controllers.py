"""Operator API: verifier organisations and terminals."""

from __future__ import annotations

import uuid

from litestar import Controller, get, patch, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import ServiceContext
from app.db.models import Terminal, VerifierOrganisation
from app.dependencies import OPERATOR_SECURITY, provide_operator
from app.domain.audit.services import Actor, record
from app.domain.operators.services import Role, require_region, require_role
from app.domain.verification.disclosure import BusinessType
from app.domain.verifiers.schemas import (
    OrganisationCreate,
    OrganisationOut,
    TerminalCreate,
    TerminalOut,
    TerminalUpdate,
    TerminalWithKey,
)
from app.domain.verifiers.services import (
    get_organisation,
    get_terminal,
    list_organisations,
    new_api_key,
    register_organisation,
    register_terminal,
)
from app.problems import problem_responses
from app.tokens import OperatorSession


def _organisation_out(organisation: VerifierOrganisation) -> OrganisationOut:
    return OrganisationOut(
        id=organisation.id,
        name=organisation.name,
        business_type=organisation.business_type,
        region=organisation.region_code,
        created_at=organisation.created_at,
    )


def _terminal_out(terminal: Terminal) -> TerminalOut:
    return TerminalOut(
        id=terminal.id,
        organisation_id=terminal.organisation_id,
        name=terminal.name,
        allowed_purposes=list(terminal.allowed_purposes),
        enabled=terminal.enabled,
        created_at=terminal.created_at,
    )


class VerifierController(Controller):
    """Organisations that scan credentials, and their terminals."""

    path = "/v1/operator"
    tags = ["operator"]
    security = OPERATOR_SECURITY
    dependencies = {"operator": provide_operator}
    request_max_body_size = 4096

    @post(
        "/verifier-organisations",
        status_code=201,
        summary="Register a verifier organisation",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def create_organisation(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[OrganisationCreate],
    ) -> OrganisationOut:
        """A transit company, park, library, hospital… in a region of the operator's scope."""
        require_role(operator, Role.VERIFIER_MANAGER)
        require_region(operator, data.region)
        organisation = await register_organisation(
            session,
            Actor.operator(operator),
            name=data.name,
            business_type=BusinessType(data.business_type),
            region=data.region,
        )
        return _organisation_out(organisation)

    @get("/verifier-organisations", summary="List verifier organisations", responses=problem_responses(401, 403))
    async def list_organisations(
        self, session: NamedDependency[AsyncSession], operator: NamedDependency[OperatorSession]
    ) -> list[OrganisationOut]:
        """Organisations in the operator's regions."""
        require_role(operator, Role.VERIFIER_MANAGER, Role.AUDITOR)
        return [_organisation_out(org) for org in await list_organisations(session, operator.regions)]

    @post(
        "/verifier-organisations/{organisation_id:uuid}/terminals",
        status_code=201,
        summary="Register a terminal",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def create_terminal(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        organisation_id: FromPath[uuid.UUID],
        data: JSONBody[TerminalCreate],
    ) -> TerminalWithKey:
        """Create a terminal; its API key is in this answer and nowhere else."""
        require_role(operator, Role.VERIFIER_MANAGER)
        organisation = await get_organisation(session, organisation_id, operator.regions)
        terminal, api_key = await register_terminal(
            session, Actor.operator(operator), organisation, name=data.name, purposes=list(data.allowed_purposes)
        )
        await ctx.directory_changed()
        return TerminalWithKey(terminal=_terminal_out(terminal), api_key=api_key)

    @patch(
        "/terminals/{terminal_id:uuid}",
        summary="Enable or disable a terminal",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def update_terminal(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        terminal_id: FromPath[uuid.UUID],
        data: JSONBody[TerminalUpdate],
    ) -> TerminalOut:
        """A disabled terminal's verifications are refused on every worker."""
        require_role(operator, Role.VERIFIER_MANAGER)
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        record(
            session, Actor.operator(operator), "terminal.enabled" if data.enabled else "terminal.disabled",
            subject_type="terminal", subject_id=terminal.id, region=organisation.region_code,
            before={"enabled": terminal.enabled}, after={"enabled": data.enabled},
        )  # fmt: skip
        terminal.enabled = data.enabled
        await session.commit()
        await ctx.directory_changed()
        return _terminal_out(terminal)

    @post(
        "/terminals/{terminal_id:uuid}/api-key",
        status_code=201,
        summary="Replace a terminal's API key",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def rotate_key(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        terminal_id: FromPath[uuid.UUID],
    ) -> TerminalWithKey:
        """Issue a new key; the old one stops working at once."""
        require_role(operator, Role.VERIFIER_MANAGER)
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        api_key, key_hash = new_api_key(terminal.id)
        terminal.api_key_hash = key_hash
        record(
            session, Actor.operator(operator), "terminal.api_key_rotated", subject_type="terminal",
            subject_id=terminal.id, region=organisation.region_code,
        )  # fmt: skip
        await session.commit()
        await ctx.directory_changed()
        return TerminalWithKey(terminal=_terminal_out(terminal), api_key=api_key)
