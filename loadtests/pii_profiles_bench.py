"""Personal data at rest under both crypto profiles: what a field, an index and a re-keyed row cost.

    python -m loadtests.pii_profiles_bench [--rows 5000] [--postgres postgresql+asyncpg://…/test]

Prints the calibration line first (loadtests/bench/calibration.py), then the µs per operation of a
citizen ID's encryption and decryption (AES-256-GCM vs SM4-GCM), its blind index (HMAC-SHA256 vs
HMAC-SM3) and a dual-index period's look-up indexes (both), each the best of 5 rounds; then
`rekey_pii` moving --rows persons from the international to the national scheme on SQLite (a
temporary file) and, with --postgres, in a throwaway database made on that server and dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
from sqlalchemy import insert
from sqlalchemy.engine import make_url

from app.db.clock import utcnow
from app.db.engine import create_engine, create_session_factory
from app.db.migrate import upgrade_to_head
from app.db.models import Person, Region
from app.domain.cards.rekey import rekey_pii
from app.domain.cards.services import CITIZEN_ID_FIELD, NAME_FIELD
from app.security.keyring import read_keyring
from app.security.pii import INTERNATIONAL, NATIONAL
from app.settings import DEV_KEYS_DIR
from loadtests.bench.calibration import calibration_line

KEYRING = read_keyring(DEV_KEYS_DIR)
INTL, NAT = KEYRING.pii(INTERNATIONAL), KEYRING.pii(NATIONAL)
CITIZEN_ID = "11010519491231002X"


def best_us(operation: Callable[[], object], count: int = 20_000, rounds: int = 5) -> float:
    """µs per call of the fastest of rounds batches."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            operation()
        best = min(best, (time.perf_counter() - start) / count * 1e6)
    return best


def primitives() -> None:
    aes, sm4 = INTL.encrypt(CITIZEN_ID, CITIZEN_ID_FIELD), NAT.encrypt(CITIZEN_ID, CITIZEN_ID_FIELD)
    print("µs per operation (18-character citizen ID), best of 5 rounds of 20,000:")
    print(f"  encrypt    AES-256-GCM {best_us(lambda: INTL.encrypt(CITIZEN_ID, CITIZEN_ID_FIELD)):6.2f}"
          f"   SM4-GCM {best_us(lambda: NAT.encrypt(CITIZEN_ID, CITIZEN_ID_FIELD)):6.2f}")  # fmt: skip
    print(f"  decrypt    AES-256-GCM {best_us(lambda: NAT.decrypt(aes, CITIZEN_ID_FIELD)):6.2f}"
          f"   SM4-GCM {best_us(lambda: NAT.decrypt(sm4, CITIZEN_ID_FIELD)):6.2f}")  # fmt: skip
    print(
          f"  index      HMAC-SHA256 {best_us(lambda: INTL.blind_index(CITIZEN_ID, CITIZEN_ID_FIELD)):6.2f}"
          f"   HMAC-SM3 {best_us(lambda: NAT.blind_index(CITIZEN_ID, CITIZEN_ID_FIELD)):6.2f}"
          f"   both (dual-index look-up) {best_us(lambda: NAT.blind_indexes(CITIZEN_ID, CITIZEN_ID_FIELD)):6.2f}"
    )  # fmt: skip


async def rekey_rows(database_url: str, rows: int) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        sessions = create_session_factory(engine)
        now = utcnow()
        async with sessions() as session:
            session.add(Region(code="510000", name="四川省", created_at=now))
            await session.flush()
            for first in range(0, rows, 1000):
                values = []
                for n in range(first, min(rows, first + 1000)):
                    citizen_id = f"51000019900101{n:04d}"[:17] + "X"
                    values.append(
                        {
                            "id": uuid.uuid4(), "region_code": "510000", "created_at": now,
                            "citizen_id_index": INTL.blind_index(f"{citizen_id}{n}", CITIZEN_ID_FIELD),
                            "citizen_id_encrypted": INTL.encrypt(f"{citizen_id}{n}", CITIZEN_ID_FIELD),
                            "name_encrypted": INTL.encrypt(f"测试{n}", NAME_FIELD),
                        }
                    )  # fmt: skip
                await session.execute(insert(Person), values)
            await session.commit()
        start_cpu, start = time.process_time(), time.perf_counter()
        report = await rekey_pii(sessions, NAT, batch=1000)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        backend = make_url(database_url).get_backend_name()
        print(
            f"  {backend}: {report.persons.rewritten} of {report.persons.scanned} persons rewritten in {seconds:.2f} s"
            f" ({report.persons.rewritten / seconds:,.0f} rows/s; this process's CPU {cpu / rows * 1e6:.0f} µs a row),"
            f" remaining {report.remaining}"
        )
    finally:
        await engine.dispose()


async def main(rows: int, postgres: str | None) -> None:
    print(f"rekey-pii, {rows} persons international → national, batches of 1,000:")
    with tempfile.TemporaryDirectory() as directory:
        await rekey_rows(f"sqlite+aiosqlite:///{Path(directory) / 'bench.sqlite3'}", rows)
    if postgres:
        server = make_url(postgres)
        name = f"ecard_bench_{uuid.uuid4().hex[:12]}"
        dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
        connection = await asyncpg.connect(dsn)
        await connection.execute(f'CREATE DATABASE "{name}"')
        try:
            await rekey_rows(server.set(database=name).render_as_string(hide_password=False), rows)
        finally:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await connection.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m loadtests.pii_profiles_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL"))
    arguments = parser.parse_args()
    print(calibration_line())
    primitives()
    asyncio.run(main(arguments.rows, arguments.postgres))
