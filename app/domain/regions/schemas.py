"""Wire format of regions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from app.schema import WireModel


class RegionCreate(WireModel):
    """A region to register, by GB/T 2260 code."""

    code: Annotated[str, msgspec.Meta(pattern=r"^[1-9][0-9]{5}$", examples=["510000"])]
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100, examples=["四川省"])]


class RegionOut(WireModel):
    """A registered region."""

    code: str
    name: str
    created_at: datetime
