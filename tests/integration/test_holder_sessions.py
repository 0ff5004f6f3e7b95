"""Holder sessions through the API: activation, refresh-token rotation, access tokens, card state.

Every test runs against SQLite and PostgreSQL and a real Redis (see tests/conftest.py). The
properties checked here are the ones an attacker on the holder API would probe: activation must
not tell a guesser anything and must lock a code after a few wrong tries; a code works once,
even under a race; refresh tokens rotate and a replayed one revokes the whole family; an access
token only ever speaks for its own card.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update

from app.db.clock import utcnow
from app.db.models import ActivationCode, Device
from app.server.context import ServiceContext
from crypto.credential import open_credential
from tests import factories
from tests.factories import Holder, bearer, dpop, holder_session_of, problem

MAX_ATTEMPTS = 5


# --- helpers ---------------------------------------------------------------------------------


async def try_activation(
    client: httpx.AsyncClient,
    card_number: str,
    code: str,
    device_key: str | None = None,
    device: factories.DeviceKey | None = None,
) -> httpx.Response:
    """POST /v1/holder/activation, whatever the outcome, with a proof by `device` (a new key by default),
    registering its key (or `device_key`, as given)."""
    device = device or factories.DeviceKey()
    return await client.post(
        "/v1/holder/activation",
        json={
            "card_number": card_number,
            "activation_code": code,
            "device_public_key": device.public_key if device_key is None else device_key,
        },
        auth=device.auth(),
    )


async def new_activation_code(client: httpx.AsyncClient, token: str, card_id: str) -> str:
    """An operator's fresh activation code for the card."""
    response = await client.post(f"/v1/operator/cards/{card_id}/activation-code", headers=bearer(token))
    assert response.status_code == 201, response.text
    code: str = response.json()["activation_code"]
    return code


def wrong_code(code: str) -> str:
    """A well-formed activation code that is not code."""
    digits = code.replace("-", "")
    other = f"{(int(digits) + 1) % 10**8:08d}"
    return f"{other[:4]}-{other[4:]}"


async def get_credentials(
    client: httpx.AsyncClient, access_token: str, device: factories.DeviceKey | None = None, **body: Any
) -> httpx.Response:
    """POST /v1/holder/credentials, whatever the outcome, signed by `device` (default: the token's own)."""
    return await client.post(
        "/v1/holder/credentials", json={"purpose": "transit", **body}, auth=dpop(access_token, device)
    )


async def refresh(
    client: httpx.AsyncClient, refresh_token: str, device: factories.DeviceKey | None = None
) -> httpx.Response:
    """POST /v1/holder/token, whatever the outcome, signed by `device` (default: the token's own)."""
    return await client.post(
        "/v1/holder/token", json={"refresh_token": refresh_token}, auth=dpop(refresh_token, device)
    )


async def set_ecard_state(client: httpx.AsyncClient, token: str, card_id: str, state: str) -> None:
    """An operator moves the eCard to state."""
    response = await client.post(
        f"/v1/operator/cards/{card_id}/ecard-state",
        json={"state": state, "reason": "integration test"},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text
    assert response.json()["ecard_state"] == state


async def activation_failure(client: httpx.AsyncClient) -> dict[str, Any]:
    """The reference answer to a failed activation: an unknown (well-formed) card number."""
    response = await try_activation(client, factories.card_number(), "1234-5678")
    return problem(response, 401)


def names_every_cause(detail: str) -> bool:
    """The shared failure text must not single out one cause."""
    return all(word in detail for word in ("wrong", "expired", "used"))


# --- activation ------------------------------------------------------------------------------


async def test_every_activation_failure_gets_the_same_answer(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    reference = await activation_failure(client)
    assert reference["code"] == "activation_failed"
    assert names_every_cause(reference["detail"])

    # A wrong code for a real card.
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    wrong = problem(await try_activation(client, number, wrong_code(code)), 401)

    # A code already used.
    await factories.activate(client, number, code)
    used = problem(await try_activation(client, number, code), 401)

    # An expired code (its expiry moved into the past in the database).
    other = await factories.issue_card(client, admin_token)
    async with context.sessions() as session:
        await session.execute(
            update(ActivationCode)
            .where(ActivationCode.ecard_id == uuid.UUID(other["card"]["ecard_id"]))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        await session.commit()
    expired = problem(await try_activation(client, other["card"]["card_number"], other["activation_code"]), 401)

    for name, body in {"wrong code": wrong, "used code": used, "expired code": expired}.items():
        assert body == reference, f"{name} answers differently from an unknown card: {body} != {reference}"


@pytest.mark.parametrize("shape", ["with dash", "without dash", "with spaces"])
async def test_activation_code_is_accepted_with_or_without_its_dash(
    client: httpx.AsyncClient, admin_token: str, shape: str
) -> None:
    issued = await factories.issue_card(client, admin_token)
    code: str = issued["activation_code"]
    assert len(code) == 9 and code[4] == "-", code
    typed = {"with dash": code, "without dash": code.replace("-", ""), "with spaces": code.replace("-", " ")}[shape]
    response = await try_activation(client, issued["card"]["card_number"].lower(), typed)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ecard_id"] == issued["card"]["ecard_id"]
    assert body["token_type"] == "DPoP"
    assert 0 < body["expires_in"] <= 900


async def test_code_is_locked_after_five_wrong_tries(client: httpx.AsyncClient, admin_token: str) -> None:
    reference = await activation_failure(client)
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    for attempt in range(MAX_ATTEMPTS):
        body = problem(await try_activation(client, number, wrong_code(code)), 401)
        assert body == reference, f"wrong try {attempt + 1}"

    locked = await try_activation(client, number, code)
    assert locked.status_code == 401, f"the right code still worked after {MAX_ATTEMPTS} wrong tries"
    assert problem(locked, 401) == reference

    # The card office can hand out a new code, which is not locked.
    fresh = await new_activation_code(client, admin_token, issued["card"]["card_id"])
    assert (await try_activation(client, number, fresh)).status_code == 201


async def test_lock_holds_against_concurrent_guesses(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    """Parallel guesses must not buy more than five tries: 19 wrong guesses at once, then the right code.

    (The right code goes after the 19 have been answered, not among them: raced with them, it may
    legitimately be compared before the fifth wrong one, and the test would depend on the order.)
    """
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    responses = await asyncio.gather(*(try_activation(client, number, wrong_code(code)) for _ in range(19)))
    assert [response.status_code for response in responses] == [401] * 19
    async with context.sessions() as session:
        compared = await session.scalar(
            select(ActivationCode.attempts).where(ActivationCode.ecard_id == uuid.UUID(issued["card"]["ecard_id"]))
        )
    assert compared is not None and compared <= MAX_ATTEMPTS, (
        f"{compared} wrong guesses were compared against the code; at most {MAX_ATTEMPTS} may be: the lock is "
        "read before the comparison and counted after it, so concurrent guesses bypass it"
    )
    right = await try_activation(client, number, code)
    assert right.status_code == 401, "the right code was accepted after the code had locked"


async def test_four_wrong_tries_do_not_lock_the_code(client: httpx.AsyncClient, admin_token: str) -> None:
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    for _ in range(MAX_ATTEMPTS - 1):
        problem(await try_activation(client, number, wrong_code(code)), 401)
    assert (await try_activation(client, number, code)).status_code == 201


async def test_code_works_only_once(client: httpx.AsyncClient, admin_token: str) -> None:
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    first = await try_activation(client, number, code)
    assert first.status_code == 201, first.text
    second = await try_activation(client, number, code)
    assert problem(second, 401) == await activation_failure(client)


@pytest.mark.parametrize("copies", [2, 8])
async def test_concurrent_activations_with_one_code_bind_exactly_one_device(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str, copies: int
) -> None:
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    responses = await asyncio.gather(*(try_activation(client, number, code) for _ in range(copies)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] + [401] * (copies - 1), [r.text for r in responses]
    reference = await activation_failure(client)
    for response in responses:
        if response.status_code == 401:
            assert problem(response, 401) == reference
    async with context.sessions() as session:
        devices = await session.scalar(
            select(func.count()).select_from(Device).where(Device.ecard_id == uuid.UUID(issued["card"]["ecard_id"]))
        )
    assert devices == 1


async def test_new_code_replaces_the_open_one(client: httpx.AsyncClient, admin_token: str) -> None:
    issued = await factories.issue_card(client, admin_token)
    number, old = issued["card"]["card_number"], issued["activation_code"]
    new = await new_activation_code(client, admin_token, issued["card"]["card_id"])
    assert new != old
    assert problem(await try_activation(client, number, old), 401)["code"] == "activation_failed"
    assert (await try_activation(client, number, new)).status_code == 201


async def test_operators_new_code_activates_a_second_device(client: httpx.AsyncClient, admin_token: str) -> None:
    issued = await factories.issue_card(client, admin_token)
    card_id, number = issued["card"]["card_id"], issued["card"]["card_number"]
    first = await factories.activate(client, number, issued["activation_code"])

    # Two codes in a row: only the newest one is open.
    superseded = await new_activation_code(client, admin_token, card_id)
    newest = await new_activation_code(client, admin_token, card_id)
    assert problem(await try_activation(client, number, superseded), 401)["code"] == "activation_failed"
    second_response = await try_activation(client, number, newest)
    assert second_response.status_code == 201, second_response.text
    second = second_response.json()

    assert second["ecard_id"] == first["ecard_id"] == issued["card"]["ecard_id"]
    assert second["device_id"] != first["device_id"]
    # Both devices hold working sessions.
    for session in (first, second):
        assert (await get_credentials(client, session["access_token"])).status_code == 200
    # The code used for the second device is spent as well.
    assert problem(await try_activation(client, number, newest), 401)["code"] == "activation_failed"


@pytest.mark.parametrize(
    "device_public_key",
    [
        pytest.param("A" * 42, id="too-short"),
        pytest.param("A" * 44, id="too-long"),
        pytest.param("A" * 42 + "+", id="plus-sign"),
        pytest.param("A" * 42 + "/", id="slash"),
        pytest.param("A" * 41 + "==", id="padding"),
        pytest.param("", id="empty"),
        pytest.param("Ä" * 43, id="non-ascii"),
    ],
)
async def test_malformed_device_public_key_is_a_400_problem(
    client: httpx.AsyncClient, admin_token: str, device_public_key: str
) -> None:
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    # More malformed requests than the code's attempts: none of them may count as a wrong try.
    for _ in range(MAX_ATTEMPTS + 1):
        response = await try_activation(client, number, code, device_public_key)
        body = problem(response, 400)
        assert body["code"] == "bad_request"
        assert [error["key"] for error in body["errors"]] == ["device_public_key"], body
    assert (await try_activation(client, number, code)).status_code == 201


async def test_device_public_key_of_wrong_type_is_a_400_problem(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/holder/activation",
        json={"card_number": factories.card_number(), "activation_code": "1234-5678", "device_public_key": 42},
        auth=factories.DeviceKey().auth(),
    )
    body = problem(response, 400)
    assert body["errors"] == [{"message": "Expected `str`, got `int`", "key": "device_public_key", "source": "body"}]


# --- refresh tokens --------------------------------------------------------------------------


async def test_refresh_rotates_the_tokens(client: httpx.AsyncClient, holder: Holder) -> None:
    response = await refresh(client, holder.refresh_token)
    assert response.status_code == 200, response.text
    rotated = response.json()
    assert rotated["refresh_token"] != holder.refresh_token
    assert rotated["access_token"] != holder.access_token
    assert rotated["ecard_id"] == holder.ecard_id
    assert (await get_credentials(client, rotated["access_token"])).status_code == 200
    # And the new refresh token rotates again.
    again = await refresh(client, rotated["refresh_token"])
    assert again.status_code == 200, again.text
    assert again.json()["refresh_token"] not in (holder.refresh_token, rotated["refresh_token"])


async def test_reused_refresh_token_revokes_the_whole_family(client: httpx.AsyncClient, holder: Holder) -> None:
    first = await refresh(client, holder.refresh_token)
    assert first.status_code == 200, first.text
    second = await refresh(client, first.json()["refresh_token"])
    assert second.status_code == 200, second.text
    newest = second.json()["refresh_token"]

    reused = problem(await refresh(client, holder.refresh_token), 401)
    assert reused["code"] == "refresh_token_reused"

    # The thief's copy is dead, and so is the newest token of the family.
    after = await refresh(client, newest)
    assert after.status_code == 401, "the newest refresh token of a revoked family still works"
    assert problem(after, 401)["code"] == "invalid_refresh_token"


async def test_reuse_in_one_family_leaves_other_devices_alone(client: httpx.AsyncClient, admin_token: str) -> None:
    issued = await factories.issue_card(client, admin_token)
    number = issued["card"]["card_number"]
    phone = await factories.activate(client, number, issued["activation_code"])
    tablet = await factories.activate(
        client, number, await new_activation_code(client, admin_token, issued["card"]["card_id"])
    )
    assert (await refresh(client, phone["refresh_token"])).status_code == 200
    assert problem(await refresh(client, phone["refresh_token"]), 401)["code"] == "refresh_token_reused"
    assert (await refresh(client, tablet["refresh_token"])).status_code == 200


@pytest.mark.parametrize(
    "token",
    [pytest.param("rt_" + "A" * 43, id="well-formed-unknown"), pytest.param("garbage", id="garbage")],
)
async def test_unknown_refresh_token_is_refused(client: httpx.AsyncClient, token: str) -> None:
    body = problem(await refresh(client, token, factories.DeviceKey()), 401)
    assert body["code"] == "invalid_refresh_token"


async def test_refresh_token_of_a_revoked_ecard_is_refused(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    await set_ecard_state(client, admin_token, holder.card_id, "revoked")
    assert problem(await refresh(client, holder.refresh_token), 401)["code"] == "invalid_refresh_token"


# --- access tokens ---------------------------------------------------------------------------


async def test_credentials_need_an_authorization_header(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/holder/credentials", json={"purpose": "transit"})
    body = problem(response, 401)
    assert body["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == 'DPoP algs="EdDSA"'


@pytest.mark.parametrize(
    ("header", "code"),
    [
        pytest.param("Bearer garbage", "dpop_required", id="garbage"),
        pytest.param("Bearer ", "unauthorized", id="empty-token"),
        pytest.param("Basic dXNlcjpwYXNz", "unauthorized", id="basic-scheme"),
        pytest.param("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "dpop_required", id="alg-none"),
        pytest.param("DPoP garbage", "unauthorized", id="dpop-garbage"),
        pytest.param("DPoP ", "unauthorized", id="dpop-empty-token"),
        pytest.param("DPoP eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "unauthorized", id="dpop-alg-none"),
    ],
)
async def test_garbage_access_token_is_refused(client: httpx.AsyncClient, header: str, code: str) -> None:
    proof = factories.DeviceKey().proof("POST", "http://testserver/v1/holder/credentials", header.partition(" ")[2])
    for headers in ({"Authorization": header}, {"Authorization": header, "DPoP": proof}):
        response = await client.post("/v1/holder/credentials", json={"purpose": "transit"}, headers=headers)
        assert problem(response, 401)["code"] == code
        assert response.headers["www-authenticate"].startswith('DPoP algs="EdDSA"')


async def test_operator_token_is_not_a_holder_token(client: httpx.AsyncClient, admin_token: str) -> None:
    response = await get_credentials(client, admin_token, factories.DeviceKey())
    body = problem(response, 401)
    assert body["code"] == "unauthorized"
    assert "audience" in body["detail"].lower(), body


async def test_holder_token_is_not_an_operator_token(client: httpx.AsyncClient, holder: Holder) -> None:
    response = await client.get(f"/v1/operator/cards/{holder.card_id}", auth=holder.auth)
    assert problem(response, 401)["code"] == "unauthorized"


async def test_expired_access_token_is_refused(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder
) -> None:
    session = holder_session_of(holder.access_token)
    # Control: the same session minted now works.
    fresh = context.tokens.issue_holder(session, ttl=60)
    assert (await get_credentials(client, fresh, holder.key)).status_code == 200
    expired = context.tokens.issue_holder(session, ttl=-100)
    body = problem(await get_credentials(client, expired, holder.key), 401)
    assert body["code"] == "unauthorized"
    assert "expired" in body["detail"].lower(), body


async def test_access_token_signed_by_another_key_is_refused(client: httpx.AsyncClient, holder: Holder) -> None:
    claims = jwt.decode(holder.access_token, options={"verify_signature": False})
    header = jwt.get_unverified_header(holder.access_token)
    forged = jwt.encode(claims, Ed25519PrivateKey.generate(), algorithm="EdDSA", headers={"kid": header["kid"]})
    assert problem(await get_credentials(client, forged, holder.key), 401)["code"] == "unauthorized"


async def test_a_token_gets_credentials_for_its_own_card_only(
    client: httpx.AsyncClient, context: ServiceContext, admin_token: str
) -> None:
    alice = await factories.activated_holder(client, admin_token, "510000")
    bob = await factories.activated_holder(client, admin_token, "510000")
    alice_ref = holder_session_of(alice.access_token).card_ref
    bob_ref = holder_session_of(bob.access_token).card_ref
    assert alice_ref != bob_ref

    # Every credential in Alice's bundle is for Alice's card.
    alice_credentials = await factories.credentials(client, alice, count=5)
    keys = context.directory.keys.verify_keys
    assert {
        open_credential(text, keys, context.directory.keys.seals).claims.card_ref for text in alice_credentials
    } == {alice_ref}

    # The request has no way to name another card.
    sneaky = await get_credentials(client, alice.access_token, ecard_id=bob.ecard_id)
    assert "unknown field `ecard_id`" in problem(sneaky, 400)["errors"][0]["message"]

    # Alice's token renders Alice's credential but not Bob's.
    [bob_credential] = await factories.credentials(client, bob)
    own = await client.post("/v1/holder/credentials/qr", json={"credential": alice_credentials[0]}, auth=alice.auth)
    assert own.status_code == 200, own.text
    foreign = await client.post("/v1/holder/credentials/qr", json={"credential": bob_credential}, auth=alice.auth)
    assert problem(foreign, 403)["code"] == "forbidden"


# --- card state ------------------------------------------------------------------------------


async def test_suspended_card_gets_no_credentials_until_resumed(
    client: httpx.AsyncClient, admin_token: str, holder: Holder
) -> None:
    assert (await get_credentials(client, holder.access_token)).status_code == 200

    await set_ecard_state(client, admin_token, holder.card_id, "suspended")
    body = problem(await get_credentials(client, holder.access_token), 409)
    assert body["code"] == "conflict"

    await set_ecard_state(client, admin_token, holder.card_id, "active")
    response = await get_credentials(client, holder.access_token)
    assert response.status_code == 200, response.text
    assert len(response.json()["credentials"]) == 1


async def test_revoked_card_gets_no_credentials(client: httpx.AsyncClient, admin_token: str, holder: Holder) -> None:
    await set_ecard_state(client, admin_token, holder.card_id, "revoked")
    assert problem(await get_credentials(client, holder.access_token), 409)["code"] == "conflict"
