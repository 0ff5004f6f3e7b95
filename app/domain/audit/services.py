"""Recording audit events inside the transaction of the change they describe, and reading them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import AuditEvent
from app.domain.regions.scope import within
from app.security.tokens import HolderSession, OperatorSession


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did something: an operator, a holder's device, or a command run on the server."""

    type: str
    id: str
    name: str

    @classmethod
    def operator(cls, session: OperatorSession) -> Actor:
        """An operator, by account."""
        return cls("operator", str(session.operator_id), session.username)

    @classmethod
    def holder(cls, session: HolderSession) -> Actor:
        """A holder, by device (the eCard is the subject)."""
        return cls("holder", str(session.device_id), "holder device")

    @classmethod
    def command(cls, name: str) -> Actor:
        """A CLI command on the server, by its name."""
        return cls("command", name, name)


def record(
    session: AsyncSession,
    actor: Actor,
    action: str,
    *,
    subject_type: str,
    subject_id: uuid.UUID | str,
    region: str | None,
    reason: str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Add an audit event to the session: it commits with the change, or not at all."""
    session.add(
        AuditEvent(
            occurred_at=utcnow(),
            actor_type=actor.type,
            actor_id=actor.id,
            actor_name=actor.name,
            action=action,
            subject_type=subject_type,
            subject_id=str(subject_id),
            region_code=region,
            reason=reason,
            before=before,
            after=after,
        )
    )


async def list_events(
    session: AsyncSession,
    regions: tuple[str, ...],
    *,
    subject_id: str | None = None,
    action: str | None = None,
    actor_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[AuditEvent]:
    """Events in the regions ('*' = all, events without a region only for '*'), newest first."""
    query = select(AuditEvent).order_by(AuditEvent.occurred_at.desc(), AuditEvent.id).limit(limit)
    query = within(query, AuditEvent.region_code, regions)
    if subject_id is not None:
        query = query.where(AuditEvent.subject_id == subject_id)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if actor_id is not None:
        query = query.where(AuditEvent.actor_id == actor_id)
    if since is not None:
        query = query.where(AuditEvent.occurred_at >= since)
    if until is not None:
        query = query.where(AuditEvent.occurred_at < until)
    return list((await session.scalars(query)).all())
