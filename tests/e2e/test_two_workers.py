"""A real server with two uvicorn worker processes, PostgreSQL and Redis, driven over HTTP.

What only a multi-process server shows: the single-use guarantee across workers, and operator
changes reaching every worker's in-process caches.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import URL

from app.settings import PROJECT_ROOT
from tests import factories
from tests.conftest import _drop_postgres_database, migrated_database
from tests.factories import bearer
from tests.servers import free_port

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
async def server_env(
    postgres_url: URL, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, str]]:
    """Environment of a server on its own PostgreSQL database."""
    url = await migrated_database("postgres", tmp_path_factory.mktemp("e2e"), postgres_url)
    env = {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "REDIS_URL": redis_url,
        "ECARD_REDIS_PREFIX": f"{redis_prefix}e2e:",
        "WEB_CONCURRENCY": "2",
    }
    yield env
    await _drop_postgres_database(postgres_url, url.database or "")


@pytest.fixture(scope="module")
def base_url(server_env: dict[str, str]) -> Iterator[str]:
    """Two workers serving the app."""
    port = free_port()
    # The log goes to a file: a pipe nobody reads fills with the workers' JSON lines (one per request)
    # and then blocks them, in the middle of the tests or at shutdown.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "uvicorn"), "--factory", "app.asgi:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "2", "--no-access-log"],
            cwd=PROJECT_ROOT, env=server_env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                process.wait()
                log.seek(0)
                raise RuntimeError(f"server did not start: {log.read()[-4000:].decode(errors='replace')}")
            time.sleep(0.2)
        yield url
        process.terminate()
        process.wait(20)


@pytest.fixture(scope="module")
async def admin(server_env: dict[str, str], base_url: str) -> str:
    """An admin created with the CLI, signed in over HTTP, region 510000 registered."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        return await factories.cli_admin(server_env, client)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client with many connections, so requests spread over both workers."""
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=10) as http:
        yield http


async def test_fifty_copies_across_two_workers_accept_exactly_one(client: httpx.AsyncClient, admin: str) -> None:
    """Ten gates send five copies each: one gate's copies are one accepted verification, 45 are replays."""
    holder = await factories.activated_holder(client, admin, "510000")
    gate = await factories.new_gate(client, admin, "510000", "transit", ["transit"])
    gates = [gate] + [await factories.new_terminal(client, admin, gate.organisation_id, ["transit"]) for _ in range(9)]
    await asyncio.sleep(1.0)  # the new terminals reach the other worker within a second
    for _ in range(3):
        [credential] = await factories.credentials(client, holder)
        responses = await asyncio.gather(
            *(
                client.post("/v1/verify", json={"credential": credential}, headers=each.headers)
                for each in gates
                for _ in range(5)
            )
        )
        assert {response.status_code for response in responses} == {200}
        results = [response.json() for response in responses]
        accepted = [result for result in results if result["result"] == "accepted"]
        assert len(accepted) == 5 and len({result["verification_id"] for result in accepted}) == 1
        assert [result.get("reason") for result in results].count("replayed") == 45


async def test_terminal_changes_reach_every_worker_within_a_second(client: httpx.AsyncClient, admin: str) -> None:
    gate = await factories.new_gate(client, admin, "510000", "transit", ["transit"])
    await asyncio.sleep(1.0)
    probes = [client.post("/v1/verify", json={"credential": "EC1:0"}, headers=gate.headers) for _ in range(20)]
    assert {response.status_code for response in await asyncio.gather(*probes)} == {200}

    response = await client.patch(
        f"/v1/operator/terminals/{gate.terminal_id}", json={"enabled": False}, headers=bearer(admin)
    )
    assert response.status_code == 200
    await asyncio.sleep(1.0)
    probes = [client.post("/v1/verify", json={"credential": "EC1:0"}, headers=gate.headers) for _ in range(20)]
    assert {response.status_code for response in await asyncio.gather(*probes)} == {401}


async def test_disabling_an_organisation_reaches_every_worker_within_a_second(
    client: httpx.AsyncClient, admin: str
) -> None:
    gate = await factories.new_gate(client, admin, "510000", "park", ["park"])
    second = await factories.new_terminal(client, admin, gate.organisation_id, ["park"])
    await asyncio.sleep(1.0)
    response = await client.patch(
        f"/v1/operator/verifier-organisations/{gate.organisation_id}", json={"enabled": False}, headers=bearer(admin)
    )
    assert response.status_code == 200 and response.json()["enabled"] is False
    await asyncio.sleep(1.0)
    probes = [
        client.post("/v1/verify", json={"credential": "EC1:0"}, headers=each.headers)
        for each in (gate, second)
        for _ in range(10)
    ]
    assert {response.status_code for response in await asyncio.gather(*probes)} == {401}


async def test_suspension_reaches_every_worker_at_once(client: httpx.AsyncClient, admin: str) -> None:
    holder = await factories.activated_holder(client, admin, "510000")
    gate = await factories.new_gate(client, admin, "510000", "transit", ["transit"])
    await asyncio.sleep(1.0)
    credentials = [(await factories.credentials(client, holder))[0] for _ in range(10)]
    response = await client.post(
        f"/v1/operator/cards/{holder.card_id}/ecard-state",
        json={"state": "suspended", "reason": "reported lost"},
        headers=bearer(admin),
    )
    assert response.status_code == 200
    responses = await asyncio.gather(
        *(client.post("/v1/verify", json={"credential": text}, headers=gate.headers) for text in credentials)
    )
    assert {response.json()["reason"] for response in responses} == {"card_suspended"}
