"""What the domain refuses, said without HTTP: one exception per kind, each with a stable `code`.

Services raise these; the HTTP edge maps each kind to its status once (app.http.problems), the CLI
prints them. `code` is what clients switch on (the problem's `type` ends in it), `detail` is for
people, `facts` travel to the answer as extra members (`attempts_left`, `current_state`…), and
`retry_after` (seconds) says when trying again makes sense.
"""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """A refusal of the domain; its kind says what went wrong, `code` says it precisely."""

    default_code: ClassVar[str] = "error"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: int | None = None, **facts: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.default_code
        self.retry_after = retry_after
        self.facts = facts


class Invalid(DomainError):
    """The request is malformed or breaks a rule of its own (a field, a combination of fields)."""

    default_code = "bad_request"


class Unauthenticated(DomainError):
    """Who is asking could not be established (token, key, password, activation data)."""

    default_code = "unauthorized"


class DeviceUnproven(Unauthenticated):
    """A holder's request did not prove possession of the device key its tokens are bound to (DPoP).

    `refused` says what failed: "proof" (missing, malformed, replayed, by another key, for another
    request), "token" (the access token is not good, or not sent as a bound one), or None when no
    credentials came at all. `reason` (a fact) names the proof's refusal precisely.
    """

    default_code = "invalid_dpop_proof"

    def __init__(self, detail: str, *, refused: str | None = "proof", code: str | None = None, **facts: Any) -> None:
        super().__init__(detail, code=code, **facts)
        self.refused = refused


class Forbidden(DomainError):
    """A known caller asks for something it may not do."""

    default_code = "forbidden"


class NotFound(DomainError):
    """No such thing, or not one the caller may know of."""

    default_code = "not_found"


class Conflict(DomainError):
    """The request conflicts with the current state (`current_state` says what it is, where it helps)."""

    default_code = "conflict"


class Reused(DomainError):
    """An idempotency key came back with a different request."""

    default_code = "idempotency_key_reused"


class Throttled(DomainError):
    """The caller is over its rate; nothing was consumed."""

    default_code = "rate_limited"


class Unavailable(DomainError):
    """A dependency did not answer; `code` says whether anything may have happened."""

    default_code = "unavailable"

    def __init__(self, detail: str, *, code: str | None = None, retry_after: int | None = 1, **facts: Any) -> None:
        super().__init__(detail, code=code, retry_after=retry_after, **facts)
