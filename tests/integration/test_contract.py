"""The written-down contract: the exported OpenAPI document and the migrations match the code."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from app.db.models import Base
from app.server.context import ServiceContext
from app.server.openapi_export import OPENAPI_PATH, openapi_document

METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemBody"}}}
# Parameter names that would carry personal data (card number, citizen ID, name, phone) into a URL.
PERSONAL = re.compile(
    r"card_?n(umbe)?r|citizen|id_?(card|number)|(^|_)(full_?|holder_?|person_?)?name($|_)|phone|mobile"
)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document()


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def schemas_reachable(document: dict[str, Any], schema: Any) -> Iterator[dict[str, Any]]:
    """Every component schema a schema refers to, itself included, each once."""
    seen: set[str] = set()
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in seen:
                seen.add(ref)
                component = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
                yield component
                todo.append(component)
            todo.extend(value for key, value in node.items() if key != "$ref")


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


def test_every_error_answer_is_documented_as_a_problem(document: dict[str, Any]) -> None:
    """4xx and 5xx answers are RFC 9457 problems; Litestar's own 400 (validation) is documented as one too."""
    for path, method, operation in operations(document):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert response.get("content") == PROBLEM, f"{method.upper()} {path} {status}"
        if operation.get("parameters") or "requestBody" in operation:
            assert "400" in operation["responses"], f"{method.upper()} {path} takes input but documents no 400"


def test_every_body_documents_its_413_and_415_every_idempotency_key_its_422(document: dict[str, Any]) -> None:
    for path, method, operation in operations(document):
        body_types = operation.get("requestBody", {}).get("content", {})
        if body_types:
            assert "413" in operation["responses"], f"{method.upper()} {path}"
        if "application/json" in body_types:
            assert "415" in operation["responses"], f"{method.upper()} {path}"
        if any(parameter["name"] == "Idempotency-Key" for parameter in operation.get("parameters", [])):
            assert "422" in operation["responses"], f"{method.upper()} {path}"


def test_request_body_schemas_refuse_unknown_fields(document: dict[str, Any]) -> None:
    """The bodies are WireModels (forbid_unknown_fields): their schemas, and those nested in them, say so."""
    checked = 0
    for path, method, operation in operations(document):
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is None:
            continue
        for schema in schemas_reachable(document, body["schema"]):
            if schema.get("type") == "object" and "properties" in schema:
                assert schema.get("additionalProperties") is False, f"{method.upper()} {path}: {schema['title']}"
                checked += 1
    assert checked >= 30


def test_idempotency_key_is_documented_as_required(document: dict[str, Any]) -> None:
    paths = ["/v1/terminal/fares", "/v1/terminal/medical-settlements", "/v1/operator/subsidy-batches"]
    keyed = {
        path
        for path, _method, operation in operations(document)
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "Idempotency-Key"
    }
    assert set(paths) <= keyed
    for path in keyed:
        [parameter] = [p for p in document["paths"][path]["post"]["parameters"] if p["name"] == "Idempotency-Key"]
        assert parameter["in"] == "header" and parameter["required"] is True, path


def test_cross_field_rules_are_stated(document: dict[str, Any]) -> None:
    search = document["components"]["schemas"]["CardSearch"]
    assert (search["minProperties"], search["maxProperties"], search["additionalProperties"]) == (1, 1, False)
    assert set(search["properties"]) == {"card_number", "citizen_id"} and not search.get("required")
    assert "exactly one" in search["description"]
    counts = document["paths"]["/v1/operator/verifier-organisations/{organisation_id}/verification-counts"]["get"]
    since = next(p for p in counts["parameters"] if p["name"] == "since")
    assert "before `until`" in since["description"]


def test_no_personal_data_in_paths_or_queries(document: dict[str, Any]) -> None:
    """Card numbers, citizen IDs, names and phone numbers go in bodies: URLs end up in logs and histories."""
    assert PERSONAL.search("card_number") and PERSONAL.search("citizen_id") and PERSONAL.search("phone")
    assert PERSONAL.search("name") and PERSONAL.search("holder_name") and not PERSONAL.search("purpose")
    for path, method, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["in"] in ("path", "query", "cookie"):
                assert not PERSONAL.search(parameter["name"].lower()), f"{method.upper()} {path}: {parameter['name']}"
        assert not PERSONAL.search(path.lower()), path


def _concrete(path: str) -> str:
    """A URL of the path: a UUID for every `…_id` parameter, a region code for the others."""
    return re.sub(r"\{(\w+)\}", lambda m: str(uuid.uuid4()) if m[1].endswith("_id") else "510000", path)


async def test_options_lists_every_method_of_the_path(client: httpx.AsyncClient, document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        response = await client.options(_concrete(path))
        assert response.status_code == 204, path
        allowed = {method.strip().lower() for method in response.headers["allow"].split(",")}
        assert allowed == (set(item) & METHODS) | {"options"}, path


def test_no_content_answers_document_no_body(document: dict[str, Any]) -> None:
    """A 204 has no body (RFC 9110): documenting one of `null` made schemathesis expect JSON."""
    answers = [op["responses"]["204"] for _p, _m, op in operations(document) if "204" in op["responses"]]
    assert len(answers) >= 5 and not [answer for answer in answers if "content" in answer]


async def test_metrics_answer_in_the_documented_text_format_with_one_charset(
    client: httpx.AsyncClient, document: dict[str, Any]
) -> None:
    response = await client.get("/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain; version=") and content_type.count("charset") == 1, content_type
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
