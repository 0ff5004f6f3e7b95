"""The simulated users: transit gates, holders' phones and hospital checkout desks.

- `GateUser` scans at a constant rate with its own terminal's API key; every scan is a fresh
  credential from the supply, so anything but `accepted` is a failure (reported by reason).
- `HolderUser` is a phone with an open QR screen: a bundle of 1 to 20 transit credentials every 30 s,
  its session refreshed when it gets old.
- `HospitalUser` is a checkout desk: a patient steps up with the PIN (set on the first visit),
  shows a medical credential, the desk verifies it (and sees name, masked citizen ID and insurance
  region), then settles the bill with an Idempotency-Key, retrying while the verification is
  not yet drained into the database, and checks that a retried settlement replays the first answer.

Their shared state (fixture, pools, supply, counters) is a `Scenario`, set up by the locustfile's
init hook.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
import msgspec
from locust import between, constant_throughput, task
from locust.contrib.fasthttp import FastHttpUser, ResponseContextManager
from locust.exception import StopUser

from loadtests.scenarios.fixture import Fixture, Terminal
from loadtests.scenarios.holders import HolderSession, Pool
from loadtests.scenarios.supply import CredentialSupply, Supplier, SupplyError

VERIFY = "/v1/verify"
HOSPITAL_VERIFY = "/v1/verify [hospital]"
CREDENTIALS = "/v1/holder/credentials"
MEDICAL_CREDENTIAL = "/v1/holder/credentials [medical]"
SETTLE = "/v1/terminal/medical-settlements"
SETTLE_NOT_YET = "/v1/terminal/medical-settlements [not recorded yet]"
SETTLE_REPLAY = "/v1/terminal/medical-settlements [replay]"
PIN = "402917"
HOLDER_REFRESH_SECONDS = 30.0
# How often a desk asks again while the verification is not drained yet, at most.
SETTLE_ATTEMPTS = 20
MAX_RETRY_AFTER = 5.0
# The cashier's time between the scan and the bill (the drain usually needs about a second).
CASHIER_SECONDS = (0.5, 1.5)


class VerifyAnswer(msgspec.Struct):
    """The part of `/v1/verify`'s answer the users check."""

    result: str
    verification_id: str
    reason: str | None = None
    purpose: str | None = None
    claims: dict[str, str | None] | None = None
    repeated: bool = False


class Problem(msgspec.Struct):
    """An RFC 9457 problem body's stable code."""

    code: str = ""


class Issued(msgspec.Struct):
    """`POST /v1/holder/credentials`'s answer."""

    credentials: list[IssuedItem]


class IssuedItem(msgspec.Struct):
    """One issued credential."""

    credential: str


class Card(msgspec.Struct):
    """`GET /v1/holder/card`'s answer, the part the desk reads."""

    pin_set: bool


class StepUp(msgspec.Struct):
    """`POST /v1/holder/pin/verification`'s answer."""

    step_up_token: str


class Settlement(msgspec.Struct):
    """`POST /v1/terminal/medical-settlements`' answer."""

    transaction_id: str
    verification_id: str
    total_fen: int
    insurance_fen: int
    holder_fen: int


_verify = msgspec.json.Decoder(VerifyAnswer)
_problem = msgspec.json.Decoder(Problem)
_issued = msgspec.json.Decoder(Issued)
_step_up = msgspec.json.Decoder(StepUp)
_card = msgspec.json.Decoder(Card)
_settlement = msgspec.json.Decoder(Settlement)


@dataclass
class Scenario:
    """What the users of one process share."""

    fixture: Fixture
    gates: Pool[Terminal]
    desks: Pool[Terminal]
    phones: Pool[HolderSession]
    patients: Pool[HolderSession]
    supply_holders: list[HolderSession]
    # Every holder session of the run (for the count of token refreshes).
    sessions: list[HolderSession]
    supply: CredentialSupply
    token_max_age: float
    supply_wait: float
    supplier: Supplier | None = None
    # ("gate" | "hospital", "accepted" | "rejected:<reason>" | "http <status>") → count
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    settlements: Counter[str] = field(default_factory=Counter)
    gates_started: int = 0
    gates_running: int = 0

    def demand(self) -> float:
        """Credentials per second the running gates ask for."""
        return self.gates_running * self.fixture.gate_rate


_scenario: Scenario | None = None


def configure(scenario: Scenario) -> None:
    """Give the users their shared state (the locustfile's init hook does)."""
    global _scenario
    _scenario = scenario


def scenario() -> Scenario:
    """The shared state; the locustfile must have configured it."""
    if _scenario is None:
        raise RuntimeError("the eCard scenario is not configured: run it through loadtests/locustfile.py --fixture …")
    return _scenario


def _problem_code(response: Any) -> str:
    try:
        return _problem.decode(response.content or b"{}").code
    except msgspec.DecodeError:
        return ""


def _decoded(decoder: msgspec.json.Decoder[Any], response: ResponseContextManager) -> Any:
    """The decoded body, or None after marking the response failed."""
    try:
        return decoder.decode(response.content)
    except msgspec.DecodeError as exc:
        response.failure(f"undecodable answer ({exc}): {response.content[:200]!r}")
        return None


def _http_failure(response: ResponseContextManager, what: str) -> str:
    code = _problem_code(response)
    message = f"{what}: HTTP {response.status_code}" + (f" {code}" if code else "")
    response.failure(message)
    return f"http {response.status_code}" + (f" {code}" if code else "")


def _lend_or_stop(user: FastHttpUser, pool: Pool[Any], what: str) -> Any:
    """An item of the pool for this user; a failure and StopUser when the fixture has too few."""
    item = pool.lend()
    if item is None:
        user.environment.events.request.fire(
            request_type="SETUP",
            name=f"lend {what}",
            response_time=0,
            response_length=0,
            exception=RuntimeError(f"all {pool.size} {what} of the fixture are in use: prepare more"),
            context={},
        )
        raise StopUser()
    return item


class GateUser(FastHttpUser):
    """A transit gate: scans fresh credentials at a constant rate with its own terminal's key."""

    weight = 10

    def on_start(self) -> None:
        """Take a terminal of its own, and a random phase."""
        shared = scenario()
        self.terminal: Terminal = _lend_or_stop(self, shared.gates, "gate terminals")
        self.headers = {"X-Api-Key": self.terminal.api_key, "Content-Type": "application/json"}
        shared.gates_started += 1
        shared.gates_running += 1
        # Gates started together would scan in step; a random phase spreads them as people arrive.
        self.period = 1 / shared.fixture.gate_rate
        gevent.sleep(random.uniform(0, self.period))
        self.next_scan = time.perf_counter()

    def wait_time(self) -> float:
        """A constant rate from this gate's own phase.

        Locust's `constant_throughput` anchors its pace at the user's creation, which undoes the
        random phase: 150 gates spawned in one second then scanned in bursts of 150 (measured:
        every request of a 2-per-second run arrived within 30 ms of the half second). A gate that
        fell behind by more than one period starts again from now rather than bursting.
        """
        self.next_scan += self.period
        now = time.perf_counter()
        if self.next_scan < now - self.period:
            self.next_scan = now
        return max(0.0, self.next_scan - now)

    def on_stop(self) -> None:
        """Give the terminal back (the shape may start another gate with it)."""
        shared = scenario()
        if hasattr(self, "terminal"):
            shared.gates.give_back(self.terminal)
            shared.gates_running -= 1

    @task
    def scan(self) -> None:
        """Verify one fresh credential; only `accepted` is a success."""
        shared = scenario()
        started = time.perf_counter()
        try:
            text = shared.supply.take_wait(shared.supply_wait)
        except SupplyError as exc:
            self.environment.events.request.fire(
                request_type="SUPPLY",
                name="fresh credential",
                response_time=(time.perf_counter() - started) * 1000,
                response_length=0,
                exception=exc,
                context={},
            )
            return
        body = msgspec.json.encode({"credential": text})
        with self.client.post(VERIFY, data=body, headers=self.headers, name=VERIFY, catch_response=True) as response:
            if response.status_code != 200:
                shared.outcomes["gate", _http_failure(response, "verify")] += 1
                return
            answer: VerifyAnswer | None = _decoded(_verify, response)
            if answer is None:
                shared.outcomes["gate", "undecodable"] += 1
                return
            if answer.result != "accepted":
                shared.outcomes["gate", f"rejected:{answer.reason}"] += 1
                response.failure(f"fresh credential rejected: {answer.reason}")
                return
            shared.outcomes["gate", "accepted"] += 1
            if answer.purpose != "transit" or answer.repeated or not (answer.claims or {}).get("card_pseudonym"):
                response.failure(
                    f"accepted, but purpose {answer.purpose}, repeated {answer.repeated}, claims {answer.claims}"
                )


class HolderUser(FastHttpUser):
    """A phone with an open QR screen: fetches 1 to 20 transit credentials every 30 s."""

    # Set to the fixture's number of holder cards by the init hook: spawned first, the gates fill the rest.
    fixed_count = 1
    wait_time = constant_throughput(1 / HOLDER_REFRESH_SECONDS)

    def on_start(self) -> None:
        """Take a card of its own."""
        self.holder: HolderSession = _lend_or_stop(self, scenario().phones, "holder cards")

    def on_stop(self) -> None:
        """Give the card back."""
        if hasattr(self, "holder"):
            scenario().phones.give_back(self.holder)

    @task
    def refresh_credentials(self) -> None:
        """Fetch a bundle for the QR screen."""
        self.holder.refresh_if_older(self.client, scenario().token_max_age)
        count = random.randint(1, 20)
        body = msgspec.json.encode({"purpose": "transit", "count": count})
        with self.client.post(
            CREDENTIALS, data=body, headers=self.holder.auth("POST", CREDENTIALS), name=CREDENTIALS, catch_response=True
        ) as response:
            if response.status_code != 200:
                _http_failure(response, "credentials")
                return
            issued: Issued | None = _decoded(_issued, response)
            if issued is None:
                return
            got = len(issued.credentials)
            if got != count:
                response.failure(f"asked for {count} credentials, got {got}")


class HospitalUser(FastHttpUser):
    """A hospital checkout desk: PIN step-up, medical credential, verification with disclosure, settlement."""

    fixed_count = 1
    wait_time = between(1.0, 3.0)

    def on_start(self) -> None:
        """Take a checkout terminal of its own."""
        self.desk: Terminal = _lend_or_stop(self, scenario().desks, "hospital terminals")
        self.desk_headers = {"X-Api-Key": self.desk.api_key, "Content-Type": "application/json"}

    def on_stop(self) -> None:
        """Give the terminal back."""
        if hasattr(self, "desk"):
            scenario().desks.give_back(self.desk)

    @task
    def visit(self) -> None:
        """One patient at the checkout."""
        shared = scenario()
        patient = shared.patients.lend()
        if patient is None:
            gevent.sleep(0.5)  # every patient is at another desk
            return
        try:
            self._visit(shared, patient)
        finally:
            shared.patients.give_back(patient)

    def _visit(self, shared: Scenario, patient: HolderSession) -> None:
        patient.refresh_if_older(self.client, shared.token_max_age)
        if not patient.pin_set and not self._set_pin(patient):
            return
        step_up = self._step_up(patient)
        if step_up is None:
            return
        credential = self._medical_credential(patient, step_up)
        if credential is None:
            return
        verification_id = self._verify(shared, patient, credential)
        if verification_id is None:
            return
        gevent.sleep(random.uniform(*CASHIER_SECONDS))
        self._settle(shared, verification_id, total_fen=random.randint(1_000, 500_000))

    def _set_pin(self, patient: HolderSession) -> bool:
        """Set the PIN on the card's first visit (unless an earlier run with this fixture did)."""
        with self.client.get(
            "/v1/holder/card",
            headers=patient.auth("GET", "/v1/holder/card"),
            name="/v1/holder/card",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                _http_failure(response, "card")
                return False
            card: Card | None = _decoded(_card, response)
            if card is None:
                return False
        if card.pin_set:
            patient.pin_set = True
            return True
        body = msgspec.json.encode({"pin": PIN})
        with self.client.put(
            "/v1/holder/pin",
            data=body,
            headers=patient.auth("PUT", "/v1/holder/pin"),
            name="/v1/holder/pin",
            catch_response=True,
        ) as response:
            if response.status_code != 204:
                _http_failure(response, "set PIN")
                return False
        patient.pin_set = True
        return True

    def _step_up(self, patient: HolderSession) -> str | None:
        body = msgspec.json.encode({"pin": PIN})
        path = "/v1/holder/pin/verification"
        headers = patient.auth("POST", path)
        with self.client.post(path, data=body, headers=headers, name=path, catch_response=True) as response:
            if response.status_code != 200:
                _http_failure(response, "PIN step-up")
                return None
            step_up: StepUp | None = _decoded(_step_up, response)
            return step_up.step_up_token if step_up is not None else None

    def _medical_credential(self, patient: HolderSession, step_up: str) -> str | None:
        body = msgspec.json.encode({"purpose": "medical", "count": 1, "step_up_token": step_up})
        with self.client.post(
            CREDENTIALS,
            data=body,
            headers=patient.auth("POST", CREDENTIALS),
            name=MEDICAL_CREDENTIAL,
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                _http_failure(response, "medical credential")
                return None
            issued: Issued | None = _decoded(_issued, response)
            if issued is None:
                return None
            if len(issued.credentials) != 1:
                response.failure(f"asked for one medical credential, got {len(issued.credentials)}")
                return None
            return issued.credentials[0].credential

    def _verify(self, shared: Scenario, patient: HolderSession, credential: str) -> str | None:
        body = msgspec.json.encode({"credential": credential})
        with self.client.post(
            VERIFY, data=body, headers=self.desk_headers, name=HOSPITAL_VERIFY, catch_response=True
        ) as response:
            if response.status_code != 200:
                shared.outcomes["hospital", _http_failure(response, "verify")] += 1
                return None
            answer: VerifyAnswer | None = _decoded(_verify, response)
            if answer is None:
                shared.outcomes["hospital", "undecodable"] += 1
                return None
            if answer.result != "accepted":
                shared.outcomes["hospital", f"rejected:{answer.reason}"] += 1
                response.failure(f"fresh medical credential rejected: {answer.reason}")
                return None
            shared.outcomes["hospital", "accepted"] += 1
            claims = answer.claims or {}
            expected = {"holder_name": patient.name, "insurance_region": shared.fixture.region}
            wrong = {name: claims.get(name) for name, value in expected.items() if claims.get(name) != value}
            masked = claims.get("citizen_id_masked") or ""
            if wrong or "*" not in masked or answer.purpose != "medical":
                response.failure(f"accepted, but purpose {answer.purpose} and claims {claims} (expected {expected})")
                return None
            return answer.verification_id

    def _settle(self, shared: Scenario, verification_id: str, total_fen: int) -> None:
        body = msgspec.json.encode({"verification_id": verification_id, "total_fen": total_fen})
        headers = {**self.desk_headers, "Idempotency-Key": f"loadtest-{uuid.uuid4()}"}
        for _ in range(SETTLE_ATTEMPTS):
            with self.client.post(SETTLE, data=body, headers=headers, name=SETTLE, catch_response=True) as response:
                if response.status_code == 409 and _problem_code(response) == "verification_not_recorded":
                    # Not an error: the event drain has not stored the verification yet.
                    response.request_meta["name"] = SETTLE_NOT_YET
                    response.success()
                    shared.settlements["not_recorded_retries"] += 1
                    retry_after = float(response.headers.get("Retry-After") or 1)
                    pause = min(MAX_RETRY_AFTER, max(0.1, retry_after))
                elif response.status_code != 201:
                    shared.settlements["failed"] += 1
                    _http_failure(response, "settlement")
                    return
                else:
                    first: Settlement | None = _decoded(_settlement, response)
                    if first is None:
                        shared.settlements["failed"] += 1
                        return
                    if first.insurance_fen + first.holder_fen != total_fen or first.verification_id != verification_id:
                        shared.settlements["failed"] += 1
                        response.failure(f"settlement does not add up: {response.text}")
                        return
                    shared.settlements["settled"] += 1
                    break
            gevent.sleep(pause)
        else:
            shared.settlements["failed"] += 1
            self.environment.events.request.fire(
                request_type="POST",
                name=SETTLE,
                response_time=0,
                response_length=0,
                exception=RuntimeError(f"verification still not recorded after {SETTLE_ATTEMPTS} attempts"),
                context={},
            )
            return
        # The desk did not see the answer and sends it again: the same transaction comes back.
        with self.client.post(SETTLE, data=body, headers=headers, name=SETTLE_REPLAY, catch_response=True) as response:
            if response.status_code != 201:
                _http_failure(response, "settlement replay")
                return
            again: Settlement | None = _decoded(_settlement, response)
            if again is None:
                return
            if again.transaction_id != first.transaction_id or response.headers.get("Idempotent-Replayed") != "true":
                response.failure(f"replay gave transaction {again.transaction_id}, first {first.transaction_id}")
                return
            shared.settlements["replayed"] += 1
