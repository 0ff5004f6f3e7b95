"""The holder's own account through the holder API: the card, devices, the PIN and the PIN step-up.

What a holder (and someone holding a stolen phone or token) can do: see the card with personal
data masked; list, rename and remove devices, where removing one ends its sessions at once on
every endpoint while the others keep working, and another holder's device is out of reach; set
and change a 6-digit PIN that is never stored in clear, is locked after five wrong tries (also
when they are sent in parallel) and is cleared only by the card office; and the step-up token
that a medical credential needs, bound to its device and short-lived.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
import uuid
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from sqlalchemy import select, text

from app.db.models import Base, ECard
from app.domain.operators.services import Role
from app.server.context import ServiceContext
from crypto.credential import Purpose, open_credential
from tests import factories
from tests.conftest import operator_token
from tests.factories import Holder, bearer, dpop, holder_session_of, problem

SICHUAN = "510000"
MAX_PIN_TRIES = 5


# --- helpers ---------------------------------------------------------------------------------


def random_pin() -> str:
    """A random PIN the rules accept."""
    while True:
        pin = f"{secrets.randbelow(10**6):06d}"
        steps = {int(b) - int(a) for a, b in itertools.pairwise(pin)}
        if len(set(pin)) > 1 and steps not in ({1}, {-1}):
            return pin


def other_pin(pin: str) -> str:
    """A valid PIN that is not pin."""
    while (candidate := random_pin()) == pin:
        pass
    return candidate


async def holder_card(client: httpx.AsyncClient, access_token: str) -> dict[str, Any]:
    """GET /v1/holder/card (asserting 200)."""
    response = await client.get("/v1/holder/card", auth=dpop(access_token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def devices_of(client: httpx.AsyncClient, access_token: str) -> list[dict[str, Any]]:
    """GET /v1/holder/devices (asserting 200)."""
    response = await client.get("/v1/holder/devices", auth=dpop(access_token))
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


async def second_device(client: httpx.AsyncClient, token: str, holder: Holder) -> dict[str, Any]:
    """Bind another device with a fresh code from the office; its session."""
    response = await client.post(f"/v1/operator/cards/{holder.card_id}/activation-code", headers=bearer(token))
    assert response.status_code == 201, response.text
    return await factories.activate(client, holder.card_number, response.json()["activation_code"])


async def put_pin(client: httpx.AsyncClient, access_token: str, pin: str, current: str | None = None) -> httpx.Response:
    """PUT /v1/holder/pin, whatever the outcome."""
    body: dict[str, Any] = {"pin": pin}
    if current is not None:
        body["current_pin"] = current
    return await client.put("/v1/holder/pin", json=body, auth=dpop(access_token))


async def verify_pin(client: httpx.AsyncClient, access_token: str, pin: str) -> httpx.Response:
    """POST /v1/holder/pin/verification, whatever the outcome."""
    return await client.post("/v1/holder/pin/verification", json={"pin": pin}, auth=dpop(access_token))


async def medical(client: httpx.AsyncClient, access_token: str, step_up: str | None, count: int = 1) -> httpx.Response:
    """POST /v1/holder/credentials for a medical credential, whatever the outcome."""
    body: dict[str, Any] = {"purpose": "medical", "count": count}
    if step_up is not None:
        body["step_up_token"] = step_up
    return await client.post("/v1/holder/credentials", json=body, auth=dpop(access_token))


async def pin_attempts(context: ServiceContext, ecard_id: str) -> int:
    """PIN tries counted in the database."""
    async with context.sessions() as session:
        attempts = await session.scalar(select(ECard.pin_attempts).where(ECard.id == uuid.UUID(ecard_id)))
    assert attempts is not None
    return attempts


# --- the card --------------------------------------------------------------------------------


async def test_holder_sees_the_card_with_personal_data_masked(client: httpx.AsyncClient, admin_token: str) -> None:
    citizen_id, number, name = factories.citizen_id(SICHUAN), factories.card_number(), "欧阳娜娜"
    response = await client.post(
        "/v1/operator/cards",
        json={"region": SICHUAN, "citizen_id": citizen_id, "name": name, "card_number": number},
        headers=bearer(admin_token),
    )
    assert response.status_code == 201, response.text
    issued = response.json()
    session = await factories.activate(client, number, issued["activation_code"])

    response = await client.get("/v1/holder/card", auth=dpop(session["access_token"]))
    assert response.status_code == 200, response.text
    card = response.json()
    assert card == {
        "ecard_id": issued["card"]["ecard_id"],
        "ecard_state": "active",
        "card_number": "*****" + number[-4:],
        "card_state": "active",
        "region": SICHUAN,
        "holder_name": "欧***",
        "citizen_id": citizen_id[:4] + "*" * 10 + citizen_id[-4:],
        "pin_set": False,
        "pin_locked": False,
    }
    for secret in (citizen_id, number, name, name[1:]):
        assert secret not in response.text


async def test_holder_card_needs_a_holder_token(client: httpx.AsyncClient, admin_token: str) -> None:
    assert problem(await client.get("/v1/holder/card"), 401)["code"] == "unauthorized"
    assert problem(await client.get("/v1/holder/card", headers=bearer(admin_token)), 401)["code"] == "dpop_required"
    as_holder = dpop(admin_token, factories.DeviceKey())
    assert problem(await client.get("/v1/holder/card", auth=as_holder), 401)["code"] == "unauthorized"


# --- devices ---------------------------------------------------------------------------------


async def test_devices_list_marks_the_current_device(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    phone = holder_session_of(holder.access_token).device_id
    [only] = await devices_of(client, holder.access_token)
    assert (only["id"], only["current"], only["name"]) == (str(phone), True, "phone")

    tablet = await second_device(client, admin_token, holder)
    assert tablet["ecard_id"] == holder.ecard_id
    from_phone = await devices_of(client, holder.access_token)
    from_tablet = await devices_of(client, tablet["access_token"])
    assert [d["id"] for d in from_phone] == [str(phone), tablet["device_id"]]
    assert [d["id"] for d in from_tablet] == [d["id"] for d in from_phone]
    assert [d["current"] for d in from_phone] == [True, False]
    assert [d["current"] for d in from_tablet] == [False, True]


async def test_holder_renames_own_devices_only(client: httpx.AsyncClient, admin_token: str, holder: Holder) -> None:
    tablet = await second_device(client, admin_token, holder)
    renamed = await client.patch(
        f"/v1/holder/devices/{tablet['device_id']}", json={"name": "  iPad 厨房 "}, auth=holder.auth
    )
    assert renamed.status_code == 200, renamed.text
    assert (renamed.json()["id"], renamed.json()["name"], renamed.json()["current"]) == (
        tablet["device_id"],
        "iPad 厨房",
        False,
    )
    names = {d["id"]: d["name"] for d in await devices_of(client, tablet["access_token"])}
    assert names[tablet["device_id"]] == "iPad 厨房"

    # Another holder's device answers exactly like a device that does not exist, and keeps its name.
    other = await factories.activated_holder(client, admin_token, SICHUAN)
    other_device = str(holder_session_of(other.access_token).device_id)
    hidden = await client.patch(f"/v1/holder/devices/{other_device}", json={"name": "mine now"}, auth=holder.auth)
    missing = await client.patch(f"/v1/holder/devices/{uuid.uuid4()}", json={"name": "mine now"}, auth=holder.auth)
    assert problem(hidden, 404)["code"] == "not_found"
    assert factories.without_request_id(hidden) == factories.without_request_id(missing)
    [theirs] = await devices_of(client, other.access_token)
    assert (theirs["id"], theirs["name"]) == (other_device, "phone")
    # And the other holder's list never shows this holder's devices.
    assert str(holder_session_of(holder.access_token).device_id) not in {d["id"] for d in [theirs]}


def every_holder_call(surviving_device: str, credential: str) -> list[tuple[str, str, Any]]:
    """One request to each endpoint that takes a holder access token."""
    return [
        ("GET", "/v1/holder/card", None),
        ("POST", "/v1/holder/card/loss", {}),
        ("POST", "/v1/holder/card/loss/undo", {}),
        ("GET", "/v1/holder/devices", None),
        ("PATCH", f"/v1/holder/devices/{surviving_device}", {"name": "stolen"}),
        ("DELETE", f"/v1/holder/devices/{surviving_device}", None),
        ("PUT", "/v1/holder/pin", {"pin": random_pin()}),
        ("POST", "/v1/holder/pin/verification", {"pin": random_pin()}),
        ("POST", "/v1/holder/credentials", {"purpose": "transit"}),
        ("POST", "/v1/holder/credentials/qr", {"credential": credential}),
    ]


async def test_removing_a_device_ends_its_sessions_at_once_on_every_endpoint(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    tablet = await second_device(client, admin_token, holder)
    [credential] = await factories.credentials(client, holder)
    # Control: before the removal the tablet's token works.
    assert (await client.get("/v1/holder/card", auth=dpop(tablet["access_token"]))).status_code == 200

    removed = await client.delete(f"/v1/holder/devices/{tablet['device_id']}", auth=holder.auth)
    assert removed.status_code == 204, removed.text

    phone = str(holder_session_of(holder.access_token).device_id)
    for method, path, body in every_holder_call(phone, credential):
        response = await client.request(method, path, json=body, auth=dpop(tablet["access_token"]))
        assert problem(response, 401)["code"] == "unauthorized", f"{method} {path}"
    refreshed = await client.post(
        "/v1/holder/token", json={"refresh_token": tablet["refresh_token"]}, auth=dpop(tablet["refresh_token"])
    )
    assert problem(refreshed, 401)["code"] == "invalid_refresh_token"

    # The tablet's refused calls did nothing, and the phone keeps working.
    card = await holder_card(client, holder.access_token)
    assert (card["card_state"], card["ecard_state"], card["pin_set"]) == ("active", "active", False)
    [phone_device] = await devices_of(client, holder.access_token)
    assert (phone_device["id"], phone_device["name"]) == (phone, "phone")
    assert (
        await client.post(
            "/v1/holder/token", json={"refresh_token": holder.refresh_token}, auth=dpop(holder.refresh_token)
        )
    ).status_code == 200
    await factories.credentials(client, holder)


async def test_removing_the_current_device_signs_it_out(client: httpx.AsyncClient, holder: Holder) -> None:
    phone = holder_session_of(holder.access_token).device_id
    removed = await client.delete(f"/v1/holder/devices/{phone}", auth=holder.auth)
    assert removed.status_code == 204, removed.text
    signed_out = await client.get("/v1/holder/devices", auth=holder.auth)
    assert problem(signed_out, 401)["code"] == "unauthorized"
    refreshed = await client.post(
        "/v1/holder/token", json={"refresh_token": holder.refresh_token}, auth=dpop(holder.refresh_token)
    )
    assert problem(refreshed, 401)["code"] == "invalid_refresh_token"


async def test_another_holders_device_cannot_be_removed(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    other = await factories.activated_holder(client, admin_token, SICHUAN)
    other_device = holder_session_of(other.access_token).device_id
    hidden = await client.delete(f"/v1/holder/devices/{other_device}", auth=holder.auth)
    missing = await client.delete(f"/v1/holder/devices/{uuid.uuid4()}", auth=holder.auth)
    assert problem(hidden, 404)["code"] == "not_found"
    assert factories.without_request_id(hidden) == factories.without_request_id(missing)
    # The other holder is not signed out.
    assert [d["id"] for d in await devices_of(client, other.access_token)] == [str(other_device)]
    assert (
        await client.post(
            "/v1/holder/token", json={"refresh_token": other.refresh_token}, auth=dpop(other.refresh_token)
        )
    ).status_code == 200


# --- the PIN ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pin", "detail"),
    [
        pytest.param("12345", "exactly 6 digits", id="five-digits"),
        pytest.param("1234567", "exactly 6 digits", id="seven-digits"),
        pytest.param("12a456", "exactly 6 digits", id="letter"),
        pytest.param("\uff14\uff10\uff12\uff19\uff11\uff17", "exactly 6 digits", id="full-width-digits"),
        pytest.param("\u0664\u0660\u0662\u0669\u0661\u0667", "exactly 6 digits", id="arabic-indic-digits"),
        pytest.param(" 40291", "exactly 6 digits", id="space"),
        pytest.param("111111", "too easy", id="repeated-1"),
        pytest.param("000000", "too easy", id="repeated-0"),
        pytest.param("123456", "too easy", id="ascending"),
        pytest.param("012345", "too easy", id="ascending-from-0"),
        pytest.param("987654", "too easy", id="descending"),
        pytest.param("543210", "too easy", id="descending-to-0"),
    ],
)
async def test_pin_rules(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, pin: str, detail: str
) -> None:
    response = await put_pin(client, holder.access_token, pin)
    assert response.status_code == 400, f"PIN {pin!r} was accepted ({response.status_code})" + (
        ": check_pin_rules/verify_pin (app/domain/holders/pin.py, _PIN = r'^\\d{6}$') take \\d, which "
        "matches every Unicode decimal digit; use [0-9] (or re.ASCII)"
        if not pin.isascii()
        else ""
    )
    body = problem(response, 400)
    assert body["code"] == "bad_request"
    assert detail in body["detail"]
    assert (await holder_card(client, holder.access_token))["pin_set"] is False
    async with context.sessions() as session:
        assert await session.scalar(select(ECard.pin_hash).where(ECard.id == uuid.UUID(holder.ecard_id))) is None


async def test_pin_set_change_and_verification(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder
) -> None:
    no_pin = problem(await verify_pin(client, holder.access_token, random_pin()), 409)
    assert no_pin["code"] == "pin_not_set"

    first = random_pin()
    assert (await put_pin(client, holder.access_token, first)).status_code == 204
    assert (await holder_card(client, holder.access_token))["pin_set"] is True

    # Changing it needs the current PIN; a wrong one is a counted try.
    second = other_pin(first)
    missing = problem(await put_pin(client, holder.access_token, second), 400)
    assert "current_pin" in missing["detail"]
    wrong = problem(await put_pin(client, holder.access_token, second, current=other_pin(first)), 401)
    assert (wrong["code"], wrong["attempts_left"]) == ("pin_wrong", MAX_PIN_TRIES - 1)
    # A change to a trivial PIN is refused before the current PIN is even tried.
    assert problem(await put_pin(client, holder.access_token, "123456", current=first), 400)
    assert await pin_attempts(context, holder.ecard_id) == 1

    assert (await put_pin(client, holder.access_token, second, current=first)).status_code == 204
    assert await pin_attempts(context, holder.ecard_id) == 0
    old = problem(await verify_pin(client, holder.access_token, first), 401)
    assert (old["code"], old["attempts_left"]) == ("pin_wrong", MAX_PIN_TRIES - 1)

    response = await verify_pin(client, holder.access_token, second)
    assert response.status_code == 200, response.text
    step_up = response.json()
    assert step_up["expires_in"] == 300
    assert step_up["step_up_token"].count(".") == 2
    assert await pin_attempts(context, holder.ecard_id) == 0, "a right PIN must reset the count of tries"


async def test_five_wrong_pins_lock_it_until_the_office_resets_it(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, holder: Holder
) -> None:
    pin = random_pin()
    assert (await put_pin(client, holder.access_token, pin)).status_code == 204
    wrong = other_pin(pin)
    for left in range(MAX_PIN_TRIES - 1, 0, -1):
        body = problem(await verify_pin(client, holder.access_token, wrong), 401)
        assert (body["code"], body["attempts_left"]) == ("pin_wrong", left)
    assert problem(await verify_pin(client, holder.access_token, wrong), 403)["code"] == "pin_locked"

    # Locked: the right PIN is refused too, for verification and for a change, and gives no step-up.
    assert problem(await verify_pin(client, holder.access_token, pin), 403)["code"] == "pin_locked"
    assert problem(await put_pin(client, holder.access_token, other_pin(pin), current=pin), 403)["code"] == (
        "pin_locked"
    )
    card = await holder_card(client, holder.access_token)
    assert (card["pin_set"], card["pin_locked"]) == (True, True)
    assert await pin_attempts(context, holder.ecard_id) == MAX_PIN_TRIES

    # The card office clears it (after checking the holder at the counter).
    officer = await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN])
    reset = await client.post(
        f"/v1/operator/cards/{holder.card_id}/pin-reset", json={"reason": "identity checked"}, headers=bearer(officer)
    )
    assert reset.status_code == 204, reset.text
    card = await holder_card(client, holder.access_token)
    assert (card["pin_set"], card["pin_locked"]) == (False, False)
    assert problem(await verify_pin(client, holder.access_token, pin), 409)["code"] == "pin_not_set"

    new = other_pin(pin)
    assert (await put_pin(client, holder.access_token, new)).status_code == 204
    assert (await verify_pin(client, holder.access_token, new)).status_code == 200
    assert problem(await verify_pin(client, holder.access_token, pin), 401)["code"] == "pin_wrong"


async def test_a_right_pin_resets_the_count_of_tries(client: httpx.AsyncClient, holder: Holder) -> None:
    pin = random_pin()
    assert (await put_pin(client, holder.access_token, pin)).status_code == 204
    for _round in range(2):
        for _ in range(MAX_PIN_TRIES - 1):
            problem(await verify_pin(client, holder.access_token, other_pin(pin)), 401)
        response = await verify_pin(client, holder.access_token, pin)
        assert response.status_code == 200, f"locked after {MAX_PIN_TRIES - 1} wrong tries: {response.text}"


async def test_parallel_wrong_pins_take_no_more_than_five_tries(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder
) -> None:
    pin = random_pin()
    assert (await put_pin(client, holder.access_token, pin)).status_code == 204
    wrong = other_pin(pin)
    responses = await asyncio.gather(*(verify_pin(client, holder.access_token, wrong) for _ in range(20)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {401, 403}, [r.text for r in responses]
    left = sorted(problem(r, 401)["attempts_left"] for r in responses if r.status_code == 401)
    assert left == [1, 2, 3, 4], f"wrong PINs compared with attempts left {left}: the tries are not counted atomically"
    assert all(problem(r, 403)["code"] == "pin_locked" for r in responses if r.status_code == 403)
    assert await pin_attempts(context, holder.ecard_id) == MAX_PIN_TRIES

    assert problem(await verify_pin(client, holder.access_token, pin), 403)["code"] == "pin_locked"


async def test_a_pin_check_does_not_stall_the_event_loop(client: httpx.AsyncClient, holder: Holder) -> None:
    """argon2 is slow on purpose; while it runs, the worker must go on serving (the verify path above all)."""
    pin = random_pin()
    assert (await put_pin(client, holder.access_token, pin)).status_code == 204
    hasher = PasswordHasher()
    stored = hasher.hash(pin)
    started = time.perf_counter()
    assert hasher.verify(stored, pin)
    cost = time.perf_counter() - started

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
    response = await verify_pin(client, holder.access_token, pin)
    done.set()
    await task
    assert response.status_code == 200, response.text
    # A blocked loop stands still for the whole argon2 run (>= cost); a free one ticks every few ms.
    assert max(gaps) < cost * 0.8, (
        f"the event loop stood still for {max(gaps) * 1000:.0f} ms during one PIN check (one argon2 verification "
        f"takes {cost * 1000:.0f} ms here): _check (app/domain/holders/pin.py) calls argon2 on the event loop, so "
        "every PIN entry freezes all requests of the worker, /v1/verify included. Run it in a thread "
        "(asyncio.to_thread / anyio.to_thread.run_sync); set_pin's hash likewise."
    )


def pin_places(rows: dict[str, list[tuple[str, Any]]], pin: str) -> list[str]:
    """Columns (table.column) whose value holds pin in clear (as text or UTF-16)."""
    found = []
    for table, values in rows.items():
        for column, value in values:
            raw = bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
            if pin.encode() in raw or pin.encode("utf-16-le") in raw:
                found.append(f"{table}.{column}")
    return found


async def every_value(context: ServiceContext) -> dict[str, list[tuple[str, Any]]]:
    """Every column value of every table, read with plain SQL."""
    rows: dict[str, list[tuple[str, Any]]] = {}
    async with context.sessions() as session:
        for table in Base.metadata.sorted_tables:
            result = await session.execute(text(f"SELECT * FROM {table.name}"))
            rows[table.name] = [
                (column, value) for row in result for column, value in zip(row._fields, row, strict=True)
            ]
    return rows


async def test_the_pin_is_never_stored_in_clear(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, caplog: pytest.LogCaptureFixture
) -> None:
    before = await every_value(context)
    # PINs that appear nowhere yet (a timestamp's microseconds could hold six given digits by chance).
    first = random_pin()
    while pin_places(before, first):
        first = random_pin()
    second = other_pin(first)
    while pin_places(before, second):
        second = other_pin(first)

    with caplog.at_level(logging.DEBUG):
        assert (await put_pin(client, holder.access_token, first)).status_code == 204
        assert (await verify_pin(client, holder.access_token, first)).status_code == 200
        assert (await put_pin(client, holder.access_token, second, current=first)).status_code == 204
        assert (await verify_pin(client, holder.access_token, first)).status_code == 401
        assert (await verify_pin(client, holder.access_token, second)).status_code == 200

    after = await every_value(context)
    for pin in (first, second):
        assert pin_places(after, pin) == [], f"the PIN {pin} is stored in clear"
        assert pin not in caplog.text, "the PIN was logged"

    async with context.sessions() as session:
        stored = await session.scalar(select(ECard.pin_hash).where(ECard.id == uuid.UUID(holder.ecard_id)))
    assert isinstance(stored, str) and stored.startswith("$argon2id$"), stored
    assert PasswordHasher().verify(stored, second)


# --- the step-up before a medical credential -------------------------------------------------


async def test_medical_credential_needs_a_step_up(client: httpx.AsyncClient, holder: Holder) -> None:
    refused = problem(await medical(client, holder.access_token, None), 403)
    assert refused["code"] == "step_up_required"
    # Transit needs none.
    assert (
        await client.post("/v1/holder/credentials", json={"purpose": "transit"}, auth=holder.auth)
    ).status_code == 200


async def test_step_up_of_another_holder_or_device_is_refused(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    other = await factories.activated_holder(client, admin_token, SICHUAN)
    tablet_session = await second_device(client, admin_token, holder)
    tablet = Holder(
        holder.card_id,
        holder.ecard_id,
        holder.card_number,
        tablet_session["access_token"],
        tablet_session["refresh_token"],
    )
    for name, token in {
        "another holder": await factories.step_up(client, other),
        "another device of the same card": await factories.step_up(client, tablet),
        "an access token": holder.access_token,
        "garbage": "not-a-token",
    }.items():
        refused = problem(await medical(client, holder.access_token, token), 403)
        assert refused["code"] == "step_up_required", name

    # Control: the tablet's own token works on the tablet.
    tablet_token = await factories.step_up(client, tablet)
    assert (await medical(client, tablet.access_token, tablet_token)).status_code == 200


async def test_expired_step_up_is_refused(client: httpx.AsyncClient, context: ServiceContext, holder: Holder) -> None:
    await factories.step_up(client, holder)  # sets the PIN
    session = holder_session_of(holder.access_token)
    expired = context.tokens.issue_step_up(session, ttl=-100)
    assert problem(await medical(client, holder.access_token, expired), 403)["code"] == "step_up_required"
    # Control: the same step-up minted live works.
    live = context.tokens.issue_step_up(session, ttl=60)
    assert (await medical(client, holder.access_token, live)).status_code == 200


async def test_fresh_step_up_gives_exactly_one_medical_credential(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder
) -> None:
    token = await factories.step_up(client, holder)
    too_many = problem(await medical(client, holder.access_token, token, count=2), 400)
    assert "one at a time" in too_many["detail"]

    response = await medical(client, holder.access_token, token)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["purpose"] == "medical"
    assert len(bundle["credentials"]) == 1
    claims = open_credential(
        bundle["credentials"][0]["credential"], context.directory.keys.verify_keys, context.directory.keys.seals
    ).claims
    assert claims.purpose is Purpose.MEDICAL
    assert claims.card_ref == holder_session_of(holder.access_token).card_ref


async def test_step_up_is_no_access_token(client: httpx.AsyncClient, holder: Holder) -> None:
    token = await factories.step_up(client, holder)
    assert problem(await client.get("/v1/holder/card", auth=dpop(token, holder.key)), 401)["code"] == "unauthorized"
