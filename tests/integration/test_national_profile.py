"""The national profile's issuer keys: a region moves from Ed25519 to SM2 with codes of both in flight.

The same rotation drill as test_regions_and_keys.py, the next key named SM2: nothing valid is
refused while both kinds circulate, the JWKS, trust list and offline kit carry both, and a
deployment whose profile is national gives new regions SM2 keys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import cbor2
import httpx
import pytest
from litestar import Litestar

from app.asgi import create_app
from app.server.context import STATE_KEY, ServiceContext
from crypto.base45 import b45decode
from crypto.credential import PREFIX
from crypto.keys import ALG_EDDSA, ALG_SM2_SM3, b64url_decode
from crypto.offline import OfflineKit, verify_offline
from crypto.sm import DEFAULT_SIGNER_ID, sm2_public_from_jwk
from crypto.trust_list import signer_jwk, verify_trust_list
from tests import factories
from tests.conftest import make_settings, serve
from tests.factories import bearer, problem
from tests.unit.crypto.test_sm import gmssl_verify

REGION = "540000"
CODES = 10


def _header(credential: str) -> dict[int, object]:
    protected = cbor2.loads(b45decode(credential[len(PREFIX) :])).value[0]
    header: dict[int, object] = cbor2.loads(protected)
    return header


async def _keys(client: httpx.AsyncClient, token: str) -> dict[str, tuple[str, str]]:
    response = await client.get(f"/v1/operator/regions/{REGION}/keys", headers=bearer(token))
    assert response.status_code == 200, response.text
    return {key["kid"]: (key["algorithm"], key["state"]) for key in response.json()}


async def test_a_region_moves_from_ed25519_to_sm2_without_false_rejects(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    created = await client.post("/v1/operator/regions", json={"code": REGION, "name": "西藏自治区"},
                                headers=bearer(admin_token))  # fmt: skip
    assert created.status_code == 201, created.text
    [(old_kid, (algorithm, _))] = (await _keys(client, admin_token)).items()
    assert algorithm == "Ed25519"
    holder = await factories.activated_holder(client, admin_token, REGION)
    gate = await factories.new_gate(client, admin_token, REGION, "transit", ["transit"])
    ed25519_codes = [(await factories.credentials(client, holder))[0] for _ in range(CODES)]
    assert {_header(code)[1] for code in ed25519_codes} == {ALG_EDDSA}

    # An algorithm the profile does not know is a 400, and publishes nothing.
    bad = problem(await client.post(f"/v1/operator/regions/{REGION}/keys", json={"algorithm": "RSA"},
                                    headers=bearer(admin_token)), 400)  # fmt: skip
    assert "algorithm" in str(bad), bad
    assert len(await _keys(client, admin_token)) == 1

    published = await client.post(
        f"/v1/operator/regions/{REGION}/keys", json={"algorithm": "SM2"}, headers=bearer(admin_token)
    )
    assert published.status_code == 201, published.text
    new_kid, jwk = published.json()["kid"], published.json()["jwk"]
    assert (published.json()["algorithm"], jwk["kty"], jwk["crv"], jwk["alg"]) == ("SM2", "EC", "SM2", "SM2")
    jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
    assert {old_kid, new_kid} <= {key["kid"] for key in jwks}

    quick = create_app(make_settings(database_url, redis_url, redis_prefix, key_publish_lead=0))
    async with serve(quick) as other_worker:
        activation = f"/v1/operator/regions/{REGION}/keys/{new_kid}/activation"
        assert (await other_worker.post(activation, headers=bearer(admin_token))).status_code == 200
    assert await _keys(client, admin_token) == {old_kid: ("Ed25519", "retired"), new_kid: ("SM2", "active")}
    await asyncio.sleep(1.0)  # the change counter reaches this worker
    sm2_codes = [(await factories.credentials(client, holder))[0] for _ in range(CODES)]
    assert {_header(code)[1] for code in sm2_codes} == {ALG_SM2_SM3}

    # Codes of both keys in flight: every one accepted once, none refused.
    results = [(await factories.verify(client, gate, code))["result"] for code in ed25519_codes + sm2_codes]
    assert results == ["accepted"] * (2 * CODES)

    # An offline gate with the region's kit verifies both kinds.
    kit_response = await client.get(f"/v1/offline-kits/{REGION}", headers=gate.headers)
    assert kit_response.status_code == 200, kit_response.text
    kit = OfflineKit.from_json(kit_response.content)
    [fresh_sm2] = await factories.credentials(client, holder)
    now = int(time.time())
    assert verify_offline(fresh_sm2, kit, now, context.settings.clock_skew).accepted
    assert verify_offline(ed25519_codes[0], kit, now, context.settings.clock_skew).accepted

    # The old key withdrawn: its codes fail, the SM2 ones keep working.
    revocation = {"reason": "drill: the Ed25519 key is withdrawn"}
    revoked = await client.post(
        f"/v1/operator/regions/{REGION}/keys/{old_kid}/revocation", json=revocation, headers=bearer(admin_token)
    )
    assert revoked.status_code == 200, revoked.text
    await asyncio.sleep(1.0)
    [late_ed25519] = ed25519_codes[:1]
    assert (await factories.verify(client, gate, late_ed25519))["reason"] == "unknown_key"
    [another_sm2] = await factories.credentials(client, holder)
    assert (await factories.verify(client, gate, another_sm2))["result"] == "accepted"


@pytest.mark.parametrize("profile", ["national"])
async def test_a_national_deployment_gives_new_regions_sm2_keys(
    profile: str, database_url: str, redis_url: str, redis_prefix: str, admin_token: str
) -> None:
    national = create_app(make_settings(database_url, redis_url, redis_prefix, crypto_profile=profile))
    async with serve(national) as client:
        created = await client.post(
            "/v1/operator/regions", json={"code": "820000", "name": "澳门特别行政区"}, headers=bearer(admin_token)
        )
        assert created.status_code == 201, created.text
        response = await client.get("/v1/operator/regions/820000/keys", headers=bearer(admin_token))
        [key] = response.json()
        assert (key["algorithm"], key["jwk"]["crv"]) == ("SM2", "SM2")
        # A region may still name Ed25519 for its first key.
        explicit = await client.post(
            "/v1/operator/regions",
            json={"code": "810000", "name": "香港特别行政区", "key_algorithm": "Ed25519"},
            headers=bearer(admin_token),
        )
        assert explicit.status_code == 201, explicit.text
        [ed_key] = (await client.get("/v1/operator/regions/810000/keys", headers=bearer(admin_token))).json()
        assert ed_key["algorithm"] == "Ed25519"
        # The trust list of a national deployment is SM2-signed, by its own key, and lists both kinds.
        listed = await client.get("/v1/trust-list")
        assert listed.status_code == 200, listed.text
        body = listed.json()
        assert (body["signer"]["kty"], body["signer"]["crv"], body["signer"]["alg"]) == ("EC", "SM2", "SM2")
        assert body["signer"] == signer_jwk(national.state[STATE_KEY].keyring.trust_sm2_key)
        claims = verify_trust_list(body["trust_list"], body["signer"])
        regions = {entry["region"]: {key["crv"] for key in entry["keys"]} for entry in claims["regions"]}
        assert regions["820000"] == {"SM2"} and regions["810000"] == {"Ed25519"}
        signing_input, _, signature = body["trust_list"].rpartition(".")
        assert gmssl_verify(
            sm2_public_from_jwk(body["signer"]), b64url_decode(signature), signing_input.encode(), DEFAULT_SIGNER_ID
        )
    # The international deployment on the same database still signs with Ed25519 (pyjwt reads it elsewhere).
    international = await serve_trust_list(create_app(make_settings(database_url, redis_url, redis_prefix)))
    assert international["signer"]["kty"] == "OKP"
    verify_trust_list(international["trust_list"], international["signer"])


async def serve_trust_list(app: Litestar) -> dict[str, Any]:
    """GET /v1/trust-list of another worker."""
    async with serve(app) as client:
        response = await client.get("/v1/trust-list")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body
