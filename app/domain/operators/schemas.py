"""Wire format of operator sign-in."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from app.http.schema import WireModel


class SignInRequest(WireModel):
    """Operator credentials."""

    username: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class OperatorToken(WireModel):
    """An operator session."""

    access_token: str
    token_type: Literal["Bearer"]
    expires_in: int
    role: str
    regions: list[str]
