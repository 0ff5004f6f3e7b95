"""Time in UTC, whichever database returned it."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes for what was stored as UTC; make them aware."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
