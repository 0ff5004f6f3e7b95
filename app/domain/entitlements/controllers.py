"""Operator API: a card's entitlements (park annual passes)."""

from __future__ import annotations

import uuid

from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Entitlement
from app.domain.audit.services import Actor
from app.domain.cards.mirroring import MirrorOutbox
from app.domain.cards.services import ScopedCard
from app.domain.entitlements.schemas import EntitlementGrant, EntitlementOut
from app.domain.entitlements.services import grant_entitlement, list_entitlements, revoke_entitlement
from app.domain.operators.services import Role
from app.http.auth import OPERATOR_SECURITY, requires
from app.http.pending import mirror_answer, pending_response
from app.http.problems import problem_responses


def _out(entitlement: Entitlement) -> EntitlementOut:
    return EntitlementOut(
        id=entitlement.id,
        kind=entitlement.kind,
        region=entitlement.region_code,
        valid_from=entitlement.valid_from,
        valid_until=entitlement.valid_until,
        revoked_at=entitlement.revoked_at,
    )


class EntitlementController(Controller):
    """Entitlements of a card: what a park gate learns when the card is scanned."""

    path = "/v1/operator/cards/{card_id:uuid}/entitlements"
    tags = ["operator"]
    security = OPERATOR_SECURITY
    request_max_body_size = 4096

    @post(
        "/",
        status_code=201,
        summary="Grant an entitlement",
        responses=problem_responses(401, 403, 404, 413, 503) | pending_response(EntitlementOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def grant(
        self,
        outbox: NamedDependency[MirrorOutbox],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        data: JSONBody[EntitlementGrant],
    ) -> Response[EntitlementOut]:
        """E.g. a park annual pass valid in a province through a date; park gates see it at once."""
        _, ecard, _ = scoped_card
        entitlement, mirrored = await grant_entitlement(
            session, outbox, actor, ecard,
            kind=data.kind, region=data.region, valid_until=data.valid_until,
        )  # fmt: skip
        return mirror_answer(_out(entitlement), mirrored, 201)

    @get(
        "/",
        summary="List a card's entitlements",
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.CARD_OFFICER, Role.AUDITOR)],
    )
    async def list_all(
        self,
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
    ) -> list[EntitlementOut]:
        """Newest first, revoked and expired ones included."""
        _, ecard, _ = scoped_card
        return [_out(entitlement) for entitlement in await list_entitlements(session, ecard)]

    @delete(
        "/{entitlement_id:uuid}",
        status_code=200,
        summary="Revoke an entitlement",
        responses=problem_responses(401, 403, 404, 409, 503) | pending_response(EntitlementOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def revoke(
        self,
        outbox: NamedDependency[MirrorOutbox],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        entitlement_id: FromPath[uuid.UUID],
    ) -> Response[EntitlementOut]:
        """Ends it now; park gates stop seeing it at once."""
        _, ecard, _ = scoped_card
        entitlement, mirrored = await revoke_entitlement(session, outbox, actor, ecard, entitlement_id)
        return mirror_answer(_out(entitlement), mirrored)
