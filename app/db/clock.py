"""Time in UTC, whichever database returned it."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """The moment as aware UTC: naive ones (SQLite hands back what was stored as UTC) are taken as UTC,
    aware ones in another zone (a client's +08:00) are converted, so SQLite compares like PostgreSQL."""
    return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
