"""`/health` (the process answers) and `/ready` (database, status store, issuer keys, directory) on both databases."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
from litestar import Litestar
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.context import STATE_KEY
from app.domain.operators.services import Role
from app.health import CHECK_TIMEOUT, CHECKS
from tests.conftest import make_settings, migrated_database, operator_token, serve
from tests.factories import bearer
from tests.servers import RedisServer


def _assert_not_ready(response: httpx.Response, missing: list[str]) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["retry-after"] == "1"
    problem = response.json()
    assert (problem["status"], problem["code"], problem["missing"]) == (503, "not_ready", missing)
    assert all(name in problem["detail"] for name in missing)


async def test_ready_with_everything_up(client: httpx.AsyncClient, admin_token: str) -> None:
    alive = await client.get("/health")
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    response = await client.get("/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ready", "store": "redis", "checked": list(CHECKS)}


async def test_redis_stopped_is_not_ready_but_alive(database_url: str) -> None:
    server = RedisServer().start()
    try:
        app: Litestar = create_app(make_settings(database_url, server.url, f"ready-{uuid.uuid4().hex[:8]}:"))
        async with serve(app) as client:
            token = await operator_token(client, app.state[STATE_KEY], Role.ADMIN, ["*"])
            region = await client.post(
                "/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token)
            )
            assert region.status_code in (201, 409), region.text
            assert (await client.get("/ready")).status_code == 200

            server.stop()
            started = time.monotonic()
            _assert_not_ready(await client.get("/ready"), ["status_store"])
            assert time.monotonic() - started < CHECK_TIMEOUT + 1.0, "the checks are bounded by their timeout"
            alive = await client.get("/health")
            assert (alive.status_code, alive.json()) == (200, {"status": "ok"})

            server.start()
            assert (await client.get("/ready")).status_code == 200
    finally:
        server.stop()


async def test_a_deployment_without_issuer_keys_is_not_ready(tmp_path: Path, postgres_url: URL) -> None:
    """A fresh database has no region, so no key to sign with: nothing to route holders to yet."""
    sqlite_url = (await migrated_database("sqlite", tmp_path, postgres_url)).render_as_string()
    app = create_app(make_settings(sqlite_url, "", "unused:"))
    async with serve(app) as client:
        _assert_not_ready(await client.get("/ready"), ["issuer_keys"])
        assert (await client.get("/health")).status_code == 200
