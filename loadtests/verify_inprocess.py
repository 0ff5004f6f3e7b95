"""The verify fast path's CPU per scan with no socket: the ASGI app called directly, in one process.

    .venv/bin/python -m loadtests.verify_inprocess [--scans 4000] [--redis-url URL] [--profile FILE]

It prepares a region, six gates and ten activated cards through the API (SQLite in a temporary
directory; Redis if given, else the in-process store), issues fresh credentials, then calls the app
for each `POST /v1/verify` and reports `time.process_time` per scan after a tenth of warm-up.
Without uvicorn, httptools and the socket in the way (60 to 70 µs of a scan in `make bench`), a few
microseconds of the verify path itself show above the noise: that is what it is for, for instance
to walk commits (`git checkout` each one and run this from the tree; the imports fall back to the
layout before app/server/). `--profile FILE` writes a cProfile of the measured scans.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from app.asgi import create_app
from app.db.engine import create_engine
from app.db.migrate import upgrade_to_head
from app.domain.audit.services import Actor
from app.domain.operators.services import Role, create_operator
from app.settings import Settings
from tests import factories

try:
    from app.server.context import STATE_KEY
    from app.server.plugin import EcardPlugin
except ImportError:  # trees before app/server/ (commit 95df059)
    from app.context import STATE_KEY  # type: ignore[no-redef]
    from app.plugin import EcardPlugin  # type: ignore[no-redef]

REGION = "510000"


async def _prepare(client: httpx.AsyncClient, context: Any, scans: int) -> tuple[list[bytes], list[list[Any]]]:
    """Request bodies of fresh credentials, and the header lists of gates that may scan them all."""
    username, password = f"op-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    async with context.sessions() as session:
        await create_operator(
            session, Actor.command("bench"), username=username, password=password, role=Role.ADMIN, regions=["*"]
        )
    signed_in = await client.post("/v1/operator/session", json={"username": username, "password": password})
    token = signed_in.json()["access_token"]
    await client.post("/v1/operator/regions", json={"code": REGION, "name": "Sichuan"}, headers=factories.bearer(token))
    organisation = await client.post(
        "/v1/operator/verifier-organisations",
        json={"name": f"org-{uuid.uuid4().hex[:6]}", "business_type": "transit", "region": REGION},
        headers=factories.bearer(token),
    )
    # Six gates at their highest rate: a thousand scans a second each keeps every scan under budget.
    gates = [
        await factories.new_terminal(
            client, token, organisation.json()["id"], ["transit"], rate_per_minute=60_000, rate_burst=1000
        )
        for _ in range(6)
    ]
    holders = [await factories.activated_holder(client, token, REGION) for _ in range(10)]
    credentials: list[str] = []
    while len(credentials) < scans:
        for holder in holders:
            credentials += await factories.credentials(client, holder, "transit", 20)
    bodies = [json.dumps({"credential": text}).encode() for text in credentials[:scans]]
    headers = [
        [(name.lower().encode(), value.encode()) for name, value in gate.headers.items()]
        + [(b"content-type", b"application/json")]
        for gate in gates
    ]
    return bodies, headers


async def run(scans: int, redis_url: str, profile: str) -> None:
    """Prepare, warm up, measure; print one line."""
    database_url = f"sqlite+aiosqlite:///{tempfile.mkdtemp()}/ecard.sqlite3"
    engine = create_engine(database_url)
    await upgrade_to_head(engine)
    await engine.dispose()
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=f"bench-inprocess-{uuid.uuid4().hex[:8]}:",
        keys_dir=Path("keys_dev"),
        credential_lifetime=300,
    )
    app = create_app(settings)
    async with app.plugins.get(EcardPlugin).lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            bodies, gate_headers = await _prepare(client, app.state[STATE_KEY], scans)
        statuses: dict[int, int] = {}

        async def scan(index: int, body: bytes) -> None:
            headers = [*gate_headers[index % len(gate_headers)], (b"content-length", str(len(body)).encode())]
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                "scheme": "http", "path": "/v1/verify", "raw_path": b"/v1/verify", "query_string": b"",
                "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
                "server": ("127.0.0.1", 8000), "state": {},
            }  # fmt: skip
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            sent: list[dict[str, Any]] = []

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop()
                await asyncio.Event().wait()  # the client never disconnects
                raise AssertionError

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            await app(scope, receive, send)
            statuses[sent[0]["status"]] = statuses.get(sent[0]["status"], 0) + 1

        warm = len(bodies) // 10
        for index, body in enumerate(bodies[:warm]):
            await scan(index, body)
        gc.collect()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        started = time.process_time()
        for index, body in enumerate(bodies[warm:]):
            await scan(index, body)
        spent = time.process_time() - started
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
    measured = len(bodies) - warm
    print(
        f"{Path.cwd().name}: {measured} scans, {1e6 * spent / measured:.1f} µs CPU a scan "
        f"(statuses of all {len(bodies)}: {dict(sorted(statuses.items()))})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=4000, help="credentials to verify (a tenth warms up)")
    parser.add_argument("--redis-url", default="", help="Redis for the status mirror (default: in-process store)")
    parser.add_argument("--profile", default="", help="write a cProfile of the measured scans to this file")
    args = parser.parse_args()
    asyncio.run(run(args.scans, args.redis_url, args.profile))


if __name__ == "__main__":
    main()
