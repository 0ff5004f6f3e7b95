"""The embedded default: no Redis, an in-process nonce store, one worker only."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.domain.operators.services import Role
from app.server.context import STATE_KEY, ServiceContext
from app.server.single_worker import SingleWorkerError
from tests import factories
from tests.conftest import make_settings, migrated_database, operator_token, serve
from tests.factories import bearer


@pytest.fixture
async def sqlite_url(tmp_path: Path, postgres_url: URL) -> str:
    """A fresh migrated SQLite database of this test alone."""
    return (await migrated_database("sqlite", tmp_path, postgres_url)).render_as_string()


async def _prepare(client: httpx.AsyncClient, context: ServiceContext) -> tuple[factories.Holder, factories.Gate]:
    token = await operator_token(client, context, Role.ADMIN, ["*"])
    response = await client.post(
        "/v1/operator/regions", json={"code": "510000", "name": "四川省"}, headers=bearer(token)
    )
    assert response.status_code == 201
    holder = await factories.activated_holder(client, token, "510000")
    gate = await factories.new_gate(client, token, "510000", "transit", ["transit"])
    return holder, gate


async def test_loop_without_redis(sqlite_url: str) -> None:
    app = create_app(make_settings(sqlite_url, "", "unused:"))
    async with serve(app) as client:
        context = app.state[STATE_KEY]
        holder, gate = await _prepare(client, context)
        assert (await client.get("/ready")).json()["store"] == "memory"
        token = await operator_token(client, context, Role.ADMIN, ["*"])
        gates = [gate] + [
            await factories.new_terminal(client, token, gate.organisation_id, ["transit"]) for _ in range(9)
        ]
        [credential] = await factories.credentials(client, holder)
        responses = await asyncio.gather(
            *(
                client.post("/v1/verify", json={"credential": credential}, headers=each.headers)
                for each in gates
                for _ in range(5)
            )
        )
        results = [response.json() for response in responses]
        accepted = [result for result in results if result["result"] == "accepted"]
        assert len(accepted) == 5, "one gate, its five copies answered as one verification"
        assert len({result["verification_id"] for result in accepted}) == 1
        assert sum(result.get("reason") == "replayed" for result in results) == 45


async def test_statuses_are_restored_from_the_database_on_start(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, "", "unused:")
    app = create_app(settings)
    async with serve(app) as client:
        holder, gate = await _prepare(client, app.state[STATE_KEY])
        [before] = await factories.credentials(client, holder)
    restarted = create_app(settings)
    async with serve(restarted) as client:
        # The used nonces went with the process: a code from before the restart may be a replay.
        assert (await factories.verify(client, gate, before))["reason"] == "refresh_required"
        [credential] = await factories.credentials(client, holder)
        # Its window opens after the new store's epoch, within a second.
        await asyncio.sleep(1 - time.time() % 1 + 0.01)
        assert (await factories.verify(client, gate, credential))["result"] == "accepted"


async def test_second_worker_is_refused(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, "", "unused:")
    first = create_app(settings)
    async with serve(first):
        with pytest.raises(SingleWorkerError, match="one worker"):
            async with serve(create_app(settings)):
                pass
    # Once the first worker is gone, a new one may start.
    async with serve(create_app(settings)) as client:
        assert (await client.get("/health")).status_code == 200


async def test_several_workers_without_redis_are_refused(sqlite_url: str) -> None:
    with pytest.raises(SingleWorkerError, match="REDIS_URL"):
        async with serve(create_app(make_settings(sqlite_url, "", "unused:", workers=2))):
            pass


async def test_production_mode_needs_redis(sqlite_url: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="REDIS_URL"):
        async with serve(create_app(make_settings(sqlite_url, "", "unused:", mode="production"))):
            pass
