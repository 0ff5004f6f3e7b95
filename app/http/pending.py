"""The answer to a change that is committed but not yet in the status mirror: 202 instead of 200 or 204.

The store did not answer after the commit (app/domain/cards/mirroring.py): the change stays queued
and reaches every gate within a second of the store's return; until then gates refuse every scan,
since they need the same store. Operators' scripts can tell the two answers apart by the status.
"""

from __future__ import annotations

from typing import TypeVar

from litestar import Response
from litestar.openapi import ResponseSpec

T = TypeVar("T")

PENDING_HEADER = "ECard-Mirror"
PENDING_DESCRIPTION = (
    "Committed, but the card status store did not confirm it yet: the change reaches the gates within a "
    f"second of the store answering again (header `{PENDING_HEADER}: pending`); gates refuse scans meanwhile"
)


def mirror_answer(body: T, mirrored: bool, status: int = 200) -> Response[T]:
    """body with status, or with 202 and the pending header when the mirror does not have the change yet."""
    if mirrored:
        return Response(body, status_code=status)
    return Response(body, status_code=202, headers={PENDING_HEADER: "pending"})


def pending_response(data_container: type | None = None) -> dict[int, ResponseSpec]:
    """OpenAPI documentation of the 202 answer."""
    return {202: ResponseSpec(data_container=data_container, description=PENDING_DESCRIPTION, generate_examples=False)}
