"""Wire format of the bulk import API."""

from __future__ import annotations

import uuid
from datetime import datetime

from app.domain.imports.services import ImportSource, ImportStatus
from app.http.schema import WireModel


class ImportJobOut(WireModel):
    """An import job: where it stands, and what it did so far (counts match what is committed)."""

    id: uuid.UUID
    status: ImportStatus
    source: ImportSource
    regions: list[str]
    file_sha256: str
    size_bytes: int
    bytes_processed: int
    rows_processed: int
    created: int
    already_present: int
    rejected: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
