"""Schemathesis runs openapi/openapi.json against the served app: no 5xx, and every answer is one the document states.

Every operation, on SQLite and PostgreSQL and the real Redis, with an admin's, a holder's and a gate's
credentials supplied per operation's security scheme, in three flavours: valid inputs, invalid ones, and
valid ones whose path names objects that exist (so they get past the 404). A fixed number of each,
derandomized, so a run repeats. The app is served by uvicorn on a thread of its own: its event loop owns
the database and Redis connections (schemathesis's ASGI transport starts a loop per request, and asyncpg
connections cannot cross loops), and the requests go over a real socket as a gate's would.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import URL

from app.asgi import create_app
from app.db.engine import create_engine, create_session_factory
from app.domain.audit.services import Actor
from app.domain.catalog.document import read_catalog, read_regions
from app.domain.catalog.services import DEFAULT_REGIONS_FILE, DEFAULT_SERVICES_FILE, load_catalog
from app.domain.operators.services import Role, create_operator
from app.server.openapi_export import OPENAPI_PATH
from tests import factories
from tests.conftest import BACKENDS, _drop_postgres_database, make_settings, migrated_database
from tests.servers import free_port

# Each answer: no 5xx; status, content type, headers and body as documented; a missing required
# header refused with a 4xx. Not `negative_data_rejection`: Litestar converts bodies leniently
# (msgspec strict=False), so e.g. a number for a date-time is taken as a Unix time, not refused.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    missing_required_header,
]
METHODS = {"get", "put", "post", "delete", "patch"}
# Examples per operation: valid inputs, invalid ones, and valid ones whose path names existing objects.
EXAMPLES = {"positive": 10, "negative": 8, "known": 10}


@dataclass
class Credentials:
    """Who the run speaks as: an admin of every region, an activated holder, a gate; and objects that exist.

    `known` holds real values of path parameters (a card, an organisation and its terminal, a region
    with a key, an import job, a device, a catalog service), so requests reach past the 404 of an
    unknown id. They are none of the credentials' own, so what the fuzzing does to them (a card
    cancelled, an API key replaced, a key revoked) leaves the credentials working.
    """

    operator: str
    holder: factories.Holder
    gate: factories.Gate
    known: dict[str, str]


@dataclass
class Tally:
    """What a run did, and the first failure of each kind (operation, check), with how to repeat it."""

    examples: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    answers: dict[str, Counter[int]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)
    no_invalid_input: list[str] = field(default_factory=list)
    auth_enforced: set[str] = field(default_factory=set)


@pytest.fixture(scope="module", params=BACKENDS)
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_url: URL
) -> AsyncIterator[str]:
    """A migrated database of the run's own: what schemathesis writes reaches no other test."""
    url = await migrated_database(request.param, tmp_path_factory.mktemp(f"fuzz-{request.param}"), postgres_url)
    yield url.render_as_string(hide_password=False)
    if request.param == "postgres":
        await _drop_postgres_database(postgres_url, url.database or "")


@pytest.fixture(scope="module")
def base_url(database: str, redis_url: str, redis_prefix: str) -> Iterator[str]:
    """The app under uvicorn on a thread, on its own database and Redis key prefix."""
    settings_ = make_settings(database, redis_url, f"{redis_prefix}fuzz-{uuid.uuid4().hex[:6]}:")
    port = free_port()
    config = uvicorn.Config(create_app(settings_), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="schemathesis-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
async def credentials(database: str, base_url: str) -> Credentials:
    """An admin (made in the database, as the CLI does), the regions and the shipped catalogue, a holder, a gate."""
    username, password = f"fuzz-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    engine = create_engine(database)
    try:
        async with create_session_factory(engine)() as session:
            await create_operator(
                session, Actor.command("test"), username=username, password=password, role=Role.ADMIN, regions=["*"]
            )
            catalog = read_catalog(DEFAULT_SERVICES_FILE)
            await load_catalog(session, Actor.command("test"), catalog, read_regions(DEFAULT_REGIONS_FILE, catalog))
    finally:
        await engine.dispose()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.post("/v1/operator/session", json={"username": username, "password": password})
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        for code, name in factories.REGIONS.items():
            response = await client.post(
                "/v1/operator/regions", json={"code": code, "name": name}, headers=factories.bearer(token)
            )
            assert response.status_code == 201, response.text
        holder = await factories.activated_holder(client, token, "510000")
        gate = await factories.new_gate(client, token, "510000", "transit", ["transit", "general"])
        known = await known_objects(client, token, holder)
    return Credentials(operator=token, holder=holder, gate=gate, known=known)


async def known_objects(client: httpx.AsyncClient, token: str, holder: factories.Holder) -> dict[str, str]:
    """Path parameter values naming objects that exist (none the credentials depend on)."""
    operator = factories.bearer(token)
    card = await factories.issue_card(client, token, "510000")
    library = await factories.new_gate(client, token, "500000", "library", ["library"])
    response = await client.post("/v1/operator/regions/440000/keys", headers=operator)
    assert response.status_code == 201, response.text
    devices = await client.get("/v1/holder/devices", auth=holder.auth)
    assert devices.status_code == 200, devices.text
    rows = f"region,citizen_id,name,card_number\r\n510000,{factories.citizen_id()},李四,{factories.card_number()}\r\n"
    job = await client.post("/v1/operator/imports", content=rows, headers={**operator, "Content-Type": "text/csv"})
    assert job.status_code == 202, job.text
    services = await client.get("/v1/catalog/services")
    assert services.status_code == 200, services.text
    return {
        "card_id": card["card"]["card_id"],
        "organisation_id": library.organisation_id,
        "terminal_id": library.terminal_id,
        "code": "440000",
        "kid": response.json()["kid"],
        "region": "510000",
        "job_id": job.json()["id"],
        "device_id": devices.json()[0]["id"],
        "service_code": services.json()[0]["code"],
    }


def load_schema(credentials: Credentials) -> schemathesis.BaseSchema:
    """The exported document, with each security scheme's credential (a holder's DPoP headers are made per
    request: `sign_as_holder`)."""
    config = schemathesis.Config.from_dict(
        {
            "auth": {
                "openapi": {
                    "operatorToken": {"bearer": credentials.operator},
                    "terminalApiKey": {"api_key": credentials.gate.api_key},
                }
            }
        }
    )
    return schemathesis.openapi.from_dict(json.loads(Path(OPENAPI_PATH).read_text()), config=config)


def sign_as_holder(case: Case, base_url: str, holder: factories.Holder) -> None:
    """The holder's DPoP headers for this one request (a proof is good once, for its method and URI), where the
    operation's security asks for them: the access token too on every holder call, the proof alone on
    activation and refresh."""
    schemes = {name for requirement in case.operation.definition.raw.get("security", []) for name in requirement}
    if "dpopProof" not in schemes:
        return
    token = holder.access_token if "holderToken" in schemes else None
    headers = dict(case.headers or {})
    headers["DPoP"] = holder.key.proof(case.method.upper(), base_url + case.formatted_path, token)
    if token is not None:
        headers["Authorization"] = f"DPoP {token}"
    case.headers = headers


def known_path_parameters(operation: APIOperation, known: dict[str, str]) -> dict[str, str]:
    """The operation's path parameters that name an existing object ({code} is a service in the catalog)."""
    names = [parameter.name for parameter in operation.path_parameters]
    values = {**known, "code": known["service_code"]} if operation.path.startswith("/v1/catalog/") else known
    return {name: values[name] for name in names if name in values}


def exercise(
    operation: APIOperation,
    flavour: str,
    base_url: str,
    session: requests.Session,
    tally: Tally,
    holder: factories.Holder,
    **fixed: Any,
) -> None:
    """EXAMPLES[flavour] requests of one operation, each answer checked; failures are tallied, not raised."""
    label = f"{operation.method.upper()} {operation.path}"
    mode = GenerationMode.NEGATIVE if flavour == "negative" else GenerationMode.POSITIVE

    @settings(
        max_examples=EXAMPLES[flavour],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    def run(case: Case) -> None:
        sign_as_holder(case, base_url, holder)
        response = case.call(base_url=base_url, session=session, timeout=30)
        tally.examples[label] += 1
        tally.statuses[f"{response.status_code // 100}xx"] += 1
        tally.answers.setdefault(f"{label} [{flavour}]", Counter())[response.status_code] += 1
        # The first 2xx of an operation with credentials is sent again without them and with made-up
        # ones, which must be refused (schemathesis's own runner probes once per operation too).
        probe = response.status_code < 300 and label not in tally.auth_enforced
        checks = [*CHECKS, ignored_auth] if probe else CHECKS
        tally.checks += len(checks)
        try:
            case.validate_response(response, checks=checks, transport_kwargs={"base_url": base_url, "timeout": 30})
        except FailureGroup as group:
            titles = ", ".join(sorted({failure.title for failure in group.exceptions}))
            tally.failures.setdefault((label, titles), str(group))
        else:
            if probe:
                tally.auth_enforced.add(label)

    try:
        run()
    except Unsatisfiable:
        # No input of the operation can be made invalid (it takes none): nothing negative to send.
        assert mode is GenerationMode.NEGATIVE, label
        tally.no_invalid_input.append(label)


def test_every_operation_answers_as_documented(base_url: str, credentials: Credentials) -> None:
    schema = load_schema(credentials)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(set(item) & METHODS) for item in schema.raw_schema["paths"].values())
    tally = Tally()
    every_known: list[str] = []  # operations whose every path parameter names an existing object
    started = time.monotonic()
    with requests.Session() as session:
        for flavour in ("positive", "negative"):
            for operation in operations:
                exercise(operation, flavour, base_url, session, tally, credentials.holder)
        for operation in operations:
            if known := known_path_parameters(operation, credentials.known):
                exercise(operation, "known", base_url, session, tally, credentials.holder, path_parameters=known)
                if len(known) == len(operation.path_parameters):
                    every_known.append(f"{operation.method.upper()} {operation.path} [known]")
    elapsed = time.monotonic() - started
    print(
        f"\nschemathesis: {len(operations)} operations, {sum(tally.examples.values())} examples, "
        f"{tally.checks} checks, answers {dict(sorted(tally.statuses.items()))}, "
        f"{len(tally.failures)} failures, {len(tally.no_invalid_input)} operations without an input to make invalid, "
        f"{elapsed:.1f} s"
    )
    for label, answers in tally.answers.items():
        print(f"  {label}: {dict(sorted(answers.items()))}")
    assert set(tally.examples) == {f"{op.method.upper()} {op.path}" for op in operations}
    assert len(every_known) >= 25
    assert not [label for label in every_known if set(tally.answers[label]) == {404}], "known objects not found"
    assert not tally.failures, "\n\n".join(f"{label}: {text}" for (label, _titles), text in tally.failures.items())
