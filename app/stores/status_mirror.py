"""The fast store `/v1/verify` decides a scan with, in one round trip: rate, nonce, status, event.

Per scan, atomically: the terminal's rate limit (GCRA), the credential's single use (with an
idempotent retry window for the terminal that used it first), the card's mirrored status, an
optional card record for disclosure, and the verification event appended to a stream.

Two implementations behind one interface: Redis (production, any number of workers) and
process memory (the embedded default, one worker only). A card's keys and its shard's event
stream share a hash tag (app/stores/event_stream.py), so one script decides and records a scan
atomically on a Redis Cluster too. The terminal's rate key cannot share it (a terminal scans
every card): on one Redis node it rides in the same script call; on a cluster the rate is taken
by a call of its own first, and nothing is consumed when it refuses.

Losing the store (Redis restarted without persistence, a failover to an empty replica) loses the
used nonces. Each shard keeps an epoch: the time its store began remembering. A scan whose
credential could have been shown before the epoch (its window, clock skew included, began before
it) is refused as `refresh_required` instead of being taken as unused: single use holds across the
loss, and the price is the codes in flight at that moment (at most a lifetime and the skew). A
shard that finds no epoch (the store is empty) starts one at once; issuing reads it too and starts
new windows after it. Statuses carry the eCard's mirror version (`A17`), so a write of an older
state never replaces a newer one.

The layout keeps an active card in about 75 bytes of Redis (73 measured with 1 M cards by
loadtests/mirror_memory.py; a key for the status and one for the profile took 365): every card of a
deployment is in the mirror, so its cost is per card, times tens of millions. A card's status and
sealed disclosure profile are one field of a bucket hash, `{shard tag}b:<bucket>`: the field is the
card reference less the bytes its bucket number already says, the value `A17.<sealed profile>`
(status letter, mirror version, and "." and the profile if the card has one; "-" for the letter of a
card with a profile but no status yet). A hash of at most 128 fields of at most 64 bytes (Redis's
default `hash-max-listpack-entries` and `-value`) is stored as one listpack, a few bytes of overhead
per field instead of a key's ~100. The bucket number is the top bits of the card reference (random
bytes), and how many bits follows the deployment's expected number of cards
(`MirrorLayout.for_capacity`, setting ECARD_MIRROR_CAPACITY) so that a bucket holds 32 to 64 cards
on average at that size (1 M cards: 61 on average, 93 in the fullest of 16,384 buckets): under the
128 of a listpack with room to grow, and few enough keys to keep their overhead small. A bucket past
128 becomes a plain hash table: still correct, but each of its fields and values is then an
allocation of its own (a capacity 20 times too small: 135 bytes per card; 100 times too large, a
bucket per card: 171); a deployment that outgrows its capacity raises it and refills. Values stay
under 64 bytes because the profile is packed before it is sealed
(app/domain/verification/disclosure.py: 42 bytes for a 3-character name). The bucket key carries the
card's shard tag, so on a cluster it shares a slot with the card's nonces, its shard's event stream
and epoch, and one script still decides a scan. Nonces (`:n:`), device revocations (`:d:`) and
entitlements (`:e`, only park passes) stay keys of their own under `card_key`. Changing the layout
(the capacity) means refilling the mirror from the database, `ecard status reconcile --repair`, like
any mirror that lost its data.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, NamedTuple, Protocol

import hiredis
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.stores.event_stream import EVENT_SHARDS, EVENT_STREAM_KEY, MemoryEventStream, shard_of, shard_prefix
from app.stores.resp import NotSent, RespPipe, supports
from crypto.credential import CARD_REF_LENGTH


class MirroredStatus(StrEnum):
    """An eCard's status as the verify path sees it (one letter, to keep Redis values small)."""

    PENDING_ACTIVATION = "P"
    ACTIVE = "A"
    SUSPENDED = "S"
    REVOKED = "R"


class StoreUnavailable(Exception):
    """The store cannot be reached; the verify path must fail closed.

    `sent`: the commands were sent before the failure, so they may have run (a scan's answer is then
    voided when the store is back). `outcome_unknown`: the store answered too late (it was stalled, not
    gone): the scan may well have run, and the caller must be told so. A connection that broke is taken
    as a store that is gone (it may have run a command in the instant before it died: the void covers
    the record).
    """

    def __init__(self, detail: str, *, sent: bool = False, outcome_unknown: bool = False) -> None:
        super().__init__(detail)
        self.sent = sent or outcome_unknown
        self.outcome_unknown = outcome_unknown


class ScanResult(StrEnum):
    """What the store can decide about a scan (the rest is decided before it is asked)."""

    ACCEPTED = "accepted"
    REPLAYED = "replayed"
    CARD_SUSPENDED = "card_suspended"
    CARD_REVOKED = "card_revoked"
    # The card is not in the mirror (never activated, or the mirror lost it): fail closed.
    CARD_UNKNOWN = "card_unknown"
    # The credential could have been shown before the store's epoch (the store lost its used nonces
    # since): it may be a replay, so it is refused; the holder's app shows a fresh one.
    REFRESH_REQUIRED = "refresh_required"


# Mirrored status → result; a card waiting for (re-)activation is not usable, like a suspended one.
_STATUS_RESULTS = {
    MirroredStatus.ACTIVE.value: ScanResult.ACCEPTED,
    MirroredStatus.SUSPENDED.value: ScanResult.CARD_SUSPENDED,
    MirroredStatus.PENDING_ACTIVATION.value: ScanResult.CARD_SUSPENDED,
    MirroredStatus.REVOKED.value: ScanResult.CARD_REVOKED,
}


class CardRecord(StrEnum):
    """Extra per-card values a disclosure policy may need, kept beside the status."""

    NONE = ""
    PROFILE = "p"  # AES-GCM ciphertext of the holder's disclosable profile (hospitals)
    ENTITLEMENTS = "e"  # JSON of the card's current entitlements (parks)

    @property
    def required(self) -> bool:
        """Whether an accepted scan needs the record: a card without a profile fails closed."""
        return self is CardRecord.PROFILE


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A terminal's limit: per_minute on average, burst at once (GCRA, exact at the boundary)."""

    per_minute: int
    burst: int

    @property
    def interval_ms(self) -> float:
        """Time one verification uses up."""
        return 60_000 / self.per_minute

    @property
    def tolerance_ms(self) -> float:
        """How far ahead of its schedule a terminal may run: burst - 1 intervals."""
        return self.interval_ms * (self.burst - 1)


@dataclass(frozen=True, slots=True)
class Scan:
    """One verification for the store: who asks, the event to record, and the credential's card.

    `decided` carries a result reached before the store (bad signature, wrong purpose…): then
    only the rate limit and the event apply. Otherwise the nonce and the card are consulted.
    """

    terminal: str
    verification_id: str
    rate: RateLimit
    now_ms: int
    event: bytes
    decided: str = ""
    card_ref: bytes = b""
    nonce: bytes = b""
    nonce_ttl: int = 0
    retry_window_ms: int = 0
    record: CardRecord = CardRecord.NONE
    # Appended to the rate key: scans of one terminal on another budget (batch uploads).
    rate_scope: str = ""
    # When the credential was used, if not now (a gate's offline scan): what a later replay reports.
    used_ms: int = 0
    # When the credential's window (skew included) began, in ms: refused as refresh_required if that
    # is before the store's epoch. None: no such rule (a gate's offline scans, checked in the event log).
    window_start_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ScanAnswer:
    """The store's decision.

    kind "limited": the terminal is over its rate (nothing consumed or recorded; retry after
    retry_after_ms). "retry": the same terminal showed the same credential again within its
    window: the first answer's result and verification id. "new": a fresh decision. "voided": this
    scan's caller was told "outcome unknown" and the scan was cancelled before it ran (nothing done).
    """

    kind: Literal["new", "retry", "limited", "allowed", "voided"]
    result: str = ""
    verification_id: str = ""
    first_used_ms: int = 0
    record: bytes | None = None
    retry_after_ms: int = 0


class MirrorEntry(NamedTuple):
    """One card as a bulk write gives it to the mirror, whole: its status, sealed profile and entitlements
    record under its mirror version (None: the card has none). See `mirror_many`.

    A tuple, not a dataclass: a rebuild makes one per card, millions, and a frozen dataclass's
    constructor cost twice as much."""

    card_ref: bytes
    version: int
    status: MirroredStatus
    profile: bytes | None
    entitlements: bytes | None


@dataclass(frozen=True, slots=True)
class HolderState:
    """What issuing needs from the store, in one round trip: the card's status, the device, the epoch."""

    status: str | None
    device_revoked: bool
    # When the card's shard of the store began remembering used nonces (ms since the Unix epoch).
    epoch_ms: int


class StatusMirror(Protocol):
    """What the verify and issuance paths need from the fast store."""

    async def scan(self, scan: Scan) -> ScanAnswer:
        """Decide scan atomically: rate limit, single use, card status, event; see `Scan`."""
        ...

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """Mirror a card's status, unversioned (tests and tools; the service uses `mirror_card`)."""
        ...

    async def set_record(self, card_ref: bytes, record: CardRecord, value: bytes | None) -> None:
        """Mirror (or, with None, drop) one of a card's extra records, unversioned."""
        ...

    async def mirror_card(
        self, card_ref: bytes, version: int, status: MirroredStatus, records: Mapping[CardRecord, bytes | None]
    ) -> bool:
        """Set a card's records (None drops one) and then its status, atomically, unless the store holds a
        newer version; whether it was written."""
        ...

    async def mirror_many(self, entries: Sequence[MirrorEntry]) -> int:
        """`mirror_card` of each card whole (a profile or entitlements record the entry lacks is dropped), in
        as few round trips as the store allows; how many were written (an entry older than the store's
        version of its card is not)."""
        ...

    async def set_refilling(self, refilling: bool, ttl: int = 120) -> None:
        """Say that the mirror is being refilled from the database (for ttl seconds: whoever refills
        renews it), or that it is full again. While it is, a scan of a card the mirror lacks may be
        answered from the database."""
        ...

    async def refilling(self) -> bool:
        """Whether the mirror is being refilled (see `set_refilling`)."""
        ...

    async def reopen(self, scan: Scan) -> bool:
        """Forget this scan's use of its credential if the store answered it card_unknown (the mirror
        lacked the card), so that it can run again once the card is mirrored; whether it was forgotten.
        Another scan's use, or another answer, is never forgotten."""
        ...

    async def get_record(self, card_ref: bytes, record: CardRecord) -> bytes | None:
        """One of a card's extra records, if mirrored."""
        ...

    async def holder_state(self, card_ref: bytes, device_id: uuid.UUID) -> HolderState:
        """The card's status, whether this device was unbound, and the shard's epoch (started if absent)."""
        ...

    async def get_statuses(self, card_refs: list[bytes]) -> list[str | None]:
        """Mirrored statuses of many cards (for reconciliation), in order (the letter, without the version)."""
        ...

    async def missing_records(self, card_refs: list[bytes], record: CardRecord) -> list[bool]:
        """For each card, whether the record is absent from the mirror (for reconciliation)."""
        ...

    async def revoke_device(self, card_ref: bytes, device_id: uuid.UUID, ttl: int) -> None:
        """Refuse the device's access tokens from now on (for ttl seconds: their longest life)."""
        ...

    async def void(self, scan: Scan) -> str:
        """After its caller was told "outcome unknown": mark the scan's answer undelivered if it ran
        ("marked", an event entry says so), or cancel it if it has not ("cancelled"); "other" when the
        credential's first use was another scan."""
        ...

    async def epochs_missing(self) -> bool:
        """Whether some shard has no epoch (the store is new, or lost its data)."""
        ...

    async def start_epochs(self, epoch_ms: int) -> None:
        """Give every shard without an epoch this one (the service does it at start-up)."""
        ...

    async def ping(self) -> None:
        """Raise StoreUnavailable when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


# The status letter of a card whose mirror value holds a profile but no status (yet).
NO_STATUS = "-"
# The start of a card's value in its bucket, by status (`card_value`).
_VALUE_HEAD = {status: status.value.encode() for status in MirroredStatus}


def status_letter(value: str | None) -> str | None:
    """The status part of a mirrored value (`A17` → `A`; None for no status)."""
    return value[:1] if value and value[:1] != NO_STATUS else None


def card_value(status: MirroredStatus, version: int, profile: bytes | None) -> bytes:
    """A card's value in its bucket: status letter, mirror version, and "." and the profile if any (`A17.…`)."""
    head = _VALUE_HEAD[status] + str(version).encode()
    return head + b"." + profile if profile else head


def profile_part(value: bytes | None) -> bytes | None:
    """The sealed profile part of a card's mirror value (`A17.<profile>`), if it has one."""
    if not value:
        return None
    dot = value.find(b".", 1)
    return value[dot + 1 :] if dot > 0 else None


# ARGV[12] says where the terminal's rate is taken: "with" (KEYS[1] is its rate key, the other
# keys follow), "only" (KEYS[1] is the rate key and nothing else happens: the first call of a
# cluster's two) or "none" (taken already). The other keys, from k (2 with the rate key, else 1):
# KEYS[k] the shard's event stream; with a card also KEYS[k+1] nonce, KEYS[k+2] the card's bucket hash,
# KEYS[k+3] the shard's epoch and (for entitlements) KEYS[k+4] the entitlements key.
# ARGV[1] now (ms), ARGV[2] rate interval (ms), ARGV[3] burst tolerance (ms), ARGV[4] event,
# ARGV[5] result decided before the store ("" = consult the card), ARGV[6] nonce lifetime (s),
# ARGV[7] terminal, ARGV[8] verification id, ARGV[9] retry window (ms), ARGV[10] "1" when the
# record is required (a missing one then fails closed as card_unknown), ARGV[11] when the
# credential was used (ms; the scan time of an offline scan, else now), ARGV[13] when the
# credential's window began (ms; "" = no epoch rule), ARGV[14] the card's field in its bucket,
# ARGV[15] the record to disclose ("p" the profile, in the card's value; "e" the entitlements key; "").
# The nonce's value remembers the first use: "terminal|verification id|ms|result", with "|u" after
# it while that answer is known not to have reached the terminal (see _VOID_LUA) and "|d" once a
# retry gave it to the terminal (then it is never voided); "…|void" is a cancelled scan that never ran.
# A card's value is its status letter, the eCard's mirror version and "." and the profile if any ("A17.…").
# Marker entries of the stream ({m: u|d, i: verification id}) say an answer was not, or after all
# was, delivered. A Lua nil would end the returned array, so absent values come back as "".
_SCAN_LUA = """
local results_by_status = STATUS_RESULTS
local now = tonumber(ARGV[1])
local k = 1
if ARGV[12] ~= 'none' then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local over = tat - now - tonumber(ARGV[3])
  if over > 0 then return {'limited', '', '', '0', '', tostring(math.ceil(over))} end
  local next_tat = tat + tonumber(ARGV[2])
  redis.call('SET', KEYS[1], string.format('%.3f', next_tat), 'PX', math.ceil(next_tat - now) + 1)
  if ARGV[12] == 'only' then return {'allowed', '', '', '0', '', '0'} end
  k = 2
end
local stream, nonce_key, bucket_key, epoch_key, record_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
local field, record_kind = ARGV[14], ARGV[15]
-- The record to disclose; value: the card's value in its bucket (false if absent).
local function record_of(value)
  if record_kind == 'e' then return redis.call('GET', record_key) or '' end
  local dot = value and string.find(value, '.', 2, true)
  return dot and string.sub(value, dot + 1) or ''
end
local result = ARGV[5]
local first = ARGV[11]
local record = ''
if result == '' then
  local fresh = true
  local previous = redis.call('GET', nonce_key)
  if previous then
    local terminal, id, at, outcome, flag = string.match(previous, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|?([^|]*)$')
    if outcome == 'void' then
      -- A cancelled scan never used the credential; only that scan itself, arriving late, is refused.
      if id == ARGV[8] then return {'voided', '', id, '0', '', '0'} end
    else
      fresh = false
      if terminal == ARGV[7] and now - tonumber(at) <= tonumber(ARGV[9]) then
        if outcome == 'accepted' and record_kind ~= '' then
          record = record_of(record_kind == 'p' and redis.call('HGET', bucket_key, field))
        end
        if flag ~= 'd' then
          -- The terminal has the answer now: a void arriving later must not mark it undelivered.
          redis.call('SET', nonce_key, terminal .. '|' .. id .. '|' .. at .. '|' .. outcome .. '|d', 'KEEPTTL')
          if flag == 'u' then redis.call('XADD', stream, '*', 'm', 'd', 'i', id) end
        end
        return {'retry', outcome, id, at, record, '0'}
      end
      result = 'replayed'
      first = at
    end
  end
  if fresh then
    local epoch = redis.call('GET', epoch_key)
    if not epoch then
      epoch = ARGV[1]
      redis.call('SET', epoch_key, epoch)
    end
    if ARGV[13] ~= '' and tonumber(ARGV[13]) < tonumber(epoch) then
      result = 'refresh_required'
    else
      local value = redis.call('HGET', bucket_key, field)
      result = (value and results_by_status[string.sub(value, 1, 1)]) or 'card_unknown'
      if result == 'accepted' and record_kind ~= '' then
        record = record_of(value)
        if record == '' and ARGV[10] == '1' then result = 'card_unknown' end
      end
      redis.call('SET', nonce_key, ARGV[7] .. '|' .. ARGV[8] .. '|' .. ARGV[11] .. '|' .. result, 'EX', ARGV[6])
    end
  end
end
redis.call('XADD', stream, '*', 'e', ARGV[4], 'r', result)
return {'new', result, ARGV[8], first, record, '0'}
""".replace(
    "STATUS_RESULTS",
    "{" + ", ".join(f"{status}='{result.value}'" for status, result in _STATUS_RESULTS.items()) + "}",
)

# KEYS[1] the shard's epoch, KEYS[2] the card's bucket, KEYS[3] the device's revocation; ARGV[1] now (ms),
# ARGV[2] the card's field. Returns the status letter, not the card's whole value (its profile stays here).
_HOLDER_LUA = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local value = redis.call('HGET', KEYS[2], ARGV[2])
return {value and string.sub(value, 1, 1) or '', redis.call('EXISTS', KEYS[3]), epoch}
"""

# Any number of cards of one shard (one slot): card i's bucket KEYS[2i-1] and entitlements key KEYS[2i];
# its 7 arguments from ARGV[7(i-1)+1]: field, version ("" = unversioned: no guard, and the value
# keeps none), status letter ("" keeps the card's status and version), profile ("k" keep, "d" drop, "s" set
# to the next argument), the profile, entitlements (the same three), the entitlements. A card whose store
# holds a newer version is left alone. Returns how many cards were written. `_mirror_one` sends one card;
# bulk writes, which give cards whole, have `_REPLACE_LUA`.
_MIRROR_LUA = """
local written = 0
for i = 1, #KEYS / 2 do
  local bucket, entitlements, a = KEYS[2 * i - 1], KEYS[2 * i], 7 * (i - 1)
  local field, version, status = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local current = redis.call('HGET', bucket, field)
  local letter, current_version, profile = '-', '', nil
  if current then
    local dot = string.find(current, '.', 2, true)
    letter, current_version = string.sub(current, 1, 1), string.sub(current, 2, (dot or 0) - 1)
    if dot then profile = string.sub(current, dot + 1) end
  end
  if version == '' or (tonumber(current_version) or 0) <= tonumber(version) then
    if status ~= '' then letter, current_version = status, version end
    if ARGV[a + 4] == 'd' then profile = nil elseif ARGV[a + 4] == 's' then profile = ARGV[a + 5] end
    if ARGV[a + 6] == 'd' then
      redis.call('DEL', entitlements)
    elseif ARGV[a + 6] == 's' then
      redis.call('SET', entitlements, ARGV[a + 7])
    end
    if letter == '-' and not profile then
      redis.call('HDEL', bucket, field)
    else
      redis.call('HSET', bucket, field, letter .. current_version .. (profile and ('.' .. profile) or ''))
    end
    written = written + 1
  end
end
return written
"""

# `mirror_many`'s script for cards given whole (status, profile and entitlements): for the i-th card
# KEYS[2i-1] its bucket, KEYS[2i] its entitlements key, ARGV[4(i-1)+1..4] its field, version, the
# value of its field (`card_value`, built by the caller) and its
# entitlements ("" = none). A card whose store holds a newer version is left alone. Returns how many
# cards were written.
_REPLACE_LUA = """
local written = 0
for i = 1, #KEYS / 2 do
  local bucket, a = KEYS[2 * i - 1], 4 * (i - 1)
  local current = redis.call('HGET', bucket, ARGV[a + 1])
  local current_version = 0
  if current then
    local dot = string.find(current, '.', 2, true)
    current_version = tonumber(string.sub(current, 2, (dot or 0) - 1)) or 0
  end
  if current_version <= tonumber(ARGV[a + 2]) then
    redis.call('HSET', bucket, ARGV[a + 1], ARGV[a + 3])
    if ARGV[a + 4] == '' then
      redis.call('DEL', KEYS[2 * i])
    else
      redis.call('SET', KEYS[2 * i], ARGV[a + 4])
    end
    written = written + 1
  end
end
return written
"""

# KEYS[1] the shard's event stream, KEYS[2] the nonce; ARGV[1] verification id, ARGV[2] terminal,
# ARGV[3] now (ms), ARGV[4] nonce lifetime (s). See `StatusMirror.void`.
_VOID_LUA = """
local previous = redis.call('GET', KEYS[2])
if not previous then
  redis.call('SET', KEYS[2], ARGV[2] .. '|' .. ARGV[1] .. '|' .. ARGV[3] .. '|void', 'EX', ARGV[4])
  return 'cancelled'
end
local terminal, id, at, outcome, flag = string.match(previous, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|?([^|]*)$')
if id ~= ARGV[1] or outcome == 'void' then return 'other' end
if flag == '' then
  redis.call('SET', KEYS[2], previous .. '|u', 'KEEPTTL')
  redis.call('XADD', KEYS[1], '*', 'm', 'u', 'i', id)
elseif flag == 'd' then
  return 'other'
end
return 'marked'
"""

# KEYS[1] the nonce; ARGV[1] verification id. See `StatusMirror.reopen`.
_REOPEN_LUA = """
local previous = redis.call('GET', KEYS[1])
if not previous then return 0 end
local terminal, id, at, outcome = string.match(previous, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)')
if id ~= ARGV[1] or outcome ~= 'card_unknown' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# How long a Redis call may take before the store counts as unavailable (connecting, or answering).
TIMEOUT = 1.0


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()  # noqa: S324 (Redis names scripts by SHA-1)


_SCRIPTS = {
    _sha(script): script for script in (_SCAN_LUA, _HOLDER_LUA, _MIRROR_LUA, _VOID_LUA, _REOPEN_LUA, _REPLACE_LUA)
}
_SCAN_SHA, _HOLDER_SHA, _MIRROR_SHA, _VOID_SHA, _REOPEN_SHA, _REPLACE_SHA = _SCRIPTS
EPOCH_KEY = "epoch"
REFILLING_KEY = "refilling"
# Cards per round trip of a bulk write.
MIRROR_BATCH = 2000
# A card's entitlements key after `card_key`.
ENTITLEMENTS_SUFFIX = ":" + CardRecord.ENTITLEMENTS.value
# How `_MIRROR_LUA` is told to treat one of a card's records.
_KEEP_RECORD = ("k", "")
_DELETE_RECORD = ("d", "")


def _record_args(records: Mapping[CardRecord, bytes | None], record: CardRecord) -> tuple[str, bytes | str]:
    """A record's two arguments of `_MIRROR_LUA`: kept as the store has it (absent from records), deleted
    (None or empty), or set."""
    if record not in records:
        return _KEEP_RECORD
    value = records[record]
    return ("s", value) if value else _DELETE_RECORD


def card_key(prefix: str, card_ref: bytes) -> str:
    """The start of a card's own keys (":n:<nonce>", ":d:<device>", ":e" entitlements): its shard's tag, the card."""
    return f"{shard_prefix(prefix, shard_of(card_ref))}{card_ref.hex()}"


# Cards per bucket hash at the expected capacity, at most (at least half as many): see the module's docstring.
CARDS_PER_BUCKET = 64
DEFAULT_CAPACITY = 1_000_000
BUCKET_KEY = "b:"


@dataclass(frozen=True, slots=True)
class MirrorLayout:
    """Which bucket hash holds a card's status and profile, and under which field (module docstring)."""

    # Buckets per shard: 2**bits, numbered by the top bits of the card reference.
    bits: int

    @classmethod
    def for_capacity(cls, cards: int) -> MirrorLayout:
        """The layout for a deployment of about this many cards: 32 to 64 of them per bucket."""
        buckets = max(cards, 1) / (EVENT_SHARDS * CARDS_PER_BUCKET)
        return cls(min(max(math.ceil(math.log2(buckets)), 0), 32) if buckets > 1 else 0)

    def bucket_key(self, shard: str, card_ref: bytes) -> str:
        """The card's bucket under its shard's prefix (`shard_prefix`)."""
        head = int.from_bytes(card_ref[:4].ljust(4, b"\0"), "big")
        return f"{shard}{BUCKET_KEY}{head >> (32 - self.bits) if self.bits else 0:x}"

    def placer(self, prefix: str) -> Callable[[bytes], tuple[str, str, bytes]]:
        """`place` for many cards of one deployment: a function of a card reference giving its shard's prefix,
        its bucket key and its field, with what does not depend on the card computed once (a bulk write
        places millions of cards; the card's own arithmetic is all that is left per card)."""
        shards = tuple(shard_prefix(prefix, shard) for shard in range(EVENT_SHARDS))
        buckets = tuple(shard + BUCKET_KEY for shard in shards)
        shift, skip, bits = 32 - self.bits, self.bits // 8, self.bits

        def place(card_ref: bytes) -> tuple[str, str, bytes]:
            shard = shard_of(card_ref)
            if len(card_ref) != CARD_REF_LENGTH:  # the general rules (`bucket_key`, `field`) for odd references
                return shards[shard], self.bucket_key(shards[shard], card_ref), card_ref
            number = int.from_bytes(card_ref[:4], "big") >> shift if bits else 0
            return shards[shard], f"{buckets[shard]}{number:x}", card_ref[skip:]

        return place

    def field(self, card_ref: bytes) -> bytes:
        """The card's field in its bucket: the reference less the whole bytes the bucket number gives."""
        return card_ref[self.bits // 8 :] if len(card_ref) == CARD_REF_LENGTH else card_ref

    def place(self, prefix: str, card_ref: bytes) -> tuple[str, bytes]:
        """The card's bucket key under the deployment's prefix, and its field there."""
        return self.bucket_key(shard_prefix(prefix, shard_of(card_ref)), card_ref), self.field(card_ref)


# A command waiting for this event-loop turn's pipeline: its arguments, the parser of its reply,
# and the future the caller awaits.
_Queued = tuple[tuple[Any, ...], Callable[[Any], Any], "asyncio.Future[Any]"]


def _holder_state(reply: list[Any]) -> HolderState:
    status, revoked, epoch = reply
    return HolderState(status_letter(status.decode()), int(revoked) == 1, int(epoch))


def _unavailable(exc: Exception) -> StoreUnavailable:
    """The store failed; whether what was sent may have run decides what a caller may promise."""
    return StoreUnavailable(str(exc), sent=not _never_sent(exc), outcome_unknown=isinstance(exc, RedisTimeoutError))


def _never_sent(exc: Exception) -> bool:
    """Whether the failure happened before anything reached the store (no connection could be made)."""
    if isinstance(exc, NotSent):
        return True
    # redis-py says so only in its message: "Error 111 connecting to host:port. Connection refused."
    return isinstance(exc, RedisConnectionError) and " connecting to " in str(exc)


def _answer(reply: list[bytes]) -> ScanAnswer:
    kind, result, verification_id, first, record, retry_after = reply
    return ScanAnswer(
        kind=kind.decode(),  # type: ignore[arg-type]
        result=result.decode(),
        verification_id=verification_id.decode(),
        first_used_ms=int(first),
        record=record or None,
        retry_after_ms=int(retry_after),
    )


class RedisStatusMirror:
    """Nonces, statuses, rate counters and the event stream in Redis.

    The calls of the hot paths (scans, the holder state every credential refresh reads) arriving
    in the same event-loop turn share one pipeline: each stays atomic on its own, and a burst
    costs one round trip and one read timeout instead of one per request.
    """

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        prefix: str,
        cluster: bool = False,
        pipe: RespPipe | None = None,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._cluster = cluster
        self._layout = MirrorLayout.for_capacity(capacity)
        self._place = self._layout.placer(prefix)
        # The hot calls' own connection (one node, plain TCP or TLS); without it they go through redis-py.
        self._pipe = pipe
        self._queue: list[_Queued] = []
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls, url: str, prefix: str, cluster: bool = False, capacity: int = DEFAULT_CAPACITY
    ) -> RedisStatusMirror:
        """Connect lazily; short timeouts so an outage turns into a quick 503, not a hang.

        With cluster, url names any node of a Redis Cluster; the client learns the others. capacity: the
        number of cards the deployment expects, which sizes the bucket hashes (`MirrorLayout`).
        """
        options: dict[str, Any] = {"socket_timeout": TIMEOUT, "socket_connect_timeout": TIMEOUT}
        if cluster:
            return cls(redis.RedisCluster.from_url(url, **options), prefix, cluster=True, capacity=capacity)
        # redis:// and rediss:// alike: the hot calls keep their own connection over TLS too.
        pipe = RespPipe(url, TIMEOUT, TIMEOUT) if supports(url) else None
        # A pooled connection that Redis closed (it restarted) is found out by the next call: that call
        # is sent once more on a new connection. Every call here may run twice: writes set values, and a
        # scan run again is the same terminal's retry, which repeats the first answer.
        options.update(retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])
        return cls(redis.Redis.from_url(url, **options), prefix, pipe=pipe, capacity=capacity)

    @property
    def client(self) -> redis.Redis | redis.RedisCluster:
        """The connection pool."""
        return self._client

    @property
    def layout(self) -> MirrorLayout:
        """Where cards' statuses and profiles are (tools that read the mirror's keys need it)."""
        return self._layout

    def _card_key(self, card_ref: bytes) -> str:
        return card_key(self._prefix, card_ref)

    def _bucket(self, card_ref: bytes) -> tuple[str, bytes]:
        return self._layout.place(self._prefix, card_ref)

    async def scan(self, scan: Scan) -> ScanAnswer:
        """See `StatusMirror.scan`; queued for this event-loop turn's pipeline.

        On a cluster the terminal's rate key lies in another slot than the card's keys, so the
        rate is taken first by a call of its own (both calls are queued like any other).
        """
        rate_key = f"{self._prefix}rate:{scan.terminal}{scan.rate_scope}"
        if self._cluster:
            rate: ScanAnswer = await self._queued(
                ("EVALSHA", _SCAN_SHA, 1, rate_key, *self._scan_args(scan, "only", b"")), _answer
            )
            if rate.kind == "limited":
                return rate
            keys, field = self._scan_keys(scan)
            mode = "none"
        else:
            card_keys, field = self._scan_keys(scan)
            keys = (rate_key, *card_keys)
            mode = "with"
        answer: ScanAnswer = await self._queued(
            ("EVALSHA", _SCAN_SHA, len(keys), *keys, *self._scan_args(scan, mode, field)), _answer
        )
        return answer

    async def _queued(self, command: tuple[Any, ...], parse: Callable[[Any], Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, parse, future))
        if len(self._queue) == 1:
            # The task's first step runs in the next loop turn, after every handler of this one queued
            # its call: it takes the queue then (no callback in between, one turn less per request).
            task = asyncio.ensure_future(self._run_queue())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return await future

    async def _run_queue(self) -> None:
        batch, self._queue = self._queue, []
        try:
            results = await self._execute(batch)
        except (RedisError, OSError) as exc:
            error = _unavailable(exc)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, parse, future), reply in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(parse(reply))

    async def _execute(self, batch: list[_Queued]) -> list[Any]:
        """Run the batch's commands; load the script first if the server lost it."""
        results = await self._pipeline(batch)
        # A NOSCRIPT reply means that call did nothing, so those (and only those) run again.
        lost = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
        if lost:
            for sha in {batch[index][0][1] for index in lost}:
                await self._client.script_load(_SCRIPTS[sha])
            for index, result in zip(lost, await self._pipeline([batch[i] for i in lost]), strict=True):
                results[index] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _scan_keys(self, scan: Scan) -> tuple[tuple[str, ...], bytes]:
        """The shard's event stream and, for a scan the store decides, the card's keys (one slot); its field."""
        if scan.decided:
            return (shard_prefix(self._prefix, shard_of(scan.verification_id.encode())) + EVENT_STREAM_KEY,), b""
        shard = shard_prefix(self._prefix, shard_of(scan.card_ref))
        card_key = shard + scan.card_ref.hex()
        bucket = self._layout.bucket_key(shard, scan.card_ref)
        keys: tuple[str, ...] = (
            shard + EVENT_STREAM_KEY,
            f"{card_key}:n:{scan.nonce.hex()}",
            bucket,
            shard + EPOCH_KEY,
        )
        if scan.record is CardRecord.ENTITLEMENTS:
            keys = (*keys, f"{card_key}:{scan.record.value}")
        return keys, self._layout.field(scan.card_ref)

    @staticmethod
    def _scan_args(scan: Scan, rate_mode: str, field: bytes) -> tuple[Any, ...]:
        return (
            scan.now_ms, scan.rate.interval_ms, scan.rate.tolerance_ms, scan.event, scan.decided,
            scan.nonce_ttl, scan.terminal, scan.verification_id, scan.retry_window_ms,
            "1" if scan.record.required else "0", scan.used_ms or scan.now_ms, rate_mode,
            "" if scan.window_start_ms is None else scan.window_start_ms, field, scan.record.value,
        )  # fmt: skip

    async def _pipeline(self, batch: list[_Queued]) -> list[Any]:
        if self._pipe is not None:
            return await self._pipe.execute([command for command, _, _ in batch])
        async with self._client.pipeline(transaction=False) as pipe:
            for command, _, _ in batch:
                pipe.execute_command(*command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _mirror_one(
        self, card_ref: bytes, version: int | None, status: str, records: Mapping[CardRecord, bytes | None]
    ) -> bool:
        """One card's `_MIRROR_LUA` call; whether it was written."""
        shard, bucket, field = self._place(card_ref)
        keys = (bucket, f"{shard}{card_ref.hex()}{ENTITLEMENTS_SUFFIX}")
        args = [field, "" if version is None else version, status, *_record_args(records, CardRecord.PROFILE),
                *_record_args(records, CardRecord.ENTITLEMENTS)]  # fmt: skip
        try:
            try:
                written = await self._client.evalsha(_MIRROR_SHA, len(keys), *keys, *args)
            except NoScriptError:
                await self._client.script_load(_MIRROR_LUA)
                written = await self._client.evalsha(_MIRROR_SHA, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return int(written) == 1

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """See `StatusMirror.set_status`; the card's profile stays."""
        await self._mirror_one(card_ref, None, status.value, {})

    async def set_record(self, card_ref: bytes, record: CardRecord, value: bytes | None) -> None:
        """See `StatusMirror.set_record`; the card's status and version stay."""
        await self._mirror_one(card_ref, None, "", {record: value})

    async def mirror_card(
        self, card_ref: bytes, version: int, status: MirroredStatus, records: Mapping[CardRecord, bytes | None]
    ) -> bool:
        """See `StatusMirror.mirror_card`; one script call on the card's keys (one slot)."""
        return await self._mirror_one(card_ref, version, status.value, records)

    async def mirror_many(self, entries: Sequence[MirrorEntry]) -> int:
        """See `StatusMirror.mirror_many`: MIRROR_BATCH cards per pipeline, in one `_REPLACE_LUA` call per shard
        (the cards of a call share a slot); on a cluster the pipeline sends each node the calls of its shards.
        A card's value is built here, so the script only compares versions and writes."""
        written = 0
        place = self._place
        for start in range(0, len(entries), MIRROR_BATCH):
            calls: dict[str, tuple[list[str], list[Any]]] = {}
            for card_ref, version, status, profile, entitlements in entries[start : start + MIRROR_BATCH]:
                shard, bucket, field = place(card_ref)
                keys, args = calls.setdefault(shard, ([], []))
                keys += (bucket, f"{shard}{card_ref.hex()}{ENTITLEMENTS_SUFFIX}")
                args += (field, version, card_value(status, version, profile), entitlements or b"")
            commands = [("EVALSHA", _REPLACE_SHA, len(keys), *keys, *args) for keys, args in calls.values()]
            try:
                await self._client.script_load(_REPLACE_LUA)
                results = await self._bulk(commands)
            except (RedisError, OSError) as exc:
                raise _unavailable(exc) from exc
            written += sum(int(result) for result in results)
        return written

    async def _bulk(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run large commands in one pipeline: on a cluster redis-py's, which sends each node its own; on
        one node hiredis packs them on a pooled connection (not the hot calls' own: scans are not queued
        behind a bulk write), as redis-py's packing costs ~1 µs per argument, most of a bulk write's
        client time (2,000 cards: 22 ms against 3)."""
        if isinstance(self._client, redis.RedisCluster):
            async with self._client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                results: list[Any] = await pipe.execute()
            return results
        pool = self._client.connection_pool
        connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(b"".join(hiredis.pack_command(command) for command in commands))
            return [await connection.read_response() for _ in commands]
        except BaseException:
            # Replies may be left unread on it: it must not serve another call.
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)

    async def set_refilling(self, refilling: bool, ttl: int = 120) -> None:
        """See `StatusMirror.set_refilling`."""
        try:
            if refilling:
                await self._client.set(self._prefix + REFILLING_KEY, "1", ex=max(ttl, 1))
            else:
                await self._client.delete(self._prefix + REFILLING_KEY)
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def refilling(self) -> bool:
        """See `StatusMirror.refilling`."""
        try:
            return bool(await self._client.exists(self._prefix + REFILLING_KEY))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def reopen(self, scan: Scan) -> bool:
        """See `StatusMirror.reopen`."""
        key = f"{self._card_key(scan.card_ref)}:n:{scan.nonce.hex()}"
        reopened: int = await self._queued(("EVALSHA", _REOPEN_SHA, 1, key, scan.verification_id), int)
        return reopened == 1

    async def void(self, scan: Scan) -> str:
        """See `StatusMirror.void`."""
        shard = shard_prefix(self._prefix, shard_of(scan.card_ref))
        keys = (shard + EVENT_STREAM_KEY, f"{self._card_key(scan.card_ref)}:n:{scan.nonce.hex()}")
        args = (scan.verification_id, scan.terminal, time.time_ns() // 1_000_000, max(scan.nonce_ttl, 1))
        outcome: bytes = await self._queued(("EVALSHA", _VOID_SHA, len(keys), *keys, *args), lambda reply: reply)
        return outcome.decode()

    async def epochs_missing(self) -> bool:
        """See `StatusMirror.epochs_missing`."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for shard in range(EVENT_SHARDS):
                    pipe.exists(shard_prefix(self._prefix, shard) + EPOCH_KEY)
                found = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return not all(found)

    async def start_epochs(self, epoch_ms: int) -> None:
        """See `StatusMirror.start_epochs`."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for shard in range(EVENT_SHARDS):
                    pipe.set(shard_prefix(self._prefix, shard) + EPOCH_KEY, epoch_ms, nx=True)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def get_record(self, card_ref: bytes, record: CardRecord) -> bytes | None:
        """See `StatusMirror.get_record`."""
        try:
            if record is CardRecord.PROFILE:
                return profile_part(await self._client.hget(*self._bucket(card_ref)))  # type: ignore[arg-type]
            value = await self._client.get(f"{self._card_key(card_ref)}:{record.value}")
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return value if isinstance(value, bytes) else None

    async def holder_state(self, card_ref: bytes, device_id: uuid.UUID) -> HolderState:
        """See `StatusMirror.holder_state`; the keys carry the card's hash tag (one slot), queued like scans."""
        shard = shard_prefix(self._prefix, shard_of(card_ref))
        keys = (
            shard + EPOCH_KEY,
            self._layout.bucket_key(shard, card_ref),
            f"{shard}{card_ref.hex()}:d:{device_id.hex}",
        )
        now = time.time_ns() // 1_000_000
        state: HolderState = await self._queued(
            ("EVALSHA", _HOLDER_SHA, len(keys), *keys, now, self._layout.field(card_ref)), _holder_state
        )
        return state

    async def _card_values(self, card_refs: list[bytes]) -> list[bytes | None]:
        """The cards' values in their buckets (None: absent), in order; a pipeline (many slots on a cluster)."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for card_ref in card_refs:
                    pipe.hget(*self._bucket(card_ref))
                values: list[bytes | None] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return values

    async def get_statuses(self, card_refs: list[bytes]) -> list[str | None]:
        """See `StatusMirror.get_statuses`."""
        return [status_letter(value[:1].decode()) if value else None for value in await self._card_values(card_refs)]

    async def missing_records(self, card_refs: list[bytes], record: CardRecord) -> list[bool]:
        """See `StatusMirror.missing_records`."""
        if record is CardRecord.PROFILE:
            return [profile_part(value) is None for value in await self._card_values(card_refs)]
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for card_ref in card_refs:
                    pipe.exists(f"{self._card_key(card_ref)}:{record.value}")
                values = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        return [not value for value in values]

    async def revoke_device(self, card_ref: bytes, device_id: uuid.UUID, ttl: int) -> None:
        """See `StatusMirror.revoke_device`."""
        try:
            await self._client.set(f"{self._card_key(card_ref)}:d:{device_id.hex}", "1", ex=max(ttl, 1))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def ping(self) -> None:
        """See `StatusMirror.ping`."""
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        """See `StatusMirror.close`."""
        if self._pipe is not None:
            self._pipe.close()
        await self._client.aclose()


@dataclass(slots=True)
class _FirstUse:
    terminal: str
    verification_id: str
    at_ms: int
    result: str
    until: float
    # "u": the answer is known not to have reached the terminal (see `StatusMirror.void`); "d": a retry
    # gave it to the terminal, so it is never voided.
    flag: str = ""


VOID = "void"


class MemoryStatusMirror:
    """The same decisions in this process: correct only while the service runs one worker.

    Its epoch is the process's start: nonces used before a restart are gone with the process.
    """

    def __init__(self, events: MemoryEventStream | None = None) -> None:
        self.events = events or MemoryEventStream()
        self._nonces: dict[tuple[bytes, bytes], _FirstUse] = {}
        self._statuses: dict[bytes, tuple[str, int]] = {}
        self._records: dict[tuple[bytes, CardRecord], bytes] = {}
        self._rates: dict[str, float] = {}
        self._revoked_devices: dict[uuid.UUID, float] = {}
        self._next_purge = 0.0
        self._epoch_ms: int | None = None
        self._refilling_until = 0.0

    def _purge(self, now: float) -> None:
        if now >= self._next_purge:
            self._nonces = {key: use for key, use in self._nonces.items() if use.until > now}
            self._revoked_devices = {key: until for key, until in self._revoked_devices.items() if until > now}
            self._next_purge = now + 10.0

    def _epoch(self) -> int:
        if self._epoch_ms is None:
            self._epoch_ms = time.time_ns() // 1_000_000
        return self._epoch_ms

    async def scan(self, scan: Scan) -> ScanAnswer:
        """See `StatusMirror.scan`; atomic because nothing here awaits (the Lua script, in Python)."""
        now = scan.now_ms
        rate_key = scan.terminal + scan.rate_scope
        tat = max(self._rates.get(rate_key, 0.0), now)
        over = tat - now - scan.rate.tolerance_ms
        if over > 0:
            return ScanAnswer("limited", retry_after_ms=math.ceil(over))
        self._rates[rate_key] = tat + scan.rate.interval_ms
        used = scan.used_ms or now
        result, first = scan.decided, used
        if not result:
            clock = time.monotonic()
            self._purge(clock)
            key = (scan.card_ref, scan.nonce)
            previous = self._nonces.get(key)
            if previous is not None and previous.until <= clock:
                previous = None
            if previous is not None and previous.result == VOID:
                if previous.verification_id == scan.verification_id:
                    return ScanAnswer("voided", verification_id=scan.verification_id)
                previous = None
            if previous is not None:
                if previous.terminal == scan.terminal and now - previous.at_ms <= scan.retry_window_ms:
                    if previous.flag == "u":
                        self.events.mark(previous.verification_id, delivered=True)
                    previous.flag = "d"
                    return ScanAnswer(
                        "retry", previous.result, previous.verification_id, previous.at_ms,
                        self._record_for(scan, previous.result),
                    )  # fmt: skip
                result, first = ScanResult.REPLAYED.value, previous.at_ms
            elif scan.window_start_ms is not None and scan.window_start_ms < self._epoch():
                result = ScanResult.REFRESH_REQUIRED.value
            else:
                status = status_letter(self._statuses.get(scan.card_ref, ("", 0))[0]) or ""
                result = _STATUS_RESULTS.get(status, ScanResult.CARD_UNKNOWN).value
                if result == ScanResult.ACCEPTED and scan.record.required and self._record_for(scan, result) is None:
                    result = ScanResult.CARD_UNKNOWN.value
                self._nonces[key] = _FirstUse(scan.terminal, scan.verification_id, used, result, clock + scan.nonce_ttl)
        self.events.append(scan.event, result)
        return ScanAnswer("new", result, scan.verification_id, first, self._record_for(scan, result))

    def _record_for(self, scan: Scan, result: str) -> bytes | None:
        if result != ScanResult.ACCEPTED or not scan.record:
            return None
        return self._records.get((scan.card_ref, scan.record))

    async def set_status(self, card_ref: bytes, status: MirroredStatus) -> None:
        """See `StatusMirror.set_status`."""
        self._statuses[card_ref] = (status.value, 0)

    async def set_record(self, card_ref: bytes, record: CardRecord, value: bytes | None) -> None:
        """See `StatusMirror.set_record`."""
        if value is None:
            self._records.pop((card_ref, record), None)
        else:
            self._records[(card_ref, record)] = value

    async def mirror_card(
        self, card_ref: bytes, version: int, status: MirroredStatus, records: Mapping[CardRecord, bytes | None]
    ) -> bool:
        """See `StatusMirror.mirror_card`."""
        current = self._statuses.get(card_ref)
        if current is not None and current[1] > version:
            return False
        for record, value in records.items():
            await self.set_record(card_ref, record, value)
        self._statuses[card_ref] = (status.value, version)
        return True

    async def mirror_many(self, entries: Sequence[MirrorEntry]) -> int:
        """See `StatusMirror.mirror_many`."""
        written = 0
        for card_ref, version, status, profile, entitlements in entries:
            records = {CardRecord.PROFILE: profile, CardRecord.ENTITLEMENTS: entitlements}
            written += await self.mirror_card(card_ref, version, status, records)
        return written

    async def set_refilling(self, refilling: bool, ttl: int = 120) -> None:
        """See `StatusMirror.set_refilling`."""
        self._refilling_until = time.monotonic() + ttl if refilling else 0.0

    async def refilling(self) -> bool:
        """See `StatusMirror.refilling`."""
        return self._refilling_until > time.monotonic()

    async def reopen(self, scan: Scan) -> bool:
        """See `StatusMirror.reopen`."""
        key = (scan.card_ref, scan.nonce)
        previous = self._nonces.get(key)
        if previous is None or previous.verification_id != scan.verification_id:
            return False
        if previous.result != ScanResult.CARD_UNKNOWN:
            return False
        del self._nonces[key]
        return True

    async def get_record(self, card_ref: bytes, record: CardRecord) -> bytes | None:
        """See `StatusMirror.get_record`."""
        return self._records.get((card_ref, record))

    async def holder_state(self, card_ref: bytes, device_id: uuid.UUID) -> HolderState:
        """See `StatusMirror.holder_state`."""
        until = self._revoked_devices.get(device_id)
        status = self._statuses.get(card_ref)
        revoked = until is not None and until > time.monotonic()
        return HolderState(status[0] if status else None, revoked, self._epoch())

    async def get_statuses(self, card_refs: list[bytes]) -> list[str | None]:
        """See `StatusMirror.get_statuses`."""
        return [status[0] if (status := self._statuses.get(card_ref)) else None for card_ref in card_refs]

    async def missing_records(self, card_refs: list[bytes], record: CardRecord) -> list[bool]:
        """See `StatusMirror.missing_records`."""
        return [(card_ref, record) not in self._records for card_ref in card_refs]

    async def revoke_device(self, card_ref: bytes, device_id: uuid.UUID, ttl: int) -> None:
        """See `StatusMirror.revoke_device`."""
        self._revoked_devices[device_id] = time.monotonic() + ttl

    async def void(self, scan: Scan) -> str:
        """See `StatusMirror.void` (a scan here never times out; kept for the contract)."""
        key = (scan.card_ref, scan.nonce)
        previous = self._nonces.get(key)
        if previous is None or previous.until <= time.monotonic():
            self._nonces[key] = _FirstUse(
                scan.terminal, scan.verification_id, time.time_ns() // 1_000_000, VOID,
                time.monotonic() + max(scan.nonce_ttl, 1),
            )  # fmt: skip
            return "cancelled"
        if previous.verification_id != scan.verification_id or previous.result == VOID or previous.flag == "d":
            return "other"
        if not previous.flag:
            previous.flag = "u"
            self.events.mark(previous.verification_id, delivered=False)
        return "marked"

    async def epochs_missing(self) -> bool:
        """See `StatusMirror.epochs_missing`."""
        return self._epoch_ms is None

    async def start_epochs(self, epoch_ms: int) -> None:
        """See `StatusMirror.start_epochs`."""
        if self._epoch_ms is None:
            self._epoch_ms = epoch_ms

    async def ping(self) -> None:
        """Always reachable."""

    async def close(self) -> None:
        """Nothing to release."""
