"""The operator API as a card office and an attacker would use it.

Region scope (a card or verifier of another region answers exactly like a missing one), roles,
input validation with precise RFC 9457 answers and nothing written on failure, uniqueness of
card numbers and persons, the eCard state machine, personal data encrypted at rest and masked on
the way out, and terminal management reaching the verify hot path at once.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from app.db.models import Base, Card, Person
from app.domain.audit.services import Actor
from app.domain.cards.citizen_id import check_character
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD
from app.domain.operators.services import Role, create_operator
from app.server.context import ServiceContext
from tests import factories
from tests.conftest import operator_token
from tests.factories import Gate, Holder, bearer, problem

SICHUAN, CHONGQING = "510000", "500000"
MAX_BODY = 4096


# --- helpers ---------------------------------------------------------------------------------


def card_body(region: str = SICHUAN, **overrides: Any) -> dict[str, Any]:
    """A valid card-issue request with a fresh person and card number."""
    body = {
        "region": region,
        "citizen_id": factories.citizen_id(region),
        "name": "张三",
        "card_number": factories.card_number(),
    }
    body.update(overrides)
    return body


async def issue(client: httpx.AsyncClient, token: str, body: dict[str, Any]) -> httpx.Response:
    """POST /v1/operator/cards, whatever the outcome."""
    return await client.post("/v1/operator/cards", json=body, headers=bearer(token))


async def read_card(client: httpx.AsyncClient, token: str, card_id: str) -> dict[str, Any]:
    """GET a card (asserting 200)."""
    response = await client.get(f"/v1/operator/cards/{card_id}", headers=bearer(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def change_state(client: httpx.AsyncClient, token: str, card_id: str, state: str) -> httpx.Response:
    """POST .../ecard-state, whatever the outcome."""
    return await client.post(
        f"/v1/operator/cards/{card_id}/ecard-state",
        json={"state": state, "reason": "integration test"},
        headers=bearer(token),
    )


async def stored_rows(context: ServiceContext, citizen_id: str, card_number: str) -> tuple[int, int]:
    """(persons with this citizen ID, cards with this number) in the database."""
    index = context.pii.blind_index(citizen_id, CITIZEN_ID_FIELD)
    async with context.sessions() as session:
        persons = await session.scalar(select(func.count()).select_from(Person).where(Person.citizen_id_index == index))
        cards = await session.scalar(select(func.count()).select_from(Card).where(Card.card_number == card_number))
    return persons or 0, cards or 0


async def terminal_accepts_key(client: httpx.AsyncClient, api_key: str) -> bool:
    """Whether /v1/verify authenticates the key (a garbage credential is then a 200 rejection)."""
    response = await client.post(
        "/v1/verify", json={"credential": "EC1:NOT-A-CREDENTIAL"}, headers={"X-Api-Key": api_key}
    )
    if response.status_code == 200:
        assert response.json()["reason"] == "malformed"
        return True
    assert problem(response, 401)["code"] == "unauthorized"
    return False


async def same_as_missing(
    client: httpx.AsyncClient, method: str, path: str, real_id: str, json: Any, token: str
) -> None:
    """The answer about real_id is byte for byte the answer about an id that does not exist."""
    headers = bearer(token)
    hidden = await client.request(method, path.format(id=real_id), json=json, headers=headers)
    missing = await client.request(method, path.format(id=uuid.uuid4()), json=json, headers=headers)
    body = problem(hidden, 404)
    assert body["code"] == "not_found"
    assert hidden.status_code == missing.status_code
    assert factories.headers_without_request_id(hidden) == factories.headers_without_request_id(missing)
    assert factories.without_request_id(hidden) == factories.without_request_id(missing), (
        f"{hidden.text} != {missing.text}"
    )


def random_region() -> str:
    """A well-formed region code that no test registered before (with overwhelming likelihood)."""
    while True:
        code = f"{1 + secrets.randbelow(9)}{secrets.randbelow(10**5):05d}"
        if code not in factories.REGIONS:
            return code


def citizen_id_born(region: str, birth: str) -> str:
    """A citizen ID with the right check character and the given (possibly impossible) YYYYMMDD birth date."""
    first17 = f"{region}{birth}{secrets.randbelow(1000):03d}"
    return first17 + check_character(first17)


def with_wrong_check_character(citizen_id: str) -> str:
    """The same number with another check character."""
    return citizen_id[:17] + next(c for c in "0123456789X" if c != citizen_id[17])


# --- fixtures: operators of one region, per backend ------------------------------------------


@pytest.fixture(scope="module")
async def sichuan_officer(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A card officer of Sichuan only."""
    return await operator_token(client, context, Role.CARD_OFFICER, [SICHUAN])


@pytest.fixture(scope="module")
async def sichuan_verifier_manager(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """A verifier manager of Sichuan only."""
    return await operator_token(client, context, Role.VERIFIER_MANAGER, [SICHUAN])


@pytest.fixture(scope="module")
async def sichuan_auditor(client: httpx.AsyncClient, context: ServiceContext, admin_token: str) -> str:
    """An auditor of Sichuan only."""
    return await operator_token(client, context, Role.AUDITOR, [SICHUAN])


# --- sign-in ---------------------------------------------------------------------------------


async def test_wrong_password_and_unknown_user_get_the_same_answer(
    client: httpx.AsyncClient, context: ServiceContext
) -> None:
    username, password = f"op-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    async with context.sessions() as session:
        await create_operator(
            session, Actor.command("test"), username=username, password=password, role=Role.AUDITOR, regions=[SICHUAN]
        )

    wrong = await client.post("/v1/operator/session", json={"username": username, "password": password + "x"})
    unknown = await client.post(
        "/v1/operator/session", json={"username": f"nobody-{uuid.uuid4().hex[:8]}", "password": password}
    )
    assert problem(wrong, 401)["code"] == "unauthorized"
    assert factories.without_request_id(wrong) == factories.without_request_id(unknown)
    assert factories.headers_without_request_id(wrong) == factories.headers_without_request_id(unknown)
    assert wrong.headers["www-authenticate"] == "Bearer"

    right = await client.post("/v1/operator/session", json={"username": username, "password": password})
    assert right.status_code == 200, right.text
    assert right.json()["role"] == "auditor"
    assert right.json()["regions"] == [SICHUAN]


# --- region scope ----------------------------------------------------------------------------

CARD_ENDPOINTS = [
    pytest.param("GET", "/v1/operator/cards/{id}", None, id="read"),
    pytest.param("POST", "/v1/operator/cards/{id}/activation-code", None, id="activation-code"),
    pytest.param(
        "POST", "/v1/operator/cards/{id}/ecard-state", {"state": "revoked", "reason": "scope test"}, id="ecard-state"
    ),
]


@pytest.mark.parametrize(("method", "path", "json"), CARD_ENDPOINTS)
async def test_card_of_another_region_is_indistinguishable_from_a_missing_one(
    client: httpx.AsyncClient, admin_token: str, sichuan_officer: str, method: str, path: str, json: Any
) -> None:
    chongqing = (await issue(client, admin_token, card_body(CHONGQING))).json()
    await same_as_missing(client, method, path, chongqing["card"]["card_id"], json, sichuan_officer)

    # Nothing happened to the card: still pending, and its original code still activates it.
    after = await read_card(client, admin_token, chongqing["card"]["card_id"])
    assert after["ecard_state"] == "pending_activation"
    session = await factories.activate(client, chongqing["card"]["card_number"], chongqing["activation_code"])
    assert session["ecard_id"] == chongqing["card"]["ecard_id"]

    # Control: the same officer reaches a card of its own region.
    sichuan = (await issue(client, sichuan_officer, card_body(SICHUAN))).json()
    own = await client.request(
        method, path.format(id=sichuan["card"]["card_id"]), json=json, headers=bearer(sichuan_officer)
    )
    assert own.status_code in (200, 201), own.text


async def test_officer_cannot_issue_a_card_in_another_region(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, sichuan_officer: str
) -> None:
    body = card_body(CHONGQING)
    refused = problem(await issue(client, sichuan_officer, body), 403)
    assert refused["code"] == "forbidden"
    assert CHONGQING in refused["detail"]
    assert await stored_rows(context, body["citizen_id"], body["card_number"]) == (0, 0)
    assert (await issue(client, admin_token, body)).status_code == 201


VERIFIER_ENDPOINTS = [
    pytest.param(
        "POST",
        "/v1/operator/verifier-organisations/{id}/terminals",
        {"name": "gate", "allowed_purposes": ["transit"]},
        "organisation",
        id="create-terminal",
    ),
    pytest.param("PATCH", "/v1/operator/terminals/{id}", {"enabled": False}, "terminal", id="disable-terminal"),
    pytest.param("POST", "/v1/operator/terminals/{id}/api-key", None, "terminal", id="rotate-api-key"),
]


@pytest.mark.parametrize(("method", "path", "json", "target"), VERIFIER_ENDPOINTS)
async def test_verifier_of_another_region_is_indistinguishable_from_a_missing_one(
    client: httpx.AsyncClient,
    admin_token: str,
    sichuan_verifier_manager: str,
    method: str,
    path: str,
    json: Any,
    target: str,
) -> None:
    chongqing = await factories.new_gate(client, admin_token, CHONGQING, "park", ["park"])
    real_id = chongqing.organisation_id if target == "organisation" else chongqing.terminal_id
    await same_as_missing(client, method, path, real_id, json, sichuan_verifier_manager)
    # The foreign terminal is untouched: enabled, with its key.
    assert await terminal_accepts_key(client, chongqing.api_key)

    # Control: the same manager reaches a verifier of its own region.
    sichuan = await factories.new_gate(client, admin_token, SICHUAN, "park", ["park"])
    own_id = sichuan.organisation_id if target == "organisation" else sichuan.terminal_id
    own = await client.request(method, path.format(id=own_id), json=json, headers=bearer(sichuan_verifier_manager))
    assert own.status_code in (200, 201), own.text


async def test_verifier_organisations_stay_within_region(
    client: httpx.AsyncClient, admin_token: str, sichuan_verifier_manager: str
) -> None:
    foreign = await client.post(
        "/v1/operator/verifier-organisations",
        json={"name": "重庆轨道交通", "business_type": "transit", "region": CHONGQING},
        headers=bearer(sichuan_verifier_manager),
    )
    assert problem(foreign, 403)["code"] == "forbidden"

    chongqing = await factories.new_gate(client, admin_token, CHONGQING, "library", ["library"])
    sichuan = await factories.new_gate(client, sichuan_verifier_manager, SICHUAN, "library", ["library"])
    listed = await client.get("/v1/operator/verifier-organisations", headers=bearer(sichuan_verifier_manager))
    assert listed.status_code == 200, listed.text
    ids = {org["id"] for org in listed.json()}
    assert sichuan.organisation_id in ids
    assert chongqing.organisation_id not in ids
    assert {org["region"] for org in listed.json()} == {SICHUAN}


# --- roles -----------------------------------------------------------------------------------


async def test_auditor_reads_cards_but_changes_nothing(
    client: httpx.AsyncClient, admin_token: str, sichuan_auditor: str
) -> None:
    issued = (await issue(client, admin_token, card_body())).json()
    card_id = issued["card"]["card_id"]

    assert (await read_card(client, sichuan_auditor, card_id))["card_id"] == card_id
    assert problem(await issue(client, sichuan_auditor, card_body()), 403)["code"] == "forbidden"
    code = await client.post(f"/v1/operator/cards/{card_id}/activation-code", headers=bearer(sichuan_auditor))
    assert problem(code, 403)["code"] == "forbidden"
    assert problem(await change_state(client, sichuan_auditor, card_id, "revoked"), 403)["code"] == "forbidden"
    listed = await client.get("/v1/operator/verifier-organisations", headers=bearer(sichuan_auditor))
    assert listed.status_code == 200, listed.text

    assert (await read_card(client, admin_token, card_id))["ecard_state"] == "pending_activation"
    # The original activation code was not replaced.
    await factories.activate(client, issued["card"]["card_number"], issued["activation_code"])


async def test_card_officer_cannot_manage_verifiers(
    client: httpx.AsyncClient, admin_token: str, sichuan_officer: str
) -> None:
    created = await client.post(
        "/v1/operator/verifier-organisations",
        json={"name": "成都图书馆", "business_type": "library", "region": SICHUAN},
        headers=bearer(sichuan_officer),
    )
    assert problem(created, 403)["code"] == "forbidden"
    gate = await factories.new_gate(client, admin_token, SICHUAN, "library", ["library"])
    disabled = await client.patch(
        f"/v1/operator/terminals/{gate.terminal_id}", json={"enabled": False}, headers=bearer(sichuan_officer)
    )
    assert problem(disabled, 403)["code"] == "forbidden"
    assert await terminal_accepts_key(client, gate.api_key)


async def test_verifier_manager_cannot_issue_cards(
    client: httpx.AsyncClient, context: ServiceContext, sichuan_verifier_manager: str
) -> None:
    body = card_body()
    assert problem(await issue(client, sichuan_verifier_manager, body), 403)["code"] == "forbidden"
    assert await stored_rows(context, body["citizen_id"], body["card_number"]) == (0, 0)


@pytest.mark.parametrize("role", [Role.CARD_OFFICER, Role.VERIFIER_MANAGER, Role.AUDITOR])
async def test_only_admins_register_regions(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, role: Role
) -> None:
    code = random_region()
    token = await operator_token(client, context, role, ["*"])
    refused = await client.post("/v1/operator/regions", json={"code": code, "name": "测试"}, headers=bearer(token))
    assert problem(refused, 403)["code"] == "forbidden"
    regions = await client.get("/v1/operator/regions", headers=bearer(admin_token))
    assert code not in {region["code"] for region in regions.json()}

    created = await client.post(
        "/v1/operator/regions", json={"code": code, "name": "测试"}, headers=bearer(admin_token)
    )
    assert created.status_code == 201, created.text
    regions = await client.get("/v1/operator/regions", headers=bearer(token))
    assert code in {region["code"] for region in regions.json()}


async def test_regional_admin_registers_no_region_outside_its_scope(
    client: httpx.AsyncClient, context: ServiceContext
) -> None:
    token = await operator_token(client, context, Role.ADMIN, [SICHUAN])
    refused = await client.post(
        "/v1/operator/regions", json={"code": random_region(), "name": "测试"}, headers=bearer(token)
    )
    assert problem(refused, 403)["code"] == "forbidden"


# --- validation ------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], dict[str, Any]]

VALIDATION_CASES = [
    pytest.param(
        lambda b: {**b, "citizen_id": with_wrong_check_character(b["citizen_id"])},
        400,
        {"detail": "citizen ID check character does not match"},
        id="citizen-id-check-character",
    ),
    pytest.param(
        lambda b: {**b, "citizen_id": citizen_id_born(SICHUAN, "19900230")},
        400,
        {"detail": "citizen ID holds an impossible birth date"},
        id="impossible-birth-date",
    ),
    pytest.param(
        lambda b: {**b, "citizen_id": b["citizen_id"][:17] + "Y"},
        400,
        {"detail": "citizen ID must be 17 digits followed by a digit or X"},
        id="citizen-id-format",
    ),
    pytest.param(
        lambda b: {**b, "card_number": "T1234-678"},
        400,
        {"detail": "card number must be 9 letters or digits"},
        id="card-number-characters",
    ),
    pytest.param(
        lambda b: {**b, "card_number": "T1234"},
        400,
        {"error": ("card_number", "Expected `str` of length >= 9")},
        id="card-number-length",
    ),
    pytest.param(
        lambda b: {**b, "region": "990000"},
        404,
        {"detail": "region 990000 is not registered"},
        id="unknown-region",
    ),
    pytest.param(
        lambda b: {**b, "region": "051000"},
        400,
        {"error": ("region", "Expected `str` matching regex")},
        id="malformed-region",
    ),
    pytest.param(
        lambda b: {**b, "nickname": "三儿"},
        400,
        {"error": ("data", "Object contains unknown field `nickname`")},
        id="unknown-field",
    ),
    pytest.param(
        lambda b: {**b, "region": int(b["region"])},
        400,
        {"error": ("region", "Expected `str`, got `int`")},
        id="region-as-number",
    ),
    pytest.param(
        lambda b: {**b, "name": ["张", "三"]},
        400,
        {"error": ("name", "Expected `str`, got `array`")},
        id="name-as-array",
    ),
    pytest.param(
        lambda b: {**b, "card_number": None},
        400,
        {"error": ("card_number", "Expected `str`, got `null`")},
        id="card-number-null",
    ),
    pytest.param(
        lambda b: {k: v for k, v in b.items() if k != "name"},
        400,
        {"error": ("data", "Object missing required field `name`")},
        id="missing-field",
    ),
    pytest.param(lambda b: {**b, "name": "   "}, 400, {"detail": "name must not be empty"}, id="blank-name"),
    pytest.param(
        lambda b: {**b, "name": "张" + "三" * 2000},
        413,
        {"detail": "Request Entity Too Large"},
        id="body-over-4096-bytes",
    ),
]


@pytest.mark.parametrize(("mutate", "status", "expected"), VALIDATION_CASES)
async def test_invalid_card_issue_is_a_precise_problem_and_writes_nothing(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    mutate: Mutation,
    status: int,
    expected: dict[str, Any],
) -> None:
    valid = card_body()
    response = await issue(client, admin_token, mutate(valid))
    body = problem(response, status)
    assert body["code"] == {400: "bad_request", 404: "not_found", 413: "payload_too_large"}[status]
    if "detail" in expected:
        assert body["detail"] == expected["detail"]
    else:
        key, message = expected["error"]
        assert body["detail"] == "Validation failed for POST /v1/operator/cards"
        assert [(e["source"], e["key"]) for e in body["errors"]] == [("body", key)], body
        assert body["errors"][0]["message"].startswith(message), body

    # Nothing was written: neither the person nor the card; the same request, corrected, succeeds.
    assert await stored_rows(context, valid["citizen_id"], valid["card_number"]) == (0, 0)
    retried = await issue(client, admin_token, valid)
    assert retried.status_code == 201, retried.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"{", None, id="truncated-json"),
        pytest.param(b"not json", None, id="not-json"),
        pytest.param(b"[1, 2]", "Expected `object`, got `array`", id="array"),
        pytest.param(b"", None, id="empty"),
    ],
)
async def test_unparseable_body_is_a_400_problem(
    client: httpx.AsyncClient, admin_token: str, content: bytes, message: str | None
) -> None:
    response = await client.post(
        "/v1/operator/cards",
        content=content,
        headers={**bearer(admin_token), "Content-Type": "application/json"},
    )
    body = problem(response, 400)
    assert body["code"] == "bad_request"
    if message:
        assert body["errors"][0]["message"] == message


@pytest.mark.parametrize(
    "path",
    [
        "/v1/operator/session",
        "/v1/operator/regions",
        "/v1/operator/verifier-organisations",
    ],
)
async def test_every_operator_body_is_capped_at_4096_bytes(
    client: httpx.AsyncClient, admin_token: str, path: str
) -> None:
    response = await client.post(path, json={"name": "x" * MAX_BODY}, headers=bearer(admin_token))
    assert problem(response, 413)["code"] == "payload_too_large"


# --- uniqueness ------------------------------------------------------------------------------


async def test_duplicate_card_number_is_a_conflict(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    first = card_body()
    assert (await issue(client, admin_token, first)).status_code == 201
    # Another person, the same number (in lower case: card numbers are not case-sensitive).
    second = card_body(card_number=first["card_number"].lower())
    body = problem(await issue(client, admin_token, second), 409)
    assert body["code"] == "conflict"
    assert first["card_number"] in body["detail"]
    assert (await stored_rows(context, second["citizen_id"], first["card_number"]))[0] == 0
    # That person can still get a card of their own.
    assert (await issue(client, admin_token, {**second, "card_number": factories.card_number()})).status_code == 201


async def test_a_person_with_a_card_in_use_gets_no_second_card(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    first = card_body()
    assert (await issue(client, admin_token, first)).status_code == 201
    again = card_body(citizen_id=first["citizen_id"], name="张三丰")
    body = problem(await issue(client, admin_token, again), 409)
    assert body["code"] == "conflict"
    assert await stored_rows(context, first["citizen_id"], again["card_number"]) == (1, 0)
    # The refused card number is still free.
    assert (await issue(client, admin_token, card_body(card_number=again["card_number"]))).status_code == 201


async def test_concurrent_issues_of_one_card_number_give_one_card(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    number = factories.card_number()
    bodies = [card_body(card_number=number) for _ in range(2)]
    responses = await asyncio.gather(*(issue(client, admin_token, body) for body in bodies))
    assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
    for response in responses:
        if response.status_code == 409:
            assert problem(response, 409)["code"] == "conflict"
    async with context.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Card).where(Card.card_number == number)) == 1


async def test_concurrent_issues_for_one_new_person_give_one_card(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    citizen_id = factories.citizen_id()
    bodies = [card_body(citizen_id=citizen_id) for _ in range(2)]
    responses = await asyncio.gather(*(issue(client, admin_token, body) for body in bodies))
    assert sorted(r.status_code for r in responses) == [201, 409], [r.text for r in responses]
    index = context.pii.blind_index(citizen_id, CITIZEN_ID_FIELD)
    async with context.sessions() as session:
        cards = await session.scalar(
            select(func.count()).select_from(Card).join(Person).where(Person.citizen_id_index == index)
        )
    assert cards == 1


# --- the eCard state machine -----------------------------------------------------------------


async def card_in_state(client: httpx.AsyncClient, token: str, state: str) -> str:
    """The id of a fresh Sichuan card whose eCard is in state."""
    issued = (await issue(client, token, card_body())).json()
    card_id: str = issued["card"]["card_id"]
    if state == "pending_activation":
        return card_id
    await factories.activate(client, issued["card"]["card_number"], issued["activation_code"])
    if state in ("suspended", "revoked"):
        assert (await change_state(client, token, card_id, state)).status_code == 200
    assert (await read_card(client, token, card_id))["ecard_state"] == state
    return card_id


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ("active", "suspended"),
        ("suspended", "active"),
        ("active", "revoked"),
        ("suspended", "revoked"),
        ("pending_activation", "revoked"),
    ],
)
async def test_legal_ecard_transition(client: httpx.AsyncClient, sichuan_officer: str, start: str, target: str) -> None:
    card_id = await card_in_state(client, sichuan_officer, start)
    response = await change_state(client, sichuan_officer, card_id, target)
    assert response.status_code == 200, response.text
    assert response.json()["ecard_state"] == target
    assert (await read_card(client, sichuan_officer, card_id))["ecard_state"] == target


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ("revoked", "active"),
        ("revoked", "suspended"),
        ("revoked", "revoked"),
        ("pending_activation", "suspended"),
        ("pending_activation", "active"),
        ("active", "active"),
        ("suspended", "suspended"),
    ],
)
async def test_illegal_ecard_transition_is_a_conflict(
    client: httpx.AsyncClient, sichuan_officer: str, start: str, target: str
) -> None:
    card_id = await card_in_state(client, sichuan_officer, start)
    body = problem(await change_state(client, sichuan_officer, card_id, target), 409)
    assert body["code"] == "conflict"
    assert body["current_state"] == start
    assert (await read_card(client, sichuan_officer, card_id))["ecard_state"] == start


async def test_invalid_target_state_is_a_400(client: httpx.AsyncClient, sichuan_officer: str, holder: Holder) -> None:
    for payload in (
        {"state": "pending_activation", "reason": "x"},
        {"state": "suspended"},
        {"state": "suspended", "reason": ""},
    ):
        response = await client.post(
            f"/v1/operator/cards/{holder.card_id}/ecard-state", json=payload, headers=bearer(sichuan_officer)
        )
        assert problem(response, 400)["code"] == "bad_request", payload
    assert (await read_card(client, sichuan_officer, holder.card_id))["ecard_state"] == "active"


async def test_state_changes_reach_verification_at_once(
    client: httpx.AsyncClient, sichuan_officer: str, holder: Holder, gate: Gate
) -> None:
    [before_suspension] = await factories.credentials(client, holder)
    assert (await change_state(client, sichuan_officer, holder.card_id, "suspended")).status_code == 200
    assert (await factories.verify(client, gate, before_suspension))["reason"] == "card_suspended"

    assert (await change_state(client, sichuan_officer, holder.card_id, "active")).status_code == 200
    [after_resume] = await factories.credentials(client, holder)
    [before_revocation] = await factories.credentials(client, holder)
    assert (await factories.verify(client, gate, after_resume))["result"] == "accepted"

    assert (await change_state(client, sichuan_officer, holder.card_id, "revoked")).status_code == 200
    assert (await factories.verify(client, gate, before_revocation))["reason"] == "card_revoked"


# --- personal data ---------------------------------------------------------------------------


def random_han() -> str:
    """One random CJK unified ideograph."""
    return chr(0x4E00 + secrets.randbelow(0x9FA5 - 0x4E00))


async def test_personal_data_is_encrypted_at_rest_and_masked_on_read(
    client: httpx.AsyncClient, context: ServiceContext, sichuan_officer: str
) -> None:
    name = "张" + random_han()
    body = card_body(name=name)
    citizen_id: str = body["citizen_id"]
    response = await issue(client, sichuan_officer, body)
    assert response.status_code == 201, response.text
    card = response.json()["card"]

    # Masked in every answer.
    for shown in (card, await read_card(client, sichuan_officer, card["card_id"])):
        assert shown["holder_name"] == "张*"
        assert shown["citizen_id"] == citizen_id[:4] + "*" * 10 + citizen_id[-4:]
        assert citizen_id not in str(shown) and name not in str(shown)

    # Never in plaintext in any column of any table.
    plaintexts = {"name": name, "citizen ID": citizen_id}
    async with context.sessions() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(text(f"SELECT * FROM {table.name}"))).all()
            for row in rows:
                for column, value in zip(row._fields, row, strict=True):
                    raw = bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()
                    for what, plain in plaintexts.items():
                        assert plain.encode() not in raw, f"{what} in plaintext in {table.name}.{column}"
                        assert plain.encode("utf-16-le") not in raw, f"{what} (UTF-16) in {table.name}.{column}"

        # The person's row is there, as ciphertext that decrypts back to what was sent.
        index = context.pii.blind_index(citizen_id, CITIZEN_ID_FIELD)
        rows = (
            await session.execute(
                text("SELECT citizen_id_encrypted, name_encrypted FROM persons WHERE citizen_id_index = :index"),
                {"index": index},
            )
        ).all()
    assert len(rows) == 1
    encrypted_id, encrypted_name = (bytes(value) for value in rows[0])
    assert context.pii.decrypt(encrypted_id, CITIZEN_ID_FIELD) == citizen_id
    assert context.pii.decrypt(encrypted_name, NAME_FIELD) == name


# --- terminals -------------------------------------------------------------------------------


async def test_disabled_terminal_is_refused_until_enabled_again(
    client: httpx.AsyncClient, admin_token: str, sichuan_verifier_manager: str, holder: Holder
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    [credential] = await factories.credentials(client, holder)
    path = f"/v1/operator/terminals/{gate.terminal_id}"

    disabled = await client.patch(path, json={"enabled": False}, headers=bearer(sichuan_verifier_manager))
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False
    refused = await client.post("/v1/verify", json={"credential": credential}, headers=gate.headers)
    assert problem(refused, 401)["code"] == "unauthorized"

    enabled = await client.patch(path, json={"enabled": True}, headers=bearer(sichuan_verifier_manager))
    assert enabled.status_code == 200, enabled.text
    assert enabled.json()["enabled"] is True
    # The refused call consumed nothing: the same credential is accepted now.
    assert (await factories.verify(client, gate, credential))["result"] == "accepted"


async def test_rotated_api_key_replaces_the_old_one_at_once(
    client: httpx.AsyncClient, admin_token: str, sichuan_verifier_manager: str, holder: Holder
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    assert await terminal_accepts_key(client, gate.api_key)
    response = await client.post(
        f"/v1/operator/terminals/{gate.terminal_id}/api-key", headers=bearer(sichuan_verifier_manager)
    )
    assert response.status_code == 201, response.text
    new_key = response.json()["api_key"]
    assert new_key != gate.api_key
    assert response.json()["terminal"]["id"] == gate.terminal_id

    [credential] = await factories.credentials(client, holder)
    old = await client.post("/v1/verify", json={"credential": credential}, headers=gate.headers)
    assert problem(old, 401)["code"] == "unauthorized"
    rotated = Gate(terminal_id=gate.terminal_id, organisation_id=gate.organisation_id, api_key=new_key)
    assert (await factories.verify(client, rotated, credential))["result"] == "accepted"
