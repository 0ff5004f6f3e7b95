"""Shared fixtures: real Redis, real SQLite and PostgreSQL databases, the app, and an admin.

Servers: those named by REDIS_URL and DATABASE_URL (a PostgreSQL URL) when set, otherwise
throwaway ones started from the installed binaries. Each run uses its own Redis key prefix and
its own PostgreSQL database, and removes only those at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar
from sqlalchemy.engine import URL, make_url

from app.asgi import create_app
from app.db.engine import create_engine
from app.db.migrate import upgrade_to_head
from app.domain.audit.services import Actor
from app.domain.operators.services import Role, create_operator
from app.server.context import STATE_KEY, ServiceContext
from app.server.plugin import EcardPlugin
from app.settings import DEV_KEYS_DIR, Settings
from loadtests.redis_cluster import ClusterError, RedisCluster
from tests import factories
from tests.servers import MissingServerBinary, PostgresServer, RedisServer
from tests.softhsm import SoftHsm, softhsm_tokens

BACKENDS = ["sqlite", "postgres"]


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL, or a throwaway redis-server."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    try:
        server = RedisServer().start()
    except MissingServerBinary as exc:
        pytest.exit(str(exc), returncode=3)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def softhsm() -> Iterator[SoftHsm]:
    """This run's SoftHSM2 tokens, in a temporary SOFTHSM2_CONF directory (removed at the end)."""
    try:
        with softhsm_tokens() as tokens:
            yield tokens
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A three-master Redis Cluster of this run on loopback, from the installed redis-server."""
    try:
        cluster = RedisCluster().start()
    except ClusterError as exc:
        pytest.exit(str(exc), returncode=3)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[URL]:
    """DATABASE_URL (a PostgreSQL server to create test databases on), or a throwaway cluster."""
    url = os.environ.get("DATABASE_URL")
    if url:
        parsed = make_url(url)
        if parsed.get_backend_name() != "postgresql":
            pytest.exit(f"DATABASE_URL must name a PostgreSQL server for the tests, got {parsed.drivername}", 3)
        yield parsed.set(drivername="postgresql+asyncpg")
        return
    try:
        server = PostgresServer().start()
    except MissingServerBinary as exc:
        pytest.exit(str(exc), returncode=3)
    yield make_url(server.url)
    server.stop()


@pytest.fixture(scope="session")
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this run's own; its keys are deleted at the end."""
    prefix = f"ecard-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _create_postgres_database(server: URL) -> URL:
    name = f"ecard_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(_asyncpg_dsn(server))
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return server.set(database=name)


async def _drop_postgres_database(server: URL, name: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(server))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


async def migrated_database(backend: str, tmp_path: Path, postgres_url: URL) -> URL:
    """A fresh, migrated database of the backend."""
    if backend == "sqlite":
        url = make_url(f"sqlite+aiosqlite:///{tmp_path / 'ecard.sqlite3'}")
    else:
        url = await _create_postgres_database(postgres_url)
    engine = create_engine(url.render_as_string(hide_password=False))
    try:
        await upgrade_to_head(engine)
    finally:
        await engine.dispose()
    return url


@pytest.fixture(scope="session", params=BACKENDS)
async def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_url: URL
) -> AsyncIterator[str]:
    """A migrated database per backend, shared by the tests of that backend."""
    url = await migrated_database(request.param, tmp_path_factory.mktemp(request.param), postgres_url)
    yield url.render_as_string(hide_password=False)
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


def make_settings(database_url: str, redis_url: str, redis_prefix: str, **overrides: Any) -> Settings:
    """Settings for an app under test."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "redis_prefix": redis_prefix,
        "keys_dir": DEV_KEYS_DIR,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
async def app(database_url: str, redis_url: str, redis_prefix: str) -> Litestar:
    """The app on this backend and the real Redis."""
    return create_app(make_settings(database_url, redis_url, redis_prefix))


@asynccontextmanager
async def serve(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and give an HTTP client of it, all in the test's event loop.

    (Litestar's AsyncTestClient runs the lifespan in a thread with a loop of its own, and
    asyncpg connections opened there cannot be used by requests in the test's loop; and
    `Litestar.lifespan` holds an anyio task group that pytest-asyncio would enter and exit in
    different tasks. The plugin's own lifespan is all the app has.)
    """
    plugin = app.plugins.get(EcardPlugin)
    async with plugin.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            http.app = app  # type: ignore[attr-defined]
            yield http


@pytest.fixture(scope="session")
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the app, its lifespan running for the whole session of the backend."""
    async with serve(app) as http:
        yield http


@pytest.fixture(scope="session")
def context(app: Litestar, client: httpx.AsyncClient) -> ServiceContext:
    """The running app's service context."""
    ctx: ServiceContext = app.state[STATE_KEY]
    return ctx


async def operator_token(client: httpx.AsyncClient, context: ServiceContext, role: Role, regions: list[str]) -> str:
    """Create an operator with role and regions, sign in through the API, return the token."""
    username = f"op-{uuid.uuid4().hex[:10]}"
    password = uuid.uuid4().hex
    async with context.sessions() as session:
        await create_operator(
            session, Actor.command("test"), username=username, password=password, role=role, regions=regions
        )
    response = await client.post("/v1/operator/session", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.fixture(scope="session")
async def admin_token(client: httpx.AsyncClient, context: ServiceContext) -> str:
    """An admin of every region, with the test regions registered."""
    token = await operator_token(client, context, Role.ADMIN, ["*"])
    for code, name in factories.REGIONS.items():
        response = await client.post(
            "/v1/operator/regions", json={"code": code, "name": name}, headers=factories.bearer(token)
        )
        assert response.status_code in (201, 409), response.text
    return token


@pytest.fixture
async def holder(client: httpx.AsyncClient, admin_token: str) -> factories.Holder:
    """A freshly issued and activated card of region 510000."""
    return await factories.activated_holder(client, admin_token, "510000")


@pytest.fixture(scope="session")
async def gate(client: httpx.AsyncClient, admin_token: str) -> factories.Gate:
    """A transit gate in Chengdu (510100) accepting transit and general credentials."""
    return await factories.new_gate(client, admin_token, "510000", "transit", ["transit", "general"])
