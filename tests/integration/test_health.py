"""`/health` (the process answers) and `/ready` (database, status store, issuer keys, directory) on both databases."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest
from litestar import Litestar
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from app.server.probes import CHECK_TIMEOUT, CHECKS, missing_dependencies
from tests.conftest import make_settings, migrated_database, operator_token, serve
from tests.factories import bearer
from tests.servers import RedisServer, free_port


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


async def test_a_worker_still_starting_is_not_ready(tmp_path: Path) -> None:
    """Before the lifespan published its context (directory loaded), nothing is ready; it is alive all the same."""
    app = create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'never.sqlite3'}", "", "unused:"))
    transport = httpx.ASGITransport(app=app)  # runs no lifespan
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        _assert_not_ready(await client.get("/ready"), list(CHECKS))
        assert (await client.get("/health")).status_code == 200


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept a connection and never answer (a database host that hangs)."""
    await reader.read()
    writer.close()


@pytest.mark.parametrize("database", ["refused", "silent"])
async def test_a_database_that_refuses_or_hangs_is_missing_within_the_timeout(database: str) -> None:
    port = free_port()
    server = await asyncio.start_server(_silent, "127.0.0.1", port) if database == "silent" else None
    context = ServiceContext.build(make_settings(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/none", "", "unused:"))
    try:
        started = time.monotonic()
        # No region was loaded in this unstarted context either: no issuer key.
        assert await missing_dependencies(context) == ["database", "issuer_keys"]
        assert time.monotonic() - started < CHECK_TIMEOUT + 0.5
    finally:
        await context.engine.dispose()
        if server is not None:
            server.close()
