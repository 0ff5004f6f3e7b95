"""Test data made through the public API, unique per call so tests never collide."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import sys
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import nacl.bindings

from app.domain.cards.citizen_id import check_character
from app.security.tokens import HolderSession
from app.settings import PROJECT_ROOT
from crypto.dpop import make_proof
from crypto.keys import b64url, b64url_decode

REGIONS = {"510000": "四川省", "500000": "重庆市", "440000": "广东省"}


PROBLEM_JSON = "application/problem+json"


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The RFC 9457 body of an error response, after checking its status, media type and fields."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers["content-type"]
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert body["type"].endswith("/" + body["code"])
    # The answer names its request, as its header does; taken out so two answers compare equal.
    if "request_id" in body:
        assert body.pop("request_id") == response.headers["x-request-id"]
    return body


_REQUEST_ID_FIELD = re.compile(rb',"request_id":"[^"]*"')


def without_request_id(response: httpx.Response) -> bytes:
    """The body as sent, less its `request_id` (each answer names its own request): for byte-equal comparisons."""
    return _REQUEST_ID_FIELD.sub(b"", response.content)


def headers_without_request_id(response: httpx.Response) -> dict[str, str]:
    """The answer's headers, less `X-Request-Id`."""
    return {name: value for name, value in response.headers.items() if name != "x-request-id"}


def bearer(token: str) -> dict[str, str]:
    """An Authorization header (operators' tokens; holders' are DPoP-bound: `dpop`, `Holder.auth`)."""
    return {"Authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class DeviceKey:
    """A phone's Ed25519 device key (libsodium's 64-byte secret: seed ‖ public), as the holder app keeps it."""

    secret: bytes = field(default_factory=lambda: nacl.bindings.crypto_sign_keypair()[1])

    @property
    def public_key(self) -> str:
        """The public key as activation takes it (unpadded base64url)."""
        return b64url(self.secret[32:])

    def proof(self, method: str, url: str, access_token: str | None = None, **claims: Any) -> str:
        """A fresh DPoP proof for one request (`jti`, `iat` may be given)."""
        jti = claims.pop("jti", None) or secrets.token_urlsafe(16)
        return make_proof(self.secret, method, url, jti=jti, access_token=access_token, **claims)

    def auth(self, token: str | None = None) -> DpopAuth:
        """Signs each request: the proof alone (activation, refresh), or with `token` as `Authorization: DPoP`."""
        return DpopAuth(self, token)


# The tests' phones: which device key each holder token was given to (by an activation or a refresh made
# through `DpopAuth`), so a test holding only a token can still sign for it (`dpop`).
_DEVICES: dict[str, DeviceKey] = {}


class DpopAuth(httpx.Auth):
    """httpx auth of a holder's device: a new DPoP proof per request (and per retry or redirect), and
    `Authorization: DPoP <access token>` when it has one. Tokens answered to it are remembered as its own."""

    requires_response_body = True

    def __init__(self, device: DeviceKey, token: str | None = None) -> None:
        self.device = device
        # A refresh token (activation and refresh send no access token) travels in the body, not here.
        self.access_token = token if token is not None and not token.startswith("rt_") else None

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Sign the request; remember tokens in the answer (activation, refresh) as this device's."""
        request.headers["DPoP"] = self.device.proof(request.method, str(request.url), self.access_token)
        if self.access_token is not None:
            request.headers["Authorization"] = f"DPoP {self.access_token}"
        response = yield request
        if response.headers.get("content-type", "").startswith("application/json"):
            try:
                body = json.loads(response.content)
            except ValueError:
                return
            if isinstance(body, dict) and body.get("token_type") == "DPoP":
                for name in ("access_token", "refresh_token"):
                    if isinstance(body.get(name), str):
                        _DEVICES[body[name]] = self.device


def dpop(token: str, device: DeviceKey | None = None) -> DpopAuth:
    """The DPoP auth of `token` (access or refresh): signed by `device`, or by the device the token was issued
    to in these tests' own activations and refreshes."""
    device = device or _DEVICES.get(token)
    assert device is not None, "not a holder token these tests were given (operator tokens go in bearer())"
    return device.auth(token)


def key_of(token: str) -> DeviceKey:
    """The device key a holder token (access or refresh) was issued to."""
    return dpop(token).device


def holder_session_of(access_token: str) -> HolderSession:
    """The session an access token speaks for, read without checking it (the test minted it)."""
    claims = jwt.decode(access_token, options={"verify_signature": False})
    return HolderSession(
        ecard_id=uuid.UUID(claims["sub"]),
        device_id=uuid.UUID(claims["dev"]),
        card_ref=b64url_decode(claims["crf"]),
        region=claims["reg"],
        jkt=claims["cnf"]["jkt"],
    )


def citizen_id(region: str = "510000") -> str:
    """A random, valid citizen identity number."""
    first17 = f"{region[:6]}{1950 + secrets.randbelow(60)}{1 + secrets.randbelow(12):02d}"
    first17 += f"{1 + secrets.randbelow(28):02d}{secrets.randbelow(1000):03d}"
    return first17 + check_character(first17)


def card_number() -> str:
    """A random card number."""
    return "T" + "".join(secrets.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))


def device_key() -> str:
    """A device public key as the API takes it, of a key nobody holds (activation with it cannot prove it)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


@dataclass
class Holder:
    """An activated card and its holder's session."""

    card_id: str
    ecard_id: str
    card_number: str
    access_token: str
    refresh_token: str
    # The device key its tokens are bound to; None: the key they were given to (`key_of`).
    device: DeviceKey | None = None

    @property
    def key(self) -> DeviceKey:
        """The device key its tokens are bound to."""
        return self.device or key_of(self.access_token)

    @property
    def auth(self) -> DpopAuth:
        """Its device's DPoP auth with its access token: pass as `auth=holder.auth`."""
        return self.key.auth(self.access_token)

    @property
    def refresh_auth(self) -> DpopAuth:
        """Its device's DPoP auth for `POST /v1/holder/token` (the proof alone)."""
        return self.key.auth()


@dataclass
class Gate:
    """A terminal and its API key."""

    terminal_id: str
    organisation_id: str
    api_key: str

    @property
    def headers(self) -> dict[str, str]:
        """Its authentication header."""
        return {"X-Api-Key": self.api_key}


async def issue_card(client: httpx.AsyncClient, token: str, region: str = "510000") -> dict[str, Any]:
    """Issue a card through the operator API; the response body."""
    response = await client.post(
        "/v1/operator/cards",
        json={"region": region, "citizen_id": citizen_id(region), "name": "张三", "card_number": card_number()},
        headers=bearer(token),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def activate(
    client: httpx.AsyncClient, number: str, code: str, device: DeviceKey | None = None
) -> dict[str, Any]:
    """Activate a card through the holder API with a new device key (or `device`); the response body.

    Its tokens are then the device's (`dpop(body["access_token"])`, `device_of(...)`).
    """
    device = device or DeviceKey()
    response = await client.post(
        "/v1/holder/activation",
        json={"card_number": number, "activation_code": code, "device_public_key": device.public_key},
        auth=device.auth(),
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def activated_holder(client: httpx.AsyncClient, token: str, region: str) -> Holder:
    """A card issued and activated."""
    issued = await issue_card(client, token, region)
    device = DeviceKey()
    session = await activate(client, issued["card"]["card_number"], issued["activation_code"], device)
    return Holder(
        card_id=issued["card"]["card_id"],
        ecard_id=issued["card"]["ecard_id"],
        card_number=issued["card"]["card_number"],
        access_token=session["access_token"],
        refresh_token=session["refresh_token"],
        device=device,
    )


async def new_gate(client: httpx.AsyncClient, token: str, region: str, business_type: str, purposes: list[str]) -> Gate:
    """A verifier organisation with one terminal."""
    response = await client.post(
        "/v1/operator/verifier-organisations",
        json={"name": f"org-{secrets.token_hex(3)}", "business_type": business_type, "region": region},
        headers=bearer(token),
    )
    assert response.status_code == 201, response.text
    return await new_terminal(client, token, response.json()["id"], purposes)


async def new_terminal(
    client: httpx.AsyncClient, token: str, organisation_id: str, purposes: list[str], **settings: object
) -> Gate:
    """Another terminal of an organisation (settings: rate_per_minute, rate_burst)."""
    response = await client.post(
        f"/v1/operator/verifier-organisations/{organisation_id}/terminals",
        json={"name": f"gate-{secrets.token_hex(3)}", "allowed_purposes": purposes, **settings},
        headers=bearer(token),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Gate(terminal_id=body["terminal"]["id"], organisation_id=organisation_id, api_key=body["api_key"])


HOLDER_PIN = "402917"


async def step_up(client: httpx.AsyncClient, holder: Holder) -> str:
    """Set the holder's PIN if none is set yet, enter it, and return the step-up token."""
    card = await client.get("/v1/holder/card", auth=holder.auth)
    assert card.status_code == 200, card.text
    if not card.json()["pin_set"]:
        response = await client.put("/v1/holder/pin", json={"pin": HOLDER_PIN}, auth=holder.auth)
        assert response.status_code == 204, response.text
    response = await client.post("/v1/holder/pin/verification", json={"pin": HOLDER_PIN}, auth=holder.auth)
    assert response.status_code == 200, response.text
    token: str = response.json()["step_up_token"]
    return token


async def credentials(client: httpx.AsyncClient, holder: Holder, purpose: str = "transit", count: int = 1) -> list[str]:
    """Credential texts issued to the holder (medical ones after a PIN step-up)."""
    body: dict[str, Any] = {"purpose": purpose, "count": count}
    if purpose == "medical":
        body["step_up_token"] = await step_up(client, holder)
    response = await client.post("/v1/holder/credentials", json=body, auth=holder.auth)
    assert response.status_code == 200, response.text
    return [item["credential"] for item in response.json()["credentials"]]


async def verify(client: httpx.AsyncClient, gate: Gate, credential: str) -> dict[str, Any]:
    """A verification's response body (asserting HTTP 200)."""
    response = await client.post("/v1/verify", json={"credential": credential}, headers=gate.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def set_ecard_state(client: httpx.AsyncClient, token: str, holder: Holder, state: str) -> None:
    """An operator changes the eCard's state (asserting it worked)."""
    response = await client.post(
        f"/v1/operator/cards/{holder.card_id}/ecard-state",
        json={"state": state, "reason": "test"},
        headers=bearer(token),
    )
    assert response.status_code == 200, response.text


async def cli_admin(env: dict[str, str], client: httpx.AsyncClient) -> str:
    """An admin made with the CLI (as a deployment's first admin is), signed in over HTTP; its token.

    Region 510000 is registered with it. For tests of a running service (env: its environment).
    """
    username, password = f"admin-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    cli = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "litestar"), "--app", "app.asgi:create_app", "ecard", "operator", "create",
        "--username", username, "--role", "admin", "--region", "*", "--password", password,
        cwd=PROJECT_ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await cli.communicate()
    assert cli.returncode == 0, output.decode()
    response = await client.post("/v1/operator/session", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    response = await client.post(
        "/v1/operator/regions", json={"code": "510000", "name": REGIONS["510000"]}, headers=bearer(token)
    )
    assert response.status_code == 201, response.text
    return token
