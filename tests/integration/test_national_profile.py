"""The national profile: issuer keys, session tokens and refresh-token hashes, and moving between profiles.

The same rotation drill as test_regions_and_keys.py, the next key named SM2: nothing valid is
refused while both kinds circulate, the JWKS, trust list and offline kit carry both, and a
deployment whose profile is national gives new regions SM2 keys. Holders and operators of a national
deployment hold SM2-signed tokens and SM3-hashed refresh tokens; a deployment switched from the
international profile keeps accepting what it issued before, and refuses the algorithm a token's
header claims unless its kid's key has it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from litestar import Litestar
from sqlalchemy import select

from app.asgi import create_app
from app.db.models import RefreshToken
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from app.settings import DEV_KEYS_DIR
from crypto.base45 import b45decode
from crypto.credential import PREFIX
from crypto.keys import ALG_EDDSA, ALG_SM2_SM3, PrivateKey, b64url, b64url_decode
from crypto.offline import OfflineKit, verify_offline
from crypto.sm import DEFAULT_SIGNER_ID, sm2_public_from_jwk
from crypto.trust_list import signer_jwk, verify_trust_list
from tests import factories
from tests.conftest import make_settings, operator_token, serve
from tests.factories import Holder, bearer, dpop, problem
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


# --- session tokens and refresh tokens ---------------------------------------------------------------


def _alg(token: str) -> str:
    """The algorithm a JWT's header names."""
    alg: str = json.loads(b64url_decode(token.split(".")[0]))["alg"]
    return alg


async def _refresh_hash(context: ServiceContext, refresh_token: str) -> str:
    """Which hash of the refresh token the database holds: "SM3" or "SHA-256"."""
    digests = {
        "SM3": hashlib.new("sm3", refresh_token.encode()).digest(),
        "SHA-256": hashlib.sha256(refresh_token.encode()).digest(),
    }
    async with context.sessions() as session:
        found = [name for name, digest in digests.items()
                 if await session.scalar(select(RefreshToken.id).where(RefreshToken.token_hash == digest))]  # fmt: skip
    assert len(found) == 1, found
    return found[0]


async def _refresh(client: httpx.AsyncClient, refresh_token: str) -> httpx.Response:
    return await client.post("/v1/holder/token", json={"refresh_token": refresh_token}, auth=dpop(refresh_token))


def _refreshed(holder: Holder, response: httpx.Response) -> Holder:
    assert response.status_code == 200, response.text
    body = response.json()
    return Holder(holder.card_id, holder.ecard_id, holder.card_number, body["access_token"], body["refresh_token"],
                  holder.device)  # fmt: skip


async def _uses_the_api(client: httpx.AsyncClient, holder: Holder, operator: str) -> None:
    """A holder's and an operator's token each do their job on this worker."""
    card = await client.get("/v1/holder/card", auth=holder.auth)
    assert card.status_code == 200, card.text
    assert len(await factories.credentials(client, holder)) == 1
    regions = await client.get("/v1/operator/regions", headers=bearer(operator))
    assert regions.status_code == 200, regions.text


def _national(database_url: str, redis_url: str, redis_prefix: str, **settings: Any) -> Litestar:
    return create_app(make_settings(database_url, redis_url, redis_prefix, crypto_profile="national", **settings))


async def test_a_national_deployment_signs_sessions_with_sm2_and_hashes_refresh_tokens_with_sm3(
    context: ServiceContext, admin_token: str, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    national = _national(database_url, redis_url, redis_prefix)
    async with serve(national) as api:
        operator = await operator_token(api, context, Role.ADMIN, ["*"])
        assert _alg(operator) == "SM2"
        holder = await factories.activated_holder(api, operator, "510000")
        assert _alg(holder.access_token) == "SM2"
        assert await _refresh_hash(context, holder.refresh_token) == "SM3"
        await _uses_the_api(api, holder, operator)
        # The PIN step-up token is SM2 too, and a medical code needs it.
        step_up = await factories.step_up(api, holder)
        assert _alg(step_up) == "SM2"
        assert len(await factories.credentials(api, holder, "medical")) == 1

        # An independent SM2 (gmssl) checks the access token's signature under the deployment's session key.
        session_key = national.state[STATE_KEY].keyring.session_sm2_key
        signing_input, _, signature = holder.access_token.rpartition(".")
        assert gmssl_verify(session_key.public, b64url_decode(signature), signing_input.encode(), DEFAULT_SIGNER_ID)

        # Refresh rotates within SM3; a rotated token presented again ends the family.
        rotated = _refreshed(holder, await _refresh(api, holder.refresh_token))
        assert (_alg(rotated.access_token), await _refresh_hash(context, rotated.refresh_token)) == ("SM2", "SM3")
        await _uses_the_api(api, rotated, operator)
        assert problem(await _refresh(api, holder.refresh_token), 401)["code"] == "refresh_token_reused"
        assert problem(await _refresh(api, rotated.refresh_token), 401)["code"] == "invalid_refresh_token"


async def test_a_switch_to_the_national_profile_logs_nobody_out(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path: Path,
) -> None:
    """The drill: tokens issued by an international worker, then national workers beside it (both key
    pairs held, as after 'keys generate --profile national --add'); everything issued keeps working
    on both until it expires, and reuse detection still revokes a family whichever hash found it."""
    holders = [await factories.activated_holder(client, admin_token, "510000") for _ in range(3)]
    assert {_alg(holder.access_token) for holder in holders} | {_alg(admin_token)} == {"EdDSA"}
    assert {await _refresh_hash(context, holder.refresh_token) for holder in holders} == {"SHA-256"}

    async with serve(_national(database_url, redis_url, redis_prefix)) as api:
        # What the international worker issued works on the national one: access and operator tokens...
        for holder in holders:
            await _uses_the_api(api, holder, admin_token)
        # ...and refresh tokens, which rotate into SM2 tokens and SM3 hashes.
        rotated = [_refreshed(holder, await _refresh(api, holder.refresh_token)) for holder in holders]
        assert {_alg(holder.access_token) for holder in rotated} == {"SM2"}
        assert {await _refresh_hash(context, holder.refresh_token) for holder in rotated} == {"SM3"}
        national_operator = await operator_token(api, context, Role.ADMIN, ["*"])
        # The international worker, rolled later, accepts the national worker's tokens too.
        for holder in rotated:
            await _uses_the_api(client, holder, national_operator)
        # And back: an SM3-hashed refresh token rotates on the international worker (into SHA-256).
        back = _refreshed(rotated[1], await _refresh(client, rotated[1].refresh_token))
        assert (_alg(back.access_token), await _refresh_hash(context, back.refresh_token)) == ("EdDSA", "SHA-256")

        # Reuse detection across the switch: the SHA-256 token, rotated on the national worker, presented
        # again there, revokes its family: the SM3 token that replaced it is dead.
        assert problem(await _refresh(api, holders[0].refresh_token), 401)["code"] == "refresh_token_reused"
        assert problem(await _refresh(api, rotated[0].refresh_token), 401)["code"] == "invalid_refresh_token"
        # The SM3 token, rotated on the international worker, presented again on the national one.
        assert problem(await _refresh(api, rotated[1].refresh_token), 401)["code"] == "refresh_token_reused"
        assert problem(await _refresh(client, back.refresh_token), 401)["code"] == "invalid_refresh_token"
        # The third family was left alone.
        assert (await _refresh(client, rotated[2].refresh_token)).status_code == 200

    # A worker without the SM2 session key (before '--add', or after the switch is undone) refuses SM2 tokens.
    keys = tmp_path / "keys"
    shutil.copytree(DEV_KEYS_DIR, keys)
    (keys / "session-sm2.key").unlink()
    async with serve(create_app(make_settings(database_url, redis_url, redis_prefix, keys_dir=keys))) as older:
        refused = problem(await older.get("/v1/operator/regions", headers=bearer(national_operator)), 401)
        assert "not signed by a session key" in refused["detail"]
        assert (await older.get("/v1/operator/regions", headers=bearer(admin_token))).status_code == 200


def _forge(key: PrivateKey, header: dict[str, Any], token: str) -> str:
    """token's claims under another header, signed by key (the development keys are public)."""
    segment = b64url(json.dumps(header).encode()) + "." + token.split(".")[1]
    return segment + "." + b64url(key.sign(segment.encode()))


async def test_a_tokens_header_cannot_choose_the_algorithm(
    context: ServiceContext, admin_token: str, database_url: str, redis_url: str, redis_prefix: str
) -> None:
    """The kid's key decides: an SM2 header under the Ed25519 session key's kid, or an EdDSA header under the
    SM2 key's, is a 401 problem, as is any malformed token; never a 500."""
    national = _national(database_url, redis_url, redis_prefix)
    async with serve(national) as api:
        keyring = national.state[STATE_KEY].keyring
        ed_key, sm2_key = keyring.session_key, keyring.session_sm2_key
        ed_kid, sm2_kid = b64url(ed_key.kid), b64url(sm2_key.kid)
        operator = await operator_token(api, context, Role.ADMIN, ["*"])
        holder = await factories.activated_holder(api, operator, "510000")
        # Re-signed honestly, the claims are good: each refusal below is the header's.
        for key, alg, kid in ((sm2_key, "SM2", sm2_kid), (ed_key, "EdDSA", ed_kid)):
            honest = {"alg": alg, "kid": kid, "typ": "JWT"}
            assert (await api.get("/v1/operator/regions", headers=bearer(_forge(key, honest, operator)))).status_code \
                == 200  # fmt: skip
        confusions = [
            (sm2_key, {"alg": "SM2", "kid": ed_kid, "typ": "JWT"}),
            (ed_key, {"alg": "SM2", "kid": ed_kid, "typ": "JWT"}),
            (ed_key, {"alg": "EdDSA", "kid": sm2_kid, "typ": "JWT"}),
            (sm2_key, {"alg": "EdDSA", "kid": sm2_kid, "typ": "JWT"}),
            (sm2_key, {"alg": "SM2", "typ": "JWT"}),
            (sm2_key, {"alg": "none", "kid": sm2_kid}),
        ]
        deep = b64url(b"[" * 50_000)
        malformed = ["x", "a.b.c", "e30.e30.", f"{deep}.e30.AA", operator + "A", operator.replace(".", "..", 1)]
        for token in [_forge(key, header, operator) for key, header in confusions] + malformed:
            body = problem(await api.get("/v1/operator/regions", headers=bearer(token)), 401)
            assert "operator token rejected" in body["detail"]
        # The same on the holder's routes, with a valid DPoP proof beside each token.
        for token in [_forge(key, header, holder.access_token) for key, header in confusions] + malformed:
            response = await api.get("/v1/holder/card", auth=holder.key.auth(token))
            assert problem(response, 401)["code"] == "unauthorized"
        # Bytes no JWT has: still a 401 problem.
        response = await api.get("/v1/operator/regions", headers={"Authorization": b"Bearer \xff\xfe.\xe9.x"})
        problem(response, 401)
