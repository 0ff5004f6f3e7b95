"""CPU of a credential refresh and a token refresh, in-process: what DPoP-bound holder tokens add (docs/dpop.md).

    .venv/bin/python -m loadtests.dpop_refresh_cost [REQUESTS] [international|national]

One app (SQLite in a temporary directory, the in-process store, the development keys) driven through
httpx's ASGI transport in this process: `POST /v1/holder/credentials` (count 1, answered by the fast
path) and `POST /v1/holder/token`, each timed in process CPU (client and server together; each request's
DPoP proof is made before its timing starts). Copied into another checkout and run there
(`cd DIR && PYTHONPATH=. …/.venv/bin/python -m loadtests.dpop_refresh_cost`) it measures that code: a
service whose activation answers `token_type` "Bearer" is called with Bearer tokens and no proofs, so
main and this branch are timed by the same script. `national` runs the app under the national profile
(SM2 session tokens, SM3 refresh-token hashes, SM2 issuer keys for the region).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import nacl.bindings

from app.asgi import create_app
from app.db.engine import create_engine
from app.db.migrate import upgrade_to_head
from app.domain.audit.services import Actor
from app.domain.operators.services import Role, create_operator
from app.server.context import STATE_KEY
from app.server.plugin import EcardPlugin
from app.settings import DEV_KEYS_DIR, Settings
from crypto.dpop import make_proof
from crypto.keys import b64url
from loadtests.bench.preparation import citizen_id

BASE = "http://testserver"
PASSWORD = secrets.token_urlsafe(16)


async def measure(requests: int, profile: str = "international") -> None:
    """Print the CPU per request of both refreshes."""
    directory = Path(tempfile.mkdtemp(prefix="dpop-cost-"))
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{directory / 'ecard.sqlite3'}",
        keys_dir=DEV_KEYS_DIR,
        log_level="WARNING",
        crypto_profile=profile,
    )
    engine = create_engine(settings.database_url)
    await upgrade_to_head(engine)
    await engine.dispose()
    app = create_app(settings)
    print(f"ECARD_CRYPTO_PROFILE={profile}")
    async with app.plugins.get(EcardPlugin).lifespan(app):
        async with app.state[STATE_KEY].sessions() as session:
            await create_operator(
                session, Actor.command("dpop cost"), username="admin", password=PASSWORD, role=Role.ADMIN, regions=["*"]
            )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            await _measure(client, requests)


async def _measure(client: httpx.AsyncClient, requests: int) -> None:
    signed_in = await client.post("/v1/operator/session", json={"username": "admin", "password": PASSWORD})
    operator = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    await client.post("/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=operator)
    card = {"region": "510000", "citizen_id": citizen_id("510000"), "name": "张三", "card_number": "C12345678"}
    issued = (await client.post("/v1/operator/cards", json=card, headers=operator)).json()
    device = nacl.bindings.crypto_sign_keypair()[1]

    def proof(path: str, token: str | None = None) -> str:
        return make_proof(device, "POST", BASE + path, jti=secrets.token_urlsafe(12), access_token=token)

    activation = {
        "card_number": issued["card"]["card_number"],
        "activation_code": issued["activation_code"],
        "device_public_key": b64url(device[32:]),
    }
    path = "/v1/holder/activation"
    session = (await client.post(path, json=activation, headers={"DPoP": proof(path)})).json()
    bound = session["token_type"] == "DPoP"
    access, refresh = session["access_token"], session["refresh_token"]

    def headers(path: str, token: str | None) -> dict[str, str]:
        if not bound:
            return {"Authorization": f"Bearer {token}"} if token else {}
        made = {"DPoP": proof(path, token)}
        if token:
            made["Authorization"] = f"DPoP {token}"
        return made

    for label, path in (
        ("credential refresh (count 1)", "/v1/holder/credentials"),
        ("token refresh", "/v1/holder/token"),
    ):
        spent = 0.0
        for _ in range(requests):
            body: dict[str, Any]
            if path.endswith("/token"):
                sent, body = headers(path, None), {"refresh_token": refresh}
            else:
                sent, body = headers(path, access), {"purpose": "transit", "count": 1}
            started = time.process_time()
            response = await client.post(path, json=body, headers=sent)
            spent += time.process_time() - started
            if response.status_code != 200:
                raise SystemExit(f"{path}: {response.status_code} {response.text}")
            if path.endswith("/token"):
                access, refresh = response.json()["access_token"], response.json()["refresh_token"]
        scheme = "DPoP" if bound else "Bearer"
        print(f"{scheme} {label}: {spent / requests * 1e6:,.0f} µs CPU per request ({requests} requests)")


if __name__ == "__main__":
    asyncio.run(
        measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300, sys.argv[2] if len(sys.argv) > 2 else "international")
    )
