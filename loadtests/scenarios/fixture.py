"""The prepared world a Locust run works in, as `python -m loadtests.prepare` writes it.

Everything here was made through the public API of the service under test: terminals with their
API keys, activated cards with their holder sessions. Refresh tokens rotate during a run (reusing
an old one revokes the whole session family), so a fixture serves one run: prepare a new one for
the next.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

FIXTURE_VERSION = 2


class Terminal(msgspec.Struct, frozen=True):
    """A verifier terminal and its API key (`ecv1.<id>.<secret>`), with the rate it was given."""

    terminal_id: str
    organisation_id: str
    api_key: str
    rate_per_minute: int
    rate_burst: int


class HolderEntry(msgspec.Struct):
    """An activated card's holder session, as issued when the fixture was made."""

    card_number: str
    access_token: str
    refresh_token: str
    # When the session was issued (epoch seconds) and how long its access token lives.
    issued_at: float
    expires_in: float
    name: str
    # The device key the tokens are bound to (DPoP): libsodium's 64-byte secret, unpadded base64url.
    device_key: str


class Fixture(msgspec.Struct):
    """Terminals and cards for the three kinds of user and the credential supply."""

    version: int
    host: str
    region: str
    prepared_at: float
    # Scans per second each gate makes (GateUser's constant throughput); its terminal allows more.
    gate_rate: float
    gates: list[Terminal]
    hospitals: list[Terminal]
    # One card per HolderUser (a phone showing its QR code).
    holders: list[HolderEntry]
    # Cards the hospital desks see, one at a time each (their PIN is set on the first visit).
    patients: list[HolderEntry]
    # Cards whose credentials feed the gates (issued before and during the run, each used once).
    supply_holders: list[HolderEntry]


def write_fixture(path: Path, fixture: Fixture) -> None:
    """Write the fixture, readable by its owner only (it holds API keys and session tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(fixture)))


def read_fixture(path: Path) -> Fixture:
    """Read and check a fixture."""
    fixture = msgspec.json.decode(path.read_bytes(), type=Fixture)
    if fixture.version != FIXTURE_VERSION:
        raise ValueError(f"{path}: fixture version {fixture.version}, expected {FIXTURE_VERSION}: prepare it again")
    return fixture
