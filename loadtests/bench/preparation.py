"""Test data through the public API only: a region, transit gates, activated cards, fresh credentials.

Also the sanity check every run starts with (a fresh credential is accepted at one gate, then
`replayed` at another) and the classification of verify answers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import nacl.bindings

from crypto.dpop import make_proof
from crypto.keys import b64url
from loadtests.bench import HOST, BenchError
from loadtests.bench.client import Measurement, Supply, drive_raw, encode_post

if TYPE_CHECKING:
    from loadtests.bench.processes import ServerProcess

REGION = "510000"
REGION_NAME = "四川省"
PURPOSE = "transit"
VERIFY_PATH = "/v1/verify"
# Terminals the load is spread over (each allows 1,000 verifications/s: far above one real gate).
GATES = 16
# A credential is not sent in the last second of its life (its expiry, without the skew allowance).
EXPIRY_MARGIN = 1.0
# Holder access tokens live 15 min; refresh them when older than this.
TOKEN_REFRESH_AGE = 600.0

_CITIZEN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CARD_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"


def citizen_id(region: str) -> str:
    """A random citizen identity number with a valid GB 11643 check character."""
    first17 = f"{region}{1950 + secrets.randbelow(60)}{1 + secrets.randbelow(12):02d}"
    first17 += f"{1 + secrets.randbelow(28):02d}{secrets.randbelow(1000):03d}"
    total = sum(int(digit) * weight for digit, weight in zip(first17, _CITIZEN_ID_WEIGHTS, strict=True))
    return first17 + "10X98765432"[total % 11]


def new_device_key() -> bytes:
    """A phone's Ed25519 device key: libsodium's 64-byte secret (seed ‖ public)."""
    return nacl.bindings.crypto_sign_keypair()[1]


def dpop_proof(device: bytes, method: str, url: str, access_token: str | None = None) -> str:
    """A new DPoP proof by the device key for one request (RFC 9449; ~60 µs of client CPU)."""
    return make_proof(device, method, url, jti=secrets.token_urlsafe(12), access_token=access_token)


async def activate_device(client: httpx.AsyncClient, card_number: str, code: str, device: bytes, **extra: str) -> Any:
    """POST /v1/holder/activation registering the device key, with its proof; the session answer."""
    path = "/v1/holder/activation"
    body = {"card_number": card_number, "activation_code": code, "device_public_key": b64url(device[32:]), **extra}
    proof = dpop_proof(device, "POST", str(client.base_url).rstrip("/") + path)
    return expect(await client.post(path, json=body, headers={"DPoP": proof}), 201)


@dataclass
class Holder:
    """An activated card's session and the device key its tokens are bound to."""

    card_number: str
    access_token: str
    refresh_token: str
    device: bytes
    since: float = field(default_factory=time.monotonic)

    def headers(self, client: httpx.AsyncClient, method: str, path: str) -> dict[str, str]:
        """`Authorization: DPoP` and a new proof for one request of `client` to `path`."""
        url = str(client.base_url).rstrip("/") + path
        return {
            "Authorization": f"DPoP {self.access_token}",
            "DPoP": dpop_proof(self.device, method, url, self.access_token),
        }


def expect(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    """The JSON body of an answer with one of these statuses; BenchError (with the body) otherwise."""
    if response.status_code not in statuses:
        raise BenchError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    body: dict[str, Any] = response.json() if response.content else {}
    return body


async def prepare_ecard(
    client: httpx.AsyncClient,
    username: str,
    password: str,
    holders: int,
    *,
    region: str = REGION,
    region_name: str = REGION_NAME,
    key_algorithm: str | None = None,
) -> tuple[list[str], list[Holder]]:
    """Region, a transit organisation and its gates, and activated cards; (gate API keys, holders).

    key_algorithm ("Ed25519" or "SM2") names the region's first signing key; None leaves it to the
    service's ECARD_CRYPTO_PROFILE.
    """
    signed_in = expect(
        await client.post("/v1/operator/session", json={"username": username, "password": password}), 200
    )
    auth = {"Authorization": f"Bearer {signed_in['access_token']}"}
    region_body: dict[str, str] = {"code": region, "name": region_name}
    if key_algorithm is not None:
        region_body["key_algorithm"] = key_algorithm
    expect(await client.post("/v1/operator/regions", json=region_body, headers=auth), 201, 409)
    organisation = expect(
        await client.post(
            "/v1/operator/verifier-organisations",
            json={"name": f"Bench Metro {region}", "business_type": "transit", "region": region},
            headers=auth,
        ),
        201,
    )
    # Like a metro line: many gates, each well within its own rate limit at the bench's load.
    api_keys = []
    for number in range(GATES):
        terminal = expect(
            await client.post(
                f"/v1/operator/verifier-organisations/{organisation['id']}/terminals",
                json={
                    "name": f"bench-gate-{number}-{secrets.token_hex(3)}",
                    "allowed_purposes": [PURPOSE],
                    "rate_per_minute": 60_000,
                    "rate_burst": 1_000,
                },
                headers=auth,
            ),
            201,
        )
        api_keys.append(str(terminal["api_key"]))
    result: list[Holder] = []
    for _ in range(holders):
        card_number = "B" + "".join(secrets.choice(_CARD_ALPHABET) for _ in range(8))
        issued = expect(
            await client.post(
                "/v1/operator/cards",
                json={"region": region, "citizen_id": citizen_id(region), "name": "张三", "card_number": card_number},
                headers=auth,
            ),
            201,
        )
        device = new_device_key()
        session = await activate_device(client, issued["card"]["card_number"], issued["activation_code"], device)
        result.append(Holder(issued["card"]["card_number"], session["access_token"], session["refresh_token"], device))
    return api_keys, result


async def refresh_holders(client: httpx.AsyncClient, holders: list[Holder]) -> None:
    """Rotate the sessions of holders whose access token is getting old."""
    for holder in holders:
        if time.monotonic() - holder.since < TOKEN_REFRESH_AGE:
            continue
        path = "/v1/holder/token"
        proof = dpop_proof(holder.device, "POST", str(client.base_url).rstrip("/") + path)
        body = expect(
            await client.post(path, json={"refresh_token": holder.refresh_token}, headers={"DPoP": proof}), 200
        )
        holder.access_token, holder.refresh_token = body["access_token"], body["refresh_token"]
        holder.since = time.monotonic()


class _IssuedItem(msgspec.Struct):
    credential: str
    expires_at: datetime


class _Bundle(msgspec.Struct):
    credentials: list[_IssuedItem]


class _VerifyAnswer(msgspec.Struct):
    result: str
    reason: str | None = None


_bundle_decoder = msgspec.json.Decoder(_Bundle)
_verify_decoder = msgspec.json.Decoder(_VerifyAnswer)


@dataclass
class Issued:
    """A supply of fresh credentials, earliest expiry first."""

    bodies: list[bytes]
    valid_until: list[float]
    measurement: Measurement
    sample: str


async def issue_credentials(
    ecard: ServerProcess, holders: list[Holder], count: int, connections: int, budget: float
) -> Issued:
    """Up to `count` single credentials (POST /v1/holder/credentials, count=1) spread over the holders.

    Bundle item i becomes valid 30·i s after issue, so only item 0 is usable at once: one request
    per credential keeps every one of them valid from now until its `expires_at`. Issuing stops
    after `budget` seconds, so the first credentials still have the life the run needs.
    """
    supply = Supply(_issue_requests(ecard, holders, 1, count))
    measured = await drive_raw(ecard.port, supply, connections, budget, True, ecard.cpu_seconds)
    _check_issuance(measured, "credential issuance")
    items: list[tuple[float, str]] = []
    for _status, raw in measured.answers:
        for item in _bundle_decoder.decode(raw).credentials:
            items.append((item.expires_at.timestamp() - EXPIRY_MARGIN, item.credential))
    if not items:
        raise BenchError(f"no credential was issued within {budget:.0f} s")
    items.sort()
    return Issued(
        bodies=[msgspec.json.encode({"credential": text}) for _, text in items],
        valid_until=[until for until, _ in items],
        measurement=measured,
        sample=items[0][1],
    )


async def issue_bundles(
    ecard: ServerProcess, holders: list[Holder], size: int, requests: int, connections: int, seconds: float
) -> Measurement:
    """Up to `requests` bundles of `size` credentials for at most `seconds`: what a bundle costs the server.

    Every answer must hold `size` credentials; they are dropped (never verified), so the supplies
    of the verify runs are untouched.
    """
    supply = Supply(_issue_requests(ecard, holders, size, requests))
    measured = await drive_raw(ecard.port, supply, connections, seconds, True, ecard.cpu_seconds)
    _check_issuance(measured, f"issuing {size}-credential bundles")
    short = sum(1 for _status, raw in measured.answers if len(_bundle_decoder.decode(raw).credentials) != size)
    if short:
        raise BenchError(f"{short:,} of {measured.requests:,} bundle answers did not hold {size} credentials")
    if not measured.requests:
        raise BenchError(f"no {size}-credential bundle was issued within {seconds:g} s")
    measured.answers.clear()
    return measured


def _issue_requests(ecard: ServerProcess, holders: list[Holder], size: int, requests: int) -> list[bytes]:
    """`requests` encoded POST /v1/holder/credentials asking for `size` credentials each, the holders in turn.

    Each carries its own DPoP proof (a proof is good once, for 60 s): signed here, before the run, so
    the client's signing is not part of it; runs of issuing are shorter than a proof's freshness.
    """
    host = f"{HOST}:{ecard.port}"
    path = "/v1/holder/credentials"
    body = msgspec.json.encode({"purpose": PURPOSE, "count": size})
    requests_made = []
    for index in range(requests):
        holder = holders[index % len(holders)]
        proof = dpop_proof(holder.device, "POST", f"http://{host}{path}", holder.access_token)
        headers = [("Authorization", f"DPoP {holder.access_token}"), ("DPoP", proof)]
        requests_made.append(encode_post(host, path, headers, body))
    return requests_made


def _check_issuance(measured: Measurement, what: str) -> None:
    """Raise BenchError when an issuing run had any error (the first error body says why)."""
    if measured.errors:
        statuses = {status: n for status, n in measured.statuses.items() if status != 200}
        first = next((body for status, body in measured.answers if status != 200), b"")
        raise BenchError(
            f"{what} failed: HTTP {statuses}, {measured.transport_errors} transport errors, "
            f"{measured.timeouts} timeouts; first error body: {first[:300]!r}"
        )


def classify_verify(measured: Measurement) -> Counter[str]:
    """accepted / rejected:<reason> / http <status> for every verify answer kept."""
    outcomes: Counter[str] = Counter()
    for status, raw in measured.answers:
        if status != 200:
            outcomes[f"http {status}"] += 1
            continue
        try:
            answer = _verify_decoder.decode(raw)
        except msgspec.DecodeError:
            outcomes["undecodable"] += 1
            continue
        outcomes["accepted" if answer.result == "accepted" else f"rejected:{answer.reason}"] += 1
    return outcomes


async def sanity_check(client: httpx.AsyncClient, api_keys: list[str], holder: Holder, passes: int) -> str:
    """A fresh credential is accepted once at one gate, then `replayed` at another, `passes` times on new connections.

    New connections may land on other workers; a 401 means one has not reloaded its terminal
    cache yet, so wait a little (bounded) and try again. Returns a credential text (used up).
    """
    verify_headers = {"X-Api-Key": api_keys[0], "Connection": "close"}
    other_gate = {"X-Api-Key": api_keys[1], "Connection": "close"}
    passed, text = 0, ""
    for _ in range(passes + 40):
        path = "/v1/holder/credentials"
        issue_headers = holder.headers(client, "POST", path)
        issued = expect(await client.post(path, json={"purpose": PURPOSE, "count": 1}, headers=issue_headers), 200)
        text = str(issued["credentials"][0]["credential"])
        first = await client.post(VERIFY_PATH, json={"credential": text}, headers=verify_headers)
        if first.status_code == 401:
            await asyncio.sleep(0.25)
            continue
        second = await client.post(VERIFY_PATH, json={"credential": text}, headers=other_gate)
        if second.status_code == 401:
            await asyncio.sleep(0.25)
            continue
        answers = (expect(first, 200), expect(second, 200))
        outcome = [f"{answer.get('result')}:{answer.get('reason')}" for answer in answers]
        if outcome != ["accepted:None", "rejected:replayed"]:
            raise BenchError(f"sanity check failed: a fresh credential, verified twice, gave {outcome}")
        passed += 1
        if passed == passes:
            return text
    raise BenchError(f"sanity check: the gate stayed unknown (401) to a worker; {passed}/{passes} passes")
