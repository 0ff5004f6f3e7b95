"""The life of a card through the operator and holder APIs: both state machines, loss, replacement, cancellation.

Physical card: issued → active → lost → replaced | cancelled (lost → active undoes a loss).
eCard: pending_activation → active ⇄ suspended → revoked. Every legal transition is checked for
its result (in the API, in the database and in the status mirror the verify path reads), every
illegal one for its 409 with `current_state` and for leaving the card as it was.

Then what the states mean to the people involved: a loss report (at the office or from the app)
stops every gate at once and its undo restores exactly what the loss changed; a replacement card
carries the eCard (same id, same verifier pseudonyms) over after re-activation and unbinds every
device; a cancellation revokes. Card search is region-scoped.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import func, select, update

from app.db.clock import utcnow
from app.db.models import Card, ECard, Person
from app.domain.cards.services import CITIZEN_ID_FIELD
from app.domain.operators.services import Role
from app.server.context import ServiceContext
from crypto.keys import b64url_decode
from tests import factories
from tests.conftest import operator_token
from tests.factories import Gate, Holder, bearer, dpop, problem

SICHUAN, CHONGQING = "510000", "500000"
SEARCH = "/v1/operator/cards/search"
MIRROR_LETTER = {"pending_activation": "P", "active": "A", "suspended": "S", "revoked": "R"}


# --- helpers ---------------------------------------------------------------------------------


def action_request(action: str) -> tuple[str, dict[str, Any]]:
    """Path suffix and body of an operator action on a card."""
    if action == "loss":
        return "loss", {"reason": "lost on the metro"}
    if action == "undo":
        return "loss/undo", {"reason": "found at home"}
    if action == "replacement":
        return "replacement", {"card_number": factories.card_number(), "reason": "replacement after loss"}
    if action == "cancellation":
        return "cancellation", {"reason": "card withdrawn"}
    if action == "pin-reset":
        return "pin-reset", {"reason": "holder forgot the PIN"}
    raise AssertionError(action)


async def act(client: httpx.AsyncClient, token: str, card_id: str, action: str) -> httpx.Response:
    """POST an operator action on a card, whatever the outcome."""
    suffix, body = action_request(action)
    return await client.post(f"/v1/operator/cards/{card_id}/{suffix}", json=body, headers=bearer(token))


async def act_ok(client: httpx.AsyncClient, token: str, card_id: str, action: str) -> dict[str, Any]:
    """An operator action that must succeed; its body."""
    response = await act(client, token, card_id, action)
    assert response.status_code in (200, 201), f"{action}: {response.status_code} {response.text}"
    body: dict[str, Any] = response.json()
    return body


async def change_state(client: httpx.AsyncClient, token: str, card_id: str, state: str) -> httpx.Response:
    """POST .../ecard-state, whatever the outcome."""
    return await client.post(
        f"/v1/operator/cards/{card_id}/ecard-state",
        json={"state": state, "reason": "integration test"},
        headers=bearer(token),
    )


async def read_card(client: httpx.AsyncClient, token: str, card_id: str) -> dict[str, Any]:
    """GET a card as an operator (asserting 200)."""
    response = await client.get(f"/v1/operator/cards/{card_id}", headers=bearer(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def holder_card(client: httpx.AsyncClient, access_token: str) -> dict[str, Any]:
    """GET /v1/holder/card (asserting 200)."""
    response = await client.get("/v1/holder/card", auth=dpop(access_token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def mirrored(context: ServiceContext, ecard_id: str) -> str | None:
    """The status letter the verify path reads for the eCard."""
    async with context.sessions() as session:
        card_ref = await session.scalar(select(ECard.card_ref).where(ECard.id == uuid.UUID(ecard_id)))
    assert card_ref is not None
    return (await context.mirror.get_statuses([card_ref]))[0]


async def get_credentials(client: httpx.AsyncClient, access_token: str, purpose: str = "transit") -> httpx.Response:
    """POST /v1/holder/credentials, whatever the outcome."""
    return await client.post("/v1/holder/credentials", json={"purpose": purpose}, auth=dpop(access_token))


async def second_device(client: httpx.AsyncClient, token: str, holder: Holder) -> dict[str, Any]:
    """Bind another device to the holder's card with a fresh code from the office; its session."""
    response = await client.post(f"/v1/operator/cards/{holder.card_id}/activation-code", headers=bearer(token))
    assert response.status_code == 201, response.text
    return await factories.activate(client, holder.card_number, response.json()["activation_code"])


def card_ref_of(access_token: str) -> bytes:
    """The card reference a holder access token carries."""
    return b64url_decode(jwt.decode(access_token, options={"verify_signature": False})["crf"])


async def step_up_token(client: httpx.AsyncClient, access_token: str, pin: str) -> str:
    """Enter the PIN; the step-up token."""
    response = await client.post("/v1/holder/pin/verification", json={"pin": pin}, auth=dpop(access_token))
    assert response.status_code == 200, response.text
    token: str = response.json()["step_up_token"]
    return token


@dataclass
class Setup:
    """A card brought into a state; `card_id` is the id the test acts on."""

    card_id: str
    ecard_id: str
    card_number: str
    holder: Holder | None
    # After a replacement: the new card.
    new_card_id: str | None = None


async def card_in_state(client: httpx.AsyncClient, token: str, state: str) -> Setup:
    """A fresh Sichuan card whose physical card is in state (activated first unless 'issued')."""
    issued = await factories.issue_card(client, token, SICHUAN)
    card = issued["card"]
    setup = Setup(card["card_id"], card["ecard_id"], card["card_number"], None)
    if state == "issued":
        return setup
    session = await factories.activate(client, card["card_number"], issued["activation_code"])
    setup.holder = Holder(
        card["card_id"], card["ecard_id"], card["card_number"], session["access_token"], session["refresh_token"]
    )
    if state == "lost":
        await act_ok(client, token, setup.card_id, "loss")
    elif state == "replaced":
        setup.new_card_id = (await act_ok(client, token, setup.card_id, "replacement"))["card"]["card_id"]
    elif state == "cancelled":
        await act_ok(client, token, setup.card_id, "cancellation")
    if state != "replaced":
        assert (await read_card(client, token, setup.card_id))["card_state"] == state
    return setup


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def officer(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A card officer of Sichuan only."""
    return await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN])


@pytest.fixture(scope="module")
async def chongqing_officer(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A card officer of Chongqing only."""
    return await operator_token(client, context, Role.CARD_OFFICER, [CHONGQING])


# --- the physical card's state machine -------------------------------------------------------

LEGAL_CARD_TRANSITIONS = [
    # (start, action, card state after, eCard state after)
    ("issued", "loss", "lost", "pending_activation"),
    ("issued", "replacement", "replaced", "pending_activation"),
    ("issued", "cancellation", "cancelled", "revoked"),
    ("active", "loss", "lost", "suspended"),
    ("active", "replacement", "replaced", "pending_activation"),
    ("active", "cancellation", "cancelled", "revoked"),
    ("lost", "undo", "active", "active"),
    ("lost", "replacement", "replaced", "pending_activation"),
    ("lost", "cancellation", "cancelled", "revoked"),
]


@pytest.mark.parametrize(("start", "action", "card_after", "ecard_after"), LEGAL_CARD_TRANSITIONS)
async def test_legal_card_transition(
    client: httpx.AsyncClient,
    context: ServiceContext,
    officer: str,
    start: str,
    action: str,
    card_after: str,
    ecard_after: str,
) -> None:
    setup = await card_in_state(client, officer, start)
    response = await act(client, officer, setup.card_id, action)

    if action == "replacement":
        assert response.status_code == 201, response.text
        new = response.json()["card"]
        assert new["card_id"] != setup.card_id
        assert new["card_number"] != setup.card_number
        assert (new["card_state"], new["ecard_state"]) == ("issued", ecard_after)
        assert new["ecard_id"] == setup.ecard_id, "the eCard must move to the new card, not be re-created"
        assert await read_card(client, officer, new["card_id"]) == new
        # The old card is history: its id no longer leads to an eCard.
        problem(await client.get(f"/v1/operator/cards/{setup.card_id}", headers=bearer(officer)), 404)
        async with context.sessions() as session:
            old = await session.get(Card, uuid.UUID(setup.card_id))
        assert old is not None
        assert (old.state, old.replaced_by_id) == (card_after, uuid.UUID(new["card_id"]))
    else:
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["card_state"], body["ecard_state"]) == (card_after, ecard_after)
        assert await read_card(client, officer, setup.card_id) == body
    assert await mirrored(context, setup.ecard_id) == MIRROR_LETTER[ecard_after]


ILLEGAL_CARD_TRANSITIONS = [
    ("issued", "undo"),
    ("active", "undo"),
    ("lost", "loss"),
    ("cancelled", "loss"),
    ("cancelled", "undo"),
    ("cancelled", "replacement"),
    ("cancelled", "cancellation"),
]


@pytest.mark.parametrize(("start", "action"), ILLEGAL_CARD_TRANSITIONS)
async def test_illegal_card_transition_is_a_conflict_and_changes_nothing(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, start: str, action: str
) -> None:
    setup = await card_in_state(client, officer, start)
    before = await read_card(client, officer, setup.card_id)
    mirror_before = await mirrored(context, setup.ecard_id)

    body = problem(await act(client, officer, setup.card_id, action), 409)
    assert body["code"] == "conflict"
    assert body["current_state"] == start

    assert await read_card(client, officer, setup.card_id) == before
    assert await mirrored(context, setup.ecard_id) == mirror_before
    async with context.sessions() as session:
        cards = await session.scalar(
            select(func.count()).select_from(Card).where(Card.person_id == select(Card.person_id).where(
                Card.id == uuid.UUID(setup.card_id)).scalar_subquery())
        )  # fmt: skip
    assert cards == 1, "a refused replacement must not leave a new card behind"


async def test_everything_on_a_replaced_cards_old_id_is_404(
    client: httpx.AsyncClient, context: ServiceContext, officer: str
) -> None:
    setup = await card_in_state(client, officer, "replaced")
    assert setup.new_card_id is not None
    new_before = await read_card(client, officer, setup.new_card_id)
    calls: list[tuple[str, str, Any]] = [("GET", "", None), ("POST", "activation-code", None)]
    for action in ("loss", "undo", "replacement", "cancellation", "pin-reset"):
        suffix, body = action_request(action)
        calls.append(("POST", suffix, body))
    calls += [("POST", "ecard-state", {"state": state, "reason": "x"}) for state in ("active", "suspended", "revoked")]

    for method, suffix, body in calls:
        path = f"/v1/operator/cards/{{id}}/{suffix}".rstrip("/")
        old = await client.request(method, path.format(id=setup.card_id), json=body, headers=bearer(officer))
        missing = await client.request(method, path.format(id=uuid.uuid4()), json=body, headers=bearer(officer))
        assert problem(old, 404)["code"] == "not_found", f"{method} {suffix}"
        assert factories.without_request_id(old) == factories.without_request_id(missing), (
            f"{method} {suffix}: {old.text} != {missing.text}"
        )

    # Nothing reached the eCard through the old id.
    assert await read_card(client, officer, setup.new_card_id) == new_before
    assert await mirrored(context, setup.ecard_id) == "P"


# --- the eCard's state machine (and the physical card's say in it) ---------------------------

ECARD_TRANSITIONS = [
    # (setup, target, expected status, eCard state after or current_state of the 409)
    ("pending_activation", "active", 409, "pending_activation"),
    ("pending_activation", "suspended", 409, "pending_activation"),
    ("pending_activation", "revoked", 200, "revoked"),
    ("active", "active", 409, "active"),
    ("active", "suspended", 200, "suspended"),
    ("active", "revoked", 200, "revoked"),
    ("suspended", "active", 200, "active"),
    ("suspended", "suspended", 409, "suspended"),
    ("suspended", "revoked", 200, "revoked"),
    ("revoked", "active", 409, "revoked"),
    ("revoked", "suspended", 409, "revoked"),
    ("revoked", "revoked", 409, "revoked"),
    # The physical card is lost (its eCard suspended by the loss): only undoing the loss resumes it.
    ("card_lost", "active", 409, "lost"),
    ("card_lost", "suspended", 409, "suspended"),
    ("card_lost", "revoked", 200, "revoked"),
    # A cancelled card's eCard is revoked for good.
    ("card_cancelled", "active", 409, "revoked"),
    ("card_cancelled", "suspended", 409, "revoked"),
    ("card_cancelled", "revoked", 409, "revoked"),
]


async def ecard_in_state(client: httpx.AsyncClient, token: str, state: str) -> Setup:
    """A fresh Sichuan card with its eCard in state (or its physical card lost / cancelled)."""
    if state == "pending_activation":
        return await card_in_state(client, token, "issued")
    if state in ("card_lost", "card_cancelled"):
        return await card_in_state(client, token, state.removeprefix("card_"))
    setup = await card_in_state(client, token, "active")
    if state != "active":
        assert (await change_state(client, token, setup.card_id, state)).status_code == 200
    return setup


@pytest.mark.parametrize(("start", "target", "status", "outcome"), ECARD_TRANSITIONS)
async def test_ecard_transition(
    client: httpx.AsyncClient,
    context: ServiceContext,
    officer: str,
    start: str,
    target: str,
    status: int,
    outcome: str,
) -> None:
    setup = await ecard_in_state(client, officer, start)
    before = await read_card(client, officer, setup.card_id)
    mirror_before = await mirrored(context, setup.ecard_id)
    response = await change_state(client, officer, setup.card_id, target)
    if status == 200:
        assert response.status_code == 200, response.text
        assert response.json()["ecard_state"] == outcome
        after = await read_card(client, officer, setup.card_id)
        assert after["ecard_state"] == outcome
        assert after["card_state"] == before["card_state"], "an eCard change must leave the physical card alone"
        assert await mirrored(context, setup.ecard_id) == MIRROR_LETTER[outcome]
    else:
        body = problem(response, 409)
        assert body["current_state"] == outcome
        assert await read_card(client, officer, setup.card_id) == before
        assert await mirrored(context, setup.ecard_id) == mirror_before


# --- undoing a loss restores what the loss changed -------------------------------------------


async def test_undoing_the_loss_of_a_never_activated_card_leaves_it_issued(
    client: httpx.AsyncClient, officer: str
) -> None:
    setup = await card_in_state(client, officer, "issued")
    await act_ok(client, officer, setup.card_id, "loss")
    body = await act_ok(client, officer, setup.card_id, "undo")
    assert (body["card_state"], body["ecard_state"]) == ("issued", "pending_activation")


async def test_undoing_the_loss_of_a_replacement_card_not_yet_activated_leaves_it_issued(
    client: httpx.AsyncClient, officer: str
) -> None:
    setup = await card_in_state(client, officer, "replaced")
    assert setup.new_card_id is not None
    assert (await read_card(client, officer, setup.new_card_id))["card_state"] == "issued"
    await act_ok(client, officer, setup.new_card_id, "loss")
    body = await act_ok(client, officer, setup.new_card_id, "undo")
    assert (body["card_state"], body["ecard_state"]) == ("issued", "pending_activation"), (
        "undoing the loss of a replacement card that was never activated made it "
        f"{body['card_state']!r}: undo_loss (app/domain/cards/lifecycle.py) restores ACTIVE whenever "
        "ecard.activated_at is set, and the eCard keeps the activated_at of the OLD card"
    )


async def test_a_card_reported_lost_before_activation_cannot_be_activated(
    client: httpx.AsyncClient, context: ServiceContext, officer: str
) -> None:
    """Whoever holds the lost card and its activation letter must not get a working eCard."""
    issued = await factories.issue_card(client, officer, SICHUAN)
    card = issued["card"]
    await act_ok(client, officer, card["card_id"], "loss")

    device = factories.DeviceKey()
    response = await client.post(
        "/v1/holder/activation",
        json={
            "card_number": card["card_number"],
            "activation_code": issued["activation_code"],
            "device_public_key": device.public_key,
        },
        auth=device.auth(),
    )
    after = await read_card(client, officer, card["card_id"])
    assert response.status_code in (401, 409), (
        f"a card reported lost was activated ({response.status_code}); its eCard is now {after['ecard_state']} "
        f"and mirrored as {await mirrored(context, card['ecard_id'])!r} while the card is {after['card_state']}: "
        "activate() (app/domain/holders/services.py) checks only the eCard state, not that the card is lost"
    )
    assert (after["card_state"], after["ecard_state"]) == ("lost", "pending_activation")
    assert await mirrored(context, card["ecard_id"]) != "A"


# --- loss reported at the office -------------------------------------------------------------


async def test_office_loss_suspends_at_once_and_its_undo_restores_everything(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, gate: Gate
) -> None:
    [before_loss] = await factories.credentials(client, holder)
    [kept_for_later] = await factories.credentials(client, holder)

    body = await act_ok(client, officer, holder.card_id, "loss")
    assert (body["card_state"], body["ecard_state"]) == ("lost", "suspended")
    assert (await factories.verify(client, gate, before_loss))["reason"] == "card_suspended"
    refused = problem(await get_credentials(client, holder.access_token), 409)
    assert refused["code"] == "conflict"
    seen = await holder_card(client, holder.access_token)
    assert (seen["card_state"], seen["ecard_state"]) == ("lost", "suspended")
    async with context.sessions() as session:
        row = await session.get(Card, uuid.UUID(holder.card_id))
        assert row is not None and row.loss_reported_by == "office" and row.lost_at is not None

    body = await act_ok(client, officer, holder.card_id, "undo")
    assert (body["card_state"], body["ecard_state"]) == ("active", "active")
    # A credential issued before the loss is good again (it was never presented), and new ones come.
    assert (await factories.verify(client, gate, kept_for_later))["result"] == "accepted"
    [fresh] = await factories.credentials(client, holder)
    assert (await factories.verify(client, gate, fresh))["result"] == "accepted"
    async with context.sessions() as session:
        row = await session.get(Card, uuid.UUID(holder.card_id))
        assert row is not None and row.loss_reported_by is None and row.lost_at is None


async def test_undoing_a_loss_does_not_lift_an_operators_suspension(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, gate: Gate
) -> None:
    assert (await change_state(client, officer, holder.card_id, "suspended")).status_code == 200
    body = await act_ok(client, officer, holder.card_id, "loss")
    assert (body["card_state"], body["ecard_state"]) == ("lost", "suspended")

    body = await act_ok(client, officer, holder.card_id, "undo")
    assert (body["card_state"], body["ecard_state"]) == ("active", "suspended"), "the undo resumed the eCard"
    assert await mirrored(context, holder.ecard_id) == "S"
    assert problem(await get_credentials(client, holder.access_token), 409)["code"] == "conflict"

    # The operator's own resume still works.
    assert (await change_state(client, officer, holder.card_id, "active")).status_code == 200
    [credential] = await factories.credentials(client, holder)
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


# --- loss reported from the app --------------------------------------------------------------


async def holder_loss(client: httpx.AsyncClient, holder: Holder) -> httpx.Response:
    """POST /v1/holder/card/loss."""
    return await client.post("/v1/holder/card/loss", json={}, auth=holder.auth)


async def holder_undo(client: httpx.AsyncClient, holder: Holder, step_up: str | None = None) -> httpx.Response:
    """POST /v1/holder/card/loss/undo, with a step-up token if given."""
    body = {} if step_up is None else {"step_up_token": step_up}
    return await client.post("/v1/holder/card/loss/undo", json=body, auth=holder.auth)


async def test_holder_loss_report_suspends_at_once_and_the_holder_can_undo_it(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, gate: Gate
) -> None:
    [before_loss] = await factories.credentials(client, holder)
    [kept_for_later] = await factories.credentials(client, holder)

    response = await holder_loss(client, holder)
    assert response.status_code == 204, response.text
    assert (await factories.verify(client, gate, before_loss))["reason"] == "card_suspended"
    assert problem(await get_credentials(client, holder.access_token), 409)["code"] == "conflict"
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("lost", "suspended")
    assert await mirrored(context, holder.ecard_id) == "S"
    async with context.sessions() as session:
        row = await session.get(Card, uuid.UUID(holder.card_id))
        assert row is not None and row.loss_reported_by == "holder"

    # No PIN is set, so no step-up is asked for.
    response = await holder_undo(client, holder)
    assert response.status_code == 204, response.text
    seen = await holder_card(client, holder.access_token)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "active")
    assert (await factories.verify(client, gate, kept_for_later))["result"] == "accepted"


async def test_holder_undo_needs_a_step_up_when_a_pin_is_set(
    client: httpx.AsyncClient, officer: str, holder: Holder
) -> None:
    await factories.step_up(client, holder)  # sets the PIN
    assert (await holder_loss(client, holder)).status_code == 204

    refused = problem(await holder_undo(client, holder), 403)
    assert refused["code"] == "step_up_required"
    assert problem(await holder_undo(client, holder, "not-a-token"), 403)["code"] == "step_up_required"
    assert (await read_card(client, officer, holder.card_id))["card_state"] == "lost"

    token = await step_up_token(client, holder.access_token, factories.HOLDER_PIN)
    response = await holder_undo(client, holder, token)
    assert response.status_code == 204, response.text
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "active")


@pytest.mark.parametrize("with_pin", [False, True], ids=["no-pin", "pin-and-step-up"])
async def test_holder_cannot_undo_a_loss_reported_at_the_office(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, with_pin: bool
) -> None:
    token = await factories.step_up(client, holder) if with_pin else None
    await act_ok(client, officer, holder.card_id, "loss")

    refused = problem(await holder_undo(client, holder, token), 403)
    assert refused["code"] == "forbidden"
    assert "office" in refused["detail"]
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("lost", "suspended")
    assert await mirrored(context, holder.ecard_id) == "S"
    # The office can.
    body = await act_ok(client, officer, holder.card_id, "undo")
    assert (body["card_state"], body["ecard_state"]) == ("active", "active")


async def test_holder_cannot_undo_a_loss_after_the_window(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder
) -> None:
    assert (await holder_loss(client, holder)).status_code == 204
    async with context.sessions() as session:
        await session.execute(
            update(Card).where(Card.id == uuid.UUID(holder.card_id)).values(lost_at=utcnow() - timedelta(days=8))
        )
        await session.commit()
    refused = problem(await holder_undo(client, holder), 403)
    assert refused["code"] == "forbidden"
    assert (await read_card(client, officer, holder.card_id))["card_state"] == "lost"
    body = await act_ok(client, officer, holder.card_id, "undo")
    assert (body["card_state"], body["ecard_state"]) == ("active", "active")


async def test_holder_loss_and_undo_leave_an_operators_suspension_in_place(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder
) -> None:
    assert (await change_state(client, officer, holder.card_id, "suspended")).status_code == 200
    assert (await holder_loss(client, holder)).status_code == 204
    assert (await holder_undo(client, holder)).status_code == 204
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "suspended"), (
        "a holder lifted an operator's suspension by reporting a loss and undoing it"
    )
    assert await mirrored(context, holder.ecard_id) == "S"


async def test_holders_illegal_loss_actions_are_conflicts(
    client: httpx.AsyncClient, officer: str, holder: Holder
) -> None:
    not_lost = problem(await holder_undo(client, holder), 409)
    assert not_lost["current_state"] == "active"
    assert (await holder_loss(client, holder)).status_code == 204
    again = problem(await holder_loss(client, holder), 409)
    assert again["current_state"] == "lost"
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("lost", "suspended")


# --- replacement -----------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["active", "lost"])
async def test_replacement_moves_the_ecard_and_unbinds_every_device(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, gate: Gate, start: str
) -> None:
    tablet = await second_device(client, officer, holder)
    [seen_before] = await factories.credentials(client, holder)
    before = await factories.verify(client, gate, seen_before)
    assert before["result"] == "accepted"
    [issued_before] = await factories.credentials(client, holder)
    if start == "lost":
        await act_ok(client, officer, holder.card_id, "loss")

    new_number = factories.card_number()
    response = await client.post(
        f"/v1/operator/cards/{holder.card_id}/replacement",
        json={"card_number": new_number.lower(), "reason": "card damaged"},
        headers=bearer(officer),
    )
    assert response.status_code == 201, response.text
    replaced = response.json()
    new = replaced["card"]
    assert new["card_number"] == new_number
    assert (new["card_state"], new["ecard_state"]) == ("issued", "pending_activation")
    assert new["ecard_id"] == holder.ecard_id
    assert new["region"] == SICHUAN
    assert replaced["activation_code"]

    # Every device is unbound at once: access tokens and refresh tokens.
    for access, refresh in (
        (holder.access_token, holder.refresh_token),
        (tablet["access_token"], tablet["refresh_token"]),
    ):
        assert problem(await client.get("/v1/holder/card", auth=dpop(access)), 401)["code"] == "unauthorized"
        assert problem(await get_credentials(client, access), 401)["code"] == "unauthorized"
        assert problem(await client.post("/v1/holder/token", json={"refresh_token": refresh}, auth=dpop(refresh)), 401)[
            "code"
        ] in (
            "invalid_refresh_token",
            "refresh_token_reused",
        )
    # Credentials issued before cannot pass a gate.
    assert (await factories.verify(client, gate, issued_before))["reason"] == "card_suspended"
    assert await mirrored(context, holder.ecard_id) == "P"

    # The old card number leads nowhere, even with the new code.
    device = factories.DeviceKey()
    old_try = await client.post(
        "/v1/holder/activation",
        json={
            "card_number": holder.card_number,
            "activation_code": replaced["activation_code"],
            "device_public_key": device.public_key,
        },
        auth=device.auth(),
    )
    assert problem(old_try, 401)["code"] == "activation_failed"

    # Re-activation with the new card: the same eCard, active again, on the new card.
    session = await factories.activate(client, new_number, replaced["activation_code"])
    assert session["ecard_id"] == holder.ecard_id
    seen = await holder_card(client, session["access_token"])
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "active")
    assert seen["card_number"] == "*****" + new_number[-4:]
    assert (await read_card(client, officer, new["card_id"]))["card_state"] == "active"
    devices = await client.get("/v1/holder/devices", auth=dpop(session["access_token"]))
    assert [d["id"] for d in devices.json()] == [session["device_id"]]

    # The card reference is kept, so a verifier's pseudonym for the holder does not change.
    assert card_ref_of(session["access_token"]) == card_ref_of(holder.access_token)
    renewed = Holder(
        new["card_id"],
        holder.ecard_id,
        new_number,
        session["access_token"],
        session["refresh_token"],
        factories.key_of(session["access_token"]),
    )
    [after_credential] = await factories.credentials(client, renewed)
    after = await factories.verify(client, gate, after_credential)
    assert after["result"] == "accepted"
    assert after["claims"]["card_pseudonym"] == before["claims"]["card_pseudonym"]


async def test_replacement_with_a_card_number_in_use_is_a_conflict_and_changes_nothing(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder
) -> None:
    other = await factories.issue_card(client, officer, SICHUAN)
    taken = other["card"]["card_number"]
    for number in (taken, holder.card_number):
        response = await client.post(
            f"/v1/operator/cards/{holder.card_id}/replacement",
            json={"card_number": number, "reason": "replacement"},
            headers=bearer(officer),
        )
        assert response.status_code == 409, f"replacement with card number {number} in use: {response.text}"
        assert problem(response, 409)["code"] == "conflict"
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "active")
    assert (await get_credentials(client, holder.access_token)).status_code == 200


async def test_replacement_with_a_malformed_card_number_is_a_400_and_changes_nothing(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder
) -> None:
    response = await client.post(
        f"/v1/operator/cards/{holder.card_id}/replacement",
        json={"card_number": "T1234-678", "reason": "replacement"},
        headers=bearer(officer),
    )
    assert problem(response, 400)["detail"] == "card number must be 9 letters or digits"
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "active")
    assert (await client.get("/v1/holder/card", auth=holder.auth)).status_code == 200


async def test_replacement_of_a_card_with_a_revoked_ecard_is_a_conflict(
    client: httpx.AsyncClient, officer: str, holder: Holder
) -> None:
    assert (await change_state(client, officer, holder.card_id, "revoked")).status_code == 200
    body = problem(await act(client, officer, holder.card_id, "replacement"), 409)
    assert body["current_state"] == "revoked"
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "revoked")


# --- cancellation ----------------------------------------------------------------------------


async def test_cancellation_revokes_the_ecard_and_unbinds_every_device(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, gate: Gate
) -> None:
    tablet = await second_device(client, officer, holder)
    [issued_before] = await factories.credentials(client, holder)

    body = await act_ok(client, officer, holder.card_id, "cancellation")
    assert (body["card_state"], body["ecard_state"]) == ("cancelled", "revoked")
    assert (await factories.verify(client, gate, issued_before))["reason"] == "card_revoked"
    assert await mirrored(context, holder.ecard_id) == "R"
    for access, refresh in (
        (holder.access_token, holder.refresh_token),
        (tablet["access_token"], tablet["refresh_token"]),
    ):
        assert problem(await client.get("/v1/holder/devices", auth=dpop(access)), 401)["code"] == "unauthorized"
        assert problem(await client.post("/v1/holder/token", json={"refresh_token": refresh}, auth=dpop(refresh)), 401)[
            "code"
        ] in (
            "invalid_refresh_token",
            "refresh_token_reused",
        )


# --- concurrency -----------------------------------------------------------------------------


RACE_LOST_UPDATE = (
    "the loser of a race must get a 409; a 500 here comes from _move_card/_move_ecard "
    "(app/domain/cards/lifecycle.py:73-74 and 84-85): they call session.rollback(), which expires the "
    "loaded Card/ECard, and then read card.state / ecard.state for the problem body, a lazy load that "
    "cannot run under asyncio (MissingGreenlet). Take the state before the rollback."
)


async def test_concurrent_loss_reports_succeed_once(client: httpx.AsyncClient, officer: str, holder: Holder) -> None:
    responses = await asyncio.gather(*(act(client, officer, holder.card_id, "loss") for _ in range(5)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 409, 409, 409, 409], f"{statuses}: {RACE_LOST_UPDATE}"
    for response in responses:
        if response.status_code == 409:
            assert problem(response, 409)["current_state"] in ("active", "lost")
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("lost", "suspended")


async def test_concurrent_suspensions_succeed_once(client: httpx.AsyncClient, officer: str, holder: Holder) -> None:
    responses = await asyncio.gather(*(change_state(client, officer, holder.card_id, "suspended") for _ in range(5)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200, 409, 409, 409, 409], f"{statuses}: {RACE_LOST_UPDATE}"
    seen = await read_card(client, officer, holder.card_id)
    assert (seen["card_state"], seen["ecard_state"]) == ("active", "suspended")


async def test_concurrent_replacements_issue_one_card(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder
) -> None:
    responses = await asyncio.gather(*(act(client, officer, holder.card_id, "replacement") for _ in range(2)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses in ([201, 404], [201, 409]), f"{statuses}: {RACE_LOST_UPDATE}"
    async with context.sessions() as session:
        person_id = await session.scalar(select(Card.person_id).where(Card.id == uuid.UUID(holder.card_id)))
        cards = (await session.scalars(select(Card).where(Card.person_id == person_id))).all()
    assert sorted(card.state for card in cards) == ["issued", "replaced"], "a refused replacement left a card"


# --- search ----------------------------------------------------------------------------------


async def test_search_by_card_number_and_citizen_id_is_region_scoped(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, chongqing_officer: str
) -> None:
    citizen_id, number = factories.citizen_id(SICHUAN), factories.card_number()
    response = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": citizen_id, "name": "李四", "card_number": number},
        headers=bearer(officer),
    )
    assert response.status_code == 201, response.text
    card = response.json()["card"]

    for query in ({"card_number": number}, {"card_number": number.lower()}, {"citizen_id": citizen_id}):
        found = await client.post(SEARCH, json=query, headers=bearer(officer))
        assert found.status_code == 200, found.text
        assert found.json() == [card], query
        assert citizen_id not in found.text

        foreign = await client.post(SEARCH, json=query, headers=bearer(chongqing_officer))
        assert foreign.status_code == 200, foreign.text
        assert foreign.json() == [], f"a Chongqing officer found a Sichuan card by {query}"

    nothing = await client.post(SEARCH, json={"card_number": factories.card_number()}, headers=bearer(officer))
    assert nothing.status_code == 200 and nothing.json() == []
    # Auditors may search; verifier managers may not.
    auditor = await operator_token(client, context, Role.AUDITOR, [SICHUAN])
    audited = await client.post(SEARCH, json={"citizen_id": citizen_id}, headers=bearer(auditor))
    assert [c["card_id"] for c in audited.json()] == [card["card_id"]]
    manager = await operator_token(client, context, Role.VERIFIER_MANAGER, [SICHUAN])
    refused = await client.post(SEARCH, json={"card_number": number}, headers=bearer(manager))
    assert problem(refused, 403)["code"] == "forbidden"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"card_number": ""},
        {"citizen_id": ""},
        {"card_number": None},
        {"card_number": "A12345678", "citizen_id": "11010519491231002X"},
        {"name": "张三"},
    ],
    ids=["none", "empty-number", "empty-id", "null", "both", "by-name"],
)
async def test_search_needs_exactly_one_criterion(
    client: httpx.AsyncClient, officer: str, body: dict[str, str]
) -> None:
    response = await client.post(SEARCH, json=body, headers=bearer(officer))
    assert problem(response, 400)["code"] == "bad_request"
    assert "11010519491231002X" not in response.text


async def test_no_look_up_by_personal_data_in_the_url(client: httpx.AsyncClient, officer: str) -> None:
    """The old `GET /v1/operator/cards?card_number=…` is gone: its URL put card numbers in access logs."""
    response = await client.get("/v1/operator/cards", params={"card_number": "A12345678"}, headers=bearer(officer))
    assert problem(response, 405)["code"] == "method_not_allowed"


async def test_search_by_citizen_id_finds_the_replacement_card(
    client: httpx.AsyncClient, context: ServiceContext, officer: str
) -> None:
    citizen_id = factories.citizen_id(SICHUAN)
    response = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": citizen_id, "name": "王五", "card_number": factories.card_number()},
        headers=bearer(officer),
    )
    old_id = response.json()["card"]["card_id"]
    new = (await act_ok(client, officer, old_id, "replacement"))["card"]
    found = await client.post(SEARCH, json={"citizen_id": citizen_id}, headers=bearer(officer))
    assert found.status_code == 200, found.text
    assert new in found.json()
    index = context.pii.blind_index(citizen_id, CITIZEN_ID_FIELD)
    async with context.sessions() as session:
        persons = await session.scalar(select(func.count()).select_from(Person).where(Person.citizen_id_index == index))
    assert persons == 1, "a replacement must not register the person again"


# --- object-level authorisation of the new endpoints -----------------------------------------

ACTIONS = ["loss", "undo", "replacement", "cancellation", "pin-reset"]


@pytest.mark.parametrize("action", ACTIONS)
async def test_card_of_another_region_answers_like_a_missing_one(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, officer: str, action: str
) -> None:
    foreign = await factories.activated_holder(client, admin_token, CHONGQING)
    if action == "undo":
        await act_ok(client, admin_token, foreign.card_id, "loss")
    before = await read_card(client, admin_token, foreign.card_id)
    suffix, body = action_request(action)
    hidden = await client.post(f"/v1/operator/cards/{foreign.card_id}/{suffix}", json=body, headers=bearer(officer))
    missing = await client.post(f"/v1/operator/cards/{uuid.uuid4()}/{suffix}", json=body, headers=bearer(officer))
    assert problem(hidden, 404)["code"] == "not_found"
    assert factories.without_request_id(hidden) == factories.without_request_id(missing)
    assert factories.headers_without_request_id(hidden) == factories.headers_without_request_id(missing)
    assert await read_card(client, admin_token, foreign.card_id) == before
    assert (await client.get("/v1/holder/card", auth=foreign.auth)).status_code == 200


@pytest.mark.parametrize("role", [Role.AUDITOR, Role.VERIFIER_MANAGER])
async def test_only_card_officers_change_cards(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, holder: Holder, role: Role
) -> None:
    token = await operator_token(client, context, role, [SICHUAN])
    before = await read_card(client, admin_token, holder.card_id)
    for action in ACTIONS:
        assert problem(await act(client, token, holder.card_id, action), 403)["code"] == "forbidden", action
    assert problem(await change_state(client, token, holder.card_id, "suspended"), 403)["code"] == "forbidden"
    assert await read_card(client, admin_token, holder.card_id) == before


# --- the status mirror -----------------------------------------------------------------------


async def test_every_status_change_reaches_verify_at_once(
    client: httpx.AsyncClient, context: ServiceContext, officer: str, holder: Holder, gate: Gate
) -> None:
    """Each change is followed at once (no sleep) by a verification of a credential issued before it."""

    async def run(operation: str) -> None:
        if operation in ("suspend", "resume", "revoke"):
            target = {"suspend": "suspended", "resume": "active", "revoke": "revoked"}[operation]
            assert (await change_state(client, officer, holder.card_id, target)).status_code == 200
        elif operation == "holder-loss":
            assert (await holder_loss(client, holder)).status_code == 204
        elif operation == "holder-undo":
            assert (await holder_undo(client, holder)).status_code == 204
        else:
            await act_ok(client, officer, holder.card_id, operation)

    card_ref = card_ref_of(holder.access_token)
    for stop, restart in (("suspend", "resume"), ("loss", "undo"), ("holder-loss", "holder-undo")):
        [first] = await factories.credentials(client, holder)
        [second] = await factories.credentials(client, holder)
        await run(stop)
        assert (await context.mirror.get_statuses([card_ref]))[0] == "S", stop
        assert (await factories.verify(client, gate, first))["reason"] == "card_suspended", stop
        await run(restart)
        assert (await context.mirror.get_statuses([card_ref]))[0] == "A", restart
        assert (await factories.verify(client, gate, second))["result"] == "accepted", restart

    [last] = await factories.credentials(client, holder)
    await run("revoke")
    assert (await context.mirror.get_statuses([card_ref]))[0] == "R"
    assert (await factories.verify(client, gate, last))["reason"] == "card_revoked"
