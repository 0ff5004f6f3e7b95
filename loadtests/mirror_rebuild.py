"""How fast the status mirror is refilled from PostgreSQL: `python -m loadtests.mirror_rebuild --cards 1000000`.

Creates a throwaway database on the PostgreSQL of DATABASE_URL's server (default the local one), puts N
active eCards of region 510000 in it by SQL of its own (persons, cards, eCards with a sealed profile of
a realistic size, 1 % with an annual pass), starts its own redis-server, and runs the rebuild the
workers and `ecard status rebuild` run, printing cards/s, the CPU per card of the rebuilding process and
of Redis, Redis memory and the machine's load. The persons' ciphertexts are stand-ins: every eCard has
its sealed profile, as after the first rebuild.
Nothing is left behind: the database is dropped and the redis-server stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import redis.asyncio as redis
from sqlalchemy.engine import make_url

from app.db.engine import create_engine, create_session_factory
from app.db.migrate import upgrade_to_head
from app.domain.cards.citizen_id import mask_citizen_id
from app.domain.cards.rebuild import Progress, Rebuilder
from app.domain.verification.disclosure import Profile, seal_profile
from app.security.keyring import load_keyring
from app.security.pii import PiiCipher
from app.settings import Settings
from app.stores.status_mirror import MirrorEntry, RedisStatusMirror
from tests.servers import RedisServer


class CountingStore(RedisStatusMirror):
    """The store with writes that only count (`--null-store`): what the database side alone costs."""

    async def mirror_many(self, entries: Sequence[MirrorEntry]) -> int:
        """Count, write nothing."""
        return len(entries)


DEV_KEYS = Path(__file__).resolve().parent.parent / "keys_dev"
SERVER = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

# Persons, cards and eCards from generate_series: ids and references from hashes of the row number, so
# eCard ids come in random order like uuid4's; sealed profiles are random bytes as long as a real one.
FILL_SQL = """
INSERT INTO regions (code, name, created_at) VALUES ('510000', '四川省', now());
INSERT INTO persons (id, region_code, citizen_id_index, citizen_id_encrypted, name_encrypted, created_at)
  SELECT md5('p' || i)::uuid, '510000', sha256(('c' || i)::bytea), sha256(('i' || i)::bytea),
         sha256(('n' || i)::bytea), now()
  FROM generate_series(1, $1) AS i;
INSERT INTO cards (id, person_id, region_code, card_number, state, created_at)
  SELECT md5('k' || i)::uuid, md5('p' || i)::uuid, '510000', 'S' || lpad(i::text, 8, '0'), 'active', now()
  FROM generate_series(1, $1) AS i;
INSERT INTO ecards (id, card_id, region_code, card_ref, state, activated_at, updated_at,
                    mirror_version, sealed_profile)
  SELECT md5('e' || i)::uuid, md5('k' || i)::uuid, '510000', substring(sha256(('r' || i)::bytea) from 1 for 16),
         'active', now(), now(), 1,
         CASE WHEN $2 THEN substring(sha512(('s' || i)::bytea) || sha512(('t' || i)::bytea) from 1 for $3) END
  FROM generate_series(1, $1) AS i;
INSERT INTO entitlements (id, ecard_id, kind, region_code, valid_from, valid_until, created_at)
  SELECT md5('a' || i)::uuid, md5('e' || i)::uuid, 'park_annual_pass', '510000', now(), now() + interval '300 days',
         now()
  FROM generate_series(1, $1, 100) AS i;
ANALYZE;
"""


def loadavg() -> str:
    """The machine's load, to read the figures by."""
    with open("/proc/loadavg") as file:
        return file.read().strip()


async def server_cpu(client: redis.Redis) -> float:
    """The redis-server's user and system CPU so far (INFO cpu), seconds."""
    cpu = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def profile_length(pii: PiiCipher) -> int:
    """How long a sealed profile of a three-character name is, in the format the code seals today."""
    profile = Profile("张三丰", mask_citizen_id("510104199001011234"), "510000")
    return len(seal_profile(pii, bytes(16), profile))


async def fill(url: str, cards: int, sealed: bool, profile_bytes: int) -> None:
    """Put the cards in the database (statements one by one: asyncpg runs one with parameters at a time)."""
    connection = await asyncpg.connect(_dsn(url))
    try:
        markers = (("$1", cards), ("$2", sealed), ("$3", profile_bytes))
        for statement in filter(str.strip, FILL_SQL.split(";")):
            uses = [value for marker, value in markers if marker in statement]
            await connection.execute(statement, *uses)
    finally:
        await connection.close()


async def measure(cards: int, sealed: bool, page: int, in_flight: int, null_store: bool) -> None:
    """Fill a throwaway database, rebuild into a redis-server of its own, print the figures, clean up."""
    name = f"ecard_rebuild_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_dsn(SERVER))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(SERVER).set(database=name).render_as_string(hide_password=False)
    server = RedisServer().start()
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        keyring = load_keyring(Settings(keys_dir=DEV_KEYS))
        pii = PiiCipher(keyring.data_key, keyring.index_key)
        started = time.monotonic()
        await fill(url, cards, sealed, profile_length(pii))
        print(f"{cards:,} eCards put in the database in {time.monotonic() - started:.1f} s")
        mirror = (CountingStore if null_store else RedisStatusMirror).from_url(server.url, "rebuild:")
        client = redis.Redis.from_url(server.url)
        before = (await client.info("memory"))["used_memory"]

        def progress(state: Progress) -> None:
            if state.done == state.total or state.done % (page * 20) == 0:
                print(f"  {state.done:,} done, {state.rate:,.0f}/s, ETA {state.eta or 0:.1f} s")

        rebuilder = Rebuilder(
            create_session_factory(engine),
            mirror,
            pii,
            "rebuild:",
            page=page,
            in_flight=in_flight,
            on_progress=progress,
        )
        redis_cpu = await server_cpu(client)
        cpu = time.process_time()
        report = await rebuilder.run()
        cpu = time.process_time() - cpu
        redis_cpu = await server_cpu(client) - redis_cpu
        after = (await client.info("memory"))["used_memory"]
        per_card = max(report.cards, 1)
        print(
            f"rebuild: {report.cards:,} eCards, {report.written:,} written, {report.profiles_sealed:,} profiles "
            f"sealed, {report.seconds:.2f} s, {report.rate:,.0f} eCards/s; this process's CPU "
            f"{cpu / per_card * 1e6:.1f} µs/card, Redis's {redis_cpu / per_card * 1e6:.1f} µs/card; Redis "
            f"{(after - before) / per_card:.0f} B/card; loadavg {loadavg()}"
        )
        await client.aclose()
        await mirror.close()
    finally:
        await engine.dispose()
        server.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    """Parse the arguments and measure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cards", type=int, default=1_000_000)
    parser.add_argument("--page", type=int, default=10_000)
    parser.add_argument("--in-flight", type=int, default=3)
    parser.add_argument("--null-store", action="store_true", help="writes that only count: the database side alone")
    options = parser.parse_args()
    asyncio.run(measure(options.cards, True, options.page, options.in_flight, options.null_store))


if __name__ == "__main__":
    main()
