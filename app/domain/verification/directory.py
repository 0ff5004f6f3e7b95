"""The in-process copy of what `/v1/verify` must know without touching the database.

Terminals (by id, with their key hashes, signing key, permissions and rate) and issuer keys are
loaded in full at start-up and reloaded when an invalidation arrives or the periodic refresh
comes round.

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

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import Terminal, VerifierOrganisation
from app.domain.issuers.services import IssuerKeys, load_issuer_keys
from app.pii import PiiCipher
from app.stores.status_mirror import RateLimit
from crypto.credential import Purpose
from crypto.keys import VerifyKey, b64url_decode

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
    signing_key: VerifyKey | None
    # False when the terminal or its organisation is disabled.
    enabled: bool
    rate: RateLimit

    @property
    def key(self) -> str:
        """The terminal's id as the store's keys spell it."""
        return self.terminal_id.hex


def hash_api_key_secret(secret: str) -> bytes:
    """SHA-256 of a terminal key's secret part: keys are 256-bit random, so no slow hash is needed."""
    return hashlib.sha256(secret.encode()).digest()


def signing_input(method: str, path: str, timestamp: str, body: bytes) -> bytes:
    """The bytes a terminal signs for one request (see the module docstring)."""
    return b"\n".join((SIGNATURE_SCHEME, method.upper().encode(), path.encode(), timestamp.encode(), body))


def split_api_key(api_key: str) -> tuple[str, str] | None:
    """`ecv1.<terminal id hex>.<secret>` → (terminal id hex, secret), or None if malformed."""
    parts = api_key.split(".")
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or len(parts[1]) != 32:
        return None
    return parts[1], parts[2]


class VerifierDirectory:
    """Terminals and issuer keys held in memory, replaced wholesale on reload."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], pii: PiiCipher) -> None:
        self._sessions = sessions
        self._pii = pii
        self._terminals: dict[str, TerminalEntry] = {}
        self.keys = IssuerKeys()

    async def reload(self) -> None:
        """Read every terminal and key again; swap them in at once."""
        async with self._sessions() as session:
            keys = await load_issuer_keys(session, self._pii)
            rows = await session.execute(
                select(Terminal, VerifierOrganisation).join(
                    VerifierOrganisation, Terminal.organisation_id == VerifierOrganisation.id
                )
            )
            terminals = {
                terminal.id.hex: TerminalEntry(
                    terminal_id=terminal.id,
                    organisation_id=organisation.id,
                    business_type=organisation.business_type,
                    region=organisation.region_code,
                    purposes=frozenset(Purpose.from_label(label) for label in terminal.allowed_purposes),
                    api_key_hash=terminal.api_key_hash,
                    previous_key_hash=terminal.previous_key_hash,
                    previous_key_until=(
                        terminal.previous_key_expires_at.timestamp() if terminal.previous_key_expires_at else 0.0
                    ),
                    signing_key=(
                        VerifyKey(terminal.signing_public_key, organisation.region_code)
                        if terminal.signing_public_key
                        else None
                    ),
                    enabled=terminal.enabled and organisation.enabled,
                    rate=RateLimit(terminal.rate_per_minute, terminal.rate_burst),
                )
                for terminal, organisation in rows
            }
        self._terminals = terminals
        self.keys = keys

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
        presented = hash_api_key_secret(parts[1])
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
