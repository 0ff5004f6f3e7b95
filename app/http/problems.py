"""RFC 9457 problem details: the one shape of every error the API returns."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.openapi import ResponseSpec
from litestar.plugins.problem_details import ProblemDetailsException

from app.domain import errors
from app.observability.request_ids import REQUEST_ID

PROBLEM_BASE = "https://ecard.example/problems/"

logger = logging.getLogger(__name__)


class Problem(ProblemDetailsException):
    """A problem details exception whose answer names the request (`request_id`, as in its logs)."""

    def to_response(self, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """The problem answer, with the request's id when it has one."""
        response = super().to_response(request)
        request_id = REQUEST_ID.get()
        if request_id is not None:
            response.content["request_id"] = request_id
        return response


def problem(status: int, code: str, detail: str, **extra: Any) -> ProblemDetailsException:
    """A problem whose `type` ends in a stable code that clients can switch on."""
    return Problem(
        status_code=status,
        type_=PROBLEM_BASE + code,
        title=HTTPStatus(status).phrase,
        detail=detail,
        extra={"code": code, **extra},
    )


# The status of each kind of domain refusal: the one place where the domain's words become HTTP.
_STATUS_BY_KIND: dict[type[errors.DomainError], int] = {
    errors.Invalid: 400,
    errors.Unauthenticated: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Reused: 422,
    errors.Throttled: 429,
    errors.Unavailable: 503,
}


DPOP_CHALLENGE = 'DPoP algs="EdDSA"'
# The OpenAPI security scheme of the DPoP proof header (app.http.auth's HOLDER_SECURITY names it).
DPOP_PROOF_SCHEME = "dpopProof"
_DPOP_ERRORS = {"proof": "invalid_dpop_proof", "token": "invalid_token"}


def from_domain_error(exc: errors.DomainError) -> ProblemDetailsException:
    """A domain refusal as the problem the API answers: its kind's status, its code, detail and facts."""
    status = next((_STATUS_BY_KIND[kind] for kind in type(exc).__mro__ if kind in _STATUS_BY_KIND), None)
    if status is None:  # a bare DomainError is a bug of ours, not the caller's
        logger.error("domain error of no known kind: %r", exc)
        return problem(500, "internal_error", "internal error")
    answer = problem(status, exc.code, exc.detail, **exc.facts)
    headers = {}
    if isinstance(exc, errors.DeviceUnproven):
        # RFC 9449 §7.1: the holder API's scheme is DPoP, with the one algorithm it takes.
        error = _DPOP_ERRORS.get(exc.refused or "")
        headers["WWW-Authenticate"] = DPOP_CHALLENGE + (f', error="{error}"' if error else "")
    elif status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    answer.headers = headers or None
    return answer


_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """500 for an error nobody expected: logged with its traceback, answered without details."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(500, "internal_error", "internal error").to_response(request)


def from_http_exception(exc: HTTPException) -> ProblemDetailsException:
    """Litestar's own errors (validation, 404, 405, 413…) as problem details with their detail kept."""
    status = exc.status_code
    code = _CODES_BY_STATUS.get(status, "error" if status >= 500 else "client_error")
    extra: dict[str, Any] = {"code": code}
    if isinstance(exc.extra, list) and exc.extra:
        extra["errors"] = exc.extra
    elif isinstance(exc.extra, dict):
        extra.update(exc.extra)
    detail = exc.detail
    if status >= 500:
        detail = "internal error"
    return Problem(
        status_code=status,
        type_=PROBLEM_BASE + code,
        title=HTTPStatus(status).phrase,
        detail=detail,
        headers=exc.headers,
        extra=extra,
    )


class ProblemBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An RFC 9457 problem as this API sends it; `code` is stable, `detail` is for people."""

    status: int
    type: str
    title: str
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None
    current_state: str | None = None
    # Why a DPoP proof was refused (`invalid_dpop_proof`): malformed, stale, replayed, wrong_key, wrong_uri…
    reason: str | None = None
    # The request's id, as in the service's log lines and the `X-Request-Id` answer header.
    request_id: str | None = None


_DESCRIPTIONS = {
    400: (
        "The request is malformed: a parameter or the body fails validation (`errors` says which), or the "
        "body is not JSON, nests too deeply or gives a key twice"
    ),
    401: (
        "Missing or invalid credentials (token, API key, DPoP proof, or activation data). Holder routes answer "
        '`WWW-Authenticate: DPoP algs="EdDSA"` with `error="invalid_dpop_proof"` (the problem\'s `reason` says why) '
        'or `error="invalid_token"`'
    ),
    403: "Authenticated, but not allowed to do this",
    404: "No such resource (or one outside the caller's regions)",
    409: "Conflicts with the current state; `current_state` says what it is where relevant",
    413: "Request body too large",
    415: "The body is not sent as `application/json` (a charset, if given, must be UTF-8)",
    422: "This Idempotency-Key was used for a different request (`idempotency_key_reused`)",
    429: "Over the caller's rate: nothing was consumed; `Retry-After` says when to try again",
    503: "A dependency is unreachable; nothing was accepted or changed",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI documentation of the problem answers an endpoint can give (400 is documented by Litestar)."""
    return {
        status: ResponseSpec(
            data_container=ProblemBody,
            media_type=PROBLEM_JSON,
            description=_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in statuses
    }


PROBLEM_JSON = "application/problem+json"
_PROBLEM_REF = {"$ref": "#/components/schemas/ProblemBody"}
_DPOP_CHALLENGE_HEADER = {
    "description": (
        f"`{DPOP_CHALLENGE}` when the request's credentials were refused (RFC 9449 §7.1): with "
        '`error="invalid_dpop_proof"` for the DPoP proof (the problem\'s `reason` says why), `error="invalid_token"` '
        "for the access token. Other refusals (activation data, a refresh token, a wrong PIN) say `Bearer`, as before"
    ),
    "schema": {"type": "string"},
}


def document_problem_answers(document: dict[str, Any]) -> None:
    """Make the OpenAPI document say what every error answer is: an RFC 9457 problem (`ProblemBody`).

    Litestar documents its own 400 (validation) as `application/json` with a schema of its own;
    every body can be refused as too large (413), every JSON body with 415 (app.http.json_bodies), every
    reused Idempotency-Key with 422; a 401 of a route that takes a DPoP proof says its challenge. Applied
    to the whole document once, so no route can forget it.
    """
    for item in document.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses: dict[str, Any] = operation["responses"]
            body_types = operation.get("requestBody", {}).get("content", {})
            if body_types:  # every route has a body size limit (Litestar's default, or its own)
                responses.setdefault("413", {"description": _DESCRIPTIONS[413]})
            if "application/json" in body_types:
                responses.setdefault("415", {"description": _DESCRIPTIONS[415]})
            if any(parameter.get("name") == "Idempotency-Key" for parameter in operation.get("parameters", [])):
                responses.setdefault("422", {"description": _DESCRIPTIONS[422]})
            proven = any(DPOP_PROOF_SCHEME in requirement for requirement in operation.get("security", []))
            for status, response in responses.items():
                if int(status) < 400:
                    continue
                response["content"] = {PROBLEM_JSON: {"schema": dict(_PROBLEM_REF)}}
                if status == "401" and proven:
                    response["headers"] = {"WWW-Authenticate": dict(_DPOP_CHALLENGE_HEADER)}
                if status == "400":
                    response["description"] = _DESCRIPTIONS[400]
