"""The audit log and operator sign-in, as an auditor and as someone guessing passwords would see them.

Every state-changing action, by an operator or a holder, leaves one event (who, what, on which
subject, in which region, why, before → after) that auditors read through the API, within their
regions only. Nothing can change the log: no endpoint offers it, and the database itself refuses
UPDATE and DELETE on `audit_events` (on SQLite and PostgreSQL). An action that fails leaves no
event.

Sign-in guessing is limited per account: five wrong passwords lock it for 15 minutes, during which
the right password gets the very same answer as a wrong one; parallel guesses gain nothing; a
success resets the count.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError

from app.db.clock import as_utc, utcnow
from app.db.models import AuditEvent, Operator
from app.domain.audit.services import Actor
from app.domain.operators.services import Role, create_operator
from app.server.context import ServiceContext
from tests import factories
from tests.conftest import operator_token
from tests.factories import Holder, bearer, problem

SICHUAN, CHONGQING = "510000", "500000"
MAX_FAILED_SIGN_INS = 5
MAX_PIN_TRIES = 5


# --- helpers ---------------------------------------------------------------------------------


def who(token: str) -> tuple[str, str]:
    """(operator id, username) of an operator token."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return claims["sub"], claims["name"]


def device_of(access_token: str) -> str:
    """The device id of a holder access token."""
    return str(jwt.decode(access_token, options={"verify_signature": False})["dev"])


def random_region() -> str:
    """A well-formed region code that no test registered before (with overwhelming likelihood)."""
    while True:
        code = f"{1 + secrets.randbelow(9)}{secrets.randbelow(10**5):05d}"
        if code not in factories.REGIONS:
            return code


async def audit_events(client: httpx.AsyncClient, token: str, **params: Any) -> list[dict[str, Any]]:
    """GET /v1/operator/audit-events (asserting 200), newest first."""
    response = await client.get("/v1/operator/audit-events", params=params, headers=bearer(token))
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


async def only_event(client: httpx.AsyncClient, token: str, subject_id: str, action: str) -> dict[str, Any]:
    """The one event of action on subject_id."""
    events = [e for e in await audit_events(client, token, subject_id=subject_id) if e["action"] == action]
    assert len(events) == 1, f"{len(events)} events {action} on {subject_id}"
    return events[0]


def assert_operator_event(event: dict[str, Any], token: str, **expected: Any) -> None:
    """An event by the operator of token, with the expected fields."""
    operator_id, username = who(token)
    assert (event["actor_type"], event["actor_id"], event["actor_name"]) == ("operator", operator_id, username)
    assert event["occurred_at"]
    for key, value in expected.items():
        assert event.get(key) == value, f"{event['action']}.{key}: {event.get(key)!r} != {value!r}"


async def post(client: httpx.AsyncClient, token: str, path: str, body: Any = None) -> dict[str, Any]:
    """POST that must succeed; the body (or {} for 204)."""
    response = await client.post(path, json=body, headers=bearer(token))
    assert response.status_code in (200, 201, 204), f"{path}: {response.status_code} {response.text}"
    return response.json() if response.content else {}


async def event_count(context: ServiceContext) -> int:
    """All rows of audit_events."""
    async with context.sessions() as session:
        return await session.scalar(select(func.count()).select_from(AuditEvent)) or 0


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def auditor(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """An auditor of every region."""
    return await operator_token(client, context, Role.AUDITOR, ["*"])


@pytest.fixture(scope="module")
async def officer(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A card officer of Sichuan only."""
    return await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN])


# --- what is audited -------------------------------------------------------------------------


async def test_region_registration_is_audited(client: httpx.AsyncClient, context: ServiceContext, auditor: str) -> None:
    admin = await operator_token(client, context, Role.ADMIN, ["*"])
    code = random_region()
    await post(client, admin, "/v1/operator/regions", {"code": code, "name": "测试省"})
    event = await only_event(client, auditor, code, "region.registered")
    assert_operator_event(event, admin, subject_type="region", subject_id=code, region=code, reason=None, before=None)
    assert event["after"]["name"] == "测试省"
    assert len(bytes.fromhex(event["after"]["kid"])) == 8


async def test_the_card_life_is_audited_with_reasons_and_before_after(
    client: httpx.AsyncClient, auditor: str, officer: str
) -> None:
    issued = await factories.issue_card(client, officer, SICHUAN)
    card_id, ecard_id = issued["card"]["card_id"], issued["card"]["ecard_id"]
    base = f"/v1/operator/cards/{card_id}"
    code = (await post(client, officer, f"{base}/activation-code"))["activation_code"]
    session = await factories.activate(client, issued["card"]["card_number"], code)
    holder = Holder(card_id, ecard_id, issued["card"]["card_number"], session["access_token"], session["refresh_token"])
    await post(client, officer, f"{base}/ecard-state", {"state": "suspended", "reason": "fraud check"})
    await post(client, officer, f"{base}/ecard-state", {"state": "active", "reason": "fraud check cleared"})
    await post(client, officer, f"{base}/loss", {"reason": "lost on the metro"})
    await post(client, officer, f"{base}/loss/undo", {"reason": "found at home"})
    await factories.step_up(client, holder)  # the holder sets a PIN
    await post(client, officer, f"{base}/pin-reset", {"reason": "PIN forgotten, identity checked"})
    new_card = (await post(client, officer, f"{base}/replacement", {"card_number": factories.card_number(),
                                                                      "reason": "card damaged"}))["card"]  # fmt: skip
    await post(client, officer, f"/v1/operator/cards/{new_card['card_id']}/cancellation", {"reason": "withdrawn"})

    events = await audit_events(client, auditor, subject_id=card_id)
    assert [e["action"] for e in events] == [
        "card.replaced",
        "card.found",
        "card.lost",
        "ecard.active",
        "ecard.suspended",
        "card.activation_code",
        "card.issued",
    ]
    by_action = {e["action"]: e for e in events}
    for event in events:
        assert_operator_event(event, officer, subject_type="card", subject_id=card_id, region=SICHUAN)

    def snapshot(card: str, ecard: str, cause: str | None) -> dict[str, Any]:
        return {"card_state": card, "ecard_state": ecard, "suspension_cause": cause}

    issued_event = by_action["card.issued"]
    assert (issued_event.get("before"), issued_event["after"]) == (
        None,
        {"card_state": "issued", "ecard_state": "pending_activation"},
    )
    assert by_action["card.activation_code"]["after"]["activation_expires_at"]
    assert code not in str(by_action["card.activation_code"]), "the activation code is in the audit log"

    suspended = by_action["ecard.suspended"]
    assert suspended["reason"] == "fraud check"
    assert suspended["before"] == snapshot("active", "active", None)
    assert suspended["after"] == snapshot("active", "suspended", "operator")
    resumed = by_action["ecard.active"]
    assert resumed["reason"] == "fraud check cleared"
    assert (resumed["before"], resumed["after"]) == (suspended["after"], snapshot("active", "active", None))

    lost = by_action["card.lost"]
    assert lost["reason"] == "lost on the metro"
    assert (lost["before"], lost["after"]) == (
        snapshot("active", "active", None),
        snapshot("lost", "suspended", "card_lost"),
    )
    found = by_action["card.found"]
    assert found["reason"] == "found at home"
    assert (found["before"], found["after"]) == (lost["after"], snapshot("active", "active", None))

    replaced = by_action["card.replaced"]
    assert replaced["reason"] == "card damaged"
    assert replaced["before"] == snapshot("active", "active", None)
    assert replaced["after"] == {
        "card_state": "replaced",
        "replaced_by": new_card["card_id"],
        "ecard_state": "pending_activation",
        "devices_unbound": 1,
    }

    [cancelled] = await audit_events(client, auditor, subject_id=new_card["card_id"], action="card.cancelled")
    assert_operator_event(cancelled, officer, subject_type="card", region=SICHUAN, reason="withdrawn")
    assert cancelled["before"] == snapshot("issued", "pending_activation", None)
    assert cancelled["after"] == {"card_state": "cancelled", "ecard_state": "revoked"}

    pin_events = await audit_events(client, auditor, subject_id=ecard_id)
    assert [e["action"] for e in pin_events] == ["ecard.pin_reset", "ecard.pin_set"]
    reset = pin_events[0]
    assert_operator_event(
        reset, officer, subject_type="ecard", region=SICHUAN, reason="PIN forgotten, identity checked"
    )
    assert reset["after"] == {"pin_set": False, "pin_attempts": 0}


async def test_pin_reset_records_the_pin_state_before_it(
    client: httpx.AsyncClient, auditor: str, officer: str, holder: Holder
) -> None:
    auth = holder.auth
    assert (await client.put("/v1/holder/pin", json={"pin": "402917"}, auth=auth)).status_code == 204
    for _ in range(MAX_PIN_TRIES):
        response = await client.post("/v1/holder/pin/verification", json={"pin": "730519"}, auth=auth)
        assert response.status_code in (401, 403), response.text
    assert (await client.get("/v1/holder/card", auth=auth)).json()["pin_locked"] is True

    await post(
        client, officer, f"/v1/operator/cards/{holder.card_id}/pin-reset", {"reason": "locked, identity checked"}
    )
    reset = await only_event(client, auditor, holder.ecard_id, "ecard.pin_reset")
    assert reset["after"] == {"pin_set": False, "pin_attempts": 0}
    assert reset["before"] == {"pin_set": True, "pin_attempts": MAX_PIN_TRIES}, (
        f"the audit event says the PIN was {reset['before']} before the reset: reset_pin "
        "(app/domain/holders/pin.py:90-93) runs the ORM UPDATE first, which (synchronize_session) also "
        "clears pin_hash/pin_attempts on the loaded ECard, and only then reads them for `before`. Take the "
        "snapshot before the UPDATE."
    )


async def test_holder_actions_are_audited_as_the_holders_device(
    client: httpx.AsyncClient, admin_token: str, auditor: str, holder: Holder
) -> None:
    phone = device_of(holder.access_token)
    auth = holder.auth
    assert (await client.post("/v1/holder/card/loss", json={"reason": "left in a taxi"}, auth=auth)).status_code == 204
    assert (await client.post("/v1/holder/card/loss/undo", json={}, auth=auth)).status_code == 204
    assert (await client.put("/v1/holder/pin", json={"pin": "402917"}, auth=auth)).status_code == 204
    code = (await post(client, admin_token, f"/v1/operator/cards/{holder.card_id}/activation-code"))["activation_code"]
    tablet = await factories.activate(client, holder.card_number, code)
    assert (await client.delete(f"/v1/holder/devices/{tablet['device_id']}", auth=auth)).status_code == 204

    def by_phone(event: dict[str, Any]) -> None:
        assert (event["actor_type"], event["actor_id"], event["actor_name"]) == ("holder", phone, "holder device")
        assert event["region"] == SICHUAN

    card_events = await audit_events(client, auditor, subject_id=holder.card_id)
    holder_events = [e for e in card_events if e["actor_type"] == "holder"]
    assert [e["action"] for e in holder_events] == ["card.found", "card.lost"]
    found, lost = holder_events
    for event in holder_events:
        by_phone(event)
        assert event["subject_type"] == "card"
    assert lost["reason"] == "left in a taxi"
    assert lost["after"] == {"card_state": "lost", "ecard_state": "suspended", "suspension_cause": "card_lost"}
    assert found["reason"] == "found by the holder"
    assert found["after"] == {"card_state": "active", "ecard_state": "active", "suspension_cause": None}

    pin_set = await only_event(client, auditor, holder.ecard_id, "ecard.pin_set")
    by_phone(pin_set)
    assert (pin_set["subject_type"], pin_set["after"]) == ("ecard", {"pin_set": True})
    assert "402917" not in str(pin_set)

    removed = await only_event(client, auditor, tablet["device_id"], "device.removed")
    by_phone(removed)
    assert (removed["subject_type"], removed["before"]) == ("device", {"name": "phone"})


async def test_verifier_management_is_audited(client: httpx.AsyncClient, context: ServiceContext, auditor: str) -> None:
    manager = await operator_token(client, context, Role.VERIFIER_MANAGER, [SICHUAN])
    organisation = await post(
        client, manager, "/v1/operator/verifier-organisations",
        {"name": "成都地铁", "business_type": "transit", "region": SICHUAN},
    )  # fmt: skip
    created = await post(
        client, manager, f"/v1/operator/verifier-organisations/{organisation['id']}/terminals",
        {"name": "gate-7", "allowed_purposes": ["transit", "general"]},
    )  # fmt: skip
    terminal_id = created["terminal"]["id"]
    disabled = await client.patch(
        f"/v1/operator/terminals/{terminal_id}", json={"enabled": False}, headers=bearer(manager)
    )
    assert disabled.status_code == 200, disabled.text
    rotated = await post(client, manager, f"/v1/operator/terminals/{terminal_id}/api-key")

    org_event = await only_event(client, auditor, organisation["id"], "verifier_organisation.registered")
    assert_operator_event(org_event, manager, subject_type="verifier_organisation", region=SICHUAN)
    assert org_event["after"] == {"name": "成都地铁", "business_type": "transit"}

    events = await audit_events(client, auditor, subject_id=terminal_id)
    assert [e["action"] for e in events] == ["terminal.api_key_rotated", "terminal.disabled", "terminal.registered"]
    _rotation, disabling, registration = events
    for event in events:
        assert_operator_event(event, manager, subject_type="terminal", subject_id=terminal_id, region=SICHUAN)
    assert registration["after"]["name"] == "gate-7"
    assert sorted(registration["after"]["allowed_purposes"]) == ["general", "transit"]
    assert (disabling["before"], disabling["after"]) == ({"enabled": True}, {"enabled": False})
    for key in (created["api_key"], rotated["api_key"]):
        secret = key.rsplit(".", 1)[-1]
        assert secret not in str(events), "an API key is in the audit log"


# --- who may read it -------------------------------------------------------------------------


async def test_auditors_see_their_regions_only(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    sichuan_card = (await factories.issue_card(client, admin_token, SICHUAN))["card"]["card_id"]
    chongqing_card = (await factories.issue_card(client, admin_token, CHONGQING))["card"]["card_id"]
    chongqing_auditor = await operator_token(client, context, Role.AUDITOR, [CHONGQING])
    sichuan_auditor = await operator_token(client, context, Role.AUDITOR, [SICHUAN])

    assert await audit_events(client, chongqing_auditor, subject_id=sichuan_card) == []
    assert [e["action"] for e in await audit_events(client, chongqing_auditor, subject_id=chongqing_card)] == [
        "card.issued"
    ]
    assert await audit_events(client, sichuan_auditor, subject_id=chongqing_card) == []
    assert [e["action"] for e in await audit_events(client, sichuan_auditor, subject_id=sichuan_card)] == [
        "card.issued"
    ]
    everything = await audit_events(client, chongqing_auditor, limit=1000)
    assert everything, "the Chongqing auditor sees nothing at all"
    assert {e["region"] for e in everything} == {CHONGQING}, "events of other regions (or of none) leak"
    # Filtering by action does not open a way around the scope either.
    issued = await audit_events(client, chongqing_auditor, action="card.issued", limit=1000)
    assert {e["region"] for e in issued} == {CHONGQING}


@pytest.mark.parametrize("role", [Role.CARD_OFFICER, Role.VERIFIER_MANAGER])
async def test_other_roles_cannot_read_the_audit_log(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, role: Role
) -> None:
    token = await operator_token(client, context, role, ["*"])
    refused = await client.get("/v1/operator/audit-events", headers=bearer(token))
    assert problem(refused, 403)["code"] == "forbidden"
    assert (await client.get("/v1/operator/audit-events", headers=bearer(admin_token))).status_code == 200


async def test_holders_and_strangers_cannot_read_the_audit_log(client: httpx.AsyncClient, holder: Holder) -> None:
    assert problem(await client.get("/v1/operator/audit-events"), 401)["code"] == "unauthorized"
    as_holder = await client.get("/v1/operator/audit-events", auth=holder.auth)
    assert problem(as_holder, 401)["code"] == "unauthorized"


# --- nothing can change it -------------------------------------------------------------------

TAMPERING = [
    pytest.param("UPDATE audit_events SET reason = 'x' WHERE subject_id = :subject", id="update-one"),
    pytest.param("UPDATE audit_events SET reason = 'x'", id="update-all"),
    pytest.param("DELETE FROM audit_events WHERE subject_id = :subject", id="delete-one"),
    pytest.param("DELETE FROM audit_events", id="delete-all"),
    pytest.param("TRUNCATE audit_events", id="truncate"),
]


@pytest.mark.parametrize("statement", TAMPERING)
async def test_the_database_refuses_to_change_the_audit_log(
    client: httpx.AsyncClient, context: ServiceContext, auditor: str, officer: str, statement: str
) -> None:
    if statement.startswith("TRUNCATE") and context.engine.dialect.name != "postgresql":
        pytest.skip("SQLite has no TRUNCATE")
    card_id = (await factories.issue_card(client, officer, SICHUAN))["card"]["card_id"]
    await post(client, officer, f"/v1/operator/cards/{card_id}/loss", {"reason": "kept as it is"})
    before = await audit_events(client, auditor, subject_id=card_id)
    total = await event_count(context)

    params = {"subject": card_id} if ":subject" in statement else {}
    async with context.sessions() as session:
        with pytest.raises(DBAPIError) as refused:
            await session.execute(text(statement), params)
        await session.rollback()
    assert "append-only" in str(refused.value)

    assert await audit_events(client, auditor, subject_id=card_id) == before
    assert await event_count(context) == total


async def test_the_refusal_rolls_back_the_whole_transaction(
    client: httpx.AsyncClient, context: ServiceContext, auditor: str, officer: str
) -> None:
    """An audit event written and then 'corrected' in the same transaction: neither survives."""
    card_id = (await factories.issue_card(client, officer, SICHUAN))["card"]["card_id"]
    before = await audit_events(client, auditor, subject_id=card_id)
    async with context.sessions() as session:
        session.add(
            AuditEvent(
                occurred_at=utcnow(), actor_type="command", actor_id="test", actor_name="test", action="test.note",
                subject_type="card", subject_id=card_id, region_code=SICHUAN, reason="first version",
            )
        )  # fmt: skip
        await session.flush()
        with pytest.raises(DBAPIError):
            await session.execute(
                text("UPDATE audit_events SET reason = 'rewritten' WHERE subject_id = :s"), {"s": card_id}
            )
        await session.rollback()
    assert await audit_events(client, auditor, subject_id=card_id) == before


@pytest.mark.parametrize("method", ["PATCH", "PUT", "DELETE", "POST"])
async def test_no_endpoint_edits_or_deletes_audit_events(
    client: httpx.AsyncClient, admin_token: str, auditor: str, officer: str, method: str
) -> None:
    card_id = (await factories.issue_card(client, officer, SICHUAN))["card"]["card_id"]
    [event] = await audit_events(client, auditor, subject_id=card_id)
    for path in ("/v1/operator/audit-events", f"/v1/operator/audit-events/{event['id']}"):
        response = await client.request(method, path, json={"reason": "rewritten"}, headers=bearer(admin_token))
        assert response.status_code in (404, 405), f"{method} {path}: {response.status_code} {response.text}"
    assert await audit_events(client, auditor, subject_id=card_id) == [event]


# --- failures leave no trace -----------------------------------------------------------------


async def test_failed_actions_write_no_audit_event(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, auditor: str, officer: str, holder: Holder
) -> None:
    base = f"/v1/operator/cards/{holder.card_id}"
    card_before = await audit_events(client, auditor, subject_id=holder.card_id)
    ecard_before = await audit_events(client, auditor, subject_id=holder.ecard_id)
    total = await event_count(context)
    other_number = (await factories.issue_card(client, admin_token, SICHUAN))["card"]["card_number"]
    total += 1
    chongqing_officer = await operator_token(client, context, Role.CARD_OFFICER, [CHONGQING])
    total += 1  # operator.created
    card_auditor = await operator_token(client, context, Role.AUDITOR, [SICHUAN])
    total += 1

    failures: list[tuple[str, str, dict[str, Any], str, int]] = [
        (officer, "loss/undo", {"reason": "not lost"}, "undo of a card that is not lost", 409),
        (officer, "ecard-state", {"state": "active", "reason": "x"}, "resume of an active eCard", 409),
        (officer, "ecard-state", {"state": "pending_activation", "reason": "x"}, "invalid target state", 400),
        (officer, "replacement", {"card_number": "T1234-678", "reason": "x"}, "malformed card number", 400),
        (officer, "replacement", {"card_number": other_number, "reason": "x"}, "card number in use", 409),
        (card_auditor, "loss", {"reason": "x"}, "an auditor reports a loss", 403),
        (chongqing_officer, "loss", {"reason": "x"}, "an officer of another region", 404),
        (chongqing_officer, "pin-reset", {"reason": "x"}, "an officer of another region resets the PIN", 404),
    ]
    for token, suffix, body, what, status in failures:
        response = await client.post(f"{base}/{suffix}", json=body, headers=bearer(token))
        assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
    auth = holder.auth
    assert (await client.post("/v1/holder/card/loss/undo", json={}, auth=auth)).status_code == 409
    assert (await client.put("/v1/holder/pin", json={"pin": "123456"}, auth=auth)).status_code == 400
    assert (await client.delete(f"/v1/holder/devices/{uuid.uuid4()}", auth=auth)).status_code == 404

    assert await audit_events(client, auditor, subject_id=holder.card_id) == card_before
    assert await audit_events(client, auditor, subject_id=holder.ecard_id) == ecard_before
    assert await event_count(context) == total


async def test_racing_loss_reports_leave_one_event(
    client: httpx.AsyncClient, auditor: str, officer: str, holder: Holder
) -> None:
    responses = await asyncio.gather(
        *(
            client.post(f"/v1/operator/cards/{holder.card_id}/loss", json={"reason": "race"}, headers=bearer(officer))
            for _ in range(5)
        )
    )
    assert sum(response.status_code == 200 for response in responses) == 1, [r.status_code for r in responses]
    lost = await audit_events(client, auditor, subject_id=holder.card_id, action="card.lost")
    assert len(lost) == 1, f"{len(lost)} card.lost events for one loss"


# --- sign-in lockout -------------------------------------------------------------------------

SQLITE_NAIVE_LOCK = (
    "authenticate() (app/domain/operators/services.py:85-94) runs an ORM UPDATE whose WHERE compares "
    "Operator.locked_until with an aware datetime, and the default synchronize_session='auto' evaluates that "
    "WHERE in Python against the Operator loaded just before, whose locked_until SQLite hands back naive: "
    "TypeError. On SQLite an account that was locked once can never sign in again (even after the 15 minutes), "
    "and the 500 tells a guesser the account is locked. Fix: .execution_options(synchronize_session=False) on "
    "that UPDATE (or as_utc before comparing)."
)
ARGON2_ON_THE_LOOP = (
    "'database is locked' under parallel sign-ins: authenticate() calls argon2 (app/domain/operators/"
    "services.py _verify, ~0.4 s here) synchronously on the event loop, so a request holding SQLite's write "
    "lock cannot reach its COMMIT while the loop runs other requests' hashes, and the others' busy_timeout "
    "(30 s) runs out. Run argon2 in a thread (asyncio.to_thread / anyio.to_thread.run_sync)."
)


def server_error(caplog: pytest.LogCaptureFixture) -> str:
    """What the app logged about its last unhandled error, with a diagnosis where one is known."""
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "app.http.problems"]
    if not errors:
        return "no unhandled error was logged"
    detail = (errors[-1].exc_text or errors[-1].getMessage()).strip().splitlines()[-1]
    if "offset-naive and offset-aware" in (errors[-1].exc_text or ""):
        return f"{detail}: {SQLITE_NAIVE_LOCK}"
    if "database is locked" in (errors[-1].exc_text or ""):
        return f"{detail}: {ARGON2_ON_THE_LOOP}"
    return detail


async def new_operator(context: ServiceContext) -> tuple[str, str]:
    """(username, password) of a fresh auditor."""
    username, password = f"op-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    async with context.sessions() as session:
        await create_operator(
            session, Actor.command("test"), username=username, password=password, role=Role.AUDITOR, regions=[SICHUAN]
        )
    return username, password


async def sign_in(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    """POST /v1/operator/session, whatever the outcome."""
    return await client.post("/v1/operator/session", json={"username": username, "password": password})


async def lock_state(context: ServiceContext, username: str) -> tuple[int, Any]:
    """(failed_sign_ins, locked_until) of an operator."""
    async with context.sessions() as session:
        row = (
            await session.execute(
                select(Operator.failed_sign_ins, Operator.locked_until).where(Operator.username == username)
            )
        ).one()
    return row[0], (as_utc(row[1]) if row[1] is not None else None)


async def reference_failure(client: httpx.AsyncClient) -> httpx.Response:
    """The answer to an unknown username."""
    response = await sign_in(client, f"nobody-{uuid.uuid4().hex[:8]}", "whatever-password")
    assert problem(response, 401)["code"] == "unauthorized"
    return response


def assert_same_answer(
    response: httpx.Response, reference: httpx.Response, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Status, headers and body identical to the reference failure."""
    assert response.status_code != 500, f"{what}: 500, {server_error(caplog)}"
    assert response.status_code == reference.status_code, f"{what}: {response.status_code} {response.text}"
    assert factories.without_request_id(response) == factories.without_request_id(reference), (
        f"{what}: {response.text} != {reference.text}"
    )
    assert factories.headers_without_request_id(response) == factories.headers_without_request_id(reference), what


def assert_status(response: httpx.Response, status: int, what: str, caplog: pytest.LogCaptureFixture) -> None:
    """The expected status, with the server's error when it is a 500."""
    assert response.status_code != 500, f"{what}: 500, {server_error(caplog)}"
    assert response.status_code == status, f"{what}: {response.status_code} {response.text}"


async def test_five_wrong_passwords_lock_the_account_and_the_lock_looks_like_a_wrong_password(
    client: httpx.AsyncClient, context: ServiceContext, caplog: pytest.LogCaptureFixture
) -> None:
    reference = await reference_failure(client)
    username, password = await new_operator(context)
    for attempt in range(MAX_FAILED_SIGN_INS):
        wrong = await sign_in(client, username, password + "x")
        assert_same_answer(wrong, reference, f"wrong try {attempt + 1}", caplog)

    locked = await sign_in(client, username, password)
    assert locked.status_code != 200, "the right password worked on a locked account"
    assert_same_answer(locked, reference, "the right password on a locked account", caplog)
    _failures, locked_until = await lock_state(context, username)
    assert locked_until is not None
    assert timedelta(minutes=14) < locked_until - utcnow() <= timedelta(minutes=15)

    # The lock is per account: another account on the same client signs in.
    other, other_password = await new_operator(context)
    assert_status(await sign_in(client, other, other_password), 200, "another account", caplog)


async def test_after_the_lock_expires_the_right_password_works_and_resets_the_count(
    client: httpx.AsyncClient, context: ServiceContext, caplog: pytest.LogCaptureFixture
) -> None:
    username, password = await new_operator(context)
    for _ in range(MAX_FAILED_SIGN_INS):
        assert_status(await sign_in(client, username, "wrong-password"), 401, "wrong password", caplog)
    assert_same_answer(await sign_in(client, username, password), await reference_failure(client), "locked", caplog)

    # Fifteen minutes later (the lock moved into the past).
    async with context.sessions() as session:
        await session.execute(
            update(Operator).where(Operator.username == username).values(locked_until=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    # One more wrong try does not lock it again at once.
    assert_status(await sign_in(client, username, "wrong-password"), 401, "wrong after the lock expired", caplog)
    assert_status(await sign_in(client, username, password), 200, "right after the lock expired", caplog)
    assert await lock_state(context, username) == (0, None)
    # A full new allowance of tries.
    for _ in range(MAX_FAILED_SIGN_INS - 1):
        assert_status(await sign_in(client, username, "wrong-password"), 401, "wrong password", caplog)
    assert_status(await sign_in(client, username, password), 200, "right password", caplog)


async def test_a_successful_sign_in_resets_the_count_of_failures(
    client: httpx.AsyncClient, context: ServiceContext, caplog: pytest.LogCaptureFixture
) -> None:
    username, password = await new_operator(context)
    for _round in range(3):
        for _ in range(MAX_FAILED_SIGN_INS - 1):
            assert_status(await sign_in(client, username, "wrong-password"), 401, "wrong password", caplog)
        assert (await lock_state(context, username))[0] == MAX_FAILED_SIGN_INS - 1
        response = await sign_in(client, username, password)
        assert_status(response, 200, f"right password after {MAX_FAILED_SIGN_INS - 1} failures", caplog)
        assert await lock_state(context, username) == (0, None)


async def test_twenty_parallel_wrong_guesses_lock_after_five_and_the_right_password_is_refused(
    client: httpx.AsyncClient, context: ServiceContext, caplog: pytest.LogCaptureFixture
) -> None:
    reference = await reference_failure(client)
    username, password = await new_operator(context)
    responses = await asyncio.gather(*(sign_in(client, username, f"guess-{n}") for n in range(20)))
    for number, response in enumerate(responses):
        assert_same_answer(response, reference, f"parallel guess {number + 1}", caplog)
    failures, locked_until = await lock_state(context, username)
    assert locked_until is not None and locked_until > utcnow(), "twenty parallel wrong guesses did not lock"
    assert failures <= MAX_FAILED_SIGN_INS
    locked = await sign_in(client, username, password)
    assert locked.status_code != 200, "the right password worked after 20 parallel wrong guesses"
    assert_same_answer(locked, reference, "the right password after 20 parallel wrong guesses", caplog)


async def test_a_sign_in_does_not_stall_the_event_loop(client: httpx.AsyncClient, context: ServiceContext) -> None:
    """argon2 is slow on purpose; while it runs, the worker must go on serving (the verify path above all)."""
    hasher = PasswordHasher()
    reference_hash = hasher.hash("reference")
    started = time.perf_counter()
    assert not _argon2_matches(hasher, reference_hash, "other")
    cost = time.perf_counter() - started
    username, _password = await new_operator(context)

    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await sign_in(client, username, "wrong-password")
    done.set()
    await task
    # A blocked loop stands still for the whole argon2 run (>= cost); a free one ticks every few ms.
    assert max(gaps) < cost * 0.8, (
        f"the event loop stood still for {max(gaps) * 1000:.0f} ms during one sign-in (one argon2 verification "
        f"takes {cost * 1000:.0f} ms here): authenticate() (app/domain/operators/services.py, _verify) hashes on "
        "the event loop, so every sign-in freezes all requests of the worker, /v1/verify included. Run argon2 in "
        "a thread (asyncio.to_thread / anyio.to_thread.run_sync); the same holds for the PIN "
        "(app/domain/holders/pin.py _check and set_pin)."
    )


def _argon2_matches(hasher: PasswordHasher, stored: str, password: str) -> bool:
    try:
        return hasher.verify(stored, password)
    except VerificationError:
        return False
