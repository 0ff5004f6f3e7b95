"""The in-process copy of what `/v1/verify` must know without touching the database.

Terminals (by id, with their key hash and permissions) and issuer keys are loaded in full at
start-up and reloaded when an invalidation arrives or the periodic refresh comes round.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import Terminal, VerifierOrganisation
from app.domain.issuers.services import IssuerKeys, load_issuer_keys
from app.pii import PiiCipher
from crypto.credential import Purpose

API_KEY_PREFIX = "ecv1"


@dataclass(frozen=True, slots=True)
class TerminalEntry:
    """A terminal as the verify path needs it."""

    terminal_id: uuid.UUID
    organisation_id: uuid.UUID
    business_type: str
    region: str
    purposes: frozenset[Purpose]
    api_key_hash: bytes
    enabled: bool


def hash_api_key_secret(secret: str) -> bytes:
    """SHA-256 of a terminal key's secret part: keys are 256-bit random, so no slow hash is needed."""
    return hashlib.sha256(secret.encode()).digest()


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
                    enabled=terminal.enabled,
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
        if entry is None or not entry.enabled:
            return None
        if not hmac.compare_digest(entry.api_key_hash, hash_api_key_secret(parts[1])):
            return None
        return entry
