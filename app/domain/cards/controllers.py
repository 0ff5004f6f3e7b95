"""Operator API: issuing cards, activation codes, eCard state."""

from __future__ import annotations

import uuid

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.context import ServiceContext
from app.db.models import Card, ECard, ECardState, Person
from app.dependencies import OPERATOR_SECURITY, provide_operator
from app.domain.cards.citizen_id import mask_citizen_id, mask_name
from app.domain.cards.schemas import ActivationCodeOut, CardIssue, CardOut, ECardStateChange, IssuedCardOut
from app.domain.cards.services import (
    CITIZEN_ID_FIELD,
    NAME_FIELD,
    change_ecard_state,
    find_card,
    issue_card,
    new_activation_code,
)
from app.domain.operators.services import Role, require_region, require_role
from app.pii import PiiCipher
from app.problems import problem_responses
from app.tokens import OperatorSession


def card_out(pii: PiiCipher, card: Card, ecard: ECard, person: Person) -> CardOut:
    """The operator's view of a card, personal data decrypted and masked."""
    return CardOut(
        card_id=card.id,
        card_number=card.card_number,
        region=card.region_code,
        card_state=card.state,
        ecard_id=ecard.id,
        ecard_state=ecard.state,
        holder_name=mask_name(pii.decrypt(person.name_encrypted, NAME_FIELD)),
        citizen_id=mask_citizen_id(pii.decrypt(person.citizen_id_encrypted, CITIZEN_ID_FIELD)),
    )


class CardController(Controller):
    """Cards of the operator's regions. A card of another region answers exactly like a missing one."""

    path = "/v1/operator/cards"
    tags = ["operator"]
    security = OPERATOR_SECURITY
    dependencies = {"operator": provide_operator}
    request_max_body_size = 4096

    @post("/", status_code=201, summary="Issue a card", responses=problem_responses(401, 403, 404, 409, 413))
    async def create(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[CardIssue],
    ) -> IssuedCardOut:
        """Register the person (or find them by citizen ID), issue the card and its eCard, return an activation code."""
        require_role(operator, Role.CARD_OFFICER)
        require_region(operator, data.region)
        issued = await issue_card(
            session,
            ctx.pii,
            region=data.region,
            citizen_id=data.citizen_id,
            name=data.name,
            card_number=data.card_number,
            code_ttl=ctx.settings.activation_code_ttl,
        )
        card, ecard, person = await find_card(session, issued.card.id, operator.regions)
        return IssuedCardOut(
            card=card_out(ctx.pii, card, ecard, person),
            activation_code=issued.activation_code,
            activation_expires_at=issued.activation_expires_at,
        )

    @get("/{card_id:uuid}", summary="Read a card", responses=problem_responses(401, 403, 404))
    async def read(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        card_id: FromPath[uuid.UUID],
    ) -> CardOut:
        """A card and its eCard, personal data masked."""
        require_role(operator, Role.CARD_OFFICER, Role.AUDITOR)
        return card_out(ctx.pii, *await find_card(session, card_id, operator.regions))

    @post(
        "/{card_id:uuid}/activation-code",
        status_code=201,
        summary="Issue a new activation code",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def activation_code(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        card_id: FromPath[uuid.UUID],
    ) -> ActivationCodeOut:
        """Replace the card's open activation code (to activate on a new device, or after expiry)."""
        require_role(operator, Role.CARD_OFFICER)
        card, ecard, _person = await find_card(session, card_id, operator.regions)
        code, expires_at = await new_activation_code(session, ctx.pii, ecard, ctx.settings.activation_code_ttl)
        await session.commit()
        return ActivationCodeOut(
            card_id=card.id, ecard_id=ecard.id, activation_code=code, activation_expires_at=expires_at
        )

    @post(
        "/{card_id:uuid}/ecard-state",
        status_code=200,
        summary="Change the eCard's state",
        responses=problem_responses(401, 403, 404, 409, 413),
    )
    async def ecard_state(
        self,
        ctx: NamedDependency[ServiceContext],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        card_id: FromPath[uuid.UUID],
        data: JSONBody[ECardStateChange],
    ) -> CardOut:
        """Suspend, resume or revoke the eCard; verification sees the change at once."""
        require_role(operator, Role.CARD_OFFICER)
        card, ecard, person = await find_card(session, card_id, operator.regions)
        ecard = await change_ecard_state(session, ctx.mirror, ecard, ECardState(data.state))
        return card_out(ctx.pii, card, ecard, person)
