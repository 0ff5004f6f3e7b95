"""verify_credential for terminals: the whole decision, one Redis round trip, no database."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum

from app.domain.verification.directory import TerminalEntry, VerifierDirectory
from app.domain.verification.disclosure import disclose
from app.stores.status_mirror import MirroredStatus, StatusMirror
from crypto.credential import CredentialRejected, verify_credential
from crypto.keys import b64url


class Reason(StrEnum):
    """Stable reason codes of a rejected verification."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    REPLAYED = "replayed"
    CARD_SUSPENDED = "card_suspended"
    CARD_REVOKED = "card_revoked"
    # The card is not in the status mirror (never activated, or the mirror lost it): fail closed.
    CARD_UNKNOWN = "card_unknown"
    PURPOSE_NOT_ALLOWED = "purpose_not_allowed"
    REGION_NOT_ACCEPTED = "region_not_accepted"


_STATUS_REASONS = {
    MirroredStatus.SUSPENDED.value: Reason.CARD_SUSPENDED,
    # Waiting for (re-)activation, e.g. after a replacement card: not usable, like a suspension.
    MirroredStatus.PENDING_ACTIVATION.value: Reason.CARD_SUSPENDED,
    MirroredStatus.REVOKED.value: Reason.CARD_REVOKED,
}


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one scan."""

    verification_id: str
    accepted: bool
    reason: Reason | None = None
    purpose: str | None = None
    claims: dict[str, str] = field(default_factory=dict)


def _new_verification_id() -> str:
    return "vf_" + b64url(os.urandom(12))


def region_accepted(terminal_region: str, card_region: str) -> bool:
    """A terminal accepts cards of its own province (the first two digits of the GB/T 2260 code)."""
    return terminal_region[:2] == card_region[:2]


class CredentialVerifier:
    """Decides scans for terminals."""

    def __init__(
        self, directory: VerifierDirectory, mirror: StatusMirror, pseudonym_key: bytes, clock_skew: int
    ) -> None:
        self._directory = directory
        self._mirror = mirror
        self._pseudonym_key = pseudonym_key
        self._skew = clock_skew

    async def verify(self, terminal: TerminalEntry, text: str) -> Outcome:
        """Check the credential, consume its nonce, read its card's status, disclose by policy.

        Raises `StoreUnavailable` when the status mirror cannot be reached: never accept then.
        """
        verification_id = _new_verification_id()
        now = int(time.time())
        try:
            verified = verify_credential(text, self._directory.keys.verify_keys, now, self._skew)
        except CredentialRejected as exc:
            return Outcome(verification_id, False, Reason(exc.reason.value))
        claims = verified.claims
        purpose = claims.purpose.label
        if claims.purpose not in terminal.purposes:
            return Outcome(verification_id, False, Reason.PURPOSE_NOT_ALLOWED, purpose)
        if not region_accepted(terminal.region, claims.region):
            return Outcome(verification_id, False, Reason.REGION_NOT_ACCEPTED, purpose)
        # Keep the nonce at least as long as the credential could still be accepted.
        ttl = max(1, claims.expires_at + self._skew - now + 1)
        first_use, status = await self._mirror.present(claims.card_ref, claims.nonce, ttl)
        if not first_use:
            return Outcome(verification_id, False, Reason.REPLAYED, purpose)
        if status != MirroredStatus.ACTIVE.value:
            reason = _STATUS_REASONS.get(status or "", Reason.CARD_UNKNOWN)
            return Outcome(verification_id, False, reason, purpose)
        return Outcome(verification_id, True, None, purpose, disclose(claims, terminal, self._pseudonym_key))
