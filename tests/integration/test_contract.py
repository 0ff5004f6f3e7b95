"""The written-down contract: the exported OpenAPI document and the migrations match the code."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from app.context import ServiceContext
from app.db.models import Base
from app.openapi_export import OPENAPI_PATH, openapi_document


def test_openapi_document_is_current() -> None:
    written = json.loads(Path(OPENAPI_PATH).read_text())
    assert written == openapi_document(), (
        "openapi/openapi.json is out of date: run `make openapi` and commit the result"
    )


def test_every_operation_has_a_summary() -> None:
    document = openapi_document()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation.get("summary"), f"{method.upper()} {path} has no summary"


async def test_served_openapi_matches_the_document(client: httpx.AsyncClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    assert response.json()["paths"].keys() == openapi_document()["paths"].keys()


async def test_migrations_match_the_models(context: ServiceContext) -> None:
    def differences(connection: Connection) -> list[object]:
        migration = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(migration, Base.metadata))

    async with context.engine.connect() as connection:
        assert await connection.run_sync(differences) == []
