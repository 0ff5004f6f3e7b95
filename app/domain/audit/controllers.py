"""Operator API: reading the audit log (there is no way to write, edit or delete it)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import AuditEvent
from app.domain.audit.schemas import AuditEventOut
from app.domain.audit.services import list_events
from app.domain.operators.services import Role
from app.http.auth import OPERATOR_SECURITY, requires
from app.http.problems import problem_responses
from app.security.tokens import OperatorSession


def _out(event: AuditEvent) -> AuditEventOut:
    return AuditEventOut(
        id=event.id,
        occurred_at=event.occurred_at,
        actor_type=event.actor_type,
        actor_id=event.actor_id,
        actor_name=event.actor_name,
        action=event.action,
        subject_type=event.subject_type,
        subject_id=event.subject_id,
        region=event.region_code,
        reason=event.reason,
        before=event.before,
        after=event.after,
    )


class AuditController(Controller):
    """The audit log, for auditors and admins, within their regions."""

    path = "/v1/operator/audit-events"
    tags = ["operator"]
    security = OPERATOR_SECURITY

    @get("/", summary="Query the audit log", responses=problem_responses(401, 403), guards=[requires(Role.AUDITOR)])
    async def index(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        subject_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
        action: Annotated[str | None, QueryParameter(max_length=48)] = None,
        actor_id: Annotated[str | None, QueryParameter(max_length=64)] = None,
        since: Annotated[datetime | None, QueryParameter(description="Events at or after this time.")] = None,
        until: Annotated[
            datetime | None,
            QueryParameter(description="Events before this time; with `since`, it should be later (else: none)."),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> list[AuditEventOut]:
        """Newest first; filter by subject (card, eCard, terminal… id), action, actor and time."""
        events = await list_events(
            session,
            operator.regions,
            subject_id=subject_id,
            action=action,
            actor_id=actor_id,
            since=since,
            until=until,
            limit=limit,
        )
        return [_out(event) for event in events]
