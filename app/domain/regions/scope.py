"""An operator's region scope: region codes, or '*' for every region."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

from sqlalchemy import Select

ALL_REGIONS = "*"

SelectT = TypeVar("SelectT", bound=Select)  # type: ignore[type-arg]


def covers(scope: Collection[str], region: str | None) -> bool:
    """Whether the scope includes region (only '*' covers things without a region)."""
    return ALL_REGIONS in scope or (region is not None and region in scope)


def within(query: SelectT, column: Any, scope: Collection[str]) -> SelectT:
    """The query restricted to rows whose region column lies in the scope."""
    return query if ALL_REGIONS in scope else query.where(column.in_(tuple(scope)))
