"""Issuer keys in a PKCS#11 token (SoftHSM2), through the whole service, on SQLite and PostgreSQL.

A region moves its signing from a software key into the token by the rotation drill, with codes of
both in flight and none refused; the token's codes pass the routed and the fast verify path, the
offline kit and pycose; a wrong PIN, a missing module, or a key in a token the process cannot open
stop start-up; a token that fails while serving makes issuance a 503 and leaves verification alone.

These tests use a database of their own: keys in the token would stop the start-up of the other
tests' software-only workers on the shared one (as they should).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from litestar import Litestar
from pkcs11 import Attribute, ObjectClass
from pycose.messages import CoseMessage
from sqlalchemy import select
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.db.models import IssuerKey
from app.domain.audit.services import Actor
from app.domain.issuers.services import PRIVATE_KEY_FIELD
from app.domain.operators.services import Role
from app.domain.regions.services import register_region
from app.server.context import STATE_KEY, ServiceContext
from crypto import hsm
from crypto.base45 import b45decode
from crypto.credential import PREFIX
from crypto.hsm import HsmConfigurationError
from crypto.keys import b64url_decode
from crypto.offline import OfflineKit, verify_offline
from tests import factories
from tests.conftest import BACKENDS, _drop_postgres_database, make_settings, migrated_database, operator_token, serve
from tests.factories import Gate, Holder, bearer, problem
from tests.softhsm import PIN_CHECK, SoftHsm
from tests.unit.crypto.test_cose_interop import cose_bytes, pycose_public_key

CODES = 10


@pytest.fixture(scope="module", params=BACKENDS)
async def hsm_database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_url: URL
) -> AsyncIterator[str]:
    """A migrated database of this module alone, per backend."""
    url = await migrated_database(request.param, tmp_path_factory.mktemp(f"hsm-{request.param}"), postgres_url)
    yield url.render_as_string(hide_password=False)
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


@pytest.fixture(scope="module")
def settings_of(hsm_database: str, redis_url: str, redis_prefix: str) -> Any:
    def settings(**overrides: Any) -> Any:
        return make_settings(hsm_database, redis_url, f"{redis_prefix}hsm:", **overrides)

    return settings


@pytest.fixture(scope="module")
async def hsm_app(settings_of: Any, softhsm: SoftHsm) -> Litestar:
    """A worker whose new issuer keys go in the token (ECARD_ISSUER_KEY_STORE=pkcs11)."""
    return create_app(settings_of(**softhsm.settings(issuer_key_store="pkcs11")))


@pytest.fixture(scope="module")
async def client(hsm_app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(hsm_app) as http:
        yield http


@pytest.fixture(scope="module")
def context(hsm_app: Litestar, client: httpx.AsyncClient) -> ServiceContext:
    ctx: ServiceContext = hsm_app.state[STATE_KEY]
    return ctx


@pytest.fixture(scope="module")
async def admin(client: httpx.AsyncClient, context: ServiceContext) -> str:
    return await operator_token(client, context, Role.ADMIN, ["*"])


@pytest.fixture
def quick_reconnect(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(hsm, "RECONNECT_INTERVAL", 0.0)
    yield


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data[:10]
    yield data[10:]


async def verify(client: httpx.AsyncClient, gate: Gate, credential: str, fast: bool) -> dict[str, Any]:
    """A scan through the fast path (Content-Length) or the routed handler (chunked: the fast path hands it on)."""
    if fast:
        response = await client.post("/v1/verify", json={"credential": credential}, headers=gate.headers)
        assert "content-length" in response.request.headers
    else:
        body = json.dumps({"credential": credential}).encode()
        headers = {**gate.headers, "content-type": "application/json"}
        response = await client.post("/v1/verify", content=_chunks(body), headers=headers)
        assert "content-length" not in response.request.headers
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def issue(client: httpx.AsyncClient, holder: Holder, count: int = 1, fast: bool = True) -> httpx.Response:
    body = {"purpose": "transit", "count": count}
    if fast:
        return await client.post("/v1/holder/credentials", json=body, auth=holder.auth)
    headers = {"content-type": "application/json"}
    return await client.post(
        "/v1/holder/credentials", content=_chunks(json.dumps(body).encode()), headers=headers, auth=holder.auth
    )


def kid_of(credential: str) -> bytes:
    protected = cbor2.loads(b45decode(credential[len(PREFIX) :])).value[0]
    kid: bytes = cbor2.loads(protected)[4]
    return kid


async def _region_keys(client: httpx.AsyncClient, admin: str, region: str) -> dict[str, tuple[str, str]]:
    response = await client.get(f"/v1/operator/regions/{region}/keys", headers=bearer(admin))
    assert response.status_code == 200, response.text
    return {key["kid"]: (key["key_store"], key["state"]) for key in response.json()}


async def test_a_region_moves_from_a_software_key_into_the_token_without_false_rejects(
    client: httpx.AsyncClient, context: ServiceContext, admin: str, settings_of: Any, softhsm: SoftHsm
) -> None:
    region = "460000"
    async with context.sessions() as session:  # its first key in software, as every region's was before
        await register_region(session, context.pii, Actor.command("test"), region, "海南省")
    await context.directory_changes.announce()
    [(old_kid, (store, _))] = (await _region_keys(client, admin, region)).items()
    assert store == "software"
    holder = await factories.activated_holder(client, admin, region)
    gate = await factories.new_gate(client, admin, region, "transit", ["transit"])
    software_codes = [(await factories.credentials(client, holder))[0] for _ in range(CODES)]

    published = await client.post(
        f"/v1/operator/regions/{region}/keys", json={"key_store": "pkcs11"}, headers=bearer(admin)
    )
    assert published.status_code == 201, published.text
    new_kid = published.json()["kid"]
    assert (published.json()["key_store"], published.json()["algorithm"]) == ("pkcs11", "Ed25519")
    jwks = {key["kid"]: key for key in (await client.get("/.well-known/jwks.json")).json()["keys"]}
    assert {old_kid, new_kid} <= jwks.keys()

    # The row keeps a reference into the token, and a seal secret that is not the signing key.
    async with context.sessions() as session:
        row = (await session.scalars(select(IssuerKey).where(IssuerKey.kid == b64url_decode(new_kid)))).one()
    assert (row.key_store, row.key_token) == ("pkcs11", "ecard-issuers")
    assert row.key_label == f"ecard-issuer-{region}-{row.kid.hex()}"
    assert len(context.pii.decrypt_bytes(row.private_key_encrypted, PRIVATE_KEY_FIELD)) == 32
    # In the token: sensitive, never extractable; the public key is the published one.
    token = context.key_store.token
    assert token is not None
    private = token.session_for_tests().get_key(object_class=ObjectClass.PRIVATE_KEY, id=row.kid, label=row.key_label)
    assert (private[Attribute.SENSITIVE], private[Attribute.EXTRACTABLE]) == (True, False)
    assert private[Attribute.NEVER_EXTRACTABLE] is True

    quick = create_app(settings_of(**softhsm.settings(key_publish_lead=0)))
    async with serve(quick) as other_worker:
        activation = f"/v1/operator/regions/{region}/keys/{new_kid}/activation"
        assert (await other_worker.post(activation, headers=bearer(admin))).status_code == 200
    rotated = {old_kid: ("software", "retired"), new_kid: ("pkcs11", "active")}
    assert await _region_keys(client, admin, region) == rotated
    await asyncio.sleep(1.0)  # the change counter reaches this worker
    token_codes = [(await factories.credentials(client, holder))[0] for _ in range(CODES)]
    bundle = await issue(client, holder, count=20)
    assert bundle.status_code == 200, bundle.text
    token_codes += [item["credential"] for item in bundle.json()["credentials"]][:1]
    assert {kid_of(code) for code in token_codes} == {b64url_decode(new_kid)}
    assert {kid_of(code) for code in software_codes} == {b64url_decode(old_kid)}

    # Both keys' codes in flight: each accepted once, half through the fast path, half routed.
    results = [
        (await verify(client, gate, code, fast=index % 2 == 0))["result"]
        for index, code in enumerate(software_codes + token_codes)
    ]
    assert results == ["accepted"] * len(results)
    # All twenty of the bundle verify (the first was scanned above: its replay is refused as used).
    bundle_codes = [item["credential"] for item in bundle.json()["credentials"]]
    kit_response = await client.get(f"/v1/offline-kits/{region}", headers=gate.headers)
    assert kit_response.status_code == 200, kit_response.text
    kit = OfflineKit.from_json(kit_response.content)
    now = int(time.time())
    assert all(verify_offline(code, kit, now + 30 * index, 5).accepted for index, code in enumerate(bundle_codes))
    assert verify_offline(software_codes[0], kit, now, 5).accepted
    # pycose, with nothing but the JWKS's public key.
    for code in (token_codes[0], bundle_codes[-1]):
        message = CoseMessage.decode(cose_bytes(code))
        message.key = pycose_public_key(context.directory.keys.verify_keys[row.kid])  # type: ignore[arg-type]
        assert message.verify_signature() is True


async def test_a_wrong_pin_a_missing_module_or_an_unreachable_key_stop_start_up(
    client: httpx.AsyncClient, admin: str, settings_of: Any, softhsm: SoftHsm, tmp_path: Path
) -> None:
    wrong_pin = tmp_path / "wrong.pin"
    wrong_pin.write_text("999999\n")
    attempts = {
        "refused the PIN": softhsm.settings(PIN_CHECK, pkcs11_pin_file=str(wrong_pin)),
        "no such file": softhsm.settings(pkcs11_module=str(tmp_path / "libvendor-pkcs11.so")),
        "no token labelled": softhsm.settings("ecard-elsewhere"),
    }
    for message, overrides in attempts.items():
        with pytest.raises(HsmConfigurationError, match=message) as stopped:
            async with serve(create_app(settings_of(**overrides))):
                pytest.fail("the service started")
        assert "999999" not in str(stopped.value)
    # A region whose active key is in the token: a worker without the module does not start either.
    created = await client.post("/v1/operator/regions", json={"code": "650000", "name": "新疆"}, headers=bearer(admin))
    assert created.status_code == 201, created.text
    [(kid, (store, state))] = (await _region_keys(client, admin, "650000")).items()
    assert (store, state) == ("pkcs11", "active")
    with pytest.raises(HsmConfigurationError, match=f"{b64url_decode(kid).hex()} of region 650000"):
        async with serve(create_app(settings_of())):
            pytest.fail("the service started")


async def test_a_key_missing_from_the_token_stops_start_up(
    client: httpx.AsyncClient, context: ServiceContext, admin: str, settings_of: Any, softhsm: SoftHsm
) -> None:
    created = await client.post("/v1/operator/regions", json={"code": "640000", "name": "宁夏"}, headers=bearer(admin))
    assert created.status_code == 201, created.text
    [kid] = (await _region_keys(client, admin, "640000")).keys()
    token = context.key_store.token
    assert token is not None
    session = token.session_for_tests()
    for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        session.get_key(object_class=object_class, id=b64url_decode(kid)).destroy()
    try:
        with pytest.raises(HsmConfigurationError, match="has no key pair labelled"):
            async with serve(create_app(settings_of(**softhsm.settings()))):
                pytest.fail("the service started")
    finally:  # the region's key revoked, so the next workers of this module start
        rotated = await client.post("/v1/operator/regions/640000/keys", json={}, headers=bearer(admin))
        assert rotated.status_code == 201, rotated.text
        async with context.sessions() as db:
            for row in (await db.scalars(select(IssuerKey).where(IssuerKey.region_code == "640000"))).all():
                row.state = "active" if row.kid != b64url_decode(kid) else "revoked"
            await db.commit()
        await context.directory_changes.announce()


async def test_a_token_failure_is_a_503_for_issuing_and_verification_goes_on(
    client: httpx.AsyncClient, context: ServiceContext, admin: str
) -> None:
    region = "630000"
    created = await client.post("/v1/operator/regions", json={"code": region, "name": "青海省"}, headers=bearer(admin))
    assert created.status_code == 201, created.text
    holder = await factories.activated_holder(client, admin, region)
    gate = await factories.new_gate(client, admin, region, "transit", ["transit"])
    before = [(await factories.credentials(client, holder))[0] for _ in range(2)]
    kit_before = await client.get(f"/v1/offline-kits/{region}", headers=gate.headers)
    assert kit_before.status_code == 200, kit_before.text
    token = context.key_store.token
    assert token is not None

    token.session_for_tests().close()  # the token's session is gone (a device reset, a network HSM lost)
    for fast in (True, False):  # the fast path, then the routed handler (the token not tried again yet)
        refused = problem(await issue(client, holder, count=20, fast=fast), 503)
        assert refused["code"] == "signing_unavailable", refused
        assert "issuer key of region 630000" in refused["detail"]
    # Verification needs no private key: the codes issued before are accepted, by both paths.
    assert [(await verify(client, gate, code, fast=i == 0))["result"] for i, code in enumerate(before)] == [
        "accepted",
        "accepted",
    ]
    # The offline kit still served: the stored one is valid, though a new one cannot be signed now.
    async with context.sessions() as session:
        await context.offline_kits.mark_due(session, region)
    kit_during = await client.get(f"/v1/offline-kits/{region}", headers=gate.headers)
    assert kit_during.status_code == 200, kit_during.text
    assert kit_during.headers["etag"] == kit_before.headers["etag"]

    await asyncio.sleep(hsm.RECONNECT_INTERVAL + 0.1)  # then the token is logged in to again
    again = await issue(client, holder)
    assert again.status_code == 200, again.text
    [fresh] = [item["credential"] for item in again.json()["credentials"]]
    assert (await verify(client, gate, fresh, fast=True))["result"] == "accepted"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "litestar"), "--app", "app.asgi:create_app", "ecard", "keys", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)


async def test_the_cli_publishes_a_key_in_the_token_and_checks_the_keys(
    client: httpx.AsyncClient, admin: str, hsm_database: str, redis_url: str, redis_prefix: str, softhsm: SoftHsm
) -> None:
    created = await client.post("/v1/operator/regions", json={"code": "620000", "name": "甘肃"}, headers=bearer(admin))
    assert created.status_code == 201, created.text
    env = {
        **os.environ,
        "DATABASE_URL": hsm_database,
        "REDIS_URL": redis_url,
        "ECARD_REDIS_PREFIX": f"{redis_prefix}hsm:",
        "ECARD_PKCS11_MODULE": str(softhsm.module),
        "ECARD_PKCS11_TOKEN": "ecard-issuers",
        "ECARD_PKCS11_PIN_FILE": str(softhsm.pin_file),
    }
    published = await asyncio.to_thread(_cli, env, "publish", "620000", "--key-store", "pkcs11")
    assert published.returncode == 0, published.stderr
    assert "published Ed25519 key" in published.stdout and "in the token 'ecard-issuers'" in published.stdout
    keys = await _region_keys(client, admin, "620000")
    assert sorted(keys.values()) == [("pkcs11", "active"), ("pkcs11", "published")]
    checked = await asyncio.to_thread(_cli, env, "check")
    assert checked.returncode == 0, checked.stderr
    assert "620000: " in checked.stdout and "in the token, ecard-issuer-620000-" in checked.stdout
    wrong = {**env, "ECARD_PKCS11_PIN_FILE": "", "ECARD_PKCS11_PIN": "wrong-pin-7f3a"}
    refused = await asyncio.to_thread(_cli, wrong, "check")
    assert refused.returncode == 1 and "refused the PIN" in refused.stderr, refused.stderr
    assert "wrong-pin-7f3a" not in refused.stderr
