"""Operator API: bulk card imports from CSV, run in the background, with a report of rejected rows."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath
from litestar.response import Stream
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import ImportJob
from app.domain import errors
from app.domain.audit.services import Actor
from app.domain.imports.schemas import ImportJobOut
from app.domain.imports.services import (
    ImportFileError,
    ImportSource,
    ImportStatus,
    check_header,
    create_job,
    find_job,
    rejection_report,
    start_import,
    store_upload,
)
from app.domain.operators.services import Role
from app.http import problems
from app.http.auth import OPERATOR_SECURITY, requires
from app.http.problems import ProblemBody, problem_responses
from app.security.pii import PiiCipher
from app.security.tokens import OperatorSession
from app.settings import PROJECT_ROOT

CSV_MEDIA_TYPE = "text/csv"
# About 700,000 rows; larger batches go through the CLI.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
UPLOAD_DIR = PROJECT_ROOT / "var" / "imports"


@dataclass
class CsvUploadOperation(Operation):
    """The upload's OpenAPI operation: its body is raw CSV, which no handler parameter describes."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={
                CSV_MEDIA_TYPE: OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY))
            },
            description="UTF-8 CSV with a header row: region,citizen_id,name,card_number",
            required=True,
        )


def _problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=ProblemBody,
        media_type="application/problem+json",
        description=description,
        generate_examples=False,
    )


# Beyond problem_responses: the upload's own answers.
UPLOAD_PROBLEMS = {
    400: _problem_spec("The file has no usable header row (region,citizen_id,name,card_number)"),
    415: _problem_spec("The body is not text/csv"),
}


def job_out(job: ImportJob) -> ImportJobOut:
    """The API's view of a job."""
    return ImportJobOut(
        id=job.id,
        status=ImportStatus(job.status),
        source=ImportSource(job.source),
        regions=list(job.regions),
        file_sha256=job.file_sha256,
        size_bytes=job.size_bytes,
        bytes_processed=job.bytes_processed,
        rows_processed=job.rows_processed,
        created=job.created,
        already_present=job.already_present,
        rejected=job.rejected,
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
        error=job.error,
    )


class ImportController(Controller):
    """Bulk imports of the operator's regions; a job outside them answers exactly like a missing one."""

    path = "/v1/operator/imports"
    tags = ["operator"]
    security = OPERATOR_SECURITY

    @post(
        "/",
        status_code=202,
        summary="Start a bulk card import",
        request_max_body_size=MAX_UPLOAD_BYTES,
        operation_class=CsvUploadOperation,
        responses={**problem_responses(401, 403, 413), **UPLOAD_PROBLEMS},
        guards=[requires(Role.CARD_OFFICER)],
    )
    async def create(
        self,
        pii: NamedDependency[PiiCipher],
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        actor: NamedDependency[Actor],
        request: Request[Any, Any, Any],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
    ) -> ImportJobOut:
        """Upload a CSV file (the raw body, `text/csv`, at most 50 MB) and import it in the background.

        Rows outside the operator's regions are rejected. Importing the same file again creates nothing
        twice, so a job that stopped is completed by uploading its file again. Imported eCards wait for
        activation without a code: issue each one with POST /v1/operator/cards/{id}/activation-code.
        """
        media_type, _options = request.content_type
        if media_type != CSV_MEDIA_TYPE:
            raise problems.problem(415, "unsupported_media_type", f"send the file as {CSV_MEDIA_TYPE}")
        upload = await store_upload(request.stream(), UPLOAD_DIR)
        try:
            await asyncio.to_thread(check_header, upload.path)
        except ImportFileError as exc:
            await asyncio.to_thread(upload.path.unlink, missing_ok=True)
            raise errors.Invalid(str(exc)) from None
        actor = actor
        job = await create_job(
            session,
            actor,
            operator_id=operator.operator_id,
            regions=list(operator.regions),
            source=ImportSource.API,
            file_sha256=upload.sha256,
            size_bytes=upload.size_bytes,
        )
        start_import(sessions, pii, job.id, upload.path, actor)
        return job_out(job)

    @get(
        "/{job_id:uuid}",
        summary="Read an import job",
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.CARD_OFFICER, Role.AUDITOR)],
    )
    async def read(
        self,
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        job_id: FromPath[uuid.UUID],
    ) -> ImportJobOut:
        """The job's status and counts so far: created, already present, rejected."""
        job = await find_job(session, job_id, operator.regions)
        if job is None:
            raise errors.NotFound("no such import job")
        return job_out(job)

    @get(
        "/{job_id:uuid}/rejections",
        summary="Download an import's rejected rows",
        media_type=CSV_MEDIA_TYPE,
        responses=problem_responses(401, 403, 404),
        guards=[requires(Role.CARD_OFFICER, Role.AUDITOR)],
    )
    async def rejections(
        self,
        sessions: NamedDependency[async_sessionmaker[AsyncSession]],
        session: NamedDependency[AsyncSession],
        operator: NamedDependency[OperatorSession],
        job_id: FromPath[uuid.UUID],
    ) -> Stream:
        """The rejected rows so far as CSV (line, card_number, reason); no citizen ID or name, masked or not."""
        if await find_job(session, job_id, operator.regions) is None:
            raise errors.NotFound("no such import job")
        return Stream(
            rejection_report(sessions, job_id),
            media_type=f"{CSV_MEDIA_TYPE}; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="import-{job_id}-rejections.csv"'},
        )
