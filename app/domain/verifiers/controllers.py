"""Operator API: verifier organisations and terminals."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated

from litestar import Controller, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import as_utc, utcnow
from app.db.models import Terminal, VerifierOrganisation
from app.domain import errors
from app.domain.audit.services import Actor
from app.domain.operators.services import Role, require_region, require_role
from app.domain.verification.disclosure import BusinessType
from app.domain.verification.events import terminal_counts
from app.domain.verifiers.schemas import (
    OrganisationCreate,
    OrganisationOut,
    OrganisationUpdate,
    SigningKeyIn,
    TerminalCounts,
    TerminalCreate,
    TerminalOut,
    TerminalUpdate,
    TerminalWithKey,
    VerificationCounts,
)
from app.domain.verifiers.services import (
    MAX_KEY_OVERLAP,
    get_organisation,
    get_terminal,
    list_organisations,
    register_organisation,
    register_terminal,
    rotate_api_key,
    set_organisation_enabled,
    set_signing_key,
    update_terminal,
)
from app.http.auth import OPERATOR_SECURITY, provide_operator
from app.http.problems import problem_responses
from app.security.tokens import OperatorSession
from app.server.context import ServiceContext
from crypto.keys import b64url_decode


def _organisation_out(organisation: VerifierOrganisation) -> OrganisationOut:
    return OrganisationOut(
        id=organisation.id,
        name=organisation.name,
        business_type=organisation.business_type,
        region=organisation.region_code,
        created_at=organisation.created_at,
        enabled=organisation.enabled,
    )


def _terminal_out(terminal: Terminal) -> TerminalOut:
    return TerminalOut(
        id=terminal.id,
        organisation_id=terminal.organisation_id,
        name=terminal.name,
        allowed_purposes=list(terminal.allowed_purposes),
        enabled=terminal.enabled,
        created_at=terminal.created_at,
        rate_per_minute=terminal.rate_per_minute,
        rate_burst=terminal.rate_burst,
        signs_requests=terminal.signing_public_key is not None,
        previous_key_expires_at=terminal.previous_key_expires_at if terminal.previous_key_hash else None,
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
            session,
            Actor.operator(operator),
            organisation,
            name=data.name,
            purposes=list(data.allowed_purposes),
            rate=(data.rate_per_minute, data.rate_burst),
        )
        await ctx.directory_changed()
        return TerminalWithKey(terminal=_terminal_out(terminal), api_key=api_key)

    @patch(
        "/verifier-organisations/{organisation_id:uuid}",
        summary="Enable or disable a verifier organisation",
        responses=problem_responses(401, 403, 404, 413),
    )
    async def update_organisation(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        organisation_id: FromPath[uuid.UUID],
        data: JSONBody[OrganisationUpdate],
    ) -> OrganisationOut:
        """A disabled organisation's terminals are refused on every worker within a second."""
        require_role(operator, Role.VERIFIER_MANAGER)
        organisation = await get_organisation(session, organisation_id, operator.regions)
        await set_organisation_enabled(session, Actor.operator(operator), organisation, data.enabled)
        await ctx.directory_changed()
        return _organisation_out(organisation)

    @get(
        "/verifier-organisations/{organisation_id:uuid}/verification-counts",
        summary="Verification counts per terminal",
        responses=problem_responses(401, 403, 404),
    )
    async def verification_counts(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        organisation_id: FromPath[uuid.UUID],
        since: Annotated[
            datetime | None,
            QueryParameter(name="since", required=False, description="Start (included); must be before `until`."),
        ] = None,
        until: Annotated[
            datetime | None,
            QueryParameter(
                name="until", required=False, description="End (excluded); default now. 400 unless after `since`."
            ),
        ] = None,
    ) -> VerificationCounts:
        """Accepted and rejected verifications of each terminal, by result, in [since, until).

        Default: the last 24 hours. `since` must be before `until` (400 otherwise). Counts come
        from the drained event log, a few seconds behind the gates.
        """
        require_role(operator, Role.VERIFIER_MANAGER, Role.AUDITOR)
        organisation = await get_organisation(session, organisation_id, operator.regions)
        until = as_utc(until) if until else utcnow()
        since = as_utc(since) if since else until - timedelta(days=1)
        if since >= until:
            raise errors.Invalid("since must be before until")
        counts = await terminal_counts(session, organisation.id, since, until)
        return VerificationCounts(
            organisation_id=organisation.id,
            since=since,
            until=until,
            terminals=[
                TerminalCounts(
                    terminal_id=count.terminal_id,
                    name=count.name,
                    accepted=count.accepted,
                    rejected=count.rejected,
                    by_result=count.by_result,
                )
                for count in counts
            ],
        )

    @patch(
        "/terminals/{terminal_id:uuid}",
        summary="Change a terminal",
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
        """Enable or disable it (refused on every worker within a second), change its purposes or rate."""
        require_role(operator, Role.VERIFIER_MANAGER)
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        await update_terminal(
            session,
            Actor.operator(operator),
            terminal,
            organisation,
            enabled=data.enabled,
            purposes=list(data.allowed_purposes) if data.allowed_purposes is not None else None,
            rate_per_minute=data.rate_per_minute,
            rate_burst=data.rate_burst,
        )
        await ctx.directory_changed()
        return _terminal_out(terminal)

    @put(
        "/terminals/{terminal_id:uuid}/signing-key",
        summary="Register a terminal's request-signing key",
        responses=problem_responses(401, 403, 404, 413),
    )
    async def register_signing_key(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        terminal_id: FromPath[uuid.UUID],
        data: JSONBody[SigningKeyIn],
    ) -> TerminalOut:
        """From now on the terminal must sign its requests with this Ed25519 key; its API keys stop working."""
        require_role(operator, Role.VERIFIER_MANAGER)
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        await set_signing_key(session, Actor.operator(operator), terminal, organisation, b64url_decode(data.public_key))
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
        overlap_seconds: Annotated[int, QueryParameter(name="overlap_seconds", ge=0, le=MAX_KEY_OVERLAP)] = 0,
    ) -> TerminalWithKey:
        """Issue a new key, shown this once. The old key keeps working for `overlap_seconds`.

        0 (the default, for a leaked key) ends it at once; a routine rotation gives the
        terminal's operator time to install the new key, e.g. 86400 for a day. A terminal that
        signs its requests has no API key: this also returns it to API-key authentication.
        """
        require_role(operator, Role.VERIFIER_MANAGER)
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        api_key = await rotate_api_key(session, Actor.operator(operator), terminal, organisation, overlap_seconds)
        await ctx.directory_changed()
        return TerminalWithKey(terminal=_terminal_out(terminal), api_key=api_key)
