"""Prepare a Locust run through the public API and write its fixture (see loadtests/README.md).

    python -m loadtests.prepare --host http://127.0.0.1:8000 --username admin --gates 16 --out fixture.json

Signs in as an admin operator, registers the region (if needed), a transit organisation with one
terminal per simulated gate (each allowed twice its gate's scan rate), a hospital with one
terminal per checkout desk, and issues and activates the cards of the holders, the patients and
the credential supply. The operator's password comes from --password or $ECARD_LOADTEST_PASSWORD.
`python -m loadtests.headless` does all of this itself against a service it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from crypto.keys import b64url, b64url_decode
from loadtests.bench import BenchError
from loadtests.bench.preparation import (
    REGION,
    REGION_NAME,
    Holder,
    activate_device,
    citizen_id,
    expect,
    new_device_key,
    sanity_check,
)
from loadtests.scenarios.fixture import FIXTURE_VERSION, Fixture, HolderEntry, Terminal, write_fixture

# A gate's terminal allows this many times the gate's own scan rate: the limit is applied on every
# scan but never reached by a well-behaved gate.
RATE_HEADROOM = 2.0
MIN_BURST = 10
MAX_RATE_PER_MINUTE = 60_000
MAX_BURST = 1_000
# Requests in flight while preparing.
PREPARE_CONCURRENCY = 8
# A new terminal reaches every worker's directory through Redis pub/sub; wait this long at most.
TERMINAL_READY_TIMEOUT = 10.0
PROBE_CREDENTIAL = "EC1:LOADTEST-PROBE"
PATIENT_NAMES = ("张三", "李四", "王芳", "刘洋", "陈静", "杨磊")
HOLDER_NAME = "张三"

T = TypeVar("T")


@dataclass(frozen=True)
class PrepareSpec:
    """How many of each thing a run needs."""

    gates: int
    gate_rate: float
    hospitals: int
    holders: int
    patients: int
    supply_holders: int


def gate_limits(gate_rate: float) -> tuple[int, int]:
    """(rate_per_minute, rate_burst) of a terminal whose gate scans gate_rate times a second."""
    per_minute = min(MAX_RATE_PER_MINUTE, max(1, math.ceil(gate_rate * 60 * RATE_HEADROOM)))
    burst = min(MAX_BURST, max(MIN_BURST, math.ceil(gate_rate * RATE_HEADROOM * 2)))
    return per_minute, burst


async def _bounded(jobs: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the jobs, PREPARE_CONCURRENCY at a time, results in order."""
    gate = asyncio.Semaphore(PREPARE_CONCURRENCY)

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def _organisation(client: httpx.AsyncClient, auth: dict[str, str], name: str, business_type: str) -> str:
    body = {"name": name, "business_type": business_type, "region": REGION}
    created = expect(await client.post("/v1/operator/verifier-organisations", json=body, headers=auth), 201)
    return str(created["id"])


async def _terminal(
    client: httpx.AsyncClient,
    auth: dict[str, str],
    organisation_id: str,
    name: str,
    purpose: str,
    rate: tuple[int, int],
) -> Terminal:
    body = {"name": name, "allowed_purposes": [purpose], "rate_per_minute": rate[0], "rate_burst": rate[1]}
    path = f"/v1/operator/verifier-organisations/{organisation_id}/terminals"
    created = expect(await client.post(path, json=body, headers=auth), 201)
    return Terminal(
        terminal_id=str(created["terminal"]["id"]),
        organisation_id=organisation_id,
        api_key=str(created["api_key"]),
        rate_per_minute=rate[0],
        rate_burst=rate[1],
    )


async def _activated_card(client: httpx.AsyncClient, auth: dict[str, str], name: str) -> HolderEntry:
    number = "L" + "".join(secrets.choice("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(8))
    card = {"region": REGION, "citizen_id": citizen_id(REGION), "name": name, "card_number": number}
    issued = expect(await client.post("/v1/operator/cards", json=card, headers=auth), 201)
    device = new_device_key()
    session = await activate_device(
        client, issued["card"]["card_number"], issued["activation_code"], device, device_name="loadtest phone"
    )
    return HolderEntry(
        card_number=str(issued["card"]["card_number"]),
        access_token=str(session["access_token"]),
        refresh_token=str(session["refresh_token"]),
        issued_at=time.time(),
        expires_in=float(session["expires_in"]),
        name=name,
        device_key=b64url(device),
    )


async def _wait_known(client: httpx.AsyncClient, terminal: Terminal) -> None:
    """Wait until the service knows the terminal: a scan of junk is answered (rejected), not refused (401)."""
    deadline = time.monotonic() + TERMINAL_READY_TIMEOUT
    headers = {"X-Api-Key": terminal.api_key}
    while True:
        response = await client.post("/v1/verify", json={"credential": PROBE_CREDENTIAL}, headers=headers)
        if response.status_code != 401:
            answer = expect(response, 200)
            if answer.get("result") != "rejected":
                raise BenchError(f"terminal probe: junk was answered {answer}")
            return
        if time.monotonic() > deadline:
            raise BenchError(f"terminal {terminal.terminal_id} still unknown after {TERMINAL_READY_TIMEOUT:.0f} s")
        await asyncio.sleep(0.2)


async def prepare(client: httpx.AsyncClient, username: str, password: str, spec: PrepareSpec) -> Fixture:
    """Make everything the spec asks for through the public API; the fixture describing it."""
    signed_in = expect(
        await client.post("/v1/operator/session", json={"username": username, "password": password}), 200
    )
    auth = {"Authorization": f"Bearer {signed_in['access_token']}"}
    region = {"code": REGION, "name": REGION_NAME}
    expect(await client.post("/v1/operator/regions", json=region, headers=auth), 201, 409)
    tag = secrets.token_hex(3)
    metro = await _organisation(client, auth, f"Loadtest Metro {tag}", "transit")
    hospital = await _organisation(client, auth, f"Loadtest Hospital {tag}", "hospital")
    gate_rate = gate_limits(spec.gate_rate)
    # A checkout desk settles a bill every few seconds: the default terminal rate is plenty.
    desk_rate = (120, 30)

    def gate_job(number: int) -> Callable[[], Awaitable[Terminal]]:
        return lambda: _terminal(client, auth, metro, f"loadtest-gate-{tag}-{number}", "transit", gate_rate)

    def desk_job(number: int) -> Callable[[], Awaitable[Terminal]]:
        return lambda: _terminal(client, auth, hospital, f"loadtest-desk-{tag}-{number}", "medical", desk_rate)

    def card_job(name: str) -> Callable[[], Awaitable[HolderEntry]]:
        return lambda: _activated_card(client, auth, name)

    gates = await _bounded([gate_job(number) for number in range(spec.gates)])
    desks = await _bounded([desk_job(number) for number in range(spec.hospitals)])
    holders = await _bounded([card_job(HOLDER_NAME) for _ in range(spec.holders)])
    patients = await _bounded([card_job(PATIENT_NAMES[number % len(PATIENT_NAMES)]) for number in range(spec.patients)])
    supply = await _bounded([card_job(HOLDER_NAME) for _ in range(spec.supply_holders)])
    await _bounded([_probe_job(client, terminal) for terminal in [*gates, *desks]])
    if len(gates) >= 2 and supply:
        # A fresh credential is accepted at one gate and replayed at another (bench_verify's check).
        entry = supply[0]
        first = Holder(entry.card_number, entry.access_token, entry.refresh_token, b64url_decode(entry.device_key))
        await sanity_check(client, [gates[0].api_key, gates[1].api_key], first, 1)
    return Fixture(
        version=FIXTURE_VERSION,
        host=str(client.base_url).rstrip("/"),
        region=REGION,
        prepared_at=time.time(),
        gate_rate=spec.gate_rate,
        gates=gates,
        hospitals=desks,
        holders=holders,
        patients=patients,
        supply_holders=supply,
    )


def _probe_job(client: httpx.AsyncClient, terminal: Terminal) -> Callable[[], Awaitable[None]]:
    return lambda: _wait_known(client, terminal)


async def prepare_fixture(base_url: str, username: str, password: str, spec: PrepareSpec, out: Path) -> Fixture:
    """Prepare against the service at base_url and write the fixture to out."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        fixture = await prepare(client, username, password, spec)
    write_fixture(out, fixture)
    return fixture


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    """The sizes of a run, shared with loadtests.headless."""
    parser.add_argument("--gate-rate", type=float, default=2.0, help="scans per second of each gate (default 2)")
    parser.add_argument("--holders", type=int, default=4, help="HolderUsers, one card each (default 4)")
    parser.add_argument("--hospitals", type=int, default=2, help="HospitalUsers, one checkout desk each (default 2)")
    parser.add_argument(
        "--patients", type=int, default=None, help="cards the hospital desks see (default 3 per hospital desk)"
    )
    parser.add_argument(
        "--supply-holders", type=int, default=20, help="cards whose credentials feed the gates (default 20)"
    )


def spec_from(args: argparse.Namespace, gates: int) -> PrepareSpec:
    """The spec of parsed arguments (add_spec_arguments) for this many gates."""
    patients = args.patients if args.patients is not None else 3 * args.hospitals
    return PrepareSpec(
        gates=gates,
        gate_rate=args.gate_rate,
        hospitals=args.hospitals,
        holders=args.holders,
        patients=max(patients, args.hospitals),
        supply_holders=args.supply_holders,
    )


def check_spec(parser: argparse.ArgumentParser, spec: PrepareSpec) -> None:
    """Refuse sizes the service or the scenario cannot take."""
    if not 0 < spec.gate_rate <= MAX_RATE_PER_MINUTE / 60 / RATE_HEADROOM:
        parser.error(f"--gate-rate between 0 and {MAX_RATE_PER_MINUTE / 60 / RATE_HEADROOM:g}")
    if min(spec.gates, spec.hospitals, spec.holders, spec.patients) < 0 or spec.supply_holders < 1:
        parser.error("counts must not be negative, and at least one supply holder is needed")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True, help="base URL of the service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--username", required=True, help="an admin operator of region 510000 (or of every region)")
    parser.add_argument("--password", default=os.environ.get("ECARD_LOADTEST_PASSWORD"), help=argparse.SUPPRESS)
    parser.add_argument("--gates", type=int, default=16, help="gates (GateUsers), one terminal each (default 16)")
    add_spec_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="where to write the fixture (JSON)")
    args = parser.parse_args(argv)
    if not args.password:
        parser.error("the operator's password: --password or $ECARD_LOADTEST_PASSWORD")
    spec = spec_from(args, args.gates)
    check_spec(parser, spec)
    started = time.perf_counter()
    try:
        fixture = asyncio.run(prepare_fixture(args.host.rstrip("/"), args.username, args.password, spec, args.out))
    except (BenchError, httpx.HTTPError) as exc:
        print(f"prepare failed: {exc}", file=sys.stderr)
        return 2
    print(describe(fixture, time.perf_counter() - started, args.out))
    return 0


def describe(fixture: Fixture, seconds: float, path: Path | None = None) -> str:
    """One line saying what was prepared."""
    where = f" → {path}" if path else ""
    rate = fixture.gates[0].rate_per_minute if fixture.gates else 0
    return (
        f"prepared in {seconds:.1f} s: region {fixture.region}, {len(fixture.gates)} gates ({fixture.gate_rate:g} "
        f"scans/s each, terminal limit {rate}/min), {len(fixture.hospitals)} hospital desks, "
        f"{len(fixture.holders)} holders, {len(fixture.patients)} patients, "
        f"{len(fixture.supply_holders)} supply cards{where}"
    )


if __name__ == "__main__":
    sys.exit(main())
