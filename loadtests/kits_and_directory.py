"""Offline kit build and terminal directory figures at provincial size, on a PostgreSQL database of their own.

    python -m loadtests.kits_and_directory --server postgresql://postgres@127.0.0.1:5432/test \
        --ecards 10000000 --non-active 0.01 --terminals 100000

Creates the database `ecard_kits_figures` (or --database; dropped first if it exists, and at the end unless --keep),
migrates it, registers region 510000, and by plain SQL (generate_series, the fastest correct path
for figures, not the import path) puts in N eCards of which the given share is suspended or revoked
(at random) and T terminals in T/100 organisations. The eCards' foreign key to cards is dropped in
this database only: the build reads neither cards nor persons. Then it measures, with the service's
own code: the kit build (wall time, stored size; it reads no eCard since issue 13), a second worker
serving the stored kit, the directory's start-up (time, tracemalloc, RSS) and one poll with nothing
changed and with 10 changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
import tracemalloc
from dataclasses import replace

import asyncpg
from sqlalchemy import text, update
from sqlalchemy.engine import make_url

from app.db.migrate import upgrade_to_head
from app.db.models import OfflineKitBuild, Terminal
from app.domain.audit.services import Actor
from app.domain.regions.services import register_region
from app.domain.verification.directory import directory_counter, next_directory_version
from app.domain.verification.offline import OfflineKits
from app.server.context import ServiceContext
from app.settings import Settings

DATABASE = "ecard_kits_figures"
REGION = "510000"


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _admin(server: str, statement: str) -> None:
    connection = await asyncpg.connect(server)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def fill(context: ServiceContext, ecards: int, share: float, terminals: int) -> dict[str, float]:
    """Region, eCards and terminals by SQL; seconds each took."""
    took: dict[str, float] = {}
    async with context.sessions() as session:
        await register_region(session, context.pii, Actor.command("figures"), REGION, "四川省")
    async with context.engine.begin() as connection:
        await connection.execute(text("ALTER TABLE ecards DROP CONSTRAINT fk_ecards_card_id_cards"))
        started = time.perf_counter()
        step = 1_000_000
        for first in range(0, ecards, step):
            await connection.execute(
                text(
                    "INSERT INTO ecards (id, card_id, region_code, card_ref, state, updated_at,"
                    " pin_attempts, mirror_version)"
                    " SELECT gen_random_uuid(), gen_random_uuid(), :region, decode(md5(i::text), 'hex'),"
                    " CASE WHEN r < CAST(:share AS float8) / 2 THEN 'suspended'"
                    " WHEN r < CAST(:share AS float8) THEN 'revoked' ELSE 'active' END, now(), 0, 0"
                    " FROM (SELECT i, random() AS r"
                    " FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i) AS s"
                ),
                {"region": REGION, "share": share, "first": first, "last": min(first + step, ecards) - 1},
            )
        took["ecards_s"] = time.perf_counter() - started
        started = time.perf_counter()
        await connection.execute(
            text(
                "INSERT INTO verifier_organisations (id, name, business_type, region_code, created_at, enabled,"
                " directory_version) SELECT gen_random_uuid(), 'org-' || i, 'transit', :region, now(), true, 0"
                " FROM generate_series(1, CAST(:n AS int)) AS i"
            ),
            {"region": REGION, "n": max(1, terminals // 100)},
        )
        await connection.execute(
            text(
                "INSERT INTO terminals (id, organisation_id, name, allowed_purposes, api_key_hash, enabled,"
                " created_at, rate_per_minute, rate_burst, directory_version)"
                " SELECT gen_random_uuid(), o.id, 'gate-' || i, '[\"transit\", \"general\"]',"
                " sha256(i::text::bytea), true, now(), 120, 30, 0"
                " FROM generate_series(1, CAST(:n AS int)) AS i"
                " JOIN (SELECT id, row_number() OVER () - 1 AS k FROM verifier_organisations) AS o"
                " ON o.k = i % CAST(:orgs AS int)"
            ),
            {"n": terminals, "orgs": max(1, terminals // 100)},
        )
        took["terminals_s"] = time.perf_counter() - started
    await _vacuum(context)
    return took


async def _vacuum(context: ServiceContext) -> None:
    """VACUUM ANALYZE (outside a transaction): statistics, and the visibility map index-only scans need."""
    async with context.engine.connect() as connection:
        connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.execute(text("VACUUM ANALYZE ecards"))
        await connection.execute(text("VACUUM ANALYZE terminals"))
        await connection.execute(text("VACUUM ANALYZE verifier_organisations"))


async def kit_figures(context: ServiceContext, ecards: int) -> dict[str, object]:
    """The build's plan and cost, its size, and what a second worker pays to serve it."""
    # Kits name no eCard since codes are unlinkable (issue 13): the build reads no eCard, whatever N is.
    await context.directory.reload()
    builds, build_cpu = [], []
    for _ in range(3):
        kits = OfflineKits(context.settings.status_list_ttl, context.settings.status_list_lifetime)
        async with context.sessions() as session:
            await kits.mark_due(session, REGION)
            started, cpu = time.perf_counter(), time.process_time()
            kit = await kits.kit(session, context.directory.keys, REGION)
            builds.append(time.perf_counter() - started)
            build_cpu.append(time.process_time() - cpu)
    async with context.sessions() as session:
        row = await session.get(OfflineKitBuild, REGION)
        assert row is not None and row.document is not None
        stored = {"document_bytes": len(row.document), "entries": row.entries, "build_ms_recorded": row.build_ms}
    status_list_bytes = len(kit.document["status_list"]) * 3 // 4
    serve = []
    for _ in range(20):
        other = OfflineKits(context.settings.status_list_ttl, context.settings.status_list_lifetime)
        async with context.sessions() as session:
            started = time.perf_counter()
            await other.kit(session, context.directory.keys, REGION)
            serve.append(time.perf_counter() - started)
    held = []
    for _ in range(20):
        async with context.sessions() as session:
            started = time.perf_counter()
            await other.kit(session, context.directory.keys, REGION)
            held.append(time.perf_counter() - started)
    return {
        "build_s": builds,
        "build_cpu_s_of_this_process": build_cpu,
        **stored,
        "status_list_token_bytes": status_list_bytes,
        "first_serve_by_another_worker_ms_median": statistics.median(serve) * 1000,
        "serve_held_copy_us_median": statistics.median(held) * 1e6,
    }


async def directory_figures(settings: Settings) -> dict[str, object]:
    """Start-up time and memory of one worker's directory, and one poll with 0 and with 10 changes."""
    context = ServiceContext.build(settings)
    try:
        async with context.sessions() as session:  # warm the connection pool, read no terminal
            await directory_counter(session)
        rss_before = _rss_mib()
        started, cpu = time.perf_counter(), time.process_time()
        await context.directory.reload()
        startup, startup_cpu = time.perf_counter() - started, time.process_time() - cpu
        rss_after = _rss_mib()
        tracemalloc.start()  # a second load, traced (tracing slows it): what the directory holds
        await context.directory.reload()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        idle, idle_cpu = [], []
        for _ in range(200):
            started, cpu = time.perf_counter(), time.process_time()
            assert await context.directory.refresh() == 0
            idle.append(time.perf_counter() - started)
            idle_cpu.append(time.process_time() - cpu)
        ten, ten_cpu = [], []
        for _ in range(20):
            async with context.sessions() as session:
                ids = list(await session.scalars(text("SELECT id FROM terminals ORDER BY random() LIMIT 10")))
                version = await next_directory_version(session)
                await session.execute(
                    update(Terminal)
                    .where(Terminal.id.in_(ids))
                    .values(rate_per_minute=Terminal.rate_per_minute + 1, directory_version=version)
                )
                await session.commit()
            started, cpu = time.perf_counter(), time.process_time()
            assert await context.directory.refresh() == 10
            ten.append(time.perf_counter() - started)
            ten_cpu.append(time.process_time() - cpu)
        return {
            "terminals": len(context.directory),
            "startup_s": startup,
            "startup_cpu_s": startup_cpu,
            "tracemalloc_retained_mib": current / 2**20,
            "tracemalloc_peak_mib": peak / 2**20,
            "rss_growth_mib": rss_after - rss_before,
            "poll_nothing_changed_us_median": statistics.median(idle) * 1e6,
            "poll_nothing_changed_us_p95": sorted(idle)[int(len(idle) * 0.95)] * 1e6,
            "poll_nothing_changed_cpu_us_median": statistics.median(idle_cpu) * 1e6,
            "poll_10_changes_ms_median": statistics.median(ten) * 1000,
            "poll_10_changes_ms_max": max(ten) * 1000,
            "poll_10_changes_cpu_ms_median": statistics.median(ten_cpu) * 1000,
        }
    finally:
        await context.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--ecards", type=int, default=10_000_000)
    parser.add_argument("--non-active", type=float, default=0.01)
    parser.add_argument("--terminals", type=int, default=100_000)
    parser.add_argument("--database", default=DATABASE, help="the database this run creates and drops")
    parser.add_argument("--keep", action="store_true", help="leave the database for a look")
    options = parser.parse_args()
    await _admin(options.server, f"DROP DATABASE IF EXISTS {options.database}")
    await _admin(options.server, f"CREATE DATABASE {options.database}")
    url = make_url(options.server).set(drivername="postgresql+asyncpg", database=options.database)
    settings = replace(Settings(), database_url=url.render_as_string(hide_password=False), redis_url="")
    context = ServiceContext.build(settings)
    try:
        await upgrade_to_head(context.engine)
        filled = await fill(context, options.ecards, options.non_active, options.terminals)
        figures: dict[str, object] = {"fill": filled}
        async with context.sessions() as session:
            size = await session.scalar(text("SELECT pg_size_pretty(pg_total_relation_size('ecards'))"))
        figures["ecards_table_with_indexes"] = size
        figures["kit"] = await kit_figures(context, options.ecards)
    finally:
        await context.close()
    figures["directory"] = await directory_figures(settings)
    if not options.keep:
        await _admin(options.server, f"DROP DATABASE IF EXISTS {options.database}")
    print(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    asyncio.run(main())
