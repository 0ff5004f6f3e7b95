"""Operator API: issuing and finding cards, activation codes, the card's life (state, loss, replacement), PIN reset."""

from __future__ import annotations

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Card, ECard, ECardState, Person
from app.domain.audit.services import Actor, record
from app.domain.cards.citizen_id import mask_citizen_id, mask_name
from app.domain.cards.lifecycle import (
    LOSS_BY_OFFICE,
    cancel_card,
    replace_card,
    report_loss,
    set_ecard_state,
    undo_loss,
)
from app.domain.cards.mirroring import MirrorOutbox
from app.domain.cards.schemas import (
    ActivationCodeOut,
    CardAction,
    CardIssue,
    CardOut,
    CardReplacement,
    CardSearch,
    ECardStateChange,
    IssuedCardOut,
)
from app.domain.cards.services import (
    CITIZEN_ID_FIELD,
    NAME_FIELD,
    ScopedCard,
    find_card,
    find_cards,
    issue_card,
    new_activation_code,
)
from app.domain.holders.pin import reset_pin
from app.domain.operators.services import Role, require_region
from app.http.auth import OPERATOR_SECURITY, requires
from app.http.pending import mirror_answer, pending_response
from app.http.problems import problem_responses
from app.security.pii import PiiCipher
from app.security.tokens import OperatorSession
from app.settings import Settings


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


WRITE_PROBLEMS = problem_responses(401, 403, 404, 409, 413)


class CardController(Controller):
    """Cards of the operator's regions. A card of another region answers exactly like a missing one."""

    path = "/v1/operator/cards"
    tags = ["operator"]
    security = OPERATOR_SECURITY
    request_max_body_size = 4096

    @post("/", status_code=201, summary="Issue a card", responses=WRITE_PROBLEMS, guards=[requires(Role.CARD_OFFICER)])
    async def create(
        self,
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[CardIssue],
    ) -> IssuedCardOut:
        """Register the person (or find them by citizen ID), issue the card and its eCard, return an activation code."""
        require_region(operator, data.region)
        issued = await issue_card(
            session,
            pii,
            region=data.region,
            citizen_id=data.citizen_id,
            name=data.name,
            card_number=data.card_number,
            code_ttl=settings.activation_code_ttl,
            actor=actor,
            insurance_scheme=data.insurance_scheme,
        )
        card, ecard, person = await find_card(session, issued.card.id, operator.regions)
        return IssuedCardOut(
            card=card_out(pii, card, ecard, person),
            activation_code=issued.activation_code,
            activation_expires_at=issued.activation_expires_at,
        )

    @post(
        "/search",
        status_code=200,
        summary="Find cards",
        responses=problem_responses(401, 403, 413),
        guards=[requires(Role.CARD_OFFICER, Role.AUDITOR)],
    )
    async def search(
        self,
        pii: NamedDependency[PiiCipher],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[CardSearch],
    ) -> list[CardOut]:
        """Cards by card number or by the holder's citizen ID (through its blind index), newest first, at most 50.

        A search, not a change: POST only so that the personal data it looks for stays out of URLs.
        """
        card_number = data.card_number if isinstance(data.card_number, str) else None
        citizen_id = data.citizen_id if isinstance(data.citizen_id, str) else None
        rows = await find_cards(session, pii, operator.regions, card_number=card_number, citizen_id=citizen_id)
        return [card_out(pii, *row) for row in rows]

    @get(
        "/{card_id:uuid}",
        summary="Read a card",
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.CARD_OFFICER, Role.AUDITOR)],
    )
    async def read(
        self,
        pii: NamedDependency[PiiCipher],
        scoped_card: NamedDependency[ScopedCard],
    ) -> CardOut:
        """A card and its eCard, personal data masked."""
        return card_out(pii, *scoped_card)

    @post(
        "/{card_id:uuid}/activation-code",
        status_code=201,
        summary="Issue a new activation code",
        responses=WRITE_PROBLEMS,
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def activation_code(
        self,
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
    ) -> ActivationCodeOut:
        """Replace the card's open activation code (to activate on a new device, or after expiry)."""
        card, ecard, _person = scoped_card
        code, expires_at = await new_activation_code(session, pii, ecard, settings.activation_code_ttl)
        record(
            session, actor, "card.activation_code", subject_type="card", subject_id=card.id,
            region=card.region_code, after={"activation_expires_at": expires_at.isoformat()},
        )  # fmt: skip
        await session.commit()
        return ActivationCodeOut(
            card_id=card.id, ecard_id=ecard.id, activation_code=code, activation_expires_at=expires_at
        )

    @post(
        "/{card_id:uuid}/ecard-state",
        status_code=200,
        summary="Change the eCard's state",
        responses=WRITE_PROBLEMS | pending_response(CardOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def ecard_state(
        self,
        outbox: NamedDependency[MirrorOutbox],
        pii: NamedDependency[PiiCipher],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        data: JSONBody[ECardStateChange],
    ) -> Response[CardOut]:
        """Suspend, resume or revoke the eCard; verification sees the change at once (202: once the store is back)."""
        card, ecard, person = scoped_card
        mirrored = await set_ecard_state(session, outbox, actor, card, ecard, ECardState(data.state), data.reason)
        return mirror_answer(card_out(pii, card, ecard, person), mirrored)

    @post(
        "/{card_id:uuid}/loss",
        status_code=200,
        summary="Report the card lost",
        responses=WRITE_PROBLEMS | pending_response(CardOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def loss(
        self,
        outbox: NamedDependency[MirrorOutbox],
        pii: NamedDependency[PiiCipher],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        data: JSONBody[CardAction],
    ) -> Response[CardOut]:
        """挂失: the card is lost and its eCard suspended at once (202: once the store is back)."""
        card, ecard, person = scoped_card
        mirrored = await report_loss(session, outbox, actor, card, ecard, LOSS_BY_OFFICE, data.reason)
        return mirror_answer(card_out(pii, card, ecard, person), mirrored)

    @post(
        "/{card_id:uuid}/loss/undo",
        status_code=200,
        summary="Undo a loss report",
        responses=WRITE_PROBLEMS | pending_response(CardOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def undo_loss(
        self,
        outbox: NamedDependency[MirrorOutbox],
        pii: NamedDependency[PiiCipher],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        data: JSONBody[CardAction],
    ) -> Response[CardOut]:
        """The card was found: back in use, and the eCard resumes if the loss was what suspended it."""
        card, ecard, person = scoped_card
        mirrored = await undo_loss(
            session,
            outbox,
            actor,
            card,
            ecard,
            holder_window=None,
            reason=data.reason,
        )
        return mirror_answer(card_out(pii, card, ecard, person), mirrored)

    @post(
        "/{card_id:uuid}/replacement",
        status_code=201,
        summary="Issue a replacement card",
        responses=WRITE_PROBLEMS | pending_response(IssuedCardOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def replacement(
        self,
        outbox: NamedDependency[MirrorOutbox],
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        operator: NamedDependency[OperatorSession],
        data: JSONBody[CardReplacement],
    ) -> Response[IssuedCardOut]:
        """A new card for a lost or damaged one: the eCard moves over, devices are unbound, a new code is issued."""
        card, ecard, _person = scoped_card
        replacement = await replace_card(
            session,
            pii,
            outbox,
            actor,
            card,
            ecard,
            new_card_number=data.card_number,
            code_ttl=settings.activation_code_ttl,
            session_ttl=settings.access_token_ttl,
            reason=data.reason,
        )
        new_card, new_ecard, person = await find_card(session, replacement.card.id, operator.regions)
        issued = IssuedCardOut(
            card=card_out(pii, new_card, new_ecard, person),
            activation_code=replacement.activation_code,
            activation_expires_at=replacement.activation_expires_at,
        )
        return mirror_answer(issued, replacement.mirrored, 201)

    @post(
        "/{card_id:uuid}/cancellation",
        status_code=200,
        summary="Cancel the card",
        responses=WRITE_PROBLEMS | pending_response(CardOut),
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def cancellation(
        self,
        outbox: NamedDependency[MirrorOutbox],
        pii: NamedDependency[PiiCipher],
        settings: NamedDependency[Settings],
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        data: JSONBody[CardAction],
    ) -> Response[CardOut]:
        """Withdraw the card for good; its eCard is revoked and every device unbound."""
        card, ecard, person = scoped_card
        mirrored = await cancel_card(
            session, outbox, actor, card, ecard,
            session_ttl=settings.access_token_ttl, reason=data.reason,
        )  # fmt: skip
        return mirror_answer(card_out(pii, card, ecard, person), mirrored)

    @post(
        "/{card_id:uuid}/pin-reset",
        status_code=204,
        summary="Reset the holder's PIN",
        responses=WRITE_PROBLEMS,
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def pin_reset(
        self,
        actor: NamedDependency[Actor],
        session: NamedDependency[AsyncSession],
        scoped_card: NamedDependency[ScopedCard],
        data: JSONBody[CardAction],
    ) -> None:
        """Clear a forgotten or locked PIN after checking the holder's identity at the counter."""
        _card, ecard, _person = scoped_card
        await reset_pin(session, actor, ecard, data.reason)
