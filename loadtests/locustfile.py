"""Locust scenarios of the eCard service: gates, holders' phones, hospital desks (loadtests/README.md).

    python -m loadtests.headless --users 40 --run-time 60s            # starts a service, prepares, runs
    locust -f loadtests/locustfile.py --fixture FIXTURE.json          # against a prepared service
    locust -f loadtests/locustfile.py,loadtests/scenarios/rush_hour.py --fixture FIXTURE.json   # rush hour

The fixture (`python -m loadtests.prepare`) names the terminals and cards; it sets how many
HolderUsers and HospitalUsers run (one per card / desk, spawned first) and each gate's scan rate;
GateUsers make up the rest of --users. At the end a verdict sets the exit code: 1 when any request
failed (a fresh credential not accepted is a failure), a task raised, or the p99 of `/v1/verify`
exceeded --max-p99-ms.
"""

from __future__ import annotations

import gc
import json
import math
import time
from pathlib import Path
from typing import Any

import gevent
from locust import events
from locust.env import Environment
from locust.runners import MasterRunner

from loadtests.scenarios.fixture import read_fixture
from loadtests.scenarios.holders import HolderSession, Pool
from loadtests.scenarios.supply import CredentialSupply, Supplier
from loadtests.scenarios.users import (
    HOSPITAL_VERIFY,
    VERIFY,
    GateUser,
    HolderUser,
    HospitalUser,
    Scenario,
    configure,
    scenario,
)

__all__ = ["GateUser", "HolderUser", "HospitalUser"]

VERIFY_NAMES = (VERIFY, HOSPITAL_VERIFY)
CSV_FINAL_WRITE = 1.2
# Collector passes of this process kept one by one from this long (seconds).
COLLECTOR_PASS = 0.001


class CollectorPasses:
    """This process's collector passes of COLLECTOR_PASS or more: each holds every greenlet.

    A pass in the load generator is measured as latency by every request in flight during it,
    though the server answered in time; counted here, it can be told apart from the server's tail.
    """

    def __init__(self) -> None:
        # (generation, wall ms, CPU ms): wall far above CPU means the process was descheduled meanwhile.
        self.passes: list[tuple[int, float, float]] = []
        self._started = (0.0, 0.0)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """gc.callbacks hook."""
        if phase == "start":
            self._started = (time.perf_counter(), time.thread_time())
            return
        took = time.perf_counter() - self._started[0]
        if took >= COLLECTOR_PASS:
            cpu = time.thread_time() - self._started[1]
            self.passes.append((int(info.get("generation", -1)), round(took * 1000, 2), round(cpu * 1000, 2)))

    def summary(self) -> dict[str, Any]:
        """Passes by generation: how many, the longest (wall ms), the most CPU one took (ms)."""
        by_generation: dict[str, list[tuple[float, float]]] = {}
        for generation, ms, cpu in self.passes:
            by_generation.setdefault(str(generation), []).append((ms, cpu))
        return {
            gen: {
                "passes": len(values),
                "longest_ms": max(ms for ms, _ in values),
                "most_cpu_ms": max(cpu for _, cpu in values),
            }
            for gen, values in by_generation.items()
        }


collector_passes = CollectorPasses()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("eCard scenario")
    group.add_argument(
        "--fixture", env_var="ECARD_LOADTEST_FIXTURE", help="JSON written by `python -m loadtests.prepare` (required)"
    )
    group.add_argument(
        "--max-p99-ms",
        type=float,
        default=50.0,
        help="fail the run when the p99 of /v1/verify exceeds this (ms; 0: no limit; default 50)",
    )
    group.add_argument(
        "--prefill",
        type=float,
        default=0.0,
        help="before the run, issue credentials for this many seconds of every gate scanning (default 0: "
        "the supplier issues them while the gates run; must stay under the credential lifetime)",
    )
    group.add_argument(
        "--supply-connections", type=int, default=8, help="concurrent issue requests of the supplier (default 8)"
    )
    group.add_argument(
        "--supply-bundle",
        type=int,
        default=0,
        help="credentials per supply request (default 0: as many as the rest of the run can use, up to 20)",
    )
    group.add_argument(
        "--supply-wait", type=float, default=5.0, help="how long a gate waits for a fresh credential (default 5 s)"
    )
    group.add_argument(
        "--token-max-age",
        type=float,
        default=600.0,
        help="refresh a holder's access token when it is older than this (s; tokens live 900; default 600)",
    )
    group.add_argument("--summary-json", help="also write the verdict and the scenario's counters to this file")


def _is_master(environment: Environment) -> bool:
    return isinstance(environment.runner, MasterRunner)


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None or not options.fixture:
        raise SystemExit("the eCard scenario needs --fixture FILE (python -m loadtests.prepare writes one)")
    fixture = read_fixture(Path(options.fixture))
    # One HolderUser per holder card and one HospitalUser per desk, spawned first; gates fill the rest.
    HolderUser.fixed_count = len(fixture.holders)
    HospitalUser.fixed_count = len(fixture.hospitals)
    # A kind of user the fixture has nothing for does not run (a fixed count of 0 would mean "by weight").
    present = {GateUser: fixture.gates, HolderUser: fixture.holders, HospitalUser: fixture.hospitals}
    environment.user_classes[:] = [cls for cls in environment.user_classes if present.get(cls, True)]
    if not environment.host:
        environment.host = fixture.host
        for user_class in (GateUser, HolderUser, HospitalUser):
            user_class.host = fixture.host
    phones = [HolderSession(entry, str(environment.host)) for entry in fixture.holders]
    patients = [HolderSession(entry, str(environment.host)) for entry in fixture.patients]
    supply_holders = [HolderSession(entry, str(environment.host)) for entry in fixture.supply_holders]
    shared = Scenario(
        fixture=fixture,
        gates=Pool(fixture.gates),
        desks=Pool(fixture.hospitals),
        phones=Pool(phones),
        patients=Pool(patients),
        supply_holders=supply_holders,
        sessions=[*phones, *patients, *supply_holders],
        supply=CredentialSupply(),
        token_max_age=options.token_max_age,
        supply_wait=options.supply_wait,
    )
    configure(shared)
    if _is_master(environment):
        return  # the workers issue, verify and count
    shared.supplier = _supplier(environment, shared, ends_at=None)
    count = math.ceil(options.prefill * len(fixture.gates) * fixture.gate_rate)
    if count > 0:
        seconds = shared.supplier.prefill(count)
        print(f"prefill: {count:,} credentials issued in {seconds:.1f} s ({count / seconds:,.0f}/s)", flush=True)
    # What exists now (the fixture, the sessions, a prefilled supply of up to 100,000s of credentials)
    # lives for the run: frozen, the collector's passes skip it instead of walking it every few seconds
    # with every greenlet held (the service does the same after its start-up).
    gc.collect()
    gc.freeze()
    collector_passes.passes.clear()
    gc.callbacks.append(collector_passes)


def _supplier(environment: Environment, shared: Scenario, ends_at: float | None) -> Supplier:
    options = environment.parsed_options
    return Supplier(
        environment,
        host=str(environment.host),
        holders=shared.supply_holders,
        supply=shared.supply,
        demand=shared.demand,
        connections=options.supply_connections,
        bundle=options.supply_bundle,
        token_max_age=options.token_max_age,
        ends_at=ends_at,
    )


def _run_seconds(environment: Environment) -> float | None:
    options = environment.parsed_options
    run_time = getattr(options, "run_time", None)
    return float(run_time) if run_time else None


@events.test_start.add_listener
def _test_start(environment: Environment, **_: Any) -> None:
    if _is_master(environment):
        return
    shared = scenario()
    seconds = _run_seconds(environment)
    if shared.supplier is not None:
        shared.supplier.ends_at = time.time() + seconds if seconds else None
        shared.supplier.start()


@events.test_stop.add_listener
def _test_stop(environment: Environment, **_: Any) -> None:
    shared = scenario()
    if shared.supplier is not None:
        shared.supplier.stop()


def _entry_figures(entry: Any) -> dict[str, float | int]:
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.total_rps, 1),
        "p50_ms": entry.get_response_time_percentile(0.5),
        "p99_ms": entry.get_response_time_percentile(0.99),
        "max_ms": round(entry.max_response_time or 0, 1),
    }


def verdict(environment: Environment) -> dict[str, Any]:
    """The run's figures and the problems that fail it."""
    stats, runner, options = environment.stats, environment.runner, environment.parsed_options
    shared = scenario()
    problems: list[str] = []
    if stats.total.num_failures:
        by_error = sorted(stats.errors.values(), key=lambda error: -error.occurrences)
        listed = "; ".join(f"{error.name}: {error.error} ({error.occurrences} times)" for error in by_error[:5])
        problems.append(f"{stats.total.num_failures} failed requests ({listed})")
    if runner is not None and runner.exceptions:
        problems.append(f"{len(runner.exceptions)} kinds of exception in tasks")
    limit = options.max_p99_ms
    verify_entries = {name: stats.entries[name, "POST"] for name in VERIFY_NAMES if (name, "POST") in stats.entries}
    for name, entry in verify_entries.items():
        p99 = entry.get_response_time_percentile(0.99)
        if limit and entry.num_requests and p99 > limit:
            problems.append(f"p99 of {name} is {p99:.0f} ms, over the limit of {limit:g} ms")
    gate_entry = verify_entries.get(VERIFY)
    if shared.gates_started and (gate_entry is None or gate_entry.num_requests == gate_entry.num_failures):
        problems.append("gates ran but no verification was accepted")
    outcomes: dict[str, dict[str, int]] = {}
    for (role, outcome), count in sorted(shared.outcomes.items()):
        outcomes.setdefault(role, {})[outcome] = count
    supplier = shared.supplier
    return {
        "verdict": "failed" if problems else "passed",
        "problems": problems,
        "max_p99_ms": limit,
        "total": _entry_figures(stats.total),
        "requests": {f"{method} {name}": _entry_figures(entry) for (name, method), entry in stats.entries.items()},
        "verify_outcomes": outcomes,
        "settlements": dict(shared.settlements),
        "supply": {
            **shared.supply.summary(),
            "requests": supplier.requests if supplier else 0,
            "failed_requests": supplier.failures if supplier else 0,
            "prefilled": supplier.prefilled if supplier else 0,
            "prefill_s": round(supplier.prefill_seconds, 1) if supplier else 0.0,
        },
        "gates_started": shared.gates_started,
        "token_refreshes": sum(session.refreshes for session in shared.sessions),
        "load_generator_collector": collector_passes.summary(),
    }


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    if environment.parsed_options.csv_prefix:
        # Locust's CSV writer rewrites the files every second and not at the end: give it one more turn,
        # so the CSV files hold the same final figures as the summary.
        gevent.sleep(CSV_FINAL_WRITE)
    result = verdict(environment)
    _print_summary(result)
    path = environment.parsed_options.summary_json
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    environment.process_exit_code = 1 if result["problems"] else 0


def _print_summary(result: dict[str, Any]) -> None:
    total = result["total"]
    lines = [
        "",
        "eCard scenario summary",
        f"  all requests: {total['requests']:,} ({total['rps']:,.1f}/s), {total['failures']:,} failed, "
        f"p50 {total['p50_ms']} ms, p99 {total['p99_ms']} ms",
    ]
    for role, outcomes in result["verify_outcomes"].items():
        lines.append(f"  {role} verifications: " + ", ".join(f"{key} {n:,}" for key, n in outcomes.items()))
    if result["settlements"]:
        lines.append("  medical settlements: " + ", ".join(f"{k} {n:,}" for k, n in result["settlements"].items()))
    supply = result["supply"]
    lines.append(
        f"  credential supply: {supply['issued']:,} issued in {supply['requests']:,} requests "
        f"({supply['prefilled']:,} before the run), "
        f"{supply['handed_out']:,} scanned, {supply['expired_unused']:,} expired unused, "
        f"{supply['gate_waits']:,} gate waits (longest {supply['longest_wait_s']} s)"
    )
    collector = result.get("load_generator_collector") or {}
    shown = "; ".join(
        f"gen {gen}: {figures['passes']}, longest {figures['longest_ms']:g} ms, most CPU {figures['most_cpu_ms']:g} ms"
        for gen, figures in sorted(collector.items())
    )
    lines.append(f"  Locust's own collector passes >= {COLLECTOR_PASS * 1000:g} ms: {shown or 'none'}")
    if result["problems"]:
        lines.append("  verdict: FAILED")
        lines += [f"    - {problem}" for problem in result["problems"]]
    else:
        lines.append("  verdict: passed")
    print("\n".join(lines), flush=True)
