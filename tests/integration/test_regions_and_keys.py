"""Regions that accept each other's cards (by agreement and purpose), and the key-rotation drill."""

from __future__ import annotations

import asyncio

import httpx
import jwt
import pytest
from jwt.algorithms import OKPAlgorithm

from app.asgi import create_app
from app.domain.agreements.rules import AgreementsError, load_rules
from app.server.context import ServiceContext
from app.settings import DATA_DIR
from crypto.credential import Purpose, open_credential
from crypto.keys import b64url
from tests import factories
from tests.conftest import make_settings, serve
from tests.factories import Gate, bearer, problem

EXTRA_REGIONS = {"460000": "海南省", "310000": "上海市", "320000": "江苏省", "650000": "新疆维吾尔自治区"}


@pytest.fixture(scope="module")
async def regions(client: httpx.AsyncClient, admin_token: str) -> None:
    """The agreement regions beyond the session's three."""
    for code, name in EXTRA_REGIONS.items():
        response = await client.post(
            "/v1/operator/regions", json={"code": code, "name": name}, headers=bearer(admin_token)
        )
        assert response.status_code in (201, 409), response.text


async def _gate(client: httpx.AsyncClient, token: str, region: str, business_type: str, purposes: list[str]) -> Gate:
    return await factories.new_gate(client, token, region, business_type, purposes)


@pytest.mark.usefixtures("regions")
async def test_a_terminal_accepts_another_regions_card_exactly_where_an_agreement_covers_the_purpose(
    client: httpx.AsyncClient, admin_token: str
) -> None:
    chongqing = await factories.activated_holder(client, admin_token, "500000")
    hainan = await factories.activated_holder(client, admin_token, "460000")
    shanghai = await factories.activated_holder(client, admin_token, "310000")
    chengdu_desk = await _gate(client, admin_token, "510000", "hrss_office", ["general", "transit", "park"])
    chengdu_hospital = await _gate(client, admin_token, "510000", "hospital", ["medical"])
    guangzhou_park = await _gate(client, admin_token, "440000", "park", ["park", "transit"])
    nanjing_metro = await _gate(client, admin_token, "320000", "transit", ["transit", "park"])

    async def result(holder: factories.Holder, gate: Gate, purpose: str) -> str:
        [credential] = await factories.credentials(client, holder, purpose)
        answer = await factories.verify(client, gate, credential)
        return str(answer["result"] if answer["result"] == "accepted" else answer["reason"])

    # Sichuan-Chongqing: services (general), medical settlement, libraries — not transit or parks.
    assert await result(chongqing, chengdu_desk, "general") == "accepted"
    assert await result(chongqing, chengdu_hospital, "medical") == "accepted"
    assert await result(chongqing, chengdu_desk, "transit") == "region_not_accepted"
    assert await result(chongqing, chengdu_desk, "park") == "region_not_accepted"
    # Hainan-Guangdong: the joint annual travel card (parks) only.
    assert await result(hainan, guangzhou_park, "park") == "accepted"
    assert await result(hainan, guangzhou_park, "transit") == "region_not_accepted"
    # Yangtze River Delta: Shanghai's card on Nanjing's metro, but not in its parks.
    assert await result(shanghai, nanjing_metro, "transit") == "accepted"
    assert await result(shanghai, nanjing_metro, "park") == "region_not_accepted"
    # No agreement between Sichuan and the Delta at all.
    assert await result(shanghai, chengdu_desk, "general") == "region_not_accepted"


def test_the_agreements_file_is_consistent(context: ServiceContext) -> None:
    rules = load_rules(DATA_DIR / "agreements.json")
    assert {agreement.id for agreement in rules.agreements} == {
        "chengyu",
        "yangtze-river-delta",
        "qiong-yue-annual-pass",
    }
    assert rules.purposes_between("500000", "510000") == {Purpose.GENERAL, Purpose.MEDICAL, Purpose.LIBRARY}
    assert rules.purposes_between("510000", "500000") == rules.purposes_between("500000", "510000")
    assert rules.purposes_between("510000", "510100") == frozenset(Purpose)  # same province
    assert rules.purposes_between("650000", "510000") == frozenset()
    assert context.rules.version == rules.version


def test_a_broken_agreements_file_is_refused(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "agreements.json"  # type: ignore[operator]
    path.write_text('{"agreements": [{"id": "x", "name": "x", "regions": ["510000"], "purposes": ["general"], '
                    '"provenance": "test"}]}')  # fmt: skip
    with pytest.raises(AgreementsError, match="two or more"):
        load_rules(path)
    path.write_text('{"agreements": [{"id": "x", "name": "x", "regions": ["510000", "500000"], '
                    '"purposes": ["teleport"], "provenance": "test"}]}')  # fmt: skip
    with pytest.raises(AgreementsError, match="teleport"):
        load_rules(path)


def _kid_of(context: ServiceContext, credential: str) -> str:
    return b64url(open_credential(credential, context.directory.keys.verify_keys, context.directory.keys.seals).key.kid)


async def _keys(client: httpx.AsyncClient, token: str, region: str) -> dict[str, str]:
    response = await client.get(f"/v1/operator/regions/{region}/keys", headers=bearer(token))
    assert response.status_code == 200, response.text
    return {key["kid"]: key["state"] for key in response.json()}


def _trust_list(response: httpx.Response, region: str) -> dict[str, str]:
    """The region's key states from a trust list, after checking its signature with the signer key."""
    assert response.status_code == 200, response.text
    body = response.json()
    signer = OKPAlgorithm.from_jwk(body["signer"])
    claims = jwt.decode(body["trust_list"], signer, algorithms=["EdDSA"])  # type: ignore[arg-type]
    assert jwt.get_unverified_header(body["trust_list"])["kid"] == body["signer"]["kid"]
    [entry] = [entry for entry in claims["regions"] if entry["region"] == region]
    return {key["kid"]: key["status"] for key in entry["keys"]}


@pytest.mark.usefixtures("regions")
async def test_key_rotation_drill_has_no_false_rejects(
    client: httpx.AsyncClient,
    context: ServiceContext,
    admin_token: str,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
) -> None:
    region = "650000"
    holder = await factories.activated_holder(client, admin_token, region)
    gate = await _gate(client, admin_token, region, "transit", ["transit"])
    [old_key] = (await _keys(client, admin_token, region)).keys()
    before = await factories.credentials(client, holder, count=3)
    assert {_kid_of(context, credential) for credential in before} == {old_key}

    # 1. Publish: the key is known everywhere before it signs anything.
    response = await client.post(f"/v1/operator/regions/{region}/keys", headers=bearer(admin_token))
    assert response.status_code == 201, response.text
    new_key = response.json()["kid"]
    assert response.json()["state"] == "published"
    jwks = (await client.get("/.well-known/jwks.json")).json()
    assert {old_key, new_key} <= {key["kid"] for key in jwks["keys"]}
    assert _trust_list(await client.get("/v1/trust-list"), region) == {old_key: "active", new_key: "published"}
    [still_old] = await factories.credentials(client, holder)
    assert _kid_of(context, still_old) == old_key
    assert problem(await client.post(f"/v1/operator/regions/{region}/keys", headers=bearer(admin_token)), 409)

    # 2. Activating before gates can have refreshed their keys is refused (default lead: 600 s).
    activation = f"/v1/operator/regions/{region}/keys/{new_key}/activation"
    early = problem(await client.post(activation, headers=bearer(admin_token)), 409)
    assert early["current_state"] == "published" and "gates may not know it yet" in early["detail"]

    # 3. Activate, on a worker configured with no lead (same database and Redis: every worker reloads).
    quick = create_app(make_settings(database_url, redis_url, redis_prefix, key_publish_lead=0))
    async with serve(quick) as other_worker:
        response = await other_worker.post(activation, headers=bearer(admin_token))
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "active"
    assert await _keys(client, admin_token, region) == {old_key: "retired", new_key: "active"}
    await asyncio.sleep(1.0)  # the invalidation reaches this worker
    [after] = await factories.credentials(client, holder)
    assert _kid_of(context, after) == new_key
    assert _trust_list(await client.get("/v1/trust-list"), region) == {old_key: "retired", new_key: "active"}

    # 4. No false rejects: credentials of the retired key and of the new one are both accepted.
    for credential in (before[0], still_old, after):
        assert (await factories.verify(client, gate, credential))["result"] == "accepted"

    # 5. The active key cannot be revoked; the retired one can, and its credentials then fail.
    revocation = {"reason": "drill: old key withdrawn"}
    assert problem(
        await client.post(f"/v1/operator/regions/{region}/keys/{new_key}/revocation", json=revocation,
                          headers=bearer(admin_token)), 409,
    )["current_state"] == "active"  # fmt: skip
    response = await client.post(
        f"/v1/operator/regions/{region}/keys/{old_key}/revocation", json=revocation, headers=bearer(admin_token)
    )
    assert response.status_code == 200 and response.json()["state"] == "revoked"
    assert (await factories.verify(client, gate, before[1]))["reason"] == "unknown_key"
    assert old_key not in {key["kid"] for key in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert _trust_list(await client.get("/v1/trust-list"), region) == {new_key: "active"}


@pytest.mark.usefixtures("regions")
async def test_key_endpoints_refuse_what_they_should(client: httpx.AsyncClient, context: ServiceContext) -> None:
    from app.domain.operators.services import Role
    from tests.conftest import operator_token

    sichuan_admin = await operator_token(client, context, Role.ADMIN, ["510000"])
    auditor = await operator_token(client, context, Role.AUDITOR, ["*"])
    assert problem(await client.post("/v1/operator/regions/500000/keys", headers=bearer(sichuan_admin)), 403)
    assert problem(await client.post("/v1/operator/regions/510000/keys", headers=bearer(auditor)), 403)
    assert (await client.get("/v1/operator/regions/510000/keys", headers=bearer(auditor))).status_code == 200
    assert problem(await client.get("/v1/operator/regions/999999/keys", headers=bearer(auditor)), 404)
    for kid in ("nonsense", "AAAAAAAAAAA", "%20"):
        response = await client.post(
            f"/v1/operator/regions/510000/keys/{kid}/activation", headers=bearer(sichuan_admin)
        )
        assert problem(response, 404)
    assert problem(await client.get("/v1/operator/regions/510000/keys"), 401)
