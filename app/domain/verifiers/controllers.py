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
from app.domain.operators.services import Role, require_region
from app.domain.verification.directory import DirectoryChanges
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
from app.http.auth import OPERATOR_SECURITY, requires
from app.http.problems import problem_responses
from app.security.pii import NATIONAL
from app.security.tokens import OperatorSession
from app.settings import Settings
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
    request_max_body_size = 4096

    @post(
        "/verifier-organisations",
        status_code=201,
        summary="Register a verifier organisation",
        responses=problem_responses(401, 403, 404, 409, 413),
        guards=[requires(Role.VERIFIER_MANAGER)],
    )
    async def create_organisation(
        self,
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[OrganisationCreate],
    ) -> OrganisationOut:
        """A transit company, park, library, hospital… in a region of the operator's scope."""
        require_region(operator, data.region)
        organisation = await register_organisation(
            session,
            actor,
            name=data.name,
            business_type=BusinessType(data.business_type),
            region=data.region,
        )
        return _organisation_out(organisation)

    @get(
        "/verifier-organisations",
        summary="List verifier organisations",
        responses=problem_responses(401, 403),
        guards=[requires(Role.VERIFIER_MANAGER, Role.AUDITOR)],
    )
    async def list_organisations(
        self, session: NamedDependency[AsyncSession], operator: NamedDependency[OperatorSession]
    ) -> list[OrganisationOut]:
        """Organisations in the operator's regions."""
        return [_organisation_out(org) for org in await list_organisations(session, operator.regions)]

    @post(
        "/verifier-organisations/{organisation_id:uuid}/terminals",
        status_code=201,
        summary="Register a terminal",
        responses=problem_responses(401, 403, 404, 409, 413),
        guards=[requires(Role.VERIFIER_MANAGER)],
    )
    async def create_terminal(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        settings: NamedDependency[Settings],
        organisation_id: FromPath[uuid.UUID],
        data: JSONBody[TerminalCreate],
    ) -> TerminalWithKey:
        """Create a terminal; its API key is in this answer and nowhere else."""
        organisation = await get_organisation(session, organisation_id, operator.regions)
        terminal, api_key = await register_terminal(
            session,
            actor,
            organisation,
            name=data.name,
            purposes=list(data.allowed_purposes),
            rate=(data.rate_per_minute, data.rate_burst),
            national=settings.crypto_profile == NATIONAL,
        )
        await directory_changes.announce()
        return TerminalWithKey(terminal=_terminal_out(terminal), api_key=api_key)

    @patch(
        "/verifier-organisations/{organisation_id:uuid}",
        summary="Enable or disable a verifier organisation",
        responses=problem_responses(401, 403, 404, 413),
        guards=[requires(Role.VERIFIER_MANAGER)],
    )
    async def update_organisation(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        organisation_id: FromPath[uuid.UUID],
        data: JSONBody[OrganisationUpdate],
    ) -> OrganisationOut:
        """A disabled organisation's terminals are refused on every worker within a second."""
        organisation = await get_organisation(session, organisation_id, operator.regions)
        await set_organisation_enabled(session, actor, organisation, data.enabled)
        await directory_changes.announce()
        return _organisation_out(organisation)

    @get(
        "/verifier-organisations/{organisation_id:uuid}/verification-counts",
        summary="Verification counts per terminal",
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.VERIFIER_MANAGER, Role.AUDITOR)],
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
        guards=[requires(Role.VERIFIER_MANAGER)],
    )
    async def update_terminal(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        terminal_id: FromPath[uuid.UUID],
        data: JSONBody[TerminalUpdate],
    ) -> TerminalOut:
        """Enable or disable it (refused on every worker within a second), change its purposes or rate."""
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        await update_terminal(
            session,
            actor,
            terminal,
            organisation,
            enabled=data.enabled,
            purposes=list(data.allowed_purposes) if data.allowed_purposes is not None else None,
            rate_per_minute=data.rate_per_minute,
            rate_burst=data.rate_burst,
        )
        await directory_changes.announce()
        return _terminal_out(terminal)

    @put(
        "/terminals/{terminal_id:uuid}/signing-key",
        summary="Register a terminal's request-signing key",
        responses=problem_responses(401, 403, 404, 413),
        guards=[requires(Role.VERIFIER_MANAGER)],
    )
    async def register_signing_key(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        terminal_id: FromPath[uuid.UUID],
        data: JSONBody[SigningKeyIn],
    ) -> TerminalOut:
        """From now on the terminal must sign its requests with this Ed25519 or SM2 key; its API keys stop working."""
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        await set_signing_key(session, actor, terminal, organisation, b64url_decode(data.public_key), data.algorithm)
        await directory_changes.announce()
        return _terminal_out(terminal)

    @post(
        "/terminals/{terminal_id:uuid}/api-key",
        status_code=201,
        summary="Replace a terminal's API key",
        responses=problem_responses(401, 403, 404, 409, 413),
        guards=[requires(Role.VERIFIER_MANAGER)],
    )
    async def rotate_key(
        self,
        directory_changes: NamedDependency[DirectoryChanges],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        settings: NamedDependency[Settings],
        terminal_id: FromPath[uuid.UUID],
        overlap_seconds: Annotated[int, QueryParameter(name="overlap_seconds", ge=0, le=MAX_KEY_OVERLAP)] = 0,
    ) -> TerminalWithKey:
        """Issue a new key, shown this once. The old key keeps working for `overlap_seconds`.

        0 (the default, for a leaked key) ends it at once; a routine rotation gives the
        terminal's operator time to install the new key, e.g. 86400 for a day. A terminal that
        signs its requests has no API key: this also returns it to API-key authentication.
        """
        terminal, organisation = await get_terminal(session, terminal_id, operator.regions)
        national = settings.crypto_profile == NATIONAL
        api_key = await rotate_api_key(session, actor, terminal, organisation, overlap_seconds, national)
        await directory_changes.announce()
        return TerminalWithKey(terminal=_terminal_out(terminal), api_key=api_key)
