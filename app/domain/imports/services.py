"""Bulk issuance of persons and physical cards from a CSV file, for the CLI and the console API alike.

The file (a header row naming region, citizen_id, name, card_number; UTF-8, a BOM tolerated) is
read as a stream, row by row, and applied in chunks: each chunk's persons, cards, eCards, rejected
rows and the job's counts go to the database in one transaction. A crash therefore loses or doubles
nothing, and running the same file again completes it: a row whose card number is already issued to
the same person (matched by the citizen ID's blind index) counts as `already_present`.

Checking and encrypting a chunk (in a thread) overlaps the database's work on the chunks before. On
PostgreSQL a chunk is COPYed into a temporary staging table and classified and inserted by one
statement, and two chunks are written at once, each on a connection of its own (each commits with
its counts; the job's row adds them up); on SQLite, one writer at a time, a chunk is looked up with
IN lists and inserted with one executemany per table. The rules are the same on both, and so are
the tests.

Imported eCards wait in `pending_activation` with no activation code: the office issues codes one
at a time, when it hands a card over, through POST /v1/operator/cards/{id}/activation-code. Nothing
is mirrored to Redis, since a pending eCard is not verifiable anyway.

No citizen ID or name leaves this module in clear: the rejected-row report holds the line, the card
number (masked when malformed, as the field may hold a misplaced citizen ID) and the reason.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import hashlib
import io
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, NamedTuple, cast

from sqlalchemy import Table, bindparam, case, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.clock import utcnow
from app.db.models import Card, CardState, ECard, ECardState, ImportJob, ImportRejection, Person, Region
from app.domain.audit.services import Actor, record
from app.domain.bulk import fewer_collections
from app.domain.cards.citizen_id import InvalidCitizenId, normalise_citizen_id
from app.domain.cards.services import (
    CITIZEN_ID_FIELD,
    NAME_FIELD,
    InvalidCardNumber,
    parse_card_number,
    sealed_profile_of,
)
from app.domain.regions.scope import ALL_REGIONS
from app.domain.regions.services import REGION_CODE
from app.security.pii import PiiCipher

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("region", "citizen_id", "name", "card_number")
REPORT_COLUMNS = ("line", "card_number", "reason")
# Rows per transaction: large enough that per-chunk costs (a dozen statements, the commit's flush)
# vanish beside the rows', small enough that a crash redoes little, that the persons' locks are not held
# long (a single issue for one of them waits for the chunk's commit), and that the IN lists of SQLite's
# look-ups stay below its 32,766 parameters (the CLI's --chunk-size allows 20,000).
CHUNK_ROWS = 10_000
# A legitimate row is well under 200 bytes; a longer line is not a card file.
MAX_LINE_BYTES = 4096
MAX_NAME_LENGTH = 100
# Region checks remembered per reader: a real file names a few; a hostile one cannot grow the cache.
MAX_CACHED_REGIONS = 64
# Attempts per chunk when a concurrent writer (another import, a single issue) took a card number or
# person between our look-up and our insert: the retry sees it and classifies the row again.
CHUNK_ATTEMPTS = 3
# Chunks written at once on PostgreSQL, each in its own transaction on its own connection: a chunk's one
# statement keeps a core busy, and a second one in flight uses the other (SQLite: one writer at a time).
# The default; `ecard card import --writers N` gives a database server with more cores more.
CHUNKS_IN_FLIGHT = 2
MAX_CHUNKS_IN_FLIGHT = 8  # within the engine's pool (10 connections, 10 more on overflow)
REPORT_BATCH = 5000
_CARDS_IN_USE = (CardState.ISSUED.value, CardState.ACTIVE.value)
_NOT_ALPHANUMERIC = re.compile(r"[^0-9A-Za-z]")
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


class ImportSource(StrEnum):
    """Where an import was started."""

    CLI = "cli"
    API = "api"


class ImportStatus(StrEnum):
    """Life of an import job."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ImportFileError(ValueError):
    """The file as a whole cannot be imported (header, structure); the message says why, without row data."""


@dataclass(frozen=True, slots=True)
class ImportProgress:
    """Where an import stands: rows done so far by outcome, and bytes of the file consumed."""

    rows: int = 0
    created: int = 0
    already_present: int = 0
    rejected: int = 0
    bytes_processed: int = 0
    size_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ImportResult:
    """A finished import: its job, its counts, and how long it took."""

    job_id: uuid.UUID
    progress: ImportProgress
    seconds: float

    @property
    def rows_per_second(self) -> float:
        """Throughput over the whole run."""
        return self.progress.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row that was not imported, as the report shows it."""

    line: int
    card_number: str
    reason: str


class PreparedRow(NamedTuple):
    """A row that passed every check that needs no database; its personal data already encrypted.

    A tuple, in the column order of the PostgreSQL staging table: COPY takes it as it is.
    """

    line: int
    region: str
    card_number: str
    citizen_id_index: bytes
    citizen_id_encrypted: bytes
    name_encrypted: bytes
    # The eCard's opaque reference, should the row create one.
    card_ref: bytes
    # In a crypto-profile switch's dual-index period, the citizen ID's index under the other profile:
    # a person stored under it takes this row's index and blob (`_adopt_former_indexes`); else None.
    former_index: bytes | None
    # The eCard's disclosure profile sealed from this row (name, citizen ID, region): kept with the eCard
    # when the row registers its person, so the mirror's first fill seals nothing. A person registered
    # before keeps their stored data (the row's may differ); their new eCard is sealed from it later.
    sealed_profile: bytes


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """Consecutive rows of the file, checked, and the file position after them."""

    rows: list[PreparedRow]
    rejections: list[Rejection]
    bytes_processed: int
    # Whether the rows carry former indexes (the reader's cipher holds both profiles' index keys).
    dual_index: bool = False

    @property
    def size(self) -> int:
        """Rows in the chunk, imported or not."""
        return len(self.rows) + len(self.rejections)


@dataclass(frozen=True, slots=True)
class StoredUpload:
    """An uploaded file on disk, with its size and SHA-256."""

    path: Path
    size_bytes: int
    sha256: str


def report_card_number(raw: str) -> str:
    """A malformed card number as the report shows it: letters and digits only, all but the ends masked.

    The field may hold a misplaced citizen ID or name, and a report opened in a spreadsheet must not
    carry formulas; the two characters at each end help a clerk find the row.
    """
    kept = _NOT_ALPHANUMERIC.sub("", raw)[:32]
    if len(kept) <= 4:
        return "*" * len(kept)
    return kept[:2] + "*" * (len(kept) - 4) + kept[-2:]


def _has_control_characters(text: str) -> bool:
    return _CONTROL_CHARACTER.search(text) is not None


class CsvRecords:
    """The records of a CSV file with a header row, read as a stream, with their line numbers and the bytes read.

    Lines are decoded one at a time (UTF-8, a leading BOM dropped), so memory stays flat whatever the size.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.bytes_read = 0
        self._reader = csv.reader(self._lines())
        self.columns, self.width = self._read_header()
        self._next_line = self._reader.line_num + 1

    def _lines(self) -> Iterator[str]:
        number = 0
        while raw := self._stream.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ImportFileError(f"line {number} is longer than {MAX_LINE_BYTES} bytes: not a card file")
            self.bytes_read += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            # Undecodable bytes become U+FFFD and reject their row, not the whole file.
            yield raw.decode("utf-8", errors="replace")

    def _next_record(self) -> list[str] | None:
        try:
            return next(self._reader, None)
        except csv.Error as exc:
            raise ImportFileError(f"line {self._reader.line_num}: malformed CSV ({exc})") from None

    def _read_header(self) -> tuple[dict[str, int], int]:
        header = self._next_record()
        if header is None:
            raise ImportFileError(f"the file is empty; it needs a header row: {','.join(CSV_COLUMNS)}")
        names = [name.strip().lower() for name in header]
        missing = [column for column in CSV_COLUMNS if column not in names]
        if missing:
            raise ImportFileError(
                f"the header row must name the columns {','.join(CSV_COLUMNS)}; missing: {', '.join(missing)}"
            )
        repeated = [column for column in CSV_COLUMNS if names.count(column) > 1]
        if repeated:
            raise ImportFileError(f"the header row names {', '.join(repeated)} more than once")
        return {column: names.index(column) for column in CSV_COLUMNS}, len(names)

    def next(self) -> tuple[int, list[str]] | None:
        """The next non-blank record and the line it starts on; None at the end of the file."""
        while (values := self._next_record()) is not None:
            line, self._next_line = self._next_line, self._reader.line_num + 1
            if values:
                return line, values
        return None


class CardFileReader:
    """The rows of an import file, checked as far as possible without the database.

    Synchronous (file reads, CSV parsing, encryption): the async runner calls it in a worker thread, so
    an import running inside the service does not hold up its event loop. Duplicates within the file
    are found here: the reader remembers each card number and citizen ID index it accepted, with its line.
    """

    def __init__(
        self, stream: BinaryIO, pii: PiiCipher, *, registered_regions: Collection[str], scope: Collection[str]
    ) -> None:
        self._records = CsvRecords(stream)
        self._columns, self._width = self._records.columns, self._records.width
        self._region_at = self._columns["region"]
        self._citizen_id_at = self._columns["citizen_id"]
        self._name_at = self._columns["name"]
        self._card_number_at = self._columns["card_number"]
        self._pii = pii
        self._registered = frozenset(registered_regions)
        self._scope = frozenset(scope)
        self._card_lines: dict[str, int] = {}
        self._person_lines: dict[bytes, int] = {}
        # A file holds one or a few regions: check each once, not on every row.
        self._region_reasons: dict[str, str] = {}

    @property
    def bytes_read(self) -> int:
        """Bytes of the file consumed so far."""
        return self._records.bytes_read

    def read_chunk(self, max_rows: int) -> PreparedChunk | None:
        """The next max_rows rows, checked; None at the end of the file."""
        rows: list[PreparedRow] = []
        rejections: list[Rejection] = []
        while len(rows) + len(rejections) < max_rows:
            record = self._records.next()
            if record is None:
                break
            outcome = self._prepare(*record)
            if isinstance(outcome, PreparedRow):
                rows.append(outcome)
            else:
                rejections.append(outcome)
        if not rows and not rejections:
            return None
        return PreparedChunk(rows, rejections, self.bytes_read, self._pii.dual_index)

    def _prepare(self, line: int, values: list[str]) -> PreparedRow | Rejection:
        raw_card_number = values[self._card_number_at] if len(values) > self._card_number_at else ""
        if len(values) != self._width:
            return Rejection(
                line, report_card_number(raw_card_number), f"expected {self._width} fields, found {len(values)}"
            )
        try:
            card_number = parse_card_number(raw_card_number)
        except InvalidCardNumber as exc:
            return Rejection(line, report_card_number(raw_card_number), str(exc))
        region = values[self._region_at].strip()
        reason = self._region_reasons.get(region)
        if reason is None:
            reason = self._check_region(region)
            if len(self._region_reasons) < MAX_CACHED_REGIONS:
                self._region_reasons[region] = reason
        if reason:
            return Rejection(line, card_number, reason)
        try:
            citizen_id = normalise_citizen_id(values[self._citizen_id_at])
        except InvalidCitizenId as exc:
            return Rejection(line, card_number, str(exc))
        name = values[self._name_at].strip()
        reason = self._check_name(name)
        if reason:
            return Rejection(line, card_number, reason)
        index, *other = self._pii.blind_indexes(citizen_id, CITIZEN_ID_FIELD)
        if (earlier := self._card_lines.get(card_number)) is not None:
            return Rejection(line, card_number, f"card number repeats line {earlier}")
        if (earlier := self._person_lines.get(index)) is not None:
            return Rejection(line, card_number, f"the same citizen ID is on line {earlier}; a person holds one card")
        self._card_lines[card_number] = line
        self._person_lines[index] = line
        card_ref = os.urandom(16)
        return PreparedRow(
            line=line,
            region=region,
            card_number=card_number,
            citizen_id_index=index,
            citizen_id_encrypted=self._pii.encrypt(citizen_id, CITIZEN_ID_FIELD),
            name_encrypted=self._pii.encrypt(name, NAME_FIELD),
            card_ref=card_ref,
            former_index=other[0] if other else None,
            sealed_profile=sealed_profile_of(self._pii, card_ref, name, citizen_id, region),
        )

    def _check_region(self, region: str) -> str:
        if not REGION_CODE.fullmatch(region):
            return "region must be a 6-digit GB/T 2260 code"
        if region not in self._registered:
            return f"region {region} is not registered"
        if ALL_REGIONS not in self._scope and region not in self._scope:
            return f"region {region} is outside this import's scope"
        return ""

    @staticmethod
    def _check_name(name: str) -> str:
        if "\ufffd" in name:
            return "name is not valid UTF-8"
        if not name:
            return "name must not be empty"
        if len(name) > MAX_NAME_LENGTH:
            return f"name must have at most {MAX_NAME_LENGTH} characters"
        if _has_control_characters(name):
            return "name holds control characters"
        return ""


def check_header(path: Path) -> None:
    """Raise ImportFileError unless the file starts with a usable header row (reads only that row)."""
    with path.open("rb") as stream:
        CsvRecords(stream)


def file_sha256(path: Path) -> str:
    """The file's SHA-256, hex, read in blocks."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _create_private_file(path: Path) -> BinaryIO:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


async def store_upload(chunks: AsyncIterable[bytes], directory: Path) -> StoredUpload:
    """Write a streamed upload to a private file in directory, hashing and counting it on the way.

    The file holds personal data in clear: readable by the service's user only, and removed on any
    failure here (the caller removes it once imported).
    """
    path = directory / f"{uuid.uuid4().hex}.csv"
    stream = await asyncio.to_thread(_create_private_file, path)
    digest = hashlib.sha256()
    size = 0
    try:
        with stream:
            async for chunk in chunks:
                await asyncio.to_thread(stream.write, chunk)
                digest.update(chunk)
                size += len(chunk)
    except BaseException:
        await asyncio.to_thread(path.unlink, missing_ok=True)
        raise
    return StoredUpload(path=path, size_bytes=size, sha256=digest.hexdigest())


def _audit_region(regions: Collection[str]) -> str | None:
    """The region an import's audit events are filed under: its one region, else none (seen by '*' only)."""
    return next(iter(regions)) if len(regions) == 1 and ALL_REGIONS not in regions else None


async def create_job(
    session: AsyncSession,
    actor: Actor,
    *,
    operator_id: uuid.UUID | None,
    regions: list[str],
    source: ImportSource,
    file_sha256: str,
    size_bytes: int,
) -> ImportJob:
    """Record a pending import of a file in the given region scope, and audit it (commits)."""
    now = utcnow()
    job = ImportJob(
        operator_id=operator_id,
        regions=regions,
        source=source.value,
        status=ImportStatus.PENDING.value,
        file_sha256=file_sha256,
        size_bytes=size_bytes,
        bytes_processed=0,
        rows_processed=0,
        created=0,
        already_present=0,
        rejected=0,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    await session.flush()
    record(
        session, actor, "import.started", subject_type="import_job", subject_id=job.id,
        region=_audit_region(regions),
        after={"source": source.value, "regions": regions, "file_sha256": file_sha256, "size_bytes": size_bytes},
    )  # fmt: skip
    await session.commit()
    return job


def job_visible(job_regions: Collection[str], operator_regions: Collection[str]) -> bool:
    """Whether an operator may see a job: its whole scope must lie within theirs ('*' only for '*')."""
    if ALL_REGIONS in operator_regions:
        return True
    return ALL_REGIONS not in job_regions and set(job_regions) <= set(operator_regions)


async def find_job(session: AsyncSession, job_id: uuid.UUID, operator_regions: Collection[str]) -> ImportJob | None:
    """The job, if it exists and the operator may see it."""
    job = await session.get(ImportJob, job_id)
    if job is None or not job_visible(job.regions, operator_regions):
        return None
    return job


async def run_import(
    sessions: async_sessionmaker[AsyncSession],
    pii: PiiCipher,
    job_id: uuid.UUID,
    path: Path,
    actor: Actor,
    *,
    chunk_rows: int = CHUNK_ROWS,
    on_progress: Callable[[ImportProgress], None] | None = None,
    writers: int = CHUNKS_IN_FLIGHT,
) -> ImportProgress:
    """Import the file into the job's region scope, chunk by chunk; the job records status and counts.

    On PostgreSQL, `writers` chunks (1 to MAX_CHUNKS_IN_FLIGHT) are written at once; on SQLite one.

    The audit log gets the job's end, with its counts, under actor (the cards themselves trace back to
    the job through its time and the job's `import.started` event).

    Rerunning a file (after a crash, or by mistake) creates nothing twice. A file that cannot be read
    as a whole (header, malformed CSV) ends the job `failed` with the reason and raises ImportFileError;
    the chunks before the fault stay imported. Activation codes are not issued here (see the module).
    """
    _check_writers(writers)
    async with sessions() as session:
        job = await session.get(ImportJob, job_id)
        if job is None:
            raise LookupError(f"no import job {job_id}")
        scope = tuple(job.regions)
        regions = set(await session.scalars(select(Region.code)))
        job.status = ImportStatus.RUNNING.value
        job.updated_at = utcnow()
        await session.commit()
        progress = ImportProgress(size_bytes=job.size_bytes)
        in_flight = writers if session.get_bind().dialect.name == "postgresql" else 1
    logger.info("import job %s started (scope %s)", job_id, ",".join(scope))
    try:
        with fewer_collections(), await asyncio.to_thread(path.open, "rb") as stream:
            reader = await asyncio.to_thread(CardFileReader, stream, pii, registered_regions=regions, scope=scope)
            sending = _ChunkWriters(in_flight, progress, on_progress)
            try:
                async with contextlib.aclosing(_read_ahead(reader, chunk_rows)) as chunks:
                    async for chunk in chunks:
                        await sending.add(_apply_chunk_with_retries(sessions, job_id, chunk))
                await sending.drain()
            finally:
                # However the loop ended: the chunks already sent finish (or fail), and count if they committed.
                await sending.abandon()
                progress = sending.progress
            progress = replace(progress, bytes_processed=reader.bytes_read)
    except BaseException as exc:
        if isinstance(exc, ImportFileError):
            error = str(exc)
        elif isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            error = "the import was interrupted; import the same file again to complete it"
        else:
            error = "the import stopped on an internal error; import the same file again to complete it"
        await _finish(sessions, actor, job_id, scope, ImportStatus.FAILED, progress, error)
        raise
    await _finish(sessions, actor, job_id, scope, ImportStatus.SUCCEEDED, progress, None)
    logger.info(
        "import job %s finished: %d rows, %d created, %d already present, %d rejected",
        job_id, progress.rows, progress.created, progress.already_present, progress.rejected,
    )  # fmt: skip
    return progress


def _check_writers(writers: int) -> None:
    if not 1 <= writers <= MAX_CHUNKS_IN_FLIGHT:
        raise ValueError(f"writers must be 1 to {MAX_CHUNKS_IN_FLIGHT}, not {writers}")


def _added(progress: ImportProgress, chunk: ImportProgress) -> ImportProgress:
    """Progress after one more chunk's counts (its position may be before a chunk committed earlier)."""
    return replace(
        progress,
        rows=progress.rows + chunk.rows,
        created=progress.created + chunk.created,
        already_present=progress.already_present + chunk.already_present,
        rejected=progress.rejected + chunk.rejected,
        bytes_processed=max(progress.bytes_processed, chunk.bytes_processed),
    )


class _ChunkWriters:
    """Chunks being written, at most `size` at once, and the counts of the ones committed so far."""

    def __init__(
        self, size: int, progress: ImportProgress, on_progress: Callable[[ImportProgress], None] | None
    ) -> None:
        self._size = size
        self._tasks: set[asyncio.Task[ImportProgress]] = set()
        self.progress = progress
        self._on_progress = on_progress

    async def add(self, write: Coroutine[None, None, ImportProgress]) -> None:
        """Start writing a chunk; first wait while `size` are being written (a chunk's error is raised)."""
        while len(self._tasks) >= self._size:
            await self._settle()
        self._tasks.add(asyncio.ensure_future(write))

    async def drain(self) -> None:
        """Wait for every chunk being written (the first error is raised)."""
        while self._tasks:
            await self._settle()

    async def abandon(self) -> None:
        """Let the chunks still being written end, counting those that commit, and raise nothing."""
        for done in await asyncio.gather(*self._tasks, return_exceptions=True):
            if isinstance(done, ImportProgress):
                self._count(done)
        self._tasks.clear()

    async def _settle(self) -> None:
        finished, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        self._tasks -= finished
        errors = [error for task in finished if (error := task.exception()) is not None]
        for task in finished:
            if task.exception() is None:
                self._count(task.result())
        if errors:
            raise errors[0]

    def _count(self, chunk: ImportProgress) -> None:
        self.progress = _added(self.progress, chunk)
        if self._on_progress is not None:
            self._on_progress(self.progress)


async def _read_ahead(reader: CardFileReader, chunk_rows: int) -> AsyncGenerator[PreparedChunk, None]:
    """The reader's chunks, the next one read (in a thread) while the caller writes this one.

    Checking and encrypting a chunk then overlaps with the database's work on the one before; the
    chunks still reach the caller, and commit, in file order. A file error surfaces when its chunk is
    due, after the chunks before it are written. The read in flight is awaited before the caller's
    file closes, however the loop ends.
    """
    pending = asyncio.ensure_future(asyncio.to_thread(reader.read_chunk, chunk_rows))
    try:
        while (chunk := await pending) is not None:
            pending = asyncio.ensure_future(asyncio.to_thread(reader.read_chunk, chunk_rows))
            yield chunk
    finally:
        if not pending.done():
            # A thread cannot be cancelled: let its read finish, then forget what it read (or raised).
            await asyncio.wait([pending])
        if not pending.cancelled():
            pending.exception()  # retrieved, so asyncio does not log it as never retrieved


async def import_file(
    sessions: async_sessionmaker[AsyncSession],
    pii: PiiCipher,
    path: Path,
    actor: Actor,
    *,
    regions: list[str],
    chunk_rows: int = CHUNK_ROWS,
    on_progress: Callable[[ImportProgress], None] | None = None,
    writers: int = CHUNKS_IN_FLIGHT,
) -> ImportResult:
    """Import a file on this machine as a job of the command line, in the given region scope."""
    _check_writers(writers)  # before the job exists: a refused call leaves none behind
    size = (await asyncio.to_thread(path.stat)).st_size
    digest = await asyncio.to_thread(file_sha256, path)
    async with sessions() as session:
        job = await create_job(
            session, actor, operator_id=None, regions=regions, source=ImportSource.CLI, file_sha256=digest,
            size_bytes=size,
        )  # fmt: skip
    started = time.perf_counter()
    progress = await run_import(
        sessions, pii, job.id, path, actor, chunk_rows=chunk_rows, on_progress=on_progress, writers=writers
    )
    return ImportResult(job_id=job.id, progress=progress, seconds=time.perf_counter() - started)


async def _finish(
    sessions: async_sessionmaker[AsyncSession],
    actor: Actor,
    job_id: uuid.UUID,
    scope: Collection[str],
    status: ImportStatus,
    progress: ImportProgress,
    error: str | None,
) -> None:
    now = utcnow()
    values: dict[str, object] = {"status": status.value, "error": error, "finished_at": now, "updated_at": now}
    if status is ImportStatus.SUCCEEDED:
        values["bytes_processed"] = progress.bytes_processed
    counts = {
        "rows": progress.rows,
        "created": progress.created,
        "already_present": progress.already_present,
        "rejected": progress.rejected,
    }
    try:
        async with sessions() as session:
            await session.execute(update(ImportJob).where(ImportJob.id == job_id).values(**values))
            record(
                session, actor, "import.finished", subject_type="import_job", subject_id=job_id,
                region=_audit_region(scope), reason=error, after={"status": status.value, **counts},
            )  # fmt: skip
            await session.commit()
    except Exception:
        # The database may be what failed; the job then stays `running`, and a rerun completes the file.
        logger.exception("could not record the end of import job %s", job_id)


async def _apply_chunk_with_retries(
    sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, chunk: PreparedChunk
) -> ImportProgress:
    """Write the chunk in a transaction of its own; its counts (added to the job's in that transaction)."""
    for attempt in range(1, CHUNK_ATTEMPTS + 1):
        async with sessions() as session:
            try:
                if session.get_bind().dialect.name == "postgresql":
                    return await _apply_chunk_postgres(session, job_id, chunk)
                if chunk.dual_index:
                    await _adopt_former_indexes(session, chunk.rows)
                return await _apply_chunk(session, job_id, chunk)
            except (IntegrityError, DBAPIError) as exc:
                await session.rollback()
                # Another writer took a card number or person first (a unique index), or two writers
                # locked persons the other waited for (PostgreSQL broke the cycle): classify again.
                if attempt == CHUNK_ATTEMPTS or (not isinstance(exc, IntegrityError) and not _deadlocked(exc)):
                    raise
                logger.warning("import job %s: a concurrent writer took a row of this chunk; retrying", job_id)
    raise AssertionError("unreachable")  # pragma: no cover


def _deadlocked(exc: DBAPIError) -> bool:
    """Whether PostgreSQL aborted the transaction to break a deadlock (SQLSTATE 40P01)."""
    return getattr(exc.orig, "sqlstate", None) == "40P01"


async def _adopt_former_indexes(session: AsyncSession, rows: Sequence[PreparedRow]) -> None:
    """Give persons the file names by their other-profile index this profile's index (and citizen ID
    blob), in the chunk's transaction, so the classification below finds them and makes no duplicate.
    The name stays as it is; `ecard keys rekey-pii` rewrites the rest of the row. (SQLite; on
    PostgreSQL `_ADOPT` does it from the staging table.)"""
    by_former = {row.former_index: (row.citizen_id_index, row.citizen_id_encrypted) for row in rows if row.former_index}
    found = await session.scalars(select(Person.citizen_id_index).where(Person.citizen_id_index.in_(list(by_former))))
    updates = [
        {"b_former": bytes(former), "b_index": by_former[bytes(former)][0], "b_encrypted": by_former[bytes(former)][1]}
        for former in found
    ]
    if updates:
        persons = cast(Table, Person.__table__)  # Core: an executemany UPDATE keyed by another column
        await session.execute(
            update(persons)
            .where(persons.c.citizen_id_index == bindparam("b_former"))
            .values(citizen_id_index=bindparam("b_index"), citizen_id_encrypted=bindparam("b_encrypted")),
            updates,
        )


async def _apply_chunk(session: AsyncSession, job_id: uuid.UUID, chunk: PreparedChunk) -> ImportProgress:
    """Classify the chunk's rows against the database and write them, with the job's counts, in one transaction;
    the chunk's counts."""
    rows = chunk.rows
    issued: dict[str, tuple[bytes, str]] = {}
    persons: dict[bytes, uuid.UUID] = {}
    holding: set[uuid.UUID] = set()
    if rows:
        found = await session.execute(
            select(Card.card_number, Person.citizen_id_index, Card.region_code)
            .join(Person, Person.id == Card.person_id)
            .where(Card.card_number.in_([row.card_number for row in rows]))
        )
        issued = {number: (bytes(index), region) for number, index, region in found}
        known = await session.execute(
            select(Person.citizen_id_index, Person.id).where(
                Person.citizen_id_index.in_([row.citizen_id_index for row in rows])
            )
        )
        persons = {bytes(index): person_id for index, person_id in known}
        if persons:
            holding = set(
                await session.scalars(
                    select(Card.person_id).where(
                        Card.person_id.in_(list(persons.values())), Card.state.in_(_CARDS_IN_USE)
                    )
                )
            )

    now = utcnow()
    new_persons: list[dict[str, object]] = []
    new_cards: list[dict[str, object]] = []
    new_ecards: list[dict[str, object]] = []
    rejections = list(chunk.rejections)
    already_present = 0
    for row in rows:
        if (existing := issued.get(row.card_number)) is not None:
            owner, region = existing
            if owner != row.citizen_id_index:
                rejections.append(
                    Rejection(row.line, row.card_number, "card number is already issued to another person")
                )
            elif region != row.region:
                rejections.append(
                    Rejection(row.line, row.card_number, "card number is already issued in another region")
                )
            else:
                already_present += 1
            continue
        person_id = persons.get(row.citizen_id_index)
        registers = person_id is None
        if person_id is None:
            person_id = uuid.uuid4()
            new_persons.append(
                {
                    "id": person_id,
                    "region_code": row.region,
                    "citizen_id_index": row.citizen_id_index,
                    "citizen_id_encrypted": row.citizen_id_encrypted,
                    "name_encrypted": row.name_encrypted,
                    "created_at": now,
                }
            )
        elif person_id in holding:
            rejections.append(Rejection(row.line, row.card_number, "this person already holds a card in use"))
            continue
        card_id = uuid.uuid4()
        new_cards.append(
            {
                "id": card_id,
                "person_id": person_id,
                "region_code": row.region,
                "card_number": row.card_number,
                "state": CardState.ISSUED.value,
                "created_at": now,
            }
        )
        new_ecards.append(
            {
                "id": uuid.uuid4(),
                "card_id": card_id,
                "region_code": row.region,
                "card_ref": row.card_ref,
                "state": ECardState.PENDING_ACTIVATION.value,
                "updated_at": now,
                "sealed_profile": row.sealed_profile if registers else None,
            }
        )

    if new_persons:
        await session.execute(insert(Person), new_persons)
    if new_cards:
        await session.execute(insert(Card), new_cards)
        await session.execute(insert(ECard), new_ecards)
    if rejections:
        await session.execute(
            insert(ImportRejection),
            [
                {
                    "job_id": job_id,
                    "line": rejection.line,
                    "card_number": rejection.card_number,
                    "reason": rejection.reason,
                }
                for rejection in rejections
            ],
        )
    counts = ImportProgress(
        rows=chunk.size,
        created=len(new_cards),
        already_present=already_present,
        rejected=len(rejections),
        bytes_processed=chunk.bytes_processed,
    )
    await _record_counts(session, job_id, counts, now)
    await session.commit()
    return counts


async def _record_counts(session: AsyncSession, job_id: uuid.UUID, counts: ImportProgress, now: datetime) -> None:
    """Add a chunk's counts to the job's, in the chunk's transaction: the job's row then counts exactly the
    committed chunks, whichever order they commit in (bytes: the furthest position committed)."""
    await session.execute(
        update(ImportJob)
        .where(ImportJob.id == job_id)
        .values(
            rows_processed=ImportJob.rows_processed + counts.rows,
            created=ImportJob.created + counts.created,
            already_present=ImportJob.already_present + counts.already_present,
            rejected=ImportJob.rejected + counts.rejected,
            bytes_processed=case(
                (ImportJob.bytes_processed < counts.bytes_processed, counts.bytes_processed),
                else_=ImportJob.bytes_processed,
            ),
            updated_at=now,
        )
    )


# --- PostgreSQL: COPY into a staging table, then one set-based statement per table ---------------

# The chunk's rows as the reader checked them (PreparedRow's columns), then as classified against the
# database. Temporary tables live per connection and empty at every commit or rollback, so a pooled
# connection carries nothing from one chunk (or one import) to the next.
_STAGING_TABLE = text("""
CREATE TEMPORARY TABLE import_staging (
    line integer NOT NULL, region text NOT NULL, card_number text NOT NULL, citizen_id_index bytea NOT NULL,
    citizen_id_encrypted bytea NOT NULL, name_encrypted bytea NOT NULL, card_ref bytea NOT NULL,
    former_index bytea, sealed_profile bytea NOT NULL
) ON COMMIT DELETE ROWS
""")
# `_adopt_former_indexes` for the staged chunk, in one statement.
_ADOPT = text("""
UPDATE persons SET citizen_id_index = s.citizen_id_index, citizen_id_encrypted = s.citizen_id_encrypted
FROM import_staging s WHERE s.former_index IS NOT NULL AND persons.citizen_id_index = s.former_index
""")
# A chunk is tiny beside the tables it is checked against, whatever the planner's (often stale, after
# a bulk load) statistics say: index look-ups only, never a scan of cards or persons, and no JIT
# compilation, which costs more than the statements it would speed up. For this transaction only.
_PREPARE_TRANSACTION = text(
    "SELECT to_regclass('pg_temp.import_staging') IS NOT NULL, set_config('jit', 'off', true), "
    "set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), "
    "set_config('enable_mergejoin', 'off', true)"
)
# The persons the chunk names who are registered already, locked in id order before the chunk is
# classified. A unique index stops two writers registering one citizen ID or giving one card number
# twice (the later one fails, and its chunk is classified again); this lock is what stops two of them
# giving a registered person two cards in use: another import's chunk, or a single issue (which locks
# its person too, `issue_card`), waits for this one's commit and then sees its card. Chunks of one file
# never name one person twice (the reader refuses the repeat), so they are written side by side.
# (An index scan for the array's values: a join could be planned as a scan of every person.)
_LOCK_PERSONS = text(
    "SELECT id FROM persons WHERE citizen_id_index = ANY (ARRAY(SELECT citizen_id_index FROM import_staging)) "
    "ORDER BY id FOR UPDATE"
)


class _Outcome:
    """How a staged row relates to what the database holds (the `outcome` column of _APPLY)."""

    CREATE = 0
    PRESENT = 1
    OTHER_PERSON = 2
    OTHER_REGION = 3
    HOLDING = 4


_REJECTED_OUTCOMES = (_Outcome.OTHER_PERSON, _Outcome.OTHER_REGION, _Outcome.HOLDING)

# The whole chunk in one statement, with the rules of `_apply_chunk`: a known card number decides by
# its owner and region; otherwise a known person gets a new card unless they hold one in use ('issued'
# or 'active', _CARDS_IN_USE). The outcome numbers are _Outcome's. Every insert reads the classified
# rows `k` once; foreign keys are checked at the end of the statement, so cards may point at persons
# inserted beside them.
#
# New ids are UUIDv7 (RFC 9562): the chunk's millisecond and version nibble (:stamp, 7 bytes) before 70
# random bits of gen_random_uuid(), variant kept. Time-ordered keys go to the right edge of the id
# indexes and of the foreign-key indexes that point at them (cards.person_id, ecards.card_id), where
# pages are hot, instead of a random page each: half the cost of those inserts here, and no random I/O
# once the tables outgrow memory. The random bits keep them unguessable (70 bits; uuid4 has 122).
_APPLY = text("""
WITH k AS MATERIALIZED (
    SELECT s.*,
        CASE
            WHEN c.id IS NULL THEN
                CASE WHEN q.id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM cards h WHERE h.person_id = q.id AND h.state IN ('issued', 'active')
                ) THEN 4 ELSE 0 END
            WHEN p.citizen_id_index <> s.citizen_id_index THEN 2
            WHEN c.region_code <> s.region THEN 3
            ELSE 1
        END AS outcome,
        q.id AS known_person
    FROM import_staging s
    LEFT JOIN cards c ON c.card_number = s.card_number
    LEFT JOIN persons p ON p.id = c.person_id
    LEFT JOIN persons q ON q.citizen_id_index = s.citizen_id_index
), created AS MATERIALIZED (
    SELECT k.*,
        coalesce(known_person, encode(overlay(uuid_send(gen_random_uuid()) PLACING :stamp FROM 1 FOR 7), 'hex')::uuid)
            AS person_id,
        encode(overlay(uuid_send(gen_random_uuid()) PLACING :stamp FROM 1 FOR 7), 'hex')::uuid AS card_id,
        encode(overlay(uuid_send(gen_random_uuid()) PLACING :stamp FROM 1 FOR 7), 'hex')::uuid AS ecard_id
    FROM k WHERE outcome = 0
), new_persons AS (
    INSERT INTO persons (id, region_code, citizen_id_index, citizen_id_encrypted, name_encrypted, created_at)
    SELECT person_id, region, citizen_id_index, citizen_id_encrypted, name_encrypted, :now
    FROM created WHERE known_person IS NULL
), new_cards AS (
    INSERT INTO cards (id, person_id, region_code, card_number, state, created_at)
    SELECT card_id, person_id, region, card_number, 'issued', :now FROM created
), new_ecards AS (
    INSERT INTO ecards (id, card_id, region_code, card_ref, state, updated_at, sealed_profile)
    SELECT ecard_id, card_id, region, card_ref, 'pending_activation', :now,
        CASE WHEN known_person IS NULL THEN sealed_profile END
    FROM created
), rejected AS (
    INSERT INTO import_rejections (job_id, line, card_number, reason)
    SELECT :job_id, line, card_number, CASE outcome
        WHEN 2 THEN 'card number is already issued to another person'
        WHEN 3 THEN 'card number is already issued in another region'
        WHEN 4 THEN 'this person already holds a card in use'
    END
    FROM k WHERE outcome IN (2, 3, 4)
)
SELECT outcome, count(*) FROM k GROUP BY outcome
""")


def _uuid7_stamp() -> bytes:
    """The first 7 bytes of a UUIDv7 minted now: 48 bits of Unix milliseconds, version 7, 4 random bits."""
    return (time.time_ns() // 1_000_000).to_bytes(6, "big") + bytes([0x70 | secrets.randbelow(16)])


async def _copy(session: AsyncSession, table: str, columns: list[str], records: Sequence[tuple[object, ...]]) -> None:
    """COPY records into table on the session's connection, inside its transaction (asyncpg's binary COPY)."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None  # an open connection of the asyncpg dialect
    await driver.copy_records_to_table(table, records=records, columns=columns)


async def _apply_chunk_postgres(session: AsyncSession, job_id: uuid.UUID, chunk: PreparedChunk) -> ImportProgress:
    """`_apply_chunk` on PostgreSQL: the rows COPYed to a staging table, classified and inserted set-wise.

    One transaction, as on SQLite; one statement for the chunk instead of one (or a parameter set) per row.
    """
    now = utcnow()
    # Through SQLAlchemy first: it opens the transaction that the COPYs below then join.
    if not await session.scalar(_PREPARE_TRANSACTION):
        await session.execute(_STAGING_TABLE)
    counts: dict[int, int] = {}
    if chunk.rows:
        await _copy(session, "import_staging", list(PreparedRow._fields), chunk.rows)
        if chunk.dual_index:
            await session.execute(_ADOPT)
        await session.execute(_LOCK_PERSONS)
        found = await session.execute(_APPLY, {"stamp": _uuid7_stamp(), "now": now, "job_id": job_id})
        counts = {int(outcome): int(n) for outcome, n in found.all()}
    if chunk.rejections:
        await _copy(
            session, "import_rejections", ["job_id", "line", "card_number", "reason"],
            [(job_id, rejection.line, rejection.card_number, rejection.reason) for rejection in chunk.rejections],
        )  # fmt: skip
    done = ImportProgress(
        rows=chunk.size,
        created=counts.get(_Outcome.CREATE, 0),
        already_present=counts.get(_Outcome.PRESENT, 0),
        rejected=len(chunk.rejections) + sum(counts.get(code, 0) for code in _REJECTED_OUTCOMES),
        bytes_processed=chunk.bytes_processed,
    )
    await _record_counts(session, job_id, done, now)
    await session.commit()
    return done


async def rejection_report(sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID) -> AsyncIterator[str]:
    """The job's rejected rows as CSV text (line, card_number, reason), in line order, a batch at a time."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(REPORT_COLUMNS)
    last_line = 0
    while True:
        async with sessions() as session:
            batch = (
                await session.execute(
                    select(ImportRejection.line, ImportRejection.card_number, ImportRejection.reason)
                    .where(ImportRejection.job_id == job_id, ImportRejection.line > last_line)
                    .order_by(ImportRejection.line)
                    .limit(REPORT_BATCH)
                )
            ).all()
        writer.writerows(batch)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        if len(batch) < REPORT_BATCH:
            return
        last_line = batch[-1][0]


async def write_rejection_report(sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, path: Path) -> None:
    """Write the job's rejected-row report to a CSV file."""
    with path.open("w", encoding="utf-8", newline="") as stream:
        async for text in rejection_report(sessions, job_id):
            stream.write(text)


_background_imports: set[asyncio.Task[None]] = set()


def start_import(
    sessions: async_sessionmaker[AsyncSession], pii: PiiCipher, job_id: uuid.UUID, path: Path, actor: Actor
) -> None:
    """Run an import as a background task of this process; the uploaded file is removed when it ends.

    A job whose process dies stays `running`; uploading the same file again completes it.
    """

    async def work() -> None:
        try:
            await run_import(sessions, pii, job_id, path, actor)
        except ImportFileError:
            pass  # recorded in the job
        except Exception:
            logger.exception("import job %s failed", job_id)
        finally:
            await asyncio.to_thread(path.unlink, missing_ok=True)

    task = asyncio.create_task(work(), name=f"import-{job_id}")
    # The loop keeps only weak references to tasks: hold this one until it is done.
    _background_imports.add(task)
    task.add_done_callback(_background_imports.discard)


def remove_stale_uploads(directory: Path, max_age: timedelta) -> int:
    """Delete uploads older than max_age: left behind by a crashed worker, they hold personal data in clear.

    No import runs anywhere near that long (50 MB at ~2,000 rows/s takes minutes), so an old file
    belongs to no live job. Returns the number removed.
    """
    if not directory.is_dir():
        return 0
    cutoff = time.time() - max_age.total_seconds()
    removed = 0
    for path in directory.glob("*.csv"):
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed
