"""The in-process copy of what `/v1/verify` must know without touching the database.

Terminals (by id, with their key hashes, signing key, permissions and rate) and issuer keys are
loaded in full at start-up; after that a worker applies only what changed (see `VerifierDirectory`),
when an invalidation arrives or the counter it polls every second moved.

Terminals authenticate in one of two ways:

- an API key `ecv1.<terminal id>.<secret>` in `X-Api-Key` (after a rotation the previous key
  works until its overlap ends);
- once the terminal registered an Ed25519 public key, only by signing each request:
  `X-Terminal-Id: <terminal id>`, `X-Signature-Timestamp: <unix seconds>` and
  `X-Signature: <base64url Ed25519 signature>` over `signing_input(...)`, i.e. the UTF-8 of
  "ecard-terminal-v1\n<METHOD>\n<path>\n<timestamp>\n" followed by the raw body. A stolen
  request cannot be replayed for long (the timestamp must be within the allowed skew) and its
  credential is single-use anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import ChangeCounter, Terminal, VerifierOrganisation
from app.domain.issuers.key_store import SOFTWARE_KEYS, IssuerKeyStore
from app.domain.issuers.services import IssuerKeys, load_issuer_keys
from app.security.pii import NATIONAL, PiiCipher
from app.stores.invalidation import InvalidationBus
from app.stores.status_mirror import RateLimit
from crypto.algorithms import algorithm_of_public, public_key
from crypto.credential import Purpose
from crypto.keys import PublicKey, b64url_decode

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "ecv1"
SIGNATURE_SCHEME = b"ecard-terminal-v1"
# How far a signed request's timestamp may be from the server's clock.
SIGNATURE_MAX_AGE = 30


@dataclass(frozen=True, slots=True)
class TerminalEntry:
    """A terminal as the verify path needs it."""

    terminal_id: uuid.UUID
    organisation_id: uuid.UUID
    business_type: str
    region: str
    purposes: frozenset[Purpose]
    api_key_hash: bytes
    # The key replaced by the last rotation, and until when (unix seconds) it is still accepted.
    previous_key_hash: bytes | None
    previous_key_until: float
    # Set when the terminal signs its requests; API keys are then refused.
    signing_key: PublicKey | None  # Ed25519 or SM2, by the registered key
    # False when the terminal or its organisation is disabled.
    enabled: bool
    rate: RateLimit

    @property
    def key(self) -> str:
        """The terminal's id as the store's keys spell it."""
        return self.terminal_id.hex


def hash_api_key_secret(secret: str, national: bool = False) -> bytes:
    """SHA-256, or SM3 under the national profile, of a terminal key's secret part: keys are 256-bit
    random, so no slow hash is needed. The directory accepts either (`VerifierDirectory.authenticate`),
    so keys issued before a profile switch keep working until they are rotated."""
    return hashlib.new("sm3" if national else "sha256", secret.encode()).digest()


def signing_input(method: str, path: str, timestamp: str, body: bytes) -> bytes:
    """The bytes a terminal signs for one request (see the module docstring)."""
    return b"\n".join((SIGNATURE_SCHEME, method.upper().encode(), path.encode(), timestamp.encode(), body))


def split_api_key(api_key: str) -> tuple[str, str] | None:
    """`ecv1.<terminal id hex>.<secret>` → (terminal id hex, secret), or None if malformed."""
    parts = api_key.split(".")
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or len(parts[1]) != 32:
        return None
    return parts[1], parts[2]


# The change counter (`change_counters` row) whose value stamps every directory change.
DIRECTORY_COUNTER = "directory"

# What a worker reads of a terminal and its organisation: columns, not ORM objects (100,000 rows at start-up).
_TERMINAL_COLUMNS = (
    Terminal.id,
    Terminal.allowed_purposes,
    Terminal.api_key_hash,
    Terminal.previous_key_hash,
    Terminal.previous_key_expires_at,
    Terminal.signing_public_key,
    Terminal.enabled,
    Terminal.rate_per_minute,
    Terminal.rate_burst,
    VerifierOrganisation.id,
    VerifierOrganisation.business_type,
    VerifierOrganisation.region_code,
    VerifierOrganisation.enabled,
)


async def next_directory_version(session: AsyncSession) -> int:
    """In a change's transaction: raise the directory counter; the new value is the change's version.

    The counter's row stays locked until the transaction ends, so versions become visible in the order
    they were given: a worker that saw version v has seen every change below it (PostgreSQL and SQLite).
    """
    value = await session.scalar(
        update(ChangeCounter)
        .where(ChangeCounter.name == DIRECTORY_COUNTER)
        .values(value=ChangeCounter.value + 1)
        .returning(ChangeCounter.value)
    )
    if value is None:
        raise RuntimeError(f"the change counter {DIRECTORY_COUNTER!r} is missing (migration 0007 adds it)")
    return int(value)


async def directory_counter(session: AsyncSession) -> int:
    """The directory counter's value: every change up to it is committed."""
    value = await session.scalar(select(ChangeCounter.value).where(ChangeCounter.name == DIRECTORY_COUNTER))
    return int(value or 0)


@lru_cache(maxsize=1024)
def _purposes(labels: tuple[str, ...]) -> frozenset[Purpose]:
    """One shared set per combination: 100,000 terminals use a handful (memory and start-up time)."""
    return frozenset(Purpose.from_label(label) for label in labels)


@lru_cache(maxsize=1024)
def _rate(per_minute: int, burst: int) -> RateLimit:
    return RateLimit(per_minute, burst)


def _entry(row: Any) -> TerminalEntry:
    (
        terminal_id, purposes, api_key_hash, previous_key_hash, previous_key_expires_at, signing_public_key,
        terminal_enabled, rate_per_minute, rate_burst, organisation_id, business_type, region, organisation_enabled,
    ) = row  # fmt: skip
    return TerminalEntry(
        terminal_id=terminal_id,
        organisation_id=organisation_id,
        business_type=business_type,
        region=region,
        purposes=_purposes(tuple(purposes)),
        api_key_hash=api_key_hash,
        previous_key_hash=previous_key_hash,
        previous_key_until=previous_key_expires_at.timestamp() if previous_key_expires_at else 0.0,
        signing_key=public_key(algorithm_of_public(signing_public_key), signing_public_key, region)
        if signing_public_key
        else None,
        enabled=terminal_enabled and organisation_enabled,
        rate=_rate(rate_per_minute, rate_burst),
    )


class VerifierDirectory:
    """Terminals and issuer keys held in memory: loaded in full at start-up, then kept current by change feed.

    Every change of a terminal or organisation carries the directory counter's value it raised
    (`directory_version`); `refresh` reads the counter (one row) and, when it moved, only the terminals
    whose version — or whose organisation's — lies between what this worker applied and it. Terminals
    are never deleted (they are disabled, and disabling is a change like any other). Issuer keys, a few
    per region, are read again in full whenever the counter moved.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], pii: PiiCipher, key_store: IssuerKeyStore = SOFTWARE_KEYS
    ) -> None:
        self._sessions = sessions
        self._pii = pii
        self._key_store = key_store
        # API keys are hashed with SM3 under the national profile (tried first), SHA-256 otherwise.
        self._national = pii.profile == NATIONAL
        self._terminals: dict[str, TerminalEntry] = {}
        self.keys = IssuerKeys()
        # The counter value this worker has applied every change up to.
        self.version = -1
        self._applying = asyncio.Lock()

    def __len__(self) -> int:
        return len(self._terminals)

    async def reload(self) -> None:
        """Read every terminal and key (at start-up); swap them in at once."""
        async with self._applying, self._sessions() as session:
            # The counter first: every change up to it is committed, so the reads below see it.
            version = await directory_counter(session)
            keys = await load_issuer_keys(session, self._pii, self._key_store)
            rows = await session.execute(
                select(*_TERMINAL_COLUMNS).join(
                    VerifierOrganisation, Terminal.organisation_id == VerifierOrganisation.id
                )
            )
            terminals = {row[0].hex: _entry(row) for row in rows}
        self._terminals = terminals
        self.keys = keys
        self.version = version

    async def refresh(self) -> int:
        """Apply the changes committed since the last reload or refresh; how many terminals were read again."""
        async with self._applying, self._sessions() as session:
            version = await directory_counter(session)
            if version == self.version:
                return 0
            since = self.version
            keys = await load_issuer_keys(session, self._pii, self._key_store)
            joined = select(*_TERMINAL_COLUMNS).join(
                VerifierOrganisation, Terminal.organisation_id == VerifierOrganisation.id
            )
            # Bounded above too: a change past `version` may not be committed everywhere a later read
            # looks; it is applied by the next refresh, whole.
            changed = {
                row[0].hex: _entry(row)
                for query in (
                    joined.where(Terminal.directory_version > since, Terminal.directory_version <= version),
                    joined.where(
                        VerifierOrganisation.directory_version > since,
                        VerifierOrganisation.directory_version <= version,
                    ),
                )
                for row in await session.execute(query)
            }
        self._terminals.update(changed)
        self.keys = keys
        self.version = version
        return len(changed)

    def authenticate(self, api_key: str | None) -> TerminalEntry | None:
        """The enabled terminal this API key belongs to, or None."""
        if not api_key:
            return None
        parts = split_api_key(api_key)
        if parts is None:
            return None
        entry = self._terminals.get(parts[0])
        if entry is None or not entry.enabled or entry.signing_key is not None:
            return None
        # The profile's hash first; the other for keys issued before a profile switch.
        for national in (self._national, not self._national):
            presented = hash_api_key_secret(parts[1], national)
            if hmac.compare_digest(entry.api_key_hash, presented):
                return entry
            if (
                entry.previous_key_hash is not None
                and time.time() < entry.previous_key_until
                and hmac.compare_digest(entry.previous_key_hash, presented)
            ):
                return entry
        return None

    def authenticate_signed(
        self, terminal_id: str, timestamp: str, signature: str, method: str, path: str, body: bytes
    ) -> TerminalEntry | None:
        """The enabled terminal whose registered key signed this request just now, or None."""
        entry = self._terminals.get(terminal_id.replace("-", "").lower())
        if entry is None or not entry.enabled or entry.signing_key is None:
            return None
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            return None
        if abs(time.time() - int(timestamp)) > SIGNATURE_MAX_AGE:
            return None
        try:
            raw_signature = b64url_decode(signature)
        except ValueError:
            return None
        if not entry.signing_key.verify(raw_signature, signing_input(method, path, timestamp, body)):
            return None
        return entry


class DirectoryChanges:
    """Tells every worker that terminals, organisations or keys changed, and applies the change here.

    Terminal and organisation changes carry their version already (they raised the counter in their
    transaction); key changes are counted by `announce`. The counter reaches every worker within a
    second through the database (each polls it); the bus's announcement only makes it quicker (and
    may be lost while Redis is away).
    """

    TOPIC = "directory"

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], directory: VerifierDirectory, bus: InvalidationBus
    ) -> None:
        self._sessions = sessions
        self._directory = directory
        self._bus = bus

    async def announce(self) -> None:
        """After an operator's change: count it in the database, apply it here, tell every worker."""
        async with self._sessions() as session:
            await next_directory_version(session)
            await session.commit()
        await self.apply(self.TOPIC)
        await self._bus.publish(self.TOPIC)

    async def apply(self, topic: str) -> None:
        """Apply the directory's changes since this worker's version (a failure is logged: the next poll retries)."""
        try:
            await self._directory.refresh()
        except Exception:
            logger.exception("applying the verifier directory's changes after %r failed", topic)
