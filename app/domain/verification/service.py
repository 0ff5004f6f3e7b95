"""verify_credential for terminals: the whole decision, one store round trip, no database.

Scans uploaded in a batch by a gate that was offline take the same path with their scan time,
plus one database look-up for credentials the store no longer remembers (`verify_batch`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import VerificationEvent
from app.domain.agreements.rules import AcceptanceRules
from app.domain.verification.directory import TerminalEntry, VerifierDirectory
from app.domain.verification.disclosure import Disclosing, disclose, policy_for
from app.domain.verification.events import BATCH, ONLINE, EventRecord, earlier_uses, encode_event, moment_of
from app.security.pii import PiiCipher
from app.settings import Settings
from app.stores.status_mirror import RateLimit, Scan, ScanResult, StatusMirror, StoreUnavailable
from crypto.credential import Claims, CredentialRejected, Rejection, check_window, open_credential, usable_until
from crypto.keys import b64url

logger = logging.getLogger(__name__)


class Reason(StrEnum):
    """Stable reason codes of a rejected verification: the credential's own, the store's, the verifier's.

    Each code is written once where it is decided (crypto.credential.Rejection, ScanResult of the
    status mirror); only the verifier's own are new here.
    """

    MALFORMED = Rejection.MALFORMED.value
    UNKNOWN_KEY = Rejection.UNKNOWN_KEY.value
    BAD_SIGNATURE = Rejection.BAD_SIGNATURE.value
    EXPIRED = Rejection.EXPIRED.value
    NOT_YET_VALID = Rejection.NOT_YET_VALID.value
    LIFETIME_EXCEEDED = Rejection.LIFETIME_EXCEEDED.value
    REPLAYED = ScanResult.REPLAYED.value
    CARD_SUSPENDED = ScanResult.CARD_SUSPENDED.value
    CARD_REVOKED = ScanResult.CARD_REVOKED.value
    CARD_UNKNOWN = ScanResult.CARD_UNKNOWN.value
    PURPOSE_NOT_ALLOWED = "purpose_not_allowed"
    REGION_NOT_ACCEPTED = "region_not_accepted"
    # Batch only: the scan time is in the future or older than the offline window.
    SCAN_TIME_INVALID = "scan_time_invalid"
    REFRESH_REQUIRED = ScanResult.REFRESH_REQUIRED.value


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one scan.

    `first_used_at` is set for a replay (when the credential was used first); `repeated` when
    this is the same terminal asking again within its retry window (same verification id).
    """

    verification_id: str
    accepted: bool
    reason: Reason | None = None
    purpose: str | None = None
    claims: dict[str, str | None] = field(default_factory=dict)
    first_used_at: datetime | None = None
    repeated: bool = False


class RateLimited(Exception):
    """The terminal is over its rate; nothing was consumed or recorded."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"rate limit exceeded; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


def _new_verification_id() -> str:
    return "vf_" + b64url(os.urandom(12))


# A batch upload may replay its own scans at any time and get the same answers.
_BATCH_RETRY_WINDOW_MS = 10**12
MAX_BATCH = 500
BATCH_RATE = RateLimit(per_minute=6000, burst=MAX_BATCH)


@dataclass(frozen=True, slots=True)
class BatchScan:
    """One scan a gate queued while offline."""

    credential: str
    scanned_at_ms: int


class VoidQueue:
    """Scans whose terminals were told "outcome unknown" (503), voided in the store as soon as it answers.

    A scan that ran gets its answer marked undelivered (the event log then says no gate showed it);
    one that had not run yet is cancelled, so arriving late it does nothing. Kept in memory: a worker
    that dies with voids pending leaves those answers recorded as delivered (logged at shutdown).
    """

    LIMIT = 100_000

    def __init__(self, mirror: StatusMirror) -> None:
        self._mirror = mirror
        self._pending: dict[str, Scan] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, scan: Scan) -> None:
        """Void scan as soon as the store answers (the oldest is dropped past LIMIT, logged)."""
        if len(self._pending) >= self.LIMIT:
            dropped = next(iter(self._pending))
            del self._pending[dropped]
            logger.error("too many scans wait to be voided; %s stays recorded as delivered", dropped)
        self._pending[scan.verification_id] = scan
        self._wake.set()

    async def run_once(self) -> int:
        """Void what is pending; how many were done (raises StoreUnavailable when the store is still away)."""
        done = 0
        for verification_id, scan in list(self._pending.items()):
            await self._mirror.void(scan)
            self._pending.pop(verification_id, None)
            done += 1
        return done

    async def run(self) -> None:
        """Until cancelled: void pending scans, retrying every VOID_RETRY seconds while the store is away."""
        while True:
            await self._wake.wait()
            # Cleared before the pass, so a scan added during it wakes the next one.
            self._wake.clear()
            try:
                await self.run_once()
            except StoreUnavailable:
                self._wake.set()
                await asyncio.sleep(VOID_RETRY)


VOID_RETRY = 0.2


class CardFallback(Protocol):
    """Where a card the mirror lacks may be found while the mirror is refilled (see app/domain/cards/rebuild.py)."""

    async def mirror_missing(self, card_ref: bytes) -> bool:
        """Mirror the card from the database if that is allowed now (refilling, within the rate); whether it was."""
        ...


class CredentialVerifier:
    """Decides scans for terminals."""

    def __init__(
        self,
        directory: VerifierDirectory,
        mirror: StatusMirror,
        pii: PiiCipher,
        pseudonym_key: bytes,
        settings: Settings,
        rules: AcceptanceRules,
        fallback: CardFallback | None = None,
    ) -> None:
        self._rules = rules
        self.fallback = fallback
        self._directory = directory
        self._mirror = mirror
        self._pii = pii
        self._pseudonym_key = pseudonym_key
        self._skew = settings.clock_skew
        self.retry_window = settings.verify_retry_window
        self._lifetime = settings.credential_lifetime
        self._retry_window_ms = settings.verify_retry_window * 1000
        self._nonce_memory = settings.nonce_memory
        self._offline_window_ms = settings.offline_scan_window * 1000
        self._batch_id_key = hmac.new(pseudonym_key, b"batch-verification-id", hashlib.sha256).digest()
        self.voids = VoidQueue(mirror)

    def _batch_verification_id(self, terminal: TerminalEntry, scan: BatchScan) -> str:
        """The same id for the same gate's same scan, however often it is uploaded (events insert once by id)."""
        message = (
            terminal.terminal_id.bytes + scan.scanned_at_ms.to_bytes(8, "big", signed=True) + scan.credential.encode()
        )
        return "vf_" + b64url(hmac.new(self._batch_id_key, message, hashlib.sha256).digest()[:12])

    def _check(self, terminal: TerminalEntry, text: str, at: int) -> tuple[Claims | None, str]:
        """The credential's claims (when its signature holds) and a rejection decided without the store."""
        try:
            keys = self._directory.keys
            claims = open_credential(text, keys.verify_keys, keys.seals).claims
        except CredentialRejected as exc:
            return None, exc.reason.value
        try:
            check_window(claims, at, self._skew, self._lifetime)
        except CredentialRejected as exc:
            return claims, exc.reason.value
        if claims.purpose not in terminal.purposes:
            return claims, Reason.PURPOSE_NOT_ALLOWED.value
        if not self._rules.accepts(terminal.region, claims.region, claims.purpose):
            return claims, Reason.REGION_NOT_ACCEPTED.value
        return claims, ""

    def _scan(
        self,
        terminal: TerminalEntry,
        verification_id: str,
        now_ms: int,
        claims: Claims | None,
        decided: str,
        *,
        channel: str = ONLINE,
        scanned_ms: int | None = None,
    ) -> Scan:
        event = EventRecord(
            verification_id=verification_id,
            terminal_id=terminal.terminal_id.bytes,
            organisation_id=terminal.organisation_id.bytes,
            at_ms=now_ms,
            channel=channel,
            card_ref=claims.card_ref if claims else None,
            nonce=claims.nonce if claims else None,
            card_region=claims.region if claims else None,
            purpose=claims.purpose.label if claims else None,
            scanned_ms=scanned_ms,
        )
        # Uploads of offline scans have a budget of their own, so they do not starve live scans.
        rate, rate_scope = (BATCH_RATE, ":batch") if channel == BATCH else (terminal.rate, "")
        used_ms = scanned_ms or now_ms
        if decided or claims is None:
            return Scan(
                terminal.key, verification_id, rate, now_ms, encode_event(event), decided,
                rate_scope=rate_scope, used_ms=used_ms,
            )  # fmt: skip
        # Remember the nonce while the credential could be accepted (bounded by the lifetime, never a
        # far exp), and a while longer for batches.
        last_second = usable_until(claims, self._skew, self._lifetime)
        nonce_ttl = max(1, last_second - now_ms // 1000 + 1) + self._nonce_memory
        # A live scan is refused if the credential could have been shown before the store's epoch; an
        # offline gate's upload is checked against the event log instead (earlier_uses).
        window_start_ms = (claims.not_before - self._skew) * 1000 if channel == ONLINE else None
        return Scan(
            terminal.key,
            verification_id,
            rate,
            now_ms,
            encode_event(event),
            rate_scope=rate_scope,
            used_ms=used_ms,
            card_ref=claims.card_ref,
            nonce=claims.nonce,
            nonce_ttl=nonce_ttl,
            retry_window_ms=_BATCH_RETRY_WINDOW_MS if channel == BATCH else self._retry_window_ms,
            record=policy_for(terminal).record,
            window_start_ms=window_start_ms,
        )

    async def _decide(self, terminal: TerminalEntry, claims: Claims | None, scan: Scan) -> Outcome:
        answer = await self._mirror.scan(scan)
        if answer.kind == "limited":
            raise RateLimited(answer.retry_after_ms)
        if answer.kind == "voided":
            # Only a scan whose caller gave up on it can be voided: nobody waits for this answer.
            raise StoreUnavailable("the scan was cancelled after its caller was told the outcome is unknown")
        purpose = claims.purpose.label if claims else None
        repeated = answer.kind == "retry"
        if answer.result == ScanResult.ACCEPTED:
            assert claims is not None
            if answer.record is None and policy_for(terminal).record.required:
                # A retry whose profile vanished from the store since: fail closed, never disclose less.
                return Outcome(answer.verification_id, False, Reason.CARD_UNKNOWN, purpose, repeated=repeated)
            source = Disclosing(
                claims, terminal, answer.record, self._pseudonym_key, self._pii, datetime.now(UTC).date()
            )
            return Outcome(answer.verification_id, True, None, purpose, disclose(source), repeated=repeated)
        first_used = moment_of(answer.first_used_ms) if answer.result == ScanResult.REPLAYED else None
        return Outcome(
            answer.verification_id, False, Reason(answer.result), purpose, first_used_at=first_used, repeated=repeated
        )

    async def verify(self, terminal: TerminalEntry, text: str) -> Outcome:
        """Check the credential, consume its nonce, read its card's status, record the event, disclose by policy.

        Raises `RateLimited` when the terminal is over its rate, and `StoreUnavailable` when the
        store cannot be reached: never accept then.
        """
        now_ms = time.time_ns() // 1_000_000
        verification_id = _new_verification_id()
        claims, decided = self._check(terminal, text, now_ms // 1000)
        scan = self._scan(terminal, verification_id, now_ms, claims, decided)
        try:
            outcome = await self._decide(terminal, claims, scan)
            if outcome.reason is Reason.CARD_UNKNOWN and not outcome.repeated and claims is not None:
                outcome = await self._from_database(terminal, claims, scan, outcome)
            return outcome
        except StoreUnavailable as exc:
            if exc.sent and scan.card_ref:
                # The script may still run: mark its answer undelivered, or cancel it, once the store is back.
                self.voids.add(scan)
            raise

    async def _from_database(self, terminal: TerminalEntry, claims: Claims, scan: Scan, unknown: Outcome) -> Outcome:
        """A card_unknown while the mirror is refilled: mirror the card from the database, and scan once more.

        The first scan's use of the nonce is forgotten only if it is still this scan's card_unknown (a
        concurrent scan of the same code keeps its answer, so single use holds); the second scan is a new
        verification (its own id and event) and meets the same rules: rate, single use, epoch, status.
        """
        if self.fallback is None or not await self.fallback.mirror_missing(claims.card_ref):
            return unknown
        if not await self._mirror.reopen(scan):
            return unknown
        now_ms = time.time_ns() // 1_000_000
        again = self._scan(terminal, _new_verification_id(), now_ms, claims, "")
        try:
            return await self._decide(terminal, claims, again)
        except StoreUnavailable as exc:
            if exc.sent:
                self.voids.add(again)
            raise

    async def verify_batch(
        self, session: AsyncSession, terminal: TerminalEntry, scans: list[BatchScan]
    ) -> list[Outcome | RateLimited]:
        """Decide scans a gate queued while offline, each at its own scan time.

        A credential used elsewhere — online, or in another gate's batch — is `replayed`, with
        the time of its first use: the store remembers recent uses, the event log older ones.
        The same gate uploading the same scans again gets the same answers.
        """
        now_ms = time.time_ns() // 1_000_000
        checked: list[tuple[Claims | None, str, BatchScan]] = []
        for scan in scans:
            if not now_ms - self._offline_window_ms <= scan.scanned_at_ms <= now_ms + self._skew * 1000:
                checked.append((None, Reason.SCAN_TIME_INVALID.value, scan))
                continue
            claims, decided = self._check(terminal, scan.credential, scan.scanned_at_ms // 1000)
            checked.append((claims, decided, scan))
        earlier = await earlier_uses(
            session, [(claims.card_ref, claims.nonce) for claims, decided, _ in checked if claims and not decided]
        )

        async def decide(claims: Claims | None, decided: str, scan: BatchScan) -> Outcome | RateLimited:
            first = earlier.get((claims.card_ref, claims.nonce)) if claims and not decided else None
            if claims is not None and first is not None:
                if first.terminal_id == terminal.terminal_id:
                    # This gate's own scan, uploaded again after the store forgot it.
                    return await self._recorded(terminal, claims, first)
                decided = Reason.REPLAYED.value
            store_scan = self._scan(
                terminal, self._batch_verification_id(terminal, scan), now_ms, claims, decided,
                channel=BATCH, scanned_ms=scan.scanned_at_ms,
            )  # fmt: skip
            try:
                outcome = await self._decide(terminal, claims, store_scan)
            except RateLimited as exc:
                return exc
            if first is not None:
                return Outcome(
                    outcome.verification_id, False, Reason.REPLAYED, outcome.purpose,
                    first_used_at=first.scanned_at or first.occurred_at,
                )  # fmt: skip
            return outcome

        # Together, so the store calls share pipelines instead of one round trip each.
        return list(await asyncio.gather(*(decide(*item) for item in checked)))

    async def _recorded(self, terminal: TerminalEntry, claims: Claims, event: VerificationEvent) -> Outcome:
        """The answer a verification recorded earlier gave, again (same id)."""
        purpose = claims.purpose.label
        if event.result != ScanResult.ACCEPTED:
            return Outcome(event.id, False, Reason(event.result), purpose, repeated=True)
        # The disclosure depends on the card and the terminal only, so it is computed again.
        policy = policy_for(terminal)
        record = await self._mirror.get_record(claims.card_ref, policy.record) if policy.record else None
        if record is None and policy.record.required:
            return Outcome(event.id, False, Reason.CARD_UNKNOWN, purpose, repeated=True)
        source = Disclosing(claims, terminal, record, self._pseudonym_key, self._pii, datetime.now(UTC).date())
        return Outcome(event.id, True, None, purpose, disclose(source), repeated=True)
