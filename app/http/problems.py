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


def bad_request(detail: str, **extra: Any) -> ProblemDetailsException:
    """400: the request is malformed."""
    return problem(400, "bad_request", detail, **extra)


def unauthorized(detail: str = "missing or invalid credentials") -> ProblemDetailsException:
    """401: who is asking could not be established."""
    exc = problem(401, "unauthorized", detail)
    exc.headers = {"WWW-Authenticate": "Bearer"}
    return exc


def forbidden(detail: str) -> ProblemDetailsException:
    """403: known caller, action not allowed."""
    return problem(403, "forbidden", detail)


def not_found(detail: str) -> ProblemDetailsException:
    """404: no such thing (or not one the caller may know of)."""
    return problem(404, "not_found", detail)


def conflict(detail: str, **extra: Any) -> ProblemDetailsException:
    """409: the request conflicts with the current state."""
    return problem(409, "conflict", detail, **extra)


def unavailable(detail: str) -> ProblemDetailsException:
    """503: a dependency is down; nothing was accepted."""
    exc = problem(503, "unavailable", detail)
    exc.headers = {"Retry-After": "1"}
    return exc


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
    # The request's id, as in the service's log lines and the `X-Request-Id` answer header.
    request_id: str | None = None


_DESCRIPTIONS = {
    400: (
        "The request is malformed: a parameter or the body fails validation (`errors` says which), or the "
        "body is not JSON, nests too deeply or gives a key twice"
    ),
    401: "Missing or invalid credentials (token, API key, or activation data)",
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


def document_problem_answers(document: dict[str, Any]) -> None:
    """Make the OpenAPI document say what every error answer is: an RFC 9457 problem (`ProblemBody`).

    Litestar documents its own 400 (validation) as `application/json` with a schema of its own;
    every body can be refused as too large (413), every JSON body with 415 (app.http.json_bodies), every
    reused Idempotency-Key with 422. Applied to the whole document once, so no route can forget it.
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
            for status, response in responses.items():
                if int(status) < 400:
                    continue
                response["content"] = {PROBLEM_JSON: {"schema": dict(_PROBLEM_REF)}}
                if status == "400":
                    response["description"] = _DESCRIPTIONS[400]
