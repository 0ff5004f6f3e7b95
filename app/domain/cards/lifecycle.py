"""The life of a card: the physical card's and the eCard's state machines, loss, replacement.

Physical card: issued → active → lost → replaced | cancelled (lost → active undoes a loss;
issued/active → replaced or cancelled directly for damaged or withdrawn cards).
eCard: pending_activation → active ⇄ suspended → revoked.

Every change is a conditional UPDATE on the state it was decided from (a concurrent change
makes it a 409, never a lost update), is audited and staged for the status mirror in the same
transaction, and reaches the mirror after the commit (app/domain/cards/mirroring.py). Each returns
whether the mirror has it already (False: the store did not answer; the change is queued and
applied as soon as it does, and verification fails closed meanwhile).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.clock import utcnow
from app.db.models import Card, CardState, Device, ECard, ECardState, RefreshToken, SuspensionCause
from app.domain import errors
from app.domain.audit.services import Actor, record
from app.domain.cards.mirroring import MirrorOutbox, stage_card, stage_device
from app.domain.cards.services import new_activation_code, normalise_card_number
from app.security.pii import PiiCipher

ECARD_TRANSITIONS: dict[ECardState, frozenset[ECardState]] = {
    ECardState.PENDING_ACTIVATION: frozenset({ECardState.REVOKED}),
    ECardState.ACTIVE: frozenset({ECardState.SUSPENDED, ECardState.REVOKED}),
    ECardState.SUSPENDED: frozenset({ECardState.ACTIVE, ECardState.REVOKED}),
    ECardState.REVOKED: frozenset(),
}
"""What an operator may do to an eCard directly (activation is the holder's own step)."""

CARD_TRANSITIONS: dict[CardState, frozenset[CardState]] = {
    CardState.ISSUED: frozenset({CardState.ACTIVE, CardState.LOST, CardState.REPLACED, CardState.CANCELLED}),
    CardState.ACTIVE: frozenset({CardState.LOST, CardState.REPLACED, CardState.CANCELLED}),
    CardState.LOST: frozenset({CardState.ACTIVE, CardState.REPLACED, CardState.CANCELLED}),
    CardState.REPLACED: frozenset(),
    CardState.CANCELLED: frozenset(),
}

LOSS_BY_HOLDER = "holder"
LOSS_BY_OFFICE = "office"


def _snapshot(card: Card, ecard: ECard) -> dict[str, Any]:
    return {
        "card_state": card.state,
        "ecard_state": ecard.state,
        "suspension_cause": ecard.suspension_cause,
    }


def _conflict(detail: str, current: str) -> errors.Conflict:
    return errors.Conflict(detail, current_state=current)


def _require_card_transition(card: Card, target: CardState) -> None:
    if target not in CARD_TRANSITIONS[CardState(card.state)]:
        raise _conflict(f"a card in state {card.state} cannot become {target.value}", card.state)


async def _move_card(session: AsyncSession, card: Card, target: CardState, **values: Any) -> None:
    current = card.state
    result = await session.execute(
        update(Card).where(Card.id == card.id, Card.state == current).values(state=target.value, **values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()  # expires the loaded rows: use only what was read before
        raise _conflict("the card changed meanwhile; read it again", current)


async def _move_ecard(session: AsyncSession, ecard: ECard, target: ECardState, **values: Any) -> None:
    current = ecard.state
    result = await session.execute(
        update(ECard)
        .where(ECard.id == ecard.id, ECard.state == current)
        .values(state=target.value, updated_at=utcnow(), **values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        await session.rollback()  # expires the loaded rows: use only what was read before
        raise _conflict("the eCard changed meanwhile; read it again", current)


async def _revoke_devices(session: AsyncSession, ecard: ECard, now: datetime) -> list[uuid.UUID]:
    """End every device binding and refresh-token family of the eCard (caller commits)."""
    revoked = await session.execute(
        update(Device)
        .where(Device.ecard_id == ecard.id, Device.revoked_at.is_(None))
        .values(revoked_at=now)
        .returning(Device.id)
    )
    device_ids = list(revoked.scalars())
    if device_ids:
        await session.execute(
            update(RefreshToken)
            .where(RefreshToken.device_id.in_(device_ids), RefreshToken.revoked_at.is_(None))
            .values(revoked_at=now)
        )
    return device_ids


async def _finish(
    session: AsyncSession,
    outbox: MirrorOutbox,
    card: Card,
    ecard: ECard,
    revoked_devices: list[uuid.UUID] | None = None,
    session_ttl: int = 0,
) -> bool:
    """Stage the change for the mirror, commit, reload, and publish it; whether the mirror has it."""
    await stage_card(session, ecard)
    for device_id in revoked_devices or []:
        stage_device(session, ecard.id, device_id, session_ttl)
    await session.commit()
    await session.refresh(card)
    await session.refresh(ecard)
    return await outbox.publish([ecard.id])


async def set_ecard_state(
    session: AsyncSession,
    outbox: MirrorOutbox,
    actor: Actor,
    card: Card,
    ecard: ECard,
    target: ECardState,
    reason: str,
) -> bool:
    """An operator suspends, resumes or revokes an eCard."""
    current = ECardState(ecard.state)
    if target not in ECARD_TRANSITIONS[current]:
        raise _conflict(f"an eCard in state {current.value} cannot become {target.value}", current.value)
    if target is ECardState.ACTIVE and card.state == CardState.LOST:
        raise _conflict("the card is reported lost: undo the loss or issue a replacement", card.state)
    before = _snapshot(card, ecard)
    cause = SuspensionCause.OPERATOR.value if target is ECardState.SUSPENDED else None
    await _move_ecard(session, ecard, target, suspension_cause=cause)
    record(
        session, actor, f"ecard.{target.value}", subject_type="card", subject_id=card.id,
        region=card.region_code, reason=reason, before=before,
        after={**before, "ecard_state": target.value, "suspension_cause": cause},
    )  # fmt: skip
    return await _finish(session, outbox, card, ecard)


async def report_loss(
    session: AsyncSession,
    outbox: MirrorOutbox,
    actor: Actor,
    card: Card,
    ecard: ECard,
    reported_by: str,
    reason: str,
) -> bool:
    """Mark the physical card lost and suspend its eCard at once (挂失)."""
    _require_card_transition(card, CardState.LOST)
    before = _snapshot(card, ecard)
    now = utcnow()
    await _move_card(session, card, CardState.LOST, lost_at=now, loss_reported_by=reported_by)
    if ecard.state == ECardState.ACTIVE:
        await _move_ecard(session, ecard, ECardState.SUSPENDED, suspension_cause=SuspensionCause.CARD_LOST.value)
    await session.flush()
    await session.refresh(ecard)
    record(
        session, actor, "card.lost", subject_type="card", subject_id=card.id, region=card.region_code,
        reason=reason, before=before, after={**_snapshot(card, ecard), "card_state": CardState.LOST.value},
    )  # fmt: skip
    return await _finish(session, outbox, card, ecard)


async def undo_loss(
    session: AsyncSession,
    outbox: MirrorOutbox,
    actor: Actor,
    card: Card,
    ecard: ECard,
    *,
    holder_window: timedelta | None,
    reason: str,
) -> bool:
    """The card was found: back to use, and the eCard resumes if the loss was what suspended it.

    `holder_window` is set when the holder undoes it from the app: then only the holder's own
    report may be undone, and only within the window. The office (None) may undo any report.
    """
    if card.state != CardState.LOST:
        raise _conflict("the card is not reported lost", card.state)
    if holder_window is not None:
        if card.loss_reported_by != LOSS_BY_HOLDER:
            raise errors.Forbidden("the loss was reported at the card office; undo it there")
        if card.lost_at is None or utcnow() - card.lost_at > holder_window:
            raise errors.Forbidden("too late to undo the loss from the app; visit the card office")
    before = _snapshot(card, ecard)
    # Activated on this card (a replacement waits for re-activation in pending_activation)?
    restored = CardState.ISSUED if ecard.state == ECardState.PENDING_ACTIVATION else CardState.ACTIVE
    await _move_card(session, card, restored, lost_at=None, loss_reported_by=None)
    if ecard.state == ECardState.SUSPENDED and ecard.suspension_cause == SuspensionCause.CARD_LOST:
        await _move_ecard(session, ecard, ECardState.ACTIVE, suspension_cause=None)
    await session.flush()
    await session.refresh(ecard)
    record(
        session, actor, "card.found", subject_type="card", subject_id=card.id, region=card.region_code,
        reason=reason, before=before, after={**_snapshot(card, ecard), "card_state": restored.value},
    )  # fmt: skip
    return await _finish(session, outbox, card, ecard)


@dataclass(frozen=True, slots=True)
class Replacement:
    """A replacement card and the activation code that carries the eCard over to it."""

    card: Card
    activation_code: str
    activation_expires_at: datetime
    # Whether the status mirror has the change already (see the module docstring).
    mirrored: bool = True


async def replace_card(
    session: AsyncSession,
    pii: PiiCipher,
    outbox: MirrorOutbox,
    actor: Actor,
    card: Card,
    ecard: ECard,
    *,
    new_card_number: str,
    code_ttl: int,
    session_ttl: int,
    reason: str,
) -> Replacement:
    """Issue a new physical card; the eCard moves to it and waits for re-activation.

    The eCard keeps its identity (and its card reference, so verifiers' pseudonyms stay
    stable), every device bound to it is unbound, and a fresh activation code is issued.
    """
    _require_card_transition(card, CardState.REPLACED)
    if ecard.state == ECardState.REVOKED:
        raise _conflict("the eCard is revoked; issue a new card instead", ecard.state)
    number = normalise_card_number(new_card_number)
    before = _snapshot(card, ecard)
    now = utcnow()
    new_card = Card(
        id=uuid.uuid4(),
        person_id=card.person_id,
        region_code=card.region_code,
        card_number=number,
        state=CardState.ISSUED.value,
        created_at=now,
    )
    session.add(new_card)
    await session.flush()
    await _move_card(session, card, CardState.REPLACED, replaced_by_id=new_card.id)
    await _move_ecard(session, ecard, ECardState.PENDING_ACTIVATION, card_id=new_card.id, suspension_cause=None)
    await session.flush()
    await session.refresh(ecard)
    devices = await _revoke_devices(session, ecard, now)
    code, expires_at = await new_activation_code(session, pii, ecard, code_ttl)
    record(
        session, actor, "card.replaced", subject_type="card", subject_id=card.id, region=card.region_code,
        reason=reason, before=before,
        after={"card_state": CardState.REPLACED.value, "replaced_by": str(new_card.id),
               "ecard_state": ECardState.PENDING_ACTIVATION.value, "devices_unbound": len(devices)},
    )  # fmt: skip
    mirrored = await _finish(session, outbox, card, ecard, devices, session_ttl)
    await session.refresh(new_card)
    return Replacement(new_card, code, expires_at, mirrored)


async def cancel_card(
    session: AsyncSession,
    outbox: MirrorOutbox,
    actor: Actor,
    card: Card,
    ecard: ECard,
    *,
    session_ttl: int,
    reason: str,
) -> bool:
    """Withdraw the card for good: the eCard is revoked and every device unbound."""
    _require_card_transition(card, CardState.CANCELLED)
    before = _snapshot(card, ecard)
    await _move_card(session, card, CardState.CANCELLED)
    if ecard.state != ECardState.REVOKED:
        await _move_ecard(session, ecard, ECardState.REVOKED, suspension_cause=None)
    devices = await _revoke_devices(session, ecard, utcnow())
    record(
        session, actor, "card.cancelled", subject_type="card", subject_id=card.id, region=card.region_code,
        reason=reason, before=before,
        after={"card_state": CardState.CANCELLED.value, "ecard_state": ECardState.REVOKED.value},
    )  # fmt: skip
    return await _finish(session, outbox, card, ecard, devices, session_ttl)
