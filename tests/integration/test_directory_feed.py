"""The terminal directory by change feed: another service instance applies only what changed since it last looked.

"Another instance" is a ServiceContext of its own (its own engine and connections) on the app's database,
as a second worker or a second host would be; it is told nothing (no Redis announcement reaches
`refresh`): the database's counter and versions are all it reads. Every test runs against SQLite and
PostgreSQL (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import update

from app.db.models import Terminal
from app.domain.verification.directory import directory_counter, next_directory_version
from app.server.context import ServiceContext
from tests import factories
from tests.factories import Gate, bearer

SICHUAN = "510000"


@pytest.fixture
async def other(context: ServiceContext, admin_token: str) -> AsyncIterator[ServiceContext]:
    """Another service instance on the same database, its directory loaded in full (its start-up)."""
    instance = ServiceContext.build(context.settings)
    await instance.directory.reload()
    yield instance
    await instance.engine.dispose()
    await instance.mirror.close()
    await instance.events.close()
    await instance.bus.close()


async def patch_terminal(client: httpx.AsyncClient, token: str, gate: Gate, **changes: object) -> None:
    response = await client.patch(f"/v1/operator/terminals/{gate.terminal_id}", json=changes, headers=bearer(token))
    assert response.status_code == 200, response.text


async def test_a_terminal_registered_through_the_api_reaches_the_other_instance(
    client: httpx.AsyncClient, admin_token: str, other: ServiceContext
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "transit", ["transit"])
    assert other.directory.authenticate(gate.api_key) is None  # not applied yet
    assert await other.directory.refresh() == 1  # one terminal read, not all of them
    entry = other.directory.authenticate(gate.api_key)
    assert entry is not None and entry.terminal_id.hex == gate.terminal_id.replace("-", "")


async def test_nothing_changed_reads_nothing(other: ServiceContext) -> None:
    version = other.directory.version
    assert await other.directory.refresh() == 0
    assert other.directory.version == version


async def test_disabling_and_enabling_a_terminal_reach_the_other_instance(
    client: httpx.AsyncClient, admin_token: str, gate: Gate, other: ServiceContext
) -> None:
    assert other.directory.authenticate(gate.api_key) is not None
    await patch_terminal(client, admin_token, gate, enabled=False)
    assert await other.directory.refresh() == 1
    assert other.directory.authenticate(gate.api_key) is None
    await patch_terminal(client, admin_token, gate, enabled=True, rate_per_minute=600)
    await other.directory.refresh()
    entry = other.directory.authenticate(gate.api_key)
    assert entry is not None and entry.rate.per_minute == 600


async def test_disabling_an_organisation_reaches_all_its_terminals_on_the_other_instance(
    client: httpx.AsyncClient, admin_token: str, other: ServiceContext
) -> None:
    first = await factories.new_gate(client, admin_token, SICHUAN, "park", ["park"])
    second = await factories.new_terminal(client, admin_token, first.organisation_id, ["park"])
    await other.directory.refresh()
    assert other.directory.authenticate(first.api_key) and other.directory.authenticate(second.api_key)
    path = f"/v1/operator/verifier-organisations/{first.organisation_id}"
    response = await client.patch(path, json={"enabled": False}, headers=bearer(admin_token))
    assert response.status_code == 200, response.text
    assert await other.directory.refresh() == 2
    assert other.directory.authenticate(first.api_key) is None and other.directory.authenticate(second.api_key) is None
    response = await client.patch(path, json={"enabled": True}, headers=bearer(admin_token))
    assert response.status_code == 200, response.text
    await other.directory.refresh()
    assert other.directory.authenticate(first.api_key) and other.directory.authenticate(second.api_key)


async def test_a_rotated_api_key_reaches_the_other_instance_and_the_old_one_stops(
    client: httpx.AsyncClient, admin_token: str, other: ServiceContext
) -> None:
    gate = await factories.new_gate(client, admin_token, SICHUAN, "library", ["library"])
    await other.directory.refresh()
    response = await client.post(f"/v1/operator/terminals/{gate.terminal_id}/api-key", headers=bearer(admin_token))
    assert response.status_code == 201, response.text
    assert await other.directory.refresh() == 1
    assert other.directory.authenticate(gate.api_key) is None
    assert other.directory.authenticate(response.json()["api_key"]) is not None


async def test_a_new_issuer_key_reaches_the_other_instance(
    client: httpx.AsyncClient, admin_token: str, other: ServiceContext
) -> None:
    before = set(other.directory.keys.verify_keys)
    response = await client.post(f"/v1/operator/regions/{SICHUAN}/keys", headers=bearer(admin_token))
    assert response.status_code == 201, response.text
    await other.directory.refresh()
    assert set(other.directory.keys.verify_keys) - before


async def test_a_change_beyond_the_counter_read_is_applied_by_the_next_refresh(
    context: ServiceContext, client: httpx.AsyncClient, admin_token: str, gate: Gate, other: ServiceContext
) -> None:
    """The feed reads `last < version <= counter`: a row stamped later is taken next time, whole."""
    await other.directory.refresh()
    async with context.sessions() as session:
        version = await next_directory_version(session)
        stamped = update(Terminal).where(Terminal.id == uuid.UUID(gate.terminal_id))
        await session.execute(stamped.values(enabled=False, directory_version=version + 1))
        await session.commit()  # stamped past the counter: not yet a committed version anyone has seen
    assert await other.directory.refresh() == 0 and other.directory.authenticate(gate.api_key) is not None
    async with context.sessions() as session:
        assert await next_directory_version(session) == version + 1
        await session.execute(stamped.values(enabled=True))
        await session.commit()
    assert await other.directory.refresh() == 1


async def test_versions_are_given_in_commit_order(context: ServiceContext, admin_token: str) -> None:
    """A second change waits for the first one's commit to get its version (the counter's row is held)."""
    async with context.sessions() as first:
        taken = await next_directory_version(first)

        async def second() -> int:
            async with context.sessions() as session:
                version = await next_directory_version(session)
                await session.commit()
                return version

        waiting = asyncio.create_task(second())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        async with context.sessions() as reader:
            assert await directory_counter(reader) == taken - 1  # not visible before the commit
        await first.commit()
    assert await asyncio.wait_for(waiting, 10) == taken + 1
