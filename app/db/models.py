"""The relational model. Personal data is stored only as AES-GCM ciphertext plus a keyed index."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.expression import true

from app.db.clock import as_utc

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that is stored as UTC and always read back as aware UTC.

    PostgreSQL keeps the zone; SQLite keeps text without it and hands back naive values. Binding
    converts aware values to UTC (a client's +08:00 compares right on SQLite) and reading marks
    naive ones as UTC, so every layer above sees the same kind of value on both databases.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Aware values to UTC; naive ones are taken as UTC already."""
        return as_utc(value) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Every value read back is aware UTC."""
        return as_utc(value) if value is not None else None


class Base(DeclarativeBase):
    """Declarative base with stable constraint names, so migrations are reproducible."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {
        datetime: UtcDateTime(),
        bytes: LargeBinary,
        uuid.UUID: Uuid,
    }


class CardState(StrEnum):
    """Life of the physical card."""

    ISSUED = "issued"
    ACTIVE = "active"
    LOST = "lost"
    REPLACED = "replaced"
    CANCELLED = "cancelled"


class ECardState(StrEnum):
    """Life of the electronic card."""

    PENDING_ACTIVATION = "pending_activation"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


class SuspensionCause(StrEnum):
    """Why an eCard is suspended."""

    CARD_LOST = "card_lost"
    OPERATOR = "operator"


class KeyState(StrEnum):
    """Where an issuer key is in its rotation.

    published → active → retired: a key is in the JWKS and the trust list before it signs (so
    gates know it when its first credential arrives) and stays there after it stops signing (so
    credentials it signed remain verifiable). Revoked keys (never the active one) vanish at once.
    """

    PUBLISHED = "published"
    ACTIVE = "active"
    RETIRED = "retired"
    REVOKED = "revoked"


class AuditEvent(Base):
    """One state-changing action: who, when, what, why, before → after. Append-only.

    The database refuses UPDATE and DELETE on this table (triggers in migration 0003), and no
    endpoint offers either.
    """

    __tablename__ = "audit_events"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    occurred_at: Mapped[datetime] = mapped_column(index=True)
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str] = mapped_column(String(64))
    actor_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(48), index=True)
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64), index=True)
    region_code: Mapped[str | None] = mapped_column(String(6), index=True)
    reason: Mapped[str | None] = mapped_column(String(500))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Region(Base):
    """An issuing region, by its GB/T 2260 code."""

    __tablename__ = "regions"

    code: Mapped[str] = mapped_column(String(6), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime]


class IssuerKey(Base):
    """A region's signing key (Ed25519 or SM2, `algorithm`), and where its private half lives (`key_store`).

    "software": the private half encrypted under the data key (`private_key_encrypted`). "pkcs11": the
    private half is in the token labelled `key_token`, as the object with CKA_LABEL `key_label` and
    CKA_ID = kid; `private_key_encrypted` then holds only the key's card-reference seal secret (random,
    crypto/seal.py), which the verify path needs for every scan and so cannot ask a module for.
    """

    __tablename__ = "issuer_keys"

    kid: Mapped[bytes] = mapped_column(LargeBinary(8), primary_key=True)
    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"), index=True)
    # Ed25519: 32 raw bytes; SM2: the 65-byte uncompressed point.
    public_key: Mapped[bytes] = mapped_column(LargeBinary(65))
    algorithm: Mapped[str] = mapped_column(String(16), default="Ed25519", server_default="Ed25519")
    private_key_encrypted: Mapped[bytes]
    key_store: Mapped[str] = mapped_column(String(16), default="software", server_default="software")
    # PKCS#11 token label (at most 32 characters) and object label; None for software keys.
    key_token: Mapped[str | None] = mapped_column(String(32))
    key_label: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]


class Operator(Base):
    """A card-office account, scoped to regions."""

    __tablename__ = "operators"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(32))
    regions: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime]
    # Consecutive failed sign-ins; past the limit the account is locked until `locked_until`.
    failed_sign_ins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    locked_until: Mapped[datetime | None]


class Person(Base):
    """A card holder. Name and citizen ID are ciphertext; `citizen_id_index` is their keyed index."""

    __tablename__ = "persons"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Not indexed: no query selects persons by region alone, and bulk imports pay for every index (0011).
    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"))
    citizen_id_index: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    citizen_id_encrypted: Mapped[bytes]
    name_encrypted: Mapped[bytes]
    created_at: Mapped[datetime]
    # Basic medical insurance scheme: "urban_employee" or "urban_rural_resident" (sets the bill's share).
    insurance_scheme: Mapped[str] = mapped_column(String(24), default="urban_employee", server_default="urban_employee")


class Card(Base):
    """A physical social security card."""

    __tablename__ = "cards"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    person_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("persons.id"), index=True)
    # Not indexed: no query selects cards by region alone, and bulk imports pay for every index (0011).
    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"))
    card_number: Mapped[str] = mapped_column(String(16), unique=True)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    lost_at: Mapped[datetime | None]
    # "holder" (from the app) or "office": only a holder's own report may be undone from the app.
    loss_reported_by: Mapped[str | None] = mapped_column(String(16))
    # The card that replaced this one (history only, so no foreign key: SQLite would rebuild the table).
    replaced_by_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)


class ECard(Base):
    """The electronic card of a physical card; `card_ref` is the opaque id inside credentials."""

    __tablename__ = "ecards"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    card_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("cards.id"), unique=True)
    # Not indexed: no query selects eCards by region alone, and bulk imports pay for every index (0011).
    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"))
    card_ref: Mapped[bytes] = mapped_column(LargeBinary(16), unique=True)
    state: Mapped[str] = mapped_column(String(24))
    activated_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    # Why a suspended eCard is suspended: resuming after a loss report may only undo a loss.
    suspension_cause: Mapped[str | None] = mapped_column(String(24))
    pin_hash: Mapped[str | None] = mapped_column(String(200))
    # PIN tries taken since the last success; at the limit the PIN is locked until the office resets it.
    pin_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Raised with every change the status mirror must see: the mirror keeps the version it holds and
    # never lets an older write replace a newer one (an outbox applier racing a request, a repair).
    mirror_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The disclosure profile as the mirror keeps it (sealed: AES-GCM under the data key, bound to
    # card_ref), so refilling the mirror decrypts and encrypts nothing; None until first written.
    sealed_profile: Mapped[bytes | None] = mapped_column(LargeBinary)


class MirrorChange(Base):
    """A change the status mirror has not confirmed yet: written in the change's own transaction.

    The request that made the change applies it after the commit and deletes the row; when the store
    does not answer, an applier in every worker retries until it does (a transactional outbox), so a
    committed change always reaches the verify path. `device_id` rows revoke a device's tokens until
    `until`; the others carry the eCard's current state, read again when applied.
    """

    __tablename__ = "mirror_changes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    ecard_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    device_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    until: Mapped[datetime | None]
    created_at: Mapped[datetime]


class StatusStore(Base):
    """A status store (by its key prefix) this deployment has used: one that comes back empty lost its memory.

    The first start on an empty store with no row here is a new deployment (nothing was ever used
    before it); an empty store with a row lost its used nonces, so codes that could have been shown
    before are refused until they expire (see app/stores/status_mirror.py, the store epoch).
    """

    __tablename__ = "status_stores"

    prefix: Mapped[str] = mapped_column(String(100), primary_key=True)
    first_used_at: Mapped[datetime]


class MirrorRebuild(Base):
    """The state of refilling a status store (by its key prefix) from the database: checkpoint and lease.

    `epoch_ms` is the epoch of the store being filled (its probe shard's): a store that lost its data
    again has another, so a checkpoint of the earlier one is not resumed. `filled_epoch_ms` is the epoch
    of the last complete fill: a store whose epoch differs lost what was filled. One process at a time
    holds the lease (`holder` until `lease_until`) and renews it with every checkpoint.
    """

    __tablename__ = "mirror_rebuilds"

    prefix: Mapped[str] = mapped_column(String(100), primary_key=True)
    filled_epoch_ms: Mapped[int | None] = mapped_column(BigInteger)
    epoch_ms: Mapped[int | None] = mapped_column(BigInteger)
    # The last eCard (by id) written to the mirror; the next page starts after it.
    after_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    cards_done: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    started_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    holder: Mapped[str | None] = mapped_column(String(120))
    lease_until: Mapped[datetime | None]


class ChangeCounter(Base):
    """A counter raised after every change of a kind that workers cache (`directory`: terminals, keys).

    Workers poll it every second (one indexed row) and reload when it moved, so a change reaches every
    worker through the database alone, whether or not the Redis announcement arrived.
    """

    __tablename__ = "change_counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class OfflineKitBuild(Base):
    """A region's signed offline kit, built by one worker per interval and served by all of them.

    `lease_until` is the build in flight: a worker takes it with a conditional update (only when it
    has lapsed and the kit is the generation it saw), so one build runs at a time in the deployment;
    a builder that dies frees it when it lapses.
    """

    __tablename__ = "offline_kits"

    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"), primary_key=True)
    # The kit's JSON as served ({"region", "jwks", "status_list"}); None until the first build.
    document: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Strong HTTP validator of `document` (If-None-Match → 304).
    etag: Mapped[str | None] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # When it was built (the next is due `REBUILD_AFTER` later), and until when its signed list is good.
    built_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    # What the last build cost, for operators: eCards it named (the non-active ones) and milliseconds.
    entries: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    build_ms: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ActivationCode(Base):
    """A one-time code that lets a holder bind a device to an eCard; only its hash is kept."""

    __tablename__ = "activation_codes"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    ecard_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ecards.id"), index=True)
    code_hash: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime]
    # Tries taken so far, right or wrong; the code is locked when it reaches the limit.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    used_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class Device(Base):
    """A holder's phone, bound by its Ed25519 public key."""

    __tablename__ = "devices"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    ecard_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ecards.id"), index=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class RefreshToken(Base):
    """One link of a rotating refresh-token chain; only the token's hash is kept (SHA-256, or SM3 national)."""

    __tablename__ = "refresh_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    family_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    device_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("devices.id"), index=True)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    expires_at: Mapped[datetime]
    created_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class VerifierOrganisation(Base):
    """A transit company, park, library, hospital… that scans credentials."""

    __tablename__ = "verifier_organisations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    business_type: Mapped[str] = mapped_column(String(32))
    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"), index=True)
    created_at: Mapped[datetime]
    # A disabled organisation's terminals are all refused, whatever their own setting.
    enabled: Mapped[bool] = mapped_column(default=True, server_default=true())
    # The directory counter's value at its last change: workers apply `version > last seen` (change feed).
    directory_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0", index=True)


class Terminal(Base):
    """A gate, turnstile or desk.

    It authenticates with an API key of which only the hash is kept (after a rotation the
    previous key keeps working until `previous_key_expires_at`), or, once it registered an
    Ed25519 public key, only with requests signed by that key.
    """

    __tablename__ = "terminals"
    __table_args__ = (UniqueConstraint("organisation_id", "name"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    organisation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("verifier_organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    allowed_purposes: Mapped[list[str]] = mapped_column(JSON)
    api_key_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    previous_key_hash: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    previous_key_expires_at: Mapped[datetime | None]
    # Ed25519 (32 bytes) or SM2 (the 65-byte point); its length says which. bytea/BLOB keep no length:
    # widening it from 32 needed no migration.
    signing_public_key: Mapped[bytes | None] = mapped_column(LargeBinary(65))
    enabled: Mapped[bool]
    created_at: Mapped[datetime]
    # Verifications allowed per minute on average, and how many may come at once.
    rate_per_minute: Mapped[int] = mapped_column(Integer, default=120, server_default="120")
    rate_burst: Mapped[int] = mapped_column(Integer, default=30, server_default="30")
    # The directory counter's value at its last change: workers apply `version > last seen` (change feed).
    directory_version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0", index=True)


class ImportJob(Base):
    """One run of a bulk card import: its scope, its file's SHA-256 and its counts so far.

    The counts are updated in the transaction of each chunk, so they always match what is committed.
    """

    __tablename__ = "import_jobs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # None for a run from the command line.
    operator_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("operators.id"), index=True)
    # The region scope the import acted with ("*" = all); who may see the job follows from it.
    regions: Mapped[list[str]] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16))
    file_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int]
    bytes_processed: Mapped[int]
    rows_processed: Mapped[int]
    created: Mapped[int]
    already_present: Mapped[int]
    rejected: Mapped[int]
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class ImportRejection(Base):
    """A rejected row of an import: its line, its card number as given (masked if malformed), why."""

    __tablename__ = "import_rejections"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("import_jobs.id"), primary_key=True)
    line: Mapped[int] = mapped_column(primary_key=True)
    card_number: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(200))


class VerificationEvent(Base):
    """One answered verification, accepted or rejected, drained from the event stream.

    Inserted once by `id` (the verification id the terminal got), however often the stream
    delivers it. No personal data: the card appears only as its opaque reference.
    """

    __tablename__ = "verification_events"
    __table_args__ = (
        Index("ix_verification_events_card_ref_occurred_at", "card_ref", "occurred_at"),
        Index("ix_verification_events_terminal_id_occurred_at", "terminal_id", "occurred_at"),
        Index("ix_verification_events_card_ref_nonce", "card_ref", "nonce"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    occurred_at: Mapped[datetime]
    # When the gate scanned the code, for scans uploaded later in a batch.
    scanned_at: Mapped[datetime | None]
    terminal_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    organisation_id: Mapped[uuid.UUID] = mapped_column(Uuid, index=True)
    card_ref: Mapped[bytes | None] = mapped_column(LargeBinary(16))
    nonce: Mapped[bytes | None] = mapped_column(LargeBinary(16))
    card_region: Mapped[str | None] = mapped_column(String(6))
    purpose: Mapped[str | None] = mapped_column(String(16))
    result: Mapped[str] = mapped_column(String(32))
    # "online" (one scan) or "batch" (queued by the gate while it was offline).
    channel: Mapped[str] = mapped_column(String(8))
    # False when the terminal was told 503 "outcome unknown" and never got this answer (a store stall):
    # the credential was used up, but no gate showed the result. A later retry that got it sets it back.
    answer_delivered: Mapped[bool] = mapped_column(default=True, server_default=true())


class Entitlement(Base):
    """Something an eCard entitles its holder to beyond identity, e.g. a park annual pass."""

    __tablename__ = "entitlements"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    ecard_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ecards.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    region_code: Mapped[str] = mapped_column(ForeignKey("regions.code"))
    valid_from: Mapped[datetime]
    valid_until: Mapped[datetime]
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class LedgerAccount(Base):
    """An account of the double-entry ledger: a card's, an organisation's, or a region's fund.

    Amounts are integer fen (0.01 CNY). A card account's balance is what the card has been paid
    (subsidies) minus what it has paid (fares, its share of medical bills).
    """

    __tablename__ = "ledger_accounts"
    __table_args__ = (UniqueConstraint("kind", "owner_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # "card" (owner: eCard id), "organisation" (verifier organisation id),
    # "insurance_fund" or "subsidy_fund" (owner: region code).
    kind: Mapped[str] = mapped_column(String(24))
    owner_id: Mapped[str] = mapped_column(String(64))
    region_code: Mapped[str] = mapped_column(String(6))
    created_at: Mapped[datetime]


class LedgerTransaction(Base):
    """One money movement: its postings sum to zero.

    A verification can be charged for at most once per kind: the unique constraint, not Redis or
    the idempotency key, is the last word against a double charge.
    """

    __tablename__ = "ledger_transactions"
    __table_args__ = (
        UniqueConstraint("kind", "verification_id", name="uq_ledger_transactions_kind_verification_id"),
        UniqueConstraint("kind", "reference", name="uq_ledger_transactions_kind_reference"),
        Index("ix_ledger_transactions_organisation_id_created_at", "organisation_id", "created_at"),
        Index("ix_ledger_transactions_ecard_id_created_at", "ecard_id", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    kind: Mapped[str] = mapped_column(String(32))
    verification_id: Mapped[str | None] = mapped_column(String(32))
    # For movements without a verification (a subsidy payout: batch id and card).
    reference: Mapped[str | None] = mapped_column(String(100))
    ecard_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    organisation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime]


class LedgerPosting(Base):
    """One side of a transaction: amount_fen (signed) on one account."""

    __tablename__ = "ledger_postings"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    transaction_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ledger_transactions.id"), index=True)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ledger_accounts.id"), index=True)
    amount_fen: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime]


class IdempotencyRecord(Base):
    """A money-moving request by its Idempotency-Key: in flight until `completed_at`, then its answer.

    The same key with the same request replays the stored answer; with a different request it is
    a 422; while the first is still in flight, a 409.
    """

    __tablename__ = "idempotency_records"

    # Who sent it (terminal or operator id): keys are scoped to their sender.
    caller: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[bytes | None]
    created_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class LibraryLoan(Base):
    """A book lent on a card's verification; it may be returned at any library of the network."""

    __tablename__ = "library_loans"
    __table_args__ = (UniqueConstraint("verification_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    ecard_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("ecards.id"), index=True)
    item_id: Mapped[str] = mapped_column(String(64), index=True)
    verification_id: Mapped[str] = mapped_column(String(32))
    lent_by: Mapped[uuid.UUID] = mapped_column(Uuid)
    lent_at: Mapped[datetime]
    due_at: Mapped[datetime]
    returned_to: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    returned_at: Mapped[datetime | None]


class ParkEntry(Base):
    """An entry through a park gate counted against the card's annual pass."""

    __tablename__ = "park_entries"
    __table_args__ = (UniqueConstraint("verification_id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    entitlement_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("entitlements.id"), index=True)
    verification_id: Mapped[str] = mapped_column(String(32))
    organisation_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    entered_at: Mapped[datetime]


class CatalogVersion(Base):
    """One load of the service catalogue that changed something: its files' versions and SHA-256.

    The newest row is the catalogue in force. A version string stays bound to the content it was
    first loaded with, so a changed file must carry a new version.
    """

    __tablename__ = "catalog_versions"

    # Load number: increasing, so "the newest" never depends on clock resolution.
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(32), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    regions_version: Mapped[str] = mapped_column(String(32))
    regions_sha256: Mapped[str] = mapped_column(String(64))
    services: Mapped[int] = mapped_column(Integer)
    # Sources, categories, application types and usage groups of the file, as loaded.
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    loaded_at: Mapped[datetime]
    loaded_by: Mapped[str] = mapped_column(String(64))


class CatalogService(Base):
    """A service the card gives access to, by its stable catalogue code; withdrawn ones are kept."""

    __tablename__ = "catalog_services"

    code: Mapped[str] = mapped_column(String(24), primary_key=True)
    # "hrss" (the 95 HR & social security services) or "livelihood" (the residents' all-in-one card).
    domain: Mapped[str] = mapped_column(String(16))
    category: Mapped[str] = mapped_column(String(32))
    name_zh: Mapped[str] = mapped_column(String(100))
    name_en: Mapped[str] = mapped_column(String(200))
    application_type: Mapped[str] = mapped_column(String(32))
    # "physical" and/or "electronic"; the credential purposes and verifier business types that reach it.
    forms: Mapped[list[str]] = mapped_column(JSON)
    purposes: Mapped[list[str]] = mapped_column(JSON)
    business_types: Mapped[list[str]] = mapped_column(JSON)
    provenance_status: Mapped[str] = mapped_column(String(16))
    provenance_source: Mapped[str | None] = mapped_column(String(48))
    provenance_note: Mapped[str] = mapped_column(String(500))
    # The catalogue version that last added or changed it, and when a later one withdrew it.
    version: Mapped[str] = mapped_column(String(32))
    updated_at: Mapped[datetime]
    withdrawn_at: Mapped[datetime | None]


class RegionService(Base):
    """A catalogue service available in a region: '*' means every region, a province's entry covers its cities.

    No foreign key to regions: the catalogue names regions whether or not they are registered here.
    """

    __tablename__ = "region_services"

    region_code: Mapped[str] = mapped_column(String(6), primary_key=True)
    service_code: Mapped[str] = mapped_column(ForeignKey("catalog_services.code"), primary_key=True, index=True)
