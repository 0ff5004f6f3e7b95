"""Holder tokens bound to the device key (DPoP, RFC 9449): what a copied token, a replayed or misdirected
proof, a Bearer token and a refresh by another key get, on the routed handlers and on the fast path.

The credential route is tried both ways: a plain request (`Content-Length`, JSON) is answered in front of
the router (app/http/hot_paths.py), a chunked one by the routed handler; both must refuse alike.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select

from app.db.models import RefreshToken
from app.http.auth import request_uri
from app.server.context import ServiceContext
from app.settings import Settings
from crypto.dpop import thumbprint
from crypto.keys import b64url, b64url_decode
from tests import factories
from tests.factories import DeviceKey, Holder, problem

BASE = "http://testserver"
CREDENTIALS = "/v1/holder/credentials"
DPOP_PROOF_CHALLENGE = 'DPoP algs="EdDSA", error="invalid_dpop_proof"'
DPOP_TOKEN_CHALLENGE = 'DPoP algs="EdDSA", error="invalid_token"'


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data[:10]
    yield data[10:]


async def issue(client: httpx.AsyncClient, headers: dict[str, Any], *, routed: bool) -> httpx.Response:
    """POST /v1/holder/credentials with these headers: plain (the fast path) or chunked (the routed handler)."""
    body = json.dumps({"purpose": "transit"}).encode()
    if routed:
        response = await client.post(
            CREDENTIALS, content=_chunks(body), headers={**headers, "content-type": "application/json"}
        )
        assert "content-length" not in response.request.headers
    else:
        response = await client.post(CREDENTIALS, content=body, headers={**headers, "content-type": "application/json"})
        assert "content-length" in response.request.headers
    return response


def signed(holder: Holder, method: str = "POST", path: str = CREDENTIALS, **claims: Any) -> dict[str, str]:
    """The holder's DPoP headers for one request, its proof's claims overridable (`key`, `token`, `url`, `iat`…)."""
    key: DeviceKey = claims.pop("key", holder.key)
    token: str = claims.pop("token", holder.access_token)
    url: str = claims.pop("url", BASE + path)
    ath_token: str | None = claims.pop("ath_token", token)
    return {"Authorization": f"DPoP {token}", "DPoP": key.proof(method, url, ath_token, **claims)}


def refused_proof(response: httpx.Response, reason: str) -> None:
    """A 401 for the proof, with its stable code, reason and the DPoP challenge."""
    body = problem(response, 401)
    assert (body["code"], body.get("reason")) == ("invalid_dpop_proof", reason), body
    assert response.headers["www-authenticate"] == DPOP_PROOF_CHALLENGE


async def card_ok(client: httpx.AsyncClient, holder: Holder) -> None:
    response = await client.get("/v1/holder/card", auth=holder.auth)
    assert response.status_code == 200, response.text


ROUTES = [pytest.param(False, id="fast-path"), pytest.param(True, id="routed")]


# --- activation binds the tokens to the key ----------------------------------------------------------------


async def test_activation_binds_the_tokens_to_the_proven_key(client: httpx.AsyncClient, admin_token: str) -> None:
    issued = await factories.issue_card(client, admin_token)
    number, code = issued["card"]["card_number"], issued["activation_code"]
    device, other = DeviceKey(), DeviceKey()
    body = {"card_number": number, "activation_code": code, "device_public_key": device.public_key}

    # No proof, and a proof by another key than the one registered: refused before the code is looked at.
    missing = await client.post("/v1/holder/activation", json=body)
    assert (problem(missing, 401)["code"], missing.headers["www-authenticate"]) == (
        "invalid_dpop_proof",
        DPOP_PROOF_CHALLENGE,
    )
    refused_proof(await client.post("/v1/holder/activation", json=body, auth=other.auth()), "wrong_key")
    stale = device.proof("POST", BASE + "/v1/holder/activation", iat=int(time.time()) - 120)
    refused_proof(await client.post("/v1/holder/activation", json=body, headers={"DPoP": stale}), "stale")

    # The code is not spent by them: the device that holds the key activates with it.
    answer = await client.post("/v1/holder/activation", json=body, auth=device.auth())
    assert answer.status_code == 201, answer.text
    session = answer.json()
    assert session["token_type"] == "DPoP"
    claims = jwt.decode(session["access_token"], options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": thumbprint(b64url_decode(device.public_key))}


# --- every holder call --------------------------------------------------------------------------------------


@pytest.mark.parametrize("routed", ROUTES)
async def test_a_copied_access_token_is_useless_with_another_key(
    client: httpx.AsyncClient, admin_token: str, holder: Holder, routed: bool
) -> None:
    assert (await issue(client, signed(holder), routed=routed)).status_code == 200  # control
    thief = DeviceKey()
    refused_proof(await issue(client, signed(holder, key=thief), routed=routed), "wrong_key")
    card = await client.get("/v1/holder/card", headers=signed(holder, "GET", "/v1/holder/card", key=thief))
    refused_proof(card, "wrong_key")
    # Another holder's (valid, own) proof with the copied token: the token names the key, not the proof.
    other = await factories.activated_holder(client, admin_token, "510000")
    refused_proof(await issue(client, signed(holder, key=other.key), routed=routed), "wrong_key")
    await card_ok(client, holder)


@pytest.mark.parametrize("routed", ROUTES)
async def test_a_replayed_proof_is_refused(client: httpx.AsyncClient, holder: Holder, routed: bool) -> None:
    headers = signed(holder)
    assert (await issue(client, headers, routed=routed)).status_code == 200
    refused_proof(await issue(client, headers, routed=routed), "replayed")
    # Replayed the other way (a proof the fast path took, sent chunked; and the reverse).
    refused_proof(await issue(client, headers, routed=not routed), "replayed")
    card = signed(holder, "GET", "/v1/holder/card")
    assert (await client.get("/v1/holder/card", headers=card)).status_code == 200
    refused_proof(await client.get("/v1/holder/card", headers=card), "replayed")


@pytest.mark.parametrize("routed", ROUTES)
async def test_a_proof_for_another_request_is_refused(client: httpx.AsyncClient, holder: Holder, routed: bool) -> None:
    refused_proof(await issue(client, signed(holder, "GET"), routed=routed), "wrong_method")
    refused_proof(await issue(client, signed(holder, url=BASE + "/v1/holder/card"), routed=routed), "wrong_uri")
    elsewhere = signed(holder, url="https://ecard.elsewhere.example" + CREDENTIALS)
    refused_proof(await issue(client, elsewhere, routed=routed), "wrong_uri")
    stale = signed(holder, iat=int(time.time()) - 120)
    refused_proof(await issue(client, stale, routed=routed), "stale")
    # A proof made for another access token (ath), or none at all (no ath).
    other_token = signed(holder, ath_token=holder.access_token + "x")
    refused_proof(await issue(client, other_token, routed=routed), "wrong_token")
    refused_proof(await issue(client, signed(holder, ath_token=None), routed=routed), "wrong_token")
    no_proof = {"Authorization": f"DPoP {holder.access_token}"}
    refused_proof(await issue(client, no_proof, routed=routed), "missing")
    # The query is no part of the proof's URI.
    listed = await client.get(
        "/v1/holder/usage", params={"limit": 5}, headers=signed(holder, "GET", "/v1/holder/usage")
    )
    assert listed.status_code == 200, listed.text


@pytest.mark.parametrize("routed", ROUTES)
async def test_a_bearer_holder_token_is_refused(client: httpx.AsyncClient, holder: Holder, routed: bool) -> None:
    for headers in (
        {"Authorization": f"Bearer {holder.access_token}"},
        {"Authorization": f"Bearer {holder.access_token}", "DPoP": holder.key.proof("POST", BASE + CREDENTIALS)},
    ):
        response = await issue(client, headers, routed=routed)
        assert problem(response, 401)["code"] == "dpop_required"
        assert response.headers["www-authenticate"] == DPOP_TOKEN_CHALLENGE
    bearer_card = await client.get("/v1/holder/card", headers=factories.bearer(holder.access_token))
    assert problem(bearer_card, 401)["code"] == "dpop_required"
    await card_ok(client, holder)


async def test_every_holder_route_needs_the_proof(client: httpx.AsyncClient, holder: Holder) -> None:
    [credential] = await factories.credentials(client, holder)
    device = str(uuid.uuid4())
    calls: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", "/v1/holder/card", None),
        ("POST", "/v1/holder/card/loss", {"reason": "x"}),
        ("POST", "/v1/holder/card/loss/undo", {}),
        ("GET", "/v1/holder/usage", None),
        ("GET", "/v1/holder/devices", None),
        ("PATCH", f"/v1/holder/devices/{device}", {"name": "x"}),
        ("DELETE", f"/v1/holder/devices/{device}", None),
        ("PUT", "/v1/holder/pin", {"pin": "402917"}),
        ("POST", "/v1/holder/pin/verification", {"pin": "402917"}),
        ("POST", "/v1/holder/credentials", {"purpose": "transit"}),
        ("POST", "/v1/holder/credentials/qr", {"credential": credential}),
        ("GET", "/v1/holder/services", None),
        ("GET", "/v1/holder/transactions", None),
        ("GET", "/v1/holder/loans", None),
    ]
    thief = DeviceKey()
    for method, path, body in calls:
        for headers, reason in (
            ({"Authorization": f"DPoP {holder.access_token}"}, "missing"),
            (signed(holder, method, path, key=thief), "wrong_key"),
        ):
            response = await client.request(method, path, json=body, headers=headers)
            refused_proof(response, reason)
    card = await client.get("/v1/holder/card", auth=holder.auth)
    assert card.json()["card_state"] == "active"


# --- refresh stays on the device ----------------------------------------------------------------------------


async def test_a_refresh_by_another_key_is_refused_and_rotates_nothing(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder
) -> None:
    thief = DeviceKey()
    stolen = {"refresh_token": holder.refresh_token}
    refused_proof(await client.post("/v1/holder/token", json=stolen, auth=thief.auth()), "wrong_key")
    refused_proof(await client.post("/v1/holder/token", json=stolen), "missing")
    async with context.sessions() as session:
        device = uuid.UUID(holder_device(holder))
        mine = (await session.scalars(select(RefreshToken).where(RefreshToken.device_id == device))).all()
    assert [(row.used_at, row.revoked_at) for row in mine] == [(None, None)], "the refused refresh changed a token"

    # The device itself refreshes with the same token, and the new pair is bound to the same key.
    answer = await client.post("/v1/holder/token", json=stolen, auth=holder.refresh_auth)
    assert answer.status_code == 200, answer.text
    rotated = answer.json()
    assert rotated["token_type"] == "DPoP"
    claims = jwt.decode(rotated["access_token"], options={"verify_signature": False})
    assert claims["cnf"]["jkt"] == thumbprint(b64url_decode(holder.key.public_key))
    renewed = Holder(holder.card_id, holder.ecard_id, holder.card_number, rotated["access_token"], "", holder.key)
    await card_ok(client, renewed)
    thief_card = await client.get("/v1/holder/card", auth=thief.auth(rotated["access_token"]))
    refused_proof(thief_card, "wrong_key")
    # The rotated refresh token is no more use to the thief than the first.
    refused_proof(
        await client.post("/v1/holder/token", json={"refresh_token": rotated["refresh_token"]}, auth=thief.auth()),
        "wrong_key",
    )
    again = await client.post(
        "/v1/holder/token", json={"refresh_token": rotated["refresh_token"]}, auth=holder.refresh_auth
    )
    assert again.status_code == 200, again.text


def holder_device(holder: Holder) -> str:
    device: str = jwt.decode(holder.access_token, options={"verify_signature": False})["dev"]
    return device


# --- hostile headers ----------------------------------------------------------------------------------------


HOSTILE_PROOFS = [
    pytest.param("", id="empty"),
    pytest.param("x" * 100_000, id="huge"),
    pytest.param("a.b.c" * 3000, id="huge-dotted"),
    pytest.param("...", id="dots"),
    pytest.param("a.b.c", id="not-base64"),
    pytest.param("W10.W10.W10", id="json-arrays"),
    pytest.param("eyJhbGciOiJub25lIn0.eyJqdGkiOiJ4In0.", id="alg-none"),
    pytest.param(b"\xff\xfe.\xfd.\xfc", id="latin-1"),
]


@pytest.mark.parametrize("proof", HOSTILE_PROOFS)
@pytest.mark.parametrize("routed", ROUTES)
async def test_hostile_proofs_are_4xx_problems(
    client: httpx.AsyncClient, holder: Holder, proof: str | bytes, routed: bool
) -> None:
    headers: dict[str, Any] = {"Authorization": f"DPoP {holder.access_token}", "DPoP": proof}
    for response in (
        await issue(client, headers, routed=routed),
        await client.post("/v1/holder/token", json={"refresh_token": holder.refresh_token}, headers={"DPoP": proof}),
    ):
        body = problem(response, 401)
        assert body["code"] == "invalid_dpop_proof" and body["reason"] in ("malformed", "missing", "wrong_type")


async def test_odd_proof_headers_are_4xx_problems(client: httpx.AsyncClient, holder: Holder) -> None:
    url = BASE + CREDENTIALS
    header = {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": holder.key.public_key}}
    private = {**header, "jwk": {**header["jwk"], "d": holder.key.public_key}}
    good = holder.key.proof("POST", url, holder.access_token)
    _, claims_part, signature_part = good.split(".")
    for odd, reason in (
        ({**header, "alg": "none"}, "wrong_algorithm"),
        ({**header, "typ": "JWT"}, "wrong_type"),
        (private, "bad_key"),
        ({**header, "jwk": {**header["jwk"], "x": "AAAA"}}, "bad_key"),
        ({**header, "kid": "x"}, "bad_key"),
    ):
        head = b64url(json.dumps(odd).encode())
        proof = f"{head}.{claims_part}.{signature_part}"
        for routed in (False, True):
            refused_proof(await issue(client, signed_with(holder, proof), routed=routed), reason)
    # Two DPoP headers: refused by the routed handler (the fast path hands such a request on).
    two = [
        ("authorization", f"DPoP {holder.access_token}"),
        ("dpop", holder.key.proof("POST", url, holder.access_token)),
        ("dpop", holder.key.proof("POST", url, holder.access_token)),
        ("content-type", "application/json"),
    ]
    response = await client.post(CREDENTIALS, content=b'{"purpose":"transit"}', headers=two)
    refused_proof(response, "malformed")
    # A tampered signature.
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    refused_proof(await issue(client, signed_with(holder, tampered), routed=False), "bad_signature")


def signed_with(holder: Holder, proof: str) -> dict[str, str]:
    return {"Authorization": f"DPoP {holder.access_token}", "DPoP": proof}


# --- behind a TLS-terminating proxy -------------------------------------------------------------------------


async def test_the_public_url_names_the_uri_behind_a_proxy(
    client: httpx.AsyncClient, context: ServiceContext, holder: Holder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(context.callers, "public_url", "https://ecard.example/api")
    public = "https://ecard.example/api" + CREDENTIALS
    for routed in (False, True):
        assert (await issue(client, signed(holder, url=public), routed=routed)).status_code == 200
        refused_proof(await issue(client, signed(holder), routed=routed), "wrong_uri")


def test_the_public_url_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ECARD_PUBLIC_URL", raising=False)
    assert Settings.from_env().public_url == ""
    monkeypatch.setenv("ECARD_PUBLIC_URL", "https://ecard.example/api/")
    assert Settings.from_env().public_url == "https://ecard.example/api"
    for wrong in ("ecard.example", "ftp://ecard.example", "https://", "https://ecard.example/?x=1"):
        monkeypatch.setenv("ECARD_PUBLIC_URL", wrong)
        with pytest.raises(ValueError, match="ECARD_PUBLIC_URL"):
            Settings.from_env()


def test_the_uri_a_proof_names() -> None:
    assert request_uri("", "http", "127.0.0.1:8000", "/v1/holder/card?x=1") == "http://127.0.0.1:8000/v1/holder/card"
    assert request_uri("https://ecard.example/api", "http", "10.0.0.5:8000", "/v1/holder/card") == (
        "https://ecard.example/api/v1/holder/card"
    )
    # No Host at all: a URI no proof can name (refused as wrong_uri, never a 500).
    assert request_uri("", "http", None, "/v1/holder/card") == "http:///v1/holder/card"


async def test_a_removed_devices_token_gets_the_dpop_challenge(client: httpx.AsyncClient, holder: Holder) -> None:
    device = holder_device(holder)
    assert (await client.delete(f"/v1/holder/devices/{device}", auth=holder.auth)).status_code == 204
    for routed in (False, True):
        response = await issue(client, signed(holder), routed=routed)
        assert problem(response, 401)["code"] == "unauthorized" and "removed" in response.json()["detail"]
        assert response.headers["www-authenticate"] == DPOP_TOKEN_CHALLENGE
